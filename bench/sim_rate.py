"""How fast does sensor-sim generate at --rate max on one core, against a bare sendto loop?

Sends to a UDP socket on 127.0.0.1 that nobody reads (loopback sendto
succeeds even when the receiver's buffer is full, so this measures the
sender).  Prints datagrams/s for: a bare loop of sendto of one pre-encoded
datagram (the ceiling), encode only, the simulator without faults, and the
simulator with faults; and the simulator/baseline ratio.

    .venv/bin/python bench/sim_rate.py [--sensors 100] [--count 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import time

from collector.wire import encode
from sensor_sim.faults import FaultRates
from sensor_sim.net import resolve
from sensor_sim.sim import SimConfig, run


def best_rate(fn, n: int, repeat: int) -> float:
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sensors", type=int, default=100)
    ap.add_argument("--count", type=int, default=2000, help="datagrams per sensor")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best is shown")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    n = args.sensors * args.count
    readings = {"temp": 21.37, "hum": 45.2, "battery": 3.912}
    data = encode("sim-0001", 12345, readings, boot=1700000000, ts=time.time())

    def bare() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sendto, addr = s.sendto, ("127.0.0.1", port)
        for _ in range(n):
            sendto(data, addr)
        s.close()

    def encode_only() -> None:
        for i in range(n):
            encode("sim-0001", i, readings, boot=1700000000, ts=1.7e9)

    def sim(rates: FaultRates):
        cfg = SimConfig(
            targets=[resolve("127.0.0.1", port)],
            sensors=args.sensors,
            rate=None,
            count=args.count,
            seed=1,
            faults=rates,
        )
        return lambda: run(cfg)

    base = best_rate(bare, n, args.repeat)
    rows = [
        ("bare sendto loop (one pre-encoded datagram)", base),
        ("collector.wire.encode only", best_rate(encode_only, n, args.repeat)),
        ("sensor-sim --rate max, no faults", best_rate(sim(FaultRates()), n, args.repeat)),
        ("sensor-sim --rate max, loss/dup/reorder 0.05", best_rate(sim(FaultRates(0.05, 0.05, 0.05)), n, args.repeat)),
    ]
    sink.close()
    print(
        f"{args.sensors} sensors x {args.count} datagrams, {len(data)}-byte datagrams, best of {args.repeat}, one core"
    )
    for name, rate in rows:
        print(f"  {name:<48} {rate:>10,.0f} /s   {rate / base:6.1%} of baseline")


if __name__ == "__main__":
    main()
