"""Uplink benchmark: catch-up to a local JetStream, forward rate, RSS, central rate, ingest beside it.

Gateway databases are filled with a backlog as the collector commits it (one
ingest_log row per second: --sensors sensors sending --rate readings/s in
datagrams of 2 readings), then, against a real nats-server (JetStream, file
store) started here:

1. catch-up: `telemetry-uplink run` (payload 2) drains a --minutes backlog
   (default 60: the target's hour at 10,000 readings/s, 36 million readings,
   measured, not extrapolated) from position 0: time, readings/s, peak RSS
   (VmHWM); a payload-1 uplink drains a --central-minutes backlog of the same
   shape in the same run (the baseline, and the ratio);
2. central: --gateways uplinks publish their own copy of that backlog at once,
   then one `telemetry-uplink consume` drains the stream into a central
   database: readings/s (the catch-up and payload-1 phases publish to a stream
   of their own, CATCHUP, which the consumer does not read);
3. ingest beside the uplink: bench/ingest.py's zero-loss search of the
   collector alone, then with a live `telemetry-uplink run` publishing the
   collector's database (skip with --skip-ingest): both rates and the ratio,
   and forward rate / ingest rate, central rate / (gateways x ingest rate).

    .venv/bin/python bench/uplink.py                      # ~2-4 minutes
    .venv/bin/python bench/uplink.py --minutes 10 --skip-ingest
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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


def fill(
    path: str, minutes: float, rate: int, sensors: int, seed: int, distinct: float | None = None
) -> tuple[int, int]:
    """A backlog as the collector commits it: one ingest_log row per second of ingest, each
    sensor sending rate / (2 x sensors) datagrams/s of 2 readings (fractional rates spread
    over the seconds), the sensors' accounts updated each minute and at the end.  Values come
    from a pool (this is about moving data, not about compressing it).  With `distinct`, only
    that many minutes are generated and the rest of the backlog repeats their rows under new
    ids (SQL copies: an hour in seconds): the uplink forwards bodies without decoding them,
    so its work per row is the same; the central side would drop the repeats, so the central
    phase uses distinct data only.  Returns (entries, readings)."""
    db = schema.open_writer(path)
    conn = db.conn
    conn.execute(ingestlog.CREATE_TABLE)
    rng = random.Random(seed)
    pool_t = [round(rng.uniform(15, 25), 2) for _ in range(10_007)]
    pool_h = [round(rng.uniform(30, 60), 1) for _ in range(10_009)]
    per_sensor = rate / (2 * sensors)  # datagrams per sensor per second
    t0 = 1_800_000_000.0
    seq = [0] * sensors
    names = [f"bench-{i:04d}" for i in range(sensors)]
    entries = readings = 0
    offset = 0
    total_seconds = int(minutes * 60)
    seconds = total_seconds if distinct is None else min(total_seconds, int(distinct * 60))

    def accounts(now: float) -> None:
        conn.executemany(
            "INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (sensor) DO UPDATE SET last_seen = excluded.last_seen, "
            "datagrams = excluded.datagrams, readings = excluded.readings",
            [(names[i], t0, now, seq[i], 2 * seq[i]) for i in range(sensors)],
        )

    for second in range(seconds):
        groups = []
        for i in range(sensors):
            phase = i / sensors
            n = int((second + 1 + phase) * per_sensor) - int((second + phase) * per_sensor)
            if n == 0:
                continue
            first = seq[i] + 1
            seq[i] += n
            base = t0 + second
            ts = [base + (k + 0.5) / n for k in range(n)]
            offset = (offset + n) % 10_000
            groups.append(
                Group(
                    names[i],
                    1,
                    list(range(first, first + n)),
                    ts,
                    [t + 0.001 for t in ts],
                    {"temp": pool_t[offset : offset + n], "hum": pool_h[offset : offset + n]},
                )
            )
            readings += 2 * n
        conn.execute("BEGIN")
        ingestlog.append(conn, t0 + second + 1, groups)
        if second % 60 == 59 or second == seconds - 1:
            accounts(t0 + second + 1)
        conn.execute("COMMIT")
        entries += 1
    per_copy = readings
    while entries < total_seconds:
        n = min(seconds, total_seconds - entries)
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO ingest_log (committed, datagrams, readings, body) "
            "SELECT committed + ?, datagrams, readings, body FROM ingest_log WHERE id <= ? ORDER BY id",
            (float(entries), n),
        )
        conn.execute("COMMIT")
        readings += (
            per_copy
            if n == seconds
            else conn.execute("SELECT total(readings) FROM ingest_log WHERE id <= ?", (n,)).fetchone()[0]
        )
        entries += n
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return entries, readings


def copy_db(src: str, dst: str) -> None:
    """A gateway's copy of a filled backlog (its own file, its own position)."""
    shutil.copyfile(src, dst)


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


