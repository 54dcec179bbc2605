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
* collector (skipped with --no-collector): the collector's ingest core and
  store (collector/ingest.py, store.py: what telemetry-collector runs, minus
  its sockets, so no kernel drop or pacing blurs the figure) on a fresh
  database, --sensors sensors sending round robin, twice: --collector-seqs
  seqs each at --loss, and the baseline of the same run, half as many seqs
  with no loss (the same datagrams stored); prints both RSS (/proc VmRSS)
  and the difference per sensor.

Each tracker run also reports an empty tracker's bytes (the baseline of the
same run).  Bounded: at most sensors x datagrams observe() calls per run, and
sensors x seqs datagrams per collector run (~2 min in all with the defaults
on a quiet 2-core machine, 4 when it is loaded).

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


def collector_run(sensors: int, seqs: int, loss: float, seed: int, batch: int) -> dict:
    """The collector's ingest core and store (collector/ingest.py, store.py: what
    telemetry-collector runs, without its sockets) on a fresh database; RSS at the end."""
    from collector import wire
    from collector.store import open_ingest

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="tracker-memory-") as tmp:
        store, core = open_ingest(str(Path(tmp) / "telemetry.db"))
        rss0 = _rss_kib()
        t0 = time.perf_counter()
        received = 0
        now = 1_764_000_000.0
        names = [f"sim-{i:05d}" for i in range(sensors)]
        for seq in range(seqs):  # round robin over the sensors, as datagrams arrive
            now += 1.0
            for name in names:
                if seq and rng.random() < loss:
                    continue
                core.receive(wire.encode(name, seq, {"temp": 20.5, "hum": 40.0, "bat": 3.7}, boot=1, ts=now), now)
                received += 1
                if core.pending_readings >= batch:
                    assert store.flush(core, now)
        assert store.flush(core, now + 1)
        elapsed = time.perf_counter() - t0
        gc.collect()
        rss = _rss_kib()
        lost = sum(state.tracker.lost for state in core.sensors.values())
        store.close()
    return {
        "loss": loss,
        "seqs": seqs,
        "received": received,
        "lost": lost,
        "seconds": round(elapsed, 1),
        "rss_start_mib": round(rss0 / 1024, 1),
        "rss_mib": round(rss / 1024, 1),
    }


def child(spec: str, loss: float, seed: int, batch: int) -> dict:
    """Run one measurement in a fresh interpreter, so that figures do not mix."""
    cmd = [sys.executable, __file__, "--child", spec, "--loss", str(loss), "--seed", str(seed)]
    out = subprocess.run(cmd + ["--batch-size", str(batch)], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        sys.exit(out.stderr)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sensors", type=int, default=20_000)
    ap.add_argument("--datagrams", type=int, default=400, help="seqs per sensor in the fleet run")
    ap.add_argument("--loss", type=float, default=0.5)
    ap.add_argument("--worst-sensors", type=int, default=10)
    ap.add_argument("--collector-seqs", type=int, default=40, help="seqs per sensor in the collector run")
    ap.add_argument("--batch-size", type=int, default=20_000, help="readings per flush in the collector run")
    ap.add_argument("--no-collector", action="store_true", help="skip the collector runs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, sensors, datagrams = args.child.split(":")
        if mode == "collector":
            r = collector_run(int(sensors), int(datagrams), args.loss, args.seed, args.batch_size)
        else:
            r = run(mode, int(sensors), int(datagrams), args.loss, args.seed)
        print(json.dumps(r))
        return
    for mode, sensors, datagrams in (("fleet", args.sensors, args.datagrams), ("worst", args.worst_sensors, 0)):
        r = child(f"{mode}:{sensors}:{datagrams}", args.loss, args.seed, args.batch_size)
        print(
            f"{r['mode']:5}  {r['sensors']} sensors x {r['datagrams']} seqs, loss {r['loss']:.0%}: "
            f"{r['bytes_per_sensor']:,} bytes per sensor (empty tracker {r['empty_tracker_bytes']} bytes), "
            f"{r['open_gaps_per_sensor']} open gaps per sensor, RSS +{r['rss_growth_mib']} MiB, "
            f"{r['observe_calls']:,} observe() in {r['seconds']} s",
            flush=True,
        )
    if args.no_collector:
        return
    # The baseline: half the seqs, none lost, so the same datagrams are stored.
    found = []
    for seqs, loss in ((args.collector_seqs // 2, 0.0), (args.collector_seqs, args.loss)):
        r = child(f"collector:{args.sensors}:{seqs}", loss, args.seed, args.batch_size)
        found.append(r)
        print(
            f"collector  {args.sensors} sensors x {r['seqs']} seqs, loss {r['loss']:.0%}: {r['received']:,} "
            f"datagrams stored, lost {r['lost']:,}, in {r['seconds']} s; RSS {r['rss_start_mib']} MiB "
            f"after start, {r['rss_mib']} MiB at the end",
            flush=True,
        )
    base, lossy = found
    diff = lossy["rss_mib"] - base["rss_mib"]
    print(
        f"collector  RSS at {args.loss:.0%} loss minus the no-loss baseline of the same run: "
        f"{diff:+.1f} MiB, {diff * 1024 * 1024 / args.sensors:+,.0f} bytes per sensor"
    )


if __name__ == "__main__":
    main()
