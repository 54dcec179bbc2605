"""The central database: what `telemetry-uplink consume` writes (the one module with its SQL).

It is an ordinary gateway-telemetry database (collector/schema.py creates and
migrates it), so `telemetry-query` answers for the whole fleet; each sensor's
id is prefixed by its gateway (`site-7:sim-0001`).  Writes are idempotent:

- a reading is keyed by (series, ts, boot, seq), so a message delivered again
  after JetStream's duplicate window inserts nothing (INSERT OR IGNORE), and
  the rows it repeated are counted in `counters.uplink_replayed_readings`;
- accounts are snapshots: one is applied only if its `as_of` (the gateway's
  ingest_log id when it was read) is not older than the one stored in
  `uplink_accounts`; older ones are counted in `uplink_stale_accounts`.

One transaction per batch of messages: the consumer acks them after COMMIT.
"""

from __future__ import annotations

import time
from collections import Counter

from .. import schema, store
from . import core

CREATE_ACCOUNTS = """
CREATE TABLE IF NOT EXISTS uplink_accounts (
    sensor TEXT PRIMARY KEY,
    gateway TEXT NOT NULL,
    as_of INTEGER NOT NULL,
    gaps_total INTEGER NOT NULL,
    updated REAL NOT NULL
)"""
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

COUNTERS = ("uplink_messages", "uplink_readings", "uplink_replayed_readings", "uplink_accounts",
            "uplink_stale_accounts") + tuple(f"uplink_rejected:{r}" for r in core.REASONS)


class Central:
    """The central database's one writer."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock_fd = schema.lock_writer(path)
        try:
            self.db = schema.open_writer(path)
        except BaseException:
            import os

            os.close(self._lock_fd)
            raise
        self.conn = self.db.conn
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute(CREATE_ACCOUNTS)
            for name in COUNTERS:
                self.conn.execute("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", (name,))
        self.series = {(s, m): i for i, s, m in self.conn.execute("SELECT id, sensor, metric FROM series")}
        self._next_series = max(self.series.values(), default=0) + 1

    def close(self) -> None:
        import os

        self.conn.close()
        os.close(self._lock_fd)

    def _series(self, sensor: str, metric: str) -> int:
        key = (sensor, metric)
        sid = self.series.get(key)
        if sid is None:
            sid = self._next_series
            self.conn.execute("INSERT INTO series (id, sensor, metric) VALUES (?, ?, ?)", (sid, sensor, metric))
            self.series[key] = sid
            self._next_series += 1
        return sid

    def apply(self, items: list[core.Readings | core.Accounts], rejected: Counter | None = None,
              now: float | None = None) -> Counter:
        """Write a batch in one transaction; returns what it did (counter deltas)."""
        now = time.time() if now is None else now
        done: Counter = Counter()
        series_before = dict(self.series)
        next_before = self._next_series
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for item in items:
                done["uplink_messages"] += 1
                if isinstance(item, core.Readings):
                    self._readings(item, done)
                else:
                    self._accounts(item, done, now)
            for reason, n in (rejected or {}).items():
                done[f"uplink_rejected:{reason}"] += n
            for name, n in done.items():
                conn.execute(ADD_COUNTER, (name, n))
            conn.execute(SET_COUNTER, ("last_flush", now))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            self.series = series_before
            self._next_series = next_before
            raise
        return done

    def _readings(self, item: core.Readings, done: Counter) -> None:
        sensor = core.central_sensor(item.gateway, item.sensor)
        self.conn.execute(ENSURE_SENSOR, (sensor, min(item.received), max(item.received)))
        boot = schema.NO_BOOT if item.boot is None else item.boot
        rows = []
        append = rows.append
        for metric, values in item.metrics.items():
            sid = self._series(sensor, metric)
            for seq, ts, received, value in zip(item.seqs, item.ts, item.received, values):
                if value is not None:
                    append((sid, ts, boot, seq, value, received))  # the value as the collector stores it
        # The collector's own insert (INSERT OR IGNORE, 64 rows per statement): returns the rows that were new.
        stored = store._insert_readings(self.conn, rows) if rows else 0
        done["uplink_readings"] += stored
        done["uplink_replayed_readings"] += len(rows) - stored

    def _accounts(self, item: core.Accounts, done: Counter, now: float) -> None:
        sensor = core.central_sensor(item.gateway, item.sensor)
        row = self.conn.execute("SELECT as_of FROM uplink_accounts WHERE sensor = ?", (sensor,)).fetchone()
        if row is not None and row[0] > item.as_of:
            done["uplink_stale_accounts"] += 1
            return
        self.conn.execute(UPSERT_SENSOR, (sensor, *item.counts()))
        self.conn.execute(UPSERT_ACCOUNTS_AS_OF, (sensor, item.gateway, item.as_of, item.gaps_total, now))
        self.conn.execute("DELETE FROM gaps WHERE sensor = ?", (sensor,))
        self.conn.executemany(INSERT_GAP, [(sensor, g.stream, g.boot, g.first_seq, g.last_seq, g.missing,
                                            g.detected_at) for g in item.gaps])
        done["uplink_accounts"] += 1
