"""The open heads as a reader sees them: what the query server adds to the chunks.

The collector keeps each (sensor, boot)'s newest datagrams in an open head in
memory; on disk they are the `ingest_log` rows after that (sensor, boot)'s
last chunk (docs/SCHEMA.md).  A reader rebuilds them here, incrementally:
`HeadCache.refresh(conn)` reads the chunks and log rows added since its last
call (ids only grow), so a request costs what changed since the previous one,
not the whole log.

Each head is held the way the collector's own `chunkstore.Head` holds it
(seqs and ts as arrays, one float64 column per metric with NaN where a
datagram lacked it; the wire format refuses NaN, so NaN is never a reading),
without the receive times: a reader holds at most what the collector's heads
hold, which its head budget bounds (collector/store.py HEAD_BUDGET_BYTES,
48 MiB), plus one flush.  Per series it keeps, as rows arrive, the newest
reading by key and the first/last ts, so `latest` and an aggregate's range
read no rows; a page bisects the ts column (heads arrive in key order unless
a sensor's clock goes back, then the key order is computed once per change).
"""

from __future__ import annotations

import math
import sqlite3
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from math import nan

from collector import ingestlog
from collector.schema import NO_BOOT

Row = tuple[float, int, int, float]  # (ts, boot, seq, value)


@dataclass(frozen=True, slots=True)
class Window:
    """The rows a page may hold: lower <= ts < upper, strictly past the key `after`
    (ts, boot, seq) in the page's order, descending if `desc`."""

    lower: float | None = None
    upper: float | None = None
    after: tuple | None = None
    desc: bool = False

    def test(self) -> Callable[[tuple], bool]:
        """Whether a row is in the window, as a function over locals (it runs for every row
        a page reads: attribute loads made it ~25 % slower)."""
        lower, upper, after, desc = self.lower, self.upper, self.after, self.desc

        def holds(r: tuple) -> bool:
            ts = r[0]
            if lower is not None and ts < lower or upper is not None and ts >= upper:
                return False
            if after is not None:
                return r[:3] < after if desc else r[:3] > after
            return True

        return holds


# ingest_log rows read per statement: a row is one flush (up to batch-size
# readings), so a batch of them is what a reader holds undecoded at once.
_LOG_BATCH = 32


class _Stats:
    """One metric's present readings in a head: how many, first/last ts, the newest by key."""

    __slots__ = ("count", "min_ts", "max_ts", "last")

    def __init__(self) -> None:
        self.count = 0
        self.min_ts = self.max_ts = 0.0
        self.last: Row | None = None

    def add(self, t: float, boot: int, seq: int, v: float) -> None:
        """Count one present reading; of equal keys the first to arrive stays the newest
        (as a scan in arrival order keeps it)."""
        if self.count == 0:
            self.min_ts = self.max_ts = t
        elif t < self.min_ts:
            self.min_ts = t
        elif t > self.max_ts:
            self.max_ts = t
        self.count += 1
        last = self.last
        if last is None or (t, boot, seq) > last[:3]:
            self.last = (t, boot, seq, v)


