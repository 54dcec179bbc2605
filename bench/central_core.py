"""The central consumer's cost without a broker: payload-3 messages decoded and written in-process.

--gateways gateway databases are filled as bench/uplink.py fills them (its
`fill`: --sensors sensors, --rate readings/s in datagrams of 2 readings, one
ingest_log row per second, --minutes of backlog, distinct data per gateway),
cut into payload-3 messages exactly as `telemetry-uplink run` cuts them
(Source.read + core.columns_messages), interleaved gateway by gateway as the
stream holds them when the uplinks publish at once, then fed to the consumer's
own code (consumer.Consumer's _take: prepared.prepare per message, central.Central.apply
per transaction, the cyclic collector off as in the consumer's loop) in fetches of
--batch messages, into a real SQLite file.  Prints readings per CPU second of
the whole (process time, so a loaded machine inflates it less than wall time),
the share spent decoding (prepared.prepare alone), and the peak RSS; `--profile` runs it under cProfile
and prints the top functions.  With 7 minutes at the default rate every sensor
closes a chunk of 1,024 datagrams, so closing is in the figure.

    .venv/bin/python bench/central_core.py                       # 3 gateways x 7 min, ~1 min
    .venv/bin/python bench/central_core.py --minutes 2 --profile
    (cd /path/to/other/checkout && /path/to/.venv/bin/python bench/central_core.py)   # compare
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib.util
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())

from collector.uplink import closer, consumer, core, prepared, source  # noqa: E402

HERE = Path(__file__).resolve().parent


def _uplink_bench():
    spec = importlib.util.spec_from_file_location("bench_uplink", HERE / "uplink.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def messages_of(db: str, gateway: str) -> list[bytes]:
    """The payload-3 messages a `telemetry-uplink run` would publish for the whole backlog."""
    src = source.Source(db, gateway)
    out: list[bytes] = []
    after = 0
    try:
        while True:
            snap = src.read(after, 1000, 2_000_000, raw=True, max_bytes=4 << 20)
            if not snap.blocks:
                break
            msgs = core.columns_messages(
                "telemetry", gateway, snap.blocks, max_datagrams=core.DEFAULT_MAX_DATAGRAMS[3], origin=snap.origin
            )
            out += [m.payload for m in msgs]
            after = snap.blocks[-1].id
    finally:
        src.close()
    return out


class _Msg:
    __slots__ = ("data", "subject")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.subject = "telemetry.bench"

    async def ack(self) -> None:
        pass

    async def term(self) -> None:
        pass


def run(
    payloads: list[bytes], db: str, batch: int, workers: int, head_budget: int = consumer.HEAD_BUDGET_BYTES
) -> tuple[float, float, float, int]:
    """(CPU seconds of the writer, of the close workers, wall seconds, readings stored) of the
    consumer's _take over every fetch."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c = consumer.Consumer(consumer.ConsumeSettings(db=db, batch=batch, close_workers=workers, head_budget=head_budget))
    msgs = [_Msg(p) for p in payloads]

    async def main() -> None:
        for i in range(0, len(msgs), batch):
            gc.disable()
            try:
                await c._take(msgs[i : i + batch])
            finally:
                gc.enable()

    cpu0, wall0 = time.process_time(), time.monotonic()
    asyncio.run(main())
    c.central.settle()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    stored = c.totals["uplink_readings"]
    c.central.close()  # waits for the workers: their CPU is in RUSAGE_CHILDREN then
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return cpu, children.ru_utime + children.ru_stime - children0.ru_utime - children0.ru_stime, wall, stored


