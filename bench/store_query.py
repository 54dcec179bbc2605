"""Query latency over storage v3: latest, a 1,000-reading page, a 30-day 1-hour aggregate.

Builds a real v3 database through the store's own chunk path (collector.store
insert_chunk with heads of 1,024 datagrams, as the collector closes them):
20 sensors x 5 metrics at 1 Hz for a day (the realistic day's shape,
quantized values), one of them (s07, its temp) for --days days, plus five minutes of
open heads in the ingest log.  Then
runs each query many times through query.ops.Ops on a read-only connection,
as a query-server worker does (TLS framing excluded: bench/query.py measures
that part), and prints p50/p99 in milliseconds.

    .venv/bin/python bench/store_query.py --days 30
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector import schema, wire  # noqa: E402
from collector.chunkstore import Head  # noqa: E402
from collector.store import insert_chunk, open_ingest  # noqa: E402
from query.ops import Ops  # noqa: E402
from query.protocol import parse_request  # noqa: E402

T0 = 1_700_000_000.0
METRICS = ("temp", "hum", "pressure", "battery", "count")
LONG = "s07"
# Open heads at the end: 1,000 s at 1 Hz, just under the 1,024 datagrams at
# which the collector closes a head, so the heads are as large as they get.
HEAD_SECONDS = 1000


def value(metric: str, s: int, t: int) -> float:
    day = math.sin(2 * math.pi * (t % 86400) / 86400)
    return {
        "temp": round(20 + 5 * day + s * 0.1, 2),
        "hum": round(50 - 10 * day, 1),
        "pressure": round(1013 + 3 * day, 2),
        "battery": round(3.9 - t * 1e-7, 3),
        "count": float(t // 7),
    }[metric]


def build(path: str, sensors: int, days: int, head_seconds: int = HEAD_SECONDS) -> None:
    store, core = open_ingest(path)
    # Intern the series through the core, then write closed chunks directly (fast).
    for s in range(sensors):
        core.receive(wire.encode(f"s{s:02d}", 0, {m: 0.0 for m in METRICS}, boot=1, ts=T0 - 1), T0 - 1)
    assert store.flush(core, T0 - 1)
    conn = store.conn
    seconds = days * 86400
    conn.execute("BEGIN")
    for s in range(sensors):
        sensor = f"s{s:02d}"
        ids = core.sensors[sensor].series
        span = seconds if sensor == LONG else 86400  # one sensor has the long history
        for start in range(seconds - span, seconds, 1024):
            n = min(1024, seconds - start)
            head = Head(sensor, 1, 0, T0 + start)
            ts = [T0 + start + i + (i * 7919 % 13) / 1000 for i in range(n)]
            # Before its last day the long sensor carries only temp (what the 30-day aggregate reads).
            metrics = METRICS if start >= seconds - 86400 else ("temp",)
            head.extend(
                list(range(start + 1, start + 1 + n)),
                ts,
                [t + 0.0015 for t in ts],
                {m: [value(m, s, start + i) for i in range(n)] for m in metrics},
            )
            insert_chunk(conn, head.close(), 0, ids)
        if s % 5 == 4:
            conn.execute("COMMIT")
            conn.execute("BEGIN")
    conn.execute("COMMIT")
    # A few minutes in open heads, through the real flush path.
    now = T0 + seconds
    for i in range(head_seconds):
        for s in range(sensors):
            core.receive(
                wire.encode(
                    f"s{s:02d}", seconds + 1 + i, {m: value(m, s, seconds + i) for m in METRICS}, boot=1, ts=now + i
                ),
                now + i,
            )
        if i % 10 == 9:
            assert store.flush(core, now + i)
    assert store.flush(core, now + head_seconds)
    store.close()


def timed(ops: Ops, params, n: int, rng: random.Random, cpu: list[float] | None = None) -> list[float]:
    """Wall milliseconds of n requests; their CPU milliseconds (this thread's) into `cpu`."""
    out = []
    for _ in range(n):
        req = parse_request(json.dumps(params(rng) if callable(params) else params).encode())
        c = time.thread_time()
        t = time.perf_counter()
        ops.run(req)
        out.append((time.perf_counter() - t) * 1000)
        if cpu is not None:
            cpu.append((time.thread_time() - c) * 1000)
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def cases(days: int) -> dict:
    """The timed requests, each its parameters or a function of a random.Random giving
    them (bench/query.py sends the same ones over TLS)."""
    end = T0 + days * 86400
    return {
        "latest (one sensor)": {"op": "latest", "sensor": "s07"},
        "latest (all 100 series)": {"op": "latest"},
        "readings, 1,000-row page mid-range": {
            "op": "readings",
            "sensor": "s07",
            "metric": "temp",
            "since": end - 5 * 86400,
            "limit": 1000,
        },
        # A new place each time: the chunks it needs are not in the per-connection cache.
        "readings, 1,000-row page at a random ts": lambda rng: {
            "op": "readings",
            "sensor": "s07",
            "metric": "temp",
            "since": T0 + rng.uniform(0, days * 86400 - 1100),
            "limit": 1000,
        },
        "readings, 1,000-row page, 5 metrics, last day": lambda rng: {
            "op": "readings",
            "sensor": f"s{rng.randrange(20):02d}",
            "since": end - rng.uniform(1100, 86400),
            "limit": 1000,
        },
        "readings, 1,000-row page, newest (desc)": {
            "op": "readings",
            "sensor": "s07",
            "metric": "temp",
            "order": "desc",
            "limit": 1000,
        },
        f"aggregate {days} d in 1 h buckets": {
            "op": "aggregate",
            "sensor": "s07",
            "metric": "temp",
            "bucket": 3600,
            "since": T0 - T0 % 3600,
        },
        "aggregate 1 d in 5 min buckets (rollups)": {
            "op": "aggregate",
            "sensor": "s07",
            "metric": "temp",
            "bucket": 300,
            "since": end - 86400 - end % 300,
        },
        "aggregate 1 h in 7 s buckets (raw)": {
            "op": "aggregate",
            "sensor": "s07",
            "metric": "temp",
            "bucket": 7,
            "since": end - 3600,
        },
    }


def prepare(path: str | None, tmp: str, sensors: int, days: int, head_seconds: int) -> str:
    """The database: built in `tmp`, or at `path` (built once, then reused)."""
    if path is not None and os.path.exists(path):
        print(f"reusing {path} ({os.path.getsize(path) / 1e6:.1f} MB; delete it to rebuild)")
        return path
    path = path or os.path.join(tmp, "q.db")
    t = time.monotonic()
    build(path, sensors, days, head_seconds)
    readings = len(METRICS) * (sensors * 86400 + sensors * head_seconds) + (days - 1) * 86400
    print(
        f"built {readings / 1e6:.1f} M readings ({sensors} sensors x {len(METRICS)} metrics x 1 Hz x "
        f"1 d, s07 {days} d, {head_seconds} s in open heads) in {time.monotonic() - t:.0f} s: "
        f"{os.path.getsize(path) / 1e6:.1f} MB"
    )
    return path


def arguments(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--sensors", type=int, default=20)
    ap.add_argument("--days", type=int, default=30, help="days of history of sensor s07 (default 30)")
    ap.add_argument("--head-seconds", type=int, default=HEAD_SECONDS, help="seconds of data in open heads")
    ap.add_argument("--n", type=int, default=200, help="requests per case")
    ap.add_argument("--db", help="build the database here once and reuse it (default: a temporary one)")
    return ap


def main() -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = prepare(args.db, d, args.sensors, args.days, args.head_seconds)
        ops = Ops(schema.open_reader(path))
        rng = random.Random(1)
        try:
            print(
                f"{args.n} requests each, one read-only connection, no TLS (ms; cpu = this thread's CPU time,"
                f" which a loaded machine does not inflate; load average {os.getloadavg()[0]:.1f})"
            )
            print(f"{'':46s}{'p50':>7s} {'p99':>7s} {'cpu p50':>8s} {'cpu p99':>8s}  resolution")
            for name, params in cases(args.days).items():
                timed(ops, params, 3, rng)  # warm the cache
                cpu: list[float] = []
                xs = timed(ops, params, args.n, rng, cpu)
                print(
                    f"{name:46s}{statistics.median(xs):7.2f} {pct(xs, 0.99):7.2f} {statistics.median(cpu):8.2f}"
                    f" {pct(cpu, 0.99):8.2f}  {ops.meta.get('resolution', '-')}"
                )
        finally:
            ops.close()


if __name__ == "__main__":
    main()
