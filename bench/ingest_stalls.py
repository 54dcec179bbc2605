"""What holds the collector's loop away from its sockets: the gaps between two reads, under load.

Runs the collector (pinned to one core, as bench/ingest.py does) with its
loop instrumented from outside (wrappers around `Collector._drain`,
`Store.write` (a flush's transaction), `Store.close_one`, `Store.maintain` and
a gc callback; the collector's code is not changed), offers a fixed rate from
bench/ingest.py's sender (pinned to the other core) for a bounded time, and
prints:

- the distribution of the gaps between the end of one drain and the start of
  the next (everything the loop does that is not reading: flushes, closes,
  maintenance, GC), in wall time and in the loop thread's CPU time (the CPU
  figure leaves out time another process took the core, so it holds on a
  loaded machine), with how many passed 5, 10 and 20 ms;
- the longest gaps and what ran inside them (flush datagrams, heads closed,
  its COMMIT's share; closes between drains; GC generation 2 passes);
- sent, stored and kernel drops, and what a gap of each size costs against
  the socket buffer at this rate (the buffer holds ~830 bytes per datagram);
- the flushes: how full the receive queue was at each one's start and end,
  and the kernel drops that came while one ran against all (`--timeline`
  lists every flush).

`--events` also samples the socket from outside every ~2.4 ms (queue, drops,
arrivals, the loop thread's time on and waiting for a CPU) and lists, for each
drop episode, the queue's climb and every step of the collector's threads that
overlapped it (docs/OPERATIONS.md, session 11).

Flushes and closes run in the collector's writer thread (what runs in a gap
is then what either thread did meanwhile); `--writer loop` runs them in the
loop's own thread as session 5 did, and `--writer both --pairs N` runs the
two in turn, for a ratio from one run; `--switch-interval 0.005 0.0005`
does the same for the GIL switch interval the collector serves with.

Run it from a checkout to measure that checkout's collector (the package in
the working directory comes first), e.g. main before and after a change:

    .venv/bin/python bench/ingest_stalls.py --rate 150000 --seconds 8 --readings 5
    .venv/bin/python bench/ingest_stalls.py --rate 162500 --readings 2 --clock wall --writer both --pairs 2
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


def instrumented(out: str, cpu: bool, loop_writes: bool, switch: float | None, record_events: bool = False) -> None:
    """In the collector's process: wrap the loop's steps, run the CLI, write the record at exit."""
    import atexit
    import gc

    sys.path.insert(0, os.getcwd())
    from collector import net
    from collector import store as store_mod
    from collector.cli import main
    from collector.server import Collector, Settings

    clock = time.thread_time if cpu else time.perf_counter
    gaps: list[float] = []
    longest: list[tuple[float, float, list]] = []  # (at, gap, what ran inside)
    state: dict = {"end": None, "inside": [], "socks": []}
    flushes: list[tuple] = []  # (at, wall s, datagrams, fill before, fill after, drops before, drops after)
    # --events: (kind, start, end (time.perf_counter: CLOCK_MONOTONIC, the parent's clock too),
    # the thread's CPU s, detail) of every step either thread took, and the loop's gaps over 2 ms.
    events: list[tuple] = []
    t0 = time.perf_counter()

    def socket_state() -> tuple[float, int]:
        """The fullest receive queue (share of its buffer) and the kernel drops of all sockets, now."""
        fills = [net.queue_fill(s) or 0.0 for s in state["socks"]]
        drops = [net.read_drops(s) or 0 for s in state["socks"]]
        return max(fills, default=0.0), sum(drops)

    drain = Collector._drain

    def timed_drain(self, source):
        if not state["socks"]:
            state["socks"] = [ep.sock for ep in self.endpoints]
        t = clock()
        if record_events and state.get("end_wall") is not None:
            now = time.perf_counter()
            if now - state["end_wall"] > 0.002:
                events.append(("gap", state["end_wall"], now, None, None))
        if state["end"] is not None:
            gap = t - state["end"]
            gaps.append(gap)
            if gap > 0.005:
                longest.append((round(time.perf_counter() - t0, 3), gap, state["inside"]))
        state["inside"] = []
        drain(self, source)
        state["end"] = clock()
        state["end_wall"] = time.perf_counter()

    write = store_mod.Store.write

    def timed_write(self, job):
        marks = {}

        def trace(sql: str) -> None:
            if sql.startswith("COMMIT") and "commit" not in marks:  # the flush's (a maintenance step's follows)
                marks["commit"] = clock()

        self.conn.set_trace_callback(trace)
        datagrams, closed = job.batch.count, self.chunks_closed
        fill0, drops0 = socket_state()
        wal = Path(self.path + "-wal")
        wal0 = wal.stat().st_size if wal.exists() else 0
        cpu0 = time.thread_time()
        w = time.perf_counter()
        t = clock()
        committed_groups = self.committed_groups

        def timed_committed_groups(*args):  # the first thing after the COMMIT returns
            marks["committed"] = clock()
            return committed_groups(*args)

        self.committed_groups = timed_committed_groups
        try:
            write(self, job)
        finally:
            del self.committed_groups
        e = clock()
        fill1, drops1 = socket_state()
        w1 = time.perf_counter()
        flushes.append((round(w - t0, 3), w1 - w, datagrams, fill0, fill1, drops0, drops1))
        self.conn.set_trace_callback(None)
        commit = marks["committed"] - marks["commit"] if "committed" in marks else None
        if record_events:
            detail = {
                "datagrams": datagrams,
                "closed": self.chunks_closed - closed,
                "commit_ms": round(commit * 1e3, 1) if commit is not None else None,
                "wal": [wal0, wal.stat().st_size if wal.exists() else 0],
                "maintain": job.counters is not None,
            }
            events.append(("write", w, w1, time.thread_time() - cpu0, detail))
        state["inside"].append(
            ("flush", e - t, {"datagrams": datagrams, "closed": self.chunks_closed - closed, "commit": commit})
        )

    def wrap(cls, name: str) -> None:
        func = getattr(cls, name)

        def timed(self, *args, **kwargs):
            t = clock()
            w, c = time.perf_counter(), time.thread_time()
            result = func(self, *args, **kwargs)
            state["inside"].append((name, clock() - t, None))
            if record_events:
                events.append((name, w, time.perf_counter(), time.thread_time() - c, None))
            return result

        setattr(cls, name, timed)

    store_mod.Store.write = timed_write
    post_init = Settings.__post_init__

    def settings_init(self) -> None:
        post_init(self)
        if loop_writes:  # session 5's way: flushes and closes in the loop's own thread
            self.writer_thread = False
        if switch is not None:
            self.switch_interval = switch

    Settings.__post_init__ = settings_init
    Collector._drain = timed_drain
    wrap(store_mod.Store, "close_one")
    wrap(store_mod.Store, "maintain")
    if record_events:
        wrap(store_mod.Store, "begin")  # the take, in the loop's thread
        wrap(Collector, "_start_writing")  # the writer thread's start (the loop waits for it)
        wrap(Collector, "_end_writing")
    gc_started = [0.0, 0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_started[0] = clock()
            gc_started[1] = time.perf_counter()
        else:
            if info["generation"] == 2:
                state["inside"].append(("gc2", clock() - gc_started[0], None))
            if record_events:
                events.append((f"gc{info['generation']}", gc_started[1], time.perf_counter(), None, None))

    gc.callbacks.append(on_gc)

    def dump() -> None:
        longest.sort(key=lambda x: -x[1])
        Path(out).write_text(json.dumps({"gaps": gaps, "longest": longest[:12], "flushes": flushes, "events": events}))

    atexit.register(dump)
    sys.argv = ["telemetry-collector", *sys.argv[sys.argv.index("--") + 1 :]]
    main()


class Sampler:
    """The collector's socket from outside, every `every` s, in a thread of this process pinned to
    the sender's core: (time.perf_counter, bytes queued (rx_queue: truesize, what the buffer
    counts), the socket's drops, UDP datagrams the host delivered plus dropped for lack of
    buffer (/proc/net/snmp: the arrivals, whoever sent them), and ns the loop's thread ran, ns it
    waited runnable, ns the other threads ran (/proc/PID/task/TID/schedstat))."""

    def __init__(self, port: int, core: int | None, pid: int, every: float = 0.002) -> None:
        import threading

        self.port, self.core, self.every, self.pid = f":{port:04X}", core, every, pid
        self.samples: list[tuple] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> tuple[int, int, int, int, int, int] | None:
        rx = drops = None
        with open("/proc/net/udp") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 12 and parts[1].endswith(self.port) and parts[1][8:9] == ":":
                    rx, drops = int(parts[4].split(":")[1], 16), int(parts[-1])
                    break
        if rx is None:
            return None
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        names, values = rows[0], rows[1]
        arrived = int(values[names.index("InDatagrams")]) + int(values[names.index("RcvbufErrors")])
        # The loop's thread (the process's main thread): ns on a CPU and ns runnable but waiting
        # for one; and ns on a CPU of the process's other threads (the writers).
        loop_run = loop_wait = others = 0
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                    run, wait, _ = f.read().split()
                if int(tid) == self.pid:
                    loop_run, loop_wait = int(run), int(wait)
                else:
                    others += int(run)
        except OSError:
            pass
        return rx, drops, arrived, loop_run, loop_wait, others

    def _run(self) -> None:
        import threading

        if self.core is not None:
            os.sched_setaffinity(threading.get_native_id(), {self.core})
        while not self._stop.is_set():
            got = self._read()
            if got is not None:
                self.samples.append((time.perf_counter(), *got))
            self._stop.wait(self.every)

    def stop(self) -> list[tuple]:
        self._stop.set()
        self._thread.join()
        return self.samples


def explain(samples: list, events: list, granted: int, rate: float, t0: float, show: int) -> None:
    """The drop episodes the sampler saw, each with the queue's climb before it, the arrival rate
    over that climb, and every step of the collector's threads that overlapped it."""
    if not samples:
        print("  (no socket samples)")
        return

    def writer_cpu(a: float, b: float) -> float:
        """The writer threads' CPU from a to b: each job's, in proportion to its overlap."""
        total = 0.0
        for kind, start, end, cpu, _ in events:
            if kind in ("write", "close_one") and cpu is not None and end > a and start < b:
                total += cpu * (min(end, b) - max(start, a)) / max(end - start, 1e-9)
        return total

    episodes: list[list[int]] = []  # [first sample index with new drops, last]
    for i in range(1, len(samples)):
        if samples[i][2] > samples[i - 1][2]:
            if episodes and samples[i][0] - samples[episodes[-1][1]][0] < 0.05:
                episodes[-1][1] = i
            else:
                episodes.append([i, i])
    peak = max(s[1] for s in samples)
    gaps = [b[0] - a[0] for a, b in zip(samples, samples[1:], strict=False)]
    first_s, last_s = samples[0], samples[-1]
    kinds: dict[str, list[float]] = {}
    for kind, start, end, cpu, _ in events:
        k = kinds.setdefault(kind, [0, 0.0, 0.0, 0.0])
        k[0] += 1
        k[1] += end - start
        k[2] = max(k[2], end - start)
        k[3] += cpu or 0.0
    print(
        "  steps (count, wall s in all, longest ms, CPU s): "
        + "; ".join(f"{kind} {n:,} {w:.3f} {m * 1e3:.1f} {c:.3f}" for kind, (n, w, m, c) in sorted(kinds.items()))
    )
    print(
        f"  the loop's thread over the run: ran {(last_s[4] - first_s[4]) / 1e9:.2f} s, runnable but waiting for a "
        f"CPU {(last_s[5] - first_s[5]) / 1e9:.2f} s; the writer threads ran {writer_cpu(first_s[0], last_s[0]):.2f} s"
    )
    print(
        f"  sampler: {len(samples):,} samples (median every {sorted(gaps)[len(gaps) // 2] * 1e3:.1f} ms, longest "
        f"{max(gaps) * 1e3:.1f} ms); queue max {peak / granted:.0%}; drop episodes {len(episodes)}"
    )
    # The arrival rate in 50 ms windows: the sender's own bursts (catching up after it was held).
    arrivals = []
    j = 0
    for i in range(len(samples)):
        while samples[i][0] - samples[j][0] > 0.05:
            j += 1
        if samples[i][0] - samples[j][0] > 0.04:
            arrivals.append((samples[i][3] - samples[j][3]) / (samples[i][0] - samples[j][0]))
    if arrivals:
        arrivals.sort()
        print(
            f"  arrivals per 50 ms window, datagrams/s: p50 {arrivals[len(arrivals) // 2]:,.0f}, "
            f"max {arrivals[-1]:,.0f} (offered {rate:,.0f})"
        )

    for first, last in episodes[:12]:
        rise = first
        while rise > 0 and samples[rise - 1][1] > granted * 0.25:
            rise -= 1
        a, b = samples[rise][0], samples[last][0]
        span = max(samples[first][0] - a, 1e-9)
        inflow = (samples[first][3] - samples[rise][3]) / span
        r0, r1 = samples[rise], samples[first]
        print(
            f"    drops +{samples[last][2] - samples[first - 1][2]:,} at {samples[first][0] - t0:6.3f}-"
            f"{b - t0:6.3f} s; queue over 25 % from {a - t0:6.3f} s ({(samples[first][0] - a) * 1e3:.0f} ms before); "
            f"arrivals over the climb {inflow:,.0f}/s; over it the loop's thread ran {(r1[4] - r0[4]) / 1e6:.1f} ms, "
            f"waited for a CPU {(r1[5] - r0[5]) / 1e6:.1f} ms; the writer threads ran {writer_cpu(a, r1[0]) * 1e3:.1f} ms"
        )
        for kind, start, end, cpu, detail in events:
            if end >= a - 0.005 and start <= b:
                if kind in ("gc0", "_end_writing", "begin", "_start_writing") and end - start < 0.001:
                    continue
                cpu_text = f", cpu {cpu * 1e3:.1f} ms" if cpu is not None else ""
                print(
                    f"      {kind:14s} {start - t0:7.3f}-{end - t0:7.3f} s ({(end - start) * 1e3:6.1f} ms{cpu_text})"
                    f"{' ' + json.dumps(detail) if detail else ''}"
                )


