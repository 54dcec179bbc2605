"""Prometheus exposition of both daemons (real HTTP on loopback), and the rejected-burst log line."""

from __future__ import annotations

import logging
import socket
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector import wire
from collector.histogram import Histogram
from collector.metrics import database_bytes
from collector.schema import REJECT_REASONS
from query.serve import start_metrics

from helpers import in_loop, running_collector, wait_for
from query_fixtures import running_server


def scrape(server) -> str:
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value}, and every family has HELP text."""
    out = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP"
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float:
    return found[(name, frozenset(labels.items()))]


def test_histogram_buckets_are_cumulative_with_inf_last():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0, 7.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 5)]
    assert h.sum == pytest.approx(10.65)
    with pytest.raises(ValueError):
        Histogram((1.0, 0.5))


def test_collector_exposition_has_exact_counts(db_path):
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    with running_collector(db_path, metrics=("127.0.0.1", 0), metrics_sensors=1, max_disk=64 << 20) as (collector, _):
        target = collector.addresses[0]
        for seq in range(1, 6):
            for sensor in ("m-a", "m-b"):
                sender.sendto(wire.encode(sensor, seq, {"t": 1.0, "h": 2.0}, boot=1, ts=1_700_000_000 + seq), target)
        for _ in range(3):
            sender.sendto(b"\xc1", target)  # not_msgpack
        wait_for(
            lambda: collector.counters["stored"] == 10 and collector.counters["received"] == 13,
            10,
            what="10 stored, 13 received",
        )
        # `received` is counted before a burst is judged: scrape once the loop is done with it.
        in_loop(collector, lambda: None)
        found = samples(scrape(collector.metrics_server))
    sender.close()
    p = "telemetry_collector_"
    assert value(found, p + "datagrams_received_total") == 13
    assert value(found, p + "datagrams_stored_total") == 10
    assert value(found, p + "readings_stored_total") == 20
    for reason in REJECT_REASONS:
        assert value(found, p + "datagrams_rejected_total", reason=reason) == (3 if reason == "not_msgpack" else 0)
    for name in (
        "kernel_drops_total",
        "datagrams_truncated_total",
        "storage_dropped_readings_total",
        "storage_errors_total",
        "internal_errors_total",
        "refused_sensors_total",
        "refused_readings_total",
        "datagrams_duplicate_total",
        "datagrams_lost",
        "storage_failing",
        "sensors_stale",
    ):
        assert value(found, p + name) == 0, name
    assert value(found, p + "sensors") == 2
    # Every reading went through a timed flush.
    assert value(found, p + "flush_batch_readings_sum") == 20
    flushes = value(found, p + "flush_batch_readings_count")
    assert flushes >= 1 and value(found, p + "flush_duration_seconds_count") == flushes
    assert value(found, p + "flush_duration_seconds_bucket", le="+Inf") == flushes
    assert value(found, p + "database_bytes") >= 4096  # at least one page; exact sizes: the test below
    assert value(found, p + "disk_budget_bytes") == 64 << 20
    # Per-sensor metrics for the first sensor only (--metrics-sensors 1).
    assert value(found, p + "sensor_datagrams_total", sensor="m-a") == 5
    assert not any(("m-b",) == tuple(v for _, v in labels) for _, labels in found)
    assert value(found, p + "sensors_not_exported") == 1
    assert ("process_resident_memory_bytes", frozenset()) in found


def test_database_bytes_counts_the_file_and_its_wal_and_shm(tmp_path):
    path = tmp_path / "x.db"
    path.write_bytes(b"a" * 1000)
    assert database_bytes(str(path)) == 1000
    (tmp_path / "x.db-wal").write_bytes(b"b" * 300)
    (tmp_path / "x.db-shm").write_bytes(b"c" * 20)
    assert database_bytes(str(path)) == 1320
    assert database_bytes(str(tmp_path / "missing.db")) == 0


def test_collector_without_metrics_binds_no_http(db_path):
    with running_collector(db_path) as (collector, _):
        assert collector.metrics_server is None


def test_query_exposition_counts_requests_by_op_and_code_and_handshake_failures(known_db, tls):
    with running_server(known_db, tls) as server:
        exporter = start_metrics(server, ("127.0.0.1", 0))
        try:
            host, port = server.server_address
            ctx = tls.client_context(cert=False)
            with socket.create_connection((host, port)) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                    sock.sendall(
                        b'{"op":"ping"}\n{"op":"sensors"}\n{"op":"nope"}\n{bad json\n'
                        b'{"op":"readings","sensor":"s1","limit":0}\n{"op":"ping"}\n'
                    )
                    buf = b""
                    while buf.count(b"\n") < 6:
                        buf += sock.recv(65536)
                    found = samples(scrape(exporter))
                    assert value(found, "telemetry_query_connections_open") == 1
            with socket.create_connection((host, port)) as plain:  # not TLS: a failed handshake
                plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
                plain.settimeout(10)
                try:
                    while plain.recv(4096):
                        pass
                except OSError:
                    pass
            wait_for(
                lambda: (
                    value(samples(scrape(exporter)), "telemetry_query_tls_handshake_failures_total", reason="error")
                    == 1
                ),
                10,
                what="one handshake failure",
            )
            found = samples(scrape(exporter))
        finally:
            exporter.shutdown()
            exporter.server_close()
    p = "telemetry_query_"
    assert value(found, p + "requests_total", op="ping", code="ok") == 2
    assert value(found, p + "requests_total", op="sensors", code="ok") == 1
    assert value(found, p + "requests_total", op="invalid", code="unknown_op") == 1
    assert value(found, p + "requests_total", op="invalid", code="bad_json") == 1
    assert value(found, p + "requests_total", op="invalid", code="bad_request") == 1  # limit 0 fails validation
    assert value(found, p + "requests_total", op="stats", code="ok") == 0
    assert value(found, p + "request_duration_seconds_count", op="ping") == 2
    assert value(found, p + "request_duration_seconds_bucket", op="sensors", le="+Inf") == 1
    assert value(found, p + "tls_handshake_failures_total", reason="timeout") == 0
    assert value(found, p + "connections_accepted_total") == 2
    assert value(found, p + "connections_refused_total") == 0
    for name in ("requests_dropped_total", "connections_reset_total", "connections_evicted_total"):
        assert value(found, p + name) == 0, name


@pytest.mark.parametrize("batch_receive", [True, False], ids=["recvmmsg", "recv"])
def test_a_burst_of_rejected_datagrams_logs_one_line_per_reason(db_path, caplog, batch_receive):
    """issue 11 item 5: junk read in one burst and nothing after it.  recv's fast
    path records no source addresses; recvmmsg has every source at hand."""
    caplog.set_level(logging.WARNING, logger="collector")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    port = sender.getsockname()[1]
    with running_collector(db_path, batch_receive=batch_receive) as (collector, _):
        target = collector.addresses[0]
        hold, held = threading.Event(), threading.Event()

        def pause():
            held.set()
            hold.wait(10)

        collector.call_soon(pause)  # the loop waits while the burst queues up in the socket
        wait_for(held.is_set, 10, what="the loop to pause")
        sender.sendto(wire.encode("burst", 1, {"t": 1.0}), target)  # read first, with its source
        for _ in range(20):
            sender.sendto(b"\xc1", target)
            sender.sendto(b"\x80", target)  # a map that ends early: bad_readings or not_msgpack
        hold.set()
        wait_for(lambda: collector.counters["received"] == 41, 10, what="41 received")
        # `received` is counted before the burst is judged: read the rest once the loop is done with it.
        counters = in_loop(collector, lambda: dict(collector.counters))
        reasons = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("rejected:") and v}

        def lines():
            return [r.getMessage() for r in caplog.records if "rejected datagram" in r.getMessage()]

        wait_for(lambda: len(lines()) == len(reasons), 10, what=f"one line for each of {reasons}")
    sender.close()
    assert sum(reasons.values()) == 40
    for reason in reasons:
        assert sum(f": {reason}:" in line for line in lines()) == 1, lines()
    if batch_receive:
        assert all(f"from 127.0.0.1:{port} " in line for line in lines()), lines()
    else:
        assert all("source not recorded" in line for line in lines())


def test_sensor_health_learned_through_a_real_collector_stored_and_counted(db_path):
    """Interval, staleness and clock offset end to end, with the collector's clock injected."""
    from collector.server import Collector, Settings

    from helpers import db_query

    now = [1_800_000_000.0]
    settings = Settings(
        db=db_path,
        listen=(("127.0.0.1", 0),),
        flush_interval=0.02,
        status_interval=3600.0,
        metrics=("127.0.0.1", 0),
        stale_factor=3.0,
        stale_floor=10.0,
        clock_threshold=2.0,
    )
    collector = Collector(settings, clock=lambda: now[0])
    thread = threading.Thread(target=collector.serve_forever, name="collector")
    thread.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    try:
        target = collector.addresses[0]
        sent = 0
        for seq in (1, 2, 4, 5, 8):  # 3, 6 and 7 lost: the interval must still come out at 10 s
            now[0] = 1_800_000_000.0 + 10.0 * seq
            # Sent 0.1-0.5 s before it was received, by a clock 3 s ahead.
            stamp = now[0] - 0.1 * (1 + seq % 5) + 3.0
            sender.sendto(wire.encode("h-1", seq, {"t": 1.0}, boot=7, ts=stamp), target)
            sent += 1
            wait_for(lambda: collector.counters["stored"] == sent, 10, what=f"{sent} stored")
        row = wait_for(
            lambda: db_query(
                db_path, "SELECT interval, stale_after, clock_offset, clock_skewed FROM sensors WHERE sensor = 'h-1'"
            ),
            10,
            what="the sensor row",
        )[0]
        assert row[0] == pytest.approx(10.0) and row[1] == pytest.approx(30.0)
        assert row[2] == pytest.approx(3.0 - 0.1) and row[3] == 1  # the least delayed sample
        last = 1_800_000_080.0
        now[0] = last + 30.0
        assert value(samples(scrape(collector.metrics_server)), "telemetry_collector_sensors_stale") == 0
        now[0] = last + 30.5
        found = samples(scrape(collector.metrics_server))
        assert value(found, "telemetry_collector_sensors_stale") == 1
        assert value(found, "telemetry_collector_sensors_clock_skewed") == 1
    finally:
        sender.close()
        collector.shutdown()
        thread.join(10)
        collector.server_close()


