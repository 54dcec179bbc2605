"""Payload-3 messages decoded and merged in a worker (prepared.py): the central database the
writer makes from them is the one it makes decoding them itself, a replay or a partly new
message is still taken block by block, and a worker's refusal reaches the writer intact."""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter

import pytest
from test_uplink_closer import BUDGET, chunks, rows
from uplinkgw import readings

from collector import ingestlog
from collector.uplink import closer, consumer, core, prepared
from collector.uplink.central import Central

from helpers import db_query


def per_key(groups: list[ingestlog.Group], sort_metrics: bool = False) -> str:
    """A log row's datagrams merged per (sensor, boot) in the order they came, as text: each
    key's seqs and metric columns (None where a datagram did not carry the metric), the metrics
    in the order they were first named, or by name with `sort_metrics`."""
    out: dict = {}
    for g in groups:
        seqs, columns = out.setdefault((g.sensor, str(g.boot)), [[], {}])
        before = len(seqs)
        seqs += g.seqs
        for name, values in g.metrics.items():
            columns.setdefault(name, [None] * before).extend(values)
        for column in columns.values():
            column += [None] * (len(seqs) - len(column))
    order = sorted if sort_metrics else list
    return repr(sorted((k, v[0], order(v[1].items())) for k, v in out.items()))


def payloads(data, first_id: int = 1, rows_per_message: int = 3, max_datagrams: int = 50_000) -> list[bytes]:
    """The gateway rows as payload-3 messages of several blocks each (as `telemetry-uplink run`
    cuts them; max_datagrams small: rows cut into pieces)."""
    out = []
    for at in range(0, len(data), rows_per_message):
        blocks = []
        for i, row in enumerate(data[at : at + rows_per_message]):
            body = ingestlog.encode_body(row)
            datagrams, n = ingestlog.counts(row)
            blocks.append(core.Block(first_id + at + i, datagrams, n, body, len(zlib.decompress(body))))
        out += [
            m.payload
            for m in core.columns_messages("telemetry", "site-7", blocks, max_datagrams=max_datagrams, origin="ab01")
        ]
    return out


def made_ready(payload: bytes) -> prepared.Prepared:
    item = prepared.prepare(payload)
    assert isinstance(item, prepared.Prepared)
    item.payload = payload
    return item


def feed(path: str, batches: list[list[bytes]], ready, workers: int = 0, columnar: bool = True) -> Counter:
    """The batches written by a Central; `ready`: a message prepared (True), decoded by the writer
    (False), or a function of the message's index in the stream that says which (a message that
    names a metric with no value is prepared as decoded: prepared.prepare).  columnar=False: the
    writer takes what it decoded block by block and merges per key (the way before session 8:
    the reference the other ways are held to)."""
    total: Counter = Counter()
    c = Central(path, workers, BUDGET)
    c.columnar = columnar
    k = 0
    try:
        for i, batch in enumerate(batches, 1):
            items = []
            for p in batch:
                if ready(k) if callable(ready) else ready:
                    item = prepared.prepare(p)  # a Blocks when it names a metric with no value
                    if isinstance(item, prepared.Prepared):
                        item.payload = p
                    items.append(item)
                else:
                    items.append(core.decode(p))
                k += 1
            total.update(c.apply(items, now=5000.0 + i))
    finally:
        c.close()
    return total


def counters(path: str) -> dict[str, int]:
    return dict(db_query(path, "SELECT name, value FROM counters WHERE name LIKE 'uplink_%'"))


def datagrams(path: str) -> list[tuple]:
    """Every reading of the database, in the order each (sensor, boot) holds them."""
    return sorted(readings(path))


def test_a_prepared_message_holds_its_blocks_merged_per_sensor_and_their_bodies_as_they_came():
    data = rows(6)
    (payload,) = payloads(data, rows_per_message=6)
    blocks = core.decode(payload)
    item = made_ready(payload)
    assert item.spans == tuple(b.range for b in blocks.blocks)
    assert (item.datagrams, item.readings) == (blocks.datagrams, blocks.readings) == (72, 134)
    assert sum(ingestlog.counts(r)[1] for r in data) == 134
    assert item.keys == [(f"site-7:s{i}", 1) for i in range(6)]
    groups = item.groups()
    for g, sensor in zip(groups, [f"s{i}" for i in range(6)], strict=True):
        mine = [m for row in data for m in row if m.sensor == sensor]  # six rows of it, in order
        assert g.sensor == f"site-7:{sensor}" and g.boot == 1
        assert g.seqs.tolist() == [q for m in mine for q in m.seqs]
        assert g.ts.tolist() == [t for m in mine for t in m.ts]
        assert g.received.tolist() == [t for m in mine for t in m.received]
        hum = [v for m in mine for v in m.metrics.get("hum", [None] * len(m.seqs))]
        assert [v != v for v in g.metrics["hum"].tolist()] == [v is None for v in hum]  # NaN where absent
        assert [v for v in g.metrics["hum"].tolist() if v == v] == [v for v in hum if v is not None]
    # the central log row keeps the blocks' bodies as they came: the gateway's groups in order,
    # renamed; per key the same datagrams as the merged groups, the values as they came
    assert item.bodies == tuple(b.body for b in blocks.blocks)
    body = ingestlog.decode_body(ingestlog.encode_refs([("site-7:", b) for b in item.bodies]))
    assert body == [g._replace(sensor=f"site-7:{g.sensor}") for row in data for g in row]
    for got in groups:
        mine = [g for g in body if (g.sensor, g.boot) == (got.sensor, got.boot)]
        assert [q for g in mine for q in g.seqs] == got.seqs.tolist()
        assert [t for g in mine for t in g.ts] == got.ts.tolist()
        assert [t for g in mine for t in g.received] == got.received.tolist()
    hum = [v for row in data for m in row if m.sensor == "s0" for v in m.metrics.get("hum", [None] * len(m.seqs))]
    assert [v for g in body if g.sensor == "site-7:s0" for v in g.metrics.get("hum", [None] * len(g.seqs))] == hum


