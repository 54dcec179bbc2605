"""The central consumer's known risks, with real parts: a real nats-server started here, the
test publishing the messages a gateway would (core's encoders) to a real JetStream stream, a
real `telemetry-uplink consume` process and its real SQLite database (and the same writer,
central.Central, in process on a real SQLite file where a test needs its inner state).

- Doubles across payload versions: a payload-2 message of rows whose payload-3 copy was
  applied before (a gateway upgraded mid-backlog, or a redelivery after the window) adds
  nothing and its readings are counted as replayed, wherever the payload-3 copy is (open
  head, chunk, heads closing in a worker, the same transaction).
- Open heads are bounded (max-heads): the least recently written close when more would stay
  open; what is stored is the same as without the bound, chunk boundaries aside.

- A batch that fails to write must not wedge the consumer: a database locked by another
  process is waited for (bounded backoff, said once, the messages kept from redelivery); a
  poison message (it passes the decoder and breaks a constraint) is set aside after bounded
  attempts, kept in uplink_quarantine, counted, logged at ERROR, and every other message is
  written.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import resource
import shlex
import sqlite3
import subprocess
import tempfile
import time
import zlib
from collections import Counter

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from natsserver import NatsServer
from uplinkgw import reading_rows

from collector import ingestlog, schema
from collector.uplink import core, prepared
from collector.uplink.central import QUARANTINE_QUERY, Central

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


def published(pub: Publisher, central: str, m: core.Message, messages: int, what: str) -> None:
    """Publish `m`, then wait until the consumer has written `messages` messages in all."""
    pub.publish(m)
    wait_for(lambda: db_counters(central)["uplink_messages"] == messages, 30, 0.05, what=what)


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
    return sorted(reading_rows(path))


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


# ---------------------------------------------------------------- doubles across payload versions

ROWS = [
    [group("a", 7, (1, 2, 3)), group("b", None, (1, 2))],
    [group("a", 7, (4,)), group("b", None, (1,), t0=2000.0)],  # b restarted its seqs (no boot)
]
NOW = 1010.0  # the writer's clock, near the readings' receive times: heads stay open (chunk span)
# the same sensors later: payload 2 carries the rows above again with these new datagrams
NEW = [[group("a", 7, (5, 6)), group("c", 1, (1,))]]


def columns2(gateway: str, *rows: list[ingestlog.Group]) -> core.Message:
    (m,) = core.columns_messages(PREFIX, gateway, blocks(*rows))
    return m


def decoded(m: core.Message, prepare: bool = False):
    if not prepare:
        return core.decode(m.payload)
    item = prepared.prepare(m.payload)  # what a decoding worker hands the writer
    if isinstance(item, prepared.Prepared):
        item.payload = m.payload
    return item


@pytest.mark.parametrize(
    "where",
    ["open heads", "chunks", "closing in a worker", "same transaction", "same transaction, prepared"],
)
def test_payload_2_after_the_payload_3_copy_of_its_rows_adds_nothing(tmp_path, where):
    """Before, payload 2 was checked against uplink_seen only, which payload 3 never writes:
    every reading came twice (24 stored of 12, 0 replayed)."""
    # a clock a day past the readings: every head is past its span and closes at once
    now = NOW + 86400 if where in ("chunks", "closing in a worker") else NOW
    c = Central(str(tmp_path / "central.db"), 1 if where == "closing in a worker" else 0)
    try:
        p3 = decoded(columns3("site-7", *ROWS), prepare=where.endswith("prepared"))
        p2 = decoded(columns2("site-7", *ROWS, *NEW))
        old, new = expected("site-7", *ROWS), expected("site-7", *NEW)
        if where.startswith("same transaction"):
            assert isinstance(p3, prepared.Prepared) == where.endswith("prepared")
            done = c.apply([p3, p2], now=now)
            assert done["uplink_readings"] == len(old) + len(new) and done["uplink_replayed_readings"] == len(old)
        else:
            assert c.apply([p3], now=now)["uplink_readings"] == len(old)
            if where == "open heads":
                assert sorted(c.store.heads) == [("site-7:a", 7), ("site-7:b", -1)]
            elif where == "chunks":
                assert not c.store.heads and db_query(c.path, "SELECT count(*) FROM chunks") == [(2,)]
            else:
                assert not c.store.heads and len(c.store.closed_later) == 1
            done = c.apply([p2], now=now)
            assert done["uplink_readings"] == len(new) and done["uplink_replayed_readings"] == len(old)
        # and again (a redelivery of the payload-2 message): nothing more
        again = c.apply([decoded(columns2("site-7", *ROWS, *NEW))], now=now)
        assert again["uplink_readings"] == 0 and again["uplink_replayed_readings"] == len(old) + len(new)
        c.settle()
        counters = db_counters(c.path)
    finally:
        c.close()
    assert central_rows(c.path) == sorted(old + new)
    assert counters["uplink_readings"] == len(old) + len(new)
    assert counters["uplink_replayed_readings"] == len(old) + len(old) + len(new)


def test_payload_1_after_the_payload_3_copy_of_its_rows_adds_nothing(tmp_path):
    """The same for payload 1 (one sensor's datagrams a message)."""
    c = Central(str(tmp_path / "central.db"))
    try:
        c.apply([decoded(columns3("site-7", *ROWS))], now=NOW)
        p1 = [
            core.decode(core.readings_message(PREFIX, core.Readings("site-7", *g)).payload)
            for row in (*ROWS, *NEW)
            for g in row
        ]
        done = c.apply(p1, now=NOW)
    finally:
        c.close()
    old, new = expected("site-7", *ROWS), expected("site-7", *NEW)
    assert done["uplink_readings"] == len(new) and done["uplink_replayed_readings"] == len(old)
    assert central_rows(c.path) == sorted(old + new)


def test_payload_2_of_another_gateway_or_before_any_payload_3_is_taken_as_before(tmp_path):
    """Only a gateway that sent payload 3 has its payload 2 checked against what is held: a
    gateway with the same sensor names keeps its own readings, and payload 2 before payload 3
    is remembered in uplink_seen (and the payload-3 copy after it dropped)."""
    c = Central(str(tmp_path / "central.db"))
    try:
        c.apply([decoded(columns3("site-7", *ROWS))])
        assert c.apply([decoded(columns2("site-8", *ROWS))])["uplink_replayed_readings"] == 0
        assert c.apply([decoded(columns3("site-8", *ROWS))])["uplink_readings"] == 0
    finally:
        c.close()
    assert central_rows(c.path) == sorted(expected("site-7", *ROWS) + expected("site-8", *ROWS))


def test_a_consumer_takes_payload_2_after_payload_3_of_the_same_rows_once(tmp_path, consumer):
    """A gateway's rows as payload 3, then (a downgraded uplink, or the payload-2 copy of a
    gateway upgraded mid-backlog redelivered after ack-wait) as payload 2 with new datagrams:
    a real consumer with two decoding workers stores each reading once and counts the replay."""
    central = str(tmp_path / "central.db")
    old, new = expected("site-7", *ROWS), expected("site-7", *NEW)
    with NatsServer(tmp_path) as ns:
        pub = Publisher(ns.url)
        try:
            c = consumer(central, [ns.url], "--close-workers", "2")
            published(pub, central, columns3("site-7", *ROWS), 1, "the payload-3 message")
            published(pub, central, columns2("site-7", *ROWS, *NEW), 2, "the payload-2 message")
            assert c.stop() == 0
        finally:
            pub.close()
    assert central_rows(central) == sorted(old + new)
    counters = db_counters(central)
    assert counters["uplink_readings"] == len(old) + len(new)
    assert counters["uplink_replayed_readings"] == len(old)


def test_a_higher_tier_with_its_own_durable_on_the_same_stream_gets_everything_once(tmp_path, consumer):
    """docs/OPERATIONS.md "The central side": a higher tier reads the gateways' own stream with a
    second `consume` and its own durable name.  Two real consumers on one real stream, each
    writing its own central database: both hold every reading and account exactly once; the
    second, stopped while a message comes and started again, takes only that message from its
    own position (nothing redelivered to it, nothing taken from the first one's)."""
    central, tier = str(tmp_path / "central.db"), str(tmp_path / "tier-2.db")
    later = [[group("a", 7, (5, 6)), group("c", 1, (1,))]]
    with NatsServer(tmp_path) as ns:
        pub = Publisher(ns.url)
        try:
            a = consumer(central, [ns.url], "--close-workers", "0")
            b = consumer(tier, [ns.url], "--close-workers", "0", "--durable", "tier-2")
            for m in (columns3("site-1", *ROWS), columns3("site-2", *ROWS), snapshot("site-1", "a")):
                pub.publish(m)
            for path in (central, tier):
                wait_for(lambda p=path: db_counters(p)["uplink_messages"] == 3, 30, 0.05, what=f"3 messages in {path}")
            assert b.stop() == 0
            published(pub, central, columns3("site-1", *later, first_id=3), 4, "the later message")
            b = consumer(tier, [ns.url], "--close-workers", "0", "--durable", "tier-2")
            wait_for(lambda: db_counters(tier)["uplink_messages"] == 4, 30, 0.05, what="the later message in tier-2")
            assert a.stop() == 0 and b.stop() == 0
            durables = {pub.consumer_info().name}
            durables.add(pub.loop.run_until_complete(pub.js.consumer_info("TELEMETRY", "tier-2")).name)
        finally:
            pub.close()
    assert durables == {"telemetry-central", "tier-2"}
    want = sorted(expected("site-1", *ROWS, *later) + expected("site-2", *ROWS))
    assert len(want) == 27
    for path in (central, tier):
        assert central_rows(path) == want, path
        counters = db_counters(path)
        assert (counters["uplink_messages"], counters["uplink_readings"], counters["uplink_accounts"]) == (4, 27, 1)
        assert (counters["uplink_replayed_readings"], counters["uplink_rejected:bad_shape"]) == (0, 0)
        assert db_query(path, "SELECT sensor, gateway, as_of FROM uplink_accounts") == [("site-1:a", "site-1", 5)]


# ---------------------------------------------------------------- open heads bounded


def fleet(gateways: int = 3, sensors: int = 200, rows: int = 6) -> tuple[list, list]:
    """Payload-3 messages of `gateways` gateways of `sensors` sensors each, one message per
    gateway and ingest_log row (a datagram of every sensor a row), interleaved as the stream
    holds them; a third of the sensors skip each later row, so heads are written at different
    times.  And their readings, as central_rows() gives them."""
    out, want = [], []
    for r in range(rows):
        for g in range(gateways):
            gs = [group(f"s{i:03d}", 7, (r + 1,), t0=1000.0 + r * 10) for i in range(sensors) if (i + r) % 3 or r == 0]
            out.append(columns3(f"site-{g}", gs, first_id=r + 1))
            want += expected(f"site-{g}", gs)
    return out, sorted(want)


def test_open_heads_stay_at_most_max_heads_and_the_stored_readings_do_not_change(tmp_path):
    """600 sensors' heads (3 gateways x 200) written over 6 transactions: with max_heads 100,
    at most 100 are open after every transaction (without the bound: all 600); the central
    database holds the same readings, sensors, series and counters either way, in more chunks
    (the least recently written closed early), also after a restart of the writer."""
    messages, want = fleet()
    opened: dict[str, list[int]] = {}
    paths = {}
    for name, bound in (("unbounded", None), ("bounded", 100)):
        paths[name] = str(tmp_path / f"{name}.db")
        c = Central(paths[name], 0, max_heads=bound)
        try:
            opened[name] = []
            for i in range(0, len(messages), 3):  # one fetch: a row of each gateway
                c.apply([decoded(m) for m in messages[i : i + 3]], now=NOW)
                opened[name].append(len(c.store.heads))
        finally:
            c.close()
    assert opened["unbounded"] == [600] * 6
    assert max(opened["bounded"]) <= 100 and opened["bounded"][0] == 75  # closed down to 3/4 of the bound
    rows = central_rows(paths["unbounded"])
    assert rows == want and len(rows) == 3 * (200 + 5 * 133 + 2) * 2
    assert central_rows(paths["bounded"]) == rows
    chunks = {n: db_query(p, "SELECT count(*), total(datagrams) FROM chunks")[0] for n, p in paths.items()}
    assert chunks["unbounded"] == (0, 0) and chunks["bounded"][0] > 0
    for sql in (
        "SELECT sensor, first_seen, last_seen FROM sensors ORDER BY 1",
        "SELECT sensor, metric FROM series ORDER BY 1, 2",
        "SELECT name, value FROM counters WHERE name LIKE 'uplink_%' ORDER BY 1",
    ):
        assert db_query(paths["bounded"], sql) == db_query(paths["unbounded"], sql)
    # a restart rebuilds the open heads from the log rows: the bound holds from the next transaction
    c = Central(paths["bounded"], 0, max_heads=100)
    try:
        c.apply([decoded(columns3("site-0", [group("s000", 7, (7,), t0=1060.0)], first_id=7))], now=NOW)
        assert len(c.store.heads) <= 100
    finally:
        c.close()
    assert len(central_rows(paths["bounded"])) == len(rows) + 2


def test_past_the_head_budget_heads_close_until_it_holds_not_down_to_three_quarters(tmp_path):
    """The central writer closes past its head budget (the open heads before a transaction's
    datagrams) only until the budget holds again, the largest first (the collector's store goes
    down to 3/4 of it): a few heads each transaction instead of a quarter of them at once every
    few, which kept the writer waiting for a worker busy with them.  The stored readings are
    those of the fleet."""
    messages, want = fleet()
    budget = 20_000  # bytes: 600 heads of one datagram of 2 metrics are 24,000
    largest = 6 * (24 + 8 * 2)  # a head of the fleet's 6 rows
    path = str(tmp_path / "central.db")
    c = Central(path, 0, head_budget=budget)
    try:
        over = 0
        for i in range(0, len(messages), 3):  # one fetch: a row of each gateway
            before = {key: head.nbytes() for key, head in c.store.heads.items()}
            c.apply([decoded(m) for m in messages[i : i + 3]], now=NOW)
            if sum(before.values()) > budget:
                over += 1
                kept = [n for key, n in before.items() if key in c.store.heads]
                assert budget - largest < sum(kept) <= budget
                assert min(before.values()) <= min(kept) and max(kept) <= max(before.values())
                assert all(before[key] >= max(kept) for key in before if key not in c.store.heads)  # largest first
        closed = c.store.chunks_closed
    finally:
        c.close()
    assert over == 5 and closed > 0
    assert central_rows(path) == want


def test_heads_no_longer_written_close_first_and_a_bound_too_small_is_said_once(tmp_path, caplog):
    """Sensors that restart (a new boot: a new head each time) leave heads nobody writes again:
    those close first, none still being written (closed_busy 0), and the open heads are the
    newest.  A bound below the heads written by one transaction closes heads in use: said once."""
    c = Central(str(tmp_path / "central.db"), 0, max_heads=100)
    try:
        for r in range(6):  # each row: 25 sensors of each of 3 gateways (75 heads), a new boot each
            fetch = [
                decoded(columns3(f"site-{g}", [group(f"s{i:02d}", 10 + r, (1,)) for i in range(25)], first_id=r + 1))
                for g in range(3)
            ]
            c.apply(fetch, now=NOW)
            assert len(c.store.heads) <= 100
        assert c.store.closed_busy == 0 and {boot for _, boot in c.store.heads} == {15}
        assert "max-heads" not in caplog.text
        c.apply([decoded(columns3("site-9", [group(f"x{i:03d}", 1, (1,)) for i in range(150)]))], now=NOW)
        c.apply([decoded(columns3("site-8", [group(f"x{i:03d}", 1, (1,)) for i in range(150)]))], now=NOW)
        assert c.store.closed_busy > 0 and len(c.store.heads) <= 100
    finally:
        c.close()
    assert caplog.text.count("raise max-heads") == 1
    assert len(central_rows(c.path)) == 6 * 3 * 25 * 2 + 2 * 150 * 2


def test_the_consumer_default_bound_is_the_stores():
    from collector import store
    from collector.uplink import cli
    from collector.uplink.consumer import ConsumeSettings

    (setting,) = [s for s in cli.CENTRAL_SETTINGS if s.name == "max_heads"]
    assert setting.default == ConsumeSettings.max_heads == store.MAX_OPEN_HEADS


# ---------------------------------------------------------------- a write that fails


def refuse(central: str, *sensors: str) -> None:
    """A constraint only the database knows (an operator's trigger): the central database
    created as the consumer creates it, then refusing accounts of these sensors."""
    Central(central).close()
    conn = sqlite3.connect(central)
    try:
        names = ", ".join(f"'{s}'" for s in sensors)  # the test's own constants
        conn.execute(
            f"CREATE TRIGGER refuse BEFORE INSERT ON uplink_accounts WHEN NEW.sensor IN ({names}) "
            "BEGIN SELECT RAISE(ABORT, 'refused by the operator'); END"
        )
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_poison_messages_are_set_aside_and_every_other_gateways_data_is_written(tmp_path, consumer, workers, bin_path):
    """Two messages that pass the decoder but can never be written (accounts snapshots that a
    trigger of the central database refuses) in one fetch with three gateways' good messages,
    and two the decoder refuses (a NaN first_seen, a datagrams count of 2**64 - 1: what the
    database cannot hold).  Before 7ac7f3d, the whole batch failed on every redelivery and
    nothing of it was ever written (the consumer reconnected and tried again forever).  Now:
    every good message is written once, the two poison ones are set aside in uplink_quarantine
    (payload kept) with their gateway, subject and stream sequence, counted, logged at ERROR
    once each, terminated; the two bad ones are counted in uplink_rejected:bad_shape and
    terminated (before, the decoder took them and they were set aside as poison); the
    consumer goes on."""
    rows1 = [[group("a", 7, (1, 2, 3))], [group("b", None, (1, 2))]]
    rows3 = [[group("c", 1, (10, 11)), group("d", 2, (5,))]]
    good1, good3 = columns3("site-1", *rows1), columns3("site-3", *rows3)
    poison2, poison4 = snapshot("site-2", "x"), snapshot("site-4", "y")
    nan, huge = snapshot("site-5", "x", first_seen=math.nan), snapshot("site-6", "y", datagrams=2**64 - 1)
    for m in (nan, huge):
        with pytest.raises(core.PayloadError, match="bad_shape"):
            core.decode(m.payload)
    central = str(tmp_path / "central.db")
    refuse(central, "site-2:x", "site-4:y")
    with NatsServer(tmp_path) as ns:
        pub = Publisher(ns.url)
        try:
            seqs = [pub.publish(m) for m in (good1, poison2, nan, good3, poison4, huge, snapshot("site-3", "c"))]
            c = consumer(central, [ns.url], "--close-workers", workers)
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
        ("site-2", poison2.subject, seqs[1], poison2.payload),
        ("site-4", poison4.subject, seqs[4], poison4.payload),
    ]
    assert [r[4] for r in set_aside] == ["IntegrityError: refused by the operator"] * 2
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 2, text
    for line, (gateway, m, seq) in zip(errors, [("site-2", poison2, seqs[1]), ("site-4", poison4, seqs[4])]):
        assert f"gateway {gateway}, subject {m.subject}, stream sequence {seq} " in line
        assert "3 attempts" in line
    counters = db_counters(central)
    assert counters["uplink_quarantined"] == 2
    assert counters["uplink_rejected:bad_shape"] == 2
    assert counters["uplink_messages"] == 4  # the three good messages of the fetch and the one after
    assert counters["uplink_accounts"] == 1 and counters["uplink_replayed_readings"] == 0
    assert stats(central)["uplink_quarantined"] == 2
    assert db_query(
        central, "SELECT count(*) FROM sensors WHERE sensor NOT LIKE 'site-1:%' AND sensor NOT LIKE 'site-3:%'"
    ) == [(0,)]
    assert text.count("rejected a message on ") == 2
    assert "Traceback" not in text and "retrying in" not in text  # never taken for a broker failure
    # the operator sees them: telemetry-uplink status --central (exit 1: they need attention)
    status = subprocess.run(
        [bin_path("telemetry-uplink"), "status", "--central", "--db", central],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 1, status.stderr
    lines = status.stdout.splitlines()
    assert "set aside   2 messages that cannot be written" in lines
    assert "rejected    2 messages (bad_shape 2)" in lines
    shown = [re.sub(r" \S+Z:", " <at>:", line.strip()) for line in lines if line.startswith(" " * 12 + "id ")]
    assert shown == [  # the newest first
        f"id 2 <at>: gateway site-4, stream sequence {seqs[4]}: IntegrityError: refused by the operator",
        f"id 1 <at>: gateway site-2, stream sequence {seqs[1]}: IntegrityError: refused by the operator",
    ]
    assert lines[-1] == f"  sqlite3 -readonly {shlex.quote(central)} {shlex.quote(QUARANTINE_QUERY)}"
    assert "ATTENTION: 2 messages are set aside in uplink_quarantine" in status.stdout
    assert [(r[0], r[2], r[4]) for r in db_query(central, QUARANTINE_QUERY)] == [
        (1, "site-2", seqs[1]),
        (2, "site-4", seqs[4]),
    ]


def written_once(central: str, pub, c, readings: int) -> None:
    """The batch written (its readings counted), acked after the COMMIT the counters show (waited
    for), never redelivered, and the consumer `c` stopped cleanly."""
    wait_for(lambda: db_counters(central)["uplink_readings"] == readings, 30, 0.05, what="the batch written")
    wait_for(lambda: pub.consumer_info().num_ack_pending == 0, 15, 0.05, what="the acks")
    assert pub.consumer_info().num_redelivered == 0
    assert c.stop() == 0


def test_a_locked_database_is_waited_for_said_once_and_nothing_is_redelivered(tmp_path, consumer):
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
            c = consumer(central, [ns.url], "--close-workers", "0", "-v")
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
            written_once(central, pub, c, len(want))
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


def test_a_file_the_kernel_will_not_let_grow_is_waited_for_said_once(tmp_path, consumer):
    """The consumer's files may not grow (RLIMIT_FSIZE set on the running process: the kernel
    refuses the writes past it with EFBIG, as a full disk refuses them with ENOSPC; SQLite says
    'disk I/O error'): its transaction fails where it appends to the WAL; it is tried again
    with backoff, said once, and written once the limit is lifted: every reading once."""
    central = str(tmp_path / "central.db")
    rows = [[group(f"s{i:02d}", 7, range(1, 50)) for i in range(40)]]
    with NatsServer(tmp_path) as ns:
        pub = Publisher(ns.url)
        try:
            c = consumer(central, [ns.url], "--close-workers", "0", "-v")
            limit = max(os.path.getsize(central), os.path.getsize(central + "-wal"))
            assert os.path.getsize(c.log) < limit  # its log still grows
            resource.prlimit(c.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            pub.publish(columns3("site-1", *rows))
            wait_for(
                lambda: c.text().count("still refuses writes") >= 3,
                30,
                0.05,
                what=lambda: f"three retries while the WAL may not grow\n{c.text()[-3000:]}",
            )
            resource.prlimit(c.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            want = expected("site-1", *rows)
            written_once(central, pub, c, len(want))
        finally:
            pub.close()
    text = c.text()
    assert central_rows(central) == want and len(want) == 40 * 49 + 40
    warnings = [line for line in text.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "cannot write the central database (OperationalError: disk I/O error)" in warnings[0]
    assert text.count("takes writes again") == 1
    assert " ERROR " not in text and "retrying in" not in text and "Traceback" not in text


# ---------------------------------------------------------------- what the decoder admits is writable


# Integers and floats at the edges of what msgpack carries and SQLite holds (int64, finite REAL).
def mostly(ordinary, edges):
    """`ordinary` 9 times in 10 (so that many messages are taken and written), else `edges`."""
    return st.integers(0, 9).flatmap(lambda k: ordinary if k else edges)


EDGE_INTS = mostly(
    st.integers(0, 1000),
    st.one_of(
        st.sampled_from([-1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]), st.integers(-(2**63), 2**64 - 1)
    ),
)
EDGE_FLOATS = mostly(
    st.floats(0, 2e9),
    st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, -0.0, 2.0**32, 5e-324]), st.floats()),
)
TIMES = st.one_of(EDGE_FLOATS, EDGE_INTS)


@st.composite
def log_group(draw) -> list:
    n = draw(st.integers(1, 3))
    column = st.lists(st.one_of(st.none(), EDGE_FLOATS, EDGE_INTS), min_size=n, max_size=n)
    return [
        draw(st.sampled_from(["a", "b"])),
        draw(st.one_of(st.none(), EDGE_INTS)),
        draw(st.lists(EDGE_INTS, min_size=n, max_size=n)),
        draw(st.lists(TIMES, min_size=n, max_size=n)),
        draw(st.lists(TIMES, min_size=n, max_size=n)),
        draw(st.dictionaries(st.sampled_from(["t", "h"]), column, max_size=2)),
    ]


@st.composite
def snapshot_body(draw) -> list:
    gap = st.tuples(EDGE_INTS, EDGE_INTS, EDGE_INTS, EDGE_INTS, EDGE_INTS, TIMES).map(list)
    return [
        draw(st.sampled_from(["a", "b"])),
        draw(EDGE_INTS),
        draw(TIMES),
        draw(TIMES),
        *draw(st.lists(EDGE_INTS, min_size=6, max_size=6)),
        draw(st.lists(gap, max_size=2)),
        draw(EDGE_INTS),
    ]


@st.composite
def any_message(draw) -> bytes:
    """A message of every kind the decoder takes, its numbers drawn from the edges."""
    kind = draw(st.sampled_from(["R1", "C2", "C3", "A1", "S2", "S3"]))
    body = lambda gs: zlib.compress(msgpack.packb([ingestlog.BODY_VERSION, gs]))  # noqa: E731
    if kind == "R1":
        g = draw(log_group())
        out: list = [1, "R", "gw", *g]
    elif kind == "C2":
        out = [2, "C", "gw", [body(draw(st.lists(log_group(), min_size=1, max_size=2)))]]
    elif kind == "C3":
        n = draw(st.integers(1, 2))
        out = [
            3,
            "C",
            "gw",
            "ab01",
            [],
            [[1 + i, 0, True, body(draw(st.lists(log_group(), min_size=1, max_size=2)))] for i in range(n)],
        ]
    elif kind == "A1":
        out = [1, "A", "gw", *draw(snapshot_body())]
    elif kind == "S2":
        out = [2, "S", "gw", draw(st.lists(snapshot_body(), min_size=1, max_size=2))]
    else:
        counters = st.dictionaries(st.sampled_from(core.GATEWAY_COUNTERS), EDGE_INTS, max_size=2)
        out = [3, "S", "gw", "ab01", draw(EDGE_INTS), draw(counters), draw(st.lists(snapshot_body(), max_size=2))]
    return msgpack.packb(out)


@pytest.mark.untraced
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message())
def test_every_message_the_decoder_takes_is_writable(data):
    """Any message the decoder takes (as the writer decodes it, and as a worker prepares it)
    is written, every head closed into a chunk in the same transaction (max_heads 0), and read
    back after a restart; what the database cannot hold (NaN or infinite times and values,
    integers beyond int64) is bad_shape.  Before, a NaN first_seen failed NOT NULL and a count
    of 2**64 - 1 raised OverflowError in the writer: poison instead of rejects."""
    try:
        core.decode(data)
    except core.PayloadError as exc:
        assert exc.reason in core.REASONS
        return
    for prepare in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "central.db")
            c = Central(path, 0, max_heads=0)
            try:
                item = prepared.prepare(data) if prepare else core.decode(data)
                if isinstance(item, prepared.Prepared):
                    item.payload = data
                c.apply([item], now=NOW)
                c.apply([item], now=NOW)  # and again: a redelivery
            finally:
                c.close()
            c = Central(path, 0)  # its heads rebuilt from the log
            c.close()
            reading_rows(path)


