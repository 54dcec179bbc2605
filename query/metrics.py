"""Prometheus metrics of the query server (`serve --metrics HOST:PORT`).

`QueryStats` (query/stats.py) is what the server records as it works:
requests by op and code with their latency, TLS handshake failures,
connections accepted.  `QueryMetrics` turns a copy into metric
families at scrape time, together with what the server already counts
(connections open, refused at max-connections).

Label values are bounded: `op` is one of protocol.OPS or "invalid" (a line
that did not parse to a known op), `code` is "ok" or one of protocol.CODES.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector as _PromCollector

from .protocol import CODES, OPS
from .stats import QueryStats


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