def decode_cpu(payloads: list[bytes]) -> float:
    gc.disable()
    try:
        t = time.process_time()
        for p in payloads:
            prepared.prepare(p)  # what the consumer makes of each message (a payload-3 one: a Prepared)
        return time.process_time() - t
    finally:
        gc.enable()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gateways", type=int, default=3)
    p.add_argument(
        "--minutes", type=float, default=7.0, help="backlog of each gateway (7: every sensor closes a chunk)"
    )
    p.add_argument("--rate", type=int, default=10_000, help="readings/s of each gateway's backlog")
    p.add_argument("--sensors", type=int, default=2000)
    p.add_argument("--batch", type=int, default=consumer.ConsumeSettings.batch, help="messages per fetch")
    p.add_argument("--txn-readings", type=int, default=consumer.TXN_READINGS, help="readings per transaction at most")
    p.add_argument(
        "--close-workers",
        type=int,
        default=closer.default_workers(),
        help="worker processes closing heads (default: the consumer's, one per core beyond the writer, at most 4); "
        "also measured without (0) in the same run, in turn",
    )
    p.add_argument(
        "--head-budget",
        type=int,
        default=consumer.HEAD_BUDGET_BYTES // (1024 * 1024),
        help="the consumer's --head-budget (MiB): past it the largest heads close early, into smaller chunks",
    )
    p.add_argument("--runs", type=int, default=1, help="runs of each (in turn)")
    p.add_argument("--profile", action="store_true", help="run under cProfile, print the top 30 by own time")
    p.add_argument("--keep", help="directory to keep the gateway databases in (reused when present)")
    args = p.parse_args()
    consumer.TXN_READINGS = args.txn_readings
    up = _uplink_bench()
    wd = tempfile.mkdtemp() if not args.keep else args.keep
    os.makedirs(wd, exist_ok=True)
    t = time.monotonic()
    per_gw = []
    for g in range(args.gateways):
        db = os.path.join(wd, f"gw{g}-{args.minutes:g}m-{args.rate}-{args.sensors}.db")
        if not os.path.exists(db):
            up.fill(db, args.minutes, args.rate, args.sensors, 10 + g)
        per_gw.append(messages_of(db, f"site-{g}"))
    payloads = [m for ms in zip(*per_gw) for m in ms]  # interleaved, as the uplinks publish at once
    for ms in per_gw:
        payloads += ms[min(map(len, per_gw)) :]
    print(
        f"{args.gateways} gateways x {args.minutes:g} min at {args.rate:,} readings/s ({args.sensors} sensors): "
        f"{len(payloads)} messages, {sum(map(len, payloads)) / 1e6:.1f} MB, prepared in {time.monotonic() - t:.1f} s",
        flush=True,
    )
    dec = decode_cpu(payloads)
    central = os.path.join(wd, "central.db")
    modes = [0, args.close_workers] if args.close_workers and not args.profile else [args.close_workers]
    rates: dict[int, list[float]] = {m: [] for m in modes}
    for _ in range(args.runs):
        for workers in modes:
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
            cpu, child, wall, stored = run(payloads, central, args.batch, workers, args.head_budget * 1024 * 1024)
            if args.profile:
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            rates[workers].append(stored / wall)
            print(
                f"close workers {workers}: {stored:,} readings in {wall:.2f} s = {stored / wall:,.0f} readings/s "
                f"({stored / wall / 1.35e6:.2f} of the 1.35 M target); writer {cpu:.2f} CPU s, workers "
                f"{child:.2f} CPU s: {stored / (cpu + child):,.0f} readings per CPU second; decoding (prepared.prepare) alone "
                f"{dec:.2f} CPU s ({dec / cpu:.0%} of the writer's)",
                flush=True,
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the writer process {rss:.0f} MB (with the {sum(map(len, payloads)) / 1e6:.0f} MB of messages)")
    if len(modes) == 2:
        a, b = statistics.median(rates[0]), statistics.median(rates[args.close_workers])
        print(
            f"median: in one process {a:,.0f} readings/s; with {args.close_workers} close worker(s) {b:,.0f} "
            f"readings/s (ratio {b / a:.2f})"
        )
    print(f"(machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}: shared, figures indicative)")
    if not args.keep:
        for f in os.listdir(wd):
            os.unlink(os.path.join(wd, f))
        os.rmdir(wd)


if __name__ == "__main__":
    main()
