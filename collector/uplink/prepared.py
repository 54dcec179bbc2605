"""A payload-3 message made ready for the central writer: arrays, no Python step per value. Pure: no SQL.

The central consumer has one writer (SQLite allows one).  Decoding a message
(core.decode: inflate, typed msgpack, every value checked) and merging its
blocks' groups per (sensor, boot) depend on the message alone, so the close
workers (closer.py) run them ahead of the writer (`prepare` returns what
`core.decode` returns, except that a version-3 columns message becomes a
`Prepared`), and the writer makes its own messages ready the same way
(central.Central._columnar, from_blocks on what it decoded):

- its groups merged per (gateway:sensor, boot) in order of first appearance,
  commit order kept within each, metrics no datagram carried dropped (as the
  writer's merge per key does), every column as a compact array (seqs int64,
  times and values float64, NaN where a datagram did not carry the metric:
  what an open head holds) read once out of the decoded lists, instead of
  lists merged per key;
- the blocks' log bodies as they came (zlib, the gateway's bytes): the central
  ingest_log row keeps them with the gateway's prefix (ingestlog.encode_refs,
  body version 2) instead of packing and compressing every value again;
- each block's key range and readings, and the rows the gateway says are
  gone: what the writer's de-duplication (ranges.py) decides with.

The writer takes a Prepared as it is only when every block is new (the usual
case); otherwise (a replay, rows gone, a gateway that sent payload 1 or 2
before) it takes the message block by block as before (central.py), so a
Prepared never decides what is kept.  A group that names a metric with no value
(None only) is refused (ValueError): the body kept as it came would name it,
so such a message goes block by block too.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, repeat
from operator import is_, itemgetter

import msgpack
import msgspec
import numpy as np

from .. import ingestlog
from . import core, ranges


@dataclass
class Prepared:
    gateway: str
    origin: str
    spans: tuple[tuple[int, int], ...]  # each block's key range, in the message's order
    keys: list[tuple[str, int | None]]  # (central sensor, boot), in order of first appearance
    bounds: list[int]  # key k's datagrams are bounds[k]:bounds[k + 1] of the columns
    present: list[tuple[str, ...]]  # the metrics some datagram of key k carries
    seqs: bytes  # int64, every key's datagrams in turn (commit order within each)
    ts: bytes  # float64
    received: bytes  # float64
    metrics: dict[str, bytes]  # float64, NaN where a datagram did not carry the metric
    bodies: tuple[bytes, ...]  # the blocks' log bodies as they came: the central log row's parts
    datagrams: int
    readings: int
    gone: bool  # the message names log rows the gateway lost (the writer takes it block by block)
    # the message itself, set by the writer (for the block-by-block way); None when the writer made
    # it and took it as it is (central.Central._columnar)
    payload: bytes | None = b""

    def groups(self) -> list[ingestlog.Group]:
        """One group per key, its columns memoryviews of this message's bytes (int64, float64):
        what an open head appends without a Python step per value (chunkstore.Head.extend)."""
        seqs = memoryview(self.seqs).cast("q")
        ts = memoryview(self.ts).cast("d")
        received = memoryview(self.received).cast("d")
        metrics = {name: memoryview(column).cast("d") for name, column in self.metrics.items()}
        bounds = self.bounds
        return [
            ingestlog.Group(sensor, boot, seqs[a:b], ts[a:b], received[a:b], {n: metrics[n][a:b] for n in names})
            for (sensor, boot), names, a, b in zip(self.keys, self.present, bounds, bounds[1:])
        ]


def prepare(data: bytes) -> Prepared | core.Readings | core.Accounts | core.Columns | core.Snapshots | core.Blocks:
    """What core.decode gives (PayloadError likewise), a version-3 columns message as a Prepared
    (as decoded when from_blocks refuses it: the writer takes it block by block)."""
    made = parse(data)
    if made is not None:
        return made
    item = core.decode(data)
    if isinstance(item, core.Blocks):
        try:
            return from_blocks(item)
        except ValueError:  # a metric a group carries as None only
            return item
    return item


def _floats(values: list, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """float64 of ints and floats as float(v) makes them, NaN for None, and where the values
    are None (None when none is)."""
    none = np.fromiter(map(is_, values, repeat(None)), np.bool_, n)
    return np.fromiter(values, np.float64, n), none if none.any() else None


def from_blocks(item: core.Blocks) -> Prepared:
    """Every column read once out of the message's groups into an array (in the order they
    came), put in key order by one stable sort of the datagrams by their key's first
    appearance (numpy), then cut per key; Python steps per key, none per value.  The log body
    is the groups as they came (sensors renamed, values untouched), not merged: a log row may
    hold several groups of one (sensor, boot), taken in order (collector/ingestlog.py)."""
    gs: list = list(chain.from_iterable(b.groups for b in item.blocks))
    sensors, boots, seqs_l, ts_l, received_l, maps = zip(*gs)
    gateway = item.gateway
    central = {s: core.central_sensor(gateway, s) for s in dict.fromkeys(sensors)}
    renamed = list(map(central.__getitem__, sensors))
    local = list(zip(renamed, boots))
    index = dict.fromkeys(local)
    for i, key in enumerate(index):
        index[key] = i
    lens = list(map(len, seqs_l))
    n = sum(lens)
    gids = np.fromiter(map(index.__getitem__, local), np.int64, len(gs))
    ids = np.repeat(gids, lens)
    perm = None if len(index) == len(gs) else np.argsort(ids, kind="stable")
    bounds = [0, *np.cumsum(np.bincount(ids, minlength=len(index))).tolist()]
    names = dict.fromkeys(chain.from_iterable(maps))
    regular = min(map(len, maps)) == len(names)  # every group names every metric (in some order)
    whole = regular and item.readings == n * len(names)  # and no value is None (the decoder counted them)
    fills: list | None = None

    def arranged(a: np.ndarray) -> bytes:
        return (a if perm is None else a[perm]).tobytes()

    floats: dict[str, bytes] = {}
    carried: dict[str, list[bool]] = {}  # per metric with a None: whether each key carries it
    starts = None
    for name in names:
        none = None
        if whole:  # one pass in C, no list (np.fromiter would take None as NaN: none is there)
            values = np.fromiter(chain.from_iterable(map(itemgetter(name), maps)), np.float64, n)
        elif regular:
            values, none = _floats(list(chain.from_iterable(map(itemgetter(name), maps))), n)
        else:  # None where a group does not carry it
            if fills is None:
                nones = [None] * max(lens)
                fills = list(map(nones.__getitem__, map(slice, lens)))
            values, none = _floats(list(chain.from_iterable(map(dict.get, maps, repeat(name), fills))), n)
        floats[name] = arranged(values)
        if none is not None:
            some = ~none
            carried[name] = np.logical_or.reduceat(some if perm is None else some[perm], bounds[:-1]).tolist()
            if starts is None:
                starts = np.cumsum([0, *lens[:-1]])
            for i in np.flatnonzero(~np.logical_or.reduceat(some, starts)).tolist():
                if name in maps[i]:  # the log row keeps the body as it came: this group would name it
                    raise ValueError(f"metric {name!r} of a group carries None only")
    # the metrics of each key in the order its groups first name them (those no datagram of it
    # carried left out, as the writer's merge does)
    if perm is None:  # a group per key
        names_of = list(map(tuple, maps))
    elif regular:  # the order of each key's first group
        firsts = np.unique(gids, return_index=True)[1].tolist()
        names_of = list(map(tuple, map(maps.__getitem__, firsts)))
    else:
        gperm = np.argsort(gids, kind="stable").tolist()
        ordered = list(map(maps.__getitem__, gperm))
        gbounds = [0, *np.cumsum(np.bincount(gids, minlength=len(index))).tolist()]
        names_of = [tuple(dict.fromkeys(chain.from_iterable(ordered[a:b]))) for a, b in zip(gbounds, gbounds[1:])]
    present = _present(names_of, carried)
    seqs = np.fromiter(chain.from_iterable(seqs_l), np.int64, n)
    ts = np.fromiter(chain.from_iterable(ts_l), np.float64, n)
    received = np.fromiter(chain.from_iterable(received_l), np.float64, n)
    return Prepared(
        gateway,
        item.origin,
        tuple(b.range for b in item.blocks),
        list(index),
        bounds,
        present,
        arranged(seqs),
        arranged(ts),
        arranged(received),
        floats,
        tuple(b.body for b in item.blocks),
        item.datagrams,
        item.readings,
        bool(item.gone),
    )


# ---------------------------------------------------------------- the log bodies' bytes, read as arrays
#
# A log body is read from its bytes (collector/ingestlog.py: msgpack as msgspec writes it): msgspec
# only cuts it into its groups (one msgspec.Raw each, checked to be whole msgpack items), then
# every group is read at once, field by field (numpy over all the message's groups: the sensor's
# name, the boot, each column's header and items), so no Python object is made per value and
# few per group.  Whatever is not read exactly as core.decode + from_blocks would read it (a
# column whose items are not all of one width, as a seq crossing 127 -> 128; a value out of
# range; a nil where a value must be; a key named twice; a key whose groups name their metrics
# in different orders, ...) is refused here: `parse` returns None and `prepare` takes the
# message the way before, which decides (and says why it refuses, when it does).

_GROUPS = msgspec.msgpack.Decoder(tuple[int, list[msgspec.Raw]])

# Bytes of a msgpack item by its first byte, for the scalars a column holds (0: none of those):
# fixint, negative fixint and nil 1; (u)int8 2; (u)int16 3; (u)int32 and float32 5; (u)int64 and
# float64 9.
_WIDTH = np.zeros(256, np.int64)
_WIDTH[:0x80] = 1
_WIDTH[0xE0:] = 1
_WIDTH[0xC0] = 1
_WIDTH[[0xCC, 0xD0]] = 2
_WIDTH[[0xCD, 0xD1]] = 3
_WIDTH[[0xCA, 0xCE, 0xD2]] = 5
_WIDTH[[0xCB, 0xCF, 0xD3]] = 9
# The big-endian type after the first byte, per first byte (ints and floats).
_TYPES = {
    0xCC: ">u1",
    0xCD: ">u2",
    0xCE: ">u4",
    0xCF: ">u8",
    0xD0: ">i1",
    0xD1: ">i2",
    0xD2: ">i4",
    0xD3: ">i8",
    0xCA: ">f4",
    0xCB: ">f8",
}
_FLOAT_TAGS = (0xCA, 0xCB)
_NIL = 0xC0
_F64 = 0xCB
_GROUP = 0x96  # an array of 6: [sensor, boot, seqs, ts, received, metrics]
MAX_KEYS = 64  # metrics a group names at most here (more: the way before)


def _present(names_of: list[tuple[str, ...]], carried: dict[str, list[bool]]) -> list[tuple[str, ...]]:
    """Each key's metric names, less those no datagram of that key carried a value for; equal tuples
    are one object, so a message pickles each set of names once."""
    shared: dict[tuple[str, ...], tuple[str, ...]] = {}
    if not carried:
        return [shared.setdefault(named, named) for named in names_of]
    present: list[tuple[str, ...]] = []
    for k, named in enumerate(names_of):
        kept = tuple(name for name in named if name not in carried or carried[name][k])
        present.append(shared.setdefault(kept, kept))
    return present


class _Refused(Exception):
    """What parse does not read exactly as core.decode would: the message goes the way before."""


def _at(buf: np.ndarray, pos: np.ndarray, dtype: str) -> np.ndarray:
    """The `dtype` values that start at byte positions `pos` of buf (unaligned: any byte)."""
    size = np.dtype(dtype).itemsize
    if len(buf) < size:
        raise _Refused("short")
    view = np.ndarray((len(buf) - size + 1,), dtype, buffer=buf, strides=(1,))
    return view[pos]


def _headers(buf: np.ndarray, p: np.ndarray, fix: int, bits: int, codes: tuple[int, int, int]) -> tuple:
    """(length, header bytes) of the msgpack items at p, all of one family: its fix form (first
    byte `fix` plus the length in its low `bits`) or its 8/16/32-bit forms (`codes`; 0: none)."""
    tag = buf[p].astype(np.int64)
    short = (tag & ~((1 << bits) - 1)) == fix
    if short.all():
        return tag & ((1 << bits) - 1), 1
    length = np.where(short, tag & ((1 << bits) - 1), 0)
    hdr = np.ones(len(p), np.int64)
    seen = short.copy()
    for code, dtype in zip(codes, (">u1", ">u2", ">u4")):
        if not code:
            continue
        at = tag == code
        if at.any():
            length[at] = _at(buf, p[at] + 1, dtype)
            hdr[at] = 1 + np.dtype(dtype).itemsize
            seen |= at
    if not seen.all():
        raise _Refused("another item")
    return length, hdr


def _arrays(buf: np.ndarray, p: np.ndarray) -> tuple:
    return _headers(buf, p, 0x90, 4, (0, 0xDC, 0xDD))


def _strs(buf: np.ndarray, p: np.ndarray) -> tuple:
    return _headers(buf, p, 0xA0, 5, (0xD9, 0xDA, 0xDB))


def _maps(buf: np.ndarray, p: np.ndarray) -> tuple:
    return _headers(buf, p, 0x80, 4, (0, 0xDE, 0xDF))


def _scalars(buf: np.ndarray, pos: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The scalars at pos, each of its first byte's width (checked by the caller): (values,
    where they are nil or None).  kind "int": int64 (nil allowed: boots); "time": ints or floats
    in [0, MAX_TIME); "value": ints, finite floats or nil."""
    tags = buf[pos]
    if kind != "int" and bool((tags == _F64).all()):  # float64: the usual
        values = _at(buf, pos + 1, ">f8").astype(np.float64)
        nil = None
    else:
        out = np.empty(len(pos), np.int64 if kind == "int" else np.float64)
        nils = tags == _NIL
        small = tags < 0x80
        out[small] = tags[small]
        negative = tags >= 0xE0
        out[negative] = tags[negative].astype(np.int64) - 256
        for code in np.unique(tags[~(small | negative | nils)]).tolist():
            if code not in _TYPES or (kind == "int" and code in _FLOAT_TAGS):
                raise _Refused("not a number of this column's kind")
            at = tags == code
            got = _at(buf, pos[at] + 1, _TYPES[code])
            if code == 0xCF and bool((got > np.uint64(core.INT64_MAX)).any()):
                raise _Refused("an int beyond int64")
            out[at] = got
        nil = nils if nils.any() else None
        if nil is not None:
            if kind == "time":
                raise _Refused("a nil where a time must be")
            out[nil] = np.nan if kind == "value" else 0
        values = out
    if kind == "time":
        if not bool(((values >= 0.0) & (values < core.MAX_TIME)).all()):
            raise _Refused("a time out of range")
    elif kind == "value":
        if not bool(np.isfinite(values if nil is None else values[~nil]).all()):
            raise _Refused("a value that is not finite")
    return values, nil


