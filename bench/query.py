"""Query latency over TLS against 10 million readings, beside the same SQL run directly.

Builds (once; cached under /tmp) a database of 100 sensors x 2 metrics x
50,000 readings = 10,000,000 rows, one reading every 3.456 s per series (48
hours), through collector.schema with plain executemany.  Then starts
`telemetry-query serve` as a child process with trustme certificates and
times, over one TLS connection, N requests each of:

- latest (all 200 pairs) and latest for one sensor,
- a 1,000-row readings page at a random point of a random series,
- a 24-hour aggregate in 5-minute buckets of a random series,

and the equivalent SQL run directly on a read-only sqlite3 connection in this
process.  Prints p50/p99 for both, their ratio (the server's overhead), and
EXPLAIN QUERY PLAN of the SQL.  Targets: p99 < 20 ms for latest, < 100 ms for
the 24-hour aggregate.

    .venv/bin/python bench/query.py [--requests 300] [--db /tmp/telemetry-query-bench.db] [--rebuild]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from collector.schema import open_reader, open_writer  # noqa: E402
from query.client import QueryClient  # noqa: E402

SENSORS = 100
METRICS = ("temp", "hum")
PER_SERIES = 50_000
STEP = 3.456  # seconds between readings: 50,000 of them span 48 hours
T0 = 1_764_000_000.0
DAY = 86_400


def build(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    open_writer(path).conn.close()  # the schema exactly as the collector creates it
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")  # bulk load without a 400 MB WAL
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    series = [(i * len(METRICS) + j + 1, f"sensor-{i:03d}", m) for i in range(SENSORS) for j, m in enumerate(METRICS)]
    conn.executemany("INSERT INTO series (id, sensor, metric) VALUES (?, ?, ?)", series)
    rng = random.Random(1)
    start = time.perf_counter()
    for sid, _, _ in series:
        base = rng.uniform(-10, 30)
        # Rows in primary-key order: the B-tree only ever appends.
        conn.executemany(
            "INSERT INTO readings (series, ts, boot, seq, value, received) VALUES (?, ?, 1, ?, ?, ?)",
            ((sid, T0 + k * STEP, k, base + (k % 977) * 0.01, T0 + k * STEP + 0.02) for k in range(PER_SERIES)),
        )
    conn.executemany(
        "INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings) VALUES (?, ?, ?, ?, ?)",
        [
            (f"sensor-{i:03d}", T0, T0 + PER_SERIES * STEP, PER_SERIES, PER_SERIES * len(METRICS))
            for i in range(SENSORS)
        ],
    )
    conn.execute(
        "INSERT INTO counters (name, value) VALUES ('received', ?), ('last_flush', ?)",
        (SENSORS * PER_SERIES, T0 + PER_SERIES * STEP),
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode=WAL")  # as the collector leaves it
    conn.close()
    rows = SENSORS * len(METRICS) * PER_SERIES
    print(
        f"built {rows:,} readings in {time.perf_counter() - start:.1f}s -> {path} "
        f"({os.path.getsize(path) / 1e6:.0f} MB)"
    )


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples) * 1000, samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def start_server(db: str, certs: Path):
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    leaf = ca.issue_cert("localhost")
    leaf.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    leaf.private_key_pem.write_to_path(str(certs / "server.key"))
    exe = Path(sys.executable).parent / "telemetry-query"
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--db",
            db,
            "--listen",
            "127.0.0.1:0",
            "--cert",
            str(certs / "server.pem"),
            "--key",
            str(certs / "server.key"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        found = re.search(r"listening tls 127\.0\.0\.1:(\d+)", line)
        if found:
            return proc, int(found.group(1)), str(certs / "ca.pem")
    raise SystemExit(f"server did not start (exit {proc.wait()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", default="/tmp/telemetry-query-bench.db")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    if args.rebuild or not os.path.exists(args.db):
        build(args.db)
    else:
        open_writer(args.db).conn.close()  # a cached database from an older schema is migrated
    n = args.requests
    rng = random.Random(2)
    direct = open_reader(args.db)

    def pick():
        return f"sensor-{rng.randrange(SENSORS):03d}", rng.choice(METRICS)

    def sid(sensor: str, metric: str) -> int:
        return int(sensor.split("-")[1]) * len(METRICS) + METRICS.index(metric) + 1

    latest_sql = (
        "SELECT s.sensor, s.metric, r.ts, r.value, r.seq FROM series s JOIN readings r ON r.series = s.id"
        " AND r.ts = (SELECT max(ts) FROM readings WHERE series = s.id) {where}"
        " ORDER BY s.sensor, s.metric, r.boot DESC, r.seq DESC"
    )
    page_sql = (
        "SELECT ts, boot, seq, value FROM readings WHERE series = ? AND ts >= ?"
        " ORDER BY ts ASC, boot ASC, seq ASC LIMIT 1001"
    )
    agg_sql = (
        "SELECT CAST(floor(ts / ?) AS INTEGER) AS k, count(*), min(value), max(value), sum(value)"
        " FROM readings WHERE series = ? AND ts >= ? AND ts < ? GROUP BY k ORDER BY k"
    )

    print("query plans:")
    for name, sql, params in [
        ("latest", latest_sql.format(where=""), ()),
        ("readings", page_sql, (1, T0)),
        ("aggregate", agg_sql, (300, 1, T0, T0 + DAY)),
    ]:
        plan = "; ".join(row[3] for row in direct.execute("EXPLAIN QUERY PLAN " + sql, params))
        print(f"  {name:10s} {plan}")

    with tempfile.TemporaryDirectory() as tmp:
        proc, port, ca = start_server(args.db, Path(tmp))
        try:
            with QueryClient("localhost", port, ca=ca, timeout=30) as client:
                assert len(client.request("latest")) == SENSORS * len(METRICS)
                cases = []

                def over_tls_latest_all():
                    client.request("latest")

                def direct_latest_all():
                    direct.execute(latest_sql.format(where=""), ()).fetchall()

                cases.append(("latest (200 pairs)", over_tls_latest_all, direct_latest_all))

                def over_tls_latest_one():
                    client.request("latest", sensor=pick()[0])

                def direct_latest_one():
                    direct.execute(latest_sql.format(where="WHERE s.sensor = ?"), (pick()[0],)).fetchall()

                cases.append(("latest (1 sensor)", over_tls_latest_one, direct_latest_one))

                def start_ts() -> float:
                    return T0 + rng.uniform(0, (PER_SERIES - 1100) * STEP)

                def over_tls_page():
                    sensor, metric = pick()
                    page = client.request("readings", sensor=sensor, metric=metric, since=start_ts(), limit=1000)
                    assert len(page["rows"]) == 1000

                def direct_page():
                    rows = direct.execute(page_sql, (sid(*pick()), start_ts())).fetchall()
                    assert len(rows) == 1001

                cases.append(("readings page (1,000 rows)", over_tls_page, direct_page))

                def over_tls_agg():
                    sensor, metric = pick()
                    since = T0 + rng.uniform(0, DAY)
                    result = client.request(
                        "aggregate", sensor=sensor, metric=metric, bucket=300, since=since, until=since + DAY
                    )
                    assert sum(b["count"] for b in result) >= DAY // STEP - 1

                def direct_agg():
                    since = T0 + rng.uniform(0, DAY)
                    direct.execute(agg_sql, (300, sid(*pick()), since, since + DAY)).fetchall()

                cases.append(("aggregate 24 h / 5 min", over_tls_agg, direct_agg))

                print(f"\n{n} requests each, one TLS 1.3 connection, server in a child process (ms):")
                print(
                    f"  {'query':28s} {'tls p50':>8s} {'tls p99':>8s} {'sql p50':>8s} {'sql p99':>8s} {'ratio p50':>9s}"
                )
                for name, remote, local in cases:
                    for warm in (remote, local):
                        timed(warm, 5)
                    r50, r99 = percentiles(timed(remote, n))
                    l50, l99 = percentiles(timed(local, n))
                    print(f"  {name:28s} {r50:8.2f} {r99:8.2f} {l50:8.2f} {l99:8.2f} {r50 / l50:9.1f}")
        finally:
            proc.terminate()
            proc.wait(10)
    direct.close()


if __name__ == "__main__":
    main()
