"""The SQLite schema: created and migrated on open, versioned in `meta`.

This file is the contract between the collector (the one writer) and the query
server (read-only readers); docs/SCHEMA.md describes every column.  Migrations
run in order inside one transaction each, so a crash mid-migration leaves the
previous version intact.

Layout, and why:
- `readings` is WITHOUT ROWID, clustered on (series, ts, boot, seq): the range
  and latest-value queries walk one series' rows in time order straight off
  the primary key, and the writer maintains one B-tree instead of a table plus
  a secondary index.  sqlite-utils cannot declare WITHOUT ROWID, so that one
  table is plain SQL.
- metric names are interned in `series` (sensor, metric) -> small integer, so
  a reading row carries 8 bytes of key instead of two strings.
- `boot` is -1 for sensors that send no boot field (a primary key column may
  not be NULL in a WITHOUT ROWID table); readers map -1 back to null.

Version 2 adds `sensors.replay`, the anti-replay window of signed datagrams
(collector/replay.py), written in the same transaction as the readings it
admitted.  Version 3 adds the sensor health columns (`_health_columns`).

Version 4 (storage v3, docs/SCHEMA.md) replaces the row-per-reading
`readings` table with the `ingest_log` (one row per flush, collector/ingestlog.py)
and immutable per-(sensor, boot) `chunks` with per-series statistics in
`chunk_series`, plus 1-minute and 1-hour `rollup_1m`/`rollup_1h`.  The
migration converts every reading in place (one sensor at a time, progress in
the log) and drops `readings`; readers refuse any other version.

Version 5 stores the 1-minute rollups as minute blocks (`rollup_1m_blocks`,
one encoded blob per series and closed chunk) instead of a row per series
and minute: 0.69 -> ~0.2 bytes per reading on the realistic day
(bench/store_disk.py).  The migration converts version 4's `rollup_1m` rows.

Version 6 declares `chunks.id` AUTOINCREMENT: retention may delete every
chunk, and SQLite would then hand their ids out again to new chunks, which a
running query server would miss or answer from its cache of the old ones.
Version 7 does the same for a central database's `uplink_quarantine.id`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import auth, replay, wire
from .errors import SetupError

if TYPE_CHECKING:  # imported where a database is opened for writing: it pulls in numpy (~0.25 s of CPU)
    import sqlite_utils

SCHEMA_VERSION = 7
log = logging.getLogger("collector.schema")
NO_BOOT = -1  # stored in place of a missing boot field
# Every reason the collector counts as `rejected:<reason>` in `counters`:
# the wire format's, then those of signed datagrams, then the replay window's.
REJECT_REASONS = tuple(dict.fromkeys(wire.REASONS + auth.REASONS + replay.REASONS))


def _v1(db: sqlite_utils.Database) -> None:
    db["sensors"].create(
        {
            "sensor": str,
            "first_seen": float,
            "last_seen": float,
            "datagrams": int,
            "readings": int,
            "lost": int,
            "duplicates": int,
            "reordered": int,
            "restarts": int,
            "tracker": str,  # JSON snapshot of the sequence tracker (restart safety)
        },
        pk="sensor",
        not_null=["first_seen", "last_seen"],
        defaults={k: 0 for k in ("datagrams", "readings", "lost", "duplicates", "reordered", "restarts")},
    )
    db["series"].create({"id": int, "sensor": str, "metric": str}, pk="id", not_null=["sensor", "metric"])
    db["series"].create_index(["sensor", "metric"], unique=True)
    db.execute(
        """CREATE TABLE readings (
               series INTEGER NOT NULL,
               ts REAL NOT NULL,
               boot INTEGER NOT NULL,
               seq INTEGER NOT NULL,
               value REAL NOT NULL,
               received REAL NOT NULL,
               PRIMARY KEY (series, ts, boot, seq)
           ) WITHOUT ROWID"""
    )
    # One row per run of missing seqs that is still missing.  `stream` counts
    # the sensor's restarts, so gaps of an earlier stream with the same boot
    # (a seq reset without a boot field) never collide with newer ones.
    db["gaps"].create(
        {
            "sensor": str,
            "stream": int,
            "boot": int,
            "first_seq": int,
            "last_seq": int,
            "missing": int,
            "detected_at": float,
        },
        pk=("sensor", "stream", "first_seq"),
        not_null=["boot", "last_seq", "missing", "detected_at"],
    )
    db["gaps"].create_index(["detected_at"])
    # Collector counters, cumulative across restarts: received, stored,
    # stored_readings, duplicates, kernel_drops, truncated, storage_dropped,
    # rejected:<reason> (REJECT_REASONS), and last_flush (Unix seconds).
    db["counters"].create({"name": str, "value": float}, pk="name", not_null=["value"])


def _v2(db: sqlite_utils.Database) -> None:
    # JSON snapshot of the sensor's anti-replay window; NULL until its first
    # signed datagram.  Guarded, so a step interrupted after the ALTER (the
    # connection is in autocommit mode) can run again.
    if "replay" not in db["sensors"].columns_dict:
        db["sensors"].add_column("replay", str)


# Sensor health (collector/health.py), written with the sensor's row at each
# flush: the learned send interval (s), the silence after which the sensor is
# stale (s; the collector's stale-factor and stale-floor applied), its clock
# offset (s, sensor minus collector) and whether that is beyond the
# clock-threshold (0/1).  NULL until learned.
HEALTH_COLUMNS = {"interval": float, "stale_after": float, "clock_offset": float, "clock_skewed": int}


def _health_columns(db: sqlite_utils.Database) -> None:
    # Guarded per column, like _v2, so an interrupted step can run again.
    have = db["sensors"].columns_dict
    for name, kind in HEALTH_COLUMNS.items():
        if name not in have:
            db["sensors"].add_column(name, kind)


CHUNK_TABLES = (
    # One row per closed head: one (sensor, boot)'s datagrams, encoded
    # (docs/SCHEMA.md "Chunk format").  log_id: the ingest_log row of the flush
    # that closed it; every datagram of (sensor, boot) in log rows <= log_id is
    # in a chunk, so readers take only later log rows as open heads.  AUTOINCREMENT
    # (version 6): an id is never handed out again after retention deleted the
    # newest chunks, since readers remember ids (heads.HeadCache, decoded chunks).
    """CREATE TABLE IF NOT EXISTS chunks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sensor TEXT NOT NULL,
        boot INTEGER NOT NULL,
        log_id INTEGER NOT NULL,
        datagrams INTEGER NOT NULL,
        first_received REAL NOT NULL,
        last_received REAL NOT NULL,
        crc INTEGER NOT NULL,
        blob BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS chunks_closed ON chunks (sensor, boot, log_id)",
    "CREATE INDEX IF NOT EXISTS chunks_received ON chunks (last_received)",  # retention, oldest first
    # Per-series statistics of each chunk, clustered by (series, min_ts): a
    # range query finds a series' chunks without touching a blob, and whole
    # chunks inside an aggregate bucket are answered from these columns.
    """CREATE TABLE IF NOT EXISTS chunk_series (
        series INTEGER NOT NULL,
        min_ts REAL NOT NULL,
        chunk INTEGER NOT NULL,
        max_ts REAL NOT NULL,
        count INTEGER NOT NULL,
        min REAL NOT NULL,
        max REAL NOT NULL,
        sum REAL NOT NULL,
        last_boot INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        last_value REAL NOT NULL,
        PRIMARY KEY (series, min_ts, chunk)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS chunk_series_max ON chunk_series (series, max_ts)",
    "CREATE INDEX IF NOT EXISTS chunk_series_chunk ON chunk_series (chunk)",  # deleting a chunk's rows
    # Rollups: count/min/max/sum per series and bucket (start in Unix seconds),
    # upsert-added as chunks close.
    # 1-minute rollups as minute blocks (version 5): one row per series and
    # closed chunk, its minutes encoded in one blob (chunkstore.encode_minutes);
    # a minute a later chunk also holds (a chunk closes mid-minute, late data)
    # is in both blocks, and readers add them up.  chunk: the chunk it came
    # from (0 when converted from version 4's rollup_1m rows); it outlives the
    # chunk, by its own retention.
    """CREATE TABLE IF NOT EXISTS rollup_1m_blocks (
        series INTEGER NOT NULL,
        first_bucket INTEGER NOT NULL,
        chunk INTEGER NOT NULL,
        last_bucket INTEGER NOT NULL,
        blob BLOB NOT NULL,
        PRIMARY KEY (series, first_bucket, chunk)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS rollup_1m_blocks_last ON rollup_1m_blocks (series, last_bucket)",
    """CREATE TABLE IF NOT EXISTS rollup_1h (
        series INTEGER NOT NULL, bucket INTEGER NOT NULL, count INTEGER NOT NULL,
        min REAL NOT NULL, max REAL NOT NULL, sum REAL NOT NULL,
        PRIMARY KEY (series, bucket)
    ) WITHOUT ROWID""",
    # Chunks whose blob failed its checksum or did not decode (found by the
    # collector's scrub or at close): kept for the operator, skipped by queries.
    """CREATE TABLE IF NOT EXISTS chunk_faults (
        chunk INTEGER PRIMARY KEY, sensor TEXT NOT NULL, found REAL NOT NULL, error TEXT NOT NULL
    )""",
)


