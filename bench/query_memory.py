"""Worst-case memory of `telemetry-query serve`: clients that pipeline requests and never read.

Starts `telemetry-query serve` with its defaults as a child process (trustme
certificates, a database with one 10,000-reading series, so each request is
a maximum-size `readings` page of ~0.9 MB), then measures the server's RSS
(/proc/PID/status) in three phases of the same run:

  baseline  the server after one ping;
  idle      N clients with a finished TLS handshake and one answered ping,
            then silent: the cost of a connection that asks for nothing;
  hogs      N clients with a 4 KiB receive buffer that each write R
            `readings` requests at once and never read an answer: everything
            the server does not bound stays in its memory.

It prints RSS, peak RSS (VmHWM), the cost per hog and per idle connection,
what the kernel holds in TCP buffers
(/proc/net/sockstat, not in RSS), and the median and worst ping of a fresh
client while the hogs are connected.

    .venv/bin/python bench/query_memory.py [--clients 200] [--requests 64]

Clients default to 200 so that an unbounded server (before issue 13's fix it
held ~5 MB per hog) cannot exhaust a shared machine; 1,000 is the
server's default --max-connections: use 999 (a fresh client pings beside them).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from collector import wire  # noqa: E402
from collector.store import open_ingest  # noqa: E402

# bench/query.py's start_server (by path: the name would shadow the query package).
_spec = importlib.util.spec_from_file_location("bench_query", REPO / "bench" / "query.py")
bench_query = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_query)

ROWS = 10_000
REQUEST = b'{"op":"readings","sensor":"heavy","metric":"v","limit":10000}\n'


def build(path: str) -> None:
    """One sensor, one metric, ROWS readings, written as the collector writes them (storage v3)."""
    store, core = open_ingest(path)
    try:
        t0 = 1_764_000_000.0
        for i in range(ROWS):
            core.receive(wire.encode("heavy", i, {"v": 20 + (i % 997) / 7}, boot=1, ts=t0 + i * 0.37), t0 + i)
            if i % 2000 == 1999:
                assert store.flush(core, t0 + i)
        assert store.flush(core, t0 + ROWS)
    finally:
        store.close()


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def tcp_kernel_bytes() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * resource.getpagesize()
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def settle(pid: int, limit: float = 300.0) -> dict[str, int]:
    """Wait (bounded) until the server has nothing left to do: under 5 % of a core over 3 s,
    and RSS no longer growing.  Then every hog is stuck (or closed), and what it costs is held."""
    deadline = time.monotonic() + limit
    last_rss, last_cpu = status(pid)["VmRSS"], cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(3)
        rss, cpu = status(pid)["VmRSS"], cpu_seconds(pid)
        if cpu - last_cpu < 0.15 and rss <= last_rss * 1.01:
            return status(pid)
        last_rss, last_cpu = rss, cpu
    print(f"  (server still busy after {limit:g}s)")
    return status(pid)


def tls_connect(ctx: ssl.SSLContext, port: int, rcvbuf: int | None = None) -> ssl.SSLSocket:
    raw = socket.socket()
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: a small window
    raw.settimeout(30)
    raw.connect(("127.0.0.1", port))
    return ctx.wrap_socket(raw, server_hostname="localhost")


def ping(sock: ssl.SSLSocket) -> float:
    start = time.perf_counter()
    sock.sendall(b'{"op":"ping"}\n')
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise SystemExit("the server closed a ping connection")
        data += chunk
    return time.perf_counter() - start


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=64, help="requests each hog writes at once")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.clients * 2 + 200  # the server (a child) inherits the raised limit too
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "heavy.db")
        build(db)
        proc, port, ca = bench_query.start_server(db, Path(tmp))
        # Drain the server's log: a full pipe would block its loop on a log line.
        log_lines: list[str] = []
        drain = threading.Thread(target=lambda: log_lines.extend(proc.stderr), daemon=True)
        drain.start()
        try:
            ctx = ssl.create_default_context(cafile=ca)
            with tls_connect(ctx, port) as probe:
                ping(probe)
            base = settle(proc.pid, 30)
            kernel0 = tcp_kernel_bytes()
            print(
                f"server with defaults, {args.clients} clients, {args.requests} pipelined "
                f"10,000-row readings each (2-core VM shared with other jobs: figures vary)"
            )
            print(f"  baseline               RSS {mb(base['VmRSS'])}")

            idle = [tls_connect(ctx, port) for _ in range(args.clients)]
            for sock in idle:
                ping(sock)
            with_idle = settle(proc.pid, 60)
            for sock in idle:
                sock.close()
            settle(proc.pid, 30)  # the server has seen them go
            per_idle = (with_idle["VmRSS"] - base["VmRSS"]) / args.clients
            print(f"  {args.clients} idle clients       RSS {mb(with_idle['VmRSS'])}  ({per_idle / 1e3:,.1f} kB each)")

            hogs = []
            for _ in range(args.clients):
                sock = tls_connect(ctx, port, rcvbuf=4096)
                sock.sendall(REQUEST * args.requests)
                hogs.append(sock)
            with_hogs = settle(proc.pid)
            kernel = tcp_kernel_bytes() - kernel0
            with tls_connect(ctx, port) as fresh:
                pings = [ping(fresh) for _ in range(20)]
            # ESTABLISHED (1) from this side's TCP_INFO: the server has not closed it (unread data
            # would hide an EOF from recv).
            alive = sum(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 1 for sock in hogs)
            for sock in hogs:
                sock.close()
            per_hog = (with_hogs["VmRSS"] - base["VmRSS"]) / args.clients
            print(
                f"  {args.clients} non-reading hogs   RSS {mb(with_hogs['VmRSS'])}  "
                f"({per_hog / 1e3:,.1f} kB each); peak RSS {mb(with_hogs['VmHWM'])}"
            )
            evicted = sum("answers unread" in line for line in log_lines)
            print(
                f"  hogs still connected at the end: {alive} of {args.clients}; "
                f"closed by the output budget (log lines): {evicted}"
            )
            print(f"  kernel TCP buffers (all sockets, not in RSS): {mb(kernel)}")
            print(
                f"  fresh client's ping meanwhile: median {statistics.median(pings) * 1e3:.2f} ms, "
                f"worst {max(pings) * 1e3:.2f} ms"
            )
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
