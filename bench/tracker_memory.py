"""How much memory does the sequence tracker keep per sensor under heavy loss?

Three runs, each in a fresh process so the figures do not mix:

* fleet: --sensors trackers (default 20,000, the documented MAX_SENSORS), each
  fed --datagrams seqs in order with --loss (default 0.5) of them dropped at
  random, then flushed as the collector does (gap changes popped, snapshot
  taken); prints bytes per sensor (tracemalloc: what Python allocated and
  still holds) and the growth of the process RSS.
* worst: --worst-sensors trackers driven to the limits: a stream of 8 x
  WINDOW seqs with every other one missing, then a boot restart whose new
  stream is as long as the previous boot is kept for (WINDOW - 1 seqs), also
  every other one missing: the most gap state a tracker can hold.
* collector (skipped with --no-collector): a real telemetry-collector fed by
  sensor-sim over loopback UDP, --sensors sensors at --collector-rate Hz,
  twice: --collector-seqs seqs each at --loss, and the baseline of the same
  run, half as many seqs with no loss (the same datagrams stored); prints
  both RSS (VmRSS and VmHWM from /proc) and the difference per sensor.

Each tracker run also reports an empty tracker's bytes (the baseline of the
same run).  Bounded: at most sensors x datagrams observe() calls per run; the
collector runs send sensors x seqs datagrams at a paced rate (~2 min in all
with the defaults, 40 s and 80 s of sending).

    .venv/bin/python bench/tracker_memory.py [--sensors 20000] [--datagrams 400] [--loss 0.5]

--datagrams defaults to 400 (the fleet run stays under a minute on a loaded
2-core machine); the per-sensor state stops growing after WINDOW seqs
anyway, and the worst run shows its ceiling.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

BIN = Path(sys.executable).parent


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def flush(t) -> None:  # noqa: ANN001
    """What the collector does with a dirty sensor at each flush."""
    t.pop_gap_changes()
    t.snapshot()


def run(mode: str, sensors: int, datagrams: int, loss: float, seed: int) -> dict:
    from collector.sequence import WINDOW, SensorTracker

    rng = random.Random(seed)
    gc.collect()
    rss0 = _rss_kib()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    empty = [SensorTracker() for _ in range(1000)]
    per_empty = (tracemalloc.get_traced_memory()[0] - base) / 1000
    del empty
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    trackers = [SensorTracker() for _ in range(sensors)]
    t0 = time.perf_counter()
    calls = 0
    if mode == "fleet":
        for t in trackers:
            observe = t.observe
            for seq in range(datagrams):
                if seq == 0 or rng.random() >= loss:
                    observe(1, seq, 1.0)
                    calls += 1
            flush(t)
    else:
        datagrams = 8 * WINDOW + WINDOW
        for t in trackers:
            observe = t.observe
            for seq in range(0, 8 * WINDOW, 2):
                observe(1, seq, 1.0)
                calls += 1
                if seq % 4096 == 0:
                    flush(t)
            for seq in range(0, WINDOW - 1, 2):
                observe(2, seq, 1.0)
                calls += 1
            flush(t)
    elapsed = time.perf_counter() - t0
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    gaps = sum(len(t.open_gaps()) for t in trackers)
    return {
        "mode": mode,
        "sensors": sensors,
        "datagrams": datagrams,
        "loss": loss if mode == "fleet" else 0.5,
        "observe_calls": calls,
        "seconds": round(elapsed, 1),
        "bytes_per_sensor": round(held / sensors),
        "empty_tracker_bytes": round(per_empty),
        "open_gaps_per_sensor": round(gaps / sensors, 1),
        "rss_growth_mib": round((_rss_kib() - rss0) / 1024, 1),
    }


# --- the collector run ---------------------------------------------------------------


def _counters(db: Path) -> dict:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return dict(conn.execute("SELECT name, value FROM counters"))
        finally:
            conn.close()
    except sqlite3.Error:
        return {}


def _status_kib(pid: int, field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) if m else 0


def collector_run(workdir: Path, sensors: int, seqs: int, loss: float, rate: float, seed: int) -> dict:
    """One collector process, one sensor-sim run into it; its RSS once everything is stored."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"loss{loss}-", dir=workdir))
    db, log = run_dir / "telemetry.db", run_dir / "collector.log"
    cmd = [str(BIN / "telemetry-collector"), "--db", str(db), "--listen", "127.0.0.1:0"]
    cmd += ["--status-interval", "3600", "--flush-interval", "1"]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logf)
    try:
        port = None
        deadline = time.monotonic() + 20
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"listening udp 127\.0\.0\.1:(\d+)", log.read_text())
            port = int(m.group(1)) if m else None
            time.sleep(0.05)
        if port is None:
            raise SystemExit(f"collector did not start: {log.read_text()}")
        rss_start = _status_kib(proc.pid, "VmRSS")
        report = run_dir / "truth.json"
        sim = [str(BIN / "sensor-sim"), "--target", f"127.0.0.1:{port}", "--sensors", str(sensors)]
        sim += ["--rate", str(rate), "--count", str(seqs), "--seed", str(seed), "--report", str(report)]
        if loss:
            sim += ["--loss", str(loss)]
        t0 = time.monotonic()
        subprocess.run(sim, check=True, stdout=subprocess.DEVNULL, timeout=seqs / rate * 3 + 60)
        send_s = time.monotonic() - t0
        truth = json.loads(report.read_text())
        sent = int(truth.get("datagrams_sent", 0))
        # Wait until everything received is stored (bounded).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            c = _counters(db)
            if c.get("received", 0) >= sent or (c and c.get("stored", 0) + c.get("kernel_drops", 0) >= sent):
                time.sleep(1.5)  # the flush after the last datagram
                break
            time.sleep(0.5)
        rss, hwm = _status_kib(proc.pid, "VmRSS"), _status_kib(proc.pid, "VmHWM")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    c = _counters(db)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    lost = conn.execute("SELECT sum(lost) FROM sensors").fetchone()[0] or 0
    gap_rows = conn.execute("SELECT count(*) FROM gaps").fetchone()[0]
    conn.close()
    return {
        "loss": loss,
        "seqs": seqs,
        "sent": sent,
        "send_s": round(send_s, 1),
        "stored": int(c.get("stored", 0)),
        "kernel_drops": int(c.get("kernel_drops", 0)),
        "lost": lost,
        "gap_rows": gap_rows,
        "rss_start_mib": round(rss_start / 1024, 1),
        "rss_mib": round(rss / 1024, 1),
        "hwm_mib": round(hwm / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sensors", type=int, default=20_000)
    ap.add_argument("--datagrams", type=int, default=400, help="seqs per sensor in the fleet run")
    ap.add_argument("--loss", type=float, default=0.5)
    ap.add_argument("--worst-sensors", type=int, default=50)
    ap.add_argument("--collector-seqs", type=int, default=80, help="seqs per sensor in the collector run")
    ap.add_argument("--collector-rate", type=float, default=1.0, help="Hz per sensor in the collector run")
    ap.add_argument("--no-collector", action="store_true", help="skip the collector runs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, sensors, datagrams = args.child.split(":")
        print(json.dumps(run(mode, int(sensors), int(datagrams), args.loss, args.seed)))
        return
    for mode, sensors, datagrams in (("fleet", args.sensors, args.datagrams), ("worst", args.worst_sensors, 0)):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                f"{mode}:{sensors}:{datagrams}",
                "--loss",
                str(args.loss),
                "--seed",
                str(args.seed),
            ],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if out.returncode != 0:
            sys.exit(out.stderr)
        r = json.loads(out.stdout)
        print(
            f"{r['mode']:5}  {r['sensors']} sensors x {r['datagrams']} seqs, loss {r['loss']:.0%}: "
            f"{r['bytes_per_sensor']:,} bytes per sensor (empty tracker {r['empty_tracker_bytes']} bytes), "
            f"{r['open_gaps_per_sensor']} open gaps per sensor, RSS +{r['rss_growth_mib']} MiB, "
            f"{r['observe_calls']:,} observe() in {r['seconds']} s",
            flush=True,
        )
    if args.no_collector:
        return
    with tempfile.TemporaryDirectory(prefix="tracker-memory-") as tmp:
        base = collector_run(Path(tmp), args.sensors, args.collector_seqs // 2, 0.0, args.collector_rate, args.seed)
        lossy = collector_run(Path(tmp), args.sensors, args.collector_seqs, args.loss, args.collector_rate, args.seed)
    for r in (base, lossy):
        print(
            f"collector  {args.sensors} sensors x {r['seqs']} seqs, loss {r['loss']:.0%}: sent {r['sent']:,} "
            f"in {r['send_s']} s, stored {r['stored']:,}, kernel drops {r['kernel_drops']}, lost {r['lost']:,} "
            f"({r['gap_rows']:,} gap rows); RSS {r['rss_start_mib']} MiB at start, {r['rss_mib']} MiB at the end "
            f"(peak {r['hwm_mib']} MiB)"
        )
    diff = (lossy["rss_mib"] - base["rss_mib"]) * 1024 * 1024 / args.sensors
    print(
        f"collector  RSS at {args.loss:.0%} loss minus the no-loss baseline of the same run: "
        f"{lossy['rss_mib'] - base['rss_mib']:+.1f} MiB, {diff:+,.0f} bytes per sensor"
    )


if __name__ == "__main__":
    main()
