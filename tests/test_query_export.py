"""telemetry-query export: exact rows in order over a real mTLS server, streamed a page at a time."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import threading
import tracemalloc

import pytest
from click.testing import CliRunner

from collector.schema import open_reader
from query import export
from query.cli import main
from query.client import QueryClient
from query.ops import Ops
from query.server import QueryServer, Service, server_context
from query.times import iso_time

import query_fixtures as fx
from query_fixtures import SERIES, expected_rows, fill_series, running_server

# Sensor order as `sensors` lists them; each sensor's series in metric order (the readings op's order).
ALL = [r for sensor, metric in sorted(SERIES) for r in expected_rows(sensor, metric)]


@pytest.fixture(scope="module")
def live(known_db, tls):
    with fx.live_server(known_db, tls) as live:
        yield live


cli = fx.run_cli


def from_iso(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_csv_export_of_every_sensor_is_exact_and_in_order_across_many_pages(live):
    result = cli(["export", "--page", "7"], live["env"])
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == len(ALL) == 361
    assert [
        (
            r["sensor"],
            r["metric"],
            from_iso(r["ts"]),
            float(r["value"]),
            int(r["seq"]),
            int(r["boot"]) if r["boot"] else None,
        )
        for r in rows
    ] == [(e["sensor"], e["metric"], e["ts"], e["value"], e["seq"], e["boot"]) for e in ALL]
    assert result.stdout.splitlines()[0] == "sensor,metric,ts,value,seq,boot"
    assert result.stderr == "exported 361 readings of 4 sensor(s)\n"


def test_json_lines_with_unix_times_round_trip_bit_exact(live):
    result = cli(
        ["--format", "json", "export", "s1", "--metric", "temp", "--times", "unix", "--page", "64"], live["env"]
    )
    lines = result.stdout.splitlines()
    assert [json.loads(line) for line in lines] == expected_rows("s1", "temp")
    assert len(lines) == 300


def test_range_metric_and_output_file(live, tmp_path):
    out = tmp_path / "s1.csv"
    lo, hi = fx.T0 + 100, fx.T0 + 200  # [lo, hi): temp rows at ts 100..190 (3 each), no hum (ts .5 past minutes)
    result = cli(
        [
            "export",
            "s1",
            "s2",
            "--metric",
            "temp",
            "--since",
            str(lo),
            "--until",
            str(hi),
            "--times",
            "unix",
            "-o",
            str(out),
        ],
        live["env"],
    )
    assert result.stdout == ""
    rows = list(csv.DictReader(out.open()))
    want = [e for e in expected_rows("s1", "temp") if lo <= e["ts"] < hi]
    assert len(want) == 30
    assert [(r["ts"], r["value"], r["seq"]) for r in rows] == [
        (repr(e["ts"]), repr(e["value"]), str(e["seq"])) for e in want
    ]
    assert not (tmp_path / "s1.csv.part").exists()
    assert result.stderr == f"exported 30 readings of 2 sensor(s) to {out}\n"


def test_unknown_sensor_or_metric_is_exit_1_and_no_file(live, tmp_path):
    out = tmp_path / "x.csv"
    result = cli(["export", "s1", "s3", "-o", str(out)], live["env"], code=1)
    assert "no sensor named 's3'; did you mean s1, s2 or s9?" in result.stderr
    result = cli(["export", "s1", "--metric", "tmp"], live["env"], code=1)
    assert "no metric named 'tmp' for sensor s1; did you mean temp?" in result.stderr
    assert not out.exists() and not (tmp_path / "x.csv.part").exists()
    result = cli(["export", "--format", "table"], live["env"], code=2)
    assert "export writes csv or json" in result.stderr


def test_a_server_lost_mid_export_leaves_no_file_and_says_how_far_it_got(tmp_path, known_db, tls):
    certs, db = tls, known_db
    out = tmp_path / "cut.csv"
    server = QueryServer(
        server_context(certs.server_cert, certs.server_key), ("127.0.0.1", 0), Service(lambda: Ops(open_reader(db)), 1)
    )
    thread = threading.Thread(target=server.serve_forever, name="query-server")
    thread.start()
    env = {"TELEMETRY_SERVER": f"localhost:{server.server_address[1]}", "TELEMETRY_CA": certs.ca_pem}
    calls = []
    real = export.pages

    def pages_then_stop(request, *args, **kwargs):
        for page in real(request, *args, **kwargs):
            calls.append(len(page))
            yield page
            if len(calls) == 2:  # the real server goes away between two pages
                server.shutdown()
                thread.join(10)

    export.pages = pages_then_stop
    try:
        result = CliRunner().invoke(main, ["export", "--page", "10", "-o", str(out)], env=env)
    finally:
        export.pages = real
        server.shutdown()
        thread.join(10)
    assert result.exit_code == 3, (result.stdout, result.stderr)
    assert result.stderr.strip().endswith(f"(export stopped after 20 readings; {out} not written)"), result.stderr
    assert not out.exists() and not (tmp_path / "cut.csv.part").exists()


def test_pages_are_asked_for_one_at_a_time(live):
    """At most one page is held: the next request goes out only when the caller asks for the next page."""
    with QueryClient(
        "localhost", live["port"], ca=live["tls"].ca_pem, cert=live["tls"].client_cert, key=live["tls"].client_key
    ) as client:
        asked = []

        def request(op, **params):
            asked.append(op)
            return client.request(op, **params)

        walk = export.pages(request, ["s1", "s2"], metric=None, since=None, until=None, page_rows=40)
        sizes = []
        for page in walk:
            sizes.append(len(page))
            assert len(asked) == len(sizes)  # nothing fetched ahead
        assert sizes == [40] * 8 + [30] + [10]  # s1: 350 rows in 9 pages; s2: 10 rows
        assert sum(sizes) == 360


def test_memory_of_an_export_is_bounded_by_the_page_not_the_range(tmp_path, tls):
    db = str(tmp_path / "big.db")
    # Storage v3 decodes one chunk (up to 1,024 readings) at a time: the small
    # series spans a few chunks, so ten times the range is the only difference.
    fill_series(db, "small", "v", 1200)
    fill_series(db, "big", "v", 12000)
    certs = tls

    def exported_peak(client, sensor):
        tracemalloc.start()
        try:
            writer = export.Writer(_Discard(), "csv", iso=True)
            for page in export.pages(client.request, [sensor], metric=None, since=None, until=None, page_rows=100):
                writer.write_page(page)
            return writer.rows, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    with (
        running_server(db, certs) as server,
        QueryClient("localhost", server.server_address[1], ca=certs.ca_pem) as client,
    ):
        # The TLS handshake and the workers' first connections, outside the measurements.
        for _ in range(3):
            client.request("readings", sensor="big", limit=1)
        small_rows, small_peak = exported_peak(client, "small")
        big_rows, big_peak = exported_peak(client, "big")
        tracemalloc.start()
        try:
            held = [
                row
                for page in export.pages(client.request, ["big"], metric=None, since=None, until=None, page_rows=100)
                for row in page
            ]
            all_held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    assert (small_rows, big_rows, len(held)) == (1200, 12000, 12000)
    assert held[-1] == {
        "sensor": "big",
        "metric": "v",
        "ts": fx.T0 + 11999 * 0.25,
        "value": 11999 / 8,
        "seq": 11999,
        "boot": None,
    }
    # Ten times the rows, the same page: the same memory (within noise), and far below holding them all.
    assert big_peak < small_peak * 1.5, (small_peak, big_peak)
    assert big_peak < all_held / 4, (big_peak, all_held)


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


def test_iso_time_keeps_microseconds():
    assert iso_time(fx.T0) == "2023-11-14T22:13:20Z"
    assert iso_time(fx.T0 + 0.5) == "2023-11-14T22:13:20.500Z"
    assert iso_time(fx.T0 + 0.000125) == "2023-11-14T22:13:20.000125Z"
    assert iso_time(-25.0) == "1969-12-31T23:59:35Z"
