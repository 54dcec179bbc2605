"""What holds the collector's loop away from its sockets: the gaps between two reads, under load.

Runs the collector (pinned to one core, as bench/ingest.py does) with its
loop instrumented from outside (wrappers around `Collector._drain`,
`Store.flush`, `Store.close_one`, `Store.maintain` and a gc callback; the
collector's code is not changed), offers a fixed rate from bench/ingest.py's
sender (pinned to the other core) for a bounded time, and prints:

- the distribution of the gaps between the end of one drain and the start of
  the next (everything the loop does that is not reading: flushes, closes,
  maintenance, GC), in wall time and in the loop thread's CPU time (the CPU
  figure leaves out time another process took the core, so it holds on a
  loaded machine), with how many passed 5, 10 and 20 ms;
- the longest gaps and what ran inside them (flush datagrams, heads closed,
  its COMMIT's share; closes between drains; GC generation 2 passes);
- sent, stored and kernel drops, and what a gap of each size costs against
  the socket buffer at this rate (the buffer holds ~830 bytes per datagram).

Run it from a checkout to measure that checkout's collector (the package in
the working directory comes first), e.g. main before and after a change:

    .venv/bin/python bench/ingest_stalls.py --rate 150000 --seconds 8 --readings 5
    (cd /path/to/other/checkout && /path/to/.venv/bin/python /path/to/bench/ingest_stalls.py --rate 150000)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ingest  # noqa: E402  (bench/ingest.py: its sender, taskset, counters)


def instrumented(out: str, cpu: bool) -> None:
    """In the collector's process: wrap the loop's steps, run the CLI, write the record at exit."""
    import atexit
    import gc

    sys.path.insert(0, os.getcwd())
    from collector import store as store_mod
    from collector.cli import main
    from collector.server import Collector

    clock = time.thread_time if cpu else time.perf_counter
    gaps: list[float] = []
    longest: list[tuple[float, float, list]] = []  # (at, gap, what ran inside)
    state: dict = {"end": None, "inside": []}
    t0 = time.perf_counter()

    drain = Collector._drain

    def timed_drain(self, source):
        t = clock()
        if state["end"] is not None:
            gap = t - state["end"]
            gaps.append(gap)
            if gap > 0.005:
                longest.append((round(time.perf_counter() - t0, 3), gap, state["inside"]))
        state["inside"] = []
        drain(self, source)
        state["end"] = clock()

    flush = store_mod.Store.flush

    def timed_flush(self, core, now, monotonic=None):
        marks = {}

        def trace(sql: str) -> None:
            if sql.startswith("COMMIT"):
                marks["commit"] = clock()

        self.conn.set_trace_callback(trace)
        datagrams, closed = core.pending_datagrams, self.chunks_closed
        t = clock()
        ok = flush(self, core, now, monotonic)
        e = clock()
        self.conn.set_trace_callback(None)
        commit = e - marks["commit"] if "commit" in marks else None
        state["inside"].append(
            ("flush", e - t, {"datagrams": datagrams, "closed": self.chunks_closed - closed, "commit": commit})
        )
        return ok

    def wrap(cls, name: str) -> None:
        func = getattr(cls, name)

        def timed(self, *args, **kwargs):
            t = clock()
            result = func(self, *args, **kwargs)
            state["inside"].append((name, clock() - t, None))
            return result

        setattr(cls, name, timed)

    store_mod.Store.flush = timed_flush
    Collector._drain = timed_drain
    wrap(store_mod.Store, "close_one")
    wrap(store_mod.Store, "maintain")
    gc_started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_started[0] = clock()
        elif info["generation"] == 2:
            state["inside"].append(("gc2", clock() - gc_started[0], None))

    gc.callbacks.append(on_gc)

    def dump() -> None:
        longest.sort(key=lambda x: -x[1])
        Path(out).write_text(json.dumps({"gaps": gaps, "longest": longest[:12]}))

    atexit.register(dump)
    sys.argv = ["telemetry-collector", *sys.argv[sys.argv.index("--") + 1 :]]
    main()


def run(args, cpu: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="stalls-") as d:
        db, log, out = Path(d) / "t.db", Path(d) / "c.log", Path(d) / "record.json"
        program = (sys.executable, __file__, "--_instrumented", str(out), *(["--_cpu"] if cpu else []), "--")
        proc, port = ingest.start_collector(db, log, args, program=program)
        granted = int(re.search(r"granted (\d+)", log.read_text()).group(1))
        try:
            sent = ingest.run_sender(
                port, args.rate, args.seconds, args.sensors, args.sender_core, False, args.readings
            )
            stored, last, deadline = -1, -2, time.monotonic() + 30
            while time.monotonic() < deadline and stored != last and stored < sent["sent"]:
                time.sleep(1.1)  # a flush interval and a little
                last, stored = stored, ingest.read_counters(db).get("stored", 0)
        finally:
            ingest.stop_process(proc)
        c = ingest.read_counters(db)
        record = json.loads(out.read_text())
    gaps = sorted(record["gaps"])
    if not gaps:
        raise SystemExit("no gaps recorded")

    def q(p: float) -> float:
        return gaps[min(len(gaps) - 1, int(len(gaps) * p))] * 1e3

    holds = granted / 830 / args.rate * 1e3
    kind = "loop thread CPU" if cpu else "wall"
    print(
        f"{kind}: sent {sent['sent']:,} in {sent['elapsed']:.2f} s, stored {int(c.get('stored', 0)):,}, kernel drops "
        f"{int(c.get('kernel_drops', 0)):,}; loadavg {os.getloadavg()[0]:.1f}; the buffer ({granted:,} bytes) holds "
        f"~{holds:.0f} ms at this rate"
    )
    print(
        f"  gaps between reads ({kind}): {len(gaps):,}; p50 {q(0.5):.2f} p99 {q(0.99):.2f} p99.9 {q(0.999):.2f} "
        f"max {gaps[-1] * 1e3:.2f} ms; over 5 ms {sum(g > 0.005 for g in gaps)}, over 10 ms "
        f"{sum(g > 0.01 for g in gaps)}, over 20 ms {sum(g > 0.02 for g in gaps)}"
    )
    for at, gap, inside in record["longest"][: args.show]:
        parts = []
        for name, took, info in inside:
            if name == "flush":
                commit = f", commit {info['commit'] * 1e3:.1f}" if info["commit"] is not None else ""
                parts.append(
                    f"flush {took * 1e3:.1f} ms ({info['datagrams']:,} datagrams, {info['closed']} closed{commit})"
                )
            elif took > 0.0005:
                parts.append(f"{name} {took * 1e3:.1f} ms")
        print(f"    at {at:6.2f} s: {gap * 1e3:6.1f} ms: {'; '.join(parts) or '(nothing timed: another process?)'}")


def main() -> None:
    if "--_instrumented" in sys.argv:
        i = sys.argv.index("--_instrumented")
        instrumented(sys.argv[i + 1], "--_cpu" in sys.argv[: sys.argv.index("--")])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=150_000, help="datagrams per second offered")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--readings", type=int, default=5, choices=range(1, 6))
    ap.add_argument("--sensors", type=int, default=100)
    ap.add_argument("--rcvbuf", type=int, default=4 * 1024 * 1024, help="as bench/ingest.py asks (rmem_max here)")
    ap.add_argument("--collector-core", type=int, default=0)
    ap.add_argument("--sender-core", type=int, default=1)
    ap.add_argument("--flush-interval", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=20_000)
    ap.add_argument("--show", type=int, default=6, help="longest gaps to list")
    ap.add_argument("--clock", choices=("both", "wall", "cpu"), default="both", help="one run per clock")
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        args.collector_core = args.sender_core = None
    for cpu in {"both": (False, True), "wall": (False,), "cpu": (True,)}[args.clock]:
        run(args, cpu)


if __name__ == "__main__":
    main()