@pytest.mark.parametrize("ready", [True, False], ids=["worker", "writer"])
@pytest.mark.parametrize("per_txn", [1, 3])
def test_prepared_messages_make_the_database_decoded_ones_make(tmp_path, per_txn, ready):
    """Made ready in a worker, or by the writer (Central._columnar): the database the writer's
    block-by-block way makes (chunks byte for byte)."""
    data = rows(60)
    msgs = payloads(data)
    batches = [msgs[i : i + per_txn] for i in range(0, len(msgs), per_txn)]
    want_done = feed(str(tmp_path / "decoded.db"), batches, ready=False, columnar=False)
    got_done = feed(str(tmp_path / "prepared.db"), batches, ready=ready)
    want_chunks, got_chunks = chunks(str(tmp_path / "decoded.db")), chunks(str(tmp_path / "prepared.db"))
    assert len(want_chunks) >= 20  # the budget closes heads all along
    assert got_chunks == want_chunks  # the same bytes and log ids
    assert got_done == want_done
    n = sum(ingestlog.counts(r)[1] for r in data)
    assert got_done["uplink_readings"] == n and got_done["uplink_replayed_readings"] == 0
    assert datagrams(str(tmp_path / "prepared.db")) == datagrams(str(tmp_path / "decoded.db"))
    assert len(datagrams(str(tmp_path / "prepared.db"))) == n
    assert counters(str(tmp_path / "prepared.db")) == counters(str(tmp_path / "decoded.db"))


def test_a_replayed_or_partly_new_prepared_message_is_taken_block_by_block(tmp_path):
    data = rows(30)
    whole = payloads(data, rows_per_message=5)
    pieces = payloads(data, rows_per_message=5, max_datagrams=7)  # the same rows cut otherwise
    assert len(pieces) > len(whole)
    n = sum(ingestlog.counts(r)[1] for r in data)
    path = str(tmp_path / "central.db")
    # the first half whole, then everything again in pieces (a retry cut differently), then whole
    # again in one transaction with a copy of itself: each reading once, the rest counted replayed
    done = feed(path, [whole[:3], pieces, whole + whole], ready=True)
    assert done["uplink_readings"] == n
    half = sum(ingestlog.counts(r)[1] for r in data[:15])
    assert done["uplink_replayed_readings"] == half + 2 * n
    assert len(datagrams(path)) == n
    assert datagrams(path) == datagrams(_decoded_once(tmp_path, data))


def _decoded_once(tmp_path, data) -> str:
    path = str(tmp_path / "once.db")
    feed(path, [[p] for p in payloads(data, rows_per_message=5)], ready=False)
    return path


def test_a_worker_prepares_messages_and_its_refusals_reach_the_writer_by_reason(tmp_path):
    data = rows(10)
    (payload,) = payloads(data, rows_per_message=10)
    c = closer.Closer(1)
    try:
        pool, future = c.prepare(payload)
        item = future.result(timeout=60)
        assert isinstance(item, prepared.Prepared) and item.payload == b""
        assert item.readings == core.decode(payload).readings
        for bad, reason in (
            (b"\xc1", "not_msgpack"),
            (payload[:-40], "not_msgpack"),
            (b"\x92\x09\xa1C", "bad_version"),
        ):
            _, future = c.prepare(bad)
            with pytest.raises(core.PayloadError) as err:
                future.result(timeout=60)
            assert err.value.reason == reason
        assert c.deaths == 0 and pool is c.pool
    finally:
        c.shutdown()