def test_a_metrics_port_in_use_is_one_line_and_exit_2(db_path, bin_path):
    import subprocess

    from collector.errors import SetupError
    from collector.server import Collector, Settings

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(SetupError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            Collector(Settings(db=db_path, listen=(("127.0.0.1", 0),), metrics=("127.0.0.1", port)))
        result = subprocess.run(
            [
                bin_path("telemetry-collector"),
                "--db",
                db_path,
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: cannot serve metrics on 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["telemetry-collector"], ["telemetry-query", "serve"]])
def test_a_bare_metrics_port_is_refused_with_what_to_write(command, bin_path):
    import subprocess

    result = subprocess.run(
        [bin_path(command[0]), *command[1:], "--metrics", "9739", "--check"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "give the address too, e.g. 127.0.0.1:9739" in result.stderr and "Traceback" not in result.stderr


def test_sensor_health_survives_a_collector_restart(db_path):
    """What a run learned is read back on start: staleness works before the sensor speaks again."""
    from collector.server import Collector, Settings

    now = [1_800_000_000.0]

    def run(sends):
        collector = Collector(
            Settings(db=db_path, listen=(("127.0.0.1", 0),), flush_interval=0.02, status_interval=3600.0),
            clock=lambda: now[0],
        )
        thread = threading.Thread(target=collector.serve_forever, name="collector")
        thread.start()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                for seq in sends:
                    now[0] = 1_800_000_000.0 + 20.0 * seq
                    before = collector.counters["stored"]
                    sender.sendto(wire.encode("r-1", seq, {"t": 1.0}, boot=3, ts=now[0] - 4.0), collector.addresses[0])
                    wait_for(lambda: collector.counters["stored"] == before + 1, 10, what=f"seq {seq} stored")
            return collector.health.row("r-1")
        finally:
            collector.shutdown()
            thread.join(10)
            collector.server_close()

    learned = run([1, 2, 3])
    assert learned == (20.0, 60.0, -4.0, 1)
    assert run([]) == learned  # primed from the database, nothing received
