"""What the query server records as it works, for its metrics (query/metrics.py).

Requests by op and code with their latency, TLS handshake failures,
connections accepted.  The loop thread and the SQL worker threads both
record, so every update takes one uncontended lock (~0.1 us against a
request's ~1 ms); the scrape thread takes the same lock to copy.  Apart from
query/metrics.py so that the server imports prometheus_client (~0.1 s of CPU
at every start) only when `serve --metrics` asks for an exporter.
"""

from __future__ import annotations

import threading
from typing import Any

from collector.histogram import Histogram

from .protocol import OPS

# Request latency buckets (seconds): `latest` answers in ~1 ms, a large
# aggregate in tens of ms, and the query time budget is 2 s by default.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
INVALID_OP = "invalid"
HANDSHAKE_FAILURES = ("error", "timeout")  # refused by TLS (bad certificate, not TLS, old version) / too slow


class QueryStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.handshake_failures = dict.fromkeys(HANDSHAKE_FAILURES, 0)
        self.accepted = 0

    def request(self, op: str, code: str, seconds: float) -> None:
        if op not in OPS:
            op = INVALID_OP
        with self._lock:
            key = (op, code)
            self.requests[key] = self.requests.get(key, 0) + 1
            histogram = self.latency.get(op)
            if histogram is None:
                histogram = self.latency[op] = Histogram(LATENCY_BUCKETS)
            histogram.observe(seconds)

    def handshake_failed(self, why: str) -> None:
        with self._lock:
            self.handshake_failures[why] += 1

    def connection_accepted(self) -> None:
        with self._lock:
            self.accepted += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "latency": {op: (h.buckets(), h.sum) for op, h in self.latency.items()},
                "handshake_failures": dict(self.handshake_failures),
                "accepted": self.accepted,
            }