def _column(buf: np.ndarray, p: np.ndarray, n: np.ndarray | None, kind: str) -> tuple:
    """The arrays at p (one per group; `n`: the items each must hold), their items read at once:
    (items per array, values, nil mask or None, the positions after them).  Every item of an
    array must be of its first item's width (then reading at that stride is reading them one by
    one); anything else is refused."""
    count, hdr = _arrays(buf, p)
    if n is not None and not np.array_equal(count, n):
        raise _Refused("column lengths")
    if not count.all():
        raise _Refused("an empty column")
    first = p + hdr
    width = _WIDTH[buf[first]]
    if not width.all():
        raise _Refused("not a scalar")
    total = int(count.sum())
    within = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    w0 = int(width[0])
    if bool((width == w0).all()):
        pos = np.repeat(first, count) + w0 * within
        ok = bool((_WIDTH[buf[pos]] == w0).all())
    else:
        each = np.repeat(width, count)
        pos = np.repeat(first, count) + each * within
        ok = np.array_equal(_WIDTH[buf[pos]], each)
    if not ok:
        raise _Refused("items of several widths")
    if kind == "int" and bool((buf[pos] == _NIL).any()):
        raise _Refused("a nil where an int must be")
    values, nil = _scalars(buf, pos, kind)
    return count, values, nil, first + count * width


