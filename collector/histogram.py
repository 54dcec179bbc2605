"""What the collector's loop records per flush, for the metrics: lock-free histograms.

Apart from collector/metrics.py so that the receive path imports no
prometheus_client (~0.1 s of CPU at every start): that is imported only
when `--metrics` asks for an exporter.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

# Flush duration buckets (seconds): a healthy flush of a few thousand rows
# takes milliseconds; seconds mean a slow disk or a lock.
FLUSH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Readings per flush: from a trickle to the default batch size (20,000) and beyond.
BATCH_ROWS_BUCKETS = (1, 10, 100, 1000, 5000, 10_000, 20_000, 50_000, 100_000)


class Histogram:
    """A Prometheus-style histogram without locks: one writer thread, any readers.

    `observe` is a bisect and two additions.  A reader may see `sum` one
    observation ahead of the buckets; never a bucket count that goes down.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("bucket bounds must be strictly increasing")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf only
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (le, count) pairs, +Inf last, as the exposition format wants."""
        out, total = [], 0
        counts = list(self.counts)
        for bound, n in zip(self.bounds, counts):
            total += n
            out.append((_le(bound), total))
        out.append(("+Inf", total + counts[-1]))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


class FlushStats:
    """What the loop records per flush attempt (its own thread only)."""

    def __init__(self) -> None:
        self.seconds = Histogram(FLUSH_SECONDS_BUCKETS)
        self.rows = Histogram(BATCH_ROWS_BUCKETS)
        self.failures = 0

    def record(self, seconds: float, rows: int, ok: bool) -> None:
        if ok:
            self.seconds.observe(seconds)
            self.rows.observe(rows)
        else:
            self.failures += 1
