"""How much hostile or idle peers delay everyone else on `telemetry-query serve`.

The tests (tests/test_query_server.py) prove on any machine that a client is
served while such peers are held; how long it waits is a figure of this
machine, measured here instead.  Starts `telemetry-query serve` with its
defaults as a child process (trustme certificates, a database of one
10,000-reading series written through the store's chunk path), then, in each phase, times 200 fresh clients
(TCP connect + TLS handshake + one ping) and 200 pings on one open
connection, and prints p50/p99/max in milliseconds beside the baseline
phase with no other peer, measured in the same run:

  baseline   nobody else connected;
  idle       500 clients with a finished handshake, then silent;
  stalled    50 TCP connections that never finish (half of them stop inside
             a ClientHello) and one plaintext client;
  flood      one client pipelining 1,500 `aggregate` requests and reading
             the answers (another thread), while the pings run.

    .venv/bin/python bench/query_peers.py [--samples 200]
"""

from __future__ import annotations

import argparse
import importlib.util
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
sys.path.insert(0, str(REPO / "tests"))

from query_fixtures import fill_series  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_query_memory", REPO / "bench" / "query_memory.py")
bench_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_memory)

FLOOD = b'{"op":"aggregate","sensor":"heavy","metric":"v","bucket":1}\n'


def fresh_ping_ms(ctx: ssl.SSLContext, port: int) -> float:
    start = time.perf_counter()
    with bench_memory.tls_connect(ctx, port) as sock:
        sock.sendall(b'{"op":"ping"}\n')
        assert sock.recv(4096).endswith(b"\n")
    return (time.perf_counter() - start) * 1000


def open_ping_ms(sock: ssl.SSLSocket) -> float:
    start = time.perf_counter()
    sock.sendall(b'{"op":"ping"}\n')
    assert sock.recv(4096).endswith(b"\n")
    return (time.perf_counter() - start) * 1000


def figures(values: list[float]) -> tuple[float, float, float]:
    values = sorted(values)
    return statistics.median(values), values[min(len(values) - 1, int(len(values) * 0.99))], values[-1]


def measure(ctx: ssl.SSLContext, port: int, samples: int) -> dict[str, tuple[float, float, float]]:
    fresh = [fresh_ping_ms(ctx, port) for _ in range(samples)]
    with bench_memory.tls_connect(ctx, port) as sock:
        held = [open_ping_ms(sock) for _ in range(samples)]
    return {"fresh client": figures(fresh), "open connection": figures(held)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="pings per kind and phase")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    results: dict[str, dict[str, tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "peers.db")
        fill_series(db, "heavy", "v", 10_000)
        proc, port, ca = bench_memory.bench_query.start_server(db, Path(tmp))
        try:
            ctx = ssl.create_default_context(cafile=ca)
            results["baseline"] = measure(ctx, port, args.samples)

            idle = [bench_memory.tls_connect(ctx, port) for _ in range(500)]
            for sock in idle:
                open_ping_ms(sock)
            results["500 idle"] = measure(ctx, port, args.samples)
            for sock in idle:
                sock.close()

            stalled = []
            for i in range(50):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                if i % 2:
                    s.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then silence
                stalled.append(s)
            plain = socket.create_connection(("127.0.0.1", port), timeout=5)
            plain.sendall(b'{"op":"ping"}\n')
            stalled.append(plain)
            results["50 stalled + plaintext"] = measure(ctx, port, args.samples)
            for s in stalled:
                s.close()

            hog = bench_memory.tls_connect(ctx, port)
            hog.settimeout(60)
            count = 1500

            def drain() -> None:
                f = hog.makefile("rb")
                for _ in range(count):
                    f.readline()

            reader = threading.Thread(target=drain)
            reader.start()
            hog.sendall(FLOOD * count)
            results["pipelining flood"] = measure(ctx, port, args.samples)
            reader.join(60)
            hog.close()
        finally:
            proc.terminate()
            proc.wait(10)

    base = results["baseline"]
    print(f"{'phase':<24} {'kind':<16} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p99 / baseline':>15}")
    for phase, kinds in results.items():
        for kind, (p50, p99, worst) in kinds.items():
            ratio = p99 / base[kind][1] if base[kind][1] else float("nan")
            print(f"{phase:<24} {kind:<16} {p50:8.2f} {p99:8.2f} {worst:8.2f} {ratio:15.2f}")


if __name__ == "__main__":
    main()
