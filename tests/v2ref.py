"""Storage v2, kept as the reference: the row-per-reading writer and its query ops.

Frozen copies of collector/store.py (BatchWriter) and query/ops.py (Ops) as
they were before storage v3, for the differential test (tests/test_store_v3.py
drives both with the same datagrams and queries) and to make v2 databases
that the v3 migration converts.  Not used by the programs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

import sqlite_utils

from collector import schema, tuning
from collector.errors import SetupError
from collector.ingest import merge_gap_changes
from collector.replay import ReplayWindow
from collector.schema import NO_BOOT, REJECT_REASONS
from collector.sequence import WINDOW, GapRecord, SensorTracker
from collector.store import write_gaps
from query import __version__
from query.protocol import (
    DEFAULT_LIMIT,
    PROTOCOL_VERSION,
    Position,
    Request,
    RequestError,
    decode_cursor,
    encode_cursor,
)

log = logging.getLogger("v2ref")


def open_v2(path: str) -> sqlite_utils.Database:
    """A writer connection on a version-2 database (created if need be)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    db.enable_wal()
    db.execute("PRAGMA synchronous=NORMAL")
    if schema.schema_version(db) == 0:
        with db.conn:
            db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
            schema.MIGRATIONS[0](db)
            schema.MIGRATIONS[1](db)
            db["meta"].upsert({"key": "schema_version", "value": "2"}, pk="key")
    return db


# Counters every database has from the first flush on, so readers need no defaults.
COUNTERS = (
    "received",
    "stored",
    "stored_readings",
    "duplicates",
    "kernel_drops",
    "truncated",
    "storage_dropped",
    "refused_sensors",
    "refused_readings",
)

