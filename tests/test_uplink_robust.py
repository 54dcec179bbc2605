"""The central consumer's known risks, with real parts: a real nats-server started here, the
test publishing the messages a gateway would (core's encoders) to a real JetStream stream, a
real `telemetry-uplink consume` process and its real SQLite database.

- A batch that fails to write must not wedge the consumer: a database locked by another
  process is waited for (bounded backoff, said once, the messages kept from redelivery); a
  poison message (it passes the decoder and breaks a constraint) is set aside after bounded
  attempts, kept in uplink_quarantine, counted, logged at ERROR, and every other message is
  written.
"""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
import zlib

import pytest
from natsserver import NatsServer
from uplinkfleet import Uplinks, consume_args

from collector import ingestlog, schema
from collector.uplink import core

from helpers import db_counters, db_query, wait_for

PREFIX = "telemetry"


class Publisher:
    """The test's own JetStream client: creates the stream and publishes messages as a
    gateway's uplink does (with their Nats-Msg-Id), returning each one's stream sequence."""

    def __init__(self, url: str) -> None:
        import nats

        self.loop = asyncio.new_event_loop()
        self.nc = self.loop.run_until_complete(nats.connect(url, allow_reconnect=False))
        self.js = self.nc.jetstream(timeout=5)
        self.loop.run_until_complete(self.js.add_stream(name="TELEMETRY", subjects=[f"{PREFIX}.>"]))

    def publish(self, m: core.Message) -> int:
        ack = self.loop.run_until_complete(self.js.publish(m.subject, m.payload, headers={"Nats-Msg-Id": m.msg_id}))
        assert not ack.duplicate
        return ack.seq

    def consumer_info(self):
        return self.loop.run_until_complete(self.js.consumer_info("TELEMETRY", "telemetry-central"))

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.nc.close())
        finally:
            self.loop.close()


@pytest.fixture
def consume(bin_path, tmp_path):
    uplinks = Uplinks(bin_path, tmp_path)
    yield lambda central, servers, *extra: uplinks.start(
        f"consume{len(uplinks.started)}", *consume_args(central, servers, *extra)
    )
    uplinks.close()


def group(sensor: str, boot: int | None, seqs, t0: float = 1000.0) -> ingestlog.Group:
    seqs = list(seqs)
    return ingestlog.Group(
        sensor,
        boot,
        seqs,
        [t0 + s for s in seqs],
        [t0 + s + 0.5 for s in seqs],
        {"temp": [float(s) for s in seqs], "hum": [None] * (len(seqs) - 1) + [50.0]},
    )


def blocks(*rows: list[ingestlog.Group], first_id: int = 1) -> list[core.Block]:
    """Gateway ingest_log rows (each a list of groups) as core.Blocks, ids from first_id."""
    out = []
    for i, gs in enumerate(rows):
        body = ingestlog.encode_body(list(gs))
        datagrams, n = ingestlog.counts(list(gs))
        out.append(core.Block(first_id + i, datagrams, n, body, len(zlib.decompress(body))))
    return out


def columns3(gateway: str, *rows: list[ingestlog.Group], first_id: int = 1, origin: str = "ab01") -> core.Message:
    (m,) = core.columns_messages(PREFIX, gateway, blocks(*rows, first_id=first_id), origin=origin)
    return m


def expected(gateway: str, *rows: list[ingestlog.Group]) -> list[tuple]:
    """The readings of these rows as central_rows() gives them."""
    out = []
    for gs in rows:
        for g in gs:
            boot = schema.NO_BOOT if g.boot is None else g.boot
            for metric, values in g.metrics.items():
                for seq, ts, value in zip(g.seqs, g.ts, values):
                    if value is not None:
                        out.append((f"{gateway}:{g.sensor}", metric, ts, boot, seq, value))
    return sorted(out)


def central_rows(path: str) -> list[tuple]:
    """Every reading of the central database, as telemetry-query reads it, doubles kept."""
    from query.ops import Ops

    ops = Ops(schema.open_reader(path))
    out = []
    try:
        ops.heads.refresh(ops.conn)
        for sensor, metric in ops.conn.execute("SELECT sensor, metric FROM series").fetchall():
            cursor = None
            while True:
                page = ops.op_readings(sensor=sensor, metric=metric, limit=10_000, cursor=cursor)
                for r in page["rows"]:
                    boot = schema.NO_BOOT if r["boot"] is None else r["boot"]
                    out.append((sensor, metric, r["ts"], boot, r["seq"], r["value"]))
                cursor = page["next"]
                if cursor is None:
                    break
    finally:
        ops.close()
    return sorted(out)


def snapshot(gateway: str, sensor: str, first_seen: float = 1001.5, datagrams: int = 3) -> core.Message:
    acc = core.Accounts(gateway, sensor, 5, first_seen, 1003.5, datagrams, 4, 0, 0, 0, 0, (), 0)
    (m,) = core.snapshots_messages(PREFIX, gateway, [acc], origin="ab01", as_of=5, counters={})
    return m


def stats(path: str) -> dict:
    from query.ops import Ops
    from query.protocol import parse_request

    ops = Ops(schema.open_reader(path))
    try:
        return ops.run(parse_request(b'{"op": "stats"}'))
    finally:
        ops.close()


# ---------------------------------------------------------------- a write that fails