def _v4(db: sqlite_utils.Database) -> None:
    from . import ingestlog

    conn = db.conn
    conn.execute(ingestlog.CREATE_TABLE)
    for sql in CHUNK_TABLES:
        conn.execute(sql)
    if "readings" in db.table_names():
        migrate_readings(conn)
        conn.execute("DROP TABLE readings")


def _v5(db: sqlite_utils.Database) -> None:
    """Version 4's rollup_1m rows (~40 bytes per series and minute) become minute blocks."""
    conn = db.conn
    for sql in CHUNK_TABLES:
        conn.execute(sql)
    if "rollup_1m" in db.table_names():
        migrate_minutes(conn)
        conn.execute("DROP TABLE rollup_1m")


def _v6(db: sqlite_utils.Database) -> None:
    """Chunk ids are never reused: `chunks.id` becomes AUTOINCREMENT, counting on from the highest
    id anything still names (a chunk, a corrupt-chunk record, a minute block)."""
    conn = db.conn
    for sql in CHUNK_TABLES:
        conn.execute(sql)
    (high,) = conn.execute(
        "SELECT max(coalesce((SELECT max(id) FROM chunks), 0), coalesce((SELECT max(chunk) FROM chunk_faults), 0),"
        " coalesce((SELECT max(chunk) FROM rollup_1m_blocks), 0))"
    ).fetchone()
    declare_autoincrement(conn, "chunks", high)


