"""The central database: idempotent writes in a real SQLite file, readable by the query server."""

from __future__ import annotations

import zlib

import pytest

from collector import ingestlog, schema
from collector.errors import SetupError
from collector.uplink import core
from collector.uplink.central import Central

from helpers import db_counters, db_query


def readings(sensor="s.1", boot=7, seqs=(1, 2, 3), t0=1000.0):
    seqs = list(seqs)
    return core.Readings(
        "site-7",
        sensor,
        boot,
        seqs,
        [t0 + s for s in seqs],
        [t0 + s + 0.5 for s in seqs],
        {"temp": [float(s) for s in seqs], "hum": [None] * (len(seqs) - 1) + [50.0]},
    )


def accounts(as_of, datagrams=3, sensor="s.1"):
    return core.Accounts(
        "site-7", sensor, as_of, 1001.5, 1003.5, datagrams, 4, 1, 2, 0, 0, (core.Gap(0, 7, 4, 4, 1, 1003.5),), 1
    )


@pytest.fixture
def central(tmp_path):
    c = Central(str(tmp_path / "central.db"))
    yield c
    c.close()


def test_readings_land_once_under_the_gateway_prefixed_id(central):
    done = central.apply([readings()])
    assert done["uplink_readings"] == 4 and done["uplink_replayed_readings"] == 0
    again = central.apply([readings(), readings(seqs=(2, 3, 4))])  # a redelivery and an overlapping replay
    assert again["uplink_readings"] == 1 + 1  # seq 4: temp and hum
    assert again["uplink_replayed_readings"] == 4 + 2
    rows = db_query(
        central.path,
        "SELECT s.sensor, s.metric, r.seq, r.boot, r.value FROM readings r "
        "JOIN series s ON s.id = r.series ORDER BY s.metric, r.seq",
    )
    assert rows == [
        ("site-7:s.1", "hum", 3, 7, 50.0),
        ("site-7:s.1", "hum", 4, 7, 50.0),
        ("site-7:s.1", "temp", 1, 7, 1.0),
        ("site-7:s.1", "temp", 2, 7, 2.0),
        ("site-7:s.1", "temp", 3, 7, 3.0),
        ("site-7:s.1", "temp", 4, 7, 4.0),
    ]
    counters = db_counters(central.path)
    assert counters["uplink_readings"] == 6 and counters["uplink_replayed_readings"] == 6
    assert counters["uplink_messages"] == 3


def stored(path):
    return db_query(
        path,
        "SELECT s.sensor, s.metric, r.boot, r.seq, r.ts, r.value FROM readings r "
        "JOIN series s ON s.id = r.series ORDER BY 1, 2, 3, 4, 5",
    )


def columns(*groups):
    blocks = []
    for i, gs in enumerate(groups):
        body = ingestlog.encode_body(list(gs))
        datagrams, n = ingestlog.counts(list(gs))
        blocks.append(core.Block(i + 1, datagrams, n, body, len(zlib.decompress(body))))
    (m,) = core.columns_messages("telemetry", "site-7", blocks)
    return core.decode(m.payload)


def test_columns_land_like_the_same_readings_one_sensor_a_message(tmp_path, central):
    def g(sensor, boot, seqs, t0=1000.0):
        r = readings(sensor, boot, seqs, t0)
        return ingestlog.Group(r.sensor, r.boot, r.seqs, r.ts, r.received, r.metrics)

    rows = [[g("s.1", 7, (1, 2)), g("b", None, (1,))], [g("s.1", 7, (3,)), g("b", None, (1,), t0=2000.0)]]
    done = central.apply([columns(*rows)])
    assert done["uplink_readings"] == 3 + 2 + 2 + 2  # temp on every datagram, hum on each group's last
    assert done["uplink_replayed_readings"] == 0 and done["uplink_messages"] == 1
    other = Central(str(tmp_path / "v1.db"))
    try:
        for row in rows:
            other.apply([core.Readings("site-7", x.sensor, x.boot, x.seqs, x.ts, x.received, x.metrics) for x in row])
    finally:
        other.close()
    assert stored(central.path) == stored(str(tmp_path / "v1.db"))
    assert len(stored(central.path)) == done["uplink_readings"]
    # the same message again (after JetStream's window) adds nothing
    again = central.apply([columns(*rows)])
    assert again["uplink_readings"] == 0 and again["uplink_replayed_readings"] == done["uplink_readings"]


