"""Prometheus metrics of the query server (`serve --metrics HOST:PORT`).

`QueryStats` is what the server records as it works: requests by op and
code with their latency, TLS handshake failures, connections accepted.  The
loop thread and the SQL worker threads both record, so every update takes
one uncontended lock (~0.1 us against a request's ~1 ms); the scrape thread
takes the same lock to copy.  `QueryMetrics` turns a copy into metric
families at scrape time, together with what the server already counts
(connections open, refused at max-connections).

Label values are bounded: `op` is one of protocol.OPS or "invalid" (a line
that did not parse to a known op), `code` is "ok" or one of protocol.CODES.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector as _PromCollector

from collector.metrics import Histogram

from .protocol import CODES, OPS

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


class QueryMetrics(_PromCollector):
    """A prometheus_client custom collector over a QueryServer and its QueryStats."""

    def __init__(self, server: Any, stats: QueryStats) -> None:
        self.server = server
        self.stats = stats

    def collect(self) -> Iterable[Any]:
        p = "telemetry_query_"
        snap = self.stats.snapshot()
        requests = CounterMetricFamily(
            p + "requests",
            "Requests answered, by op and result code (ok or the error code of docs/PROTOCOL.md).",
            labels=["op", "code"],
        )
        counts = snap["requests"]
        for op in OPS:  # every op with ok, so a rate() has a series from the start
            counts.setdefault((op, "ok"), 0)
        for (op, code), n in sorted(counts.items()):
            requests.add_metric([op, code], n)
        yield requests
        latency = HistogramMetricFamily(
            p + "request_duration_seconds",
            "Time from a request line to its encoded answer (SQL included; not the wait for a free worker).",
            labels=["op"],
        )
        for op, (buckets, total) in sorted(snap["latency"].items()):
            latency.add_metric([op], buckets, total)
        yield latency
        failures = CounterMetricFamily(
            p + "tls_handshake_failures",
            "TLS handshakes that failed (error: refused "
            "certificate, not TLS, old protocol; timeout: not done in "
            "handshake-timeout).",
            labels=["reason"],
        )
        for why, n in snap["handshake_failures"].items():
            failures.add_metric([why], n)
        yield failures
        yield CounterMetricFamily(p + "connections_accepted", "TCP connections accepted.", value=snap["accepted"])
        yield CounterMetricFamily(
            p + "connections_refused",
            "Connections closed at once because max-connections were open.",
            value=self.server.refused,
        )
        yield GaugeMetricFamily(
            p + "connections_open", "Connections open now (handshaking included).", value=self.server.connections
        )
        # What the loop counts itself (QueryServer.stats; plain ints, written by the loop thread only).
        loop = self.server.stats
        yield CounterMetricFamily(
            p + "requests_dropped", "Requests dropped unrun because their connection was gone.", value=loop.jobs_dropped
        )
        yield CounterMetricFamily(
            p + "connections_reset", "Connections the peer reset (RST) while open.", value=loop.resets
        )
        yield CounterMetricFamily(
            p + "connections_evicted", "Connections closed for holding too much unread output.", value=loop.evicted
        )


__all__ = ["CODES", "QueryMetrics", "QueryStats"]