def _v7(db: sqlite_utils.Database) -> None:
    """A central database's `uplink_quarantine.id` is never reused (the consumer's ERROR lines
    and `status --central` name its rows by id, and the operator deletes a row once its message
    is published again): AUTOINCREMENT, counting on from the number of rows ever set aside
    (`counters.uplink_quarantined`, written in the same transaction as each row), which no id
    handed out before can exceed.  A file without the table (a gateway's) only gets the version."""
    conn = db.conn
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'uplink_quarantine'").fetchone():
        return  # telemetry-uplink consume creates it so declared (collector/uplink/central.py)
    (high,) = conn.execute(
        "SELECT max(coalesce((SELECT max(id) FROM uplink_quarantine), 0),"
        " coalesce((SELECT CAST(value AS INTEGER) FROM counters WHERE name = 'uplink_quarantined'), 0))"
    ).fetchone()
    declare_autoincrement(conn, "uplink_quarantine", high)


def declare_autoincrement(conn: sqlite3.Connection, table: str, high: int) -> None:
    """Declare `table`'s `id INTEGER PRIMARY KEY` AUTOINCREMENT and have its next id come after
    `high` (inside the caller's transaction).

    The table's rows and pages stay as they are; only its declaration and sqlite_sequence change
    (the procedure of https://sqlite.org/lang_altertable.html section 8 for changes that leave the
    stored content alone): no copy of a table that may be gigabytes."""
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    if "AUTOINCREMENT" not in sql:
        declared = sql.replace("id INTEGER PRIMARY KEY,", "id INTEGER PRIMARY KEY AUTOINCREMENT,", 1)
        if declared == sql:
            raise SetupError(f"table {table} is declared as {sql!r}, not as this collector made it: report this")
        (version,) = conn.execute("PRAGMA schema_version").fetchone()
        conn.execute("PRAGMA writable_schema=ON")
        try:
            conn.execute("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = ?", (declared, table))
            conn.execute(f"PRAGMA schema_version={int(version) + 1}")  # every connection reads the schema again
        finally:
            conn.execute("PRAGMA writable_schema=OFF")
    conn.execute("DELETE FROM sqlite_sequence WHERE name = ? AND seq < ?", (table, high))
    conn.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT ?, ? WHERE NOT EXISTS"
        " (SELECT 1 FROM sqlite_sequence WHERE name = ?)",
        (table, high, table),
    )


MINUTES_PER_BLOCK = 1440  # a day of one series' minutes per converted block


