"""The central database: what `telemetry-uplink consume` writes (the one module with its SQL).

It is an ordinary gateway-telemetry database (collector/schema.py creates and
migrates it), so `telemetry-query` answers for the whole fleet; each sensor's
id is prefixed by its gateway (`site-7:sim-0001`).  Writes are idempotent:

- readings are written as the collector writes them (storage v3: one
  ingest_log row per batch, heads closed into chunks), through the collector's
  own Store; a row of payload-3 messages taken whole keeps their blocks' bodies
  as the gateways committed them (ingest_log body version 2: no value packed
  again), the arrays of their heads made from them in one pass (prepared.py).  Payload 3 names every block by its place in the gateway's log
  (database identity, row id, datagram offset): what was taken is kept as
  merged key ranges per (gateway, database) in `uplink_ranges` (ranges.py; one
  row while a gateway's rows arrive in order), so a message delivered again
  after JetStream's duplicate window adds nothing; payloads 1 and 2 carry no such
  names, and every datagram they bring is remembered in `uplink_seen` (sensor,
  boot, seq, ts) instead, and, for a gateway that sent payload 3 too (whose
  datagrams left no such rows), checked against what is held of the sensor
  (_held).  The readings a replay repeated are counted in
  `counters.uplink_replayed_readings`;
- accounts are snapshots: one is applied only if its `as_of` (the gateway's
  ingest_log id when it was read) is not older than the one stored in
  `uplink_accounts`; older ones are counted in `uplink_stale_accounts`.  The
  gateway's own drop counters (payload 3) likewise, per (gateway, database) in
  `uplink_gateways`, summed per gateway into `counters.gateway_<name>:<gateway>`.

One transaction per batch of messages: the consumer acks them after COMMIT.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections import Counter
from itertools import chain
from operator import itemgetter, methodcaller

import numpy as np

from .. import chunkstore, ingestlog, schema, store
from . import closer, core, prepared, ranges

log = logging.getLogger("uplink.consume")

# A retention step (Central.maintain) at most this often.
MAINTAIN_INTERVAL_S = 1.0

CREATE_ACCOUNTS = """
CREATE TABLE IF NOT EXISTS uplink_accounts (
    sensor TEXT PRIMARY KEY,
    gateway TEXT NOT NULL,
    as_of INTEGER NOT NULL,
    gaps_total INTEGER NOT NULL,
    updated REAL NOT NULL
)"""
CREATE_SEEN = """
CREATE TABLE IF NOT EXISTS uplink_seen (
    sensor TEXT NOT NULL,
    boot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (sensor, boot, seq, ts)
) WITHOUT ROWID"""
# The identities of payload-1/2 datagrams that came already older than the retention (never
# stored, so in no chunk whose deletion would take them): kept `retain` seconds after they came
# (until), so a redelivery meanwhile counts as replayed, not expired again; then trimmed.
CREATE_EXPIRED = """
CREATE TABLE IF NOT EXISTS uplink_expired (
    sensor TEXT NOT NULL,
    boot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (sensor, boot, seq, ts)
) WITHOUT ROWID"""
CREATE_EXPIRED_UNTIL = "CREATE INDEX IF NOT EXISTS uplink_expired_until ON uplink_expired (until)"
MARK_EXPIRED = "INSERT INTO uplink_expired (sensor, boot, seq, ts, until) VALUES (?, ?, ?, ?, ?)"
EXPIRED_IN_RANGE = "SELECT seq, ts FROM uplink_expired WHERE sensor = ? AND boot = ? AND seq BETWEEN ? AND ?"
TRIM_EXPIRED = """
DELETE FROM uplink_expired WHERE (sensor, boot, seq, ts) IN
    (SELECT sensor, boot, seq, ts FROM uplink_expired WHERE until < ? ORDER BY until LIMIT ?)"""
EXPIRED_PER_STEP = 50_000  # uplink_expired rows trimmed per retention step at most
CREATE_RANGES = """
CREATE TABLE IF NOT EXISTS uplink_ranges (
    gateway TEXT NOT NULL,
    origin TEXT NOT NULL,
    lo INTEGER NOT NULL,
    hi INTEGER NOT NULL,
    PRIMARY KEY (gateway, origin, lo)
) WITHOUT ROWID"""
CREATE_GATEWAYS = """
CREATE TABLE IF NOT EXISTS uplink_gateways (
    gateway TEXT NOT NULL,
    origin TEXT NOT NULL,
    as_of INTEGER NOT NULL,
    uplink_dropped INTEGER NOT NULL,
    budget_dropped INTEGER NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (gateway, origin)
)"""
# Messages the consumer could not write (a poison message: it passed the decoder and breaks a
# constraint), set aside with their payload so nothing is silently lost (consumer.py).  Log lines
# name a row by id and the operator deletes it once published again: AUTOINCREMENT (schema v7), so
# an id is never handed out twice.
CREATE_QUARANTINE = """
CREATE TABLE IF NOT EXISTS uplink_quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    gateway TEXT NOT NULL,
    subject TEXT NOT NULL,
    stream_seq INTEGER NOT NULL,
    error TEXT NOT NULL,
    payload BLOB NOT NULL
)"""
UPSERT_GATEWAY = """
INSERT INTO uplink_gateways (gateway, origin, as_of, uplink_dropped, budget_dropped, updated)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (gateway, origin) DO UPDATE SET as_of = excluded.as_of, uplink_dropped = excluded.uplink_dropped,
    budget_dropped = excluded.budget_dropped, updated = excluded.updated
"""
MARK_SEEN = "INSERT INTO uplink_seen (sensor, boot, seq, ts) VALUES (?, ?, ?, ?)"
FORGET_SEEN = "DELETE FROM uplink_seen WHERE sensor = ? AND boot = ? AND seq = ? AND ts = ?"
SEEN_IN_RANGE = "SELECT seq, ts FROM uplink_seen WHERE sensor = ? AND boot = ? AND seq BETWEEN ? AND ?"
ENSURE_SENSOR = "INSERT OR IGNORE INTO sensors (sensor, first_seen, last_seen) VALUES (?, ?, ?)"
UPSERT_SENSOR = """
INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings, lost, duplicates, reordered, restarts)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (sensor) DO UPDATE SET
    first_seen = excluded.first_seen, last_seen = excluded.last_seen, datagrams = excluded.datagrams,
    readings = excluded.readings, lost = excluded.lost, duplicates = excluded.duplicates,
    reordered = excluded.reordered, restarts = excluded.restarts
