"""Where the collector's time goes under load: py-spy samples a running collector.

Starts the collector (pinned to one core) under `py-spy record`, offers a
fixed rate from bench/ingest.py's sender (pinned to the other core) for a
bounded time, then prints the functions with the most samples, self and
inclusive.  py-spy is a public tool on PyPI (pip install py-spy); it is not
a dependency of the project.

    .venv/bin/python bench/profile_ingest.py --rate 40000 --seconds 8
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))

import ingest  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=40_000)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--sensors", type=int, default=100)
    p.add_argument("--readings", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--collector-core", type=int, default=0)
    p.add_argument("--sender-core", type=int, default=1)
    args = p.parse_args()
    spy = shutil.which("py-spy") or (str(BIN / "py-spy") if (BIN / "py-spy").exists() else None)
    if spy is None:
        raise SystemExit("py-spy is missing: .venv/bin/pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw, log = tmp / "stacks.txt", tmp / "collector.log"
        cmd = [
            *ingest.taskset(args.collector_core),
            spy,
            "record",
            "--format",
            "raw",
            "-o",
            str(raw),
            "--rate",
            "250",
            "--nonblocking",
            "--",
            str(BIN / "telemetry-collector"),
            "--db",
            str(tmp / "t.db"),
            "--listen",
            "127.0.0.1:0",
            "--status-interval",
            "3600",
        ]
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logf)
        try:
            port, deadline = None, time.monotonic() + 20
            while port is None and time.monotonic() < deadline:
                m = re.search(r"listening udp 127\.0\.0\.1:(\d+)", log.read_text())
                port = int(m.group(1)) if m else None
                time.sleep(0.05)
            if port is None:
                raise SystemExit(f"collector did not start: {log.read_text()[-2000:]}")
            sent = ingest.run_sender(
                port, args.rate, args.seconds, args.sensors, args.sender_core, n_readings=args.readings
            )
            time.sleep(1.5)  # the last flush
        finally:
            # py-spy passes SIGINT on to the collector, then writes its file.
            ingest.stop_process(proc, signal.SIGINT)
        counters = ingest.read_counters(tmp / "t.db")
        selfs, incl, total = collections.Counter(), collections.Counter(), 0
        for line in raw.read_text().splitlines() if raw.exists() else []:
            stack, _, n = line.rpartition(" ")
            if not stack:
                continue
            frames = [re.sub(r" \((?:.*/)?([\w.]+/[\w.]+\.py):\d+\)", r" (\1)", f) for f in stack.split(";")]
            total += int(n)
            selfs[frames[-1]] += int(n)
            for f in set(frames):
                incl[f] += int(n)
    print(
        f"offered {args.rate:,.0f}/s for {args.seconds:g} s: sent {sent['sent']:,}, collector received "
        f"{int(counters.get('received', 0)):,}, stored {int(counters.get('stored', 0)):,}, "
        f"kernel drops {int(counters.get('kernel_drops', 0)):,}; {total:,} samples"
    )
    if not total:
        raise SystemExit(f"py-spy wrote no samples: {log.read_text()[-2000:]}")
    print(f"\n{'self %':>7}  function")
    for f, n in selfs.most_common(args.top):
        print(f"{100 * n / total:7.1f}  {f}")
    print(f"\n{'incl %':>7}  function")
    for f, n in incl.most_common(args.top):
        print(f"{100 * n / total:7.1f}  {f}")


if __name__ == "__main__":
    main()
