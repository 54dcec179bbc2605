"""The storage v3 writer: the ingest log, open heads, chunks, rollups and the accounts.

One transaction per flush holds everything that changed since the last one:
new series, one `ingest_log` row with every datagram the flush stores
(collector/ingestlog.py: appended, so a flush writes a few consecutive pages,
not a page per series), each touched sensor's accounts with its tracker
snapshot and replay window, the gap changes, the counters, and the chunks of
the heads that closed.  Heads (one per sensor and boot, collector/chunkstore.py)
live in memory and are rebuilt on start from the log rows after each head's
last chunk, so a crash loses at most the last unflushed batch, state and data
together.  A log row is deleted once every datagram in it is in a closed
chunk and, when an uplink runs, it has acknowledged it (`<db>-uplink`).

A flush the database refuses (disk full, locked, unwritable) changes nothing:
the batch stays in the ingest core, bounded (oldest datagrams dropped first
and counted in `storage_dropped`), and is retried with backoff.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import dbfile, ingestlog, schema, tuning
from .chunkstore import ChunkRow, CloseHints, Head, close_heads, encode_minutes
from .errors import SetupError
from .ingest import Batch, IngestCore, SensorState
from .replay import ReplayWindow
from .retention import Maintenance
from .sequence import WINDOW, GapRecord, SensorTracker

log = logging.getLogger("collector.store")

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
# A piece of a stored gap row (a late datagram shrank or split it) keeps that
# row's detected_at: the tracker does not hold it (collector/sequence.py,
# GapRecord.origin).  Run before the deletes, which may remove the origin; a
# missing origin (never expected) falls back to the flush time.
UPSERT_GAP_PIECE = """
INSERT OR REPLACE INTO gaps (sensor, stream, boot, first_seq, last_seq, missing, detected_at)
VALUES (?, ?, ?, ?, ?, ?, coalesce((SELECT detected_at FROM gaps WHERE sensor = ? AND stream = ? AND first_seq = ?), ?))
"""
DELETE_GAP = "DELETE FROM gaps WHERE sensor = ? AND stream = ? AND first_seq = ?"
UPSERT_COUNTER = "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)"
INSERT_SERIES = "INSERT INTO series (id, sensor, metric) VALUES (?, ?, ?)"
INSERT_CHUNK = """
INSERT INTO chunks (sensor, boot, log_id, datagrams, first_received, last_received, crc, blob)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)"""
INSERT_CHUNK_SERIES = """
INSERT INTO chunk_series (series, min_ts, chunk, max_ts, count, min, max, sum, last_boot, last_seq, last_value)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
# Upsert-add: late data older than a closed chunk merges into its buckets.
UPSERT_ROLLUP = """
INSERT INTO {table} (series, bucket, count, min, max, sum) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (series, bucket) DO UPDATE SET
    count = count + excluded.count, min = min(min, excluded.min), max = max(max, excluded.max),
    sum = sum + excluded.sum"""
# The 1-minute rollups of a closed chunk: one minute block per series (schema version 5).
INSERT_MINUTES = """
INSERT INTO rollup_1m_blocks (series, first_bucket, chunk, last_bucket, blob) VALUES (?, ?, ?, ?, ?)"""

# Heads close into chunks at this many datagrams (the prototype's 1,024: zlib
# and delta coding have enough to work on; bench/disk.py), after this span of
# receive time (so a slow or silent sensor's data does not stay in the log),
# and largest first when all heads together pass the memory budget.
CHUNK_DATAGRAMS = 1024
CHUNK_SPAN_S = 3600.0
HEAD_BUDGET_BYTES = 48 * 1024 * 1024
# Open heads at most, for a writer that sets max_heads (the central consumer: its peers, the
# gateways, choose how many sensors there are).  A head costs ~1 KB of objects beyond the data
# the byte budget counts (tracemalloc: 1,033 B for a head of 2 datagrams of 2 metrics), which
# HEAD_BUDGET_BYTES never sees: many sensors of a few datagrams each are held by this bound.
MAX_OPEN_HEADS = 10_000
# A flush closes due heads up to the datagrams it brings plus this many
# chunks' worth (the rest wait for the next flush: see _close_heads); a head
# this many times over its count closes at once, whatever the budget.
CLOSE_FLOOR_CHUNKS = 4
# Above this many datagrams per second (those of a flush over the time since
# the one before), heads close with the codec's fast transform choice: about
# a third of the CPU, chunks ~5 % larger (bench/ingest.py, bench/disk.py).  A
# gateway of a few thousand sensors at 1 Hz stays under it and gets the
# smallest chunks; a flood gets a collector that keeps up.
FAST_CLOSE_RATE = 10_000
CLOSE_OVERDUE_FACTOR = 8
# A head whose sensor sends faster than FAST_HEAD_RATE datagrams a second (its datagrams over
# their span of receive time) is due at FAST_HEAD_FACTOR times the count, when the writer asks
# for it (Store's fast_head_factor; the collector's Settings.fast_head_factor, 1 by default):
# much of a close's CPU is paid per close, not per datagram (numpy's calls, the statistics,
# its own transaction; bench/close.py --rows), so at ingest rates bigger chunks divide it,
# but their closes are longer stalls: at 135,000 datagrams/s a collector with 4 lost more
# (docs/OPERATIONS.md, session 10).  A sensor at 1 Hz never reaches the rate.
FAST_HEAD_RATE = 500.0
FAST_HEAD_FACTOR = 4  # the factor measured in session 10
MAINTENANCE_COUNTERS = ("retention_dropped", "budget_dropped", "uplink_dropped", "corrupt_chunks")
# Ingest log rows deleted per flush at most: a big delete never delays a flush.
LOG_DELETE_STEP = 2000