"""
UPSERT_ACCOUNTS_AS_OF = """
INSERT INTO uplink_accounts (sensor, gateway, as_of, gaps_total, updated) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (sensor) DO UPDATE SET as_of = excluded.as_of, gaps_total = excluded.gaps_total,
    updated = excluded.updated
"""
INSERT_GAP = """
INSERT OR REPLACE INTO gaps (sensor, stream, boot, first_seq, last_seq, missing, detected_at)
VALUES (?, ?, ?, ?, ?, ?, ?)"""
ADD_COUNTER = """
INSERT INTO counters (name, value) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"""
SET_COUNTER = "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)"

_SEQS, _TS, _RECEIVED, _METRICS = (itemgetter(i) for i in range(2, 6))

COUNTERS = (
    "uplink_messages",
    "uplink_readings",
    "uplink_replayed_readings",
    "uplink_accounts",
    "uplink_stale_accounts",
    "uplink_gone_rows",
    "uplink_quarantined",
    "uplink_expired_readings",
) + tuple(f"uplink_rejected:{r}" for r in core.REASONS)


# SQLite's primary result codes of a write that may succeed later unchanged.
TRANSIENT_CODES = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_PROTOCOL")


def transient(exc: BaseException) -> bool:
    """Whether a failed write is the database's state rather than the batch's content: busy or
    locked by another process, the disk full, an I/O error, or the system out of a resource."""
    if isinstance(exc, sqlite3.OperationalError):
        return (getattr(exc, "sqlite_errorname", None) or "").startswith(TRANSIENT_CODES)
    return isinstance(exc, (OSError, MemoryError))


INSERT_QUARANTINE = (
    "INSERT INTO uplink_quarantine (at, gateway, subject, stream_seq, error, payload) VALUES (?, ?, ?, ?, ?, ?)"
)
# How an operator looks at what was set aside (docs/OPERATIONS.md "A write that fails").
QUARANTINE_QUERY = (
    "SELECT id, at, gateway, subject, stream_seq, error, length(payload) AS bytes FROM uplink_quarantine ORDER BY id"
)


def summary(path: str, newest: int = 5) -> dict:
    """What `telemetry-uplink status --central` shows of a central database, read-only: the
    consumer's counters (COUNTERS, last_flush) and the `newest` messages set aside."""
    conn = schema.open_reader(path)
    try:
        counters = {name: 0 for name in COUNTERS}
        last_flush = None
        for name, value in conn.execute("SELECT name, value FROM counters"):
            if name in counters:
                counters[name] = int(value)
            elif name == "last_flush":
                last_flush = float(value)
        try:
            aside = conn.execute(
                "SELECT id, at, gateway, subject, stream_seq, error FROM uplink_quarantine ORDER BY id DESC LIMIT ?",
                (newest,),
            ).fetchall()
        except sqlite3.OperationalError:  # no such table: not a central database
            raise ValueError(
                f"{path}: not a central database (no uplink_quarantine table; see telemetry-uplink consume)"
            ) from None
    finally:
        conn.close()
    return dict(
        counters=counters,
        last_write=last_flush,
        set_aside=[dict(zip(("id", "at", "gateway", "subject", "stream_seq", "error"), row)) for row in aside],
    )