def test_a_datagram_twice_in_one_batch_is_stored_once(central):
    twice = readings(seqs=(1, 2, 2, 3))  # (seq 2, ts) twice in one message
    first = readings(seqs=(1,))
    done = central.apply([first, twice])  # a replay overlapping what the same batch stores
    assert done["uplink_readings"] == 2 + 1 + 2  # seq 1 temp and hum; seq 2 temp; seq 3 temp and hum
    assert done["uplink_replayed_readings"] == 1 + 1  # seq 1 temp again, the second seq 2
    assert [(row[1], row[3]) for row in stored(central.path)] == [
        ("hum", 1),
        ("hum", 3),
        ("temp", 1),
        ("temp", 2),
        ("temp", 3),
    ]


def test_a_sensor_without_boot_is_stored_with_boot_minus_one(central):
    central.apply([readings(boot=None, seqs=(1,))])
    assert db_query(central.path, "SELECT DISTINCT boot FROM readings") == [(schema.NO_BOOT,)]


def test_the_newest_accounts_snapshot_wins(central):
    central.apply([accounts(10, datagrams=3)])
    central.apply([accounts(5, datagrams=1)])  # older: ignored, counted
    central.apply([accounts(10, datagrams=3)])  # the same again: harmless
    row = db_query(
        central.path, "SELECT datagrams, readings, lost, duplicates FROM sensors WHERE sensor = ?", "site-7:s.1"
    )
    assert row == [(3, 4, 1, 2)]
    assert db_counters(central.path)["uplink_stale_accounts"] == 1
    assert db_query(central.path, "SELECT sensor, boot, first_seq, missing FROM gaps") == [("site-7:s.1", 7, 4, 1)]
    central.apply([core.Accounts("site-7", "s.1", 11, 1001.5, 1004.5, 4, 5, 0, 2, 1, 0, (), 0)])
    assert db_query(central.path, "SELECT count(*) FROM gaps") == [(0,)]  # the late fill closed the gap


def test_snapshots_of_many_sensors_apply_as_single_accounts_do(central):
    items = [accounts(10, datagrams=3), accounts(10, datagrams=5, sensor="s.2")]
    (m,) = core.snapshots_messages("telemetry", "site-7", items)
    done = central.apply([core.decode(m.payload)])
    assert done["uplink_accounts"] == 2 and done["uplink_messages"] == 1
    (older,) = core.snapshots_messages("telemetry", "site-7", [accounts(9, datagrams=1)])
    assert central.apply([core.decode(older.payload)])["uplink_stale_accounts"] == 1
    assert db_query(central.path, "SELECT sensor, datagrams FROM sensors ORDER BY sensor") == [
        ("site-7:s.1", 3),
        ("site-7:s.2", 5),
    ]


def test_readings_before_accounts_leave_a_sensor_row_the_snapshot_completes(central):
    central.apply([readings()])
    assert db_query(central.path, "SELECT first_seen, last_seen, datagrams FROM sensors") == [(1001.5, 1003.5, 0)]
    central.apply([accounts(3)])
    assert db_query(central.path, "SELECT datagrams FROM sensors") == [(3,)]


