"""The central writer's columnar way (Central._columnar, session 8): a payload-3 message whose
blocks are all new is made ready by the writer as a worker makes it (prepared.from_blocks:
arrays, no Python step per value) and its central log row keeps the blocks' bodies as they came
(ingest_log body version 2).  Held to the way before it (Central.columnar = False: block by
block, merged per key, a version-1 row): the same chunks byte for byte, readings, sensors,
series and counters, on a fleet whose sensors name different metrics in different orders, leave
values out, restart, send no boot and send integers; and after a restart, whose heads are
rebuilt from the version-2 rows, still the same."""

from __future__ import annotations

import random
import zlib
from collections import Counter

import msgpack
import pytest
from test_uplink_closer import BUDGET, chunks
from test_uplink_prepared import counters, datagrams, per_key
from uplinkgw import readings

from collector import ingestlog
from collector.uplink import core
from collector.uplink.central import Central

from helpers import db_query

KINDS = [("temp", "hum"), ("hum", "temp"), ("count",), ("temp", "hum", "v")]


def fleet_rows(seed: int, gateway: int, count: int) -> list[list[ingestlog.Group]]:
    """A gateway's log rows: 12 sensors of four kinds (metrics named in different orders, an
    integer counter), 1-3 datagrams each a row, values left out now and then, a metric new in
    later rows, restarts (a second group of the sensor in the row), sensors without boot."""
    rnd = random.Random(seed * 100 + gateway)
    seq = {i: 0 for i in range(12)}
    boot = {i: (None if i % 5 == 4 else 1) for i in range(12)}
    out = []
    for r in range(count):
        groups = []
        for i in rnd.sample(range(12), rnd.randint(6, 12)):
            if boot[i] is not None and rnd.random() < 0.05:  # a restart: a new boot, seqs from 1
                boot[i] += 1
                seq[i] = 0
            n = rnd.randint(1, 3)
            seqs = list(range(seq[i] + 1, seq[i] + 1 + n))
            seq[i] += n
            ts = [1000.0 + r + k / 8 for k in range(n)]
            names = list(KINDS[i % 4])
            if r > count // 2 and i % 3 == 0:
                names.append("late")
            metrics = {}
            for name in names:
                if name == "count":
                    column = [q * 3 for q in seqs]
                else:
                    column = [round(20.0 + q / 100 + i, 2) for q in seqs]
                if name == "hum" and rnd.random() < 0.2:
                    column[rnd.randrange(n)] = None  # a datagram without it
                if any(v is not None for v in column):
                    metrics[name] = column
            groups.append(ingestlog.Group(f"s{i}", boot[i], seqs, ts, [t + 0.25 for t in ts], metrics))
        out.append(groups)
    return out


def messages(seed: int, gateways: int = 3, count: int = 40) -> list[bytes]:
    """The gateways' payload-3 messages, interleaved as a stream holds them (rows cut small, so
    messages hold several blocks and some rows are cut in pieces)."""
    per = []
    for gw in range(gateways):
        blocks = []
        for row_id, row in enumerate(fleet_rows(seed, gw, count), 1):
            body = ingestlog.encode_body(row)
            datagrams_, n = ingestlog.counts(row)
            blocks.append(core.Block(row_id, datagrams_, n, body, len(zlib.decompress(body))))
        per.append(
            [
                m.payload
                for m in core.columns_messages("telemetry", f"site-{gw}", blocks, max_datagrams=37, origin=f"ab0{gw}")
            ]
        )
    out = []
    for i in range(max(map(len, per))):
        out += [ms[i] for ms in per if i < len(ms)]
    return out


def write(path: str, batches: list[list[bytes]], columnar: bool) -> Counter:
    total: Counter = Counter()
    c = Central(path, 0, BUDGET)
    c.columnar = columnar
    try:
        for i, batch in enumerate(batches, 1):
            total.update(c.apply([core.decode(p) for p in batch], now=5000.0 + i))
    finally:
        c.close()
    return total


def body_versions(path: str) -> Counter:
    return Counter(
        msgpack.unpackb(zlib.decompress(body))[0] for (body,) in db_query(path, "SELECT body FROM ingest_log")
    )


def same_database(a: str, b: str) -> None:
    assert chunks(a) == chunks(b)  # the same bytes and log ids
    assert datagrams(a) == datagrams(b)
    assert counters(a) == counters(b)
    for sql in (
        "SELECT sensor, metric, id FROM series ORDER BY id",
        "SELECT * FROM sensors ORDER BY sensor",
        "SELECT lo, hi FROM uplink_ranges ORDER BY gateway, origin, lo",
    ):
        assert db_query(a, sql) == db_query(b, sql)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("per_txn", [1, 4])