class Central:
    """The central database's one writer: the collector's Store, fed by messages instead of sockets."""

    def __init__(
        self,
        path: str,
        close_workers: int = 0,
        head_budget: int = store.HEAD_BUDGET_BYTES,
        max_heads: int | None = store.MAX_OPEN_HEADS,
        subject_prefix: str = "telemetry",
        retain: float = 0.0,
    ) -> None:
        self.path = path
        self.subject_prefix = subject_prefix  # of the payload-1 messages a refused chunk is set aside as
        # Raw readings received longer ago than this (seconds; 0: kept for ever) are deleted
        # (retention.py, a bounded step at most every MAINTAIN_INTERVAL_S: maintain), and such
        # datagrams that arrive are not stored, counted in uplink_expired_readings, as a TSDB
        # drops samples older than its retention: a replay of rows retention deleted (after the
        # duplicate window, from a gateway whose payload 2 is checked against what is held) is
        # not stored again.  Rollups are kept.
        self.retain = retain
        self._maintained_at = -math.inf
        self.store = store.Store(path, head_budget=head_budget, max_heads=max_heads, retain=retain, retain_1m=0.0)
        self.store.chunk_refused = self._chunk_refused
        # Past head_budget, heads close until the budget holds again, a few hundred each transaction,
        # not down to 3/4 of it (the collector's): that closed ~1,000 heads at once every ~7
        # transactions (~0.9 s of a worker), and the writer waited for the messages queued behind.
        self.store.budget_floor = 1.0
        self.store.maintenance.on_expire = self._forget_seen
        self.store.maintenance.on_step = self._forget_expired
        self._done: Counter = Counter()  # the transaction's counter deltas (for _chunk_refused)
        self._now = 0.0
        self._aside: list[str] = []  # what _chunk_refused set aside: said at ERROR after the COMMIT
        # With workers, heads close in other processes while this one writes (closer.py).
        self.closer = closer.Closer(close_workers) if close_workers > 0 else None
        self.store.close_later = self.closer
        try:
            loaded = self.store.load()
            self.conn = self.store.conn
            self.conn.execute("BEGIN")
            self.conn.execute(CREATE_ACCOUNTS)
            self.conn.execute(CREATE_SEEN)
            self.conn.execute(CREATE_EXPIRED)
            self.conn.execute(CREATE_EXPIRED_UNTIL)
            self.conn.execute(CREATE_RANGES)
            self.conn.execute(CREATE_GATEWAYS)
            self.conn.execute(CREATE_QUARANTINE)
            for name in COUNTERS:
                self.conn.execute("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", (name,))
            self.conn.execute("COMMIT")
        except BaseException:
            self.store.close()
            raise
        self._next_series = loaded.next_series_id
        self._new_series: list[tuple[int, str, str]] = []
        # Sensors known to have a row (committed); this batch's new ones join after its COMMIT.
        self._ensured: set[str] = {row[0] for row in self.conn.execute("SELECT sensor FROM sensors")}
        self._ensuring: set[str] = set()
        # (gateway, origin) -> what was taken (committed), loaded when first needed.
        self._ranges: dict[tuple[str, str], ranges.Ranges] = {}
        self._pending: dict[tuple[str, str], ranges.Ranges] = {}
        # gateway -> {(central sensor, boot): highest seq in uplink_seen}: the payload-1/2 datagrams
        # a payload-3 block must also be checked against (an uplink upgraded mid-round resends them).
        self._legacy: dict[str, dict[tuple[str, int], int]] = {}
        # Gateways known to have sent payload 3: their payload-1/2 datagrams are checked against
        # what is held, not only uplink_seen (_legacy_item).
        self._payload_3: set[str] = set()
        self._said_busy = False
        # retention_dropped and the others Store.maintain counts (it writes their totals)
        self._maintenance_counters: dict[str, float] = {
            name: value
            for name, value in self.conn.execute("SELECT name, value FROM counters")
            if name in store.MAINTENANCE_COUNTERS
        }

    def maintain(self, now: float | None = None) -> None:
        """With a retention: one bounded step of it (its own transaction; the scrub of chunk
        checksums too), at most every MAINTAIN_INTERVAL_S; a failure is said and tried again
        at the next (Store.maintain)."""
        now = time.time() if now is None else now
        if self.retain and now - self._maintained_at >= MAINTAIN_INTERVAL_S:
            self._maintained_at = now
            self.store.maintain(self._maintenance_counters, now)

    def _forget_seen(self, conn: sqlite3.Connection, chunk_ids: list[int]) -> None:
        """The uplink_seen rows of the datagrams in chunks the retention deletes (in its
        transaction).  Every one was received before the retention's cutoff, so a replay of it
        is refused by age (uplink_expired_readings) and its identity is no longer needed to keep
        it out: the table holds the payload-1/2 datagrams within the retention (those that came
        older than it go to uplink_expired instead: _readings; those of a chunk set aside go:
        _chunk_refused), not every one for good."""
        for chunk_id in chunk_ids:
            sensor, boot, blob = conn.execute(
                "SELECT sensor, boot, blob FROM chunks WHERE id = ?", (chunk_id,)
            ).fetchone()
            if not conn.execute(
                "SELECT 1 FROM uplink_seen WHERE sensor = ? AND boot = ? LIMIT 1", (sensor, boot)
            ).fetchone():
                continue  # payload 3 brought it (the usual case): no rows to look for
            try:
                seqs, ts, _, _ = chunkstore.decode_chunk(blob, metrics=(), received=False)
            except chunkstore.ChunkError:  # unreadable (chunk_faults): its rows stay, which lets nothing in
                continue
            conn.executemany(FORGET_SEEN, [(sensor, boot, seq, t) for seq, t in zip(seqs, ts)])
            self._legacy.pop(sensor.split(":", 1)[0], None)  # its highest seqs: read again when needed

    @staticmethod
    def _forget_expired(conn: sqlite3.Connection, now: float) -> None:
        """The uplink_expired rows past their time (in the retention step's transaction, a bounded
        number): a delivery of those datagrams after that counts in uplink_expired_readings again."""
        conn.execute(TRIM_EXPIRED, (now, EXPIRED_PER_STEP))

    def settle(self) -> None:
        """Insert the chunks of heads closed by the workers (a transaction of its own): when
        no message comes, so they do not wait for the next one."""
        if self.store.closed_later:
            most, self.store.closed_later_max = self.store.closed_later_max, 0
            try:
                self.apply([])
            finally:
                self.store.closed_later_max = most

    def close(self) -> None:
        try:
            if self.closer is not None:
                try:
                    self.settle()
                except Exception as exc:  # their datagrams are in the log: the next start closes them
                    log.warning("chunks of closed heads not written at exit (%s); they close at the next start", exc)
                self.closer.shutdown()
        finally:
            self.store.chunk_refused = None  # the cycle Central -> Store -> Central gone: freed by refcount
            self.store.maintenance.on_expire = None
            self.store.maintenance.on_step = None
            self.store.close()

    def quarantine(self, gateway: str, subject: str, stream_seq: int, error: str, payload: bytes, now: float) -> int:
        """Set a message aside (one transaction): its row in uplink_quarantine and the count in
        counters.uplink_quarantined; returns the row's id."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(INSERT_QUARANTINE, (now, gateway, subject, stream_seq, error[:1000], payload))
            conn.execute(ADD_COUNTER, ("uplink_quarantined", 1))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return int(cur.lastrowid or 0)

    def _series(self, sensor: str, metric: str) -> None:
        known = self.store.series[sensor]
        if metric not in known:
            known[metric] = self._next_series
            self._new_series.append((self._next_series, sensor, metric))
            self._next_series += 1

    def apply(
        self,
        items: list[core.Readings | core.Accounts | core.Columns | core.Snapshots | prepared.Prepared],
        rejected: Counter | None = None,
        now: float | None = None,
    ) -> Counter:
        """Write a batch in one transaction; returns what it did (counter deltas)."""
        now = time.time() if now is None else now
        done: Counter = Counter()
        self._done, self._now, self._aside = done, now, []
        next_before = self._next_series
        self._new_series = []
        self._ensuring = set()
        self._pending = {}
        groups: dict[tuple[str, int | None], list[ingestlog.Group]] = {}
        taken: dict[tuple[str, str, int | None], list[list]] = {}
        ready: list[prepared.Prepared] = []
        # The log row's groups in the order their messages came: the other messages' groups
        # (merged per key) between one prepared message and the next, and each prepared one's.
        order: list[dict[tuple[str, int | None], list[ingestlog.Group]] | prepared.Prepared] = []
        deferred: list[core.Readings] = []  # payload 1/2 of gateways that sent payload 3 (_legacy_item)
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for item in items:
                done["uplink_messages"] += 1
                if isinstance(item, core.Blocks):  # made ready here when every block is new (_columnar)
                    item = self._columnar(item) or item
                if isinstance(item, prepared.Prepared):
                    if item.payload is None or self._all_new(item):  # None: made here, all new
                        self._taken_groups(taken, done, groups)
                        if groups:
                            order.append(groups)
                        groups, taken = {}, {}
                        order.append(item)
                        ready.append(item)
                        done["uplink_readings"] += item.readings
                    else:
                        blocks = core.decode(item.payload)
                        assert isinstance(blocks, core.Blocks)  # a worker decoded it so
                        self._blocks(blocks, done, taken)
                elif isinstance(item, core.Blocks):
                    self._blocks(item, done, taken)
                elif isinstance(item, core.Readings):
                    self._legacy_item(item, done, groups, deferred)
                elif isinstance(item, core.Columns):
                    for part in item.items:
                        self._legacy_item(part, done, groups, deferred)
                elif isinstance(item, core.Snapshots):
                    for snapshot in item.items:
                        self._accounts(snapshot, done, now)
                    if item.origin is not None and item.counters is not None:
                        self._gateway_counters(item, done, now)
                else:
                    self._accounts(item, done, now)
            self._taken_groups(taken, done, groups)
            gathered = bool(deferred and ready)
            if gathered:  # payload 1/2 is checked against all of this transaction's groups: in one place
                combined: dict[tuple[str, int | None], list[ingestlog.Group]] = {}
                for segment in [*order, groups]:
                    if not isinstance(segment, prepared.Prepared):
                        for key, parts in segment.items():
                            combined.setdefault(key, []).extend(parts)
                groups = combined
                order = [segment for segment in order if isinstance(segment, prepared.Prepared)]
            for part in deferred:  # after this transaction's payload-3 groups: checked against them too
                self._readings(part, done, groups, ready)
            for (gateway, origin), pending in self._pending.items():
                conn.execute("DELETE FROM uplink_ranges WHERE gateway = ? AND origin = ?", (gateway, origin))
                conn.executemany(
                    "INSERT INTO uplink_ranges (gateway, origin, lo, hi) VALUES (?, ?, ?, ?)",
                    [(gateway, origin, lo, hi) for lo, hi in pending.items()],
                )
            if groups and gathered:  # before the prepared messages' groups, as they all were
                order.insert(0, groups)
            elif groups:
                order.append(groups)
            if self.retain:  # what is older than the retention is not stored (counted)
                cutoff = now - self.retain
                order = [s if isinstance(s, prepared.Prepared) else _unexpired(s, cutoff, done) for s in order]
            merged: list[ingestlog.Group] = []
            body = None
            if not ready:
                for segment in order:
                    assert not isinstance(segment, prepared.Prepared)
                    merged += [_merge(parts) for parts in segment.values()]
                known = (sum(len(g.seqs) for g in merged), done["uplink_readings"])  # readings counted as taken
            else:
                # A (sensor, boot) may have a group from several segments, in the order they came;
                # the body (version 2) keeps the prepared messages' blocks as they came, each
                # with its gateway's prefix, and packs the other segments' groups.
                refs: list[tuple[str, bytes]] = []
                datagrams = 0
                new = self._new_sensors(ready)
                for segment in order:
                    if isinstance(segment, prepared.Prepared):
                        prefix = core.central_sensor(segment.gateway, "")
                        refs += [(prefix, b) for b in segment.bodies]
                        datagrams += segment.datagrams
                        merged += self._prepared_groups(segment, new)
                    else:
                        part = [_merge(parts) for parts in segment.values()]
                        refs.append(("", ingestlog.encode_body(part)))
                        datagrams += sum(len(g.seqs) for g in part)
                        merged += part
                self._series_of(merged)
                body = ingestlog.encode_refs(refs)
                known = (datagrams, done["uplink_readings"])
            closing = self.store.write_groups(conn, merged, now, self._new_series, known, body)
            for reason, n in (rejected or {}).items():
                done[f"uplink_rejected:{reason}"] += n
            for name, n in done.items():
                conn.execute(ADD_COUNTER, (name, n))
            conn.execute(SET_COUNTER, ("last_flush", now))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for _, sensor, metric in self._new_series:  # ids handed out in vain
                self.store.series[sensor].pop(metric, None)
            self._next_series = next_before
            raise
        self._ensured |= self._ensuring
        if self.store.closed_busy and not self._said_busy:
            self._said_busy = True
            log.warning(
                "more sensors (and boots) write per transaction than max-heads (%d) lets stay open: heads still "
                "being written close early into small chunks (more CPU and disk per reading); raise max-heads "
                "(said once)",
                self.store.max_heads,
            )
        self._ranges.update(self._pending)
        self.store.committed_groups(merged, *closing)
        for line in self._aside:
            log.error("%s", line)
        return done

    def _chunk_refused(self, conn, head: chunkstore.Head, exc: Exception) -> None:
        """A closing head whose chunk the database refuses (twice, the second closed here) while
        it takes the rest of the transaction: its datagrams set aside in uplink_quarantine as
        payload-1 readings messages (stream sequence 0: made here, not taken from the stream),
        ready to be published again once the cause is fixed; counted in uplink_quarantined and
        said at ERROR after the COMMIT.  A failure of the database itself (transient) raises:
        the transaction is tried again as a whole."""
        if transient(exc):
            raise exc
        gateway, _, local = head.sensor.partition(":")
        columns = {name: column.tolist() for name, column in head.metrics.items()}
        metrics = {}
        for name, values in columns.items():
            column = [None if v != v else v for v in values]  # NaN: the datagram did not carry it
            if column.count(None) != len(column):
                metrics[name] = column
        item = core.Readings(
            gateway,
            local,
            None if head.boot == schema.NO_BOOT else head.boot,
            head.seqs.tolist(),
            head.ts.tolist(),
            head.received.tolist(),
            metrics,
        )
        error = f"{exc.__class__.__name__}: {exc}"
        if conn.execute(
            "SELECT 1 FROM uplink_seen WHERE sensor = ? AND boot = ? LIMIT 1", (head.sensor, head.boot)
        ).fetchone():
            # Payload 1/2 brought some: their identities go with the chunk, or the message published
            # again from uplink_quarantine would be taken for a replay and stored nowhere.
            conn.executemany(FORGET_SEEN, [(head.sensor, head.boot, s, t) for s, t in zip(head.seqs, head.ts)])
            self._legacy.pop(gateway, None)
        ids = []
        for m in core.readings_messages(self.subject_prefix, item):
            cur = conn.execute(INSERT_QUARANTINE, (self._now, gateway, m.subject, 0, error[:1000], m.payload))
            ids.append(int(cur.lastrowid or 0))
        self._done["uplink_quarantined"] += len(ids)
        self._aside.append(
            f"set aside {len(head)} datagrams of {head.sensor} boot {head.boot} whose chunk cannot be written "
            f"({error}): kept in uplink_quarantine id {', '.join(map(str, ids))} as payload-1 messages (publish "
            "them again once the cause is fixed), the rest written"
        )

    def _legacy_item(
        self,
        item: core.Readings,
        done: Counter,
        groups: dict[tuple[str, int | None], list[ingestlog.Group]],
        deferred: list[core.Readings],
    ) -> None:
        """A payload-1/2 sensor's datagrams: taken now by their uplink_seen rows, or, when the
        gateway has sent payload 3 (what that stored left no uplink_seen rows), deferred until
        this transaction's payload-3 groups are gathered and checked against what is stored."""
        if self._sent_payload_3(item.gateway):
            deferred.append(item)
        else:
            self._readings(item, done, groups)

    def _sent_payload_3(self, gateway: str) -> bool:
        """Whether payload-3 blocks of `gateway` were taken (committed, or in this transaction)."""
        if gateway in self._payload_3:
            return True
        if (
            any(key[0] == gateway for key in chain(self._ranges, self._pending))
            or self.conn.execute("SELECT 1 FROM uplink_ranges WHERE gateway = ? LIMIT 1", (gateway,)).fetchone()
        ):
            self._payload_3.add(gateway)  # a rolled-back transaction leaves it: only a slower check
            return True
        return False

    def _held(
        self,
        sensor: str,
        boot: int | None,
        lo: int,
        hi: int,
        received: list[float],
        groups: dict[tuple[str, int | None], list[ingestlog.Group]],
        ready: list[prepared.Prepared],
    ) -> list[tuple[int, float]]:
        """(seq, ts) of the datagrams of (central sensor, boot) with seqs lo..hi held here,
        whatever brought them: in chunks (those whose receive times meet `received`'s), the
        open head, heads closing in the workers, and this transaction's groups."""
        b = schema.NO_BOOT if boot is None else boot
        out: list[tuple[int, float]] = []

        def add(seqs, ts) -> None:
            out.extend((s, t) for s, t in zip(seqs, ts) if lo <= s <= hi)

        for (blob,) in self.conn.execute(
            "SELECT blob FROM chunks WHERE sensor = ? AND boot = ? AND first_received <= ? AND last_received >= ?",
            (sensor, b, max(received), min(received)),
        ):
            try:
                seqs, ts, _, _ = chunkstore.decode_chunk(blob, metrics=(), received=False)
            except chunkstore.ChunkError:  # its readings are unreadable (chunk_faults): none to double
                continue
            add(seqs, ts)
        heads = [self.store.heads.get((sensor, b))]
        heads += [h for closing, _, _ in self.store.closed_later for h in closing if (h.sensor, h.boot) == (sensor, b)]
        for head in heads:
            if head is not None:
                add(head.seqs, head.ts)
        for g in groups.get((sensor, boot), ()):
            add(g.seqs, g.ts)
        for p in ready:
            for k, key in enumerate(p.keys):
                if key == (sensor, boot):
                    a, z = p.bounds[k], p.bounds[k + 1]
                    add(memoryview(p.seqs).cast("q")[a:z], memoryview(p.ts).cast("d")[a:z])
        return out

    def _readings(
        self,
        item: core.Readings,
        done: Counter,
        groups: dict[tuple[str, int | None], list[ingestlog.Group]],
        ready: list[prepared.Prepared] | None = None,
    ) -> None:
        """A payload-1/2 sensor's datagrams not seen before (uplink_seen; with `ready`, the
        payload-3 transaction's, also what is held: _held), marked seen and gathered in groups."""
        sensor = core.central_sensor(item.gateway, item.sensor)
        conn = self.conn
        if sensor not in self._ensured and sensor not in self._ensuring:
            conn.execute(ENSURE_SENSOR, (sensor, min(item.received), max(item.received)))
            self._ensuring.add(sensor)
        self._legacy.pop(item.gateway, None)  # uplink_seen changes: payload 3 reads it again
        boot = schema.NO_BOOT if item.boot is None else item.boot
        n = len(item.seqs)
        total = sum(len(values) - values.count(None) for values in item.metrics.values())
        keys = list(zip(item.seqs, item.ts))
        # The common case, nothing of it seen yet: one range probe and one executemany.  A sensor
        # without boot restarts its seqs under the same (sensor, boot): a datagram's identity
        # includes its ts, as the collector's did.
        lo, hi = min(item.seqs), max(item.seqs)
        seen = conn.execute(SEEN_IN_RANGE, (sensor, boot, lo, hi)).fetchall()
        if ready is not None:  # payload 3 stored datagrams of this gateway without uplink_seen rows
            seen += self._held(sensor, item.boot, lo, hi, item.received, groups, ready)
        # A datagram received before the retention's cutoff is not stored (_unexpired): its
        # identity goes into uplink_expired, trimmed `retain` after it came, not uplink_seen,
        # whose rows go with the chunks the retention deletes (this one is in none).
        cutoff = self._now - self.retain if self.retain and min(item.received) < self._now - self.retain else None
        if cutoff is not None:
            seen += conn.execute(EXPIRED_IN_RANGE, (sensor, boot, lo, hi)).fetchall()
        if not seen and len(set(keys)) == n:
            if cutoff is None:
                conn.executemany(MARK_SEEN, [(sensor, boot, seq, ts) for seq, ts in keys])
            else:
                self._mark(sensor, boot, keys, range(n), item.received, cutoff)
            done["uplink_readings"] += total
            keep = None
        else:
            seen_set = set(seen)
            keep = []
            for i, key in enumerate(keys):
                if key not in seen_set:
                    seen_set.add(key)
                    keep.append(i)
            if cutoff is None:
                conn.executemany(MARK_SEEN, [(sensor, boot, *keys[i]) for i in keep])
            else:
                self._mark(sensor, boot, keys, keep, item.received, cutoff)
            taken = sum(sum(values[i] is not None for values in item.metrics.values()) for i in keep)
            done["uplink_readings"] += taken
            done["uplink_replayed_readings"] += total - taken
            if not keep:
                return
        if keep is None:
            metrics = {}
            for metric, column in item.metrics.items():
                if column.count(None) != n:
                    self._series(sensor, metric)
                    metrics[metric] = column
            group = ingestlog.Group(sensor, item.boot, item.seqs, item.ts, item.received, metrics)
        else:
            metrics = {}
            for metric, values in item.metrics.items():
                column = [values[i] for i in keep]
                if any(v is not None for v in column):
                    self._series(sensor, metric)
                    metrics[metric] = column
            group = ingestlog.Group(
                sensor,
                item.boot,
                [item.seqs[i] for i in keep],
                [item.ts[i] for i in keep],
                [item.received[i] for i in keep],
                metrics,
            )
        groups.setdefault((sensor, item.boot), []).append(group)

    def _mark(self, sensor: str, boot: int, keys: list, taken, received: list[float], cutoff: float) -> None:
        """Remember the datagrams `taken` (positions in keys): in uplink_seen, or, those received
        before `cutoff` (not stored), in uplink_expired until `retain` from now."""
        until = self._now + self.retain
        self.conn.executemany(MARK_SEEN, [(sensor, boot, *keys[i]) for i in taken if received[i] >= cutoff])
        self.conn.executemany(MARK_EXPIRED, [(sensor, boot, *keys[i], until) for i in taken if received[i] < cutoff])

    # ------------------------------------------------------------ payload 3

    def _all_new(self, item: prepared.Prepared) -> bool:
        """Whether a prepared message is taken as it is: every block new (in increasing order, so
        none covers another), no rows gone, no payload-1/2 datagrams of its gateway to check
        against; then its blocks are marked taken."""
        if item.gone or self._legacy_of(item.gateway):
            return False
        if self.retain and min(memoryview(item.received).cast("d")) < self._now - self.retain:
            return False  # some are older than the retention: taken block by block, and dropped
        r = self._ranges_of((item.gateway, item.origin))
        below = -1
        for lo, hi in item.spans:
            if lo <= below or r.uncovered(lo, hi) != [(lo, hi)]:
                return False
            below = hi
        for lo, hi in item.spans:
            r.add(lo, hi)
        return True

    # Payload-3 messages the writer decoded are made ready here as a worker makes them
    # (prepared.from_blocks: arrays, no Python step per value) when every block is new; False:
    # taken block by block and merged per key (_blocks, _taken_groups), as before session 8
    # (tests/test_uplink_prepared.py holds the two to the same database).
    columnar = True

    def _columnar(self, item: core.Blocks) -> prepared.Prepared | None:
        """A decoded payload-3 message as a Prepared, its blocks marked taken, when it would be
        taken as it is (_all_new); None otherwise (block by block, as a replay must be)."""
        if not self.columnar or item.gone or not item.blocks or self._legacy_of(item.gateway):
            return None
        try:
            made = prepared.from_blocks(item)
        except (OverflowError, ValueError, TypeError):  # a value arrays cannot hold: the way that says so
            return None
        if not self._all_new(made):
            return None
        made.payload = None
        return made

    def _new_sensors(self, ready: list[prepared.Prepared]) -> dict[str, tuple[float, float]]:
        """The sensors of the prepared messages that have no row yet: the receive times their
        first (sensor, boot) spans over all of them (what the row is made with when the
        transaction's groups are merged per key)."""
        out: dict[str, tuple[float, float]] = {}
        first: dict[str, tuple[str, int | None]] = {}
        have = self._ensured | self._ensuring
        for p in ready:
            if have.issuperset(map(itemgetter(0), p.keys)):
                continue
            received = np.frombuffer(p.received, np.float64)
            lows = np.minimum.reduceat(received, p.bounds[:-1]).tolist()
            highs = np.maximum.reduceat(received, p.bounds[:-1]).tolist()
            for key, lo, hi in zip(p.keys, lows, highs):
                sensor = key[0]
                if sensor in have or first.setdefault(sensor, key) != key:
                    continue
                was = out.get(sensor)
                out[sensor] = (lo, hi) if was is None else (min(was[0], lo), max(was[1], hi))
        return out

    def _prepared_groups(self, item: prepared.Prepared, new: dict[str, tuple[float, float]]) -> list[ingestlog.Group]:
        """A prepared message's groups (one per key), with the sensor rows they need (`new`:
        _new_sensors); their series are numbered once all are gathered (_series_of)."""
        conn = self.conn
        groups = item.groups()
        for g in groups:
            sensor = g.sensor
            if sensor not in self._ensured and sensor not in self._ensuring:
                conn.execute(ENSURE_SENSOR, (sensor, *new[sensor]))
                self._ensuring.add(sensor)
        return groups

    def _series_of(self, merged: list[ingestlog.Group]) -> None:
        """The series the transaction's groups need, numbered as when its groups are merged per
        key: key by key in order of first appearance, each key's metrics in the order its groups
        first name them."""
        series = self.store.series
        for g in merged:  # the usual case: every metric known (two lookups a group)
            known = series[g.sensor]
            if not all(map(known.__contains__, g.metrics)):
                break
        else:
            return
        names: dict[tuple[str, int | None], dict[str, None]] = {}
        for g in merged:
            key = (g.sensor, g.boot)
            named = names.get(key)
            if named is None:
                names[key] = dict.fromkeys(g.metrics)
            else:
                named.update(dict.fromkeys(g.metrics))
        for (sensor, _), named in names.items():
            known = series[sensor]
            for name in named:
                if name not in known:
                    self._series(sensor, name)

    def _ranges_of(self, key: tuple[str, str]) -> ranges.Ranges:
        """This transaction's copy of what was taken from (gateway, origin)."""
        r = self._pending.get(key)
        if r is None:
            committed = self._ranges.get(key)
            if committed is None:
                committed = self._ranges[key] = ranges.Ranges(
                    self.conn.execute(
                        "SELECT lo, hi FROM uplink_ranges WHERE gateway = ? AND origin = ? ORDER BY lo", key
                    ).fetchall()
                )
            r = self._pending[key] = committed.copy()
        return r

    def _blocks(self, item: core.Blocks, done: Counter, taken: dict[tuple[str, str, int | None], list[list]]) -> None:
        """The blocks not taken before: their groups gathered per (gateway, sensor, boot) in
        `taken` (merged once per transaction, _taken_groups); the rows the gateway says are gone
        are covered too (counted once in uplink_gone_rows)."""
        r = self._ranges_of((item.gateway, item.origin))
        for first, last in item.gone:
            lo, hi = ranges.rows_range(first, last)
            seen_id = 0
            for a, b in r.uncovered(lo, hi):  # whole rows never taken: count each id once
                a_id, b_id = max(a >> ranges.OFFSET_BITS, seen_id + 1), b >> ranges.OFFSET_BITS
                if b_id >= a_id:
                    done["uplink_gone_rows"] += b_id - a_id + 1
                    seen_id = b_id
            r.add(lo, hi)
        gateway = item.gateway
        for block in item.blocks:
            lo, hi = block.range
            new = r.uncovered(lo, hi)
            if not new:
                done["uplink_replayed_readings"] += block.readings
                continue
            r.add(lo, hi)
            groups = block.groups
            if new != [(lo, hi)]:
                groups = _keep(groups, lo, new)
                kept = sum(len(v) - v.count(None) for g in groups for v in g[5].values())
                done["uplink_replayed_readings"] += block.readings - kept
            for g in groups:  # one step per group: the merging runs per key, at C speed
                key = (gateway, g[0], g[1])
                parts = taken.get(key)
                if parts is None:
                    taken[key] = [g]
                else:
                    parts.append(g)

    def _legacy_of(self, gateway: str) -> dict[tuple[str, int], int]:
        """{(central sensor, boot): highest seq} of this gateway's datagrams in uplink_seen."""
        legacy = self._legacy.get(gateway)
        if legacy is None:
            legacy = self._legacy[gateway] = {
                (sensor, boot): seq
                for sensor, boot, seq in self.conn.execute(
                    "SELECT sensor, boot, max(seq) FROM uplink_seen WHERE sensor >= ? AND sensor < ? GROUP BY sensor, boot",
                    (gateway + ":", gateway + ";"),
                )
            }
        return legacy

    def _not_seen_before(self, sensor: str, g: list) -> list | None:
        """A payload-3 group without the datagrams a payload 1 or 2 message brought before (an
        uplink upgraded in the middle of a round sends them again); None if nothing is left."""
        _, boot, seqs, ts, received, metrics = g
        b = schema.NO_BOOT if boot is None else boot
        high = self._legacy_of(sensor.split(":", 1)[0]).get((sensor, b))
        if high is None or min(seqs) > high:
            return g
        seen = set(self.conn.execute(SEEN_IN_RANGE, (sensor, b, min(seqs), max(seqs))).fetchall())
        keep = [i for i, key in enumerate(zip(seqs, ts)) if key not in seen]
        if len(keep) == len(seqs):
            return g
        if not keep:
            return None
        kept = {}
        for name, values in metrics.items():
            column = [values[i] for i in keep]
            if column.count(None) != len(column):
                kept[name] = column
        return [g[0], boot, [seqs[i] for i in keep], [ts[i] for i in keep], [received[i] for i in keep], kept]

    def _taken_groups(
        self,
        taken: dict[tuple[str, str, int | None], list[list]],
        done: Counter,
        groups: dict[tuple[str, int | None], list[ingestlog.Group]],
    ) -> None:
        """The payload-3 groups taken, merged into one log group per (central sensor, boot), in
        the order they came (commit order within each)."""
        conn = self.conn
        for (gateway, local, boot), parts in taken.items():
            sensor = f"{gateway}:{local}"
            if len(parts) == 1:
                _, _, seqs, ts, received, metrics = parts[0]
            else:
                seqs = list(chain.from_iterable(map(_SEQS, parts)))
                ts = list(chain.from_iterable(map(_TS, parts)))
                received = list(chain.from_iterable(map(_RECEIVED, parts)))
                maps = list(map(_METRICS, parts))
                n = len(seqs)
                # Every group has the first one's metrics when each merged column is as long as
                # the merged seqs and the groups hold no other names (checked at C speed).
                metrics = {
                    name: list(chain.from_iterable(map(methodcaller("get", name, ()), maps))) for name in maps[0]
                }
                if sum(map(len, maps)) != len(metrics) * len(maps) or any(len(c) != n for c in metrics.values()):
                    # metrics that some groups lack: None where a datagram did not carry one
                    metrics = {}
                    for name in dict.fromkeys(chain.from_iterable(maps)):
                        column: list = []
                        for g in parts:
                            values = g[5].get(name)
                            column += values if values is not None else [None] * len(g[2])
                        metrics[name] = column
            if self._legacy_of(gateway):
                kept = self._not_seen_before(sensor, [local, boot, seqs, ts, received, metrics])
                if kept is None:
                    done["uplink_replayed_readings"] += sum(len(v) - v.count(None) for v in metrics.values())
                    continue
                if len(kept[2]) != len(seqs):
                    done["uplink_replayed_readings"] += sum(len(v) - v.count(None) for v in metrics.values())
                    done["uplink_replayed_readings"] -= sum(len(v) - v.count(None) for v in kept[5].values())
                    _, _, seqs, ts, received, metrics = kept
            if sensor not in self._ensured and sensor not in self._ensuring:
                conn.execute(ENSURE_SENSOR, (sensor, min(received), max(received)))
                self._ensuring.add(sensor)
            n = len(seqs)
            present = {}
            readings = 0
            for name, column in metrics.items():
                count = n - column.count(None)
                if count:
                    self._series(sensor, name)
                    present[name] = column
                    readings += count
            done["uplink_readings"] += readings
            groups.setdefault((sensor, boot), []).append(ingestlog.Group(sensor, boot, seqs, ts, received, present))

    def _gateway_counters(self, item: core.Snapshots, done: Counter, now: float) -> None:
        """The gateway's drop counters, newest snapshot wins per (gateway, database); the sums
        over its databases go to counters.gateway_<name>:<gateway>."""
        row = self.conn.execute(
            "SELECT as_of FROM uplink_gateways WHERE gateway = ? AND origin = ?", (item.gateway, item.origin)
        ).fetchone()
        if row is not None and row[0] > item.as_of:
            done["uplink_stale_accounts"] += 1
            return
        counters = item.counters or {}
        self.conn.execute(
            UPSERT_GATEWAY,
            (
                item.gateway,
                item.origin,
                item.as_of,
                counters.get("uplink_dropped", 0),
                counters.get("budget_dropped", 0),
                now,
            ),
        )
        sums = self.conn.execute(
            "SELECT total(uplink_dropped), total(budget_dropped) FROM uplink_gateways WHERE gateway = ?",
            (item.gateway,),
        ).fetchone()
        for name, value in zip(core.GATEWAY_COUNTERS, sums):
            # total() is a float, and counters.value is REAL: a sum past int64 is still one
            self.conn.execute(SET_COUNTER, (f"gateway_{name}:{item.gateway}", value))

    def _accounts(self, item: core.Accounts, done: Counter, now: float) -> None:
        sensor = core.central_sensor(item.gateway, item.sensor)
        row = self.conn.execute("SELECT as_of FROM uplink_accounts WHERE sensor = ?", (sensor,)).fetchone()
        if row is not None and row[0] > item.as_of:
            done["uplink_stale_accounts"] += 1
            return
        self.conn.execute(UPSERT_SENSOR, (sensor, *item.counts()))
        self.conn.execute(UPSERT_ACCOUNTS_AS_OF, (sensor, item.gateway, item.as_of, item.gaps_total, now))
        self.conn.execute("DELETE FROM gaps WHERE sensor = ?", (sensor,))
        self.conn.executemany(
            INSERT_GAP,
            [(sensor, g.stream, g.boot, g.first_seq, g.last_seq, g.missing, g.detected_at) for g in item.gaps],
        )
        done["uplink_accounts"] += 1


