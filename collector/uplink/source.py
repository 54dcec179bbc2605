"""The gateway side's reads: the collector's database, read-only, and the cursor file.

The database is opened with mode=ro as the query server does; the collector
stays its only writer.  The position the collector's retention honours is the
file `<db>-uplink` (the last acked ingest_log id, decimal and a newline),
replaced atomically (temp file, fsync, rename, fsync of the directory) so a
kill -9 or a power cut leaves the old or the new id, never a torn one.
"""

from __future__ import annotations

import os
import sqlite3
import zlib
from dataclasses import dataclass, field
from urllib.parse import quote

from .. import ingestlog
from ..errors import SetupError
from . import core

STATUS = "status"  # the gateway name `telemetry-uplink status` reads with: any database may be looked at
SENSOR_COLUMNS = "sensor, first_seen, last_seen, datagrams, readings, lost, duplicates, reordered, restarts"
# Sensors whose last_seen is this close below the newest we published are
# looked at again each round (clock steps, flushes that commit older receive times).
ACCOUNTS_SLACK_S = 120.0
# A sensor's gaps are read again only when its (lost, reordered) changed: every
# change of its gap rows moves one of them (collector/sequence.py: a new gap adds
# to lost, a late datagram that fills one adds to reordered; nothing else writes
# the gaps table).  Every active sensor's accounts change at every flush, so
# without this each round ran one gaps query per active sensor, a fifth of the
# uplink's CPU beside a collector of 2,000 sensors (bench/uplink.py --ingest-only
# --ingest-sensors 2000 --searches 0 --pair-rate 10000: "uplink CPU").
# Gap lists up to this long are kept between rounds, up to this many gaps in all
# (~200 bytes each); longer lists are read each time.
GAP_CACHE_PER_SENSOR = 16
GAP_CACHE_TOTAL = 20_000


# Tables only `telemetry-uplink consume` makes: their presence marks a central database.
CENTRAL_TABLES = ("uplink_accounts", "uplink_ranges", "uplink_seen", "uplink_quarantine")


def central_refusal(db: str) -> str:
    """The one line that refuses to uplink a central database onward."""
    return (
        f"database {db} is a central database (telemetry-uplink consume writes it): it cannot be uplinked "
        "onward to another tier; let the higher tier's consumer read the gateways' stream (docs/OPERATIONS.md "
        '"The central side")'
    )


def is_central(conn: sqlite3.Connection) -> bool:
    marks = ",".join("?" * len(CENTRAL_TABLES))
    return bool(
        conn.execute(
            f"SELECT 1 FROM sqlite_master WHERE type = 'table' AND name IN ({marks})", CENTRAL_TABLES
        ).fetchone()
    )


def refuse_central(db: str) -> None:
    """SetupError when `db` is a central database; nothing when it is not, or not there yet (the
    collector creates it; Source checks again when it opens it)."""
    if not os.path.exists(db):
        return
    try:
        conn = sqlite3.connect(f"file:{quote(db)}?mode=ro", uri=True)
        try:
            central = is_central(conn)
        finally:
            conn.close()
    except sqlite3.Error:
        return  # Source says what is wrong with it
    if central:
        raise SetupError(central_refusal(db))


def cursor_path(db: str) -> str:
    return f"{db}-uplink"


def read_cursor(db: str) -> int:
    """The last acked id, 0 when the uplink never acked anything (send the whole log)."""
    path = cursor_path(db)
    try:
        with open(path, "rb") as f:
            data = f.read(64)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise SetupError(f"cannot read the uplink position {path}: {exc.strerror}") from None
    try:
        return core.parse_cursor(data)
    except ValueError as exc:
        raise SetupError(
            f"uplink position {path} is damaged ({exc}): fix or remove it "
            "(removing it re-sends the whole ingest log; the central side drops what it has)"
        ) from None


def write_atomically(path: str, data: bytes, durable: bool = True) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_cursor(db: str, acked_id: int) -> None:
    write_atomically(cursor_path(db), core.format_cursor(acked_id))


def hold_log(db: str) -> bool:
    """Write position 0 when there is no position file yet; True if written.

    The collector's retention trims ingest_log rows whose readings are in closed
    chunks; with a position file it keeps every row after the position.  An
    uplink that has not acked anything yet (a new site whose broker is not
    reachable, wrong credentials) must hold the log from the moment it starts,
    not from its first ack, or what the collector trims meanwhile never reaches
    the central side."""
    if os.path.exists(cursor_path(db)):
        return False
    write_cursor(db, 0)
    return True


@dataclass
class Snapshot:
    """One consistent read: the entries after the cursor (decoded, or as committed: blocks),
    the newest id, changed accounts."""

    entries: list[ingestlog.Entry]
    last_id: int
    accounts: list[core.Accounts]
    account_rows: list[tuple]
    blocks: list[core.Block] | None = None
    origin: str | None = None  # the database's identity (meta.database_id), None if it has none yet
    counters: dict[str, int] = field(default_factory=dict)  # core.GATEWAY_COUNTERS as of last_id

    @property
    def ids(self) -> list[int]:
        return [b.id for b in self.blocks] if self.blocks is not None else [e.id for e in self.entries]


