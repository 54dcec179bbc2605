"""The central database: what `telemetry-uplink consume` writes (the one module with its SQL).

It is an ordinary gateway-telemetry database (collector/schema.py creates and
migrates it), so `telemetry-query` answers for the whole fleet; each sensor's
id is prefixed by its gateway (`site-7:sim-0001`).  Writes are idempotent:

- readings are written as the collector writes them (storage v3: one
  ingest_log row per batch, heads closed into chunks), through the collector's
  own Store; every datagram taken is remembered in `uplink_seen` (sensor,
  boot, seq, ts), so a message delivered again after JetStream's duplicate window
  adds nothing, and the readings it repeated are counted in
  `counters.uplink_replayed_readings`;
- accounts are snapshots: one is applied only if its `as_of` (the gateway's
  ingest_log id when it was read) is not older than the one stored in
  `uplink_accounts`; older ones are counted in `uplink_stale_accounts`.

One transaction per batch of messages: the consumer acks them after COMMIT.
"""

from __future__ import annotations

import time
from collections import Counter

from .. import ingestlog, schema, store
from . import core

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
MARK_SEEN = "INSERT INTO uplink_seen (sensor, boot, seq, ts) VALUES (?, ?, ?, ?)"
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

COUNTERS = (
    "uplink_messages",
    "uplink_readings",
    "uplink_replayed_readings",
    "uplink_accounts",
    "uplink_stale_accounts",
) + tuple(f"uplink_rejected:{r}" for r in core.REASONS)


class Central:
    """The central database's one writer: the collector's Store, fed by messages instead of sockets."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.store = store.Store(path)
        try:
            loaded = self.store.load()
            self.conn = self.store.conn
            self.conn.execute("BEGIN")
            self.conn.execute(CREATE_ACCOUNTS)
            self.conn.execute(CREATE_SEEN)
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

    def close(self) -> None:
        self.store.close()

    def _series(self, sensor: str, metric: str) -> None:
        known = self.store.series[sensor]
        if metric not in known:
            known[metric] = self._next_series
            self._new_series.append((self._next_series, sensor, metric))
            self._next_series += 1

    def apply(
        self,
        items: list[core.Readings | core.Accounts | core.Columns | core.Snapshots],
        rejected: Counter | None = None,
        now: float | None = None,
    ) -> Counter:
        """Write a batch in one transaction; returns what it did (counter deltas)."""
        now = time.time() if now is None else now
        done: Counter = Counter()
        next_before = self._next_series
        self._new_series = []
        self._ensuring = set()
        groups: dict[tuple[str, int | None], list[ingestlog.Group]] = {}
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for item in items:
                done["uplink_messages"] += 1
                if isinstance(item, core.Readings):
                    self._readings(item, done, groups)
                elif isinstance(item, core.Columns):
                    for part in item.items:
                        self._readings(part, done, groups)
                elif isinstance(item, core.Snapshots):
                    for snapshot in item.items:
                        self._accounts(snapshot, done, now)
                else:
                    self._accounts(item, done, now)
            merged = [_merge(parts) for parts in groups.values()]
            closing = self.store.write_groups(conn, merged, now, self._new_series)
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
        self.store.committed_groups(merged, *closing)
        return done

    def _readings(
        self, item: core.Readings, done: Counter, groups: dict[tuple[str, int | None], list[ingestlog.Group]]
    ) -> None:
        sensor = core.central_sensor(item.gateway, item.sensor)
        conn = self.conn
        if sensor not in self._ensured and sensor not in self._ensuring:
            conn.execute(ENSURE_SENSOR, (sensor, min(item.received), max(item.received)))
            self._ensuring.add(sensor)
        boot = schema.NO_BOOT if item.boot is None else item.boot
        n = len(item.seqs)
        total = sum(len(values) - values.count(None) for values in item.metrics.values())
        keys = list(zip(item.seqs, item.ts))
        # The common case, nothing of it seen yet: one range probe and one executemany.  A sensor
        # without boot restarts its seqs under the same (sensor, boot): a datagram's identity
        # includes its ts, as the collector's did.
        lo, hi = min(item.seqs), max(item.seqs)
        seen = conn.execute(SEEN_IN_RANGE, (sensor, boot, lo, hi)).fetchall()
        if not seen and len(set(keys)) == n:
            conn.executemany(MARK_SEEN, [(sensor, boot, seq, ts) for seq, ts in keys])
            done["uplink_readings"] += total
            keep = None
        else:
            seen_set = set(seen)
            keep = []
            for i, key in enumerate(keys):
                if key not in seen_set:
                    seen_set.add(key)
                    keep.append(i)
            conn.executemany(MARK_SEEN, [(sensor, boot, *keys[i]) for i in keep])
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
