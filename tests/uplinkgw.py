"""A gateway database for the uplink tests, written the way the collector commits:
one transaction per flush holding the ingest_log row (collector/ingestlog.py: what the
uplink reads) and the sensors' accounts and gaps.  A real SQLite file and a real
writer.  It writes no readings table: what the central side must end up with is
every datagram of the ingest log, exactly once (`log_readings`), whatever the
storage version keeps the readings in.
"""

from __future__ import annotations

import random
import sqlite3

from collector import ingestlog, schema
from collector.ingestlog import Group


class GatewayDB:
    def __init__(self, path: str, seed: int = 1, sensors: int = 4, metrics=("temp", "hum")) -> None:
        self.path = path
        self.db = schema.open_writer(path)
        self.conn: sqlite3.Connection = self.db.conn
        self.conn.execute(ingestlog.CREATE_TABLE)
        self.rng = random.Random(seed)
        self.sensors = [f"sim-{i:04d}" for i in range(sensors)]
        if sensors > 1:
            self.sensors[1] = "odd.id:with/slash"  # every character the charset allows that subjects do not
        self.metrics = metrics
        self.seq = {s: 0 for s in self.sensors}
        self.boot = {s: 1_700_000_000 + i for i, s in enumerate(self.sensors)}
        self.acc = {
            s: dict(datagrams=0, readings=0, lost=0, duplicates=0, reordered=0, restarts=0) for s in self.sensors
        }
        self.first = {}
        self.clock = 1_800_000_000.0
        self.flushes = 0

    def close(self) -> None:
        self.conn.close()

    def flush(self, datagrams_per_sensor: int = 5) -> int:
        """One flush: each sensor sends some datagrams (some lost, one restarting now and then)."""
        groups = []
        self.conn.execute("BEGIN IMMEDIATE")
        for sensor in self.sensors:
            acc = self.acc[sensor]
            if self.rng.random() < 0.05:  # a restart: new boot, seqs from 1
                self.boot[sensor] += 1
                self.seq[sensor] = 0
                acc["restarts"] += 1
            boot = None if sensor == self.sensors[-1] else self.boot[sensor]  # one sensor without boot
            seqs, ts, rec, metrics = [], [], [], {m: [] for m in self.metrics}
            lost_before = acc["lost"]
            for _ in range(datagrams_per_sensor):
                self.seq[sensor] += 1
                if self.rng.random() < 0.1:  # lost on the way
                    self.seq[sensor] += 1
                    acc["lost"] += 1
                self.clock += 0.001
                seqs.append(self.seq[sensor])
                ts.append(self.clock)
                rec.append(self.clock + 0.0005)
                for i, m in enumerate(self.metrics):
                    value = None if (i and self.rng.random() < 0.2) else round(self.rng.uniform(-40, 60), 3)
                    metrics[m].append(value)
            if self.rng.random() < 0.1:
                acc["duplicates"] += 1
            metrics = {m: v for m, v in metrics.items() if any(x is not None for x in v)}
            groups.append(Group(sensor, boot, seqs, ts, rec, metrics))
            acc["readings"] += sum(len(v) - v.count(None) for v in metrics.values())
            acc["datagrams"] += len(seqs)
            self.first.setdefault(sensor, rec[0])
            self.conn.execute(
                "INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings, lost, duplicates, "
                "reordered, restarts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sensor) DO UPDATE SET "
                "last_seen = excluded.last_seen, datagrams = excluded.datagrams, readings = excluded.readings, "
                "lost = excluded.lost, duplicates = excluded.duplicates, reordered = excluded.reordered, "
                "restarts = excluded.restarts",
                (
                    sensor,
                    self.first[sensor],
                    rec[-1],
                    acc["datagrams"],
                    acc["readings"],
                    acc["lost"],
                    acc["duplicates"],
                    acc["reordered"],
                    acc["restarts"],
                ),
            )
            if lost_before != acc["lost"]:  # the collector rewrites a gap row only when lost or reordered moves
                self.conn.execute(
                    "INSERT OR REPLACE INTO gaps (sensor, stream, boot, first_seq, last_seq, missing, detected_at) "
                    "VALUES (?, 0, ?, ?, ?, ?, ?)",
                    (sensor, boot or -1, 1, 1, acc["lost"], rec[-1]),
                )
        entry = ingestlog.append(self.conn, self.clock, groups)
        self.conn.execute("COMMIT")
        self.flushes += 1
        return entry


def log_readings(path: str, prefix: str = "") -> set[tuple]:
    """Every reading of the gateway's ingest log as readings() gives them centrally."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        bodies = [row[0] for row in conn.execute("SELECT body FROM ingest_log ORDER BY id")]
    finally:
        conn.close()
    out = set()
    for body in bodies:
        for g in ingestlog.decode_body(body):
            boot = schema.NO_BOOT if g.boot is None else g.boot
            for metric, values in g.metrics.items():
                for seq, ts, value in zip(g.seqs, g.ts, values):
                    if value is not None:
                        out.add((prefix + g.sensor, metric, ts, boot, seq, value))
    return out


def readings(path: str, prefix: str = "") -> set[tuple]:
    """Every reading of the central database as (sensor, metric, ts, boot, seq, value),
    read as telemetry-query reads it (storage v3: chunks and the open heads in the log)."""
    return set(reading_rows(path, prefix))


def reading_rows(path: str, prefix: str = "") -> list[tuple]:
    """readings(), doubles kept (a reading stored twice comes twice), in the order read."""
    from query.ops import Ops

    ops = Ops(schema.open_reader(path))
    out = []
    try:
        ops.heads.refresh(ops.conn)  # what Ops.run does before each request
        for sensor, metric in ops.conn.execute("SELECT sensor, metric FROM series").fetchall():
            cursor = None
            while True:
                page = ops.op_readings(sensor=sensor, metric=metric, limit=10_000, cursor=cursor)
                for r in page["rows"]:
                    boot = schema.NO_BOOT if r["boot"] is None else r["boot"]
                    out.append((prefix + sensor, metric, r["ts"], boot, r["seq"], r["value"]))
                cursor = page["next"]
                if cursor is None:
                    break
    finally:
        ops.close()
    return out


def accounts(path: str, prefix: str = "", where: str = "") -> dict[str, tuple]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT sensor, first_seen, last_seen, datagrams, readings, lost, duplicates, reordered, "
            f"restarts FROM sensors {where}"
        ).fetchall()
        gaps = conn.execute(
            "SELECT sensor, stream, boot, first_seq, last_seq, missing, detected_at FROM gaps "
            "ORDER BY sensor, stream, boot, first_seq"
        ).fetchall()
    finally:
        conn.close()
    out = {prefix + r[0]: tuple(r[1:]) for r in rows}
    for g in gaps:
        key = prefix + g[0] if not g[0].startswith(prefix) else g[0]
        if key in out:
            out[key] = out[key] + (tuple(g[1:]),)
    return out