# The hot insert: a prepared executemany of plain tuples, 64 rows per
# statement (INSERT_ROWS_PER_STATEMENT) and the remainder one by one.
# Measured with bench/ingest.py --compare-insert (200,000 rows of 100 series
# in batches of 20,000 into a readings table already holding 2,000,000, 32 MiB
# cache, pinned to one core of a shared 2-core VM): executemany of single rows
# 2.6 us/row, sqlite-utils insert_all(..., ignore=True) 11.2 us/row (it builds
# a dict per row before its own multi-row VALUES), executemany of 64-row
# statements 2.3 us/row (2.0 against 2.8 into a table of 500,000).  We keep
# the last.
INSERT_ROWS_PER_STATEMENT = 64  # v2 wrote readings 64 per multi-row INSERT
INSERT_READINGS = "INSERT OR IGNORE INTO readings (series, ts, boot, seq, value, received) VALUES (?, ?, ?, ?, ?, ?)"
INSERT_READINGS_MULTI = "INSERT OR IGNORE INTO readings (series, ts, boot, seq, value, received) VALUES " + ", ".join(
    ["(?, ?, ?, ?, ?, ?)"] * INSERT_ROWS_PER_STATEMENT
)
INSERT_SERIES = "INSERT INTO series (id, sensor, metric) VALUES (?, ?, ?)"
UPSERT_SENSOR = """
INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings, lost, duplicates, reordered, restarts,
                     tracker, replay)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (sensor) DO UPDATE SET
    last_seen = excluded.last_seen, datagrams = excluded.datagrams, readings = excluded.readings,
    lost = excluded.lost, duplicates = excluded.duplicates, reordered = excluded.reordered,
    restarts = excluded.restarts, tracker = excluded.tracker, replay = excluded.replay
"""
UPSERT_GAP = """
INSERT OR REPLACE INTO gaps (sensor, stream, boot, first_seq, last_seq, missing, detected_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
DELETE_GAP = "DELETE FROM gaps WHERE sensor = ? AND stream = ? AND first_seq = ?"
UPSERT_COUNTER = "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)"


def _insert_readings(conn: sqlite3.Connection, rows: list[tuple]) -> int:
    """Insert the rows (64 per statement, then the rest); returns how many were new."""
    k = INSERT_ROWS_PER_STATEMENT
    full = len(rows) - len(rows) % k
    stored = 0
    if full:
        flat = list(chain.from_iterable(islice(rows, full)))
        n = 6 * k
        stored += conn.executemany(INSERT_READINGS_MULTI, [flat[i : i + n] for i in range(0, len(flat), n)]).rowcount
    if full < len(rows):
        stored += conn.executemany(INSERT_READINGS, rows[full:]).rowcount
    return stored


class SensorState:
    """What the collector keeps per sensor between datagrams."""

    __slots__ = ("sensor", "tracker", "series", "first_seen", "last_seen", "readings", "replay")

    def __init__(
        self,
        sensor: str,
        tracker: SensorTracker,
        series: dict[str, int],
        first_seen: float,
        last_seen: float,
        readings: int = 0,
        replay: ReplayWindow | None = None,
    ) -> None:
        self.sensor = sensor
        self.tracker = tracker
        self.series = series  # metric -> series id, shared with BatchWriter.series
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.readings = readings
        # The anti-replay window of signed datagrams; None until the first one.
        self.replay = replay

    def row(self) -> tuple:
        t = self.tracker
        snapshot = json.dumps(t.snapshot(), separators=(",", ":"))
        window = None if self.replay is None else json.dumps(self.replay.snapshot(), separators=(",", ":"))
        return (
            self.sensor,
            self.first_seen,
            self.last_seen,
            t.datagrams,
            self.readings,
            t.lost,
            t.duplicates,
            t.reordered,
            t.restarts,
            snapshot,
            window,
        )


def _restore_window(sensor: str, text: str, tracker: SensorTracker) -> ReplayWindow:
    """The sensor's replay window from its stored snapshot.

    A damaged snapshot must not reopen the door to replays, so the fallback
    fails closed: everything up to the highest (boot, seq) the tracker has
    accounted is taken as seen, and only newer datagrams are accepted.
    """
    try:
        return ReplayWindow.restore(json.loads(text))
    except (ValueError, TypeError, KeyError) as exc:
        window = ReplayWindow()
        cur = tracker.snapshot()["cur"]  # the tracker's current stream: its boot and highest seq
        if cur is None or type(cur["boot"]) is not int:
            log.warning(
                "sensor %s: replay window in the database is unusable (%s), and its accounts "
                "give no boot to start from: it starts afresh",
                sensor,
                exc,
            )
            return window
        window.boot, window.top, window.bits = cur["boot"], cur["max"] & 0xFFFFFFFF, (1 << WINDOW) - 1
        log.warning(
            "sensor %s: replay window in the database is unusable (%s); taking every signed "
            "datagram up to boot %d seq %d as seen",
            sensor,
            exc,
            window.boot,
            window.top,
        )
        return window


class BatchWriter:
    """The collector's one writer connection, its pending batch and its backlog.

    The receive loop appends row tuples (series, ts, boot, seq, value,
    received) to `rows`, adds touched SensorStates to `dirty`, and calls
    `flush(now)` when the batch is full or the interval is up.
    """

    def __init__(
        self,
        path: str,
        *,
        max_backlog_rows: int = tuning.MAX_BACKLOG_ROWS,
        max_sensors: int = tuning.MAX_SENSORS,
        max_series_per_sensor: int = tuning.MAX_SERIES_PER_SENSOR,
    ) -> None:
        self.path = path
        self._lock_fd = -1
        self.db = open_v2(path)
        self.conn: sqlite3.Connection = self.db.conn
        self.conn.execute(f"PRAGMA busy_timeout={int(tuning.WRITER_BUSY_TIMEOUT_MS)}")
        self.conn.execute(f"PRAGMA cache_size=-{int(tuning.WRITER_CACHE_KIB)}")
        self.max_backlog_rows = max_backlog_rows
        self.max_sensors = max_sensors
        self.max_series_per_sensor = max_series_per_sensor
        self.rows: list[tuple] = []
        self.dirty: set[SensorState] = set()
        self.series: dict[str, dict[str, int]] = defaultdict(dict)  # sensor -> metric -> id
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.sensors: dict[str, SensorState] = {}
        self.pending_datagrams = 0  # datagrams whose rows are in `rows`
        self._sensor_of: dict[int, str] = {}  # series id -> sensor, for trim()
        self._new_series: list[tuple[int, str, str]] = []
        self._pending_gaps: dict[tuple[str, int, int], GapRecord | None] = {}
        self._next_series_id = 1
        # Failure episode (monotonic seconds): when set, the database refused the last flush.
        self.failing_since: float | None = None
        self.retry_at = 0.0
        self._retry_delay = tuning.RETRY_INITIAL_S
        self._episode_dropped = 0

    # --- start-up ----------------------------------------------------------------------

    def load(self) -> None:
        """Rebuild series ids, sensor states (trackers) and counters from the database.

        Raises SetupError when SQLite cannot read them (a damaged file): one
        line for the operator, not a traceback.
        """
        try:
            self._load()
        except sqlite3.Error as exc:
            raise SetupError(
                f"cannot read database {self.path}: {exc} (check it with "
                f"'sqlite3 {self.path} \"PRAGMA integrity_check\"'; restore a backup "
                f"or move the file aside to start a new one)"
            ) from None

    def _load(self) -> None:
        conn = self.conn
        for name, value in conn.execute("SELECT name, value FROM counters"):
            self.counters[name] = value if name == "last_flush" else int(value)
        top = 0
        for series_id, sensor, metric in conn.execute("SELECT id, sensor, metric FROM series"):
            self.series[sensor][metric] = series_id
            self._sensor_of[series_id] = sensor
            top = max(top, series_id)
        self._next_series_id = top + 1
        gaps: dict[str, list[GapRecord]] = defaultdict(list)
        for sensor, stream, boot, first, last, missing, detected in conn.execute(
            "SELECT sensor, stream, boot, first_seq, last_seq, missing, detected_at FROM gaps"
        ):
            boot = None if boot == schema.NO_BOOT else boot
            gaps[sensor].append(GapRecord(stream, boot, first, last, missing, detected))
        for sensor, first_seen, last_seen, readings, tracker, replay in conn.execute(
            "SELECT sensor, first_seen, last_seen, readings, tracker, replay FROM sensors"
        ):
            restored = SensorTracker()
            if tracker:
                try:
                    restored = SensorTracker.restore(json.loads(tracker), gaps.get(sensor, ()))
                except (ValueError, TypeError, KeyError) as exc:
                    # Counting on from zero beats refusing to start; say so once.
                    log.warning(
                        "sensor %s: tracker state in the database is unusable (%s); its sequence accounts start afresh",
                        sensor,
                        exc,
                    )
            window = None if replay is None else _restore_window(sensor, replay, restored)
            self.sensors[sensor] = SensorState(
                sensor, restored, self.series[sensor], first_seen, last_seen, readings, window
            )

    def new_sensor(self, sensor: str, now: float) -> SensorState | None:
        """Start tracking a sensor; None when MAX_SENSORS are tracked already."""
        if len(self.sensors) >= self.max_sensors:
            return None
        state = SensorState(sensor, SensorTracker(), self.series[sensor], now, now)
        self.sensors[sensor] = state
        return state

    def new_series(self, state: SensorState, metric: str) -> int | None:
        """Intern a sensor's metric name; None when it has MAX_SERIES_PER_SENSOR already."""
        if len(state.series) >= self.max_series_per_sensor:
            return None
        series_id = self._next_series_id
        self._next_series_id += 1
        state.series[metric] = series_id
        self._sensor_of[series_id] = state.sensor
        self._new_series.append((series_id, state.sensor, metric))
        return series_id

    # --- the batch -----------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        return len(self.rows)

    def trim(self) -> int:
        """Drop the oldest rows beyond max_backlog_rows; returns how many went."""
        excess = len(self.rows) - self.max_backlog_rows
        if excess <= 0:
            return 0
        # Drop a tenth more than needed, so trimming is not an O(n) shift per burst.
        rows = self.rows
        want = min(len(rows), excess + self.max_backlog_rows // 10)
        # Never split a datagram, and count the datagrams going so `stored`
        # stays exact.  A datagram's rows are consecutive, share sensor, boot,
        # seq and receive time, and each has its own series (metric names are
        # unique within a datagram): a series seen again under the same key
        # starts the next datagram (two copies of one Stray in a burst).
        drop = datagrams = 0
        last, seen = None, set()
        for row in rows:
            key = self._datagram_key(row)
            if key != last or row[0] in seen:
                if drop >= want:
                    break
                datagrams += 1
                last, seen = key, set()
            seen.add(row[0])
            drop += 1
        del rows[:drop]
        self.pending_datagrams -= datagrams
        self.counters["storage_dropped"] += drop
        self._episode_dropped += drop
        return drop

    def _datagram_key(self, row: tuple) -> tuple:
        return (self._sensor_of[row[0]], row[2], row[3], row[5])

    def flush(self, now: float, monotonic: float | None = None) -> bool:
        """Write the pending batch in one transaction; False if the database refused it.

        `now` (Unix time) is recorded as last_flush; `monotonic` (default:
        `now`) schedules the retry, so a wall-clock step cannot stall it.
        """
        mono = now if monotonic is None else monotonic
        for state in self.dirty:
            sensor = state.sensor
            merge_gap_changes(self._pending_gaps, sensor, state.tracker.pop_gap_changes())
        rows = self.rows
        counters = self.counters
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if self._new_series:
                    conn.executemany(INSERT_SERIES, self._new_series)
                stored = _insert_readings(conn, rows)
                if self.dirty:
                    conn.executemany(UPSERT_SENSOR, [state.row() for state in self.dirty])
                if self._pending_gaps:
                    write_gaps(conn, self._pending_gaps, now)
                values = dict(counters)
                values["stored_readings"] += stored
                values["stored"] += self.pending_datagrams
                values["last_flush"] = now
                conn.executemany(UPSERT_COUNTER, list(values.items()))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._failed(mono, exc)
            return False
        counters["stored_readings"] += stored
        counters["stored"] += self.pending_datagrams
        counters["last_flush"] = now
        self.pending_datagrams = 0
        rows.clear()
        self.dirty.clear()
        self._new_series.clear()
        self._pending_gaps.clear()
        if self.failing_since is not None:
            log.warning(
                "database writable again after %.1f s; %d readings were dropped meanwhile (storage_dropped)",
                mono - self.failing_since,
                self._episode_dropped,
            )
            self.failing_since = None
            self._episode_dropped = 0
        self._retry_delay = tuning.RETRY_INITIAL_S
        self.retry_at = 0.0
        return True

    def _failed(self, now: float, exc: sqlite3.Error) -> None:
        if self.failing_since is None:
            # Once per episode: the operator needs the cause, not a line per retry.
            self.failing_since = now
            self._episode_dropped = 0
            log.error(
                "cannot write to %s: %s; keeping up to %d readings in memory and retrying "
                "(check free space with 'df' and that the file is writable)",
                self.path,
                exc,
                self.max_backlog_rows,
            )
        self.retry_at = now + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, tuning.RETRY_MAX_S)

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            pass
        if self._lock_fd >= 0:  # after the connection: see schema.lock_writer
            os.close(self._lock_fd)
            self._lock_fd = -1


