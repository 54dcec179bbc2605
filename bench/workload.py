"""The realistic day (issue 9): a deterministic workload other benches reuse.

20 sensors x 5 metrics at 1 Hz for 24 h = 8.64 M readings by default.  The
values come from the simulator's own signal models (sensor_sim/signals.py),
quantized as real devices report them: temperature 0.01 degC with a daily
cycle, humidity 0.1 %RH, pressure 0.01 hPa, battery 1 mV, and an integer
pulse counter.  Each sensor sends on its own 1 s schedule (a random phase)
with scheduling jitter (sigma 2 ms); the sensor stamps `ts` from its clock at
millisecond resolution; the gateway receives the datagram 0.3-10 ms later
(network and stack latency, a log-normal with median ~1.5 ms) and stamps
`received` at 1 us resolution, as the collector stores it.  seq counts up
from a random start; sensor 0 starts 500 below 2**32 so its seq wraps.
Same seed, same day, bit for bit.

    from bench.workload import Workload
    w = Workload(sensors=20, seconds=86400, seed=1)
    for sensor in w.sensor_ids():
        seqs, ts, received, metrics = w.columns(sensor)   # one sensor, columnar
    for d in w.datagrams():                               # all sensors, in receive order
        d.sensor, d.seq, d.boot, d.ts, d.received, d.readings

    .venv/bin/python bench/workload.py --seconds 3600   # prints a summary (and a few rows)
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sensor_sim.signals import MODELS  # noqa: E402

METRICS = ("temp", "hum", "pressure", "battery", "counter")
# 2026-12-01 00:00:00 UTC: a midnight start puts the whole daily cycle in the day.
T0 = 1_764_547_200.0
JITTER_S = 0.002  # sigma of the sensor's send schedule
LATENCY_MEDIAN_S = 0.0015  # sensor -> gateway, log-normal
LATENCY_SIGMA = 0.6
LATENCY_MIN_S, LATENCY_MAX_S = 0.0003, 0.010


class Row(NamedTuple):
    sensor: str
    seq: int
    boot: int
    ts: float
    received: float
    readings: dict[str, int | float]


@dataclass(frozen=True)
class Workload:
    sensors: int = 20
    seconds: int = 86_400
    rate_hz: float = 1.0
    seed: int = 1
    metrics: tuple[str, ...] = METRICS
    t0: float = T0

    @property
    def datagrams_per_sensor(self) -> int:
        return int(self.seconds * self.rate_hz)

    @property
    def readings(self) -> int:
        return self.sensors * self.datagrams_per_sensor * len(self.metrics)

    def sensor_ids(self) -> list[str]:
        return [f"site-1:sensor-{i:04d}" for i in range(self.sensors)]

    def rows(self, sensor: str) -> Iterator[Row]:
        """One sensor's datagrams in send order."""
        index = int(sensor.rsplit("-", 1)[1])
        rng = random.Random(f"{self.seed}:{sensor}")
        models = [(name, MODELS[name](rng, self.t0).sample) for name in self.metrics]
        boot = rng.getrandbits(32)
        seq = 2**32 - 500 if index == 0 else rng.randrange(0, 2**20)
        period = 1.0 / self.rate_hz
        phase = rng.random() * period
        gauss, lognorm = rng.gauss, rng.lognormvariate
        mu = math.log(LATENCY_MEDIAN_S)
        for i in range(self.datagrams_per_sensor):
            sent = self.t0 + phase + i * period + gauss(0.0, JITTER_S)
            latency = min(LATENCY_MAX_S, max(LATENCY_MIN_S, lognorm(mu, LATENCY_SIGMA)))
            ts = round(sent, 3)
            readings = {name: sample(ts) for name, sample in models}
            yield Row(sensor, seq, boot, ts, round(sent + latency, 6), readings)
            seq = (seq + 1) % 2**32

    def columns(self, sensor: str) -> tuple[list[int], list[float], list[float], dict[str, list]]:
        """One sensor's whole run as columns (seqs, ts, received, metrics), as chunkenc takes them."""
        seqs: list[int] = []
        ts: list[float] = []
        received: list[float] = []
        metrics: dict[str, list] = {name: [] for name in self.metrics}
        appends = [(metrics[name].append, name) for name in self.metrics]
        for row in self.rows(sensor):
            seqs.append(row.seq)
            ts.append(row.ts)
            received.append(row.received)
            r = row.readings
            for append, name in appends:
                append(r[name])
        return seqs, ts, received, metrics

    def datagrams(self) -> Iterator[Row]:
        """Every sensor's datagrams merged in receive order (what a collector would see)."""
        return heapq.merge(*(self.rows(s) for s in self.sensor_ids()), key=lambda row: row.received)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Example: .venv/bin/python bench/workload.py --seconds 3600"
    )
    p.add_argument("--sensors", type=int, default=20)
    p.add_argument("--seconds", type=int, default=86_400)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--show", type=int, default=3, help="rows to print (default 3)")
    a = p.parse_args(argv)
    if a.sensors < 1 or a.seconds < 1:
        p.error("--sensors and --seconds must be at least 1")
    w = Workload(sensors=a.sensors, seconds=a.seconds, seed=a.seed)
    start = time.perf_counter()
    n = 0
    for row in w.datagrams():
        if n < a.show:
            print(row)
        n += 1
    took = time.perf_counter() - start
    print(
        f"{n} datagrams, {n * len(w.metrics)} readings from {a.sensors} sensors over {a.seconds} s "
        f"(seed {a.seed}); generated in {took:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
