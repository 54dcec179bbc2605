"""query.ops on a database of known values: exact results for every op, paging, aggregates, plans."""

from __future__ import annotations

import logging
import math
import sqlite3

import pytest

from collector.schema import NO_BOOT, open_reader, open_writer
from query.ops import Limits, Ops
from query.protocol import RequestError, parse_request
from query.server import Service

from query_fixtures import COUNTERS, GAPS, READINGS, SENSORS, SERIES, T0, expected_rows


@pytest.fixture
def ops(known_db):
    conn = open_reader(known_db)
    yield Ops(conn)
    conn.close()


def run(ops: Ops, **request):
    import json

    return ops.run(parse_request(json.dumps(request).encode()))


def bad(ops: Ops, **request) -> str:
    with pytest.raises(RequestError) as info:
        run(ops, **request)
    assert info.value.code == "bad_request"
    return info.value.message


def test_ping(ops):
    assert run(ops, op="ping") == {"version": "0.1.0", "protocol": 1}


def test_sensors_lists_accounts_and_metrics(ops):
    result = run(ops, op="sensors")
    assert [s["sensor"] for s in result] == sorted(s[0] for s in SENSORS)
    s1 = result[0]
    assert s1 == {
        "sensor": "s1",
        "first_seen": T0 - 5.0,
        "last_seen": T0 + 3000.25,
        "datagrams": 320,
        "readings": 350,
        "lost": 7,
        "duplicates": 2,
        "reordered": 1,
        "restarts": 1,
        "metrics": ["hum", "temp"],
        "interval": 10.0,
        "stale": True,
        "stale_after": 30.0,
        "clock_offset": 0.25,
        "clock_skewed": False,
    }
    s9 = run(ops, op="sensors", sensor="s9")[0]
    assert s9["metrics"] == [] and (s9["interval"], s9["stale"], s9["clock_offset"], s9["clock_skewed"]) == (
        None,
        False,
        None,
        None,
    )  # nothing learned: never called stale
    assert run(ops, op="sensors", sensor="nope") == []


def test_sensors_stale_by_the_stored_rule_at_the_servers_time(known_db):
    conn = open_reader(known_db)
    try:
        now = T0 + 3000.25
        for at, stale in ((now + 30.0, ["s2"]), (now + 30.001, ["s1", "s2"]), (25.0, [])):
            ops = Ops(conn, clock=lambda: at)
            result = {s["sensor"]: s["stale"] for s in run(ops, op="sensors")}
            assert sorted(k for k, v in result.items() if v) == stale
            assert [s["sensor"] for s in run(ops, op="sensors", stale=True)] == stale
            assert len(run(ops, op="sensors", stale=False)) == len(SENSORS)  # false: no filter
        assert run(Ops(conn, clock=lambda: 1e10), op="sensors", sensor="s2", stale=True)[0]["clock_skewed"] is True
    finally:
        conn.close()


def test_latest_picks_the_largest_ts_and_breaks_ties_by_key(ops):
    result = run(ops, op="latest")
    assert [(r["sensor"], r["metric"]) for r in result] == sorted(SERIES)
    by_pair = {(r["sensor"], r["metric"]): r for r in result}
    # s1/temp: the last ts holds seqs 297, 298, 299 (all boot 7): the last in key order wins.
    assert by_pair[("s1", "temp")] == {
        "sensor": "s1",
        "metric": "temp",
        "ts": T0 + 990.0,
        "value": ((299 * 37) % 101) / 4 - 10,
        "seq": 299,
    }
    assert by_pair[("s2", "temp")] == {"sensor": "s2", "metric": "temp", "ts": 65.0, "value": 9.0, "seq": 109}
    assert run(ops, op="latest", sensor="s1", metric="hum") == [
        {"sensor": "s1", "metric": "hum", "ts": T0 + 49 * 60 + 0.5, "value": 73.5, "seq": 49}
    ]
    assert run(ops, op="latest", metric="temp") == [by_pair[("s1", "temp")], by_pair[("s2", "temp")]]
    assert run(ops, op="latest", sensor="s9") == []