def test_a_failed_batch_changes_nothing(central):
    central.apply([readings()])
    # A value no chunk can hold (the payload decoder never lets one through):
    # its head closes at once (received long ago) and refuses it mid-transaction.
    bad = core.Readings("site-7", "s.2", 1, [1], [1.0], [1.0], {"x": [{"a": 1}]})
    with pytest.raises(TypeError):
        central.apply([readings(sensor="s.3"), bad])
    assert db_query(central.path, "SELECT count(*) FROM series WHERE sensor != 'site-7:s.1'") == [(0,)]
    central.apply([readings(sensor="s.3")])  # series ids were rolled back with it
    assert db_query(central.path, "SELECT max(id), count(*) FROM series") == [(4, 4)]


def test_rejected_messages_are_counted_by_reason(central):
    from collections import Counter

    central.apply([], Counter({"not_msgpack": 2, "bad_shape": 1}))
    counters = db_counters(central.path)
    assert counters["uplink_rejected:not_msgpack"] == 2 and counters["uplink_rejected:bad_shape"] == 1


def test_the_query_server_reads_the_central_database(central):
    central.apply([readings(), accounts(3)])
    from query.ops import Ops
    from query.protocol import parse_request

    ops = Ops(schema.open_reader(central.path))  # the reader the query server runs
    try:
        result = ops.run(parse_request(b'{"op": "sensors"}'))
        latest = ops.run(parse_request(b'{"op": "latest", "sensor": "site-7:s.1"}'))
    finally:
        ops.close()
    assert result == [
        {
            "sensor": "site-7:s.1",
            "first_seen": 1001.5,
            "last_seen": 1003.5,
            "datagrams": 3,
            "readings": 4,
            "lost": 1,
            "duplicates": 2,
            "reordered": 0,
            "restarts": 0,
            "metrics": ["hum", "temp"],
            # sensor health (schema v3) is the gateway's to learn; not carried by uplink v1
            "interval": None,
            "stale": False,
            "stale_after": None,
            "clock_offset": None,
            "clock_skewed": None,
        }
    ]
    assert [(r["metric"], r["seq"], r["value"]) for r in latest] == [("hum", 3, 50.0), ("temp", 3, 3.0)]


def test_one_consumer_per_central_database(central):
    with pytest.raises(SetupError, match="in use"):
        Central(central.path)


# ---------------------------------------------------------------- payload 3: ranges, not datagrams


def group(sensor, boot, seqs, t0=1000.0):
    r = readings(sensor, boot, seqs, t0)
    return ingestlog.Group(r.sensor, r.boot, r.seqs, r.ts, r.received, r.metrics)


def log_rows(*rows, first_id=1):
    """Gateway ingest_log rows (each a list of groups) as core.Blocks, ids from first_id."""
    out = []
    for i, gs in enumerate(rows):
        body = ingestlog.encode_body(list(gs))
        datagrams, n = ingestlog.counts(list(gs))
        out.append(core.Block(first_id + i, datagrams, n, body, len(zlib.decompress(body))))
    return out


def blocks_message(blocks, origin="ab01", gone=(), gateway="site-7", **limits):
    messages = core.columns_messages("telemetry", gateway, blocks, origin=origin, gone=gone, **limits)
    return [core.decode(m.payload) for m in messages]


def range_rows(path):
    return db_query(path, "SELECT gateway, origin, lo, hi FROM uplink_ranges ORDER BY 1, 2, 3")


ROWS = [
    [group("s.1", 7, (1, 2)), group("b", None, (1,))],
    [group("s.1", 7, (3,)), group("b", None, (1,), t0=2000.0)],  # b restarted its seqs (no boot)
    [group("s.1", 7, (4, 5, 6))],
]


