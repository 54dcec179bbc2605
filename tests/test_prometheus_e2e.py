"""A real Prometheus scrapes both daemons; deploy/prometheus passes promtool.

Everything is a real process on loopback: the collector and the query server
(each with --metrics on a port of its own), sensor-sim sending a known number
of datagrams, and Debian's `prometheus` with a config generated here.  The
values are read back the way an operator's dashboard would, through
Prometheus' HTTP API (/api/v1/query), waiting on each with a deadline.
.ci/run installs `prometheus` when it is missing; without it these tests fail
and say so, they never skip.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

from query.client import QueryClient

from helpers import wait_for
from processes import CollectorProcess, Daemon, QueryServerProcess

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: .ci/run installs it (apt-get install prometheus); "
            f"these tests need the real Prometheus"
        )
    return path


def free_port() -> int:
    """A port free right now on 127.0.0.1 (Prometheus cannot report the port of :0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deploy_scrape_config_and_alert_rules_pass_promtool():
    promtool = tool("promtool")
    for args in (
        ["check", "config", str(DEPLOY / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "alerts.yml")],
        ["test", "rules", str(DEPLOY / "alerts_test.yml")],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=DEPLOY)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_rule(tmp_path):
    """The check above can fail: the same promtool refuses a rule with a bad expression."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        (DEPLOY / "alerts.yml")
        .read_text()
        .replace("telemetry_collector_sensors_stale > 0", "telemetry_collector_sensors_stale >", 1)
    )
    result = subprocess.run([tool("promtool"), "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


class PromAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict]:
        url = self.base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The value of an expression with at most one series (None: no series yet)."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expr: str, expected: float, timeout: float = 60.0) -> None:
        seen = []

        def check():
            seen.append(self.value(expr))
            return seen[-1] == expected

        wait_for(check, timeout, 0.25, what=lambda: f"Prometheus to give {expr} = {expected} (last {seen[-1:]})")


def test_prometheus_scrapes_both_daemons_and_sees_exact_counts(tmp_path, tls, bin_path):
    prometheus = tool("prometheus")
    db = str(tmp_path / "telemetry.db")
    with ExitStack() as stack:
        collector = stack.enter_context(
            CollectorProcess(
                bin_path("telemetry-collector"),
                db,
                tmp_path / "collector.log",
                "--metrics",
                "127.0.0.1:0",
                "--stale-factor",
                "3",
                "--stale-floor",
                "1",
            )
        )
        udp_port = collector.port()
        collector_metrics = int(
            wait_for(
                lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", collector.text()),
                10,
                what="the metrics line",
            ).group(1)
        )
        query = stack.enter_context(
            QueryServerProcess(
                bin_path("telemetry-query"),
                tmp_path / "query.log",
                "--db",
                db,
                "--cert",
                tls.server_cert,
                "--key",
                tls.server_key,
                "--metrics",
                "127.0.0.1:0",
            )
        )
        query_port = query.port
        query_metrics = int(
            wait_for(
                lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", query.text()),
                10,
                what="the metrics line",
            ).group(1)
        )

        # Known traffic: 2 sensors x 20 datagrams x 3 readings, then 3 junk datagrams.
        sim = subprocess.run(
            [
                bin_path("sensor-sim"),
                "--target",
                f"127.0.0.1:{udp_port}",
                "--sensors",
                "2",
                "--count",
                "20",
                "--rate",
                "20",
                "--id-prefix",
                "prom",
                "--seed",
                "11",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sim.returncode == 0, sim.stderr
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
            for _ in range(3):
                junk.sendto(b"\xc1", ("127.0.0.1", udp_port))
        # Known queries: 3 pings and 2 stats on one connection.
        with QueryClient("127.0.0.1", query_port, ca=tls.ca_pem) as client:
            for _ in range(3):
                client.request("ping")
            wait_for(lambda: client.request("stats")["stored"] == 40, 30, what="40 datagrams stored")

        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: telemetry-collector\n    static_configs:\n      - targets: ['127.0.0.1:{collector_metrics}']\n"
            f"  - job_name: telemetry-query\n    static_configs:\n      - targets: ['127.0.0.1:{query_metrics}']\n"
        )
        for attempt in range(3):  # the free port may be taken before Prometheus binds it: try another
            web = free_port()
            log = tmp_path / f"prometheus-{attempt}.log"
            try:
                stack.enter_context(
                    Daemon(
                        [
                            prometheus,
                            f"--config.file={config}",
                            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                            f"--web.listen-address=127.0.0.1:{web}",
                        ],
                        log,
                        "Server is ready to receive web requests",
                        timeout=60,
                    )
                )
            except AssertionError:
                if "address already in use" not in log.read_text():
                    raise
                continue
            break
        else:
            pytest.fail("Prometheus found no free port in 3 attempts")
        api = PromAPI(web)
        wait_for(api.ready, 30, 0.2, what="Prometheus /-/ready")

        api.wait_value('up{job="telemetry-collector"}', 1)
        api.wait_value('up{job="telemetry-query"}', 1)
        c = "telemetry_collector_"
        api.wait_value(c + "datagrams_received_total", 43)
        api.wait_value(c + "datagrams_stored_total", 40)
        api.wait_value(c + "readings_stored_total", 120)
        api.wait_value(c + 'datagrams_rejected_total{reason="not_msgpack"}', 3)
        api.wait_value(f"sum({c}datagrams_rejected_total)", 3)
        api.wait_value(c + "sensors", 2)
        for name in (
            "kernel_drops_total",
            "datagrams_lost",
            "datagrams_duplicate_total",
            "storage_errors_total",
            "storage_dropped_readings_total",
            "internal_errors_total",
            "refused_sensors_total",
        ):
            api.wait_value(c + name, 0)
        # Readings went through timed flushes: every one of them is in the batch-size histogram.
        api.wait_value(c + "flush_batch_readings_sum", 120)
        # The sim stopped: at 20 Hz its sensors are stale after the 1 s floor.
        api.wait_value(c + "sensors_stale", 2)

        q = "telemetry_query_"
        api.wait_value(q + 'requests_total{op="ping",code="ok"}', 3)
        stats_ok = api.value(q + 'requests_total{op="stats",code="ok"}')
        assert stats_ok is not None and stats_ok >= 1  # waited with as many stats as it took
        api.wait_value(f'sum({q}requests_total) - sum({q}requests_total{{code="ok"}})', 0)  # no error answers
        api.wait_value(q + "connections_accepted_total", 1)
        api.wait_value(f"sum({q}tls_handshake_failures_total)", 0)
        api.wait_value(q + 'request_duration_seconds_count{op="ping"}', 3)
