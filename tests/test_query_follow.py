"""Live follow (issue 11): readings pushed as the collector commits them, over real TLS sockets.

The ingest log is a real table in a real SQLite file in tmp_path, written by
a real writer connection with collector.ingestlog.append (the collector
itself writes it from storage v3 on).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time

import pytest

from collector import ingestlog
from collector.schema import open_writer
from query.follow import encode_event, matching, rows_of
from query.server import ServerLimits

from helpers import wait_for
from processes import SIGINT_STATES, with_sigint
from query_fixtures import running_server


class Log:
    """The collector's side: a writer connection appending ingest log rows."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reopen()
        self.conn.execute(ingestlog.CREATE_TABLE)
        self.seq = 0

    def reopen(self) -> None:
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")

    def close(self) -> None:
        self.conn.close()

    def flush(self, *groups: ingestlog.Group) -> int:
        self.conn.execute("BEGIN")
        row_id = ingestlog.append(self.conn, time.time(), list(groups))
        self.conn.execute("COMMIT")
        return row_id

    def datagrams(self, sensor: str, n: int, metrics=("temp",), boot: int = 1) -> ingestlog.Group:
        seqs = list(range(self.seq, self.seq + n))
        self.seq += n
        return ingestlog.Group(
            sensor,
            boot,
            seqs,
            [1e9 + s for s in seqs],
            [1e9 + s + 0.5 for s in seqs],
            {m: [s + k / 10 for s in seqs] for k, m in enumerate(metrics)},
        )


@pytest.fixture
def log_db(tmp_path):
    path = str(tmp_path / "telemetry.db")
    open_writer(path).conn.close()  # the collector's schema; the ingest log beside it
    log = Log(path)
    yield log
    log.close()


def connect(server, tls):
    raw = socket.create_connection(server.server_address, timeout=10)
    return tls.client_context(cert=False).wrap_socket(raw, server_hostname="localhost")


class Lines:
    def __init__(self, sock) -> None:
        self.sock = sock
        self.f = sock.makefile("rb")

    def next(self) -> dict:
        line = self.f.readline()
        assert line.endswith(b"\n"), "connection ended"
        return json.loads(line)

    def events(self, count: int, kind: str = "readings") -> list[dict]:
        out = []
        while len(out) < count:
            doc = self.next()
            if doc.get("event") == kind:
                out.append(doc)
        return out

    def close(self) -> None:
        self.f.close()
        self.sock.close()


# -- the pure half ------------------------------------------------------------------


def test_rows_of_a_log_entry_in_commit_order_and_filters():
    groups = [
        ingestlog.Group("a", 3, [7, 8], [1.5, 2.5], [1.6, 2.6], {"t": [1.0, None], "h": [-0.0, 5]}),
        ingestlog.Group("b", None, [1], [9.0], [9.1], {"t": [2**60]}),
    ]
    rows = rows_of(groups)
    assert [(r.sensor, r.metric) for r in rows] == [("a", "h"), ("a", "t"), ("a", "h"), ("b", "t")]
    assert [json.loads(r.json) for r in rows] == [
        {"sensor": "a", "metric": "h", "ts": 1.5, "value": -0.0, "seq": 7, "boot": 3},
        {"sensor": "a", "metric": "t", "ts": 1.5, "value": 1.0, "seq": 7, "boot": 3},
        {"sensor": "a", "metric": "h", "ts": 2.5, "value": 5, "seq": 8, "boot": 3},
        {"sensor": "b", "metric": "t", "ts": 9.0, "value": 2**60, "seq": 1, "boot": None},
    ]
    assert rows[0].json.count("-0.0") == 1  # the sign of zero survives
    assert len(matching(rows, "a", None)) == 3 and len(matching(rows, None, "t")) == 2
    assert matching(rows, "a", "h") == [rows[0].json, rows[2].json] and matching(rows, "zz", None) == []
    line = encode_event('"f"', "readings", 12, [rows[3].json])
    assert json.loads(line) == {
        "id": "f",
        "ok": True,
        "event": "readings",
        "position": 12,
        "rows": [json.loads(rows[3].json)],
    }
    assert json.loads(encode_event("null", "lost", 9, after=4)) == {
        "id": None,
        "ok": True,
        "event": "lost",
        "position": 9,
        "after": 4,
    }