def _first_order(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each code's number in order of first appearance, and where each number first appears."""
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)], first[order]


def _names(joined: bytes, a: np.ndarray, b: np.ndarray) -> list[bytes]:
    return list(map(joined.__getitem__, map(slice, a.tolist(), b.tolist())))


def _same(buf: np.ndarray, a: np.ndarray, length: np.ndarray) -> int | None:
    """Where the first of the byte strings at a (of `length` bytes each) starts, when all are the
    same bytes; None otherwise."""
    size = int(length[0])
    if not bool((length == size).all()):
        return None
    if size and not bool((buf[a[:, None] + np.arange(size)] == buf[int(a[0]) : int(a[0]) + size]).all()):
        return None
    return int(a[0])


def _text(raw: bytes) -> str:
    """A sensor or metric name as core._Name takes it: UTF-8, 1 to 256 characters."""
    s = raw.decode()  # UnicodeDecodeError is a ValueError: refused
    if not 0 < len(s) <= 256:
        raise _Refused("a name's length")
    return s


def parse(data: bytes) -> Prepared | None:
    """A version-3 columns message as from_blocks(core.decode(data)) makes it, read as arrays
    from its bytes; None when it is anything else or anything in it is not read exactly so
    (then core.decode and from_blocks decide, as before)."""
    if len(data) > core.MAX_PAYLOAD_BYTES:
        return None
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception:  # msgpack raises several unrelated types for bad input
        return None
    if not (
        type(body) is list
        and len(body) == 6
        and type(body[0]) is int
        and body[0] == 3
        and body[1] == core.KIND_COLUMNS
        and body[4] == []
        and type(body[5]) is list
        and body[5]
    ):
        return None
    gateway, origin, _, entries = body[2:]
    if not (
        isinstance(gateway, str)
        and core.GATEWAY_RE.fullmatch(gateway) is not None
        and isinstance(origin, str)
        and core.ORIGIN_RE.fullmatch(origin) is not None
    ):
        return None
    try:
        return _parse(gateway, origin, entries)
    except (_Refused, core.PayloadError, msgspec.ValidationError, msgspec.DecodeError, ValueError, IndexError):
        return None


