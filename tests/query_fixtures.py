"""Shared pieces for the query tests: a database of known values, trustme TLS, a live server.

Imported by the other tests/test_query_*.py modules (no tests here).  The
known database is written through collector.schema.open_writer with plain
parameterized INSERTs, so every expected result below is exact.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import trustme

from collector.schema import NO_BOOT, open_reader, open_writer
from query.ops import Limits, Ops
from query.server import QueryServer, ServerLimits, Service, server_context

T0 = 1_700_000_000

# (sensor, metric) -> series id, as the collector would have interned them.
SERIES = {("s1", "temp"): 1, ("s1", "hum"): 2, ("s2", "temp"): 3, ("x'; DROP TABLE readings;--", "m"): 4}


def _s1_temp() -> list[tuple[float, int, int, float]]:
    # 300 readings, three per timestamp (ties in ts), across two boots; values
    # include negatives and fractions so min/max/avg mean something.
    rows = []
    for i in range(300):
        boot = NO_BOOT if i < 150 else 7
        rows.append((float(T0 + (i // 3) * 10), boot, i, ((i * 37) % 101) / 4 - 10))
    return rows


def _s1_hum() -> list[tuple[float, int, int, float]]:
    return [(T0 + i * 60 + 0.5, 3, i, i * 1.5) for i in range(50)]


def _s2_temp() -> list[tuple[float, int, int, float]]:
    # Negative and zero timestamps: bucket alignment must floor, not truncate.
    return [(-25.0 + i * 10, NO_BOOT, 100 + i, float(i)) for i in range(10)]


READINGS = {1: _s1_temp(), 2: _s1_hum(), 3: _s2_temp(), 4: [(float(T0), NO_BOOT, 1, 1.0)]}

SENSORS = [
    # sensor, first_seen, last_seen, datagrams, readings, lost, duplicates, reordered, restarts
    ("s1", T0 - 5.0, T0 + 3000.25, 320, 350, 7, 2, 1, 1),
    ("s2", 10.0, 20.5, 10, 10, 0, 3, 0, 0),
    ("s9", 50.0, 50.0, 1, 0, 0, 0, 0, 0),  # seen, but every datagram had no readings
    ("x'; DROP TABLE readings;--", T0, T0, 1, 1, 0, 0, 0, 0),
]

# sensor -> (interval, stale_after, clock_offset, clock_skewed), as the collector stores them (schema v3).
HEALTH = {
    "s1": (10.0, 30.0, 0.25, 0),  # sends every 10 s; stale 30 s after T0 + 3000.25
    "s2": (1.0, 10.0, -5.5, 1),  # its clock 5.5 s behind: flagged
}

GAPS = [
    # sensor, stream, boot, first_seq, last_seq, missing, detected_at
    ("s1", 0, NO_BOOT, 10, 12, 3, T0 + 100.0),
    ("s1", 1, 7, 200, 203, 4, T0 + 2000.0),
    ("s2", 0, NO_BOOT, 5, 5, 1, 15.0),
]

COUNTERS = {
    "received": 341,
    "stored": 331,
    "stored_readings": 361,
    "duplicates": 5,
    "kernel_drops": 4,
    "truncated": 1,
    "storage_dropped": 0,
    "rejected:bad_id": 2,
    "rejected:not_msgpack": 6,
    "rejected:something_new": 1,
    "internal_errors": 3,
    "refused_sensors": 8,
    "refused_readings": 13,
    "last_flush": T0 + 3000.5,
}


def fill_known_db(path: str) -> None:
    from v2ref import open_v2

    db = open_v2(path)
    conn = db.conn
    with conn:
        conn.execute("BEGIN")
        for (sensor, metric), sid in SERIES.items():
            conn.execute("INSERT INTO series (id, sensor, metric) VALUES (?, ?, ?)", (sid, sensor, metric))
        for sid, rows in READINGS.items():
            conn.executemany(
                "INSERT INTO readings (series, ts, boot, seq, value, received) VALUES (?, ?, ?, ?, ?, ?)",
                [(sid, ts, boot, seq, value, ts + 0.01) for ts, boot, seq, value in rows],
            )
        conn.executemany(
            "INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings, lost, duplicates,"
            " reordered, restarts, tracker) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, '{}')",
            SENSORS,
        )
        conn.executemany(
            "INSERT INTO gaps (sensor, stream, boot, first_seq, last_seq, missing, detected_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            GAPS,
        )
        conn.executemany("INSERT INTO counters (name, value) VALUES (?, ?)", list(COUNTERS.items()))
        conn.execute("COMMIT")
    db.conn.close()
    db = open_writer(path)  # migrates to the current schema
    with db.conn:  # sensor health columns (schema version 3 on)
        db.conn.execute("BEGIN")
        db.conn.executemany(
            "UPDATE sensors SET interval = ?, stale_after = ?, clock_offset = ?, clock_skewed = ? WHERE sensor = ?",
            [(*health, sensor) for sensor, health in HEALTH.items()],
        )
        db.conn.execute("COMMIT")
    db.conn.close()


def expected_rows(sensor: str, metric: str) -> list[dict]:
    """Rows of one series as `readings` returns them, in key order."""
    sid = SERIES[(sensor, metric)]
    return [
        {
            "sensor": sensor,
            "metric": metric,
            "ts": ts,
            "value": value,
            "seq": seq,
            "boot": None if boot == NO_BOOT else boot,
        }
        for ts, boot, seq, value in sorted(READINGS[sid])
    ]


@dataclass
class Tls:
    ca: trustme.CA
    ca_pem: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    dir: Path

    def client_context(self, cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_pem)
        if cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def make_tls(directory: Path) -> Tls:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    server.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    server.private_key_pem.write_to_path(str(directory / "server.key"))
    client = ca.issue_cert("client@example.org", common_name="client")
    client.cert_chain_pems[0].write_to_path(str(directory / "client.pem"))
    client.private_key_pem.write_to_path(str(directory / "client.key"))
    return Tls(
        ca,
        str(ca_pem),
        str(directory / "server.pem"),
        str(directory / "server.key"),
        str(directory / "client.pem"),
        str(directory / "client.key"),
        directory,
    )


@contextlib.contextmanager
def running_server(
    db: str,
    tls: Tls,
    *,
    mtls: bool = False,
    host: str = "127.0.0.1",
    limits: ServerLimits = ServerLimits(),
    ops_limits: Limits = Limits(),
    make_ops=None,
    workers: int = 2,
    port: int = 0,
    clock=time.monotonic,
):
    """A QueryServer on a port of its own (or `port`, to restart one), served from a thread; stopped and joined on exit.
    `clock` is the server's clock for its timeouts and turns (a ManualClock makes them the test's decision)."""
    ctx = server_context(tls.server_cert, tls.server_key, tls.ca_pem if mtls else None)
    service = Service(make_ops or (lambda: Ops(open_reader(db), ops_limits)), workers)
    server = QueryServer(ctx, (host, port), service, limits, clock=clock)
    thread = threading.Thread(target=server.serve_forever, name="query-server")
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(10)
        assert not thread.is_alive(), "server did not stop"


class ManualClock:
    """A server clock that moves only when the test says: timeouts fire when the test advances it,
    never because a loaded machine was slow."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_readings(path: str, sensor: str, metric: str, rows: list[tuple[float, int, int, float]]) -> None:
    """Store (ts, boot, seq, value) readings of one series as closed chunks, through the v3 store's own
    chunk path (collector.store.insert_chunk), as a collector's flushes would have left them."""
    from collector.chunkstore import chunk_rows_from_columns
    from collector.store import insert_chunk

    db = open_writer(path)
    conn = db.conn
    conn.execute("BEGIN")
    found = conn.execute("SELECT id FROM series WHERE sensor = ? AND metric = ?", (sensor, metric)).fetchone()
    sid = (
        found[0]
        if found
        else conn.execute("INSERT INTO series (sensor, metric) VALUES (?, ?)", (sensor, metric)).lastrowid
    )
    by_boot: dict[int, list[tuple]] = {}
    for row in rows:
        by_boot.setdefault(row[1], []).append(row)
    for boot, group in by_boot.items():
        for chunk in chunk_rows_from_columns(
            sensor,
            boot,
            [r[2] for r in group],
            [r[0] for r in group],
            [r[0] for r in group],
            {metric: [r[3] for r in group]},
            1024,
        ):
            insert_chunk(conn, chunk, 0, {metric: sid})
    conn.execute("COMMIT")
    conn.close()