@pytest.mark.parametrize("ready", [True, False], ids=["worker", "writer"])
def test_metrics_a_group_does_not_carry_are_taken_as_the_writer_takes_them(tmp_path, ready):
    """A metric a gateway group holds only as None, a metric new in a later row, a sensor with no
    boot: the same database either way.  (A value sent as NaN is refused by both, bad_shape: no
    reading is NaN, and NaN stands for "not carried" in a head.)"""
    data = rows(24)
    nan_row = [data[0][0]._replace(metrics={**data[0][0].metrics, "temp": [float("nan")] * len(data[0][0].seqs)})]
    for decode in (core.decode, prepared.prepare):
        with pytest.raises(core.PayloadError) as err:
            decode(payloads([nan_row], rows_per_message=1)[0])
        assert err.value.reason == "bad_shape"
    for r, row in enumerate(data):
        g = row[1]
        row[1] = g._replace(metrics={**g.metrics, "ghost": [None] * len(g.seqs)})
        if r >= 10:
            g = row[2]
            row[2] = g._replace(metrics={**g.metrics, "late": [float(r)] * len(g.seqs)})
        g = row[3]
        row[3] = g._replace(boot=None)
    msgs = payloads(data, rows_per_message=4)
    batches = [msgs[i : i + 2] for i in range(0, len(msgs), 2)]
    want_done = feed(str(tmp_path / "decoded.db"), batches, ready=False, columnar=False)
    got_done = feed(str(tmp_path / "prepared.db"), batches, ready=ready)
    assert got_done == want_done
    assert chunks(str(tmp_path / "prepared.db")) == chunks(str(tmp_path / "decoded.db"))
    series = "SELECT sensor, metric FROM series ORDER BY sensor, metric"
    assert db_query(str(tmp_path / "prepared.db"), series) == db_query(str(tmp_path / "decoded.db"), series)
    assert ("site-7:s1", "ghost") not in db_query(str(tmp_path / "prepared.db"), series)
    got, want = datagrams(str(tmp_path / "prepared.db")), datagrams(str(tmp_path / "decoded.db"))
    assert repr(got) == repr(want)  # NaN (not carried) != NaN: compared as text
    bodies = "SELECT body FROM ingest_log ORDER BY id"
    for (a,), (b,) in zip(
        db_query(str(tmp_path / "prepared.db"), bodies), db_query(str(tmp_path / "decoded.db"), bodies)
    ):
        # the same datagrams per (sensor, boot), the None-only column left out
        assert per_key(ingestlog.decode_body(a)) == per_key(ingestlog.decode_body(b))


class _Msg:
    def __init__(self, data: bytes) -> None:
        self.data = data


def test_one_worker_decodes_every_third_message_across_fetches_and_the_writer_the_rest(tmp_path):
    msgs = payloads(rows(60), rows_per_message=4)
    assert len(msgs) >= 12
    c = consumer.Consumer(consumer.ConsumeSettings(db=str(tmp_path / "central.db"), close_workers=1))
    assert c.central.closer is not None and c.central.closer.share == closer.ONE_WORKER_SHARE
    sent = []  # the messages handed to the worker
    to_worker = c.central.closer.prepare

    def prepare(data: bytes):
        sent.append(data)
        return to_worker(data)

    c.central.closer.prepare = prepare

    async def fetches() -> list:
        got = []
        for batch in (msgs[:4], msgs[4:5], msgs[5:]):  # the count goes on from fetch to fetch
            got += [await item for item in c._decoded([_Msg(p) for p in batch])]
        return got

    try:
        items = asyncio.run(fetches())
        assert c.central.closer.deaths == 0
    finally:
        c.central.close()
    assert sent == [p for i, p in enumerate(msgs) if i % 3 == 2]
    # the writer makes the messages it decodes ready as the worker does (_ready)
    assert all(isinstance(item, prepared.Prepared) and item.payload == p for item, p in zip(items, msgs))
    assert [item.readings for item in items] == [core.decode(p).readings for p in msgs]


@pytest.mark.parametrize("per_txn", [1, 4])
def test_messages_prepared_and_decoded_in_one_transaction_make_the_decoded_database(tmp_path, per_txn):
    """One worker's share (every third message prepared, the rest decoded by the writer): the
    same chunks, readings and counters as every message decoded by the writer."""
    data = rows(60)
    msgs = payloads(data)
    batches = [msgs[i : i + per_txn] for i in range(0, len(msgs), per_txn)]
    want_done = feed(str(tmp_path / "decoded.db"), batches, ready=False, columnar=False)
    got_done = feed(str(tmp_path / "mixed.db"), batches, ready=lambda k: k % 3 == 2)
    assert chunks(str(tmp_path / "mixed.db")) == chunks(str(tmp_path / "decoded.db"))
    assert got_done == want_done
    n = sum(ingestlog.counts(r)[1] for r in data)
    assert got_done["uplink_readings"] == n and len(datagrams(str(tmp_path / "mixed.db"))) == n
    assert datagrams(str(tmp_path / "mixed.db")) == datagrams(str(tmp_path / "decoded.db"))
    assert counters(str(tmp_path / "mixed.db")) == counters(str(tmp_path / "decoded.db"))
