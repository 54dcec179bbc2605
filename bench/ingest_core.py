"""The collector's per-datagram cost without sockets: `_process` bursts, then flushes.

Feeds pre-encoded datagrams (100 sensors, 2 readings each by default, in
order; the values and whole-second sensor times of bench/ingest.py's sender) to a real Collector's `_process` in bursts of 256, flushing whenever
the batch holds --batch-size readings as the loop does, into a real SQLite
file in a temp directory.  The Collector's clock is the datagrams' receive
time (--rate datagrams per second of it), so heads close by count as they
would under that rate, not by span; a full head closes (Store.close_one)
after each half chunk of datagrams, as the loop does under continuous traffic.  Prints, per
run and as medians, CPU microseconds per datagram (process time, so a loaded
machine inflates it less than wall time) of the hot path, of those closes,
and of everything with the flushes, and the
longest flush in wall milliseconds (zero loss depends on the longest stall
against what the socket buffer holds).  Run it from two checkouts to compare
(it uses whatever `collector` package is first on sys.path: the working
directory):

    .venv/bin/python bench/ingest_core.py
    .venv/bin/python bench/ingest_core.py --readings 5
    .venv/bin/python bench/ingest_core.py --rate 200000 --runs 2 --reference   # closes against the pre-numpy close
    (cd /path/to/other/checkout && /path/to/.venv/bin/python bench/ingest_core.py)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())

from collector import wire  # noqa: E402
from collector.server import Collector, Settings, _Source  # noqa: E402

VALUES = {"temp": 21.53, "hum": 40.2, "pres": 1013.25, "bat": 3.712, "count": 123456}


def feed(c: Collector, data: list[bytes], clock: list[float], t0: float, rate: float, batch_size: int):
    """`data` through the Collector `c` as its loop would: `_process` bursts of 256 at receive
    time t0 + i / rate (into clock[0]), a full head closed per half a chunk received, a flush whenever
    the batch holds batch_size readings, and one at the end.  (hot path, closes, flushes) in
    CPU seconds (process time) and the longest flush in wall seconds."""
    source = _Source(c.endpoints[0])
    proc = flush = idle = worst = 0.0
    closed_at = 0
    for start in range(0, len(data), 256):
        clock[0] = round(t0 + start / rate, 6)  # as Collector._drain rounds it
        t = time.process_time()
        c._process(data[start : start + 256], None, source, clock[0])
        proc += time.process_time() - t
        # Under continuous traffic the loop closes a full head per half a chunk received.
        if c.store.full and start + 256 - closed_at >= c.store.chunk_datagrams // 2:
            closed_at = start + 256
            t = time.process_time()
            c.store.close_one()
            idle += time.process_time() - t
        if c.core.pending_readings >= batch_size:
            t, w = time.process_time(), time.perf_counter()
            c.flush()
            flush += time.process_time() - t
            worst = max(worst, time.perf_counter() - w)
    t = time.process_time()
    c.flush()
    flush += time.process_time() - t
    return proc, idle, flush, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datagrams", type=int, default=300_000)
    ap.add_argument("--sensors", type=int, default=100)
    ap.add_argument("--readings", type=int, default=2, choices=range(1, 6))
    ap.add_argument("--rate", type=float, default=50_000, help="datagrams per second of receive time")
    ap.add_argument("--batch-size", type=int, default=20_000, help="readings that make a flush")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--reference",
        action="store_true",
        help="also close heads with the frozen pure-Python close path (tests/chunkstore_ref.py), "
        "runs alternating, and print the ratio of the closes",
    )
    args = ap.parse_args()
    sensors = args.sensors
    readings = dict(list(VALUES.items())[: args.readings])
    t0 = 1_700_000_000.0
    data = [
        wire.encode(f"bench-{i % sensors:04d}", i // sensors, readings, boot=1, ts=t0 + i // sensors)
        for i in range(args.datagrams)
    ]
    hot, total, longest, closes, reference = [], [], [], [], []
    for run in range(args.runs * (2 if args.reference else 1)):
        swap = _reference_close() if args.reference and run % 2 else contextlib.nullcontext()
        clock = [t0]
        with tempfile.TemporaryDirectory() as d:
            c = Collector(Settings(db=os.path.join(d, "b.db"), listen=(("127.0.0.1", 0),)), clock=lambda: clock[0])
            swap.__enter__()
            try:
                proc, idle, flush, worst = feed(c, data, clock, t0, args.rate, args.batch_size)
                closed = c.store.chunks_closed
            finally:
                swap.__exit__(None, None, None)
                c.server_close()
        if args.reference and run % 2:
            reference.append(idle / len(data) * 1e6)
            continue
        hot.append(proc / len(data) * 1e6)
        closes.append(idle / len(data) * 1e6)
        total.append((proc + flush + idle) / len(data) * 1e6)
        longest.append(worst * 1e3)
    print(
        f"collector from {os.path.dirname(sys.modules['collector'].__file__)}; {args.datagrams:,} datagrams of "
        f"{args.readings} readings from {sensors} sensors at {args.rate:,.0f}/s of receive time; "
        f"flush every {args.batch_size:,} readings; {closed} chunks closed; loadavg {os.getloadavg()[0]:.1f}"
    )
    for label, values, unit in (
        ("hot path (_process), CPU", hot, "us/datagram"),
        ("closes between flushes, CPU", closes, "us/datagram"),
        ("all, CPU", total, "us/datagram"),
        ("longest flush, wall", longest, "ms"),
    ):
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"{label:29s} median {statistics.median(values):7.2f} {unit}  (runs: {runs})")
    if reference:
        runs = ", ".join(f"{v:.2f}" for v in reference)
        ratio = statistics.median(reference) / statistics.median(closes)
        print(
            f"{'  reference close, CPU':29s} median {statistics.median(reference):7.2f} us/datagram  (runs: {runs}); x{ratio:.2f}"
        )


@contextlib.contextmanager
def _reference_close():
    """Heads close with the pure-Python close path frozen before numpy (tests/chunkstore_ref.py,
    minute blocks encoded by insert_chunk as then): the baseline, in the same run."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from collector import chunkstore  # noqa: PLC0415

    import chunkstore_ref  # noqa: PLC0415

    def close(head, fast=False):
        ref = chunkstore_ref.Head(head.sensor, head.boot, head.first_log_id, head.opened)
        ref.last_log_id, ref.seqs, ref.ts, ref.received, ref.metrics = (
            head.last_log_id,
            head.seqs,
            head.ts,
            head.received,
            head.metrics,
        )
        return chunkstore.ChunkRow(*ref.close(fast))

    saved = chunkstore.Head.close
    chunkstore.Head.close = close
    try:
        yield
    finally:
        chunkstore.Head.close = saved


if __name__ == "__main__":
    main()
