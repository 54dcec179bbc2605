"""End to end: datagrams -> the real telemetry-collector process -> SQLite -> the query server over mTLS.

The query server reads the database while the collector is still writing it
(WAL), and every answer is checked against what was sent, computed here in
plain Python.
"""

from __future__ import annotations

import math
import re
import socket

import pytest

from collector.wire import encode
from query.client import QueryClient

from helpers import wait_for
from processes import CollectorProcess
from query_fixtures import running_server

T0 = 1_764_000_000
SKIPPED = {50, 51, 52}
SENT = [s for s in range(200) if s not in SKIPPED]


def temp(seq: int) -> float:
    return round(math.sin(seq / 7) * 20 + 15, 3)


def test_collector_database_answers_every_op(bin_path, db_path, tmp_path, tls):
    with CollectorProcess(bin_path("telemetry-collector"), db_path, tmp_path / "collector.log") as collector:
        port = collector.port()
        datagrams = [encode("e2e-1", seq, {"temp": temp(seq), "hum": 100 - seq}, boot=5, ts=T0 + seq) for seq in SENT]
        datagrams.insert(11, encode("e2e-1", 10, {"temp": temp(10), "hum": 90}, boot=5, ts=T0 + 10))  # duplicate
        datagrams += [encode("e2e-2", seq, {"volts": 3.0 + seq / 100}) for seq in range(10)]  # no ts, no boot
        datagrams.append(b"\xc1 not msgpack")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for data in datagrams:
                udp.sendto(data, ("127.0.0.1", port))

        with (
            running_server(db_path, tls, mtls=True) as server,
            QueryClient(
                "localhost", server.server_address[1], ca=tls.ca_pem, cert=tls.client_cert, key=tls.client_key
            ) as client,
        ):
            wait_for(
                lambda: (
                    client.request("stats")["received"] == len(datagrams)
                    and len(client.request("readings", sensor="e2e-2")["rows"]) == 10
                ),
                15,
                what="every datagram received and stored",
            )
            stats = client.request("stats")
            assert (stats["received"], stats["lost"], stats["duplicates"]) == (len(datagrams), 3, 1)
            assert stats["rejected"]["not_msgpack"] == 1
            assert stats["last_flush"] is not None

            sensors = {s["sensor"]: s for s in client.request("sensors")}
            assert set(sensors) == {"e2e-1", "e2e-2"}
            assert sensors["e2e-1"]["metrics"] == ["hum", "temp"]
            assert (sensors["e2e-1"]["lost"], sensors["e2e-1"]["duplicates"]) == (3, 1)
            assert sensors["e2e-2"]["metrics"] == ["volts"]

            rows, cursor = [], None
            while True:
                page = client.request("readings", sensor="e2e-1", metric="temp", limit=64, cursor=cursor)
                rows += page["rows"]
                cursor = page["next"]
                if cursor is None:
                    break
            assert [(r["ts"], r["seq"], r["boot"], r["value"]) for r in rows] == [
                (float(T0 + s), s, 5, temp(s)) for s in SENT
            ]

            latest = {(r["sensor"], r["metric"]): r for r in client.request("latest")}
            assert latest[("e2e-1", "hum")] == {
                "sensor": "e2e-1",
                "metric": "hum",
                "ts": float(T0 + 199),
                "value": 100 - 199,
                "seq": 199,
            }
            assert latest[("e2e-2", "volts")]["seq"] == 9
            volts = client.request("readings", sensor="e2e-2")["rows"]
            assert [r["boot"] for r in volts] == [None] * 10
            assert [r["value"] for r in volts] == [3.0 + s / 100 for s in range(10)]

            buckets = client.request("aggregate", sensor="e2e-1", metric="temp", bucket=30, since=T0, until=T0 + 200)
            expected = {}
            for s in SENT:
                expected.setdefault((T0 + s) // 30 * 30, []).append(temp(s))
            assert [(b["start"], b["count"], b["min"], b["max"]) for b in buckets] == [
                (k, len(v), min(v), max(v)) for k, v in sorted(expected.items())
            ]
            for b in buckets:
                assert b["sum"] == pytest.approx(math.fsum(expected[b["start"]]), rel=1e-12, abs=1e-9)

            gaps = client.request("gaps", sensor="e2e-1")
            assert [(g["boot"], g["first_seq"], g["last_seq"], g["missing"]) for g in gaps] == [(5, 50, 52, 3)]
        assert collector.stop() == 0


def test_every_request_and_response_in_protocol_md_is_what_the_server_says(known_db, tls):
    """docs/PROTOCOL.md's `> request` / `< response` pairs, sent verbatim to a real server."""
    import json
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()
    pairs = re.findall(r"^> (.*)\n< (.*)$", text.split("## Query protocol v1", 1)[1], re.M)
    assert len(pairs) == 11
    with running_server(known_db, tls) as server:
        with QueryClient("localhost", server.server_address[1], ca=tls.ca_pem) as client:
            for request, response in pairs:
                client.send_raw(request.encode() + b"\n")
                assert client.read_response() == json.loads(response), request