def walk(ops, **request):
    rows, cursor, pages = [], None, 0
    while True:
        page = run(ops, op="readings", **request, cursor=cursor)
        pages += 1
        rows += page["rows"]
        assert len(page["rows"]) <= request.get("limit", 1000)
        cursor = page["next"]
        if cursor is None:
            return rows, pages
        assert pages < 1000


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 299, 300, 301, 1000])
@pytest.mark.parametrize("order", ["asc", "desc"])
def test_paging_walks_one_series_exactly_once(ops, limit, order):
    expected = expected_rows("s1", "temp")
    if order == "desc":
        expected.reverse()
    rows, pages = walk(ops, sensor="s1", metric="temp", limit=limit, order=order)
    assert rows == expected
    assert pages == max(1, math.ceil(len(expected) / limit))


@pytest.mark.parametrize("limit", [1, 4, 49, 50, 51, 349, 350, 1000])
@pytest.mark.parametrize("order", ["asc", "desc"])
def test_paging_without_metric_walks_every_series_of_the_sensor(ops, limit, order):
    # Metric by metric in name order (hum, then temp); desc is the exact reverse.
    expected = expected_rows("s1", "hum") + expected_rows("s1", "temp")
    if order == "desc":
        expected.reverse()
    rows, _ = walk(ops, sensor="s1", limit=limit, order=order)
    assert rows == expected


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("limit", [1, 2, 5])
def test_paging_with_a_range_and_ties_at_both_ends(ops, order, limit):
    since, until = T0 + 100.0, T0 + 200.0  # 10 timestamps x 3 tied readings; until is exclusive
    expected = [r for r in expected_rows("s1", "temp") if since <= r["ts"] < until]
    assert len(expected) == 30
    if order == "desc":
        expected.reverse()
    rows, _ = walk(ops, sensor="s1", metric="temp", since=since, until=until, limit=limit, order=order)
    assert rows == expected


def test_readings_edges(ops):
    assert run(ops, op="readings", sensor="nope") == {"rows": [], "next": None}
    assert run(ops, op="readings", sensor="s1", metric="nope") == {"rows": [], "next": None}
    assert run(ops, op="readings", sensor="s1", since=T0 + 5000, until=T0) == {"rows": [], "next": None}
    page = run(ops, op="readings", sensor="s1", metric="temp")
    assert len(page["rows"]) == 300 and page["next"] is None
    assert page["rows"][0] == {
        "sensor": "s1",
        "metric": "temp",
        "ts": float(T0),
        "value": -10.0,
        "seq": 0,
        "boot": None,
    }
    assert page["rows"][-1]["boot"] == 7
    # Negative timestamps and a single-row range.
    assert run(ops, op="readings", sensor="s2", since=-25, until=-24.5)["rows"] == [
        {"sensor": "s2", "metric": "temp", "ts": -25.0, "value": 0.0, "seq": 100, "boot": None}
    ]


def test_default_limit_is_1000_and_the_server_cap_applies(known_db):
    conn = open_reader(known_db)
    try:
        small = Ops(conn, Limits(max_rows=100))
        assert "'limit' must be 1-100" in bad(small, op="readings", sensor="s1", limit=101)
        assert len(run(small, op="readings", sensor="s1", limit=100)["rows"]) == 100
        assert len(run(small, op="latest")) == 4  # lists under the cap pass whole
    finally:
        conn.close()


def test_lists_over_the_row_cap_are_refused_not_truncated(known_db):
    conn = open_reader(known_db)
    try:
        tiny = Ops(conn, Limits(max_rows=2))
        assert "more than 2 sensors match" in bad(tiny, op="sensors")
        assert "more than 2 gaps match" in bad(tiny, op="gaps")
        assert "more than 2 readings match" in bad(tiny, op="latest")
        assert len(run(tiny, op="gaps", sensor="s1")) == 2
    finally:
        conn.close()


def test_cursor_from_another_query_or_forged_is_bad_request(ops):
    page = run(ops, op="readings", sensor="s1", metric="temp", limit=5)
    cursor = page["next"]
    assert "'cursor'" in bad(ops, op="readings", sensor="s1", metric="hum", limit=5, cursor=cursor)
    assert "'cursor'" in bad(ops, op="readings", sensor="s1", metric="temp", order="desc", cursor=cursor)
    assert "'cursor'" in bad(ops, op="readings", sensor="s1", metric="temp", cursor=cursor[:-3] + "abc")
    assert "'cursor'" in bad(ops, op="readings", sensor="s1", metric="temp", cursor="../../etc/passwd")
    # A different page size may continue the same walk.
    assert (
        run(ops, op="readings", sensor="s1", metric="temp", limit=2, cursor=cursor)["rows"]
        == expected_rows("s1", "temp")[5:7]
    )