def _parse(gateway: str, origin: str, entries: list) -> Prepared:
    budget = core.MAX_INFLATED_BYTES
    heads: list[tuple[int, int, bool]] = []
    bodies: list[bytes] = []
    raws: list[bytes] = []
    starts_l: list[np.ndarray] = []
    per_block: list[int] = []  # groups of each block
    base = 0
    for entry in entries:
        row_id, offset, last, body, raw = core.block_entry(entry, budget)
        budget -= len(raw)
        version, groups = _GROUPS.decode(raw)
        if version != ingestlog.BODY_VERSION or not groups:
            raise _Refused("log body version or no groups")
        lens = np.fromiter(map(len, groups), np.int64, len(groups))
        ends = np.cumsum(lens)
        # the groups are the body's last item: they run to its end, one after the other
        starts_l.append(base + len(raw) - int(ends[-1]) + ends - lens)
        heads.append((row_id, offset, last))
        bodies.append(body)
        raws.append(raw)
        per_block.append(len(groups))
        base += len(raw)
    joined = b"".join(raws)
    buf = np.frombuffer(joined, np.uint8)
    starts = np.concatenate(starts_l)
    ends = (
        np.append(starts[1:], len(buf))
        if len(raws) == 1
        else np.concatenate([np.append(s[1:], b) for s, b in zip(starts_l, np.cumsum([len(r) for r in raws]).tolist())])
    )
    groups_n = len(starts)
    if not bool((buf[starts] == _GROUP).all()):
        raise _Refused("a group that is not an array of 6")
    p = starts + 1
    # the sensor
    length, hdr = _strs(buf, p)
    sensor_bytes = _names(joined, p + hdr, p + hdr + length)
    p = p + hdr + length
    # the boot: an int or nil
    width = _WIDTH[buf[p]]
    if not width.all():
        raise _Refused("a boot that is not an int")
    boots, no_boot = _scalars(buf, p, "int")
    p = p + width
    n, seqs, _, p = _column(buf, p, None, "int")
    _, ts, _, p = _column(buf, p, n, "time")
    _, received, _, p = _column(buf, p, n, "time")
    keys_n, hdr = _maps(buf, p)
    p = p + hdr
    slots = int(keys_n.max())
    if slots > MAX_KEYS:
        raise _Refused("too many metrics")
    total = int(n.sum())
    offsets = np.cumsum(n) - n
    names: dict[bytes, int] = {}
    first_seen: list[int] = []  # per name id: group * MAX_KEYS + slot where first named
    ids = np.full((groups_n, max(slots, 1)), -1, np.int64)
    slot_values: list[tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray | None]] = []
    for k in range(slots):
        active = keys_n > k
        every = bool(active.all())
        at = p if every else p[active]
        length, hdr = _strs(buf, at)
        where = None if every else np.flatnonzero(active)
        one = _same(buf, at + hdr, length)
        if one is not None:  # the usual: one name in this slot of every group
            key_bytes = [joined[one : one + int(length[0])]]
        else:
            key_bytes = _names(joined, at + hdr, at + hdr + length)
        for name in dict.fromkeys(key_bytes):
            if name not in names:
                names[name] = len(names)
                i = key_bytes.index(name)
                first_seen.append((i if where is None else int(where[i])) * MAX_KEYS + k)
        if one is not None:
            slot_ids = np.full(len(at), names[key_bytes[0]], np.int64)
        else:
            slot_ids = np.fromiter(map(names.__getitem__, key_bytes), np.int64, len(key_bytes))
        if every:
            ids[:, k] = slot_ids
        else:
            ids[active, k] = slot_ids
        _, values, nil, after = _column(buf, at + hdr + length, n if every else n[active], "value")
        if every:
            p = after
        else:
            p = p.copy()
            p[active] = after
        slot_values.append((None if every else active, slot_ids, values, nil))
    if not np.array_equal(p, ends):
        raise _Refused("a group with more in it")
    for a in range(slots):  # a key named twice in a group: the way before keeps the last (and checks both)
        for b in range(a + 1, slots):
            if bool(((ids[:, a] == ids[:, b]) & (ids[:, b] >= 0)).any()):
                raise _Refused("a key named twice")
    # names in order of first appearance (group by group, each in its map's order)
    order = np.argsort(np.array(first_seen, np.int64), kind="stable").tolist()
    by_id = list(names)
    metric_names = [_text(by_id[i]) for i in order]
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    if len(order):
        ids = np.where(ids >= 0, rank[np.maximum(ids, 0)], -1)
    columns: list[tuple[np.ndarray, np.ndarray | None]] = []
    readings = 0
    for j in range(len(order)):
        column = None
        absent = None
        nils = None
        for active, slot_ids, values, nil in slot_values:
            mine = rank[slot_ids] == j
            if active is None and bool(mine.all()):  # the usual: every group names it in this slot
                column, nils = values, nil
                break
            if not mine.any():
                continue
            if column is None:
                column = np.full(total, np.nan)
                absent = np.ones(total, np.bool_)
            groups_k = np.flatnonzero(active)[mine] if active is not None else np.flatnonzero(mine)
            count_k = n[groups_k]
            dest = np.repeat(offsets[groups_k], count_k) + (
                np.arange(int(count_k.sum())) - np.repeat(np.cumsum(count_k) - count_k, count_k)
            )
            n_slot = n if active is None else n[active]
            src = np.repeat(mine, n_slot)
            column[dest] = values[src]
            absent[dest] = False
            if nil is not None:
                if nils is None:
                    nils = np.zeros(total, np.bool_)
                nils[dest] = nil[src]
        assert column is not None
        none = absent if nils is None else (nils if absent is None else absent | nils)
        if none is not None and not none.any():
            none = None
        readings += total - (0 if none is None else int(np.count_nonzero(none)))
        columns.append((column, none))
    # the sensors and (sensor, boot) keys, in order of first appearance
    sensor_index = dict.fromkeys(sensor_bytes)
    texts = list(map(_text, sensor_index))
    for i, s in enumerate(sensor_index):
        sensor_index[s] = i
    sid = np.fromiter(map(sensor_index.__getitem__, sensor_bytes), np.int64, groups_n)
    # (sensor, boot) keys: boots numbered (nil one more), then the pairs, in order of first appearance
    boot_values, boot_code = np.unique(boots, return_inverse=True)
    boot_code = boot_code.reshape(-1)
    if no_boot is not None:
        boot_code[no_boot] = len(boot_values)
    pair = sid * (len(boot_values) + 1) + boot_code
    gids, key_first = _first_order(pair)
    boot_of = boot_values.tolist() + [None]
    keys = [
        (core.central_sensor(gateway, texts[s]), boot_of[b])
        for s, b in zip(sid[key_first].tolist(), boot_code[key_first].tolist())
    ]
    # each key's metrics: its groups' names in their maps' order, one order per key (else refused)
    if len(order) and (len(order) + 1) ** ids.shape[1] < 1 << 62:
        signature = (ids + 1) @ ((len(order) + 1) ** np.arange(ids.shape[1], dtype=np.int64))
        sig_values, sig_of = np.unique(signature, return_inverse=True)
        sig_rows = ids[np.unique(sig_of, return_index=True)[1]]
    else:
        sig_rows, sig_of = np.unique(ids, axis=0, return_inverse=True)
    sig_of = sig_of.reshape(-1)
    pairs = np.unique(gids * (len(sig_rows) + 1) + sig_of)
    if len(pairs) != len(keys):
        raise _Refused("a key whose groups name their metrics otherwise")
    named_tuples = [tuple(metric_names[i] for i in row if i >= 0) for row in sig_rows.tolist()]
    names_of = [named_tuples[s] for s in sig_of[key_first].tolist()]
    return _finish(
        gateway,
        origin,
        heads,
        per_block,
        tuple(bodies),
        n,
        gids,
        keys,
        names_of,
        dict(zip(metric_names, columns)),
        ids,
        seqs,
        ts,
        received,
        readings,
    )