@pytest.mark.parametrize("workers", ["0", "2"])
def test_poison_messages_are_set_aside_and_every_other_gateways_data_is_written(tmp_path, consume, workers):
    """Two messages that pass the decoder but can never be written (an accounts snapshot whose
    first_seen is NaN: NOT NULL; one whose datagrams count is 2^64 - 1: over SQLite's
    integers) in one fetch with three gateways' good messages.  Before, the whole batch failed
    on every redelivery and nothing of it was ever written (the consumer reconnected and tried
    again forever).  Now: every good message is written once, the two are set aside in
    uplink_quarantine (payload kept) with their gateway, subject and stream sequence, counted,
    logged at ERROR once each, terminated, and the consumer goes on."""
    rows1 = [[group("a", 7, (1, 2, 3))], [group("b", None, (1, 2))]]
    rows3 = [[group("c", 1, (10, 11)), group("d", 2, (5,))]]
    good1, good3 = columns3("site-1", *rows1), columns3("site-3", *rows3)
    nan, huge = snapshot("site-2", "x", first_seen=math.nan), snapshot("site-4", "y", datagrams=2**64 - 1)
    for m in (nan, huge):  # the decoder takes them: they are poison for the writer only
        assert isinstance(core.decode(m.payload), core.Snapshots)
    central = str(tmp_path / "central.db")
    with NatsServer(tmp_path) as ns:
        pub = Publisher(ns.url)
        try:
            seqs = [pub.publish(m) for m in (good1, nan, good3, huge, snapshot("site-3", "c"))]
            c = consume(central, [ns.url], "--close-workers", workers)
            want = expected("site-1", *rows1) + expected("site-3", *rows3)
            wait_for(
                lambda: (
                    db_counters(central).get("uplink_quarantined") == 2
                    and db_counters(central).get("uplink_readings") == len(want)
                ),
                30,
                0.05,
                what=lambda: (
                    f"2 set aside and {len(want)} readings (counters {db_counters(central)})\n{c.text()[-3000:]}"
                ),
            )
            wait_for(
                lambda: pub.consumer_info().num_ack_pending == 0, 15, 0.05, what="every message acked or terminated"
            )
            # a message after them is written too: nothing is wedged
            rows1b = [[group("a", 7, (4, 5))]]
            pub.publish(columns3("site-1", *rows1b, first_id=3))
            want = sorted(want + expected("site-1", *rows1b))
            wait_for(lambda: db_counters(central)["uplink_readings"] == len(want), 30, 0.05, what="the next message")
            assert central_rows(central) == want
            assert c.stop() == 0
        finally:
            pub.close()
    text = c.text()
    set_aside = db_query(
        central, "SELECT gateway, subject, stream_seq, payload, error FROM uplink_quarantine ORDER BY id"
    )
    assert [r[:4] for r in set_aside] == [
        ("site-2", nan.subject, seqs[1], nan.payload),
        ("site-4", huge.subject, seqs[3], huge.payload),
    ]
    assert set_aside[0][4].startswith("IntegrityError: NOT NULL") and set_aside[1][4].startswith("OverflowError")
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 2, text
    for line, (gateway, m, seq) in zip(errors, [("site-2", nan, seqs[1]), ("site-4", huge, seqs[3])]):
        assert f"gateway {gateway}, subject {m.subject}, stream sequence {seq} " in line
        assert "3 attempts" in line
    counters = db_counters(central)
    assert counters["uplink_quarantined"] == 2
    assert counters["uplink_messages"] == 4  # the three good messages of the fetch and the one after
    assert counters["uplink_accounts"] == 1 and counters["uplink_replayed_readings"] == 0
    assert stats(central)["uplink_quarantined"] == 2
    assert db_query(central, "SELECT sensor FROM sensors WHERE sensor IN ('site-2:x', 'site-4:y')") == []
    assert "Traceback" not in text and "retrying in" not in text  # never taken for a broker failure


def test_a_locked_database_is_waited_for_said_once_and_nothing_is_redelivered(tmp_path, consume):
    """Another process holds the central database's write lock (a backup, a sqlite3 shell):
    before, each failed batch went up as a broker failure (a reconnect, a WARNING per retry)
    and JetStream redelivered the batch.  Now the consumer retries with bounded backoff,
    keeping its messages from redelivery (in_progress), says so once (WARNING), and once
    more when writes work again (INFO, with the number of retries); everything is written once."""
    central = str(tmp_path / "central.db")
    rows = [[group("a", 7, (1, 2, 3))], [group("b", 1, (1, 2))]]
    with NatsServer(tmp_path) as ns:
        pub = Publisher(ns.url)
        try:
            c = consume(central, [ns.url], "--close-workers", "0", "-v")
            lock = sqlite3.connect(central, isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")
                pub.publish(columns3("site-1", rows[0]))
                pub.publish(columns3("site-1", rows[1], first_id=2))
                wait_for(
                    lambda: c.text().count("still refuses writes") >= 5,
                    30,
                    0.05,
                    what=lambda: f"five retries on the locked database\n{c.text()[-3000:]}",
                )
                assert db_counters(central)["uplink_messages"] == 0
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            want = expected("site-1", *rows)
            wait_for(lambda: db_counters(central)["uplink_readings"] == len(want), 30, 0.05, what="the batch written")
            info = pub.consumer_info()
            assert info.num_redelivered == 0 and info.num_ack_pending == 0
            assert c.stop() == 0
        finally:
            pub.close()
    text = c.text()
    assert central_rows(central) == want
    counters = db_counters(central)
    assert counters["uplink_messages"] == 2 and counters["uplink_replayed_readings"] == 0
    warnings = [line for line in text.splitlines() if " WARNING " in line]
    assert (
        len(warnings) == 1 and "cannot write the central database (OperationalError: database is locked)" in warnings[0]
    )
    (again,) = [line for line in text.splitlines() if "takes writes again" in line]
    retries = int(re.search(r"after (\d+) retries", again).group(1))
    assert retries == text.count("still refuses writes") >= 5
    assert " ERROR " not in text and "retrying in" not in text and "Traceback" not in text
