"""Heads, statistics and rollups as they were before numpy, kept as the reference.

A frozen copy of collector/chunkstore.py's pure close path (Head.close, the
statistics, rollups and minute blocks), encoding with tests/chunkenc_ref.py,
for the differential tests: the new close must give the same ChunkRow.
Not used by the programs.
"""

from __future__ import annotations

import math
import zlib
from array import array
from bisect import bisect_left
from functools import reduce
from itertools import islice
from operator import add, le
from typing import NamedTuple

import msgpack

from chunkenc_ref import decode_chunk as _decode
from chunkenc_ref import encode_chunk as _encode

NAN = math.nan
PLACEHOLDER_MAGIC = b"\x00P1"


class ChunkError(ValueError):
    """A blob that does not decode, or whose checksum does not match."""


def encode_chunk(seqs, ts, received, metrics, fast: bool = False) -> bytes:
    if _encode is not None:
        return _encode(list(seqs), list(ts), list(received), {k: list(v) for k, v in metrics.items()}, fast=fast)
    payload = [list(seqs), list(ts), list(received), {k: list(v) for k, v in metrics.items()}]
    return PLACEHOLDER_MAGIC + zlib.compress(msgpack.packb(payload, use_bin_type=True), 6)


def decode_chunk(blob: bytes, metrics=None, received: bool = True):
    """(seqs, ts, received, {metric: [value or None]}) of a blob, or ChunkError.

    `metrics` (names) and `received=False` leave the other columns out where
    the codec can skip them (chunkenc.decode_chunk); received is then None.
    """
    try:
        if blob[:3] == PLACEHOLDER_MAGIC or _decode is None:
            if blob[:3] != PLACEHOLDER_MAGIC:
                raise ChunkError("unknown chunk encoding")
            seqs, ts, got, columns = msgpack.unpackb(zlib.decompress(blob[3:]), raw=False)
            if metrics is not None:
                columns = {k: v for k, v in columns.items() if k in metrics}
            return seqs, ts, got if received else None, columns
        return _decode(blob, metrics, received)
    except ChunkError:
        raise
    except Exception as exc:  # any malformed blob is one error
        raise ChunkError(f"chunk does not decode: {exc}") from None


class SeriesStats(NamedTuple):
    count: int
    min: float
    max: float
    sum: float
    min_ts: float
    max_ts: float
    last_boot: int
    last_seq: int
    last_value: float


class ChunkRow(NamedTuple):
    sensor: str
    boot: int  # NO_BOOT (-1) when the sensor sends none
    datagrams: int
    first_received: float
    last_received: float
    crc: int
    blob: bytes
    stats: dict[str, SeriesStats]  # metric -> stats
    rollups: dict[str, dict[tuple[int, int], list]]  # metric -> {(width, bucket start): [count, min, max, sum]}


ROLLUP_WIDTHS = (60, 3600)  # rollup_1m, rollup_1h


SUM_DECIMALS = 9  # decimal places a sum may be snapped to
SUM_ULPS = 4  # how far (in units in the last place) a sum may move to become that decimal


def decimal_sum(values) -> float:
    """The sum of float readings as the decimals the device sent would make it.

    math.fsum is the correctly rounded sum of the doubles; readings like 21.37
    are not exact doubles, so it often lands an ulp or two off the decimal sum
    (1264.3700000000001).  When a decimal with at most SUM_DECIMALS places lies
    within SUM_ULPS ulps of it, that decimal is the sum (a difference of
    ~1e-16 relative); else fsum's.  The minute blocks then store it as a
    small integer (chunkenc's decimal scaling) instead of 8 raw bytes.
    A sum beyond the float range is added in row order (+-inf, as before).
    """
    try:
        total = math.fsum(values)
    except (OverflowError, ValueError):  # an intermediate beyond 1.8e308
        return reduce(add, values, 0.0)
    if total != total or total in (math.inf, -math.inf):
        return total
    near = SUM_ULPS * math.ulp(total)
    for k in range(SUM_DECIMALS + 1):
        snapped = round(total, k)
        if abs(snapped - total) <= near:
            return snapped
    return total


def _nan_free(col) -> bool:
    """No NaN (absent value) in a column: its sum is NaN exactly when it holds one,
    as the wire admits finite numbers only (a sum that overflows is +-inf, not NaN)."""
    total = reduce(add, col, 0.0)
    return total == total


def minute_runs(ts: list[float]) -> list[tuple[int, int, int]] | None:
    """(minute, first row, end row) of each minute when ts never decreases
    (the common case), else None.  Bisection finds each run, then the rows
    next to the cut are checked against floor(t / 60) itself, so a time just
    below a minute whose quotient rounds up lands where `rollup`'s loop puts it."""
    if not all(map(le, ts, islice(ts, 1, None))):
        return None
    floor = math.floor
    runs = []
    n = len(ts)
    i = 0
    while i < n:
        b = floor(ts[i] / 60)
        j = max(bisect_left(ts, (b + 1) * 60.0, i), i + 1)
        while j > i + 1 and floor(ts[j - 1] / 60) != b:
            j -= 1
        while j < n and floor(ts[j] / 60) == b:
            j += 1
        runs.append((b, i, j))
        i = j
    return runs


