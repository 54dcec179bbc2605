"""How much memory does the sequence tracker keep per sensor under heavy loss?

Two runs, each in a fresh process so the figures do not mix:

* fleet: --sensors trackers (default 20,000, the documented MAX_SENSORS), each
  fed --datagrams seqs in order with --loss (default 0.5) of them dropped at
  random; prints bytes per sensor (tracemalloc: what Python allocated and
  still holds, after the run) and the growth of the process RSS.
* worst: --worst-sensors trackers fed until their gap state stops growing
  (every other seq missing, 4 x WINDOW + 4 x the remembered gaps), the state a
  sensor driven to the limits reaches; prints bytes per sensor.

Each run also reports an empty tracker's bytes (the baseline of the same
run).  Bounded: at most sensors x datagrams observe() calls per run.

    .venv/bin/python bench/tracker_memory.py [--sensors 20000] [--datagrams 3000] [--loss 0.5]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import time
import tracemalloc


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run(mode: str, sensors: int, datagrams: int, loss: float, seed: int) -> dict:
    from collector.sequence import MAX_OPEN_GAPS, WINDOW, SensorTracker

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
            t.pop_gap_changes()  # what each flush does: the change log is written and emptied
    else:
        n = 4 * WINDOW + 4 * MAX_OPEN_GAPS
        datagrams = n
        for t in trackers:
            observe = t.observe
            for seq in range(0, 2 * n, 2):
                observe(1, seq, 1.0)
                calls += 1
                if seq % 4096 == 0:
                    t.pop_gap_changes()
            t.pop_gap_changes()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sensors", type=int, default=20_000)
    ap.add_argument("--datagrams", type=int, default=3_000, help="seqs per sensor in the fleet run")
    ap.add_argument("--loss", type=float, default=0.5)
    ap.add_argument("--worst-sensors", type=int, default=50)
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
            f"{r['observe_calls']:,} observe() in {r['seconds']} s"
        )


if __name__ == "__main__":
    main()
