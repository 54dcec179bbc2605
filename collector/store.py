"""The batch writer: queued readings, sensor accounts, gaps and counters into SQLite.

One transaction per flush holds everything that changed since the last one:
new series, the readings, each touched sensor's accounts with its tracker
snapshot and replay window, the gap changes its tracker reported, and the
collector counters.
So what the database says about a sensor's sequence always matches the
readings stored for it, and a restart rebuilds the trackers from exactly that
(`load`).  A flush the database refuses (disk full, locked, unwritable)
changes nothing: the batch stays in memory, bounded by `max_backlog_rows`
(oldest rows dropped first and counted in `storage_dropped`), and is retried
with backoff; the caller's clock decides when.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections import defaultdict
from itertools import chain, islice

from . import schema, tuning
from .errors import SetupError
from .replay import ReplayWindow
from .sequence import WINDOW, GapRecord, SensorTracker

log = logging.getLogger("collector.store")

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
# statement (tuning.INSERT_ROWS_PER_STATEMENT) and the remainder one by one.
# Measured with bench/ingest.py --compare-insert (200,000 rows of 100 series
# in batches of 20,000 into a readings table already holding 2,000,000, 32 MiB
# cache, pinned to one core of a shared 2-core VM): executemany of single rows
# 2.6 us/row, sqlite-utils insert_all(..., ignore=True) 11.2 us/row (it builds
# a dict per row before its own multi-row VALUES), executemany of 64-row
# statements 2.3 us/row (2.0 against 2.8 into a table of 500,000).  We keep
# the last.
INSERT_READINGS = "INSERT OR IGNORE INTO readings (series, ts, boot, seq, value, received) VALUES (?, ?, ?, ?, ?, ?)"
INSERT_READINGS_MULTI = (
    "INSERT OR IGNORE INTO readings (series, ts, boot, seq, value, received) VALUES "
    + ", ".join(["(?, ?, ?, ?, ?, ?)"] * tuning.INSERT_ROWS_PER_STATEMENT)
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
    k = tuning.INSERT_ROWS_PER_STATEMENT
    full = len(rows) - len(rows) % k
    stored = 0
    if full:
        flat = list(chain.from_iterable(islice(rows, full)))
        n = 6 * k
        stored += conn.executemany(INSERT_READINGS_MULTI, [flat[i:i + n] for i in range(0, len(flat), n)]).rowcount
    if full < len(rows):
        stored += conn.executemany(INSERT_READINGS, rows[full:]).rowcount
    return stored


class SensorState:
    """What the collector keeps per sensor between datagrams."""

    __slots__ = ("sensor", "tracker", "series", "first_seen", "last_seen", "readings", "replay", "last_ts")

    def __init__(self, sensor: str, tracker: SensorTracker, series: dict[str, int],
                 first_seen: float, last_seen: float, readings: int = 0,
                 replay: ReplayWindow | None = None) -> None:
        self.sensor = sensor
        self.tracker = tracker
        self.series = series  # metric -> series id, shared with BatchWriter.series
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.readings = readings
        # The anti-replay window of signed datagrams; None until the first one.
        self.replay = replay
        self.last_ts: float | None = None  # ts of the last datagram (sensor clock), for collector/health.py

    def row(self) -> tuple:
        t = self.tracker
        snapshot = json.dumps(t.snapshot(), separators=(",", ":"))
        window = None if self.replay is None else json.dumps(self.replay.snapshot(), separators=(",", ":"))
        return (self.sensor, self.first_seen, self.last_seen, t.datagrams, self.readings,
                t.lost, t.duplicates, t.reordered, t.restarts, snapshot, window)


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
            log.warning("sensor %s: replay window in the database is unusable (%s), and its accounts "
                        "give no boot to start from: it starts afresh", sensor, exc)
            return window
        window.boot, window.top, window.bits = cur["boot"], cur["max"] & 0xFFFFFFFF, (1 << WINDOW) - 1
        log.warning("sensor %s: replay window in the database is unusable (%s); taking every signed "
                    "datagram up to boot %d seq %d as seen", sensor, exc, window.boot, window.top)
        return window


class BatchWriter:
    """The collector's one writer connection, its pending batch and its backlog.

    The receive loop appends row tuples (series, ts, boot, seq, value,
    received) to `rows`, adds touched SensorStates to `dirty`, and calls
    `flush(now)` when the batch is full or the interval is up.
    """

    def __init__(self, path: str, *, max_backlog_rows: int = tuning.MAX_BACKLOG_ROWS,
                 max_sensors: int = tuning.MAX_SENSORS,
                 max_series_per_sensor: int = tuning.MAX_SERIES_PER_SENSOR) -> None:
        self.path = path
        self._lock_fd = schema.lock_writer(path)
        try:
            self.db = schema.open_writer(path)
        except BaseException:
            os.close(self._lock_fd)
            raise
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
        # Called inside each flush's transaction, after the sensors are written,
        # with (connection, the sensors written): more per-sensor columns.
        self.sensor_writers: list = []

    # --- start-up ----------------------------------------------------------------------

    def load(self) -> None:
        """Rebuild series ids, sensor states (trackers) and counters from the database.

        Raises SetupError when SQLite cannot read them (a damaged file): one
        line for the operator, not a traceback.
        """
        try:
            self._load()
        except sqlite3.Error as exc:
            raise SetupError(f"cannot read database {self.path}: {exc} (check it with "
                             f"'sqlite3 {self.path} \"PRAGMA integrity_check\"'; restore a backup "
                             f"or move the file aside to start a new one)") from None

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
                    log.warning("sensor %s: tracker state in the database is unusable (%s); "
                                "its sequence accounts start afresh", sensor, exc)
            window = None if replay is None else _restore_window(sensor, replay, restored)
            self.sensors[sensor] = SensorState(sensor, restored, self.series[sensor], first_seen, last_seen,
                                               readings, window)

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
            for (stream, first_seq), record in state.tracker.pop_gap_changes().items():
                self._pending_gaps[(sensor, stream, first_seq)] = record
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
                    for write in self.sensor_writers:
                        write(conn, self.dirty)
                if self._pending_gaps:
                    upserts, deletes = [], []
                    for (sensor, stream, first_seq), r in self._pending_gaps.items():
                        if r is None:
                            deletes.append((sensor, stream, first_seq))
                        else:
                            boot = schema.NO_BOOT if r.boot is None else r.boot
                            upserts.append((sensor, stream, boot, first_seq, r.last_seq, r.missing, r.detected_at))
                    conn.executemany(DELETE_GAP, deletes)
                    conn.executemany(UPSERT_GAP, upserts)
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
                mono - self.failing_since, self._episode_dropped,
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
                self.path, exc, self.max_backlog_rows,
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