def _finish(
    gateway: str,
    origin: str,
    heads: list[tuple[int, int, bool]],
    per_block: list[int],
    bodies: tuple[bytes, ...],
    n: np.ndarray,
    gids: np.ndarray,
    keys: list[tuple[str, int | None]],
    names_of: list[tuple[str, ...]],
    columns: dict[str, tuple[np.ndarray, np.ndarray | None]],
    ids: np.ndarray,
    seqs: np.ndarray,
    ts: np.ndarray,
    received: np.ndarray,
    readings: int,
) -> Prepared:
    """The Prepared from_blocks makes (its steps, on arrays of the groups)."""
    ids_dg = np.repeat(gids, n)
    perm = None if len(keys) == len(gids) else np.argsort(ids_dg, kind="stable")
    bounds = [0, *np.cumsum(np.bincount(ids_dg, minlength=len(keys))).tolist()]

    def arranged(a: np.ndarray) -> bytes:
        return (a if perm is None else a[perm]).tobytes()

    floats: dict[str, bytes] = {}
    carried: dict[str, list[bool]] = {}
    group_starts = None
    for j, (name, (values, none)) in enumerate(columns.items()):
        floats[name] = arranged(values)
        if none is not None:
            some = ~none
            carried[name] = np.logical_or.reduceat(some if perm is None else some[perm], bounds[:-1]).tolist()
            if group_starts is None:
                group_starts = np.cumsum(n) - n
            empty = ~np.logical_or.reduceat(some, group_starts)
            if bool((empty & (ids == j).any(axis=1)).any()):  # a group names it with no value
                raise _Refused("a metric of a group carries None only")
    present = _present(names_of, carried)
    spans = []
    at = 0
    counts = n.tolist()
    for (row_id, offset, last), count in zip(heads, per_block):
        spans.append(ranges.block_range(row_id, offset, sum(counts[at : at + count]), last))
        at += count
    return Prepared(
        gateway,
        origin,
        tuple(spans),
        keys,
        bounds,
        present,
        arranged(seqs),
        arranged(ts),
        arranged(received),
        floats,
        bodies,
        int(n.sum()),
        readings,
        False,
    )