def fill_series(path: str, sensor: str, metric: str, count: int, t0: float = T0, step: float = 0.25) -> None:
    """One sensor with `count` readings of one metric (ts t0, t0 + step, ...; value i / 8), for volume tests."""
    write_readings(path, sensor, metric, [(t0 + i * step, NO_BOOT, i, i / 8) for i in range(count)])
    db = open_writer(path)
    conn = db.conn
    with conn:
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings, lost, duplicates,"
            " reordered, restarts, tracker) VALUES (?, ?, ?, ?, ?, 0, 0, 0, 0, '{}')",
            (sensor, t0, t0 + (count - 1) * step, count, count),
        )
        conn.execute("COMMIT")
    db.conn.close()


@contextlib.contextmanager
def live_server(db: str, certs: Tls, *, mtls: bool = True):
    """A running server on `db`, and the client environment that reaches it."""
    with running_server(db, certs, mtls=mtls) as server:
        port = server.server_address[1]
        env = {"TELEMETRY_SERVER": f"localhost:{port}", "TELEMETRY_CA": certs.ca_pem}
        if mtls:
            env.update(TELEMETRY_CERT=certs.client_cert, TELEMETRY_KEY=certs.client_key)
        yield {"env": env, "tls": certs, "port": port, "db": db, "server": server}


def run_cli(args: list[str], env: dict[str, str], code: int = 0):
    """telemetry-query in-process (click's runner) with `env`; asserts the exit code."""
    from click.testing import CliRunner

    from query.cli import main

    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def append_readings(path: str, sensor: str, metric: str, rows: list[tuple[float, int, float]]) -> None:
    """Append (ts, seq, value) readings to an existing series, as a collector's flush would."""
    write_readings(path, sensor, metric, [(ts, NO_BOOT, seq, value) for ts, seq, value in rows])
