"""The query server against peers that leave, pipeline without reading, or send odd ids (issue 13).

Real TLS sockets on loopback, a real SQLite file; no wall-clock bounds: the
assertions count jobs a worker ran, connections the server holds and bytes
it buffers.
"""

from __future__ import annotations

import json
import socket
import struct
import threading

import pytest

from collector.schema import open_reader, open_writer
from query.ops import Ops

from helpers import wait_for
from query_fixtures import running_server

HEAVY_ROWS = 10_000
HEAVY = b'{"op":"readings","sensor":"heavy","metric":"v","limit":10000}\n'


@pytest.fixture(scope="module")
def heavy_db(tmp_path_factory) -> str:
    """One sensor with one series of 10,000 readings: a `readings` page of the maximum size."""
    from v2ref import open_v2

    path = str(tmp_path_factory.mktemp("heavy") / "heavy.db")
    db = open_v2(path)  # written as version 2, then converted by the migration (open_writer below)
    with db.conn:
        db.conn.execute("BEGIN")
        db.conn.execute("INSERT INTO series (id, sensor, metric) VALUES (1, 'heavy', 'v')")
        db.conn.executemany(
            "INSERT INTO readings (series, ts, boot, seq, value, received) VALUES (1, ?, 1, ?, ?, ?)",
            [(1_700_000_000 + i, i, i * 0.25, 1_700_000_000 + i) for i in range(HEAVY_ROWS)],
        )
        db.conn.execute(
            "INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings, tracker)"
            " VALUES ('heavy', 1700000000, 1700010000, 10000, 10000, '{}')"
        )
        db.conn.execute("COMMIT")
    db.conn.close()
    open_writer(path).conn.close()
    return path


def connect(server, tls):
    raw = socket.create_connection(server.server_address, timeout=10)
    return tls.client_context(cert=False).wrap_socket(raw, server_hostname="localhost")


def reset(sock) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a killed or vanished peer's host would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_json_lines(sock, count: int) -> list[dict]:
    with sock.makefile("rb") as f:
        out = []
        for _ in range(count):
            line = f.readline()
            assert line.endswith(b"\n"), f"connection ended after {len(out)} of {count} responses"
            out.append(json.loads(line))
        return out


class Gate:
    """Ops whose `gaps` holds its worker until the test opens the gate; `readings` calls are counted."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.open = threading.Event()
        self.holding = threading.Event()
        self.readings_run: list[str] = []

    def make_ops(self) -> Ops:
        gate = self

        class GatedOps(Ops):
            def op_gaps(self, **params):
                gate.holding.set()
                assert gate.open.wait(20), "the test never opened the gate"
                return super().op_gaps(**params)

            def op_readings(self, **params):
                gate.readings_run.append(params["sensor"])
                return super().op_readings(**params)

        return GatedOps(open_reader(self.db))


def test_work_of_300_reset_clients_is_dropped_and_the_next_client_is_answered_first(heavy_db, tls):
    """300 clients each queue a 10,000-row `readings` and reset: none of that work runs (it
    took 10-23 s of both workers before), and a fresh client's `stats` is answered at once."""
    gate = Gate(heavy_db)
    with running_server(heavy_db, tls, make_ops=gate.make_ops, workers=1) as server:
        blocker = connect(server, tls)
        try:
            blocker.sendall(b'{"op":"gaps","id":"blocker"}\n')  # holds the one worker
            assert gate.holding.wait(10)
            for _ in range(300):
                client = connect(server, tls)
                client.sendall(HEAVY)
                reset(client)
            # The resets are noticed while their requests wait for the worker.
            wait_for(lambda: server.connections == 1, 10, what="the 300 reset connections to be dropped")
            with connect(server, tls) as fresh:
                fresh.sendall(b'{"op":"stats","id":"fresh"}\n')
                gate.open.set()
                (answer,) = read_json_lines(fresh, 1)
                assert (answer["id"], answer["ok"]) == ("fresh", True)
            assert gate.readings_run == []  # no job of a dead connection ran
            stats = server.stats
            # Every reset was seen; each request read before its reset was dropped unrun
            # (the others were never read at all); only the blocker's and fresh's ran.
            assert stats.resets == 300
            assert (stats.jobs_run, stats.jobs_dropped) == (2, stats.jobs_submitted - 2)
            assert read_json_lines(blocker, 1)[0]["id"] == "blocker"
        finally:
            gate.open.set()
            blocker.close()