# -- over TLS -----------------------------------------------------------------------


def test_follow_pushes_exactly_the_committed_readings_in_order(log_db, tls):
    log_db.flush(log_db.datagrams("old", 5))  # before the follow: not pushed
    with running_server(log_db.path, tls) as server:
        sock = connect(server, tls)
        lines = Lines(sock)
        try:
            sock.sendall(b'{"op":"follow","id":"f"}\n')
            assert lines.next() == {"id": "f", "ok": True, "result": {"following": True, "position": 1}}
            expected = []
            for i in range(20):
                group = log_db.datagrams(f"s{i % 3}", 1 + i % 4, metrics=("temp", "hum"))
                log_db.flush(group)
                expected += [json.loads(r.json) for r in rows_of([group])]
            events = lines.events(20)
            assert [e["position"] for e in events] == list(range(2, 22))
            assert [row for e in events for row in e["rows"]] == expected
            # Requests on a following connection are still answered, events keep flowing.
            sock.sendall(b'{"op":"ping","id":"p"}\n')
            assert lines.next()["id"] == "p"
            sock.sendall(b'{"op":"cancel","id":"c"}\n')
            assert lines.next() == {"id": "c", "ok": True, "result": {"cancelled": True, "position": 21}}
            log_db.flush(log_db.datagrams("s1", 1))
            sock.sendall(b'{"op":"ping","id":"after"}\n')
            assert lines.next()["id"] == "after"  # nothing pushed after cancel
        finally:
            lines.close()


def test_follow_filters_resumes_with_after_and_reports_a_deleted_stretch(log_db, tls):
    with running_server(log_db.path, tls) as server:
        for _ in range(6):
            log_db.flush(log_db.datagrams("a", 2, metrics=("temp", "hum")), log_db.datagrams("b", 1))
        log_db.conn.execute("DELETE FROM ingest_log WHERE id <= 2")  # the log is trimmed from its old end
        sock = connect(server, tls)
        lines = Lines(sock)
        try:
            wait_for(lambda: server._follow.head == 6, 5, what="the reader to see the six flushes")
            sock.sendall(b'{"op":"follow","id":1,"sensor":"a","metric":"hum","after":0}\n')
            assert lines.next()["result"] == {"following": True, "position": 0}
            lost = lines.next()
            assert (lost["event"], lost["after"], lost["position"]) == ("lost", 0, 2)
            events = lines.events(4)
            assert [e["position"] for e in events] == [3, 4, 5, 6]
            assert all(r["sensor"] == "a" and r["metric"] == "hum" for e in events for r in e["rows"])
            assert sum(len(e["rows"]) for e in events) == 8
            sock.sendall(
                b'{"op":"follow","id":2}\n{"op":"cancel"}\n{"op":"cancel","id":4}\n{"op":"follow","id":3,"after":99}\n'
            )
            assert lines.next()["error"]["message"] == "this connection already follows; send cancel first"
            assert lines.next()["result"] == {"cancelled": True, "position": 6}
            assert "not following" in lines.next()["error"]["message"]
            assert "beyond the newest position 6" in lines.next()["error"]["message"]
        finally:
            lines.close()


def test_follow_survives_a_collector_restart(log_db, tls):
    with running_server(log_db.path, tls) as server:
        sock = connect(server, tls)
        lines = Lines(sock)
        try:
            sock.sendall(b'{"op":"follow"}\n')
            lines.next()
            log_db.flush(log_db.datagrams("s", 3))
            assert lines.events(1)[0]["position"] == 1
            log_db.close()  # the collector stops
            log_db.reopen()  # ... and starts again with a new writer connection
            log_db.flush(log_db.datagrams("s", 2))
            event = lines.events(1)[0]
            assert (event["position"], [r["seq"] for r in event["rows"]]) == (2, [3, 4])
        finally:
            lines.close()


