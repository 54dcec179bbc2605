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

import numpy as np

from .. import ingestlog
from . import core


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
    present: list[tuple[str, ...]] = []
    shared: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple object each: pickled once
    if carried:
        for k, named in enumerate(names_of):
            kept = tuple(name for name in named if name not in carried or carried[name][k])
            present.append(shared.setdefault(kept, kept))
    else:
        present = [shared.setdefault(named, named) for named in names_of]
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