def test_batches_of_reset_clients_do_not_fill_max_connections(heavy_db, tls):
    """--max-connections 50, batches of 40 resetting clients: the slots come back, a fresh
    client is served, and none of the 120 dead requests runs."""
    from query.server import ServerLimits

    gate = Gate(heavy_db)
    with running_server(
        heavy_db, tls, make_ops=gate.make_ops, workers=1, limits=ServerLimits(max_connections=50)
    ) as server:
        blocker = connect(server, tls)
        try:
            blocker.sendall(b'{"op":"gaps","id":"blocker"}\n')
            assert gate.holding.wait(10)
            for batch in range(3):
                for _ in range(40):
                    client = connect(server, tls)
                    client.sendall(HEAVY)
                    reset(client)
                wait_for(lambda: server.connections == 1, 10, what=f"batch {batch} to be dropped")
            with connect(server, tls) as fresh:
                fresh.sendall(b'{"op":"ping","id":1}\n{"op":"sensors","id":2}\n')
                gate.open.set()
                assert [r["id"] for r in read_json_lines(fresh, 2)] == [1, 2]
            assert gate.readings_run == []
            stats = server.stats
            assert stats.resets == 120
            assert (stats.jobs_run, stats.jobs_dropped) == (2, stats.jobs_submitted - 2)
        finally:
            gate.open.set()
            blocker.close()


def test_an_id_of_60000_digits_is_echoed_over_tls(heavy_db, tls):
    digits = b"7" * 60_000  # the line limit (65,536 bytes) is the only bound on it
    with running_server(heavy_db, tls) as server, connect(server, tls) as sock:
        sock.sendall(b'{"op":"sensors","id":-' + digits + b'}\n{"op":"ping","id":' + digits + b"}\n")
        with sock.makefile("rb") as f:
            first, second = f.readline(), f.readline()
    assert first.startswith(b'{"id":-' + digits + b',"ok":true,"result":[{"sensor":"heavy"')
    assert second == b'{"id":' + digits + b',"ok":true,"result":{"version":"0.1.0","protocol":1}}\n'


def test_clients_that_never_read_are_closed_past_the_output_budget(heavy_db, tls, caplog):
    """Issue 13.3: each hog may hold max_output + one response; all of them together at most
    output_budget, past which the biggest holder is closed.  A client that reads is never touched."""
    from query.server import ServerLimits

    limits = ServerLimits(max_output=1024 * 1024, output_budget=2 * 1024 * 1024)
    with running_server(heavy_db, tls, limits=limits) as server:
        hogs = []
        try:
            for _ in range(4):
                raw = socket.socket()
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
                raw.settimeout(10)
                raw.connect(server.server_address)
                hog = tls.client_context(cert=False).wrap_socket(raw, server_hostname="localhost")
                hog.sendall(HEAVY * 20)  # ~18 MB of answers it will never read
                hogs.append(hog)
            with connect(server, tls) as reader:
                for _ in range(5):
                    reader.sendall(HEAVY)
                    assert len(read_json_lines(reader, 1)[0]["result"]["rows"]) == HEAVY_ROWS
                # A stuck hog holds at least max_output (it is read no more only then) and at most max_output
                # + one response (~0.9 MB): one fits the budget, two do not.
                wait_for(lambda: server.stats.evicted == 3, 30, what="three of the four hogs to be closed")
                assert server.connections == 2  # the reader and one hog
                assert server._out_total <= limits.output_budget
                reader.sendall(b'{"op":"ping","id":"still"}\n')
                assert read_json_lines(reader, 1)[0]["id"] == "still"
            assert caplog.text.count("answers unread") == 3
            # The closed ones were reset, so the kernel freed what they had not read (a FIN
            # would wait behind it for ever, the server's socket holding its send buffer):
            # from the hog's side TCP says CLOSE (7), the one kept says ESTABLISHED (1).
            states = sorted(hog.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] for hog in hogs)
            assert states == [1, 7, 7, 7]
        finally:
            for hog in hogs:
                hog.close()


def test_a_query_running_for_a_client_that_resets_is_interrupted(heavy_db, tls):
    """Sibling of 13.2: the one worker was held for the whole query budget by a peer that had
    left; closing the connection now interrupts its SQL, and the worker serves the next client."""
    from query.ops import Limits

    running = threading.Event()

    class Endless(Ops):
        def op_gaps(self, **params):
            self.conn.create_function("running", 0, lambda: running.set() or 1)
            self._all(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c WHERE running()"
            )
            raise AssertionError("an endless query ended")

    make_ops = lambda: Endless(open_reader(heavy_db), Limits(query_seconds=600))  # noqa: E731
    with running_server(heavy_db, tls, make_ops=make_ops, workers=1) as server:
        leaver = connect(server, tls)
        leaver.sendall(b'{"op":"gaps"}\n')
        assert running.wait(10)
        reset(leaver)
        wait_for(lambda: server.stats.interrupted == 1, 10, what="the running query to be interrupted")
        with connect(server, tls) as fresh:
            fresh.sendall(b'{"op":"sensors","id":"next"}\n')
            (answer,) = read_json_lines(fresh, 1)
            assert (answer["id"], answer["ok"]) == ("next", True)
        assert (server.stats.jobs_run, server.stats.resets) == (2, 1)