# ---------------------------------------------------------------- a chunk that cannot be written

BAD = "site-1:bad"


def refuse_chunks(central: str, sensor: str = BAD) -> sqlite3.Connection:
    """A constraint only the database knows: a trigger refusing the chunks of `sensor` (the
    central database created as the consumer creates it).  Returns an open connection (its
    caller drops the trigger with it, or closes it)."""
    if not os.path.exists(central):
        Central(central).close()
    conn = sqlite3.connect(central, isolation_level=None)
    conn.execute(
        f"CREATE TRIGGER refuse_chunk BEFORE INSERT ON chunks WHEN NEW.sensor = '{sensor}' "
        "BEGIN SELECT RAISE(ABORT, 'refused by the operator'); END"
    )
    return conn


def publish_again(central: str, workers: int, trigger: sqlite3.Connection, payload: bytes, now: float) -> Counter:
    """The operator's fix: the trigger of refuse_chunks dropped, the message kept in
    uplink_quarantine published again to a new consumer; what that transaction counted."""
    trigger.execute("DROP TRIGGER refuse_chunk")
    trigger.close()
    c = Central(central, workers)
    try:
        done = c.apply([core.decode(payload)], now=now)
        c.settle()
    finally:
        c.close()
    return done


@pytest.mark.parametrize("workers", [0, 1])
def test_payload_2_datagrams_of_a_chunk_set_aside_are_stored_when_published_again(tmp_path, workers):
    """Payload 2 leaves an uplink_seen row per datagram taken.  When the chunk of those datagrams
    is set aside, their rows must go with it: before, they stayed, so the payload-1 message
    published again from uplink_quarantine once the cause was fixed counted its 5 readings as
    replayed and stored none of them (and the rows, in no chunk, outlived any retention)."""
    path = str(tmp_path / "central.db")
    trigger = refuse_chunks(path)
    rows = [[group("good", 7, (1, 2, 3)), group("bad", 7, (1, 2, 3, 4))]]
    now = NOW + 86400  # a day past the readings: every head closes at once
    c = Central(path, workers)
    try:
        assert c.apply([decoded(columns2("site-1", *rows))], now=now)["uplink_readings"] == 9
        c.settle()
        c.apply([], now=now)
        assert not c.store.heads and not c.store.closed_later
    finally:
        c.close()
    ((payload,),) = db_query(path, "SELECT payload FROM uplink_quarantine")
    assert db_query(path, "SELECT sensor, count(*) FROM uplink_seen GROUP BY sensor") == [("site-1:good", 3)]
    done = publish_again(path, workers, trigger, payload, now)
    assert (done["uplink_readings"], done["uplink_replayed_readings"]) == (5, 0)
    assert central_rows(path) == expected("site-1", *rows)
    assert db_query(path, "SELECT sensor, count(*) FROM uplink_seen GROUP BY sensor ORDER BY 1") == [
        ("site-1:bad", 4),
        ("site-1:good", 3),
    ]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_chunk_that_can_never_be_written_is_set_aside_and_the_rest_is_written(tmp_path, workers, caplog):
    """A trigger refuses the chunks of one sensor.  Before, with a close worker, every later
    transaction, even an empty one, failed inserting that worker-made chunk, so the consumer
    retried for ever ('cannot write the central database') and wrote nothing more; without
    one, every batch that closed the head failed (its messages then set aside one by one with
    other sensors' readings in them).  Now the head's 4 datagrams are set aside in
    uplink_quarantine as a payload-1 message (counted, one ERROR line), every other chunk and
    message is written, and the message published again once the trigger is gone stores them."""
    path = str(tmp_path / "central.db")
    trigger = refuse_chunks(path)
    rows = [[group("good", 7, (1, 2, 3)), group("bad", 7, (1, 2, 3, 4))]]
    later = [[group("good", 7, (4, 5)), group("other", 1, (1,))]]
    now = NOW + 86400  # a day past the readings: every head closes at once
    c = Central(path, workers)
    try:
        c.apply([decoded(columns3("site-1", *rows))], now=now)
        c.apply([decoded(columns3("site-1", *later, first_id=2))], now=now)
        c.settle()  # the worker's last chunks
        c.apply([], now=now)  # and the log rows no head holds trimmed
        assert not c.store.heads and not c.store.closed_later
    finally:
        c.close()
    good = expected("site-1", *rows, *later)
    assert central_rows(path) == sorted(r for r in good if r[0] != BAD)
    assert db_query(path, "SELECT sensor, count(*) FROM chunks GROUP BY sensor ORDER BY 1") == [
        ("site-1:good", 2),
        ("site-1:other", 1),
    ]
    ((gateway, subject, seq, error, payload),) = db_query(
        path, "SELECT gateway, subject, stream_seq, error, payload FROM uplink_quarantine"
    )
    assert (gateway, subject, seq, error) == (
        "site-1",
        "telemetry.site-1.bad.readings",
        0,
        "IntegrityError: refused by the operator",
    )
    g = group("bad", 7, (1, 2, 3, 4))
    assert core.decode(payload) == core.Readings("site-1", *g)
    assert db_counters(path)["uplink_quarantined"] == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(
        f"set aside 4 datagrams of {BAD} boot 7 whose chunk cannot be written (IntegrityError: refused by the "
        "operator): kept in uplink_quarantine id 1 as payload-1 messages"
    )
    # the cause fixed, the message published again: nothing was lost
    done = publish_again(path, workers, trigger, payload, now)
    assert done["uplink_readings"] == 5 and done["uplink_replayed_readings"] == 0
    assert central_rows(path) == sorted(good)


