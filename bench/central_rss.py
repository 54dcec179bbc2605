"""The central writer's RSS against its open heads while it drains 3 gateways' backlogs.

The data of bench/central_core.py (its gateways filled as bench/uplink.py fills them: 2,000
sensors each at 10,000 readings/s, MINUTES of backlog, cut into payload-3 messages as the
uplink cuts them), fed in process to the consumer's own _take in fetches of 50 messages, with
WORKERS close workers and a head budget of BUDGET MiB.  After each fetch: RSS (VmRSS), open
heads, the bytes their arrays hold (Head.nbytes), heads waiting for a worker.  The messages
themselves stay in this process (their size is printed): the RSS before the first fetch holds
them, the imports and the filled databases' pages.

    .venv/bin/python bench/central_rss.py 7 0 48     # then 7 0 16: the heads' share of the RSS
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import central_core as cc  # noqa: E402

from collector.uplink import consumer  # noqa: E402


def rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    minutes, workers, budget = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    up = cc._uplink_bench()
    wd = os.path.join(os.environ.get("TMPDIR", "/tmp"), "central_rss")
    os.makedirs(wd, exist_ok=True)
    per = []
    for g in range(3):
        db = os.path.join(wd, f"gw{g}-{minutes:g}.db")
        if not os.path.exists(db):
            up.fill(db, minutes, 10_000, 2000, 10 + g)
        per.append(cc.messages_of(db, f"site-{g}"))
    payloads = [m for ms in zip(*per) for m in ms]
    print(
        f"head budget {budget:g} MiB, workers {workers}: {len(payloads)} messages "
        f"{sum(map(len, payloads)) / 1e6:.0f} MB; RSS before {rss():.0f} MB",
        flush=True,
    )
    central = os.path.join(wd, "central.db")
    for s in ("", "-wal", "-shm"):
        if os.path.exists(central + s):
            os.unlink(central + s)
    c = consumer.Consumer(consumer.ConsumeSettings(db=central, close_workers=workers, head_budget=int(budget * 2**20)))
    msgs = [cc._Msg(p) for p in payloads]

    async def drain() -> None:
        for i in range(0, len(msgs), 50):
            gc.disable()
            try:
                await c._take(msgs[i : i + 50])
            finally:
                gc.enable()
            st = c.central.store
            print(
                f"after message {i + 50}: RSS {rss():.0f} MB, {len(st.heads)} heads holding "
                f"{sum(h.nbytes() for h in st.heads.values()) / 2**20:.1f} MB, {len(st.closed_later)} closes out",
                flush=True,
            )

    asyncio.run(drain())
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; load {os.getloadavg()[0]:.1f}")
    c.central.close()


if __name__ == "__main__":
    main()