def insert_chunk(conn: sqlite3.Connection, row: ChunkRow, log_id: int, series: dict[str, int]) -> int:
    """Insert one chunk, its per-series statistics and its rollup contributions; returns its id."""
    cur = conn.execute(
        INSERT_CHUNK,
        (row.sensor, row.boot, log_id, row.datagrams, row.first_received, row.last_received, row.crc, row.blob),
    )
    chunk_id = int(cur.lastrowid)
    stats = []
    hours: list[tuple] = []
    blocks: list[tuple] = []
    for metric, s in row.stats.items():
        sid = series[metric]
        stats.append(
            (sid, s.min_ts, chunk_id, s.max_ts, s.count, s.min, s.max, s.sum, s.last_boot, s.last_seq, s.last_value)
        )
        minutes = []
        for (width, bucket), (n, lo, hi, total) in row.rollups[metric].items():
            if width == 60:
                minutes.append((bucket, n, lo, hi, total))
            else:
                hours.append((sid, bucket, n, lo, hi, total))
        if row.blocks is not None:  # encoded at close (Head.close)
            if metric in row.blocks:
                first, last, blob = row.blocks[metric]
                blocks.append((sid, first, chunk_id, last, blob))
        elif minutes:
            minutes.sort()
            blocks.append((sid, minutes[0][0], chunk_id, minutes[-1][0], encode_minutes(minutes)))
    conn.executemany(INSERT_CHUNK_SERIES, stats)
    conn.executemany(INSERT_MINUTES, blocks)
    conn.executemany(UPSERT_ROLLUP.format(table="rollup_1h"), hours)
    return chunk_id


def write_gaps(conn: sqlite3.Connection, gaps: dict[tuple[str, int, int], GapRecord | None], now: float) -> None:
    """Apply gap changes keyed (sensor, stream, first_seq): pieces of stored
    rows first (they read their origin's detected_at), then deletes, then the
    rest (collector/sequence.py, pop_gap_changes)."""
    upserts, pieces, deletes = [], [], []
    for (sensor, stream, first_seq), r in gaps.items():
        if r is None:
            deletes.append((sensor, stream, first_seq))
            continue
        boot = schema.NO_BOOT if r.boot is None else r.boot
        if r.detected_at is None:
            pieces.append((sensor, stream, boot, first_seq, r.last_seq, r.missing, sensor, stream, r.origin, now))
        else:
            upserts.append((sensor, stream, boot, first_seq, r.last_seq, r.missing, r.detected_at))
    conn.executemany(UPSERT_GAP_PIECE, pieces)
    conn.executemany(DELETE_GAP, deletes)
    conn.executemany(UPSERT_GAP, upserts)


def _write_hint(path: str) -> str:
    """What to check when a flush is refused.  SQLite reports a filesystem
    that went read-only under it (ext4 errors=remount-ro after an I/O error,
    a failing SD card) as a plain "disk I/O error", so a file is tried beside
    the database (made and removed at once; once per episode) to name it."""
    try:
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))):
            pass
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return (
                "its filesystem is read-only now: remounted after an error? see 'dmesg'; the readings "
                "held here are lost if the collector stops before it is writable again"
            )
        return f"a new file beside it fails too: {exc.strerror}; check free space with 'df' and permissions"
    return "check free space with 'df' and that the file is writable"


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


