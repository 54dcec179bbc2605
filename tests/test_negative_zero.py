"""-0.0 as a reading or ts comes back as -0.0 (issue 13 item 8; PROTOCOL.md says
-0.0 is fine).  Storage v3 keeps readings bit-exact in the ingest log and in
chunks; these tests hold the query answers to that on both paths: a reading
still in an open head (ingest_log) and one sealed into a chunk, whose
statistics (chunk_series, REAL columns) also serve `latest`."""

from __future__ import annotations

import io
import json
import math
import socket
import threading

import pytest

from collector import wire
from collector.schema import open_reader
from collector.store import open_ingest
from query.export import Writer
from query.ops import Ops
from query.protocol import parse_request

from helpers import running_collector, wait_for


def _sign(x: float) -> float:
    return math.copysign(1.0, x)


def _ask(db_path: str, **params):
    ops = Ops(open_reader(db_path))
    try:
        return ops.run(parse_request(json.dumps(params).encode()))
    finally:
        ops.close()


def _check_answers(db_path: str) -> None:
    readings = _ask(db_path, op="readings", sensor="z1")["rows"]
    latest = _ask(db_path, op="latest", sensor="z1")
    assert [(r["metric"], _sign(r["ts"]), _sign(r["value"])) for r in readings] == [("t", -1.0, -1.0), ("u", -1.0, 1.0)]
    assert [(r["metric"], _sign(r["ts"]), _sign(r["value"])) for r in latest] == [("t", -1.0, -1.0), ("u", -1.0, 1.0)]
    # and on the wire of the query protocol (JSON), and in an export (CSV and JSON lines, Unix times)
    assert json.dumps(latest[0]["value"]) == "-0.0" and json.dumps(latest[0]["ts"]) == "-0.0"
    csv_out, json_out = io.StringIO(), io.StringIO()
    Writer(csv_out, "csv", iso=False).write_page(readings)
    Writer(json_out, "json", iso=False).write_page(readings)
    assert csv_out.getvalue().splitlines()[1:] == ["z1,t,-0.0,-0.0,0,1", "z1,u,-0.0,0.0,0,1"]
    assert [(j["ts"], j["value"]) for j in map(json.loads, json_out.getvalue().splitlines())] == [
        (-0.0, -0.0),
        (-0.0, 0.0),
    ]
    assert [_sign(j["value"]) for j in map(json.loads, json_out.getvalue().splitlines())] == [-1.0, 1.0]


def test_negative_zero_reading_and_ts_through_a_real_collector_come_back_negative(db_path):
    with running_collector(db_path) as (collector, _):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.sendto(wire.encode("z1", 0, {"t": -0.0, "u": 0.0}, boot=1, ts=-0.0), collector.addresses[0])
            wait_for(lambda: collector.counters["received"] == 1, 5, what="the datagram")
        finally:
            sock.close()
        done = threading.Event()
        collector.call_soon(lambda: (collector.flush(), done.set()))
        assert done.wait(5)
        assert (collector.counters["stored"], collector.counters["stored_readings"]) == (1, 2)
    _check_answers(db_path)


@pytest.mark.parametrize("chunk_datagrams", [1, 1000], ids=["sealed-chunk", "open-head"])
def test_negative_zero_comes_back_negative_from_chunks_and_heads(db_path, chunk_datagrams):
    store, core = open_ingest(db_path, store_options={"chunk_datagrams": chunk_datagrams})
    try:
        core.receive(wire.encode("z1", 0, {"t": -0.0, "u": 0.0}, boot=1, ts=-0.0), 1_700_000_000.0)
        assert store.flush(core, 1_700_000_000.0)
        conn = open_reader(db_path)
        try:
            chunks = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        finally:
            conn.close()
        assert chunks == (1 if chunk_datagrams == 1 else 0)
        _check_answers(db_path)
    finally:
        store.close()