def migrate_minutes(conn: sqlite3.Connection) -> int:
    """Convert version 4's rollup_1m rows into minute blocks; returns the rows converted."""
    from .chunkstore import encode_minutes

    rows = conn.execute("SELECT count(*) FROM rollup_1m").fetchone()[0]
    moved = 0
    series = [s for (s,) in conn.execute("SELECT DISTINCT series FROM rollup_1m ORDER BY series")]
    for sid in series:
        buckets = conn.execute(
            "SELECT bucket, count, min, max, sum FROM rollup_1m WHERE series = ? ORDER BY bucket", (sid,)
        ).fetchall()
        for i in range(0, len(buckets), MINUTES_PER_BLOCK):
            part = buckets[i : i + MINUTES_PER_BLOCK]
            conn.execute(
                "INSERT INTO rollup_1m_blocks (series, first_bucket, chunk, last_bucket, blob) VALUES (?, ?, 0, ?, ?)",
                (sid, part[0][0], part[-1][0], encode_minutes(part)),
            )
            moved += len(part)
    if moved != rows:
        raise SetupError(f"converting rollup_1m moved {moved} rows of {rows}: the database is left at version 4")
    log.info("converted %d 1-minute rollup rows of %d series into minute blocks", moved, len(series))
    return moved


MIGRATION_CHUNK_DATAGRAMS = 1024


def migrate_readings(conn: sqlite3.Connection) -> int:
    """Convert every v2 `readings` row into chunks (one sensor at a time); returns readings moved.

    A datagram's readings share (boot, seq, ts, received); they are grouped
    back into datagrams per (sensor, boot), ordered by receive time (arrival
    order), and cut into chunks.  Nothing is dropped: the count moved is
    checked against the table's.
    """
    from .chunkstore import chunk_rows_from_columns
    from .store import insert_chunk

    total = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    series_of: dict[str, list[tuple[int, str]]] = {}
    for sid, sensor, metric in conn.execute("SELECT id, sensor, metric FROM series ORDER BY id"):
        series_of.setdefault(sensor, []).append((sid, metric))
    log.info("migrating %d readings of %d sensors to storage v3 chunks", total, len(series_of))
    moved = 0
    started = last_log = time.monotonic()
    for sensor, series in series_of.items():
        datagrams: dict[tuple, dict[str, float]] = {}
        for sid, metric in series:
            for ts, boot, seq, value, received in conn.execute(
                "SELECT ts, boot, seq, value, received FROM readings WHERE series = ?", (sid,)
            ):
                datagrams.setdefault((boot, received, seq, ts), {})[metric] = value
                moved += 1
        by_boot: dict[int, list[tuple]] = {}
        for key in sorted(datagrams, key=lambda k: (k[1], k[2], k[3])):
            by_boot.setdefault(key[0], []).append(key)
        for boot, keys in by_boot.items():
            names = list(dict.fromkeys(name for k in keys for name in datagrams[k]))
            metrics = {name: [datagrams[k].get(name) for k in keys] for name in names}
            for row in chunk_rows_from_columns(
                sensor,
                boot,
                [k[2] for k in keys],
                [k[3] for k in keys],
                [k[1] for k in keys],
                metrics,
                MIGRATION_CHUNK_DATAGRAMS,
            ):
                insert_chunk(conn, row, 0, {metric: sid for sid, metric in series})
        now = time.monotonic()
        if now - last_log >= 5.0:
            last_log = now
            log.info(
                "migrating: %d of %d readings (%.0f%%) in %.0f s",
                moved,
                total,
                100.0 * moved / max(total, 1),
                now - started,
            )
    if moved != total:
        raise SetupError(
            f"migration to storage v3 moved {moved} readings of {total}: the database is left "
            "at version 2 (report this)"
        )
    log.info("migrated %d readings to storage v3 chunks in %.1f s", moved, time.monotonic() - started)
    return moved


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1, _v2, _health_columns, _v4, _v5, _v6, _v7]
assert len(MIGRATIONS) == SCHEMA_VERSION


def damaged_advice(path: str) -> str:
    """What to do about a database SQLite calls damaged (the one wording everywhere)."""
    return (
        f"check it with 'sqlite3 {path} \"PRAGMA integrity_check\"'; restore a backup "
        f"or move the file aside to start a new one"
    )


# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF) that
# mean the file itself is damaged or is no database, not that we lack rights.
_DAMAGED_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_FULL_CODE = 13  # SQLITE_FULL


def open_advice(path: str, exc: sqlite3.Error) -> str:
    """The hint for a database SQLite refused to open or read, by the cause it gave."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in _DAMAGED_CODES:
        return damaged_advice(path)
    if code == _FULL_CODE:
        return "check free space with 'df'"
    return "is the directory writable by this user?"


def _version_of(value: object, path: str) -> int:
    """meta.schema_version as an integer; anything else is a damaged database."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise SetupError(
            f"database {path}: schema_version {value!r} in table meta is not a number ({damaged_advice(path)})"
        ) from None