@dataclass(frozen=True)
class Limits:
    max_rows: int = 10_000  # rows in any one response (readings pages, lists)
    max_buckets: int = 10_000  # buckets one aggregate may span
    query_seconds: float = 2.0  # budget for one request's SQL (it holds a worker that long)


_PROGRESS_STEPS = 20_000  # VM instructions between budget checks (~1 ms of work)


def _boot(value: int) -> int | None:
    return None if value == NO_BOOT else value


def _where(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """'WHERE a = ? AND b >= ?' and its parameters, for the conditions whose value is given.

    The SQL fragments are constants of this module; only values travel as
    parameters, so nothing a client sends ever becomes SQL text.
    """
    used = [(sql, value) for sql, value in conditions if value is not None]
    if not used:
        return "", []
    return "WHERE " + " AND ".join(sql for sql, _ in used), [value for _, value in used]


def _count(value: Any) -> int:
    return int(value or 0)


def ping() -> dict[str, Any]:
    return {"version": __version__, "protocol": PROTOCOL_VERSION}


class Ops:
    """The ops over one connection; one Ops per thread (a connection is not shared)."""

    def __init__(self, conn: sqlite3.Connection, limits: Limits = Limits()) -> None:
        self.conn = conn
        self.limits = limits
        self._deadline = math.inf
        conn.set_progress_handler(self._over_budget, _PROGRESS_STEPS)

    def close(self) -> None:
        self.conn.close()

    def _over_budget(self) -> int:
        return 1 if time.monotonic() > self._deadline else 0

    def run(self, request: Request) -> Any:
        handler = getattr(self, "op_" + request.op)
        self._deadline = time.monotonic() + self.limits.query_seconds
        try:
            return handler(**request.params)
        except sqlite3.OperationalError as exc:
            if "interrupted" not in str(exc):
                raise
            raise RequestError(
                "bad_request",
                f"query took longer than {self.limits.query_seconds:g} s: narrow 'since'/'until' or name a 'metric'",
            ) from None
        finally:
            self._deadline = math.inf

    def _all(self, sql: str, params: Any = ()) -> list[tuple]:
        # fetchall: a half-read cursor would hold a read snapshot open and stall WAL checkpoints.
        return self.conn.execute(sql, params).fetchall()

    def _capped(self, sql: str, params: list[Any], what: str, narrow: str) -> list[tuple]:
        rows = self._all(sql + " LIMIT ?", [*params, self.limits.max_rows + 1])
        if len(rows) > self.limits.max_rows:
            raise RequestError("bad_request", f"more than {self.limits.max_rows} {what} match: {narrow}")
        return rows

    # -- ops ---------------------------------------------------------------

    def op_ping(self) -> dict[str, Any]:
        return ping()

    def op_sensors(self, sensor: str | None = None) -> list[dict[str, Any]]:
        where, args = _where(("sensor = ?", sensor))
        rows = self._capped(
            "SELECT sensor, first_seen, last_seen, datagrams, readings, lost, duplicates, reordered, restarts"
            f" FROM sensors {where} ORDER BY sensor",
            args,
            "sensors",
            "name a 'sensor'",
        )
        metrics: dict[str, list[str]] = {}
        for name, metric in self._all(f"SELECT sensor, metric FROM series {where} ORDER BY sensor, metric", args):
            metrics.setdefault(name, []).append(metric)
        return [
            {
                "sensor": r[0],
                "first_seen": r[1],
                "last_seen": r[2],
                "datagrams": _count(r[3]),
                "readings": _count(r[4]),
                "lost": _count(r[5]),
                "duplicates": _count(r[6]),
                "reordered": _count(r[7]),
                "restarts": _count(r[8]),
                "metrics": metrics.get(r[0], []),
            }
            for r in rows
        ]

    def op_latest(self, sensor: str | None = None, metric: str | None = None) -> list[dict[str, Any]]:
        where, args = _where(("s.sensor = ?", sensor), ("s.metric = ?", metric))
        # The last key of each series is one B-tree descent (the subquery walks
        # the primary key backwards, LIMIT 1), then one point lookup.  Several
        # readings may share the newest ts: the last in key order (highest
        # boot, then seq) wins, as it would in a `readings desc` page.  Joining
        # on max(ts) alone would return every tied row: a sensor with a stuck
        # clock would make `latest` list its whole history.
        rows = self._capped(
            "SELECT s.sensor, s.metric, r.ts, r.value, r.seq FROM series s"
            " JOIN readings r ON r.series = s.id AND (r.ts, r.boot, r.seq) ="
            " (SELECT ts, boot, seq FROM readings WHERE series = s.id ORDER BY ts DESC, boot DESC, seq DESC LIMIT 1)"
            f" {where} ORDER BY s.sensor, s.metric",
            args,
            "readings",
            "name a 'sensor'",
        )
        return [
            {"sensor": name, "metric": met, "ts": ts, "value": value, "seq": seq} for name, met, ts, value, seq in rows
        ]

    def op_readings(
        self,
        sensor: str,
        metric: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = DEFAULT_LIMIT,
        order: str = "asc",
        cursor: str | None = None,
    ) -> dict[str, Any]:
        if limit > self.limits.max_rows:
            raise RequestError("bad_request", f"parameter 'limit' must be 1-{self.limits.max_rows} on this server")
        binding = {"sensor": sensor, "metric": metric, "order": order, "since": since, "until": until}
        desc = order == "desc"
        # Without a metric, the sensor's series are walked one after another in
        # metric-name order (reversed for desc): each page stays a few
        # primary-key range scans however long the range is.
        if metric is None:
            series = self._all("SELECT id, metric FROM series WHERE sensor = ? ORDER BY metric", [sensor])
        else:
            series = self._all("SELECT id, metric FROM series WHERE sensor = ? AND metric = ?", [sensor, metric])
        if desc:
            series.reverse()
        start = 0
        after: Position | None = None
        if cursor is not None:
            after = decode_cursor(cursor, binding)
            ids = [sid for sid, _ in series]
            if after.series not in ids:
                raise RequestError(
                    "bad_request", "parameter 'cursor' is not a cursor this server issued for this query"
                )
            start = ids.index(after.series)

        direction = "DESC" if desc else "ASC"
        compare = "<" if desc else ">"
        wanted = limit + 1  # one more than asked tells whether a next page exists
        found: list[tuple] = []
        for index in range(start, len(series)):
            sid, met = series[index]
            lower, upper = since, until
            conds, args = ["series = ?"], [sid]
            resume = after is not None and index == start
            if resume and not desc and (lower is None or after.ts >= lower):
                lower = None
                conds.append("ts >= ?")
                args.append(after.ts)
            if resume and desc and (upper is None or after.ts < upper):
                upper = None
                conds.append("ts <= ?")
                args.append(after.ts)
            if lower is not None:
                conds.append("ts >= ?")
                args.append(lower)
            if upper is not None:
                conds.append("ts < ?")
                args.append(upper)
            if resume:
                # Strictly past the cursor's key.  One bound per side on ts
                # (merged above) so SQLite's range scan starts at the cursor,
                # not at 'since' (EXPLAIN: PRIMARY KEY (series=? AND ts>?)).
                conds.append(f"(ts {compare} ? OR boot {compare} ? OR (boot = ? AND seq {compare} ?))")
                args += [after.ts, after.boot, after.boot, after.seq]
            rows = self._all(
                f"SELECT ts, boot, seq, value FROM readings WHERE {' AND '.join(conds)}"
                f" ORDER BY ts {direction}, boot {direction}, seq {direction} LIMIT ?",
                [*args, wanted - len(found)],
            )
            found += [(sid, met, *row) for row in rows]
            if len(found) >= wanted:
                break
        more = len(found) > limit
        found = found[:limit]
        next_cursor = None
        if more:
            sid, _, ts, boot, seq, _ = found[-1]
            next_cursor = encode_cursor(Position(sid, ts, boot, seq), binding)
        return {
            "rows": [
                {"sensor": sensor, "metric": met, "ts": ts, "value": value, "seq": seq, "boot": _boot(boot)}
                for _, met, ts, boot, seq, value in found
            ],
            "next": next_cursor,
        }

    def op_aggregate(
        self,
        sensor: str,
        metric: str,
        bucket: int | float,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        row = self.conn.execute("SELECT id FROM series WHERE sensor = ? AND metric = ?", [sensor, metric]).fetchone()
        if row is None:
            return []
        sid = row[0]
        # Bound the work before scanning: the buckets the range can touch,
        # with open ends closed by the series' first/last ts (two key lookups).
        lo, hi = since, until
        if lo is None:
            lo = self.conn.execute("SELECT min(ts) FROM readings WHERE series = ?", [sid]).fetchone()[0]
        if hi is None:
            hi = self.conn.execute("SELECT max(ts) FROM readings WHERE series = ?", [sid]).fetchone()[0]
        if lo is None or hi is None or lo >= hi and since is not None and until is not None:
            return []
        spans = math.floor(hi / bucket) - math.floor(lo / bucket) + 1
        if spans > self.limits.max_buckets:
            raise RequestError(
                "bad_request",
                f"parameter 'bucket' too small for the range: {spans} buckets, at most {self.limits.max_buckets}"
                " (widen 'bucket' or narrow 'since'/'until')",
            )
        where, args = _where(("series = ?", sid), ("ts >= ?", since), ("ts < ?", until))
        # The bucket index is floor(ts / bucket), written without SQLite's
        # floor(): that exists only where SQLite was built with its math
        # functions, which a gateway's system SQLite may not be.  CAST truncates
        # toward zero, so a negative quotient that is not whole steps down one
        # (otherwise [-bucket, 0) would fold into bucket 0).
        rows = self._all(
            "SELECT CAST(ts / ? AS INTEGER) - (ts < 0 AND CAST(ts / ? AS INTEGER) * ? != ts) AS k,"
            " count(*), min(value), max(value), sum(value)"
            f" FROM readings {where} GROUP BY k ORDER BY k",
            [bucket, bucket, bucket, *args],
        )
        return [
            {"start": k * bucket, "count": n, "min": lo_v, "max": hi_v, "avg": total / n, "sum": total}
            for k, n, lo_v, hi_v, total in rows
        ]

    def op_gaps(
        self, sensor: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        where, args = _where(("sensor = ?", sensor), ("detected_at >= ?", since), ("detected_at < ?", until))
        rows = self._capped(
            f"SELECT sensor, boot, first_seq, last_seq, missing, detected_at FROM gaps {where}"
            " ORDER BY detected_at, sensor, stream, first_seq",
            args,
            "gaps",
            "name a 'sensor' or narrow 'since'/'until'",
        )
        return [
            {"sensor": s, "boot": _boot(b), "first_seq": f, "last_seq": last, "missing": m, "detected_at": d}
            for s, b, f, last, m, d in rows
        ]

    def op_stats(self) -> dict[str, Any]:
        counters = dict(self._all("SELECT name, value FROM counters"))
        lost, duplicates = self.conn.execute("SELECT total(lost), total(duplicates) FROM sensors").fetchone()
        # Every reason the collector counts (wire, signed datagrams, replays),
        # zero or not; an unknown one found in the table is listed too.
        rejected = {reason: 0 for reason in REJECT_REASONS}
        for name, value in counters.items():
            if name.startswith("rejected:"):
                rejected[name[len("rejected:") :]] = _count(value)
        return {
            "received": _count(counters.get("received")),
            "stored": _count(counters.get("stored")),
            "stored_readings": _count(counters.get("stored_readings")),
            "rejected": rejected,
            "duplicates": _count(duplicates),
            "lost": _count(lost),
            "kernel_drops": _count(counters.get("kernel_drops")),
            "truncated": _count(counters.get("truncated")),
            "storage_dropped": _count(counters.get("storage_dropped")),
            "last_flush": counters.get("last_flush"),
        }