def python_buckets(rows, bucket, since=None, until=None):
    """Independent reference: plain Python over the inserted tuples."""
    groups: dict[int, list[float]] = {}
    for ts, _boot, _seq, value in rows:
        if (since is None or ts >= since) and (until is None or ts < until):
            groups.setdefault(math.floor(ts / bucket), []).append(value)
    return [(k * bucket, len(v), min(v), max(v), math.fsum(v)) for k, v in sorted(groups.items())]


@pytest.mark.parametrize(
    "sensor, metric, bucket, since, until",
    [
        ("s1", "temp", 60, None, None),
        ("s1", "temp", 7, None, None),
        ("s1", "temp", 300, T0 + 95, T0 + 905),
        ("s1", "temp", 1, T0 + 100, T0 + 130),
        ("s1", "hum", 3600, None, None),
        ("s1", "hum", 0.25, T0, T0 + 600),
        ("s2", "temp", 20, None, None),  # negative ts: buckets floor toward -inf
        ("s2", "temp", 7, -30, 30),
        ("s1", "temp", 86400, None, None),
    ],
)
def test_aggregate_matches_python(ops, sensor, metric, bucket, since, until):
    result = run(ops, op="aggregate", sensor=sensor, metric=metric, bucket=bucket, since=since, until=until)
    expected = python_buckets(READINGS[SERIES[(sensor, metric)]], bucket, since, until)
    assert [(r["start"], r["count"], r["min"], r["max"]) for r in result] == [e[:4] for e in expected]
    for r, e in zip(result, expected):
        assert r["sum"] == pytest.approx(e[4], rel=1e-12, abs=1e-9)
        assert r["avg"] == pytest.approx(e[4] / e[1], rel=1e-12, abs=1e-9)
        assert r["start"] % bucket == 0
    assert sum(r["count"] for r in result) == sum(e[1] for e in expected) > 0


def test_aggregate_edges(ops):
    assert run(ops, op="aggregate", sensor="s1", metric="nope", bucket=60) == []
    assert run(ops, op="aggregate", sensor="s1", metric="temp", bucket=60, since=T0 + 5000) == []
    assert run(ops, op="aggregate", sensor="s1", metric="temp", bucket=60, since=T0, until=T0) == []
    assert isinstance(run(ops, op="aggregate", sensor="s1", metric="temp", bucket=60)[0]["start"], int)
    message = bad(ops, op="aggregate", sensor="s1", metric="temp", bucket=0.001)
    assert "'bucket'" in message and "at most 10000" in message
    # The bound is on the requested range, even where no data lies.
    assert "'bucket'" in bad(ops, op="aggregate", sensor="s1", metric="temp", bucket=1, since=0, until=T0)


def test_gaps(ops):
    def shaped(g):
        return {
            "sensor": g[0],
            "boot": None if g[2] == NO_BOOT else g[2],
            "first_seq": g[3],
            "last_seq": g[4],
            "missing": g[5],
            "detected_at": g[6],
        }

    by_time = sorted(GAPS, key=lambda g: g[6])
    assert run(ops, op="gaps") == [shaped(g) for g in by_time]
    assert run(ops, op="gaps", sensor="s1") == [shaped(g) for g in by_time if g[0] == "s1"]
    assert run(ops, op="gaps", since=T0 + 100.0, until=T0 + 2000.0) == [shaped(GAPS[0])]
    assert run(ops, op="gaps", sensor="s9") == []


def test_stats_sums_counters_and_sensors(ops):
    result = run(ops, op="stats")
    rejected = {reason: 0 for reason in result["rejected"]}
    rejected.update({"bad_id": 2, "not_msgpack": 6, "something_new": 1})
    assert result == {
        "received": 341,
        "stored": 331,
        "stored_readings": 361,
        "rejected": rejected,
        "duplicates": sum(s[6] for s in SENSORS),
        "lost": sum(s[5] for s in SENSORS),
        "kernel_drops": 4,
        "truncated": 1,
        "storage_dropped": 0,
        "internal_errors": 3,
        "refused_sensors": 8,
        "refused_readings": 13,
        "retention_dropped": 0,
        "budget_dropped": 0,
        "uplink_dropped": 0,
        "corrupt_chunks": 0,
        "last_flush": COUNTERS["last_flush"],
    }
    assert "bad_readings" in result["rejected"]  # every wire reason is listed, zero or not


def test_stats_on_a_fresh_database(db_path):
    open_writer(db_path).conn.close()
    conn = open_reader(db_path)
    try:
        result = Ops(conn).run(parse_request(b'{"op":"stats"}'))
    finally:
        conn.close()
    assert result["received"] == 0 and result["last_flush"] is None and result["lost"] == 0