def test_a_consumer_whose_worker_made_chunk_cannot_be_written_goes_on(tmp_path, consumer, bin_path):
    """The same with a real consumer and its close worker: before, after the first message every
    write failed inserting the worker's chunk (even the empty transaction the consumer tries to
    tell a poison message from a database that refuses writes), so it retried for ever and wrote
    nothing more.  Now: one ERROR line, the head's datagrams set aside, every message written
    once and acked, no retry, and `status --central` shows it (exit 1)."""
    central = str(tmp_path / "central.db")
    refuse_chunks(central).close()
    rows = [[group("good", 7, (1, 2, 3)), group("bad", 7, (1, 2, 3, 4))]]
    later = [[group("good", 7, (4, 5)), group("other", 1, (1,))]]
    want = sorted(r for r in expected("site-1", *rows, *later) if r[0] != BAD)
    with NatsServer(tmp_path) as ns:
        pub = Publisher(ns.url)
        try:
            c = consumer(central, [ns.url], "--close-workers", "1")
            published(pub, central, columns3("site-1", *rows), 1, "the first message")
            pub.publish(columns3("site-1", *later, first_id=2))
            wait_for(
                lambda: (
                    db_counters(central)["uplink_quarantined"] == 1 and db_counters(central)["uplink_messages"] == 2
                ),
                30,
                0.05,
                what=lambda: f"the head set aside and the second message written\n{c.text()[-3000:]}",
            )
            wait_for(lambda: pub.consumer_info().num_ack_pending == 0, 15, 0.05, what="the acks")
            assert pub.consumer_info().num_redelivered == 0
            assert c.stop() == 0
        finally:
            pub.close()
    text = c.text()
    assert central_rows(central) == want
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"set aside 4 datagrams of {BAD} boot 7 whose chunk cannot be written" in errors[0]
    assert " WARNING " not in text and "Traceback" not in text and "retrying" not in text
    status = subprocess.run(
        [bin_path("telemetry-uplink"), "status", "--central", "--db", central],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 1 and "set aside   1 messages that cannot be written" in status.stdout.splitlines()
    assert "gateway site-1, stream sequence 0: IntegrityError: refused by the operator" in status.stdout


# ---------------------------------------------------------------- retention

DAY = 86400.0


def test_a_replay_of_rows_the_retention_deleted_is_not_stored_again(tmp_path):
    """With a retention (2 days here), the chunks of a gateway's rows go when they are older;
    the payload-2 copy of those rows redelivered after that (after the duplicate window, from a
    gateway that sent payload 3: checked against what is held, and nothing is held any more)
    was stored again (on the code before: 11 old readings back, besides the 5 new ones).  As a
    TSDB drops samples older than its retention, datagrams received before it are not stored:
    counted in uplink_expired_readings; the new ones are stored."""
    path = str(tmp_path / "central.db")
    old = expected("site-7", *ROWS)
    c = Central(path, 0, retain=2 * DAY)
    try:
        assert c.apply([decoded(columns3("site-7", *ROWS))], now=NOW)["uplink_readings"] == len(old)
        c.apply([], now=NOW + DAY)  # a day later the heads are past their span: chunks
        c.apply([], now=NOW + DAY)  # and the log rows that held them trimmed
        assert not c.store.heads and db_query(path, "SELECT count(*) FROM chunks") == [(2,)]
        c.maintain(now=NOW + 3 * DAY)  # three days on, the retention deletes them
        assert db_query(path, "SELECT count(*) FROM chunks") == [(0,)]
        fresh = [[group("a", 7, (5, 6), t0=NOW + 3 * DAY - 10), group("c", 1, (1,), t0=NOW + 3 * DAY - 10)]]
        done = c.apply([decoded(columns2("site-7", *ROWS, *fresh))], now=NOW + 3 * DAY)
        assert done["uplink_readings"] == len(expected("site-7", *fresh)) == 5
        assert done["uplink_expired_readings"] == len(old) == 11 and done["uplink_replayed_readings"] == 0
        # The payload-3 copy left no identity per datagram and what it stored is gone, so this
        # copy's old readings were counted expired although they were counted taken before
        # (docs/OPERATIONS.md "The central side"); its uplink_seen rows make the next
        # delivery a replay.
        again = c.apply([decoded(columns2("site-7", *ROWS, *fresh))], now=NOW + 3 * DAY)
        assert (again["uplink_readings"], again["uplink_expired_readings"]) == (0, 0)
        assert again["uplink_replayed_readings"] == len(old) + 5
        counters = db_counters(path)
    finally:
        c.close()
    assert central_rows(path) == expected("site-7", *fresh)
    assert counters["retention_dropped"] == len(old) and counters["uplink_expired_readings"] == len(old)
    assert counters["uplink_readings"] == len(old) + 5
    assert stats(path)["uplink_expired_readings"] == len(old)


@pytest.mark.parametrize("prepare", [False, True])
def test_datagrams_older_than_the_retention_are_counted_not_stored_whatever_brings_them(tmp_path, prepare):
    """Payload 3 (as the writer decodes it, and as a worker prepares it), 2 and 1, each with old
    and fresh datagrams of one sensor: the old ones counted in uplink_expired_readings, the
    fresh ones stored; without a retention (the default) everything is stored, as before."""
    now = NOW + 10 * DAY
    mixed = [[group("a", 7, (1, 2), t0=NOW), group("a", 7, (3, 4), t0=now - 100), group("b", 1, (1,), t0=NOW)]]
    fresh = expected("site-7", [mixed[0][1]])
    for retain, want in ((DAY, fresh), (0.0, expected("site-7", *mixed))):
        path = str(tmp_path / f"central-{retain}.db")
        c = Central(path, 0, retain=retain)
        try:
            done = Counter()
            for m in (decoded(columns3("site-7", *mixed), prepare), decoded(columns2("site-8", *mixed))):
                done += c.apply([m], now=now)
            for g in mixed[0]:
                done += c.apply(
                    [core.decode(core.readings_message(PREFIX, core.Readings("site-9", *g)).payload)], now=now
                )
        finally:
            c.close()
        everything = 3 * len(expected("site-7", *mixed))
        assert done["uplink_readings"] == 3 * len(want)
        assert done["uplink_expired_readings"] == everything - 3 * len(want)
        assert central_rows(path) == sorted(
            (f"{gw}:{r[0].split(':')[1]}", *r[1:]) for gw in ("site-7", "site-8", "site-9") for r in want
        )


def test_a_consumer_with_a_retention_drops_what_is_older(tmp_path, consumer):
    """`consume --retain 1h` with a real nats-server: a gateway's backlog of readings from 1970
    and of the last minute: the old ones counted in uplink_expired_readings, not stored."""
    central = str(tmp_path / "central.db")
    t = time.time() - 60
    rows = [[group("a", 7, (1, 2, 3)), group("b", 1, (1, 2), t0=t)], [group("a", 7, (4,), t0=t)]]
    want = expected("site-1", [rows[0][1]], rows[1])
    with NatsServer(tmp_path) as ns:
        pub = Publisher(ns.url)
        try:
            c = consumer(central, [ns.url], "--close-workers", "0", "--retain", "1h")
            published(pub, central, columns3("site-1", *rows), 1, "the message")
            assert c.stop() == 0
        finally:
            pub.close()
    assert central_rows(central) == want
    counters = db_counters(central)
    assert counters["uplink_readings"] == len(want) == 5
    assert counters["uplink_expired_readings"] == len(expected("site-1", [rows[0][0]])) == 4
    assert "5 readings stored, 0 replayed readings dropped, 4 older than the retention" in c.text()


def test_a_closed_central_writer_is_freed_without_the_cycle_collector(tmp_path):
    """Store.chunk_refused is the writer's own method (a reference cycle); close() breaks it, so
    a closed writer and its heads go at once (before, bench/central_core.py's second writer in
    the same process peaked 60 MB higher: the first one's heads waited for a full collection)."""
    import gc
    import weakref

    c = Central(str(tmp_path / "central.db"))
    c.apply([decoded(columns3("site-7", *ROWS))], now=NOW)
    gone = weakref.ref(c)
    gc.disable()
    try:
        c.close()
        del c
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("payload", ["3", "3 prepared", "2", "1"])
def test_each_expired_reading_is_counted_once_however_often_it_is_delivered(tmp_path, payload):
    """A message of datagrams older than the retention, delivered three times (a redelivery
    after ack-wait, a replay after the duplicate window): nothing stored, its readings counted
    once in uplink_expired_readings and then, each later delivery, in uplink_replayed_readings
    (payload 3 by its log ranges, payloads 1 and 2 by uplink_seen)."""
    path = str(tmp_path / "central.db")
    old = expected("site-7", *ROWS)
    c = Central(path, 0, retain=2 * DAY)
    try:
        done = Counter()
        for delivery in range(3):
            if payload.startswith("3"):
                items = [decoded(columns3("site-7", *ROWS), prepare=payload.endswith("prepared"))]
            elif payload == "2":
                items = [decoded(columns2("site-7", *ROWS))]
            else:
                items = [
                    core.decode(core.readings_message(PREFIX, core.Readings("site-7", *g)).payload)
                    for row in ROWS
                    for g in row
                ]
            step = c.apply(items, now=NOW + 3 * DAY)
            want = (0, len(old), 0) if delivery == 0 else (0, 0, len(old))
            got = (step["uplink_readings"], step["uplink_expired_readings"], step["uplink_replayed_readings"])
            assert got == want, delivery
            done += step
        counters = db_counters(path)
    finally:
        c.close()
    assert central_rows(path) == []
    assert (counters["uplink_expired_readings"], counters["uplink_replayed_readings"]) == (len(old), 2 * len(old))
    assert counters["uplink_readings"] == 0 and len(old) == 11


def test_a_payload_2_copy_of_expired_payload_3_rows_is_counted_expired_once_more(tmp_path):
    """The one case the central side cannot tell (docs/OPERATIONS.md "The central side"): payload 3
    keeps no identity per datagram, so the payload-2 copy of rows whose payload-3 copy was older
    than the retention is counted expired again; its uplink_seen rows make later copies replays."""
    path = str(tmp_path / "central.db")
    old = expected("site-7", *ROWS)
    c = Central(path, 0, retain=2 * DAY)
    try:
        counts = []
        for m in (columns3("site-7", *ROWS), columns2("site-7", *ROWS), columns2("site-7", *ROWS)):
            step = c.apply([decoded(m)], now=NOW + 3 * DAY)
            counts.append((step["uplink_readings"], step["uplink_expired_readings"], step["uplink_replayed_readings"]))
    finally:
        c.close()
    assert counts == [(0, len(old), 0), (0, len(old), 0), (0, 0, len(old))]
    assert central_rows(path) == []


def test_uplink_seen_rows_go_with_the_chunks_the_retention_deletes_and_a_replay_stays_out(tmp_path):
    """uplink_seen keeps one row per payload-1/2 datagram; with a retention, the rows of the
    datagrams in the chunks it deletes go with them (before: kept for good).  Those datagrams are
    older than the retention, so a replay of them is refused by age: not stored, counted in
    uplink_expired_readings (the identity that told a replay is gone), and the next delivery is
    a replay again.  A datagram whose chunk is kept keeps its row: its replay is dropped as one."""
    path = str(tmp_path / "central.db")
    old = expected("site-8", *ROWS)
    fresh = [[group("a", 7, (5, 6), t0=NOW + 3 * DAY - 10)]]
    new = len(expected("site-8", *fresh))
    c = Central(path, 0, retain=2 * DAY)
    try:
        assert c.apply([decoded(columns2("site-8", *ROWS))], now=NOW)["uplink_readings"] == len(old)
        c.apply([], now=NOW + DAY)  # the heads are past their span: chunks
        c.apply([], now=NOW + DAY)  # and the log rows that held them trimmed
        assert db_query(path, "SELECT count(*) FROM uplink_seen") == [(7,)]  # one per datagram
        assert c.apply([decoded(columns2("site-8", *fresh))], now=NOW + 3 * DAY)["uplink_readings"] == new == 3
        c.maintain(now=NOW + 3 * DAY)
        assert db_query(path, "SELECT count(*) FROM chunks") == [(0,)]
        assert db_query(path, "SELECT seq FROM uplink_seen ORDER BY seq") == [(5,), (6,)]  # the fresh ones
        counts = []
        for _ in range(2):
            step = c.apply([decoded(columns2("site-8", *ROWS, *fresh))], now=NOW + 3 * DAY)
            counts.append((step["uplink_readings"], step["uplink_expired_readings"], step["uplink_replayed_readings"]))
        counters = db_counters(path)
    finally:
        c.close()
    assert counts == [(0, len(old), new), (0, 0, len(old) + new)]
    assert central_rows(path) == expected("site-8", *fresh)
    assert counters["uplink_readings"] == len(old) + new and counters["retention_dropped"] == len(old)


@pytest.mark.parametrize("payload", ["2", "1"])
def test_datagrams_that_come_older_than_the_retention_leave_rows_only_for_the_retention(tmp_path, payload):
    """Payload 1/2 datagrams that arrive already older than the retention are never stored, so
    no chunk the retention deletes takes their identities with it: before, each left a
    uplink_seen row for good (7 rows here, after every retention step).  Now they are kept in
    uplink_expired for `retain` after they came (a redelivery meanwhile counts as replayed),
    then a retention step trims them; a delivery after that counts as expired again."""
    path = str(tmp_path / "central.db")
    old = expected("site-8", *ROWS)
    now = NOW + 3 * DAY
    c = Central(path, 0, retain=2 * DAY)

    def deliver(at: float) -> tuple[int, int, int]:
        if payload == "2":
            items = [decoded(columns2("site-8", *ROWS))]
        else:
            items = [
                core.decode(core.readings_message(PREFIX, core.Readings("site-8", *g)).payload) for r in ROWS for g in r
            ]
        step = c.apply(items, now=at)
        return step["uplink_readings"], step["uplink_expired_readings"], step["uplink_replayed_readings"]

    def rows() -> tuple[int, int]:
        ((seen,),) = db_query(path, "SELECT count(*) FROM uplink_seen")
        ((expired,),) = db_query(path, "SELECT count(*) FROM uplink_expired")
        return seen, expired

    try:
        assert deliver(now) == (0, len(old), 0) and len(old) == 11
        assert db_query(path, "SELECT count(*) FROM uplink_seen") == [(0,)]  # before: 7, for good
        assert rows() == (0, 7)  # one per datagram
        assert deliver(now + 10) == (0, 0, len(old))
        c.maintain(now=now + 2 * DAY - 1)  # not yet `retain` after they came
        assert rows() == (0, 7)
        c.maintain(now=now + 2 * DAY + 1)
        assert rows() == (0, 0)
        assert deliver(now + 2 * DAY + 2) == (0, len(old), 0)
        assert rows() == (0, 7)
    finally:
        c.close()
    assert central_rows(path) == []
