"""Write amplification of the collector: bytes it writes to disk per byte of datagrams it received.

Starts a real collector (its own process, a fresh database in a temp dir) and
the simulator: 2,000 sensors x 2.5 Hz x 3 readings (the issue's soak) for
--duration seconds.  Reads the collector's /proc/PID/io `write_bytes` (what
it made the kernel write to storage: WAL, checkpoints, chunks, everything)
at the start and end, and its CPU time per interval, and divides by the
datagram bytes the collector counted as received (each datagram's size
measured by encoding one the way the simulator does).  Also prints the file
size at the end and the collector's CPU share per interval (flat = not rising
with the file).  Linux only (/proc).

    .venv/bin/python bench/store_wa.py                  # the issue's 10-minute run
    .venv/bin/python bench/store_wa.py --duration 120   # quicker
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def io_write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/PID/io")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def counters(db: str) -> dict:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT name, value FROM counters"))
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600, the issue's run)")
    ap.add_argument("--sensors", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=2.5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        db = os.path.join(d, "wa.db")
        log = open(os.path.join(d, "collector.log"), "w+")
        collector = subprocess.Popen(
            [str(BIN / "telemetry-collector"), "--db", db, "--listen", "127.0.0.1:0"],
            stderr=log,
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            port = None
            while port is None:
                if time.monotonic() > deadline or collector.poll() is not None:
                    sys.exit("the collector did not start: " + Path(log.name).read_text()[-2000:])
                found = re.search(r"started: udp 127\.0\.0\.1:(\d+)", Path(log.name).read_text())
                port = int(found.group(1)) if found else None
                time.sleep(0.1)
            w0, c0, t0 = io_write_bytes(collector.pid), cpu_seconds(collector.pid), time.monotonic()
            sim = subprocess.Popen(
                [
                    str(BIN / "sensor-sim"),
                    "--target",
                    f"127.0.0.1:{port}",
                    "--sensors",
                    str(args.sensors),
                    "--rate",
                    str(args.rate),
                    "--duration",
                    str(args.duration),
                    "--metrics",
                    "temp,hum,battery",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            shares = []
            last_c, last_t = c0, t0
            while sim.poll() is None and time.monotonic() - t0 < args.duration + 60:
                time.sleep(10)
                c, t = cpu_seconds(collector.pid), time.monotonic()
                shares.append((c - last_c) / (t - last_t))
                last_c, last_t = c, t
            sim.wait(30)
            time.sleep(3)  # two flushes: everything received is written
            w1 = io_write_bytes(collector.pid)
            c = counters(db)
            wal = db + "-wal"
            file_bytes = os.path.getsize(db) + (os.path.getsize(wal) if os.path.exists(wal) else 0)
            collector.send_signal(signal.SIGTERM)
            collector.wait(60)
        finally:
            if collector.poll() is None:
                collector.kill()
                collector.wait()
        from collector import wire  # noqa: PLC0415

        size = len(
            wire.encode(
                "sim-0001", 123456, {"temp": 21.37, "hum": 45.6, "battery": 3.912}, boot=1234567, ts=1_700_000_000.123
            )
        )
        received_bytes = int(c["received"]) * size
        print(
            f"{args.sensors} sensors x {args.rate} Hz x 3 readings for {args.duration:g} s: "
            f"received {int(c['received'])} datagrams (~{size} B each, {received_bytes / 1e6:.1f} MB), "
            f"stored {int(c['stored'])}, kernel_drops {int(c['kernel_drops'])}"
        )
        written = w1 - w0
        print(
            f"collector wrote {written / 1e6:.1f} MB (/proc/PID/io write_bytes): "
            f"{written / max(received_bytes, 1):.2f} bytes written per datagram byte received; "
            f"database + WAL at the end {file_bytes / 1e6:.1f} MB"
        )
        print("collector CPU share per 10 s:", " ".join(f"{s:.2f}" for s in shares))
        if len(shares) >= 6:
            third = len(shares) // 3
            first, last = statistics.median(shares[:third]), statistics.median(shares[-third:])
            print(
                f"CPU flat? median share of the first third {first:.2f}, of the last third {last:.2f} "
                f"(last/first {last / max(first, 1e-9):.2f}; the file grew meanwhile)"
            )


if __name__ == "__main__":
    main()