def run(args, cpu: bool, writer: str, switch: float | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="stalls-") as d:
        db, log, out = Path(d) / "t.db", Path(d) / "c.log", Path(d) / "record.json"
        flags = [*(["--_cpu"] if cpu else []), *(["--_loop-writes"] if writer == "loop" else [])]
        flags += ["--_switch", str(switch)] if switch is not None else []
        flags += ["--_events"] if args.events else []
        program = (sys.executable, __file__, "--_instrumented", str(out), *flags, "--")
        proc, port = ingest.start_collector(db, log, args, tuple(args.collector_arg), program=program)
        granted = int(re.search(r"granted (\d+)", log.read_text()).group(1))
        sampler = Sampler(port, args.sender_core, proc.pid) if args.events else None
        t_send = time.perf_counter()
        try:
            sent = ingest.run_sender(
                port, args.rate, args.seconds, args.sensors, args.sender_core, False, args.readings
            )
            stored, last, deadline = -1, -2, time.monotonic() + 30
            while time.monotonic() < deadline and stored != last and stored < sent["sent"]:
                time.sleep(1.1)  # a flush interval and a little
                last, stored = stored, ingest.read_counters(db).get("stored", 0)
        finally:
            samples = sampler.stop() if sampler is not None else []
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
        f"{kind}, writes in the {'writer thread' if writer == 'thread' else 'loop thread'}"
        f"{f', switch interval {switch * 1e3:g} ms' if switch is not None else ''}"
        f": sent {sent['sent']:,} in {sent['elapsed']:.2f} s, stored {int(c.get('stored', 0)):,}, kernel drops "
        f"{int(c.get('kernel_drops', 0)):,}; loadavg {os.getloadavg()[0]:.1f}; the buffer ({granted:,} bytes) holds "
        f"~{holds:.0f} ms at this rate; the sender fell {sent.get('behind_max', 0) * 1e3:.1f} ms behind at most"
    )
    print(
        f"  gaps between reads ({kind}): {len(gaps):,}; p50 {q(0.5):.2f} p99 {q(0.99):.2f} p99.9 {q(0.999):.2f} "
        f"max {gaps[-1] * 1e3:.2f} ms; over 5 ms {sum(g > 0.005 for g in gaps)}, over 10 ms "
        f"{sum(g > 0.01 for g in gaps)}, over 20 ms {sum(g > 0.02 for g in gaps)}"
    )
    flushes = record.get("flushes", [])
    if flushes:
        # Drops that arrived while a flush ran, against all: what holds the loop when the queue overflows.
        during = sum(f[6] - f[5] for f in flushes)
        print(
            f"  flushes {len(flushes)} (wall p50 {sorted(f[1] for f in flushes)[len(flushes) // 2] * 1e3:.1f} ms, "
            f"max {max(f[1] for f in flushes) * 1e3:.1f} ms); kernel drops during flushes {during:,} of "
            f"{int(c.get('kernel_drops', 0)):,}; queue fill at a flush's end: max {max(f[4] for f in flushes):.0%}, "
            f"at its start: max {max(f[3] for f in flushes):.0%}"
        )
        if args.timeline:
            for at, wall, n, fill0, fill1, d0, d1 in flushes:
                print(
                    f"    flush at {at:6.2f} s: {wall * 1e3:6.1f} ms wall, {n:,} datagrams, queue "
                    f"{fill0:.0%} -> {fill1:.0%}, drops +{d1 - d0:,} (total {d1:,})"
                )
    if args.events:
        late = sent.get("late", [])
        if late:  # runs of late rounds: (start of the run, how late at most)
            runs: list[list[float]] = []
            for due, behind in late:
                if runs and due - runs[-1][0] < runs[-1][1] + 0.01:
                    runs[-1][1] = max(runs[-1][1], behind)
                else:
                    runs.append([due, behind])
            print(
                "  the sender late (at s: ms behind): "
                + ", ".join(f"{sent['t0'] + due - t_send:.3f}: {b * 1e3:.1f}" for due, b in runs[:12])
            )
        explain(samples, record.get("events", []), granted, args.rate, t_send, args.show)
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
        ours = sys.argv[: sys.argv.index("--")]
        switch = float(ours[ours.index("--_switch") + 1]) if "--_switch" in ours else None
        instrumented(sys.argv[i + 1], "--_cpu" in ours, "--_loop-writes" in ours, switch, "--_events" in ours)
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
    ap.add_argument(
        "--writer",
        choices=("both", "thread", "loop"),
        default="thread",
        help="flushes and closes in the writer thread (the default) or in the loop's thread (session 5's way), "
        "or both in turn",
    )
    ap.add_argument(
        "--switch-interval",
        type=float,
        nargs="+",
        help="the collector's GIL switch interval (s), one run each in turn (default: the CLI's, "
        "tuning.WRITER_SWITCH_INTERVAL_S; Python's own is 0.005)",
    )
    ap.add_argument("--pairs", type=int, default=1, help="runs of each (turns alternated)")
    ap.add_argument("--timeline", action="store_true", help="list every flush: queue fill and drops around it")
    ap.add_argument("--clock", choices=("both", "wall", "cpu"), default="both", help="one run per clock")
    ap.add_argument(
        "--events",
        action="store_true",
        help="sample the socket from outside every 2 ms (queue, drops, arrivals) and list, for each drop "
        "episode, the queue's climb and every step of the collector's threads that overlapped it",
    )
    ap.add_argument(
        "--collector-arg", action="append", default=[], help="one more telemetry-collector option (--collector-arg=--x)"
    )
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        args.collector_core = args.sender_core = None
    switches = args.switch_interval or [None]
    writers = {"both": ("thread", "loop"), "thread": ("thread",), "loop": ("loop",)}[args.writer]
    for _ in range(args.pairs):
        for cpu in {"both": (False, True), "wall": (False,), "cpu": (True,)}[args.clock]:
            for writer in writers:
                for switch in switches:
                    run(args, cpu, writer, switch)
                switches = switches[::-1]
            writers = writers[::-1]  # A B, B A: whatever else loads the machine falls on both


if __name__ == "__main__":
    main()