class OpenHead:
    """One (sensor, boot)'s open datagrams, in arrival order."""

    __slots__ = ("boot", "seqs", "ts", "metrics", "marks", "ordered", "_order", "_stats")

    def __init__(self, boot: int) -> None:
        self.boot = boot
        self.seqs = array("q")
        self.ts = array("d")
        self.metrics: dict[str, array] = {}
        self.marks: list[tuple[int, int]] = []  # (log_id, first index) of each log row's datagrams
        self.ordered = True  # (ts, seq) strictly increasing in arrival order: the ts column is sorted
        self._order: list[int] | None = None  # key order when not `ordered`, computed on demand
        self._stats: dict[str, _Stats] | None = {}  # None: recomputed on demand (after a trim)

    def __len__(self) -> int:
        return len(self.seqs)

    def nbytes(self) -> int:
        return len(self.seqs) * (16 + 8 * len(self.metrics)) + 16 * len(self.marks)

    def extend(self, log_id: int, seqs: list[int], ts: list[float], metrics: dict[str, list]) -> None:
        n0, n = len(self.seqs), len(seqs)
        self.marks.append((log_id, n0))
        if self.ordered:
            prev = (self.ts[-1], self.seqs[-1]) if n0 else None
            for key in zip(ts, seqs):
                if prev is not None and key <= prev:
                    self.ordered = False
                    break
                prev = key
        self._order = None
        self.seqs.extend(seqs)
        self.ts.extend(ts)
        stats = self._stats
        boot = self.boot
        for name, values in metrics.items():
            col = self.metrics.get(name)
            if col is None:
                col = self.metrics[name] = array("d", [nan]) * n0
            col.extend([nan if v is None else float(v) for v in values])
            if stats is None:
                continue
            s = stats.get(name)
            if s is None:
                s = stats[name] = _Stats()
            for i in range(n0, n0 + n):
                v = col[i]
                if v == v:  # NaN: no reading of this metric in that datagram
                    s.add(self.ts[i], boot, self.seqs[i], v)
        for col in self.metrics.values():
            if len(col) < n0 + n:
                col.extend(array("d", [nan]) * (n0 + n - len(col)))

    def trim(self, log_id: int) -> None:
        """Forget the datagrams of log rows <= log_id (a chunk now holds them)."""
        k = bisect_left(self.marks, (log_id + 1,))  # marks of log rows <= log_id
        if k == 0:
            return
        if k == len(self.marks):
            cut = len(self.seqs)
        else:
            cut = self.marks[k][1]
        del self.seqs[:cut]
        del self.ts[:cut]
        for col in self.metrics.values():
            del col[:cut]
        self.marks = [(i, start - cut) for i, start in self.marks[k:]]
        self.ordered = all(
            (self.ts[i], self.seqs[i]) < (self.ts[i + 1], self.seqs[i + 1]) for i in range(len(self.seqs) - 1)
        )
        self._order = None
        self._stats = None

    def stats(self, metric: str) -> _Stats | None:
        if self._stats is None:
            self._stats = self._recount()
        return self._stats.get(metric)

    def _recount(self) -> dict[str, _Stats]:
        out = {}
        boot = self.boot
        for name, col in self.metrics.items():
            s = _Stats()
            for i, v in enumerate(col):
                if v == v:
                    s.add(self.ts[i], boot, self.seqs[i], v)
            if s.count:
                out[name] = s
        return out

    def rows(self, metric: str, lower: float | None = None, upper: float | None = None) -> list[Row]:
        """(ts, boot, seq, value) of one metric, lower <= ts < upper, in arrival order."""
        col = self.metrics.get(metric)
        if col is None:
            return []
        ts, seqs, boot = self.ts, self.seqs, self.boot
        lo, hi = 0, len(ts)
        if self.ordered:
            if lower is not None:
                lo = bisect_left(ts, lower)
            if upper is not None:
                hi = bisect_left(ts, upper)
            lower = upper = None
        return [
            (ts[i], boot, seqs[i], col[i])
            for i in range(lo, hi)
            if col[i] == col[i] and (lower is None or ts[i] >= lower) and (upper is None or ts[i] < upper)
        ]

    def page(self, metric: str, window: Window, wanted: int) -> list[Row]:
        """At most `wanted` rows of one metric in the window's key order from its start, and
        any further rows that tie with the last one's key (so that whoever merges pages cuts
        ties as a full sort would)."""
        col = self.metrics.get(metric)
        if col is None or wanted <= 0:
            return []
        ts, seqs, boot = self.ts, self.seqs, self.boot
        lower, upper, after, desc = window.lower, window.upper, window.after, window.desc
        if not self.ordered:
            if self._order is None:
                self._order = sorted(range(len(ts)), key=lambda i: (ts[i], seqs[i]))
            order = self._order
            rows = [(ts[i], boot, seqs[i], col[i]) for i in order if col[i] == col[i]]
            holds = window.test()
            rows = [r for r in rows if holds(r)]
            rows.sort(reverse=desc)
            return _cut(rows, wanted)
        lo = 0 if lower is None else bisect_left(ts, lower)
        hi = len(ts) if upper is None else bisect_left(ts, upper)
        if after is not None:
            if desc:
                hi = min(hi, bisect_right(ts, after[0]))
            else:
                lo = max(lo, bisect_left(ts, after[0]))
        out: list[Row] = []
        step = -1 if desc else 1
        i = hi - 1 if desc else lo
        while lo <= i < hi:
            v = col[i]
            if v == v:
                r = (ts[i], boot, seqs[i], v)
                if after is None or (r[:3] < after if desc else r[:3] > after):
                    if len(out) >= wanted and r[:3] != out[-1][:3]:
                        break
                    out.append(r)
            i += step
        return out


def _cut(rows: list[Row], wanted: int) -> list[Row]:
    """The first `wanted` rows, and those after them that tie with the last one's key."""
    n = min(wanted, len(rows))
    while 0 < n < len(rows) and rows[n][:3] == rows[n - 1][:3]:
        n += 1
    return rows[:n]


