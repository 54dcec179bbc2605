"""What do sensor health and the Prometheus exporter cost the collector?

Four figures, each beside a baseline measured in the same run (medians of
--repeat runs; the machine may be shared, so compare ratios, not absolutes):

1. health sampling at a flush (HealthBook.sample_states over the dirty
   sensors) against the flush itself (BatchWriter.flush of the same batch:
   readings, sensor rows, counters), per sensor;
2. the health columns' UPDATE inside the flush: a flush with the health
   writer against the same flush without it;
3. one scrape (CollectorMetrics.collect + the text exposition) with 100 and
   with 20,000 sensors; the loop is not involved, but the scrape thread takes
   the GIL for that long;
4. QueryStats.request (the query server's per-request bookkeeping, one lock)
   against an empty method call.

    .venv/bin/python bench/metrics.py [--sensors 1000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# bench/query.py would shadow the query package: the repository goes first.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from collector import healthstore  # noqa: E402
from collector.health import HealthBook  # noqa: E402
from collector.histogram import FlushStats  # noqa: E402
from collector.metrics import CollectorMetrics  # noqa: E402
from collector.server import Settings  # noqa: E402
from collector.store import BatchWriter  # noqa: E402
from query.stats import QueryStats  # noqa: E402


def fill(writer: BatchWriter, sensors: int, seq: int, now: float) -> None:
    """One datagram (2 readings) from every sensor, as _process would queue it."""
    for i in range(sensors):
        name = f"bench-{i:05d}"
        state = writer.sensors.get(name) or writer.new_sensor(name, now)
        state.tracker.observe(1, seq, now)
        state.last_seen = now
        state.last_ts = now - 0.01
        for metric in ("t", "h"):
            sid = state.series.get(metric) or writer.new_series(state, metric)
            writer.rows.append((sid, now, 1, seq, 1.0, now))
        state.readings += 2
        writer.dirty.add(state)
    writer.pending_datagrams += sensors


def flush_costs(directory: Path, sensors: int, repeat: int) -> dict[str, list[float]]:
    """Seconds per flush, with and without sensor health, flushed in alternation
    (so both see the same background load), and of the health sampling."""
    writers = {}
    book = HealthBook()
    for name in ("with", "without"):
        writers[name] = BatchWriter(str(directory / f"bench-{name}.db"), max_sensors=max(sensors, 1))
    healthstore.attach(book, writers["with"])
    out: dict[str, list[float]] = {"sample": [], "with": [], "without": []}
    now = 1_800_000_000.0
    try:
        for seq in range(repeat + 2):
            now += 1.0
            order = ["with", "without"] if seq % 2 else ["without", "with"]  # neither always goes first
            for name in order:
                writer = writers[name]
                fill(writer, sensors, seq, now)
                t0 = time.perf_counter()
                if name == "with":
                    book.sample_states(writer.dirty)
                t1 = time.perf_counter()
                assert writer.flush(now)
                t2 = time.perf_counter()
                if seq >= 2:  # the first flushes create sensors and series and learn: not the steady state
                    out[name].append(t2 - t1)
                    if name == "with":
                        out["sample"].append(t1 - t0)
    finally:
        for writer in writers.values():
            writer.close()
    return out


class _FakeCollector:
    """What CollectorMetrics reads from a running Collector, without sockets."""

    def __init__(self, writer: BatchWriter, book: HealthBook, db: str) -> None:
        self.store = writer
        self.health = book
        self.flush_stats = FlushStats()
        self.settings = Settings(db=db)


def scrape_seconds(directory: Path, sensors: int, repeat: int) -> tuple[float, int]:
    db = str(directory / f"scrape-{sensors}.db")
    writer = BatchWriter(db, max_sensors=max(sensors, 1))
    book = HealthBook()
    try:
        now = 1_800_000_000.0
        for seq in range(3):
            now += 1.0
            fill(writer, sensors, seq, now)
            book.sample_states(writer.dirty)
            writer.flush(now)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(CollectorMetrics(_FakeCollector(writer, book, db), lambda: now + 5))
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            text = generate_latest(registry)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), len(text)
    finally:
        writer.close()


class _Empty:
    def call(self, op: str, code: str, seconds: float) -> None:
        pass


def per_call(func, n: int = 200_000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        func("latest", "ok", 0.001)
    return (time.perf_counter() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, default=1000, help="dirty sensors per flush")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    n = args.sensors
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        costs = flush_costs(directory, n, args.repeat)
        sample_med, with_med, without_med = (statistics.median(costs[k]) for k in ("sample", "with", "without"))
        print(f"flush of {n} sensors x 2 readings, steady state (median of {args.repeat}, alternating):")
        print(f"  health sampling      {sample_med * 1e6 / n:8.2f} us/sensor  ({sample_med * 1e3:.2f} ms per flush)")
        print(f"  flush with health    {with_med * 1e6 / n:8.2f} us/sensor  ({with_med * 1e3:.2f} ms)")
        print(f"  flush without health {without_med * 1e6 / n:8.2f} us/sensor  ({without_med * 1e3:.2f} ms)  baseline")
        print(
            f"  ratio (sampling + flush with health) / flush without: "
            f"{(sample_med + with_med) / without_med:.3f} of medians, "
            f"{(min(costs['sample']) + min(costs['with'])) / min(costs['without']):.3f} of the fastest runs"
        )
        for count in (100, 20_000):
            seconds, size = scrape_seconds(directory, count, args.repeat)
            print(f"one scrape with {count:6d} sensors: {seconds * 1e3:7.2f} ms, {size} bytes of text")
    stats = QueryStats()
    empty = _Empty()
    lock_cost = statistics.median(per_call(stats.request) for _ in range(3))
    call_cost = statistics.median(per_call(empty.call) for _ in range(3))
    print(
        f"QueryStats.request {lock_cost * 1e9:.0f} ns per request; an empty method call {call_cost * 1e9:.0f} ns "
        f"(ratio {lock_cost / call_cost:.1f})"
    )


if __name__ == "__main__":
    main()
