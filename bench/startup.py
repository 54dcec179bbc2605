"""How long the command line programs take to start and answer: wall and CPU time.

An operator's `telemetry-query latest` run by hand or by a script every
minute, and every `--help`, pay Python's start plus the imports of the
program before any work; the test suite starts these programs hundreds of
times.  Each case is run --n times as a child process; the CPU time is the
child's own (user + system, from wait4), the wall time is from fork to exit.
Prints the median of each.

With --against DIR (another checkout, e.g. main before a change; its
`.venv/bin` is used, or DIR itself when it holds the scripts), the same
cases run with that checkout's programs too, in turn with this one's in
every round (same load for both), and the ratios this / against are shown.

`latest` asks a real query server (this checkout's `telemetry-query serve`,
trustme certificates) over TLS, about a database this checkout's collector
wrote from `sensor-sim` (10 sensors x 3 metrics, 5 datagrams each): the
server is the same for both sides, only the client differs.

    .venv/bin/python bench/startup.py [--n 15] [--against /tmp/main-checkout]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(sys.executable).parent


def scripts_of(path: str) -> Path:
    """The directory holding a checkout's console scripts."""
    for candidate in (Path(path) / ".venv" / "bin", Path(path) / "bin", Path(path)):
        if (candidate / "telemetry-query").exists():
            return candidate.resolve()
    raise SystemExit(f"--against {path}: no telemetry-query in {path}/.venv/bin, {path}/bin or {path}")


def wait_line(proc: subprocess.Popen, pattern: str, what: str) -> re.Match:
    assert proc.stderr is not None
    for line in proc.stderr:
        found = re.search(pattern, line)
        if found:
            return found
    raise SystemExit(f"{what} exited {proc.wait()} before it was ready")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)


def make_database(tmp: Path) -> Path:
    """A database this checkout's collector wrote from sensor-sim's datagrams."""
    db = tmp / "telemetry.db"
    collector = subprocess.Popen(
        [HERE / "telemetry-collector", "--db", db, "--listen", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True
    )
    port = wait_line(collector, r"listening udp 127\.0\.0\.1:(\d+)", "telemetry-collector").group(1)
    wait_line(collector, r"started: ", "telemetry-collector")
    subprocess.run(
        [HERE / "sensor-sim", "--target", f"127.0.0.1:{port}", "--sensors", "10", "--count", "5", "--rate", "max"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # the last datagrams into the collector's socket before SIGTERM flushes them
    stop(collector)
    return db


def start_server(db: Path, tmp: Path) -> tuple[subprocess.Popen, int, str]:
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.cert_chain_pems[0].write_to_path(str(tmp / "server.pem"))
    leaf.private_key_pem.write_to_path(str(tmp / "server.key"))
    proc = subprocess.Popen(
        [HERE / "telemetry-query", "serve", "--db", db, "--listen", "127.0.0.1:0"]
        + ["--cert", tmp / "server.pem", "--key", tmp / "server.key"],
        stderr=subprocess.PIPE,
        text=True,
    )
    port = int(wait_line(proc, r"listening tls 127\.0\.0\.1:(\d+)", "telemetry-query serve").group(1))
    return proc, port, str(tmp / "ca.pem")


def run_once(argv: list) -> tuple[float, float]:
    """(wall, cpu) seconds of one run; exits if the command failed."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise SystemExit(f"{' '.join(map(str, argv))} exited {os.waitstatus_to_exitcode(status)}:\n{err}")
    if proc.stderr:
        proc.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=15, help="runs of each case (per side)")
    parser.add_argument("--against", help="another checkout: its programs run in turn with this one's")
    args = parser.parse_args()
    sides = {"this": HERE}
    if args.against:
        sides["against"] = scripts_of(args.against)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        db = make_database(tmp)
        server, port, ca = start_server(db, tmp)
        try:
            cases = {
                "telemetry-collector --help": ["telemetry-collector", "--help"],
                "telemetry-query --help": ["telemetry-query", "--help"],
                "telemetry-query latest": ["telemetry-query", "--server", f"127.0.0.1:{port}", "--ca", ca, "latest"],
                "telemetry-uplink --help": ["telemetry-uplink", "--help"],
                "sensor-sim --help": ["sensor-sim", "--help"],
            }
            times: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for argv in cases.values():  # a warm-up run of each: page cache, the server's first answer
                for bin_dir in sides.values():
                    run_once([bin_dir / argv[0], *argv[1:]])
            for _ in range(args.n):
                for name, argv in cases.items():
                    for side, bin_dir in sides.items():
                        times.setdefault((name, side), []).append(run_once([bin_dir / argv[0], *argv[1:]]))
        finally:
            stop(server)
    print(f"median of {args.n} runs; this: {HERE}" + (f"; against: {sides['against']}" if args.against else ""))
    head = f"{'command':<28} {'wall ms':>8} {'cpu ms':>7}"
    if args.against:
        head += f" | {'against wall':>12} {'cpu':>6} | {'wall x':>6} {'cpu x':>6}"
    print(head)
    for name in cases:
        wall, cpu = (statistics.median(v) * 1000 for v in zip(*times[(name, "this")]))
        line = f"{name:<28} {wall:8.0f} {cpu:7.0f}"
        if args.against:
            a_wall, a_cpu = (statistics.median(v) * 1000 for v in zip(*times[(name, "against")]))
            line += f" | {a_wall:12.0f} {a_cpu:6.0f} | {wall / a_wall:6.2f} {cpu / a_cpu:6.2f}"
        print(line)


if __name__ == "__main__":
    main()