INJECTIONS = [
    "x' OR '1'='1",
    "s1'; DELETE FROM readings; --",
    '" OR 1=1 --',
    "s1\x00",
    "%",
    "_",
    "*",
    "s1' UNION SELECT name, value FROM counters --",
    "x'; DROP TABLE readings;-- ",
]


@pytest.mark.parametrize("text", INJECTIONS)
def test_sql_injection_in_every_string_parameter_changes_nothing(known_db, text):
    conn = open_reader(known_db)
    stored = "SELECT (SELECT count(*) FROM chunks), total(count), total(sum) FROM chunk_series"
    before = conn.execute(stored).fetchone()
    ops = Ops(conn)
    try:
        assert run(ops, op="sensors", sensor=text) == []
        assert run(ops, op="latest", sensor=text) == []
        assert run(ops, op="latest", metric=text) == []
        assert run(ops, op="readings", sensor=text) == {"rows": [], "next": None}
        assert run(ops, op="readings", sensor="s1", metric=text) == {"rows": [], "next": None}
        assert run(ops, op="aggregate", sensor=text, metric="temp", bucket=60) == []
        assert run(ops, op="aggregate", sensor="s1", metric=text, bucket=60) == []
        assert run(ops, op="gaps", sensor=text) == []
        with pytest.raises(RequestError):
            run(ops, op="readings", sensor="s1", cursor=text)
        with pytest.raises(RequestError):
            run(ops, op="readings", sensor="s1", order=text)
    finally:
        after = conn.execute(stored).fetchone()
        conn.close()
    assert after == before


def test_a_sensor_named_like_an_injection_is_just_data(ops):
    name = "x'; DROP TABLE readings;--"
    assert run(ops, op="readings", sensor=name)["rows"][0]["value"] == 1.0
    assert run(ops, op="latest", sensor=name)[0]["seq"] == 1


def test_the_connection_is_read_only(ops):
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ops.conn.execute("DELETE FROM chunks")


def test_every_query_uses_an_index(known_db):
    """EXPLAIN QUERY PLAN of every statement the ops run: no chunk table is scanned whole;
    a series' chunks are found on (series, min_ts) or (series, max_ts)."""
    conn = open_reader(known_db)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    ops = Ops(conn)
    ops.heads.refresh(conn)  # the first refresh reads every chunk's closure once; later ones read new rows
    statements.clear()
    cursor = run(ops, op="readings", sensor="s1", limit=5, since=T0, until=T0 + 10**6)["next"]
    run(ops, op="readings", sensor="s1", limit=5, cursor=cursor, since=T0, until=T0 + 10**6)
    cursor = run(ops, op="readings", sensor="s1", metric="temp", limit=5, order="desc")["next"]
    run(ops, op="readings", sensor="s1", metric="temp", limit=5, order="desc", cursor=cursor)
    run(ops, op="latest")
    run(ops, op="aggregate", sensor="s1", metric="temp", bucket=60, since=T0, until=T0 + 600)
    run(ops, op="aggregate", sensor="s1", metric="temp", bucket=7, since=T0, until=T0 + 600)
    run(ops, op="aggregate", sensor="s1", metric="temp", bucket=60)
    conn.set_trace_callback(None)
    checked = latest = 0
    try:
        for sql in statements:
            if not sql.lstrip().upper().startswith("SELECT"):
                continue
            plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
            for table in ("chunks", "chunk_series", "rollup_1m_blocks", "rollup_1h", "ingest_log"):
                assert f"SCAN {table}" not in plan, (sql, plan)
            if "chunk_series" in sql or "rollup_" in sql:
                assert "(series=?" in plan, (sql, plan)
                checked += 1
            if "last_value" in sql:  # latest: a series' newest chunks sought, not all its chunks walked
                assert "chunk_series_max (series=? AND max_ts=?)" in plan, (sql, plan)
                latest += 1
    finally:
        conn.close()
    assert checked >= 8 and latest == 1


