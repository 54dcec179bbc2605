"""The central consumer's memory against its open heads: many gateways' sensors, few datagrams each.

Each gateway's payload-3 messages (one per ingest_log row, a datagram of 2 readings from every
sensor a row, --rows rows; every row a new boot of every sensor, so a new head each, as a fleet
of sensors that restart leaves heads nobody writes again; --same-boot: the same heads every
row, all of them written by every transaction) are written by the consumer's writer (central.Central.apply, one
transaction per row of every gateway, no worker processes) into a new central database, once
per --max-heads value, each in a fresh child process so that its peak RSS is its own.  Prints,
per value: open heads at the end, the writer's peak RSS (ru_maxrss) and RSS at the end
(VmRSS), CPU seconds, chunks written and readings stored (the same readings either way; the
bound changes chunk boundaries only).  The clock given to the writer stays within the chunk
span, so no head closes by age: the heads the bound closes are the difference.

    .venv/bin/python bench/central_heads.py                       # 3 x 2,000 sensors x 8 boots
    .venv/bin/python bench/central_heads.py --same-boot --rows 3 --max-heads 0 1000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.getcwd())

from collector import ingestlog  # noqa: E402
from collector.uplink import core  # noqa: E402


def messages(gateways: int, sensors: int, rows: int, same_boot: bool) -> list[list[bytes]]:
    """Per ingest_log row, each gateway's payload-3 message of it."""
    out = []
    for r in range(rows):
        fetch = []
        for g in range(gateways):
            groups = [
                ingestlog.Group(
                    f"sim-{i:05d}",
                    7 if same_boot else 7 + r,
                    [r + 1],
                    [1000.0 + r],
                    [1000.5 + r],
                    {"temp": [20.0 + i % 7], "hum": [50.0]},
                )
                for i in range(sensors)
            ]
            body = ingestlog.encode_body(groups)
            datagrams, readings = ingestlog.counts(groups)
            block = core.Block(r + 1, datagrams, readings, body, len(zlib.decompress(body)))
            fetch += [
                m.payload for m in core.columns_messages("telemetry", f"site-{g}", [block], origin=f"{g + 1:02x}")
            ]
        out.append(fetch)
    return out


def child(args: argparse.Namespace, max_heads: int) -> dict:
    from collector.uplink.central import Central

    fetches = messages(args.gateways, args.sensors, args.rows, args.same_boot)
    db = os.path.join(args.dir, f"central-{max_heads}.db")
    cpu = time.process_time()
    c = Central(db, 0, max_heads=max_heads or None)
    stored = 0
    try:
        for r, fetch in enumerate(fetches):
            stored += c.apply([core.decode(p) for p in fetch], now=1000.5 + r)["uplink_readings"]
        heads = len(c.store.heads)
        with open("/proc/self/status") as f:
            rss_now = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        chunks = c.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    finally:
        c.close()
    return dict(
        max_heads=max_heads,
        heads=heads,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        rss_mb=rss_now / 1024,
        cpu=time.process_time() - cpu,
        chunks=chunks,
        readings=stored,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gateways", type=int, default=3)
    p.add_argument("--sensors", type=int, default=2000, help="sensors of each gateway")
    p.add_argument("--rows", type=int, default=8, help="ingest_log rows of each gateway (a datagram per sensor)")
    p.add_argument("--same-boot", action="store_true", help="every row the same boot (heads written every row)")
    p.add_argument("--max-heads", type=int, nargs="+", default=[0, 10_000], help="values to run, in turn (0: no bound)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args, args.child)))
        return
    with tempfile.TemporaryDirectory() as wd:
        print(
            f"{args.gateways} gateways x {args.sensors:,} sensors x {args.rows} rows "
            f"({args.gateways * args.sensors * args.rows * 2:,} readings), "
            f"{'the same boot every row' if args.same_boot else 'a new boot every row'}; load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        for n in args.max_heads:
            cmd = [sys.executable, __file__, "--child", str(n), "--dir", wd]
            cmd += ["--gateways", str(args.gateways), "--sensors", str(args.sensors), "--rows", str(args.rows)]
            cmd += ["--same-boot"] if args.same_boot else []
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            print(
                f"max-heads {n or 'none'}: {r['heads']:,} heads open at the end; peak RSS {r['peak_rss_mb']:.1f} MB, "
                f"at the end {r['rss_mb']:.1f} MB; {r['cpu']:.1f} CPU s; {r['chunks']:,} chunks; "
                f"{r['readings']:,} readings stored",
                flush=True,
            )
        print(f"(load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores, shared)")


if __name__ == "__main__":
    main()