def rollup(ts, values, runs: list[tuple[int, int, int]] | None = None) -> dict[tuple[int, int], list]:
    """count/min/max/sum of one column per (width, bucket start), NaN = absent.

    One pass into minutes, then minutes folded into hours (a minute bucket
    never straddles an hour).  Given `runs` (minute_runs of ts) and a column
    without NaN, the minute pass runs in C loops over each run's slice: the
    same count/min/max/sum as the loop.  A minute's sum is `decimal_sum` of
    its values (the hour adds its minutes' sums).
    """
    if runs is not None:
        minutes = {}
        for b, i, j in runs:
            run = values[i:j]
            minutes[b] = [j - i, min(run), max(run), decimal_sum(run)]
    else:
        minutes = _minutes(ts, values)
    return _fold_hours(minutes)


def _minutes(ts, values) -> dict[int, list]:
    groups: dict[int, list] = {}
    floor = math.floor
    for t, v in zip(ts, values):
        if v != v:
            continue
        b = floor(t / 60)
        acc = groups.get(b)
        if acc is None:
            groups[b] = [v]
        else:
            acc.append(v)
    return {b: [len(vs), min(vs), max(vs), decimal_sum(vs)] for b, vs in groups.items()}


def _fold_hours(minutes: dict[int, list]) -> dict[tuple[int, int], list]:
    out: dict[tuple[int, int], list] = {}
    for b, (n, lo, hi, total) in minutes.items():
        out[(60, b * 60)] = [n, lo, hi, total]
        key = (3600, (b // 60) * 3600)
        acc = out.get(key)
        if acc is None:
            out[key] = [n, lo, hi, total]
        else:
            acc[0] += n
            if lo < acc[1]:
                acc[1] = lo
            if hi > acc[2]:
                acc[2] = hi
            acc[3] += total
    return out


# A minute block: one series' 1-minute rollups from one chunk, as one blob in
# the chunk format (docs/SCHEMA.md "Minute blocks"): the seqs column holds the
# bucket starts (Unix seconds, ints), ts and received are null, and the
# metrics are count (ints), min, max, sum (floats).  One row of ~60 bytes per
# series and chunk instead of a 40-byte row per series and minute
# (bench/store_disk.py: 0.69 -> ~0.2 bytes per reading).
MINUTE_COLUMNS = ("count", "min", "max", "sum")


def encode_minutes(buckets: list[tuple[int, int, float, float, float]]) -> bytes:
    """[(bucket start, count, min, max, sum)] in bucket order -> a minute block blob."""
    n = len(buckets)
    nulls = [None] * n
    cols = list(zip(*buckets)) if buckets else [()] * 5
    metrics = {
        "count": [int(c) for c in cols[1]],
        "min": [float(v) for v in cols[2]],
        "max": [float(v) for v in cols[3]],
        "sum": [float(v) for v in cols[4]],
    }
    return encode_chunk([int(b) for b in cols[0]], nulls, nulls, metrics)


def decode_minutes(blob: bytes) -> list[tuple[int, int, float, float, float]]:
    """A minute block blob -> [(bucket start, count, min, max, sum)], or ChunkError."""
    starts, _ts, _received, metrics = decode_chunk(blob)
    if tuple(metrics) != MINUTE_COLUMNS:
        raise ChunkError(f"minute block has columns {list(metrics)}, expected {list(MINUTE_COLUMNS)}")
    counts, mins, maxs, sums = (metrics[k] for k in MINUTE_COLUMNS)
    out = []
    for i, start in enumerate(starts):
        n = counts[i]
        if type(start) is not int or type(n) is not int or n < 1 or None in (mins[i], maxs[i], sums[i]):
            raise ChunkError("minute block has a malformed row")
        out.append((start, n, float(mins[i]), float(maxs[i]), float(sums[i])))
    return out


def newest_row(seqs, ts, boot: int) -> int:
    """The row with the greatest (ts, boot, seq), the first of equals: `latest` for a column with no NaN."""
    tmax = max(ts)
    if ts.count(tmax) == 1:
        return ts.index(tmax)
    i, best = -1, None
    for k, t in enumerate(ts):
        if t == tmax and (best is None or seqs[k] > best):
            i, best = k, seqs[k]
    return i


def series_stats(boot: int, seqs, ts, values, *, newest: int | None = None) -> SeriesStats | None:
    """Statistics of one metric column (NaN = absent); None if it has no value.

    Given `newest` (newest_row of the head: the column has no NaN, the
    common case), C loops give the same answer: the same comparisons keep
    the same one of tied values (0.0 against -0.0), and the sum is added in
    row order from 0.0.
    """
    if newest is not None and len(values):
        return SeriesStats(
            len(values),
            min(values),
            max(values),
            reduce(add, values, 0.0),
            min(ts),
            ts[newest],
            boot,
            seqs[newest],
            values[newest],
        )
    count = 0
    lo = hi = total = 0.0
    tmin = tmax = 0.0
    last_key = None
    last_value = 0.0
    for i, v in enumerate(values):
        if v != v:
            continue
        t = ts[i]
        if count == 0:
            lo = hi = v
            tmin = tmax = t
        else:
            if v < lo:
                lo = v
            if v > hi:
                hi = v
            if t < tmin:
                tmin = t
            if t > tmax:
                tmax = t
        total += v
        count += 1
        key = (t, boot, seqs[i])
        if last_key is None or key > last_key:
            last_key, last_value = key, v
    if count == 0:
        return None
    return SeriesStats(count, lo, hi, total, tmin, tmax, boot, last_key[2], last_value)


class Head:
    """One (sensor, boot)'s open datagrams: compact arrays, appended at each flush."""

    __slots__ = ("sensor", "boot", "first_log_id", "last_log_id", "opened", "seqs", "ts", "received", "metrics")

    def __init__(self, sensor: str, boot: int, first_log_id: int, opened: float) -> None:
        self.sensor = sensor
        self.boot = boot
        self.first_log_id = first_log_id  # the oldest ingest_log row holding its datagrams
        self.last_log_id = first_log_id  # the newest (its chunk's log_id when it closes between flushes)
        self.opened = opened  # receive time of its first datagram (the span rule)
        self.seqs = array("q")
        self.ts = array("d")
        self.received = array("d")
        self.metrics: dict[str, array] = {}

    def __len__(self) -> int:
        return len(self.seqs)

    def nbytes(self) -> int:
        return len(self.seqs) * (24 + 8 * len(self.metrics))

    def extend(self, seqs, ts, received, metrics) -> None:
        n0 = len(self.seqs)
        n = len(seqs)
        self.seqs.extend(seqs)
        self.ts.extend(ts)
        self.received.extend(received)
        for name, values in metrics.items():
            col = self.metrics.get(name)
            if col is None:
                col = self.metrics[name] = array("d", [NAN]) * n0
            try:  # ints become floats as float(v) makes them; a None (absent) refuses
                col.extend(array("d", values))
            except TypeError:
                col.extend([NAN if v is None else float(v) for v in values])
        for col in self.metrics.values():
            if len(col) < n0 + n:
                col.extend(array("d", [NAN]) * (n0 + n - len(col)))

    def close(self, fast: bool = False) -> ChunkRow:
        """The head as an immutable chunk row (the head itself is left as it is).

        fast: the codec's cheaper choice of transforms (chunkenc.encode_chunk;
        a few per cent larger, decoded the same way)."""
        # Without NaNs (the common case) conversion, stats and rollups run in
        # C loops over lists (an array boxes a float at every read).
        seqs, ts = self.seqs.tolist(), self.ts.tolist()
        metrics = {}
        plain = set()
        for name, col in self.metrics.items():
            if _nan_free(col):
                metrics[name] = col.tolist()
                plain.add(name)
            else:
                metrics[name] = [None if v != v else v for v in col]
        blob = encode_chunk(seqs, ts, self.received, metrics, fast)
        stats = {}
        rollups = {}
        runs = minute_runs(ts) if plain else None
        newest = newest_row(seqs, ts, self.boot) if plain and seqs else None
        for name, col in self.metrics.items():
            if name in plain:
                values = metrics[name]
                s = series_stats(self.boot, seqs, ts, values, newest=newest)
                r = rollup(ts, values, runs)
            else:
                s = series_stats(self.boot, seqs, ts, col)
                r = rollup(ts, col) if s is not None else None
            if s is not None:
                stats[name] = s
                rollups[name] = r
        return ChunkRow(
            self.sensor,
            self.boot,
            len(self.seqs),
            min(self.received),
            max(self.received),
            zlib.crc32(blob),
            blob,
            stats,
            rollups,
        )

    def copy(self) -> Head:
        h = Head(self.sensor, self.boot, self.first_log_id, self.opened)
        h.last_log_id = self.last_log_id
        h.seqs = array("q", self.seqs)
        h.ts = array("d", self.ts)
        h.received = array("d", self.received)
        h.metrics = {k: array("d", v) for k, v in self.metrics.items()}
        return h


def chunk_rows_from_columns(
    sensor: str, boot: int, seqs, ts, received, metrics: dict[str, list], size: int
) -> list[ChunkRow]:
    """Cut columns (arrival order) into chunk rows of at most `size` datagrams (the migration)."""
    out = []
    for start in range(0, len(seqs), size):
        end = start + size
        head = Head(sensor, boot, 0, received[start])
        head.extend(seqs[start:end], ts[start:end], received[start:end], {k: v[start:end] for k, v in metrics.items()})
        out.append(head.close())
    return out