class Source:
    """Read-only access to the collector's database."""

    def __init__(self, db: str, gateway: str) -> None:
        self.db = db
        self.gateway = gateway
        try:
            self.conn = sqlite3.connect(
                f"file:{quote(db)}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            self.conn.execute("PRAGMA busy_timeout=5000")
            self.conn.execute("SELECT 1 FROM ingest_log LIMIT 1").fetchall()
            self.conn.execute("SELECT 1 FROM sensors LIMIT 1").fetchall()
            central = gateway != STATUS and is_central(self.conn)
        except sqlite3.Error as exc:
            self.conn.close()
            raise SetupError(
                f"cannot read database {db}: {exc} (has a collector with the ingest log, storage v3, created it yet?)"
            ) from None
        if central:
            self.conn.close()
            raise SetupError(central_refusal(db))
        self.published: dict[str, tuple] = {}  # sensor -> counts last acked centrally
        self.high_last_seen = float("-inf")
        # sensor -> ((lost, reordered), gaps, gaps_total) as read last (GAP_CACHE_*)
        self._gaps: dict[str, tuple[tuple, tuple[core.Gap, ...], int]] = {}
        self._gaps_held = 0
        self.gap_queries = 0  # gaps read from the database (the cache's misses)

    def close(self) -> None:
        self.conn.close()

    def read(
        self, after_id: int, max_entries: int, max_readings: int, raw: bool = False, max_bytes: int = 8 << 20
    ) -> Snapshot:
        """Entries after `after_id` (at least one if any, at most max_entries, stopping once
        max_readings are gathered, or with `raw` max_bytes of bodies) and the accounts that
        changed, in one read transaction.  `raw` keeps each body as committed (core.Block),
        checked to inflate whole (ingestlog.LogFormatError if not), not decoded."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            entries: list[ingestlog.Entry] = []
            blocks: list[core.Block] | None = [] if raw else None
            readings = size = 0
            # Row by row, not fetchall: a backlog of large entries must not all sit in memory at once.
            cur = conn.execute(
                "SELECT id, committed, datagrams, readings, body FROM ingest_log WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, max_entries),
            )
            for row_id, committed, datagrams, n, body in cur:
                if blocks is None:
                    if entries and readings + n > max_readings:
                        break
                    entries.append(ingestlog.Entry(row_id, committed, ingestlog.decode_body(body)))
                else:
                    if blocks and (readings + n > max_readings or size + len(body) > max_bytes):
                        break
                    try:
                        inflated = len(zlib.decompress(body))
                    except zlib.error as exc:
                        raise ingestlog.LogFormatError(f"ingest log row {row_id}: {exc}") from None
                    blocks.append(core.Block(row_id, datagrams, n, body, inflated))
                    size += len(body)
                readings += n
            cur.close()
            last = ingestlog.last_id(conn)
            row = conn.execute("SELECT value FROM meta WHERE key = 'database_id'").fetchone()
            origin = row[0] if row and isinstance(row[0], str) and core.ORIGIN_RE.fullmatch(row[0]) else None
            marks = ",".join("?" * len(core.GATEWAY_COUNTERS))
            counters = {name: 0 for name in core.GATEWAY_COUNTERS}
            for name, value in conn.execute(
                f"SELECT name, value FROM counters WHERE name IN ({marks})", core.GATEWAY_COUNTERS
            ):
                # the collector's counters table may hold them as REAL; a damaged value counts as 0
                counters[name] = int(value) if type(value) in (int, float) and 0 <= value < 2**63 else 0
            since = self.high_last_seen - ACCOUNTS_SLACK_S
            account_rows = conn.execute(
                f"SELECT {SENSOR_COLUMNS} FROM sensors WHERE last_seen >= ? ORDER BY sensor",
                (since if since != float("-inf") else -1e300,),
            ).fetchall()
            changed = core.accounts_changed(self.published, account_rows)
            accounts = []
            for row in changed:
                gaps, total = self._gaps_of(conn, row[0], (row[5], row[7]))
                accounts.append(core.Accounts(self.gateway, row[0], last, *row[1:], gaps=gaps, gaps_total=total))
        finally:
            conn.execute("COMMIT")
        return Snapshot(entries, last, accounts, changed, blocks, origin, counters)

    def _gaps_of(self, conn: sqlite3.Connection, sensor: str, key: tuple) -> tuple[tuple[core.Gap, ...], int]:
        """The sensor's newest gaps (at most MAX_GAPS_PER_SNAPSHOT) and how many it has, read
        inside the caller's transaction unless its (lost, reordered) `key` is unchanged."""
        held = self._gaps.get(sensor)
        if held is not None and held[0] == key:
            return held[1], held[2]
        self.gap_queries += 1
        gaps = tuple(
            core.Gap(*g)
            for g in conn.execute(
                "SELECT stream, boot, first_seq, last_seq, missing, detected_at FROM gaps WHERE sensor = ? "
                "ORDER BY detected_at DESC, stream DESC, first_seq DESC LIMIT ?",
                (sensor, core.MAX_GAPS_PER_SNAPSHOT),
            )
        )
        total = len(gaps)
        if total == core.MAX_GAPS_PER_SNAPSHOT:
            total = conn.execute("SELECT count(*) FROM gaps WHERE sensor = ?", (sensor,)).fetchone()[0]
        if held is not None:
            del self._gaps[sensor]
            self._gaps_held -= len(held[1])
        if len(gaps) <= GAP_CACHE_PER_SENSOR and self._gaps_held + len(gaps) <= GAP_CACHE_TOTAL:
            self._gaps[sensor] = (key, gaps, total)
            self._gaps_held += len(gaps)
        return gaps, total

    def mark_published(self, rows: list[tuple]) -> None:
        for row in rows:
            self.published[row[0]] = tuple(row[1:])
            self.high_last_seen = max(self.high_last_seen, row[2])

    def pending(self, after_id: int) -> tuple[int, int, float | None]:
        """(entries, readings, committed time of the oldest) not yet acked."""
        n, readings, oldest = self.conn.execute(
            "SELECT count(*), total(readings), min(committed) FROM ingest_log WHERE id > ?", (after_id,)
        ).fetchone()
        return int(n), int(readings), oldest
