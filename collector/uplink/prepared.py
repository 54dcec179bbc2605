"""A payload-3 message made ready for the central writer, in a worker process. Pure: no SQL.

The central consumer has one writer (SQLite allows one), and decoding a
message (core.decode: inflate, typed msgpack, every value checked) and merging
its blocks' groups per (sensor, boot) were three quarters of its CPU.  Both
depend on the message alone, so the close workers (closer.py) run them ahead
of the writer: `prepare` returns what `core.decode` returns, except that a
version-3 columns message becomes a `Prepared`:

- its groups merged per (gateway:sensor, boot) in order of first appearance,
  commit order kept within each, metrics no datagram carried dropped (as the
  writer's own merge does), every column as a compact array (seqs int64, times
  and values float64, NaN where a datagram did not carry the metric: what an
  open head holds) instead of lists of Python objects;
- the same groups packed as they go into the central ingest_log body (the
  original values: ints stay ints, absent values None), so the writer joins
  bytes instead of encoding every value again (ingestlog.body_of_packed);
- each block's key range and readings, and the rows the gateway says are
  gone: what the writer's de-duplication (ranges.py) decides with.

The writer takes a Prepared as it is only when every block is new (the usual
case); otherwise (a replay, rows gone, a gateway that sent payload 1 or 2
before) it decodes the message itself and takes it block by block as before
(central.py), so a Prepared never decides what is kept.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from functools import reduce
from itertools import chain
from operator import iadd, itemgetter

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
    packed: bytes  # the message's groups, sensors renamed, packed for an ingest_log body
    count: int  # groups in `packed`
    datagrams: int
    readings: int
    gone: bool  # the message names log rows the gateway lost (the writer takes it block by block)
    payload: bytes = b""  # the message itself: set by the writer (for the block-by-block way)

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


def prepare(data: bytes) -> Prepared | core.Readings | core.Accounts | core.Columns | core.Snapshots:
    """What core.decode gives (PayloadError likewise), a version-3 columns message as a Prepared."""
    item = core.decode(data)
    if isinstance(item, core.Blocks):
        return from_blocks(item)
    return item


def _floats(column: list) -> array:
    """float64 of ints and floats, NaN for None (array's conversion: numpy's takes ~5x as long)."""
    try:
        return array("d", column)
    except TypeError:
        return array("d", np.array(column, dtype=np.float64).tobytes())  # None becomes NaN


def _joined(columns) -> list:
    return reduce(iadd, columns, [])  # list += list in a C loop: no step per value or per group


def from_blocks(item: core.Blocks) -> Prepared:
    """Every column joined over all the message's groups in the order they came (memory read in
    order), put in key order by one stable sort of the datagrams by their key's first appearance
    (numpy, on the values as objects: ints stay ints, None stays None), then cut per key;
    Python steps per key, and none per value."""
    gs: list = list(chain.from_iterable(b.groups for b in item.blocks))
    sensors, boots, seqs_l, ts_l, received_l, maps = zip(*gs)
    local = list(zip(sensors, boots))
    index = dict.fromkeys(local)
    for i, key in enumerate(index):
        index[key] = i
    lens = np.fromiter(map(len, seqs_l), np.int64, len(gs))
    ids = np.repeat(np.fromiter(map(index.__getitem__, local), np.int64, len(gs)), lens)
    perm = None if len(index) == len(gs) else np.argsort(ids, kind="stable")
    bounds = [0, *np.cumsum(np.bincount(ids, minlength=len(index))).tolist()]
    names = dict.fromkeys(chain.from_iterable(maps))
    if sum(map(len, maps)) == len(names) * len(gs):  # every group has every metric
        columns = {name: _joined(map(itemgetter(name), maps)) for name in names}
    else:  # None where a datagram did not carry one
        columns = {}
        for name in names:
            column: list = []
            for m, n in zip(maps, lens.tolist()):
                values = m.get(name)
                column += values if values is not None else [None] * n
            columns[name] = column

    perm_list = None if perm is None else perm.tolist()

    def arranged(values: list, typecode: str) -> tuple[list, bytes]:
        """The values in key order, as they are (for the log body) and as int64/float64 bytes.
        Plain floats (or ints, for seqs) are put in order as numbers (no Python object per
        value read out of place); a column with ints or None among floats as objects."""
        if typecode == "q" or set(map(type, values)) <= {float}:
            numbers = np.frombuffer(array(typecode, values), dtype=np.int64 if typecode == "q" else np.float64)
            if perm is None:
                return values, numbers.tobytes()
            numbers = numbers[perm]
            return numbers.tolist(), numbers.tobytes()
        ordered = values if perm_list is None else list(map(values.__getitem__, perm_list))
        return ordered, _floats(ordered).tobytes()

    (seqs, seqs_b), (ts, ts_b), (received, received_b) = (
        arranged(_joined(seqs_l), "q"),
        arranged(_joined(ts_l), "d"),
        arranged(_joined(received_l), "d"),
    )
    floats: dict[str, bytes] = {}
    for name, column in columns.items():
        columns[name], floats[name] = arranged(column, "d")
    gateway = item.gateway
    keys = []
    present: list[tuple[str, ...]] = []
    shared: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple object each: pickled once
    packing = []
    for (local_sensor, boot), a, b in zip(index, bounds, bounds[1:]):
        sensor = core.central_sensor(gateway, local_sensor)
        keys.append((sensor, boot))
        n = b - a
        metrics = {}
        for name, column in columns.items():
            part = column[a:b]
            if part.count(None) != n:  # metrics no datagram carried are left out, as the writer's merge does
                metrics[name] = part
        names_k = tuple(metrics)
        present.append(shared.setdefault(names_k, names_k))
        packing.append(ingestlog.Group(sensor, boot, seqs[a:b], ts[a:b], received[a:b], metrics))
    return Prepared(
        gateway,
        item.origin,
        tuple(b.range for b in item.blocks),
        keys,
        bounds,
        present,
        seqs_b,
        ts_b,
        received_b,
        floats,
        ingestlog.pack_groups(packing),
        len(packing),
        item.datagrams,
        item.readings,
        bool(item.gone),
    )
