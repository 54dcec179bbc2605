"""Uplink benchmark: forward rate to a local JetStream, catch-up after an outage, RSS, central rate.

A gateway database is filled with a backlog as the collector commits it
(ingest_log entries of one second each: --sensors sensors x datagrams x 2
readings, --rate readings/s for --minutes minutes: the scaled outage), then:

1. `telemetry-uplink run` drains it into a real nats-server (JetStream, file
   store) from position 0: time to drain, readings/s forwarded, the uplink's
   peak RSS (VmHWM);
2. `telemetry-uplink consume` drains the stream (--gateways copies of the
   backlog, published by one uplink each) into a central database: readings/s;
3. the collector's own zero-loss ingest rate (readings/s), measured in the same
   run with bench/ingest.py's search (skip with --skip-ingest), for the ratio
   the target asks: forward rate / ingest rate >= 1.

The 1 h catch-up target (10,000 readings/s for an hour, 36 million readings,
drained in under 2 minutes) is extrapolated from the measured drain rate.

    .venv/bin/python bench/uplink.py                      # ~1-3 minutes
    .venv/bin/python bench/uplink.py --minutes 5 --skip-ingest
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from collector import ingestlog, schema  # noqa: E402
from collector.ingestlog import Group  # noqa: E402


def fill(path: str, minutes: float, rate: int, sensors: int, seed: int) -> tuple[int, int]:
    """A backlog of entries, one per second of ingest; returns (entries, readings)."""
    db = schema.open_writer(path)
    conn = db.conn
    conn.execute(ingestlog.CREATE_TABLE)
    rng = random.Random(seed)
    per_sensor = max(1, rate // (2 * sensors))  # datagrams per sensor per second, 2 readings each
    t0 = 1_800_000_000.0
    seq = [0] * sensors
    entries = readings = 0
    for second in range(int(minutes * 60)):
        groups = []
        for i in range(sensors):
            seqs = list(range(seq[i] + 1, seq[i] + per_sensor + 1))
            seq[i] += per_sensor
            ts = [t0 + second + k / per_sensor for k in range(per_sensor)]
            groups.append(
                Group(
                    f"bench-{i:04d}",
                    1,
                    seqs,
                    ts,
                    [t + 0.001 for t in ts],
                    {
                        "temp": [round(rng.uniform(15, 25), 2) for _ in seqs],
                        "hum": [round(rng.uniform(30, 60), 1) for _ in seqs],
                    },
                )
            )
        conn.execute("BEGIN")
        ingestlog.append(conn, t0 + second + 1, groups)
        for i in range(sensors):
            conn.execute(
                "INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (sensor) DO UPDATE SET last_seen = excluded.last_seen, "
                "datagrams = excluded.datagrams, readings = excluded.readings",
                (f"bench-{i:04d}", t0, t0 + second + 1, seq[i], 2 * seq[i]),
            )
        conn.execute("COMMIT")
        entries += 1
        readings += 2 * per_sensor * sensors
    conn.close()
    return entries, readings


def vm_hwm_kb(pid: int) -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def start_nats(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("nats-server")
    if binary is None:
        sys.exit("nats-server is not installed: apt-get install nats-server")
    log = workdir / "nats.log"
    proc = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", str(workdir / "js")],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        m = re.search(r"Listening for client connections on [^\s]*:(\d+)", text)
        if m and "Server is ready" in text:
            return proc, f"nats://127.0.0.1:{m.group(1)}"
        time.sleep(0.05)
    proc.kill()
    sys.exit("nats-server did not start: " + log.read_text()[-500:])


def position(db: str) -> int:
    try:
        return int(Path(db + "-uplink").read_text())
    except (OSError, ValueError):
        return 0


def drain(db: str, name: str, url: str, entries: int, workdir: Path, timeout: float) -> dict:
    log = workdir / f"uplink-{name}.log"
    cmd = [
        str(BIN / "telemetry-uplink"),
        "run",
        "--db",
        db,
        "--gateway",
        name,
        "--servers",
        url,
        "--status-interval",
        "3600",
        "--poll-interval",
        "0.05",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    peak = 0
    try:
        while position(db) < entries:
            if proc.poll() is not None or time.monotonic() - start > timeout:
                raise SystemExit(f"uplink {name} stopped or timed out: {log.read_text()[-800:]}")
            peak = max(peak, vm_hwm_kb(proc.pid) or 0)
            time.sleep(0.02)
        elapsed = time.monotonic() - start
        peak = max(peak, vm_hwm_kb(proc.pid) or 0)
    finally:
        proc.terminate()
        proc.wait(30)
    return dict(elapsed=elapsed, peak_rss_kb=peak)


def central_readings(path: str) -> int:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM counters WHERE name = 'uplink_readings'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def consume(url: str, total: int, workdir: Path, timeout: float) -> dict:
    central = str(workdir / "central.db")
    log = workdir / "consume.log"
    cmd = [str(BIN / "telemetry-uplink"), "consume", "--db", central, "--servers", url, "--status-interval", "3600"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    peak = 0
    try:
        while central_readings(central) < total:
            if proc.poll() is not None or time.monotonic() - start > timeout:
                raise SystemExit(
                    f"consumer stopped or timed out at {central_readings(central)}: {log.read_text()[-800:]}"
                )
            peak = max(peak, vm_hwm_kb(proc.pid) or 0)
            time.sleep(0.05)
        elapsed = time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(30)
    return dict(elapsed=elapsed, peak_rss_kb=peak, stored=central_readings(central))


def ingest_rate() -> float | None:
    spec = importlib.util.spec_from_file_location("bench_ingest", ROOT / "bench" / "ingest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = argparse.Namespace(
        seconds=2.0,
        sensors=100,
        start=25_000,
        max_rate=400_000,
        bisect_steps=2,
        collector_core=0,
        sender_core=1,
        flush_interval=1.0,
        batch_size=20_000,
        rcvbuf=8 * 1024 * 1024,
        signed=False,
    )
    if (os.cpu_count() or 1) < 2:
        args.collector_core = args.sender_core = None
    with tempfile.TemporaryDirectory() as wd:
        best, _ = mod.search(mod.step_collector, args, wd, "collector")
    if not best:
        return None
    return best["stored_readings"] / best["send_elapsed"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=1.0, help="outage length of the scaled backlog")
    p.add_argument("--rate", type=int, default=10_000, help="ingest readings/s during the outage")
    p.add_argument("--sensors", type=int, default=100)
    p.add_argument("--gateways", type=int, default=3, help="gateways feeding the central consumer")
    p.add_argument("--skip-ingest", action="store_true", help="do not measure the collector's ingest rate")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as wd:
        workdir = Path(wd)
        nats, url = start_nats(workdir)
        try:
            print(
                f"backlog: {args.minutes:g} min at {args.rate:,} readings/s, {args.sensors} sensors, "
                f"{args.gateways} gateways (one uplink each, one after the other)",
                flush=True,
            )
            drains = []
            total = 0
            for g in range(args.gateways):
                db = str(workdir / f"gw{g}.db")
                entries, readings = fill(db, args.minutes, args.rate, args.sensors, g)
                r = drain(db, f"site-{g}", url, entries, workdir, args.timeout)
                r["readings"] = readings
                drains.append(r)
                total += readings
                print(
                    f"  site-{g}: {readings:,} readings in {entries} entries drained in {r['elapsed']:.2f} s = "
                    f"{readings / r['elapsed']:,.0f} readings/s; uplink peak RSS {r['peak_rss_kb'] / 1024:.1f} MB",
                    flush=True,
                )
            c = consume(url, total, workdir, args.timeout)
            print(
                f"  central consumer: {c['stored']:,} readings of {args.gateways} gateways in {c['elapsed']:.2f} s = "
                f"{c['stored'] / c['elapsed']:,.0f} readings/s; peak RSS {c['peak_rss_kb'] / 1024:.1f} MB",
                flush=True,
            )
        finally:
            nats.terminate()
            nats.wait(30)
    rates = sorted(r["readings"] / r["elapsed"] for r in drains)
    median = rates[len(rates) // 2]
    hour = 10_000 * 3600
    print()
    print(
        f"uplink forward rate (median of {len(rates)}): {median:,.0f} readings/s; peak RSS "
        f"{max(r['peak_rss_kb'] for r in drains) / 1024:.1f} MB (target < 60 MB)"
    )
    print(
        f"catch-up after 1 h at 10,000 readings/s ({hour:,} readings), extrapolated: {hour / median:.0f} s "
        f"(target < 120 s)"
    )
    print(f"central consumer: {c['stored'] / c['elapsed']:,.0f} readings/s")
    if not args.skip_ingest:
        print("collector zero-loss ingest, same run (bench/ingest.py search):", flush=True)
        ingest = ingest_rate()
        if ingest:
            print(
                f"collector ingest: {ingest:,.0f} readings/s; ratio uplink forward / ingest = {median / ingest:.2f} "
                f"(target >= 1); central consumer / (3 x ingest) = {c['stored'] / c['elapsed'] / (3 * ingest):.2f}"
            )
    print(f"(machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}: shared, figures are indicative)")


if __name__ == "__main__":
    main()