def test_a_follower_that_stops_reading_is_dropped_with_a_reason(log_db, tls, caplog):
    limits = ServerLimits(max_output=256 * 1024)
    with running_server(log_db.path, tls, limits=limits) as server:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        raw.settimeout(10)
        raw.connect(server.server_address)
        slow = tls.client_context(cert=False).wrap_socket(raw, server_hostname="localhost")
        good = connect(server, tls)
        good_lines = Lines(good)
        try:
            slow.sendall(b'{"op":"follow","id":"slow"}\n')
            good.sendall(b'{"op":"follow","id":"good"}\n')
            good_lines.next()
            wait_for(lambda: len(server._followers) == 2, 5, what="two followers")
            flushes = 0
            while server.stats.follow_dropped == 0:
                assert flushes < 200, "the slow follower was never dropped"
                log_db.flush(log_db.datagrams("s", 2000))  # ~170 kB of events per flush
                flushes += 1
                assert good_lines.events(1)[0]["position"] == flushes  # the reader keeps up, in order
                assert server.buffered_output() <= limits.max_output + 200_000  # one event past the bound
            assert len(server._followers) == 1
            assert "follow dropped" in caplog.text
            # The slow client, once it reads, finds its events and then the reason.
            slow_lines = Lines(slow)
            docs = []
            while True:
                line = slow_lines.f.readline()
                if not line:
                    break
                docs.append(json.loads(line))
            assert docs[-1]["error"]["code"] == "slow_consumer"
            positions = [d["position"] for d in docs if d.get("event") == "readings"]
            assert positions == list(range(1, len(positions) + 1))
            wait_for(lambda: server.connections == 1, 5, what="the slow follower to be closed")
        finally:
            good_lines.close()
            slow.close()


def test_follow_on_a_database_without_an_ingest_log_says_so(tmp_path, tls):
    path = str(tmp_path / "v2.db")
    db = open_writer(path)
    db.conn.execute("DROP TABLE ingest_log")  # every current database has one: a damaged or hand-made file
    db.conn.close()
    with running_server(path, tls) as server, connect(server, tls) as sock:
        sock.sendall(b'{"op":"follow","id":1}\n')
        doc = Lines(sock).next()
        assert doc["error"]["code"] == "bad_request" and "no ingest log" in doc["error"]["message"]


# -- the client ---------------------------------------------------------------------