def test_query_budget_answers_bad_request(tmp_path):
    from v2ref import open_v2

    path = str(tmp_path / "big.db")
    db = open_v2(path)  # written as version 2, converted by the migration
    db.conn.execute("BEGIN")  # the writer connection autocommits (isolation_level=None)
    db.conn.execute("INSERT INTO series (id, sensor, metric) VALUES (1, 'b', 'm')")
    db.conn.executemany(
        "INSERT INTO readings VALUES (1, ?, -1, ?, ?, 0)", [(float(i), i, i * 0.5) for i in range(60_000)]
    )
    db.conn.execute("COMMIT")
    db.conn.close()
    open_writer(path).conn.close()
    conn = open_reader(path)
    try:
        slow = Ops(conn, Limits(query_seconds=1e-9))
        message = bad(slow, op="aggregate", sensor="b", metric="m", bucket=7)  # raw: decodes chunks
        assert "longer than" in message and "'since'" in message
        # The same connection still works under a sane budget.
        ops = Ops(conn)
        assert run(ops, op="aggregate", sensor="b", metric="m", bucket=60000)[0]["count"] == 60_000
        page = run(ops, op="readings", sensor="b")  # the default page is 1000 rows
        assert len(page["rows"]) == 1000 and page["rows"][-1]["seq"] == 999 and page["next"] is not None
    finally:
        conn.close()


def test_reading_a_long_ingest_log_is_under_the_query_budget_and_resumes(tmp_path):
    """The open heads are read from the ingest log under the request's budget: past it the
    request is refused like slow SQL, and the next request goes on from where it stopped."""
    from collector import wire
    from collector.store import open_ingest

    path = str(tmp_path / "log.db")
    store, core = open_ingest(path)
    try:
        for i in range(100):  # 100 flushes of one datagram: 100 log rows, all in an open head
            core.receive(wire.encode("s", i, {"m": float(i)}, boot=1, ts=T0 + i), T0 + i)
            assert store.flush(core, T0 + i)
    finally:
        store.close()
    conn = open_reader(path)
    try:
        ops = Ops(conn, Limits(query_seconds=1e-9))
        assert "longer than" in bad(ops, op="latest")
        assert ops.heads.last_log == 0 and not conn.in_transaction
        ops.limits = Limits()
        assert run(ops, op="latest") == [{"sensor": "s", "metric": "m", "ts": T0 + 99, "value": 99.0, "seq": 99}]
        assert ops.heads.last_log == 100
    finally:
        conn.close()


def test_an_internal_error_answers_internal_without_details_and_is_logged(known_db, caplog):
    class Broken(Ops):
        def op_stats(self):
            raise ZeroDivisionError("secret detail")

    service = Service(lambda: Broken(open_reader(known_db)))
    ops = service.make_ops()
    try:
        with caplog.at_level(logging.ERROR, logger="telemetry.query"):
            line = service.answer(ops, service.parse(b'{"op":"stats","id":4}'))
        assert b'"code":"internal"' in line and b"secret" not in line and b'"id":4' in line
        assert any("ZeroDivisionError" in (r.exc_text or "") for r in caplog.records)
        assert b'"ok":true' in service.answer(ops, service.parse(b'{"op":"ping"}'))
        assert b'"code":"internal"' in service.answer(
            None, service.parse(b'{"op":"stats","id":5}')
        )  # no database at all
    finally:
        ops.close()


def test_latest_is_one_row_per_series_when_every_reading_shares_its_ts(tmp_path):
    """A sensor whose clock is stuck sends one ts for ever: `latest` still answers one row per
    series (the last in key order), not every tied reading against --max-rows."""
    from v2ref import open_v2

    path = str(tmp_path / "stuck.db")
    db = open_v2(path)
    db.conn.execute("BEGIN")
    db.conn.execute("INSERT INTO series (id, sensor, metric) VALUES (1, 'stuck', 't'), (2, 'ok', 't')")
    db.conn.executemany(
        "INSERT INTO readings VALUES (1, 1000.0, ?, ?, ?, 0)",
        [(boot, seq, boot * 100 + seq) for boot in (NO_BOOT, 4, 5) for seq in range(50)],
    )
    db.conn.executemany("INSERT INTO readings VALUES (2, ?, 1, ?, ?, 0)", [(float(i), i, i) for i in range(30)])
    db.conn.execute("COMMIT")
    db.conn.close()
    open_writer(path).conn.close()
    conn = open_reader(path)
    try:
        capped = Ops(conn, Limits(max_rows=10))
        assert run(capped, op="latest") == [
            {"sensor": "ok", "metric": "t", "ts": 29.0, "value": 29.0, "seq": 29},
            {"sensor": "stuck", "metric": "t", "ts": 1000.0, "value": 549.0, "seq": 49},
        ]
    finally:
        conn.close()
