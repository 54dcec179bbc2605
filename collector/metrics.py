"""Prometheus metrics of the collector (`--metrics HOST:PORT`), read at scrape time.

Nothing here sits on the hot path: the receive loop keeps the counters it
always kept (`store.counters`, the trackers, the health book), and
`CollectorMetrics.collect()` reads them when Prometheus scrapes, on the HTTP
server's thread.  The only bookkeeping added to the loop is one `Histogram`
pair per flush (about 1 us a second; collector/histogram.py, apart so that
the loop imports no prometheus_client).

Thread safety: the loop thread is the only writer.  The scrape thread takes
shallow copies (`dict.copy()` of the counters, the sensors and the health
book: one C call each, atomic under the GIL) and reads plain attributes, so
it never sees a dict change size under it.  Each value is one the loop really
held; values of one scrape may come from either side of a burst (`received`
ahead of `stored` by the datagrams not yet flushed), as with any live
exporter, and counters only grow.

Metric names follow Prometheus conventions: `telemetry_collector_` prefix,
`_total` for counters, base units (`_seconds`, `_bytes`).  There is no
per-sensor label unless `--metrics-sensors N` asks for it, and then for the
first N sensors by name only (`telemetry_collector_sensors_not_exported`
says how many were left out).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector as _PromCollector

from .histogram import Histogram
from .schema import REJECT_REASONS

log = logging.getLogger("collector")


def _histogram(histogram: Histogram, name: str, doc: str) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=histogram.buckets(), sum_value=histogram.sum)


def _counter(name: str, doc: str, value: float, labels: Sequence[str] = ()) -> CounterMetricFamily:
    # CounterMetricFamily appends _total itself; the name we give is without it.
    family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(labels) or None)
    if not labels:
        family.add_metric([], value)
    return family


def _gauge(name: str, doc: str, value: float | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def database_bytes(path: str) -> int:
    """Bytes the database takes on disk: the file and its -wal and -shm companions."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.stat(path + suffix).st_size
        except OSError:
            pass
    return total