def test_payload_3_lands_like_payload_2_and_a_replay_adds_nothing(tmp_path, central):
    done = central.apply(blocks_message(log_rows(*ROWS)))
    assert done["uplink_readings"] == 3 + 2 + 2 + 2 + 4 and done["uplink_replayed_readings"] == 0
    other = Central(str(tmp_path / "v2.db"))
    try:
        other.apply([columns(*ROWS)])
    finally:
        other.close()
    assert stored(central.path) == stored(str(tmp_path / "v2.db"))
    # three consecutive rows are one range; no datagram's identity is kept
    assert range_rows(central.path) == [("site-7", "ab01", 1 << 20, (3 << 20) | 0xFFFFF)]
    assert db_query(central.path, "SELECT count(*) FROM uplink_seen") == [(0,)]
    # the same rows again (after JetStream's window), and after a restart of the consumer
    again = central.apply(blocks_message(log_rows(*ROWS)))
    assert again["uplink_readings"] == 0 and again["uplink_replayed_readings"] == done["uplink_readings"]
    central.close()
    reopened = Central(central.path)
    try:
        assert reopened.apply(blocks_message(log_rows(ROWS[1], first_id=2)))["uplink_readings"] == 0
    finally:
        reopened.close()
    assert len(stored(central.path)) == done["uplink_readings"]


def test_rows_out_of_order_and_a_row_cut_differently_on_a_retry_land_once(central):
    big = [group("big", 7, range(1, 41)), group("c", 1, range(1, 21))]  # 60 datagrams in one row
    # the first try sent the row cut at 25 datagrams; only its second piece arrived
    pieces = blocks_message(log_rows(big, first_id=5), max_datagrams=25)
    assert [(b.offset, b.last) for m in pieces for b in m.blocks] == [(0, False), (25, False), (50, True)]
    assert central.apply([pieces[1]])["uplink_readings"] == 25 + 1 + 0  # temp x25, hum on big's 40th
    assert len(range_rows(central.path)) == 1
    # the retry cuts it at 40: its first piece overlaps what arrived, its second is partly new
    retry = blocks_message(log_rows(big, first_id=5), max_datagrams=40)
    done = central.apply(retry)
    assert done["uplink_readings"] == (60 + 2) - 26 and done["uplink_replayed_readings"] == 26
    # an older row arriving after a newer one: two ranges, then one once the hole is filled
    central.apply(blocks_message(log_rows(ROWS[2], first_id=6)))
    central.apply(blocks_message(log_rows(ROWS[0], first_id=3)))
    assert len(range_rows(central.path)) == 2
    central.apply(blocks_message(log_rows(ROWS[1], first_id=4)))
    assert range_rows(central.path) == [("site-7", "ab01", 3 << 20, (6 << 20) | 0xFFFFF)]
    assert len(stored(central.path)) == 62 + 4 + 5 + 4
    assert db_counters(central.path)["uplink_readings"] == 62 + 4 + 5 + 4


def test_rows_the_gateway_lost_close_the_hole_and_are_counted_once(central):
    central.apply(blocks_message(log_rows(ROWS[0], first_id=1)))
    # rows 2-9 were deleted by the gateway's disk budget before they were sent
    message = blocks_message(log_rows(ROWS[2], first_id=10), gone=[(2, 9)])
    done = central.apply(message)
    assert done["uplink_gone_rows"] == 8 and done["uplink_readings"] == 4
    assert range_rows(central.path) == [("site-7", "ab01", 1 << 20, (10 << 20) | 0xFFFFF)]
    assert central.apply(message)["uplink_gone_rows"] == 0  # a replay says it again: counted once
    assert db_counters(central.path)["uplink_gone_rows"] == 8


def test_a_recreated_gateway_database_is_new_data_not_a_replay(central):
    central.apply(blocks_message(log_rows(ROWS[0])))
    # the gateway's database was recreated: ids from 1 again, a new identity
    done = central.apply(blocks_message(log_rows([group("s.1", 7, (100, 101))]), origin="cd02"))
    assert done["uplink_readings"] == 2 + 1 and done["uplink_replayed_readings"] == 0
    assert [r[:2] for r in range_rows(central.path)] == [("site-7", "ab01"), ("site-7", "cd02")]


def test_payload_3_after_payload_2_drops_what_payload_2_brought(central):
    """An uplink upgraded in the middle of a round sends the round's rows again as payload 3."""
    central.apply([columns(ROWS[0])])
    done = central.apply(blocks_message(log_rows(ROWS[0], ROWS[2])))
    assert done["uplink_readings"] == 4 and done["uplink_replayed_readings"] == 3 + 2
    assert len(stored(central.path)) == 5 + 4