def last_log_id(db: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'ingest_log'").fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


def uplink_cmd(db: str, name: str, url: str, payload: int, stream: str = "TELEMETRY") -> list[str]:
    """The catch-up phase publishes to a stream of its own (CATCHUP, subjects catchup.>),
    so the central consumer (TELEMETRY, telemetry.>) sees only the central phase."""
    return [
        str(BIN / "telemetry-uplink"),
        "run",
        "--stream",
        stream,
        "--subject-prefix",
        stream.lower(),
        "--db",
        db,
        "--gateway",
        name,
        "--servers",
        url,
        "--payload-version",
        str(payload),
        "--status-interval",
        "3600",
        "--poll-interval",
        "0.05",
    ]


def acked_messages(db: str) -> int | None:
    try:
        return json.loads(Path(db + "-uplink.status.json").read_text())["acked"]
    except (OSError, ValueError, KeyError):
        return None


def drain(
    dbs: dict[str, str], url: str, entries: int, workdir: Path, timeout: float, payload: int = 3, stream="TELEMETRY"
) -> dict:
    """Uplinks for these gateways (name -> database) at once, from position 0 until each has
    acked its whole log: elapsed time, the uplinks' peak RSS, messages acked."""
    procs = {}
    start = time.monotonic()
    for name, db in dbs.items():
        log = workdir / f"uplink-{name}-p{payload}.log"
        procs[name] = (
            subprocess.Popen(
                uplink_cmd(db, name, url, payload, stream), stdout=open(log, "wb"), stderr=subprocess.STDOUT
            ),
            log,
        )
    peak = 0
    try:
        while any(position(db) < entries for db in dbs.values()):
            for name, (proc, log) in procs.items():
                if proc.poll() is not None or time.monotonic() - start > timeout:
                    raise SystemExit(f"uplink {name} stopped or timed out: {log.read_text()[-800:]}")
                peak = max(peak, vm_hwm_kb(proc.pid) or 0)
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        for proc, _ in procs.values():
            peak = max(peak, vm_hwm_kb(proc.pid) or 0)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            proc.wait(30)
    return dict(elapsed=elapsed, peak_rss_kb=peak, messages=sum(acked_messages(db) or 0 for db in dbs.values()))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (/proc/PID/stat), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def consume(url: str, total: int, workdir: Path, timeout: float, stream: str = "TELEMETRY") -> dict:
    central = str(workdir / f"central-{stream}.db")
    log = workdir / f"consume-{stream}.log"
    cmd = [str(BIN / "telemetry-uplink"), "consume", "--db", central, "--servers", url, "--status-interval", "3600"]
    cmd += ["--stream", stream, "--subject-prefix", stream.lower()]
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
        cpu = cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return dict(elapsed=elapsed, peak_rss_kb=peak, stored=central_readings(central), cpu=cpu)


def ingest_rates(url: str, seconds: float, workdir: Path, nats_pid: int) -> dict:
    """bench/ingest.py's zero-loss search (2 readings a datagram, 100 sensors) of the collector
    alone and with a live `telemetry-uplink run` publishing its database to the same
    nats-server, their steps taken in turn (each step with the uplink: it starts once the
    collector listens and, after the collector stopped, must ack its whole log within 30 s)."""
    spec = importlib.util.spec_from_file_location("bench_ingest", ROOT / "bench" / "ingest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = argparse.Namespace(
        seconds=seconds,
        sensors=100,
        n_readings=2,
        start=25_000,
        max_rate=400_000,
        bisect_steps=3,
        collector_core=0,
        sender_core=1,
        flush_interval=1.0,
        batch_size=20_000,
        rcvbuf=8 * 1024 * 1024,
        signed=False,
    )
    if (os.cpu_count() or 1) < 2:
        args.collector_core = args.sender_core = None
    out: dict = {}
    behind: list[str] = []
    cpu: list[float] = []  # the uplink's CPU seconds per second of each step
    broker_cpu: list[float] = []  # the local nats-server's (on a real gateway the broker is elsewhere)

    def beside(db: str, step_dir: Path):
        log = step_dir / "uplink.log"
        # as deployed: the default poll interval (0.5 s), not the drain phases' 0.05 s
        cmd = uplink_cmd(db, "bench-ingest", url, 2)
        cmd[cmd.index("--poll-interval") + 1] = "0.5"
        proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)

        def stop() -> None:
            deadline = time.monotonic() + 30
            last = last_log_id(db)
            while position(db) < last and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            if position(db) < last:
                behind.append(f"{step_dir.name}: position {position(db)} of {last}")
            elapsed = time.monotonic() - started
            cpu.append(cpu_seconds(proc.pid) / elapsed)
            broker_cpu.append((cpu_seconds(nats_pid) - broker0) / elapsed)
            proc.terminate()
            proc.wait(30)

        started = time.monotonic()
        broker0 = cpu_seconds(nats_pid)

        return stop

    alone_args = argparse.Namespace(**vars(args), beside=None)
    with_args = argparse.Namespace(**vars(args), beside=beside)
    steps = [
        ("collector alone", lambda rate, _a, wd: mod.step_collector(rate, alone_args, wd)),
        ("collector + uplink", lambda rate, _a, wd: mod.step_collector(rate, with_args, wd)),
    ]
    # the two searches' steps in turn (A B, B A, ...): load from elsewhere falls on both alike
    with tempfile.TemporaryDirectory(dir=workdir) as wd:
        searches = mod.search_together(steps, args, wd)
    for label, (best, results) in searches.items():
        losses = [r["rate"] for r in results if not r["ok"]]
        out[label] = best and dict(
            offered=best["rate"] * args.n_readings,  # readings/s offered at the best zero-loss step
            achieved=best["stored_readings"] / best["send_elapsed"],  # what the sender managed to send
            first_loss=min(losses) * args.n_readings if losses else None,
        )
    out["behind"] = behind
    out["uplink_cpu"] = cpu
    out["broker_cpu"] = broker_cpu
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="outage length of the catch-up backlog (one gateway)")
    p.add_argument(
        "--distinct-minutes",
        type=float,
        default=2.0,
        help="minutes of the catch-up backlog generated; the rest repeats their rows under new ids",
    )
    p.add_argument("--rate", type=int, default=10_000, help="ingest readings/s during the outage")
    p.add_argument("--sensors", type=int, default=2000, help="sensors of each gateway (2 readings a datagram)")
    p.add_argument("--gateways", type=int, default=3, help="gateways feeding the central consumer")
    p.add_argument("--central-minutes", type=float, default=2.0, help="backlog of each gateway for the central phase")
    p.add_argument("--skip-ingest", action="store_true", help="do not measure the collector's ingest rate")
    p.add_argument("--ingest-seconds", type=float, default=2.0, help="length of each ingest step")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    hour = 10_000 * 3600
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as wd:
        workdir = Path(wd)
        nats, url = start_nats(workdir)
        try:
            shape = (
                f"{args.sensors} sensors, {args.rate / (2 * args.sensors):g} datagrams/s each of 2 readings, "
                "one ingest_log row per second"
            )
            # 1. catch-up: one gateway's backlog drained by payload 2 (and a payload-1 baseline on a
            # short backlog of the same shape, same run)
            print(f"catch-up backlog: {args.minutes:g} min at {args.rate:,} readings/s; {shape}", flush=True)
            big = str(workdir / "catchup.db")
            t = time.monotonic()
            entries, readings = fill(big, args.minutes, args.rate, args.sensors, 0, args.distinct_minutes)
            print(
                f"  filled {readings:,} readings in {entries} rows ({os.path.getsize(big) / 1e6:.0f} MB; "
                f"{args.distinct_minutes:g} min distinct, the rest repeated) in {time.monotonic() - t:.1f} s",
                flush=True,
            )
            r = drain({"catchup": big}, url, entries, workdir, args.timeout, stream="CATCHUP")
            fwd = readings / r["elapsed"]
            print(
                f"  payload 3: drained in {r['elapsed']:.2f} s = {fwd:,.0f} readings/s, {r['messages']:,} messages; "
                f"uplink peak RSS {r['peak_rss_kb'] / 1024:.1f} MB",
                flush=True,
            )
            small = str(workdir / "small.db")
            s_entries, s_readings = fill(small, args.central_minutes, args.rate, args.sensors, 1)
            base = str(workdir / "baseline.db")
            copy_db(small, base)
            b = drain({"baseline": base}, url, s_entries, workdir, args.timeout, payload=1, stream="CATCHUP")
            v1 = s_readings / b["elapsed"]
            print(
                f"  payload 1 baseline ({args.central_minutes:g} min, {s_readings:,} readings): {b['elapsed']:.2f} s = "
                f"{v1:,.0f} readings/s, {b['messages']:,} messages; peak RSS {b['peak_rss_kb'] / 1024:.1f} MB",
                flush=True,
            )
            # 2. central: the gateways' backlogs published at once (payload 3), then one consumer
            # drains them all; and the same backlogs as payload 2 (each datagram's identity kept
            # centrally, as before payload 3) to a stream of their own, drained the same way
            dbs = {}
            for g in range(args.gateways):
                dbs[f"site-{g}"] = str(workdir / f"gw{g}.db")
                copy_db(small, dbs[f"site-{g}"])
            c_pub = drain(dbs, url, s_entries, workdir, args.timeout, payload=3)
            dbs2 = {}
            for g in range(args.gateways):
                dbs2[f"site-{g}"] = str(workdir / f"gw{g}-p2.db")
                copy_db(small, dbs2[f"site-{g}"])
            drain(dbs2, url, s_entries, workdir, args.timeout, payload=2, stream="CENTRAL2")
            total = s_readings * args.gateways
            print(
                f"  {args.gateways} uplinks at once: {total:,} readings in {c_pub['elapsed']:.2f} s = "
                f"{total / c_pub['elapsed']:,.0f} readings/s together",
                flush=True,
            )
            c = consume(url, total, workdir, args.timeout)
            central_rate = c["stored"] / c["elapsed"]
            print(
                f"  central consumer (payload 3): {c['stored']:,} readings of {args.gateways} gateways in "
                f"{c['elapsed']:.2f} s = {central_rate:,.0f} readings/s ({c['stored'] / c['cpu']:,.0f} per CPU second "
                f"of the consumer); peak RSS {c['peak_rss_kb'] / 1024:.1f} MB; "
                f"central database {os.path.getsize(workdir / 'central-TELEMETRY.db') / 1e6:.0f} MB",
                flush=True,
            )
            c2 = consume(url, total, workdir, args.timeout, stream="CENTRAL2")
            central2_rate = c2["stored"] / c2["elapsed"]
            print(
                f"  central consumer (payload 2, same backlogs): {c2['elapsed']:.2f} s = {central2_rate:,.0f} "
                f"readings/s ({c2['stored'] / c2['cpu']:,.0f} per CPU second); peak RSS {c2['peak_rss_kb'] / 1024:.1f} MB; central database "
                f"{os.path.getsize(workdir / 'central-CENTRAL2.db') / 1e6:.0f} MB (payload 3 / payload 2 = "
                f"{central_rate / central2_rate:.2f})",
                flush=True,
            )
            ingest = None if args.skip_ingest else ingest_rates(url, args.ingest_seconds, workdir, nats.pid)
        finally:
            nats.terminate()
            nats.wait(30)
    print()
    print(
        f"uplink forward rate (payload 2, catch-up of {readings:,} readings): {fwd:,.0f} readings/s; "
        f"payload 1 in the same run: {v1:,.0f} readings/s (ratio {fwd / v1:.1f})"
    )
    if readings >= hour:
        print(
            f"catch-up after 1 h at 10,000 readings/s: measured {r['elapsed'] * hour / readings:.0f} s (target < 120 s)"
        )
    else:
        print(
            f"catch-up after 1 h at 10,000 readings/s ({hour:,} readings), extrapolated from "
            f"{readings:,}: {hour / fwd:.0f} s (target < 120 s)"
        )
    print(
        f"uplink peak RSS: {max(r['peak_rss_kb'], c_pub['peak_rss_kb']) / 1024:.1f} MB (target < 60 MB); "
        f"payload 1: {b['peak_rss_kb'] / 1024:.1f} MB"
    )
    print(
        f"central consumer: {central_rate:,.0f} readings/s with payload 3; {central2_rate:,.0f} with payload 2 "
        f"(ratio {central_rate / central2_rate:.2f})"
    )
    if ingest:
        alone, beside = ingest["collector alone"], ingest["collector + uplink"]
        for label, b in (("alone", alone), ("with the uplink running", beside)):
            if b:
                print(
                    f"collector zero-loss ingest, {label}: {b['offered']:,.0f} readings/s offered "
                    f"({b['achieved']:,.0f}/s achieved by the sender), first loss at "
                    + (f"{b['first_loss']:,.0f}" if b["first_loss"] else "none below the sender's ceiling")
                )
        if alone and beside:
            print(
                f"ingest with / without the uplink = {beside['offered'] / alone['offered']:.2f} (target: unchanged; "
                "the search resolves 1/8 of its last doubling; collector, sender, uplink and nats-server share the cores)"
            )
            print(
                f"uplink forward / collector ingest = {fwd / alone['offered']:.1f} (target >= 1); "
                f"central consumer / ({args.gateways} x ingest) = {central_rate / (args.gateways * alone['offered']):.2f} "
                "(target >= 1)"
            )
        else:
            print(f"collector zero-loss ingest: no passing step ({ingest})")
        if ingest["uplink_cpu"]:
            cpu = sorted(ingest["uplink_cpu"])
            print(
                f"uplink CPU while following the collector: median {100 * cpu[len(cpu) // 2]:.1f} % of a core "
                f"(max {100 * cpu[-1]:.1f} %) over {len(cpu)} ingest steps; the local nats-server beside them: "
                f"median {100 * sorted(ingest['broker_cpu'])[len(cpu) // 2]:.1f} % (on a gateway the broker is elsewhere)"
            )
        for line in ingest["behind"]:
            print(f"  UPLINK BEHIND at the end of an ingest step: {line}")
    print(
        f"(machine: {os.cpu_count()} cores, load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end: "
        "shared, figures are indicative)"
    )


if __name__ == "__main__":
    main()