@pytest.mark.parametrize("sigint", SIGINT_STATES)
def test_cli_follow_prints_rows_until_ctrl_c_and_exits_0(log_db, tls, bin_path, sigint):
    # Started with SIGINT ignored or blocked (a script's `telemetry-query follow &`), Python
    # alone would never raise KeyboardInterrupt: the client undoes that first.
    with running_server(log_db.path, tls) as server:
        env = {
            **os.environ,
            "TELEMETRY_SERVER": f"localhost:{server.server_address[1]}",
            "TELEMETRY_CA": tls.ca_pem,
            "PYTHONUNBUFFERED": "1",
        }
        proc = subprocess.Popen(
            with_sigint(sigint, [bin_path("telemetry-query"), "follow", "s1", "--metric", "temp", "--format", "csv"]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            wait_for(lambda: len(server._followers) == 1, 10, what="the client to follow")
            log_db.flush(log_db.datagrams("s1", 3, metrics=("temp", "hum")), log_db.datagrams("s2", 2))
            header = proc.stdout.readline()
            rows = [proc.stdout.readline() for _ in range(3)]
            assert header == b"sensor,metric,ts,value,seq,boot\n"
            assert [r.split(b",")[:2] + r.split(b",")[4:5] for r in rows] == [
                [b"s1", b"temp", b"0"],
                [b"s1", b"temp", b"1"],
                [b"s1", b"temp", b"2"],
            ]
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=10)
            assert proc.returncode == 0, err
            assert b"Traceback" not in err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_follower_far_behind_is_caught_up_in_bounded_batches(log_db, tls):
    from query.follow import FOLLOW_BATCH_READINGS

    with running_server(log_db.path, tls) as server:
        flushes, size = 3, FOLLOW_BATCH_READINGS // 2 + 1  # two flushes are more than one batch holds
        for _ in range(flushes):
            log_db.flush(log_db.datagrams("s", size))
        sock = connect(server, tls)
        lines = Lines(sock)
        try:
            wait_for(lambda: server._follow.head == flushes, 5, what="the reader to see the flushes")
            sock.sendall(b'{"op":"follow","after":0}\n')
            lines.next()
            events = lines.events(flushes)
            assert [e["position"] for e in events] == list(range(1, flushes + 1))
            assert [r["seq"] for e in events for r in e["rows"]] == list(range(flushes * size))
        finally:
            lines.close()


def test_a_quiet_follow_gets_a_heartbeat_every_30_s_of_the_servers_clock(log_db, tls):
    import threading

    from collector.schema import open_reader
    from query.ops import Ops
    from query.server import FOLLOW_HEARTBEAT_SECONDS, QueryServer, Service, server_context

    now = [1000.0]
    server = QueryServer(
        server_context(tls.server_cert, tls.server_key),
        ("127.0.0.1", 0),
        Service(lambda: Ops(open_reader(log_db.path))),
        clock=lambda: now[0],
    )
    thread = threading.Thread(target=server.serve_forever, name="query-server")
    thread.start()
    lines = Lines(connect(server, tls))
    try:
        lines.sock.sendall(b'{"op":"follow","id":"hb"}\n')
        assert lines.next()["result"]["position"] == 0
        now[0] += FOLLOW_HEARTBEAT_SECONDS - 1  # not yet
        lines.sock.sendall(b'{"op":"ping","id":"p"}\n')
        assert lines.next()["id"] == "p"  # nothing came before the ping's answer
        now[0] += 1
        assert lines.next() == {"id": "hb", "ok": True, "event": "heartbeat", "position": 0}
    finally:
        lines.close()
        server.shutdown()
        thread.join(10)


def test_cli_follow_resumes_after_a_server_restart_and_exits_3_when_it_stays_gone(log_db, tls, monkeypatch):
    """The client reconnects from its position (nothing missed or printed twice across a query
    server restart), and exits 3 with one line once its retries are used up."""
    import threading

    from click.testing import CliRunner

    from query import commands
    from query.cli import main

    monkeypatch.setattr(commands, "FOLLOW_BACKOFF_S", 0.1)  # 5 retries in 3.1 s instead of 15.5 s
    result = {}
    with running_server(log_db.path, tls) as first:
        port = first.server_address[1]
        env = {"TELEMETRY_SERVER": f"localhost:{port}", "TELEMETRY_CA": tls.ca_pem}
        runner = threading.Thread(
            target=lambda: result.update(
                r=CliRunner().invoke(main, ["--format", "csv", "follow"], env=env, catch_exceptions=False)
            ),
            name="cli-follow",
        )
        runner.start()
        wait_for(lambda: len(first._followers) == 1, 10, what="the client to follow")
        log_db.flush(log_db.datagrams("a", 2))
        wait_for(
            lambda: first._followers and next(iter(first._followers)).follow.position == 1,
            10,
            what="the first flush to be pushed",
        )
    log_db.flush(log_db.datagrams("a", 1))  # committed while no query server runs
    # The same port again (SO_REUSEADDR), before the client's retries run out.
    with running_server(log_db.path, tls, port=port) as second:
        wait_for(lambda: len(second._followers) == 1, 10, what="the client to come back")
        log_db.flush(log_db.datagrams("a", 1))
        wait_for(
            lambda: second._followers and next(iter(second._followers)).follow.position == 3,
            10,
            what="the third flush to be pushed",
        )
        wait_for(lambda: second.connections == 1 and second._out_total == 0, 10, what="the events to be sent")
    runner.join(30)
    assert not runner.is_alive()
    out = result["r"]
    assert out.exit_code == 3, (out.stdout, out.stderr)
    assert out.stdout.splitlines()[0] == "sensor,metric,ts,value,seq,boot"
    assert [line.split(",")[4] for line in out.stdout.splitlines()[1:]] == ["0", "1", "2", "3"]
    assert "reconnecting" in out.stderr and out.stderr.strip().splitlines()[-1].startswith("Error: ")