def test_the_gateways_drop_counters_reach_the_central_counters(central):
    def snap(as_of, origin, uplink_dropped, budget_dropped, gateway="site-7"):
        counters = {"uplink_dropped": uplink_dropped, "budget_dropped": budget_dropped}
        (m,) = core.snapshots_messages("telemetry", gateway, [], origin=origin, as_of=as_of, counters=counters)
        return core.decode(m.payload)

    central.apply([snap(10, "ab01", 5, 7)])
    central.apply([snap(8, "ab01", 1, 1)])  # older: ignored
    central.apply([snap(3, "cd02", 2, 0), snap(2, "ef03", 100, 100, gateway="site-8")])  # a recreated database
    counters = db_counters(central.path)
    assert counters["gateway_uplink_dropped:site-7"] == 5 + 2 and counters["gateway_budget_dropped:site-7"] == 7
    assert counters["gateway_uplink_dropped:site-8"] == 100 and counters["uplink_stale_accounts"] == 1
    # and the query server's stats show them per gateway
    from query.ops import Ops
    from query.protocol import parse_request

    ops = Ops(schema.open_reader(central.path))
    try:
        stats = ops.run(parse_request(b'{"op": "stats"}'))
    finally:
        ops.close()
    assert stats["gateway_uplink_dropped"] == {"site-7": 7, "site-8": 100}
    assert stats["gateway_budget_dropped"] == {"site-7": 7, "site-8": 100}
    assert (stats["uplink_readings"], stats["uplink_stale_accounts"], stats["stored"]) == (0, 1, 0)


def test_a_central_database_of_before_payload_3_is_migrated_on_open(tmp_path):
    path = str(tmp_path / "old.db")
    old = Central(path)
    old.apply([columns(ROWS[0])])
    old.conn.execute("DROP TABLE uplink_ranges")
    old.conn.execute("DROP TABLE uplink_gateways")
    old.close()
    c = Central(path)
    try:
        done = c.apply(blocks_message(log_rows(ROWS[0], ROWS[1])))
        assert done["uplink_readings"] == 4 and done["uplink_replayed_readings"] == 5
    finally:
        c.close()


def test_payload_2_between_payload_3_messages_is_remembered_for_the_next_payload_3(central):
    """A gateway downgraded to payload 2 and back: what payload 2 brought meanwhile is not
    taken twice when payload 3 sends the same rows again."""
    central.apply(blocks_message(log_rows(ROWS[2], first_id=3)))
    central.apply([columns(ROWS[0])])  # payload 2, rows 1 (s.1 seqs 1-2, b seq 1)
    done = central.apply(blocks_message(log_rows(ROWS[0], first_id=1)))
    assert done["uplink_readings"] == 0 and done["uplink_replayed_readings"] == 5


def test_payload_3_merges_groups_that_carry_different_metrics(tmp_path, central):
    def g(seqs, metrics):
        seqs = list(seqs)
        return ingestlog.Group("s.1", 7, seqs, [1000.0 + s for s in seqs], [1000.5 + s for s in seqs], metrics)

    rows = [
        [g((1, 2), {"temp": [1.0, 2.0]})],
        [g((3,), {"hum": [30.0]})],
        [g((4,), {"temp": [4.0], "hum": [None]})],
        [g((5,), {})],
        [g((6,), {"temp": [6.0], "hum": [60.0]})],
    ]
    done = central.apply(blocks_message(log_rows(*rows)))
    assert done["uplink_readings"] == 2 + 1 + 1 + 0 + 2
    other = Central(str(tmp_path / "v2.db"))
    try:
        other.apply([columns(*rows)])
    finally:
        other.close()
    assert stored(central.path) == stored(str(tmp_path / "v2.db"))
    assert len(stored(central.path)) == 6