@dataclass
class FlushJob:
    """One flush: the batch taken from the core, its time, and what became of it."""

    batch: Batch
    now: float
    counters: dict[str, float] | None  # the maintenance counters, when a maintenance step follows
    error: sqlite3.Error | None = None


@dataclass
class Loaded:
    counters: dict[str, float]
    sensors: dict[str, SensorState]
    next_series_id: int


class Store:
    """The collector's one writer connection: flushes batches, keeps the heads."""

    def __init__(
        self,
        path: str,
        *,
        chunk_datagrams: int = CHUNK_DATAGRAMS,
        chunk_span: float = CHUNK_SPAN_S,
        head_budget: int = HEAD_BUDGET_BYTES,
        max_heads: int | None = None,
        max_backlog_rows: int = tuning.MAX_BACKLOG_ROWS,
        close_between_flushes: bool = False,
        fast_head_factor: int = 1,
        **retention: float | int | None,
    ) -> None:
        self.path = path
        self.maintenance = Maintenance(path, **retention)
        self._open()
        self.chunk_datagrams = chunk_datagrams
        self.chunk_span = chunk_span
        self.head_budget = head_budget
        # Past head_budget the largest heads close until this share of it stays open.
        self.budget_floor = 0.75
        # Open heads at most after each transaction (None: no limit): past it, the least recently
        # written close until 3/4 of it stay open (_close_heads).
        self.max_heads = max_heads
        self.closed_busy = 0  # heads max_heads closed in the flush that wrote them (more are written at once)
        # The collector's loop closes heads at their count while its sockets
        # are empty (close_one); then a flush leaves them until twice the count.
        self.close_between_flushes = close_between_flushes
        # A fast sensor's head is due at this many times chunk_datagrams (FAST_HEAD_RATE; 1: never).
        self.fast_head_factor = fast_head_factor
        self.max_backlog_rows = max_backlog_rows
        self.uplink_path = path + "-uplink"
        self.series: dict[str, dict[str, int]] = defaultdict(dict)  # sensor -> metric -> id
        self.heads: dict[tuple[str, int], Head] = {}
        self.last_log_id = 0
        self.chunks_closed = 0
        self._flushed_at: float | None = None  # `now` of the last flush that wrote datagrams
        self._fast = False  # the last flush's rate was over FAST_CLOSE_RATE
        self.full: dict[tuple[str, int], None] = {}  # heads at their count, oldest first (close_one)
        # The collector's heads close one sensor's chunk after another with the fast choice:
        # each sensor's last choices are tried first (chunkstore.CloseHints, bench/close.py).
        # The central consumer closes many short heads together instead (close_heads).
        self.close_hints = CloseHints() if close_between_flushes else None
        self.closed_between_flushes = 0
        # Failure episode (monotonic seconds): when set, the database refused the last flush.
        self.failing_since: float | None = None
        self.retry_at = 0.0
        self._retry_delay = tuning.RETRY_INITIAL_S
        self._episode_dropped = 0
        # Called inside each flush's transaction, after the sensors are written,
        # with (connection, the sensors written): more per-sensor columns.
        self.sensor_writers: list = []
        self._dropped_at_failure = 0
        # A writer that encodes closing heads elsewhere (the central consumer: worker
        # processes) sets close_later(heads, fast) -> an object whose ready() says whether
        # rows() (their ChunkRows, in order) would return at once.  write_groups hands it the
        # heads a transaction closes and inserts their chunks in a later one, in the order
        # handed, once ready (waiting when more than closed_later_max are out: each holds its
        # heads, so this bounds the memory a slow worker makes the writer hold): until then
        # their datagrams stay in the log rows they came in (_log_held), so a crash loses nothing.
        self.close_later: Callable[[list[Head], bool], Any] | None = None
        # The central writer sets chunk_refused(conn, head, exc): called, inside the transaction,
        # for a head whose chunk cannot be inserted (nor one closed again here) while the rest of
        # the transaction goes on; it sets the head's datagrams aside or raises (the database is
        # at fault: the transaction fails as a whole).  None (the collector): the failure raises.
        self.chunk_refused: Callable[[sqlite3.Connection, Head, Exception], None] | None = None
        self.closed_later_max = 1
        self.closed_later: list[tuple[list[Head], int, Any]] = []
        self._handed: tuple[list[Head], int, Any] | None = None
        self._inserted_later = 0

    def _open(self) -> None:
        self._lock_fd = schema.lock_writer(self.path)
        try:
            self.db = schema.open_writer(self.path)
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise
        self.conn: sqlite3.Connection = self.db.conn
        self.conn.execute(f"PRAGMA busy_timeout={int(tuning.WRITER_BUSY_TIMEOUT_MS)}")
        self.conn.execute(f"PRAGMA cache_size=-{int(tuning.WRITER_CACHE_KIB)}")
        # A WAL file shrinks back after a checkpoint (the disk budget counts it).
        self.conn.execute("PRAGMA journal_size_limit=4194304")
        self.maintenance.configure(self.conn)  # a smaller WAL under a small --max-disk

    @property
    def lock_fd(self) -> int:
        """The descriptor holding the one-writer lock: the inode we write (collector/dbfile.py)."""
        return self._lock_fd

    def restore_at_path(self) -> None:
        """The file at our path is gone: copy the database we hold there and write on there.

        Raises OSError or sqlite3.Error with nothing changed when the copy cannot
        be made (the caller retries).  Once the copy is made, the old connection
        is closed (it checkpoints and removes the `-wal`/`-shm` named after the
        path), the copy renamed into place and opened; a failure past that point
        is dbfile.Stranded, naming the complete copy.
        """
        tmp = dbfile.copy_beside(self.conn, self.path)
        self.close()
        try:
            os.replace(tmp, self.path)
            self._open()
        except BaseException as exc:
            raise dbfile.Stranded(tmp, exc) from None

    # --- start-up ----------------------------------------------------------------------

    def load(self) -> Loaded:
        """Rebuild series ids, sensor states (trackers), counters and the open heads.

        Raises SetupError when SQLite cannot read them (a damaged file): one
        line for the operator, not a traceback.
        """
        try:
            return self._load()
        except (sqlite3.Error, ingestlog.LogFormatError) as exc:
            raise SetupError(f"cannot read database {self.path}: {exc} ({schema.damaged_advice(self.path)})") from None

    def _load(self) -> Loaded:
        conn = self.conn
        counters: dict[str, float] = {}
        for name, value in conn.execute("SELECT name, value FROM counters"):
            try:
                counters[name] = float(value) if name == "last_flush" else int(value)
            except (TypeError, ValueError, OverflowError):
                # A damaged row must not stop the collector (a traceback, issue 13
                # item 7): the counter counts on from 0, and the log says so once.
                counters[name] = 0
                log.error(
                    "counter %r in %s holds %r, not a number: it counts on from 0 (the row is "
                    "rewritten at the next flush; %s)",
                    name,
                    self.path,
                    value,
                    schema.damaged_advice(self.path),
                )
        top = 0
        for series_id, sensor, metric in conn.execute("SELECT id, sensor, metric FROM series"):
            self.series[sensor][metric] = series_id
            top = max(top, series_id)

        def gaps(sensor: str) -> Iterator[GapRecord]:
            # Streamed: the gaps table keeps every gap ever (final ones too),
            # and the tracker keeps only the rows reaching into its window.
            for stream, boot, first, last, missing, detected in conn.execute(
                "SELECT stream, boot, first_seq, last_seq, missing, detected_at FROM gaps WHERE sensor = ?", (sensor,)
            ):
                yield GapRecord(stream, None if boot == schema.NO_BOOT else boot, first, last, missing, detected)

        sensors: dict[str, SensorState] = {}
        for sensor, first_seen, last_seen, readings, tracker, replay in conn.execute(
            "SELECT sensor, first_seen, last_seen, readings, tracker, replay FROM sensors"
        ):
            restored = SensorTracker()
            if tracker:
                try:
                    restored = SensorTracker.restore(json.loads(tracker), gaps(sensor))
                except (ValueError, TypeError, KeyError) as exc:
                    # Counting on from zero beats refusing to start; say so once.
                    log.warning(
                        "sensor %s: tracker state in the database is unusable (%s); its sequence accounts start afresh",
                        sensor,
                        exc,
                    )
            window = None if replay is None else _restore_window(sensor, replay, restored)
            sensors[sensor] = SensorState(
                sensor, restored, self.series[sensor], first_seen, last_seen, readings, window
            )
        self.last_log_id = ingestlog.last_id(conn)
        # The open heads: each (sensor, boot)'s datagrams in log rows after its last chunk.
        closed = {
            (s, b): i for s, b, i in conn.execute("SELECT sensor, boot, max(log_id) FROM chunks GROUP BY sensor, boot")
        }
        after = 0
        while True:
            entries = list(ingestlog.read_after(conn, after, 200))
            if not entries:
                break
            for entry in entries:
                for g in entry.groups:
                    boot = schema.NO_BOOT if g.boot is None else g.boot
                    if closed.get((g.sensor, boot), 0) >= entry.id:
                        continue
                    self._extend_head(g, boot, entry.id)
            after = entries[-1].id
        return Loaded(counters, sensors, top + 1)

    def _extend_head(self, g: ingestlog.Group, boot: int, log_id: int) -> None:
        key = (g.sensor, boot)
        head = self.heads.get(key)
        if head is None:
            head = self.heads[key] = Head(g.sensor, boot, log_id, g.received[0])
        head.extend(g.seqs, g.ts, g.received, g.metrics)
        head.last_log_id = log_id
        n = len(head)
        if n >= self.chunk_datagrams and n >= self._count(n, head.opened, head.received[-1]):
            self.full[key] = None

    def _count(self, size: int, opened: float, last: float) -> int:
        """The datagrams at which a head of `size` datagrams received from `opened` to `last` is
        due: chunk_datagrams, or fast_head_factor times it when they came faster than
        FAST_HEAD_RATE (a sensor that slows down is due at the count again)."""
        if self.fast_head_factor > 1 and size > FAST_HEAD_RATE * (last - opened):
            return self.chunk_datagrams * self.fast_head_factor
        return self.chunk_datagrams

    # --- closing heads between flushes ---------------------------------------------------

    def close_one(self) -> bool:
        """Close the oldest head that has reached its count, in a transaction of its own.

        The loop calls this while its sockets are empty, so the CPU of
        closing (encoding, statistics, rollups: a few ms a chunk) is spent
        when nothing waits, not inside a flush while datagrams queue.  Its
        chunk's log_id is the head's newest log row: every datagram of the
        (sensor, boot) up to that row is in chunks, as a restart and the
        readers take it.  False when there is nothing to close, or the
        database refused (the flush closes it then, and says why if it fails too).
        """
        while self.full:
            key = next(iter(self.full))
            del self.full[key]
            head = self.heads.get(key)
            if head is not None and len(head) >= self._count(len(head), head.opened, head.received[-1]):
                break
        else:
            return False
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                insert_chunk(conn, head.close(self._fast, self.close_hints), head.last_log_id, self.series[key[0]])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            log.debug("closing a head between flushes failed (%s); the next flush closes it", exc)
            return False
        del self.heads[key]
        self.chunks_closed += 1
        self.closed_between_flushes += 1
        return True

    # --- the flush -----------------------------------------------------------------------

    def due(self, now: float) -> bool:
        """Whether a head has reached its span (a flush with nothing new would close it)."""
        span = self.chunk_span
        return any(now - h.opened >= span for h in self.heads.values())

    def flush(self, core: IngestCore, now: float, monotonic: float | None = None) -> bool:
        """Write the core's pending batch in one transaction; False if the database refused it.

        `now` (Unix time) is recorded as last_flush; `monotonic` (default:
        `now`) schedules the retry, so a wall-clock step cannot stall it.
        The collector's loop runs the same three steps with `write` in its
        writer thread (collector/server.py), reading on meanwhile.
        """
        job = self.begin(core, now)
        self.write(job)
        return self.end(core, job, now if monotonic is None else monotonic)

    def begin(self, core: IngestCore, now: float, maintain: bool = False) -> FlushJob:
        """Take the core's batch for a flush (in the thread that feeds the core)."""
        counters = {k: core.counters.get(k, 0) for k in MAINTENANCE_COUNTERS} if maintain else None
        return FlushJob(core.take(), now, counters)

    def write(self, job: FlushJob) -> None:
        """The flush's transaction and, once it commits, the heads that follow it (and,
        if asked, one maintenance step).  Any one thread, while no other uses this store;
        a refusal is kept in `job.error`."""
        batch = job.batch
        groups = batch.groups
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                closing = self._write(conn, batch, groups, job.now)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLITE_FULL has rolled it back already
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            job.error = exc
            return
        self.committed_groups(groups, *closing)
        if job.counters is not None:
            self.maintain(job.counters, job.now)

    def end(self, core: IngestCore, job: FlushJob, monotonic: float) -> bool:
        """Account a written (or refused) flush in the core (in the thread that feeds it)."""
        if job.error is not None:
            core.refused(job.batch)
            self._failed(monotonic, job.error, core)
            return False
        core.committed(job.batch, job.now)
        if job.counters is not None:  # what the maintenance step counted (only it changes these)
            core.counters.update(job.counters)
        if self.failing_since is not None:
            log.warning(
                "database writable again after %.1f s; %d readings were dropped meanwhile (storage_dropped)",
                monotonic - self.failing_since,
                core.counters["storage_dropped"] - self._dropped_at_failure,
            )
            self.failing_since = None
        self._retry_delay = tuning.RETRY_INITIAL_S
        self.retry_at = 0.0
        return True

    def write_groups(
        self,
        conn: sqlite3.Connection,
        groups: list[ingestlog.Group],
        now: float,
        new_series: list[tuple[int, str, str]],
        known: tuple[int, int] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, set[tuple[str, int]]]:
        """For a writer other than the ingest core (the uplink's central database):
        inside the caller's transaction, the new series, one log row for `groups`
        (a (sensor, boot) may have several, in order; their columns lists or arrays;
        `known`: their (datagrams, readings) if counted; `body`: theirs if encoded)
        and the chunks of the heads that close.
        Call committed_groups with what it returns once the transaction commits."""
        if new_series:
            conn.executemany(INSERT_SERIES, new_series)
        self._handed = None
        self._inserted_later = 0
        for heads, chunk_log_id, pending in self.closed_later:  # closes of the transactions before
            if len(self.closed_later) - self._inserted_later <= self.closed_later_max and not pending.ready():
                break
            self._insert_chunks(conn, heads, pending.rows, chunk_log_id)
            self._inserted_later += 1
        log_id = ingestlog.append(conn, now, groups, known, body) if groups else 0
        closed = self._close_heads(conn, groups, log_id or self.last_log_id, now)
        self._trim_log(conn)
        return log_id, closed

    def committed_groups(self, groups: list[ingestlog.Group], log_id: int, closed: set[tuple[str, int]]) -> None:
        """Committed: the in-memory heads follow what the database now says."""
        if self.close_later is not None:
            del self.closed_later[: self._inserted_later]
            if self._handed is not None:
                self.closed_later.append(self._handed)
            self._handed, self._inserted_later = None, 0
        for key in closed:
            self.heads.pop(key, None)
            self.full.pop(key, None)
        for g in groups:
            boot = schema.NO_BOOT if g.boot is None else g.boot
            if (g.sensor, boot) not in closed:
                self._extend_head(g, boot, log_id)
        if log_id:
            self.last_log_id = log_id
        self.chunks_closed += len(closed)

    def _write(self, conn: sqlite3.Connection, batch: Batch, groups: list[ingestlog.Group], now: float):
        if batch.new_series:
            conn.executemany(INSERT_SERIES, batch.new_series)
            for sid, sensor, metric in batch.new_series:
                self.series[sensor][metric] = sid
        log_id = ingestlog.append(conn, now, groups, (batch.count, batch.readings)) if groups else 0
        if batch.dirty:
            conn.executemany(UPSERT_SENSOR, batch.sensor_rows)
            for write in self.sensor_writers:  # more per-sensor columns (collector/healthstore.py)
                write(conn, batch.dirty)
        if batch.gaps:
            write_gaps(conn, batch.gaps, now)
        closed = self._close_heads(conn, groups, log_id or self.last_log_id, now)
        self._trim_log(conn)
        values = dict(batch.counters)
        values["stored_readings"] += batch.readings
        values["stored"] += batch.count
        values["last_flush"] = now
        conn.executemany(UPSERT_COUNTER, list(values.items()))
        return log_id, closed

    def _close_heads(
        self, conn: sqlite3.Connection, groups: list[ingestlog.Group], log_id: int, now: float
    ) -> set[tuple[str, int]]:
        """Write the chunks of the heads that close in this flush; returns their keys.

        A head is due when it reaches its count (chunk_datagrams, or fast_head_factor
        times it for a fast sensor: _count; twice that with
        close_between_flushes: close_one is meant to close it before) or its
        span of receive time reaches chunk_span; due heads close oldest first within the
        flush's close budget.  Largest first, heads close when all together
        pass the memory budget, and at once when CLOSE_OVERDUE_FACTOR times
        over their count.  With max_heads, when more would stay open, the least
        recently written (oldest last_log_id first, those this flush writes
        last) close until 3/4 of max_heads stay open.
        """
        incoming: dict[tuple[str, int], ingestlog.Group] = {}
        more: dict[tuple[str, int], list[ingestlog.Group]] = {}  # keys with several groups (write_groups)
        arriving = 0
        for g in groups:
            key = (g.sensor, schema.NO_BOOT if g.boot is None else g.boot)
            if key in incoming:
                more.setdefault(key, [incoming[key]]).append(g)
            else:
                incoming[key] = g
            arriving += len(g.seqs)
        heads = self.heads
        fast = False
        if arriving:
            last, self._flushed_at = self._flushed_at, now
            fast = self._fast = last is not None and arriving > FAST_CLOSE_RATE * max(now - last, 0.0)
        close: list[tuple[str, int]] = []
        due: list[tuple[float, tuple[str, int], int]] = []  # (opened, key, datagrams)
        between = 2 if self.close_between_flushes else 1
        for key, g in incoming.items():
            head = heads.get(key)
            size = len(g.seqs) if key not in more else sum(len(m.seqs) for m in more[key])
            size += len(head) if head is not None else 0
            opened = head.opened if head is not None else g.received[0]
            own = self._count(size, opened, (more[key][-1] if key in more else g).received[-1])
            overdue = own * CLOSE_OVERDUE_FACTOR
            count = own * between
            if size >= overdue:
                close.append(key)
            elif size >= count or now - opened >= self.chunk_span:
                due.append((opened, key, size))
        for key, head in heads.items():
            if key not in incoming and now - head.opened >= self.chunk_span:
                due.append((head.opened, key, len(head)))
        # Spread: heads that fill at the same rate reach their count in the
        # same flush, and closing them all at once would stall the receive
        # loop past what the socket buffer holds.  A flush closes the oldest
        # due heads up to what arrived plus a floor, so closing keeps up with
        # arrival and the rest close in the next flushes.
        budget = arriving + self.chunk_datagrams * CLOSE_FLOOR_CHUNKS
        due.sort(key=lambda d: (d[0], d[1]))
        for _opened, key, size in due:
            if budget <= 0:
                break
            close.append(key)
            budget -= size
        sizes = [h.nbytes() for h in heads.values()]
        total = sum(sizes)
        if total > self.head_budget:
            closing = set(close)
            floor = int(self.head_budget * self.budget_floor)
            keys = list(heads)
            # largest first, equal sizes in the heads' order (reverse keeps a sort stable)
            for i in sorted(range(len(keys)), key=sizes.__getitem__, reverse=True):
                if total <= floor:
                    break
                if keys[i] not in closing:
                    close.append(keys[i])
                    total -= sizes[i]
        if self.max_heads is not None:
            close += self._least_recent(incoming, set(close))
        done = set()
        closing = []
        for key in close:
            if key in done:
                continue
            done.add(key)
            head = heads.get(key)
            g = incoming.get(key)
            if head is None:
                head = Head(key[0], key[1], log_id, g.received[0])
            elif g is not None:
                head = head.copy()
            for part in more.get(key) or ((g,) if g is not None else ()):
                head.extend(part.seqs, part.ts, part.received, part.metrics)
            closing.append(head)
        if self.close_later is not None and closing:
            self._handed = (closing, log_id, self.close_later(closing, fast))
        else:
            self._insert_chunks(conn, closing, lambda: close_heads(closing, fast, self.close_hints), log_id)
        return done

    def _insert_chunks(
        self, conn: sqlite3.Connection, heads: list[Head], rows: Callable[[], list[ChunkRow]], log_id: int
    ) -> None:
        """Insert the chunks of closing heads (rows(): theirs, in order, closed here or in a worker).
        With chunk_refused (the central writer), when that fails the heads go one at a time, each
        in a savepoint: a chunk that fails is closed again here and tried once more (a worker's
        row may be at fault), and a head whose chunk still fails goes to chunk_refused; the others
        are inserted.  One savepoint per call when nothing fails."""
        if self.chunk_refused is None:
            for head, row in zip(heads, rows(), strict=True):
                insert_chunk(conn, row, log_id, self.series[head.sensor])
            return
        conn.execute("SAVEPOINT chunks")
        try:
            for head, row in zip(heads, rows(), strict=True):
                insert_chunk(conn, row, log_id, self.series[head.sensor])
        except Exception:
            conn.execute("ROLLBACK TO chunks")
            try:
                made: list[ChunkRow | None] = list(rows())
            except Exception:  # a worker could not close them: each is closed here
                made = [None] * len(heads)
            for head, row in zip(heads, made, strict=True):
                self._insert_one(conn, head, row, log_id)
        conn.execute("RELEASE chunks")

    def _insert_one(self, conn: sqlite3.Connection, head: Head, row: ChunkRow | None, log_id: int) -> None:
        assert self.chunk_refused is not None
        error: Exception | None = None
        for attempt in ([row] if row is not None else []) + [None]:
            conn.execute("SAVEPOINT chunk")
            try:
                made = attempt if attempt is not None else close_heads([head], False)[0]
                insert_chunk(conn, made, log_id, self.series[head.sensor])
            except Exception as exc:
                conn.execute("ROLLBACK TO chunk")
                conn.execute("RELEASE chunk")
                error = exc
                continue
            conn.execute("RELEASE chunk")
            return
        assert error is not None
        self.chunk_refused(conn, head, error)

    def _least_recent(self, incoming: dict[tuple[str, int], Any], closing: set[tuple[str, int]]) -> list:
        """The heads to close so that at most 3/4 of max_heads stay open, when more than
        max_heads would: those written longest ago first, those of this flush last."""
        heads = self.heads
        new = [key for key in incoming if key not in heads]
        staying = len(heads) + len(new) - len(closing)
        assert self.max_heads is not None
        if staying <= self.max_heads:
            return []
        idle = sorted(
            (head.last_log_id, key) for key, head in heads.items() if key not in incoming and key not in closing
        )
        order = [key for _, key in idle]
        order += [key for key in incoming if key not in closing]  # only when this flush alone brings too many
        out = order[: staying - self.max_heads * 3 // 4]
        self.closed_busy += max(0, len(out) - len(idle))
        return out

    def _trim_log(self, conn: sqlite3.Connection) -> None:
        """Delete the oldest log rows whose datagrams are all in closed chunks (and sent, with an uplink)."""
        below = self._log_held()
        acked = self._uplink_acked()
        if acked is not None:
            below = min(below, acked + 1)
        conn.execute(
            "DELETE FROM ingest_log WHERE id IN (SELECT id FROM ingest_log WHERE id < ? ORDER BY id LIMIT ?)",
            (below, LOG_DELETE_STEP),
        )

    def _log_held(self) -> int:
        """The oldest log row still needed for datagrams not in chunks: an open head's, or one
        whose chunk is not inserted yet (close_later)."""
        below = min((h.first_log_id for h in self.heads.values()), default=self.last_log_id + 1)
        inserted = self._inserted_later if self.conn.in_transaction else 0  # in write_groups: these are
        for heads, _, _ in self.closed_later[inserted:]:
            below = min(below, min(h.first_log_id for h in heads))
        return below

    def _uplink_acked(self) -> int | None:
        """The id the uplink acknowledged (`<db>-uplink`), None without an uplink."""
        try:
            with open(self.uplink_path, "rb") as f:
                text = f.read(64)
        except FileNotFoundError:
            return None
        except OSError:
            return 0  # unreadable: keep everything rather than lose unsent rows
        try:
            return int(text.strip() or b"0")
        except ValueError:
            return 0

    def maintain(self, counters: dict[str, float], now: float) -> bool:
        """One bounded step of retention, disk budget and scrub, in its own transaction.

        Runs after a flush (never inside one); False if the database refused it
        (the next flush's failure handling covers a persistent fault).
        """
        conn = self.conn
        below = self._log_held()
        acked = self._uplink_acked()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                before = {k: counters.get(k, 0) for k in MAINTENANCE_COUNTERS}
                # Log rows kept only for an uplink, and already in chunks, may go under pressure.
                self.maintenance.step(conn, counters, now, None if acked is None else acked, log_chunked_below=below)
                changed = [(k, counters.get(k, 0)) for k in MAINTENANCE_COUNTERS if counters.get(k, 0) != before[k]]
                if changed:
                    conn.executemany(UPSERT_COUNTER, changed)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.maintenance.shrink(conn)
        except sqlite3.Error as exc:
            log.warning("retention/budget step failed: %s (retried after the next flush)", exc)
            return False
        return True

    def _failed(self, now: float, exc: sqlite3.Error, core: IngestCore) -> None:
        if self.failing_since is None:
            # Once per episode: the operator needs the cause, not a line per retry.
            self.failing_since = now
            self._dropped_at_failure = core.counters["storage_dropped"]
            log.error(
                "cannot write to %s: %s; keeping up to %d readings in memory and retrying (%s)",
                self.path,
                exc,
                self.max_backlog_rows,
                _write_hint(self.path),
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


def open_ingest(path: str, *, store_options: dict | None = None, **core_options) -> tuple[Store, IngestCore]:
    """Open the store and an ingest core holding what it loaded (the collector's start-up)."""
    store = Store(path, **(store_options or {}))
    try:
        loaded = store.load()
    except BaseException:
        store.close()
        raise
    core = IngestCore(
        counters=loaded.counters, sensors=loaded.sensors, next_series_id=loaded.next_series_id, **core_options
    )
    return store, core
