"""Query latency through the real TLS query server, beside the same requests run in-process.

The database is bench/store_query.py's (storage v3, built through the store's
own chunk path): 20 sensors x 5 metrics at 1 Hz for a day, sensor s07's temp
for --days days, and --head-seconds of open heads in the ingest log.  Starts
`telemetry-query serve` as a child process with trustme certificates and
times, over one TLS connection, --n requests of each of store_query.py's
cases (latest, 1,000-reading pages, aggregates), then the same requests on a
query.ops.Ops in this process (what a server worker runs, no TLS, no JSON
framing).  Prints p50/p99 of both and the ratio of the p50s (what the server
and the protocol add).  Issue 9's targets are for what the user sees: latest
p99 < 5 ms, a 1,000-reading page p99 < 10 ms, a 30-day 1-hour aggregate p99
< 50 ms.

    .venv/bin/python bench/query.py [--n 300] [--days 30] [--db /tmp/q.db (build once, reuse)]
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import store_query  # noqa: E402

from collector.schema import open_reader  # noqa: E402
from query.client import QueryClient  # noqa: E402
from query.ops import Ops  # noqa: E402
from query.protocol import parse_request  # noqa: E402


def start_server(db: str, certs: Path):
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    leaf = ca.issue_cert("localhost")
    leaf.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    leaf.private_key_pem.write_to_path(str(certs / "server.key"))
    exe = Path(sys.executable).parent / "telemetry-query"
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--db",
            db,
            "--listen",
            "127.0.0.1:0",
            "--cert",
            str(certs / "server.pem"),
            "--key",
            str(certs / "server.key"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        found = re.search(r"listening tls 127\.0\.0\.1:(\d+)", line)
        if found:
            return proc, int(found.group(1)), str(certs / "ca.pem")
    raise SystemExit(f"server did not start (exit {proc.wait()})")


def ms(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples) * 1000, store_query.pct(samples, 0.99) * 1000


def main() -> None:
    args = store_query.arguments(__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = store_query.prepare(args.db, tmp, args.sensors, args.days, args.head_seconds)
        cases = store_query.cases(args.days)
        ops = Ops(open_reader(path))
        proc, port, ca = start_server(path, Path(tmp))
        try:
            with QueryClient("localhost", port, ca=ca, timeout=30) as client:
                print(
                    f"\n{args.n} requests each; tls: one TLS connection to `telemetry-query serve` in a child "
                    f"process; ops: query.ops.Ops in this process (ms; load average {os.getloadavg()[0]:.1f})"
                )
                print(
                    f"  {'query':46s} {'tls p50':>8s} {'tls p99':>8s} {'ops p50':>8s} {'ops p99':>8s} {'tls/ops':>7s}"
                )
                for name, case in cases.items():
                    rng = random.Random(1)
                    params = [case(rng) if callable(case) else case for _ in range(args.n + 3)]
                    remote, local = [], []
                    for i, p in enumerate(params):
                        p = dict(p)
                        op = p.pop("op")
                        start = time.perf_counter()
                        client.request(op, **p)
                        if i >= 3:  # the first three warm the server's caches
                            remote.append(time.perf_counter() - start)
                    for i, p in enumerate(params):
                        req = parse_request(json.dumps(p).encode())
                        start = time.perf_counter()
                        ops.run(req)
                        if i >= 3:
                            local.append(time.perf_counter() - start)
                    r50, r99 = ms(remote)
                    l50, l99 = ms(local)
                    print(f"  {name:46s} {r50:8.2f} {r99:8.2f} {l50:8.2f} {l99:8.2f} {r50 / l50:7.1f}")
        finally:
            proc.terminate()
            proc.wait(10)
            ops.close()


if __name__ == "__main__":
    main()