def _unexpired(
    segment: dict[tuple[str, int | None], list[ingestlog.Group]], cutoff: float, done: Counter
) -> dict[tuple[str, int | None], list[ingestlog.Group]]:
    """The groups without their datagrams received before `cutoff` (the retention's): those are
    counted in uplink_expired_readings instead of uplink_readings."""
    out: dict[tuple[str, int | None], list[ingestlog.Group]] = {}
    for key, parts in segment.items():
        kept = []
        for g in parts:
            if min(g.received) >= cutoff:
                kept.append(g)
                continue
            keep = [i for i, r in enumerate(g.received) if r >= cutoff]
            metrics = {}
            for name, values in g.metrics.items():
                column = [values[i] for i in keep]
                expired = len(values) - values.count(None) - (len(column) - column.count(None))
                done["uplink_readings"] -= expired
                done["uplink_expired_readings"] += expired
                if column.count(None) != len(column):
                    metrics[name] = column
            if keep:
                kept.append(
                    ingestlog.Group(
                        g.sensor,
                        g.boot,
                        [g.seqs[i] for i in keep],
                        [g.ts[i] for i in keep],
                        [g.received[i] for i in keep],
                        metrics,
                    )
                )
        if kept:
            out[key] = kept
    return out


def _merge(parts: list[ingestlog.Group]) -> ingestlog.Group:
    """One group per (sensor, boot) in a log row: several messages' datagrams, columns aligned."""
    if len(parts) == 1:
        return parts[0]
    names = list(dict.fromkeys(name for g in parts for name in g.metrics))
    metrics = {name: [v for g in parts for v in g.metrics.get(name, [None] * len(g.seqs))] for name in names}
    first = parts[0]
    return ingestlog.Group(
        first.sensor,
        first.boot,
        [s for g in parts for s in g.seqs],
        [t for g in parts for t in g.ts],
        [r for g in parts for r in g.received],
        metrics,
    )


def _keep(groups: list[list], lo: int, new: list[tuple[int, int]]) -> list[list]:
    """The datagrams of a block (its first at key `lo`) whose keys fall in the ranges `new`."""
    wanted = [(a - lo, b - lo) for a, b in new]  # positions in the block, in order
    out = []
    at = 0
    for g in groups:
        sensor, boot, seqs, ts, received, metrics = g
        n = len(seqs)
        keep = [i for a, b in wanted for i in range(max(a - at, 0), min(b - at, n - 1) + 1)]
        at += n
        if not keep:
            continue
        if len(keep) == n:
            out.append(g)
            continue
        kept = {}
        for name, values in metrics.items():
            column = [values[i] for i in keep]
            if column.count(None) != len(column):
                kept[name] = column
        out.append([sensor, boot, [seqs[i] for i in keep], [ts[i] for i in keep], [received[i] for i in keep], kept])
    return out
