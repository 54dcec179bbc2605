"""The collector's per-datagram cost without sockets: `_process` bursts, then flushes.

Feeds pre-encoded datagrams (100 sensors, 2 readings each, in order) to a
real Collector's `_process` in bursts of 256, flushing every 10,000 readings
as the loop would, into a real SQLite file in a temp directory.  Prints the
median microseconds per datagram of the hot path alone and with the flushes,
over several runs.  Run it from two checkouts to compare (it uses whatever
`collector` package is first on sys.path):

    .venv/bin/python bench/ingest_core.py
    (cd /path/to/other/checkout && /path/to/.venv/bin/python bench/ingest_core.py)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())

from collector import wire  # noqa: E402
from collector.server import Collector, Settings, _Source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datagrams", type=int, default=60_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    sensors = 100
    data = [
        wire.encode(
            f"bench-{i % sensors:04d}",
            i // sensors,
            {"temp": 21.5 + (i % 7) / 100, "hum": 40.25},
            boot=1,
            ts=1_700_000_000.0 + i / sensors,
        )
        for i in range(args.datagrams)
    ]
    hot, total = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            c = Collector(Settings(db=os.path.join(d, "b.db"), listen=(("127.0.0.1", 0),)))
            try:
                source = _Source(c.endpoints[0])
                proc = flush = 0.0
                now = 1_700_000_000.0
                for start in range(0, len(data), 256):
                    t0 = time.perf_counter()
                    c._process(data[start : start + 256], None, source, now)
                    t1 = time.perf_counter()
                    proc += t1 - t0
                    if (start // 256) % 20 == 19:  # ~5,000 datagrams = 10,000 readings
                        c.flush()
                        flush += time.perf_counter() - t1
                    now += 0.05
                t1 = time.perf_counter()
                c.flush()
                flush += time.perf_counter() - t1
            finally:
                c.server_close()
        hot.append(proc / len(data) * 1e6)
        total.append((proc + flush) / len(data) * 1e6)
    print(f"collector from {os.path.dirname(sys.modules['collector'].__file__)}")
    print(
        f"hot path (_process): median {statistics.median(hot):.2f} us/datagram  (runs: "
        + ", ".join(f"{v:.2f}" for v in hot)
        + ")"
    )
    print(
        f"with flushes:        median {statistics.median(total):.2f} us/datagram  (runs: "
        + ", ".join(f"{v:.2f}" for v in total)
        + ")"
    )


if __name__ == "__main__":
    main()