class HeadCache:
    """Every open head of the database, read incrementally: new chunks first (their
    log_id says up to which log row a (sensor, boot) is closed), then new log rows."""

    def __init__(self) -> None:
        self.last_chunk = 0
        self.last_log = 0
        self.closed: dict[tuple[str, int], int] = {}
        self.heads: dict[tuple[str, int], OpenHead] = {}
        self.by_sensor: dict[str, dict[int, OpenHead]] = {}

    def nbytes(self) -> int:
        """The bytes of readings held (arrays; the Python objects around them come on top)."""
        return sum(h.nbytes() for h in self.heads.values())

    def refresh(self, conn: sqlite3.Connection, deadline: float = math.inf) -> None:
        """Read what was committed since the last call.  Past `deadline` (time.monotonic)
        it stops between log rows with sqlite3.OperationalError('interrupted'), as SQL
        under the query budget does; what it read stands, and the next call goes on from there
        (a long ingest log, kept for an uplink that is behind, is read over several requests)."""
        if self.last_chunk == 0:
            # First: each (sensor, boot)'s closure from the covering index, not the table of blobs.
            sql = "SELECT max(id), sensor, boot, max(log_id) FROM chunks GROUP BY sensor, boot ORDER BY 1"
            params: tuple = ()
        else:
            sql, params = "SELECT id, sensor, boot, log_id FROM chunks WHERE id > ? ORDER BY id", (self.last_chunk,)
        for chunk_id, sensor, boot, log_id in conn.execute(sql, params).fetchall():
            self.last_chunk = max(self.last_chunk, chunk_id)
            key = (sensor, boot)
            if log_id > self.closed.get(key, 0):
                self.closed[key] = log_id
                head = self.heads.get(key)
                if head is not None:
                    head.trim(log_id)
                    if not len(head):
                        self._drop(key)
        while True:
            rows = conn.execute(
                "SELECT id, body FROM ingest_log WHERE id > ? ORDER BY id LIMIT ?", (self.last_log, _LOG_BATCH)
            ).fetchall()
            if not rows:
                return
            if time.monotonic() > deadline:
                raise sqlite3.OperationalError("interrupted")
            for log_id, body in rows:
                self.last_log = log_id
                for g in ingestlog.decode_body(body):
                    boot = NO_BOOT if g.boot is None else g.boot
                    key = (g.sensor, boot)
                    if self.closed.get(key, 0) >= log_id:
                        continue
                    head = self.heads.get(key)
                    if head is None:
                        head = self.heads[key] = OpenHead(boot)
                        self.by_sensor.setdefault(g.sensor, {})[boot] = head
                    head.extend(log_id, g.seqs, g.ts, g.metrics)

    def _drop(self, key: tuple[str, int]) -> None:
        del self.heads[key]
        boots = self.by_sensor[key[0]]
        del boots[key[1]]
        if not boots:
            del self.by_sensor[key[0]]

    def _of(self, sensor: str) -> list[OpenHead]:
        return list(self.by_sensor.get(sensor, {}).values())

    def latest(self, sensor: str, metric: str) -> Row | None:
        """The series' newest open reading by key (ts, boot, seq), or None."""
        best = None
        for head in self._of(sensor):
            s = head.stats(metric)
            if s is not None and s.last is not None and (best is None or s.last[:3] > best[:3]):
                best = s.last
        return best

    def span(self, sensor: str, metric: str) -> tuple[float, float] | None:
        """(first ts, last ts) of the series' open readings, or None."""
        found = [s for h in self._of(sensor) if (s := h.stats(metric)) is not None and s.count]
        if not found:
            return None
        return min(s.min_ts for s in found), max(s.max_ts for s in found)

    def rows(self, sensor: str, metric: str, lower: float | None = None, upper: float | None = None) -> list[Row]:
        """(ts, boot, seq, value) of one series' open readings, lower <= ts < upper, in no particular order."""
        out: list[Row] = []
        for head in self._of(sensor):
            out += head.rows(metric, lower, upper)
        return out

    def page(self, sensor: str, metric: str, window: Window, wanted: int) -> list[Row]:
        """Candidates for a page of one series: each head's first `wanted` rows of the window
        (OpenHead.page), unsorted across heads; the caller sorts and cuts."""
        out: list[Row] = []
        for head in self._of(sensor):
            out += head.page(metric, window, wanted)
        return out
