"""Open heads and closed chunks of storage v3: the pure part. No sockets, no SQLite.

A head is one (sensor, boot)'s datagrams since its last chunk, kept in
compact arrays (a float64 per value, NaN where a datagram lacked the metric:
the wire format refuses NaN, so NaN can never be a reading).  Closing a head
gives a `ChunkRow`: the encoded blob (collector/chunkenc.py when present),
its crc32, and per-series statistics (count, min, max, sum, first/last ts and
the newest reading by key), so aggregates over whole chunks and `latest`
decode nothing.  Values are float64 as in every schema so far (an int beyond
+-2**53 is rounded, docs/SCHEMA.md); every float64 comes back bit-exact.
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
import numpy as np

from .chunkenc import Choices, encode_arrays, encode_arrays_many, encode_reusing, encode_row
from .chunkenc import decode_chunk as _decode
from .chunkenc import encode_chunk as _encode
from .chunkenc import encode_many_arrays as _encode_many_arrays

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
    # metric -> (first bucket, last bucket, minute block blob), encoded at close; None: insert_chunk encodes them
    blocks: dict[str, tuple[int, int, bytes]] | None = None


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


def _minute_columns(buckets: list[tuple[int, int, float, float, float]]) -> tuple:
    n = len(buckets)
    nulls = [None] * n
    cols = list(zip(*buckets)) if buckets else [()] * 5
    metrics = {
        "count": [int(c) for c in cols[1]],
        "min": [float(v) for v in cols[2]],
        "max": [float(v) for v in cols[3]],
        "sum": [float(v) for v in cols[4]],
    }
    return [int(b) for b in cols[0]], nulls, nulls, metrics


def encode_minutes(buckets: list[tuple[int, int, float, float, float]], fast: bool = False) -> bytes:
    """[(bucket start, count, min, max, sum)] in bucket order -> a minute block blob."""
    if fast and len(buckets) == 1:  # a head within one minute: the one-row encoder, same bytes
        b, n, lo, hi, total = buckets[0]
        return encode_row(int(b), {"count": int(n), "min": float(lo), "max": float(hi), "sum": float(total)}, fast=True)
    return encode_chunk(*_minute_columns(buckets), fast=fast)


def _minute_tables(rollups: dict[str, dict]) -> tuple[list[str], list[int], list[int], list]:
    """(metrics, first buckets, last buckets, minute tables) of a chunk's rollups: each table a
    float64 array of (bucket start, count, min, max, sum) rows, or a list of those tuples when
    it has one row, the starts are not exact as floats or a value is NaN (encode_minutes then)."""
    names, firsts, lasts, chunks = [], [], [], []
    for metric, r in rollups.items():
        minutes = sorted((bucket, *v) for (width, bucket), v in r.items() if width == 60)
        if not minutes:
            continue
        table = None
        if len(minutes) == 1:  # encode_minutes takes it as it is (chunkenc.encode_row when fast)
            pass
        elif abs(minutes[0][0]) < 2**53 and abs(minutes[-1][0]) < 2**53:  # starts (and counts) exact as floats
            table = np.array(minutes, dtype=np.float64)
            if np.isnan(table).any():  # never from readings; the list encoder keeps a NaN a value
                table = None
        names.append(metric)
        firsts.append(minutes[0][0])
        lasts.append(minutes[-1][0])
        chunks.append(minutes if table is None else table)
    return names, firsts, lasts, chunks


def _minute_arrays(t: np.ndarray) -> tuple:
    """A minute table as the columns of its block (encode_many_arrays' chunk)."""
    return (
        t[:, 0].astype(np.int64),
        None,
        None,
        {"count": t[:, 1].astype(np.int64), "min": t[:, 2].copy(), "max": t[:, 3].copy(), "sum": t[:, 4].copy()},
    )


def minute_blocks(rollups: dict[str, dict], fast: bool = False) -> dict[str, tuple[int, int, bytes]]:
    """metric -> (first bucket, last bucket, minute block) of a chunk's rollups: the blocks
    encode_minutes gives (see minute_blocks_many)."""
    return minute_blocks_many([rollups], fast)[0]


def minute_blocks_many(rollups: list[dict[str, dict]], fast: bool = False) -> list[dict[str, tuple[int, int, bytes]]]:
    """[minute_blocks(r, fast) for r in rollups], the same blocks as encode_minutes gives: the
    tables of one length, across all the chunks, encoded together (chunkenc.encode_many_arrays:
    one numpy pass per length, not per table).  A table of one row (a head within one minute,
    nearly every head at ingest rates: chunkenc.encode_row when fast, no numpy) and a table
    numpy cannot hold exactly go to encode_minutes one by one."""
    tables = [_minute_tables(r) for r in rollups]
    blobs: list[list] = []
    by_rows: dict[int, list[tuple[int, int]]] = {}
    for c, (_, _, _, chunks) in enumerate(tables):
        blobs.append([None] * len(chunks))
        for k, t in enumerate(chunks):
            if type(t) is list:
                blobs[c][k] = encode_minutes(t, fast)
            else:
                by_rows.setdefault(len(t), []).append((c, k))
    for where in by_rows.values():
        encoded = _encode_many_arrays([_minute_arrays(tables[c][3][k]) for c, k in where], fast=fast)
        for (c, k), blob in zip(where, encoded):
            blobs[c][k] = blob
    return [
        {name: (first, last, blob) for name, first, last, blob in zip(names, firsts, lasts, bs)}
        for (names, firsts, lasts, _), bs in zip(tables, blobs)
    ]


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


def _first_equal(a: np.ndarray, extreme) -> float:
    """min(a) or max(a) as Python gives it: the first of equal values, which
    tells 0.0 from -0.0 (the only equal floats that differ; no NaN here)."""
    if extreme == 0.0:
        return float(a[np.flatnonzero(a == 0.0)[0]])
    return float(extreme)


def _received_span(received: np.ndarray, original: array) -> tuple[float, float]:
    """(min, max) of the receive times as Python's min and max give them."""
    if len(received) and not np.isnan(received).any():
        return _first_equal(received, received.min()), _first_equal(received, received.max())
    return min(original), max(original)  # a NaN (never from a clock) compares as Python compares it


def _row_order_sum(v: np.ndarray) -> float:
    """reduce(add, v, 0.0): added in row order (np.add.accumulate, not the
    pairwise np.sum); 0.0 + the sum gives the start value's sign of zero."""
    with np.errstate(all="ignore"):
        return 0.0 + float(np.add.accumulate(v)[-1])


def _newest_row_np(seqs: np.ndarray, ts: np.ndarray) -> int:
    """newest_row of arrays: the greatest ts, then the greatest seq, the first of equals."""
    rows = np.flatnonzero(ts == ts.max())
    if len(rows) == 1:
        return int(rows[0])
    return int(rows[int(np.argmax(seqs[rows]))])


def _minute_starts(ts: np.ndarray) -> np.ndarray | None:
    """The first row of each minute (floor(t / 60)) when ts never decreases, else None."""
    if len(ts) > 1 and not (ts[1:] >= ts[:-1]).all():
        return None
    minute = np.floor(ts / 60.0)
    return np.flatnonzero(np.concatenate(([True], minute[1:] != minute[:-1])))


def _stats_np(boot: int, seqs: np.ndarray, ts: np.ndarray, matrix: np.ndarray, rows: list[int]) -> list[tuple]:
    """(SeriesStats, rollups) of each given row of a metric matrix, rows without NaN and ts
    finite: what series_stats(..., newest=newest_row) and rollup(ts, v, minute_runs(ts)) give,
    with each numpy call made once for all the rows.  min and max keep Python's first of
    equal values where that matters (0.0 against -0.0), sums are added in row order from 0.0
    (np.add.accumulate, not the pairwise np.sum), a minute's sum is decimal_sum of its values."""
    v = matrix[rows] if len(rows) < len(matrix) else matrix
    tmin = _first_equal(ts, ts.min())
    newest = _newest_row_np(seqs, ts)
    newest_ts, newest_seq = float(ts[newest]), int(seqs[newest])
    with np.errstate(all="ignore"):
        sums = np.add.accumulate(v, axis=1)[:, -1].tolist()
    lows, highs, lasts = v.min(axis=1).tolist(), v.max(axis=1).tolist(), v[:, newest].tolist()
    starts = _minute_starts(ts)
    values = [memoryview(row) for row in v]  # floats one at a time, for fsum and min: no list of them
    if starts is not None:
        ends = np.append(starts[1:], len(ts)).tolist()
        buckets = np.floor(ts[starts] / 60.0).tolist()
        min_runs = np.minimum.reduceat(v, starts, axis=1).tolist()
        max_runs = np.maximum.reduceat(v, starts, axis=1).tolist()
        starts_list = starts.tolist()
    out = []
    for k, vals in enumerate(values):
        lo, hi = lows[k], highs[k]
        if lo == 0.0:
            lo = min(vals)  # the first of 0.0 and -0.0, as _first_equal
        if hi == 0.0:
            hi = max(vals)
        s = SeriesStats(len(vals), lo, hi, 0.0 + sums[k], tmin, newest_ts, boot, newest_seq, lasts[k])
        if starts is None:
            out.append((s, rollup(ts.tolist(), vals)))
            continue
        minutes = {}
        for b, i, j, mlo, mhi in zip(buckets, starts_list, ends, min_runs[k], max_runs[k]):
            run = vals[i:j] if j - i < len(vals) else vals
            if mlo == 0.0:
                mlo = min(run)
            if mhi == 0.0:
                mhi = max(run)
            minutes[int(b)] = [j - i, mlo, mhi, decimal_sum(run)]
        out.append((s, _fold_hours(minutes)))
    return out


def _append(col: array, values) -> None:
    if type(values) is list:
        col.fromlist(values)
    elif type(values) is memoryview:  # of the column's type (uplink/prepared.py)
        col.frombytes(values.cast("B"))
    else:
        col.extend(values)


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
        # fromlist converts a list in C (array.extend iterates it generically:
        # 2.4 against 1.0 us for 41 values); anything else is extended.
        _append(self.seqs, seqs)
        _append(self.ts, ts)
        _append(self.received, received)
        for name, values in metrics.items():
            col = self.metrics.get(name)
            if col is None:
                col = self.metrics[name] = array("d", [NAN]) * n0
            try:  # ints become floats as float(v) makes them; a None (absent) refuses, changing nothing
                if type(values) is list:
                    col.fromlist(values)
                elif type(values) is memoryview:  # float64, NaN where absent (uplink/prepared.py)
                    col.frombytes(values.cast("B"))
                else:
                    col.extend(array("d", values))
            except TypeError:
                col.extend([NAN if v is None else float(v) for v in values])
        for col in self.metrics.values():
            if len(col) < n0 + n:
                col.extend(array("d", [NAN]) * (n0 + n - len(col)))

    def close(self, fast: bool = False, hints: CloseHints | None = None) -> ChunkRow:
        """The head as an immutable chunk row (the head itself is left as it is).

        fast: the codec's cheaper choice of transforms (chunkenc.encode_chunk;
        a few per cent larger, decoded the same way), for the chunk and its
        minute blocks (ChunkRow.blocks).  Encoding, statistics
        and rollups run in numpy's C loops over copies of the arrays; a
        column with absent values (NaN) or times that are not finite take
        the reference loops (series_stats, rollup): the same answers.

        hints (fast only): the sensor's previous choices are tried first
        (CloseHints); the blob may then differ from encode_arrays' bytes,
        never in what it decodes to.
        """
        columns, row = self._closing()
        blob = hints.encode(self.sensor, columns) if hints is not None and fast else encode_arrays(*columns, fast=fast)
        return row._replace(crc=zlib.crc32(blob), blob=blob, blocks=minute_blocks(row.rollups, fast))

    def _closing(self) -> tuple[tuple, ChunkRow]:
        """(the columns to encode, as encode_arrays takes them; the chunk row without its blob,
        crc and minute blocks): what close computes for one head alone.

        The metric columns are the rows of one matrix, so the columns without an absent value
        (the common case) get their statistics and minute extremes in one numpy call each for
        all of them (the same answers as series_stats and rollup: _stats_np)."""
        seqs = np.frombuffer(self.seqs, dtype=np.int64).copy()
        ts = np.frombuffer(self.ts, dtype=np.float64).copy()
        received = np.frombuffer(self.received, dtype=np.float64).copy()
        names = list(self.metrics)
        n = len(seqs)
        if names:
            matrix = np.empty((len(names), n), dtype=np.float64)
            for k, col in enumerate(self.metrics.values()):
                matrix[k] = np.frombuffer(col, dtype=np.float64)
            nans = np.isnan(matrix).any(axis=1).tolist()
        else:
            matrix, nans = np.empty((0, n)), []
        columns = {name: matrix[k] for k, name in enumerate(names)}
        plain = [k for k, nan in enumerate(nans) if not nan]
        quick = bool(plain) and n > 0 and bool(np.isfinite(ts).all())
        stats = {}
        rollups = {}
        if quick:
            for k, (s, r) in zip(plain, _stats_np(self.boot, seqs, ts, matrix, plain)):
                stats[names[k]] = s
                rollups[names[k]] = r
        for k, name in enumerate(names):
            if quick and not nans[k]:
                continue
            col = self.metrics[name]
            st = series_stats(self.boot, self.seqs, self.ts, col)
            if st is not None:
                stats[name] = st
                rollups[name] = rollup(self.ts, col)
        if len(stats) > 1 and list(stats) != [name for name in names if name in stats]:  # the head's order
            stats = {name: stats[name] for name in names if name in stats}
            rollups = {name: rollups[name] for name in names if name in rollups}
        row = ChunkRow(self.sensor, self.boot, n, *_received_span(received, self.received), 0, b"", stats, rollups)
        return (seqs, ts, received, columns), row

    def copy(self) -> Head:
        h = Head(self.sensor, self.boot, self.first_log_id, self.opened)
        h.last_log_id = self.last_log_id
        h.seqs = array("q", self.seqs)
        h.ts = array("d", self.ts)
        h.received = array("d", self.received)
        h.metrics = {k: array("d", v) for k, v in self.metrics.items()}
        return h


# Heads encoded together at most (close_heads): enough that numpy's cost per call is spread
# (1.3-1.4x cheaper per head from ~100 heads of a few hundred datagrams on), few enough that
# the copies and candidate matrices held at once stay a few MB.
CLOSE_TOGETHER = 128


class CloseHints:
    """The codec's choices for each sensor's last chunk (chunkenc.encode_reusing), tried first
    on its next one: at ingest rates a sensor's chunks look alike, and checking a choice
    costs a fraction of searching for one (bench/close.py).  Every REFRESH-th chunk of a
    sensor is searched afresh, so a better choice is found when the data changes in a way the
    checks do not catch (narrower values).  At most MAX_SENSORS sensors are remembered
    (peers choose the names), the oldest forgotten first: ~1 KB each.

    A search costs about 1 us a datagram however long the head (the scale search and every
    transform's candidate), a reuse a third of that at 4,096 (bench/close.py): a head longer
    than SEARCH_ROWS (one a flush closes at twice the count, or a fast sensor's,
    store.FAST_HEAD_FACTOR) is searched on its first
    SEARCH_ROWS rows, and those choices are then tried on all of it, checked as any reuse."""

    REFRESH = 16
    MAX_SENSORS = 4096
    SEARCH_ROWS = 1024

    __slots__ = ("_last", "reused", "searched")

    def __init__(self) -> None:
        self._last: dict[str, tuple[Choices | None, int]] = {}
        self.reused = 0  # chunks encoded with a sensor's previous choices
        self.searched = 0  # chunks whose choices were searched (first, refresh, or a check failed)

    def __len__(self) -> int:
        return len(self._last)

    def encode(self, sensor: str, columns: tuple) -> bytes:
        """The blob of a head's columns (Head._closing's), fast=True."""
        last, uses = self._last.pop(sensor, (None, 0))
        if uses >= self.REFRESH:
            last = None
        searching = last is None
        seqs, ts, received, metrics = columns
        n = self.SEARCH_ROWS
        if searching and len(seqs) > n:  # search the first rows, then reuse what they chose
            last = encode_reusing(seqs[:n], ts[:n], received[:n], {k: v[:n] for k, v in metrics.items()}, None)[1]
        blob, chosen, reused = encode_reusing(seqs, ts, received, metrics, last)
        if reused and not searching:
            self.reused += 1
            uses += 1
        else:
            self.searched += 1
            uses = 0
        if len(self._last) >= self.MAX_SENSORS:
            del self._last[next(iter(self._last))]
        self._last[sensor] = (chosen, uses)
        return blob


def close_heads(heads: list[Head], fast: bool = False, hints: CloseHints | None = None) -> list[ChunkRow]:
    """[h.close(fast) for h in heads], the same rows, cheaper for many heads (the central
    consumer closes hundreds a transaction, most of a few hundred datagrams): CLOSE_TOGETHER at
    a time, their chunks of one length and their minute blocks of one length go through the
    encoder's numpy passes together (chunkenc.encode_arrays_many, minute_blocks_many), so its
    cost per call is paid per length instead of per head.  With hints (fast only) each chunk
    is encoded as Head.close(fast, hints) does (the reused choices beat the shared numpy
    passes), its minute blocks still together with the others' (bench/close.py --together)."""
    out: list[ChunkRow] = []
    for at in range(0, len(heads), CLOSE_TOGETHER):
        some = heads[at : at + CLOSE_TOGETHER]
        closing = [h._closing() for h in some]
        if hints is not None and fast:
            blobs = [hints.encode(h.sensor, columns) for h, (columns, _) in zip(some, closing)]
        else:
            blobs = encode_arrays_many([columns for columns, _ in closing], fast=fast)
        blocks = minute_blocks_many([row.rollups for _, row in closing], fast)
        out += [
            row._replace(crc=zlib.crc32(blob), blob=blob, blocks=b) for (_, row), blob, b in zip(closing, blobs, blocks)
        ]
    return out


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