def test_the_columnar_way_makes_the_database_the_way_before_it_made(tmp_path, seed, per_txn):
    msgs = messages(seed)
    batches = [msgs[i : i + per_txn] for i in range(0, len(msgs), per_txn)]
    old, new = str(tmp_path / "old.db"), str(tmp_path / "new.db")
    want = write(old, batches, columnar=False)
    got = write(new, batches, columnar=True)
    assert got == want
    n = sum(ingestlog.counts(row)[1] for gw in range(3) for row in fleet_rows(seed, gw, 40))
    assert got["uplink_readings"] == n and got["uplink_replayed_readings"] == 0
    assert len(readings(new)) == n
    assert len(chunks(old)) >= 10  # the budget closes heads all along
    same_database(old, new)
    # the new way was taken: every row of the new database keeps its blocks as they came
    assert set(body_versions(old)) == {ingestlog.BODY_VERSION}
    assert set(body_versions(new)) == {ingestlog.REFS_VERSION}
    assert body_versions(new).total() == body_versions(old).total() >= 1
    # and its rows hold, per (sensor, boot), the datagrams the old rows hold
    for (a,), (b,) in zip(
        db_query(old, "SELECT body FROM ingest_log ORDER BY id"),
        db_query(new, "SELECT body FROM ingest_log ORDER BY id"),
        strict=True,
    ):
        assert per_key(ingestlog.decode_body(a), sort_metrics=True) == per_key(
            ingestlog.decode_body(b), sort_metrics=True
        )


def test_heads_rebuilt_from_version_2_rows_after_a_restart_make_the_same_chunks(tmp_path):
    """Stopped (no close of its open heads: as a kill -9 leaves it) after half the stream and
    started again: the heads come back from the rows, version 2 or 1 alike."""
    msgs = messages(4)
    batches = [msgs[i : i + 2] for i in range(0, len(msgs), 2)]
    half = len(batches) // 2
    paths = {}
    for columnar in (False, True):
        path = paths[columnar] = str(tmp_path / f"{columnar}.db")
        for part in (batches[:half], batches[half:]):
            c = Central(path, 0, BUDGET)
            c.columnar = columnar
            for i, batch in enumerate(part, 1):
                c.apply([core.decode(p) for p in batch], now=5000.0 + i)
            c.store.close()  # its connection and lock, no head closed: what a kill -9 leaves
    same_database(paths[False], paths[True])
    n = sum(ingestlog.counts(row)[1] for gw in range(3) for row in fleet_rows(4, gw, 40))
    assert len(readings(paths[True])) == n


def test_a_message_the_columnar_way_cannot_keep_as_it_came_goes_the_way_before(tmp_path, monkeypatch):
    """A group that names a metric with no value (only None), a replay, a block partly new: block
    by block, as before; the database is the old way's."""
    msgs = messages(5, gateways=1)
    ghost = fleet_rows(5, 0, 3)
    ghost[1][0] = ghost[1][0]._replace(metrics={**ghost[1][0].metrics, "ghost": [None] * len(ghost[1][0].seqs)})
    blocks = []
    for row_id, row in enumerate(ghost, 1):
        body = ingestlog.encode_body(row)
        datagrams_, n = ingestlog.counts(row)
        blocks.append(core.Block(1000 + row_id, datagrams_, n, body, len(zlib.decompress(body))))
    (extra,) = [m.payload for m in core.columns_messages("telemetry", "site-0", blocks, origin="ab00")]
    batches = [msgs[:3], [extra], msgs[2:6], msgs[6:]]
    old, new = str(tmp_path / "old.db"), str(tmp_path / "new.db")
    want = write(old, batches, columnar=False)
    taken = []
    columnar = Central._columnar

    def spy(self, item):
        made = columnar(self, item)
        taken.append(made is not None)
        return made

    monkeypatch.setattr(Central, "_columnar", spy)
    got = write(new, batches, columnar=True)
    assert got == want
    assert got["uplink_replayed_readings"] == core.decode(msgs[2]).readings
    same_database(old, new)
    assert ("site-0:s0", "ghost") not in db_query(new, "SELECT sensor, metric FROM series")
    # made ready: all but the ghost message and the replayed one (msgs[2] again)
    assert taken == [True, True, True, False, False, True, True, True] + [True] * len(msgs[6:])
