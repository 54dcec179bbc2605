"""Where the real collector's CPU goes at a fixed rate: per process, per thread, per datagram.

Starts `telemetry-collector` pinned to one core (as bench/ingest.py does),
offers a fixed rate from bench/ingest.py's sender pinned to the other core,
and reads /proc before and after the traffic: utime+stime of the process and
of the loop's thread (/proc/PID/task/*/stat; the writer's CPU is the
process's minus the loop's: the collector starts a thread per write),
voluntary and involuntary context switches (the loop's, and those of every
thread alive at the second read), and what was stored.  Printed: CPU
microseconds per datagram received (user, system, the loop, the rest),
switches per second, the share of a core from just before the traffic to
just after it, stored against sent and kernel drops: the real process's
figure to set beside bench/ingest_core.py's in-process one.

`--against DIR` runs another checkout's collector (DIR/.venv/bin/telemetry-collector)
in turn with this one's, `--pairs N` times, for an A/B from one run.
bench/profile_ingest.py samples the functions (py-spy).

    .venv/bin/python bench/ingest_cpu.py --rate 60000 100000 --seconds 6
    .venv/bin/python bench/ingest_cpu.py --rate 90000 --against /work/main --pairs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ingest  # noqa: E402  (bench/ingest.py: its sender, collector start, counters)

TICK = os.sysconf("SC_CLK_TCK")


def _stat_cpu(path: Path) -> tuple[int, int]:
    """(utime, stime) in clock ticks from a /proc stat file."""
    text = path.read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])


def snapshot(pid: int) -> dict:
    proc = Path(f"/proc/{pid}")
    user, system = _stat_cpu(proc / "stat")
    threads = {}
    for task in (proc / "task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            threads[int(task.name)] = (name, *_stat_cpu(task / "stat"))
        except OSError:
            pass  # a writer thread that ended meanwhile
    switches = dict.fromkeys(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches", "all"), 0)
    for task in (proc / "task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if "ctxt_switches" in line:
                key, value = line.split(":")
                switches["all"] += int(value)
                if task.name == str(pid):  # the loop's own
                    switches[key] = int(value)
    return {"user": user, "system": system, "threads": threads, "switches": switches, "t": time.monotonic()}


def one_run(label: str, program: tuple[str, ...], rate: float, args, workdir: Path) -> dict:
    step_dir = Path(tempfile.mkdtemp(prefix="cpu-", dir=workdir))
    db, log = step_dir / "telemetry.db", step_dir / "collector.log"
    proc, port = ingest.start_collector(db, log, args, program=program)
    try:
        time.sleep(0.5)
        before = snapshot(proc.pid)
        sent = ingest.run_sender(port, rate, args.seconds, args.sensors, args.sender_core, n_readings=args.readings)
        # Let the collector read the rest of what was sent (a second at most).
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            c = ingest.read_counters(db)
            if c.get("received", 0) >= sent["sent"]:
                break
            time.sleep(0.2)
        after = snapshot(proc.pid)
    finally:
        ingest.stop_process(proc)
    c = ingest.read_counters(db)
    received = max(int(c.get("received", 0)), 1)
    loop_tid = proc.pid  # the loop runs in the main thread
    loop_user = after["threads"][loop_tid][1] - before["threads"][loop_tid][1]
    loop_sys = after["threads"][loop_tid][2] - before["threads"][loop_tid][2]
    loop_ticks = loop_user + loop_sys
    user = after["user"] - before["user"]
    system = after["system"] - before["system"]
    us = 1e6 / TICK / received
    span = after["t"] - before["t"]
    r = {
        "label": label,
        "rate": rate,
        "sent": sent["sent"],
        "received": received,
        "stored": int(c.get("stored", 0)),
        "kernel_drops": int(c.get("kernel_drops", 0)),
        "cpu_us": (user + system) * us,
        "user_us": user * us,
        "sys_us": system * us,
        "loop_us": loop_ticks * us,
        "loop_sys_us": loop_sys * us,
        "other_us": (user + system - loop_ticks) * us,
        "core": (user + system) / TICK / span,
        "all_switches_per_s": (after["switches"]["all"] - before["switches"]["all"]) / span,
        "vol_per_s": (after["switches"]["voluntary_ctxt_switches"] - before["switches"]["voluntary_ctxt_switches"])
        / span,
        "invol_per_s": (
            after["switches"]["nonvoluntary_ctxt_switches"] - before["switches"]["nonvoluntary_ctxt_switches"]
        )
        / span,
    }
    return r


def print_run(r: dict) -> None:
    print(
        f"{r['label']:>8} {r['rate']:>9,.0f}/s sent {r['sent']:>9,} stored {r['stored']:>9,} drops {r['kernel_drops']:>7,}"
        f"  CPU {r['cpu_us']:5.2f} us/dgram (user {r['user_us']:5.2f} sys {r['sys_us']:5.2f};"
        f" loop {r['loop_us']:5.2f} (sys {r['loop_sys_us']:4.2f}) other threads {r['other_us']:5.2f})"
        f" {100 * r['core']:3.0f}% of a core"
        f"  loop switches/s vol {r['vol_per_s']:6,.0f} invol {r['invol_per_s']:6,.0f};"
        f" all threads {r['all_switches_per_s']:6,.0f}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, nargs="+", default=[60_000, 100_000])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--sensors", type=int, default=100)
    p.add_argument("--readings", type=int, default=2)
    p.add_argument("--collector-core", type=int, default=0)
    p.add_argument("--sender-core", type=int, default=1)
    p.add_argument("--flush-interval", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=20_000)
    p.add_argument("--rcvbuf", type=int, default=4 * 1024 * 1024, help="as bench/ingest.py asks")
    p.add_argument("--against", type=Path, help="another checkout: its .venv/bin/telemetry-collector, in turn")
    p.add_argument("--pairs", type=int, default=1)
    args = p.parse_args()
    programs = [("this", (str(ingest.BIN / "telemetry-collector"),))]
    if args.against:
        programs.append(("against", (str(args.against / ".venv" / "bin" / "telemetry-collector"),)))
    print(f"load average {os.getloadavg()}; {args.sensors} sensors, {args.readings} readings per datagram")
    results: dict[tuple[str, float], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ingest-cpu-") as tmp:
        for _ in range(args.pairs):
            for rate in args.rate:
                for label, program in programs:
                    r = one_run(label, program, rate, args, Path(tmp))
                    print_run(r)
                    results.setdefault((label, rate), []).append(r)
    if args.pairs > 1 or args.against:
        print("medians:")
        for (label, rate), rs in results.items():
            med = {k: statistics.median(x[k] for x in rs) for k in ("cpu_us", "loop_us", "other_us", "sys_us")}
            lost = sum(x["sent"] - x["stored"] for x in rs)
            print(
                f"{label:>8} {rate:>9,.0f}/s CPU {med['cpu_us']:5.2f} us/dgram (loop {med['loop_us']:5.2f},"
                f" other {med['other_us']:5.2f}, sys {med['sys_us']:5.2f}); lost {lost:,} in {len(rs)} runs"
            )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