class CollectorMetrics(_PromCollector):
    """A prometheus_client custom collector over a running `server.Collector`."""

    def __init__(self, collector: Any, clock: Callable[[], float], per_sensor: int = 0) -> None:
        self.collector = collector
        self.clock = clock
        self.per_sensor = per_sensor

    def collect(self) -> Iterable[Any]:
        c = self.collector
        store = c.store
        counters = c.core.counters.copy()
        sensors = c.core.sensors.copy()
        now = self.clock()
        p = "telemetry_collector_"

        def count(key: str) -> float:
            return float(counters.get(key, 0) or 0)

        yield _counter(
            p + "datagrams_received_total", "Datagrams read from the sockets (valid or not).", count("received")
        )
        yield _counter(
            p + "datagrams_stored_total", "Datagrams whose readings are committed to the database.", count("stored")
        )
        yield _counter(p + "readings_stored_total", "Readings committed to the database.", count("stored_readings"))
        rejected = CounterMetricFamily(
            p + "datagrams_rejected",
            "Datagrams rejected, by reason (docs/PROTOCOL.md lists the reasons).",
            labels=["reason"],
        )
        reasons = dict.fromkeys(REJECT_REASONS, 0.0)
        for key, value in counters.items():
            if key.startswith("rejected:"):
                reasons[key[len("rejected:") :]] = float(value or 0)
        for reason, value in reasons.items():
            rejected.add_metric([reason], value)
        yield rejected
        yield _counter(
            p + "datagrams_duplicate_total",
            "Datagrams received twice (counted, not stored again).",
            count("duplicates"),
        )
        lost = sum(state.tracker.lost for state in sensors.values())
        yield _gauge(
            p + "datagrams_lost",
            "Sequence numbers currently missing over all sensors (late arrivals fill them, so this can go down).",
            lost,
        )
        yield _counter(
            p + "kernel_drops_total",
            "Datagrams the kernel dropped because the socket buffer was full.",
            count("kernel_drops"),
        )
        yield _counter(p + "datagrams_truncated_total", "Datagrams too large to read whole.", count("truncated"))
        yield _counter(
            p + "storage_dropped_readings_total",
            "Readings dropped because the database refused writes longer than the in-memory backlog lasted.",
            count("storage_dropped"),
        )
        flush = c.flush_stats
        yield _counter(
            p + "storage_errors_total",
            "Flushes the database refused (disk full, locked, unwritable) since the collector started.",
            flush.failures,
        )
        yield _gauge(
            p + "storage_failing",
            "1 while the database refuses writes, else 0.",
            0 if store.failing_since is None else 1,
        )
        yield _gauge(p + "backlog_readings", "Readings waiting for the next flush.", c.core.pending_readings)
        yield _histogram(
            flush.seconds, p + "flush_duration_seconds", "Time one successful flush (one transaction) took."
        )
        yield _histogram(flush.rows, p + "flush_batch_readings", "Readings written per successful flush.")
        last_flush = counters.get("last_flush")
        if last_flush:
            yield _gauge(p + "last_flush_timestamp_seconds", "Unix time of the last successful flush.", last_flush)
        yield _counter(
            p + "internal_errors_total",
            "Datagrams that hit a bug (should stay 0; the log has a traceback).",
            count("internal_errors"),
        )
        yield _counter(
            p + "refused_sensors_total",
            "Datagrams from new sensors refused because MAX_SENSORS sensors are tracked.",
            count("refused_sensors"),
        )
        yield _counter(
            p + "refused_readings_total",
            "Readings with a new metric name refused because the sensor has MAX_SERIES_PER_SENSOR metrics.",
            count("refused_readings"),
        )
        health = c.health
        last_seen = {name: state.last_seen for name, state in sensors.items()}
        stale, skewed = health.count(last_seen, now)
        yield _gauge(p + "sensors", "Sensors known to the collector.", len(sensors))
        yield _gauge(
            p + "sensors_stale",
            "Sensors silent for longer than stale-factor x their own send interval (at least stale-floor seconds).",
            stale,
        )
        yield _gauge(
            p + "sensors_clock_skewed",
            "Sensors whose clock is off by more than clock-threshold seconds (their readings are kept).",
            skewed,
        )
        yield _gauge(
            p + "database_bytes", "Bytes of the database on disk (file, -wal and -shm).", database_bytes(c.settings.db)
        )
        if c.settings.max_disk is not None:
            yield _gauge(
                p + "disk_budget_bytes",
                "The disk budget (--max-disk) the database is kept under.",
                int(c.settings.max_disk),
            )
        if self.per_sensor:
            yield from self._per_sensor(sensors, health, now)

    def _per_sensor(self, sensors: dict, health: Any, now: float) -> Iterable[Any]:
        p = "telemetry_collector_sensor_"
        names = sorted(sensors)[: self.per_sensor]
        yield _gauge(
            "telemetry_collector_sensors_not_exported",
            "Sensors left out of the per-sensor metrics by --metrics-sensors.",
            max(0, len(sensors) - len(names)),
        )
        seen = GaugeMetricFamily(
            p + "last_seen_timestamp_seconds", "Unix time the sensor's last datagram was received.", labels=["sensor"]
        )
        datagrams = CounterMetricFamily(p + "datagrams", "Datagrams accepted from the sensor.", labels=["sensor"])
        lost = GaugeMetricFamily(
            p + "datagrams_lost", "The sensor's sequence numbers currently missing.", labels=["sensor"]
        )
        interval = GaugeMetricFamily(p + "interval_seconds", "The sensor's learned send interval.", labels=["sensor"])
        offset = GaugeMetricFamily(
            p + "clock_offset_seconds", "The sensor's clock minus the collector's.", labels=["sensor"]
        )
        stale = GaugeMetricFamily(p + "stale", "1 if the sensor is stale, else 0.", labels=["sensor"])
        policy = health.policy
        from .health import is_stale

        for name in names:
            state = sensors[name]
            seen.add_metric([name], state.last_seen)
            datagrams.add_metric([name], state.tracker.datagrams)
            lost.add_metric([name], state.tracker.lost)
            h = health.sensors.get(name)
            learned = None if h is None else h.interval
            if learned is not None:
                interval.add_metric([name], learned)
            if h is not None and h.clock_offset is not None:
                offset.add_metric([name], h.clock_offset)
            stale.add_metric([name], int(is_stale(state.last_seen, policy.stale_after(learned), now)))
        yield from (seen, datagrams, lost, interval, offset, stale)


def serve_metrics(address: tuple[str, int], *collectors: _PromCollector, process: bool = True):
    """Start the HTTP exporter on `address` in a daemon thread; returns the server
    (`server_address` has the port when 0 was asked; `shutdown()` then
    `server_close()` stop it).  Raises SetupError when the address cannot be bound."""
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    from .errors import SetupError

    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    if process:
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, fds
    host, port = address
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise SetupError(f"cannot serve metrics on {shown}: {exc.strerror or exc} (check --metrics)") from None
    return server


def describe(server) -> str:
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"metrics on http://{host}:{port}/metrics"
