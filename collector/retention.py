"""Retention, the disk budget and the checksum scrub: bounded steps inside the collector.

`Maintenance.step(conn, counters, now)` runs after a flush, in its own short
transaction, and does at most a bounded amount of work (a few dozen chunks),
so a flush is never delayed by a big delete:

* retention: raw chunks whose newest datagram was received more than
  `retain` seconds ago go (counted in `retention_dropped`); 1-minute and
  1-hour rollup buckets older than their own retention go (a slice of the
  series per step); sensors, gaps and counters are never deleted;
* the disk budget (`max_disk` bytes for the database file and its WAL): when
  the pages in use pass BUDGET_HIGH of it, the oldest raw chunks go first
  (`budget_dropped`), then the oldest 1-minute rollups (minute blocks), then ingest-log rows
  the uplink has not acknowledged yet (`uplink_dropped`; the readings are in
  chunks, only their forwarding is lost).  Freed pages are reused by later
  writes, so the file stays at the budget; when the file itself is above it
  (the budget was lowered), `PRAGMA incremental_vacuum` gives pages back;
* the scrub: the next few chunks' checksums are verified; a mismatch is
  recorded in `chunk_faults`, counted (`corrupt_chunks`) and logged, and
  queries skip that chunk with a note.

The decision of how much to free is pure (`bytes_to_free`); the rest is SQL.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import zlib
from collections.abc import Callable

log = logging.getLogger("collector.retention")

DAY = 86400.0
DEFAULT_RETAIN_S = 90 * DAY  # raw chunks
DEFAULT_RETAIN_1M_S = 365 * DAY  # 1-minute rollups
DEFAULT_RETAIN_1H_S = 0.0  # 1-hour rollups: 0 = forever
BUDGET_HIGH = 0.90  # start deleting when the pages in use pass this share of --max-disk
BUDGET_LOW = 0.85  # and free down to this share
CHUNKS_PER_STEP = 64
SERIES_PER_STEP = 256  # rollup retention: series visited per step
SCRUB_PER_STEP = 8
LOG_ROWS_PER_STEP = 500
FREE_SLACK_PAGES = 64  # free pages kept for reuse (256 KiB at 4 KiB pages) ...
FREE_SLACK_SHARE = 1 / 32  # ... or this share of the file, whichever is more
VACUUM_PAGES_PER_STEP = 256  # free pages handed back per step at most (the budget excepted)
BLOCKS_PER_STEP = 256  # minute blocks deleted per step under --max-disk pressure
WAL_SHARE = 16  # under --max-disk, the WAL is kept to 1/16 of it ...
WAL_MIN_PAGES = 128  # ... but checkpoints no more often than every 128 pages (512 KiB)


def bytes_to_free(used: int, max_disk: int | None) -> int:
    """How many bytes of data to delete now so that `used` stays under the budget (0: none)."""
    if not max_disk or used <= max_disk * BUDGET_HIGH:
        return 0
    return int(used - max_disk * BUDGET_LOW)


def incremental_vacuum(conn: sqlite3.Connection, pages: int | None = None) -> None:
    """Hand up to `pages` free pages (None: all) back to the file system; outside a transaction.

    Through executescript: sqlite3's execute() steps a statement once, and
    `PRAGMA incremental_vacuum` frees one page per step, so execute() would
    free one page whatever N says.
    """
    arg = "" if pages is None else f"({int(pages)})"
    conn.executescript(f"PRAGMA incremental_vacuum{arg}")


# A chunk that may be deleted: readers take the ingest_log rows after a
# (sensor, boot)'s newest chunk (max log_id) as its open head, so deleting the
# newest chunk while log rows up to its log_id remain would bring its datagrams
# back as if unchunked (counted twice: kept and dropped).  Older chunks of the
# (sensor, boot), or one whose log rows are all gone, may go.  (One parameter:
# the oldest ingest_log id.)
DELETABLE = (
    "(log_id < ? OR log_id < (SELECT max(c.log_id) FROM chunks AS c"
    " WHERE c.sensor = chunks.sensor AND c.boot = chunks.boot))"
)


def _oldest_log_row(conn: sqlite3.Connection) -> int:
    """The oldest ingest_log id still there (a huge number when the log is empty)."""
    oldest = conn.execute("SELECT min(id) FROM ingest_log").fetchone()[0]
    return 2**62 if oldest is None else int(oldest)


class Maintenance:
    def __init__(
        self,
        path: str,
        *,
        retain: float = DEFAULT_RETAIN_S,
        retain_1m: float = DEFAULT_RETAIN_1M_S,
        retain_1h: float = DEFAULT_RETAIN_1H_S,
        max_disk: int | None = None,
    ) -> None:
        self.path = path
        self.retain = retain
        self.retain_1m = retain_1m
        self.retain_1h = retain_1h
        self.max_disk = max_disk
        self._scrub_after = 0
        self._rollup_after = {"rollup_1m_blocks": 0, "rollup_1h": 0}
        self.faults_logged = 0
        # Called in the step's transaction with the ids of the chunks the retention is about
        # to delete (not the budget's: those may be younger than the retention).  The central
        # consumer forgets their datagrams' payload-1/2 identities there (uplink_seen).
        self.on_expire: Callable[[sqlite3.Connection, list[int]], None] | None = None
        # Called at the end of each retention step, in its transaction, with the step's `now`:
        # the central consumer trims the identities of datagrams that came already expired.
        self.on_step: Callable[[sqlite3.Connection, float], None] | None = None

    def configure(self, conn: sqlite3.Connection) -> None:
        """Bound the WAL by the budget: it is part of the file's size on disk.

        SQLite checkpoints at 1,000 pages and keeps a WAL of up to
        journal_size_limit (4 MiB here) after it: under a budget of tens of
        MB that is a large share, so both go down to 1/WAL_SHARE of it.
        """
        if not self.max_disk:
            return
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = max(WAL_MIN_PAGES, min(1000, self.max_disk // WAL_SHARE // page))
        conn.execute(f"PRAGMA wal_autocheckpoint={int(pages)}")
        conn.execute(f"PRAGMA journal_size_limit={int(min(4194304, pages * page))}")

    # --- sizes ---------------------------------------------------------------------------

    def sizes(self, conn: sqlite3.Connection) -> tuple[int, int, int]:
        """(file bytes incl. WAL, bytes in use, page size)."""
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        try:
            wal = os.path.getsize(self.path + "-wal")
        except OSError:
            wal = 0
        return pages * page + wal, (pages - free) * page + wal, page

    # --- one step --------------------------------------------------------------------------

    def step(
        self,
        conn: sqlite3.Connection,
        counters: dict[str, float],
        now: float,
        unacked_after: int | None,
        log_chunked_below: int = 0,
    ) -> None:
        """One bounded step, inside the caller's transaction."""
        if self.retain > 0:
            self._retention(conn, counters, now - self.retain)
        for table, keep in (("rollup_1m_blocks", self.retain_1m), ("rollup_1h", self.retain_1h)):
            if keep > 0:
                self._rollup_retention(conn, table, now - keep)
        if self.max_disk:
            self._budget(conn, counters, unacked_after, log_chunked_below)
        self._scrub(conn, counters, now)
        if self.retain > 0 and self.on_step is not None:
            self.on_step(conn, now)

    def shrink(self, conn: sqlite3.Connection) -> None:
        """Outside a transaction: hand free pages back to the file system, a bounded number per step.

        Free pages beyond a slack (FREE_SLACK_PAGES, or FREE_SLACK_SHARE of the
        file) go back, VACUUM_PAGES_PER_STEP at most per step: the ingest
        log's rows, deleted a chunk span after they were written, leave pages
        that would otherwise stay in the file (bench/store_disk.py: 1.9 bytes
        per reading over 2 h).  When the file is above the budget (it was
        lowered), as many as it takes to get under it, and the WAL is
        truncated.
        """
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        want = min(free - max(FREE_SLACK_PAGES, int(pages * FREE_SLACK_SHARE)), VACUUM_PAGES_PER_STEP)
        over = False
        if self.max_disk:
            size, _used, page = self.sizes(conn)
            if size > self.max_disk:
                over = True
                want = max(want, min(free, (size - self.max_disk) // page + 1))
        if want > 0:
            incremental_vacuum(conn, want)
        if over:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _delete_chunks(self, conn: sqlite3.Connection, ids: list[int], counters: dict[str, float], counter: str) -> int:
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        readings, horizon = conn.execute(
            f"SELECT total(count), max(max_ts) FROM chunk_series WHERE chunk IN ({marks})", ids
        ).fetchone()
        conn.execute(f"DELETE FROM chunk_series WHERE chunk IN ({marks})", ids)
        conn.execute(f"DELETE FROM chunks WHERE id IN ({marks})", ids)
        counters[counter] = counters.get(counter, 0) + int(readings)
        if horizon is not None:
            # Queries for older ranges answer from rollups and say so.
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('raw_deleted_until', ?) ON CONFLICT (key) DO UPDATE"
                " SET value = max(CAST(value AS REAL), CAST(excluded.value AS REAL))",
                (repr(horizon),),
            )
        return int(readings)

    def _retention(self, conn: sqlite3.Connection, counters: dict[str, float], cutoff: float) -> None:
        ids = [
            i
            for (i,) in conn.execute(
                f"SELECT id FROM chunks WHERE last_received < ? AND {DELETABLE} ORDER BY last_received LIMIT ?",
                (cutoff, _oldest_log_row(conn), CHUNKS_PER_STEP),
            )
        ]
        if ids and self.on_expire is not None:
            self.on_expire(conn, ids)
        self._delete_chunks(conn, ids, counters, "retention_dropped")

    def _rollup_retention(self, conn: sqlite3.Connection, table: str, cutoff: float) -> None:
        after = self._rollup_after[table]
        series = [
            s
            for (s,) in conn.execute("SELECT id FROM series WHERE id > ? ORDER BY id LIMIT ?", (after, SERIES_PER_STEP))
        ]
        # A minute block goes when its newest minute is past the cutoff.
        column = "last_bucket" if table == "rollup_1m_blocks" else "bucket"
        conn.executemany(f"DELETE FROM {table} WHERE series = ? AND {column} < ?", [(s, cutoff) for s in series])
        self._rollup_after[table] = series[-1] if len(series) == SERIES_PER_STEP else 0

    def _budget(
        self, conn: sqlite3.Connection, counters: dict[str, float], unacked_after: int | None, log_chunked_below: int
    ) -> None:
        _size, used, page = self.sizes(conn)
        need = bytes_to_free(used, self.max_disk)
        if need <= 0:
            return
        # Oldest raw chunks first (their bytes are most of the file).
        rows = conn.execute(
            f"SELECT id, length(blob) FROM chunks WHERE {DELETABLE} ORDER BY id LIMIT ?",
            (_oldest_log_row(conn), CHUNKS_PER_STEP),
        ).fetchall()
        ids, freed = [], 0
        for chunk_id, nbytes in rows:
            if freed >= need:
                break
            ids.append(chunk_id)
            freed += nbytes + 200  # the blob and its statistics rows
        if ids:
            self._delete_chunks(conn, ids, counters, "budget_dropped")
            return
        # No raw chunk left: the oldest minute blocks (a bounded number per step).
        cur = conn.execute(
            "DELETE FROM rollup_1m_blocks WHERE (series, first_bucket, chunk) IN"
            " (SELECT series, first_bucket, chunk FROM rollup_1m_blocks ORDER BY first_bucket LIMIT ?)",
            (BLOCKS_PER_STEP,),
        )
        if cur.rowcount:
            return
        # Last: log rows kept only for the uplink (their readings are in chunks).
        if unacked_after is not None:
            rows = conn.execute(
                "SELECT id, readings FROM ingest_log WHERE id > ? AND id < ? ORDER BY id LIMIT ?",
                (unacked_after, log_chunked_below, LOG_ROWS_PER_STEP),
            ).fetchall()
            if rows:
                conn.execute("DELETE FROM ingest_log WHERE id <= ? AND id > ?", (rows[-1][0], unacked_after))
                counters["uplink_dropped"] = counters.get("uplink_dropped", 0) + sum(r for _, r in rows)

    def _scrub(self, conn: sqlite3.Connection, counters: dict[str, float], now: float) -> None:
        rows = conn.execute(
            "SELECT id, sensor, crc, blob FROM chunks WHERE id > ? ORDER BY id LIMIT ?",
            (self._scrub_after, SCRUB_PER_STEP),
        ).fetchall()
        self._scrub_after = rows[-1][0] if len(rows) == SCRUB_PER_STEP else 0
        for chunk_id, sensor, crc, blob in rows:
            if zlib.crc32(blob) == crc:
                continue
            cur = conn.execute(
                "INSERT OR IGNORE INTO chunk_faults (chunk, sensor, found, error) VALUES (?, ?, ?, ?)",
                (chunk_id, sensor, now, "checksum mismatch"),
            )
            if cur.rowcount:
                counters["corrupt_chunks"] = counters.get("corrupt_chunks", 0) + 1
                log.error(
                    "chunk %d of sensor %s in %s is corrupt (checksum mismatch): queries skip its readings; "
                    "check the storage medium (sqlite3 %s 'PRAGMA integrity_check')",
                    chunk_id,
                    sensor,
                    self.path,
                    self.path,
                )