def schema_version(db: sqlite_utils.Database) -> int:
    if "meta" not in db.table_names():
        return 0
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return _version_of(row[0], str(db.conn.execute("PRAGMA database_list").fetchone()[2])) if row else 0


def migrate(db: sqlite_utils.Database) -> int:
    """Bring the database to SCHEMA_VERSION; returns the version found."""
    found = schema_version(db)
    if found > SCHEMA_VERSION:
        raise SetupError(
            f"database schema version {found} is newer than this collector's {SCHEMA_VERSION}: upgrade gateway-telemetry"
        )
    if found == 0 and not db.table_names():
        # A new file: freed pages are handed back by PRAGMA incremental_vacuum
        # (retention, --max-disk), which needs this before the first table
        # (open_writer sets it before WAL mode too, which would fix the mode).
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    for version in range(found + 1, SCHEMA_VERSION + 1):
        db.conn.execute("BEGIN IMMEDIATE")  # one transaction per step
        try:
            db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
            MIGRATIONS[version - 1](db)
            db.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(version),))
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
        db.conn.execute("COMMIT")
    if found and found < 5 <= SCHEMA_VERSION and db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        # The readings (v2) or rollup_1m (v4) rows are gone: shrink the file
        # and turn on incremental auto-vacuum (a VACUUM rewrites the now small
        # file once).  Version 4 files were created without it: the WAL mode
        # was set first, which fixes the mode.
        started = time.monotonic()
        log.info("compacting the database once after the migration (needs free space of its size)")
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("VACUUM")
        log.info("database compacted after the migration in %.1f s", time.monotonic() - started)
    elif found == 4 and db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        from .retention import incremental_vacuum

        incremental_vacuum(db.conn)  # the pages rollup_1m held go back to the file system
    return found


def open_writer(path: str) -> sqlite_utils.Database:
    """Open (creating if need be) the database as its one long-lived writer.

    WAL lets readers run beside the writer; synchronous=NORMAL keeps WAL
    durable across a process crash (only an OS crash may lose the last
    commits).  Exactly one writer connection exists: SQLite 3.40.1, bundled
    here, is inside the range of the WAL-reset bug that two concurrent writers
    or checkpointers can trigger.
    """
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise SetupError(f"cannot open database {path}: {exc} ({open_advice(path, exc)})") from None
    import sqlite_utils

    try:
        db = sqlite_utils.Database(conn)
        if not db.table_names():
            # Before WAL mode, or a new file keeps auto_vacuum=NONE for good.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.enable_wal()
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        migrate(db)
        # The database's identity, made once: the uplink's payload 3 names its rows by it, so
        # a recreated database (ids from 1 again) is not taken centrally for a replay.
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('database_id', lower(hex(randomblob(16))))")
    except BaseException as exc:
        conn.close()  # a refused database (newer schema, unwritable, damaged) is left closed
        if isinstance(exc, sqlite3.Error):
            raise SetupError(f"cannot open database {path}: {exc} ({open_advice(path, exc)})") from None
        raise
    return db


def lock_writer(path: str) -> int:
    """Take the one-writer lock on the database file; returns the descriptor holding it.

    A second collector pointed at the same file (another port, the same --db)
    would interleave counters and series ids and run two writers into the WAL
    bug above, so it is refused.  flock(2) locks are separate from the POSIX
    record locks SQLite uses, and the kernel drops ours when the process dies
    (kill -9 included).  Keep the descriptor open for the writer's lifetime and
    close it only after the SQLite connection: closing any descriptor of the
    file earlier would release SQLite's own POSIX locks.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise SetupError(
            f"cannot open database {path}: {exc.strerror} (is the directory writable by this user?)"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)  # a FIFO or device at the path: SQLite would fail with a bare "disk I/O error"
        raise SetupError(
            f"cannot open database {path}: not a regular file (give --db the path of a "
            f"database file, or of one to create)"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SetupError(
            f"database {path} is in use by another telemetry-collector: "
            "one collector writes one database (give this one its own --db)"
        ) from None
    return fd


def open_reader(path: str) -> sqlite3.Connection:
    """Open the database read-only (mode=ro): a reader can never change data."""
    from urllib.parse import quote

    try:
        conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.Error as exc:
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        hint = damaged_advice(path) if code in _DAMAGED_CODES else "has the collector created it yet?"
        raise SetupError(f"cannot open database {path} read-only: {exc} ({hint})") from None
    if found is None or _version_of(found[0], path) != SCHEMA_VERSION:
        raise SetupError(f"database {path} has schema {found and found[0]}, expected {SCHEMA_VERSION}")
    return conn
