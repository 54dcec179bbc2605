"""The uplink's pure core: subject tokens, payloads v1 and v2, message ids, batching, backoff, cursor."""

from __future__ import annotations

import random
import string
import zlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import ingestlog
from collector.ingestlog import Entry, Group
from collector.uplink import core

SENSOR_CHARS = string.ascii_letters + string.digits + "._:/-"
sensor_ids = st.text(SENSOR_CHARS, min_size=1, max_size=64)


@given(sensor_ids)
def test_sensor_tokens_round_trip_and_are_one_subject_token(sensor):
    token = core.sensor_token(sensor)
    assert core.token_sensor(token) == sensor
    assert all(c not in token for c in ". *>\t")
    assert core.subject("telemetry", "site-7", sensor, core.KIND_READINGS).split(".")[2] == token


def test_sensor_token_examples():
    assert core.sensor_token("sim-0001") == "sim-0001"
    assert core.sensor_token("a.b:c/d_e") == "a%2Eb%3Ac%2Fd_e"
    assert core.subject("telemetry", "site-7", "a.b", core.KIND_ACCOUNTS) == "telemetry.site-7.a%2Eb.accounts"


@pytest.mark.parametrize("token", ["a%2eb", "a%2", "a.b", "a b", "%41"])
def test_non_canonical_tokens_are_refused(token):
    with pytest.raises(ValueError):
        core.token_sensor(token)


@pytest.mark.parametrize("name", ["", "a" * 33, "site.7", "site 7", "site:7", "*", ">"])
def test_bad_gateway_names(name):
    with pytest.raises(ValueError):
        core.check_gateway(name)


def group(sensor="s1", boot=7, seqs=(1, 2, 3), metrics=None):
    seqs = list(seqs)
    ts = [1000.0 + s for s in seqs]
    rec = [t + 0.5 for t in ts]
    metrics = metrics if metrics is not None else {"temp": [float(s) for s in seqs]}
    return Group(sensor, boot, seqs, ts, rec, metrics)


# What a reading can be (the wire admits no other, and the central database holds no other):
# finite floats and int64s (tests/test_uplink_robust.py: any message the decoder takes is writable).
values = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**63), 2**63 - 1))


@st.composite
def readings_items(draw):
    n = draw(st.integers(1, 20))
    metrics = draw(
        st.dictionaries(st.text(min_size=1, max_size=8), st.lists(values, min_size=n, max_size=n), max_size=4)
    )
    return core.Readings(
        draw(st.from_regex(core.GATEWAY_RE, fullmatch=True)),
        draw(sensor_ids),
        draw(st.one_of(st.none(), st.integers(0, 2**32))),
        draw(st.lists(st.integers(0, 2**32), min_size=n, max_size=n)),
        draw(st.lists(st.floats(0, 2e9), min_size=n, max_size=n)),
        draw(st.lists(st.floats(0, 2e9), min_size=n, max_size=n)),
        metrics,
    )


@settings(max_examples=40)
@given(readings_items())
def test_readings_payload_round_trips(item):
    assert core.decode(core.encode(item)) == item


def test_accounts_payload_round_trips():
    gaps = (core.Gap(0, 7, 5, 6, 2, 1000.5), core.Gap(1, 8, 1, 1, 1, 1001.0))
    item = core.Accounts("site-7", "s/1", 42, 1.0, 2.0, 10, 20, 3, 1, 2, 1, gaps, 2)
    assert core.decode(core.encode(item)) == item


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_give_an_item_or_a_payload_error(data):
    try:
        item = core.decode(data)
    except core.PayloadError as exc:
        assert exc.reason in core.REASONS
    else:
        assert isinstance(item, (core.Readings, core.Accounts, core.Columns, core.Snapshots, core.Blocks))


BODY = zlib.compress(msgpack.packb([1, [["s", 1, [1], [1.0], [1.0], {"t": [2.5]}]]]))


@pytest.mark.parametrize(
    "body, reason",
    [
        ([4, "R"], "bad_version"),
        ([3, "R"], "bad_kind"),  # version 3 sends columns too
        ([0, "R"], "bad_version"),
        ([True, "R"], "bad_version"),
        ([1, "X"], "bad_kind"),
        ([2, "R"], "bad_kind"),  # version 2 sends columns, not per-sensor readings
        ([1, "C", "gw", [b""]], "bad_kind"),
        ([2, "C", "gw", []], "bad_shape"),  # no block
        ([1, "S", "gw", []], "bad_kind"),  # snapshots are version 2
        ([2, "S", "gw", []], "bad_shape"),  # no snapshot
        ([2, "S", "gw", [["s", 1, 1.0, 2.0, 1, 1, 0, 0, 0, 0, []]]], "bad_shape"),  # 11 items
        ([2, "S", "gw", [["s", 1, 1.0, 2.0, 1, 1.5, 0, 0, 0, 0, [], 0]]], "bad_shape"),  # a float count
        ([2, "S", "g w", [["s", 1, 1.0, 2.0, 1, 1, 0, 0, 0, 0, [], 0]]], "bad_shape"),
        ([2, "C", "gw", ["text"]], "bad_shape"),  # a block is bytes
        ([2, "C", "g.w", [zlib.compress(msgpack.packb([1, []]))]], "bad_shape"),
        ([2, "C", "gw", [b"not zlib"]], "bad_block"),
        ([2, "C", "gw", [zlib.compress(msgpack.packb([1, []])) + b"x"]], "bad_block"),  # trailing bytes
        ([2, "C", "gw", [zlib.compress(msgpack.packb([1, []]))[:-3]]], "bad_block"),  # cut short
        ([2, "C", "gw", [zlib.compress(b"\xc1")]], "bad_block"),  # not msgpack inside
        ([2, "C", "gw", [zlib.compress(msgpack.packb([2, []]))]], "bad_block"),  # log body version 2
        ([2, "C", "gw", [zlib.compress(msgpack.packb([1, [[1, 2]]]))]], "bad_shape"),  # a group of 2 items
        ([2, "C", "gw", [zlib.compress(msgpack.packb([1, [["s", 1, [1], [1.0], [1.0], {"t": ["x"]}]]]))]], "bad_shape"),
        ([1, "R", "gw", "s", 1, [1, 2], [1.0], [1.0], {}], "bad_shape"),  # lengths differ
        ([1, "R", "gw", "s", 1, [], [], [], {}], "bad_shape"),  # no datagram
        ([1, "R", "g.w", "s", 1, [1], [1.0], [1.0], {}], "bad_shape"),  # gateway not a token
        ([1, "R", "gw", "s", 1, [1], [1.0], [1.0], {"t": ["x"]}], "bad_shape"),  # a string value
        ([1, "R", "gw", "s", 1, [1], [float("inf")], [1.0], {}], "bad_shape"),  # time not finite
        ([1, "A", "gw", "s", 1, 1.0, 2.0, 1, 1, 0, 0, 0, 0, [[1, 2, 3]], 1], "bad_shape"),  # a gap of 3 items
        ("not an array", "bad_shape"),
        ([3, "C", "gw", "ab", [], []], "bad_shape"),  # no block and nothing gone
        ([3, "C", "gw", "AB", [], [[1, 0, True, BODY]]], "bad_shape"),  # origin: lower-case hex
        ([3, "C", "gw", "ab", [[2, 1]], []], "bad_shape"),  # gone: first > last
        ([3, "C", "gw", "ab", [], [[1, 0, 1, BODY]]], "bad_shape"),  # last is a bool
        ([3, "C", "gw", "ab", [], [[0, 0, True, BODY]]], "bad_shape"),  # ids start at 1
        ([3, "C", "gw", "ab", [], [[1, 1 << 20, False, BODY]]], "bad_shape"),  # offset beyond a row
        ([3, "C", "gw", "ab", [], [[1, 0, True, BODY, 0]]], "bad_shape"),
        ([3, "C", "gw", "ab", [], [[1, 0, True, b"not zlib"]]], "bad_block"),
        ([3, "C", "gw", "ab", [], [[1, 0, True, zlib.compress(msgpack.packb([1, []]))]]], "bad_block"),  # no group
        (
            [
                3,
                "C",
                "gw",
                "ab",
                [],
                [[1, 0, True, zlib.compress(msgpack.packb([1, [["s", 1, [1], [1.0], [1.0], {"t": ["x"]}]]]))]],
            ],
            "bad_shape",
        ),
        (
            [
                3,
                "C",
                "gw",
                "ab",
                [],
                [[1, 0, True, zlib.compress(msgpack.packb([1, [["s", 1, [1.5], [1.0], [1.0], {}]]]))]],
            ],
            "bad_shape",
        ),
        (
            [
                3,
                "C",
                "gw",
                "ab",
                [],
                [[1, 0, True, zlib.compress(msgpack.packb([1, [["s", 1, [1], [float("nan")], [1.0], {}]]]))]],
            ],
            "bad_shape",
        ),
        ([3, "S", "gw", "ab", 1, {"uplink_dropped": -1}, []], "bad_shape"),  # a negative counter
        # what the central database cannot hold (an int past int64, a NaN, inf or out-of-range time,
        # a reading that is not finite): refused here, never poison for the writer
        ([3, "S", "gw", "ab", 1, {"uplink_dropped": 2**63}, []], "bad_shape"),
        ([3, "S", "gw", "ab", 2**63, {}, []], "bad_shape"),  # as_of
        ([2, "S", "gw", [["s", 1, float("nan"), 2.0, 1, 1, 0, 0, 0, 0, [], 0]]], "bad_shape"),  # first_seen
        ([2, "S", "gw", [["s", 1, 1.0, float("inf"), 1, 1, 0, 0, 0, 0, [], 0]]], "bad_shape"),  # last_seen
        ([2, "S", "gw", [["s", 1, 1.0, 2.0, 2**64 - 1, 1, 0, 0, 0, 0, [], 0]]], "bad_shape"),  # datagrams
        ([2, "S", "gw", [["s", 2**63, 1.0, 2.0, 1, 1, 0, 0, 0, 0, [], 0]]], "bad_shape"),  # as_of
        ([2, "S", "gw", [["s", 1, 1.0, 2.0, 1, 1, 0, 0, 0, 0, [], 2**63]]], "bad_shape"),  # gaps_total
        ([1, "A", "gw", "s", 1, 1.0, 2.0, 1, 1, 0, 0, 0, 0, [[0, 2**63, 1, 1, 1, 1.0]], 1], "bad_shape"),  # gap boot
        ([1, "A", "gw", "s", 1, 1.0, 2.0, 1, 1, 0, 0, 0, 0, [[0, 1, 1, 1, 1, float("nan")]], 1], "bad_shape"),
        ([1, "A", "gw", "s", 1, -1.0, 2.0, 1, 1, 0, 0, 0, 0, [], 0], "bad_shape"),  # a time before 1970
        ([1, "R", "gw", "s", 2**63, [1], [1.0], [1.0], {}], "bad_shape"),  # boot
        ([1, "R", "gw", "s", 1, [2**64 - 1], [1.0], [1.0], {}], "bad_shape"),  # seq
        ([1, "R", "gw", "s", 1, [1], [2.0**32], [1.0], {}], "bad_shape"),  # ts past the wire's range
        ([1, "R", "gw", "s", 1, [1], [1.0], [1e300], {}], "bad_shape"),  # received
        ([1, "R", "gw", "s", 1, [1], [1.0], [1.0], {"t": [float("nan")]}], "bad_shape"),
        ([1, "R", "gw", "s", 1, [1, 2], [1.0, 2.0], [1.0, 2.0], {"t": [None, -float("inf")]}], "bad_shape"),
        ([1, "R", "gw", "s", 1, [1], [1.0], [1.0], {"t": [2**63]}], "bad_shape"),
        ([2, "C", "gw", [zlib.compress(msgpack.packb([1, [["s", 1, [2**63], [1.0], [1.0], {}]]]))]], "bad_shape"),
        (
            [
                3,
                "C",
                "gw",
                "ab",
                [],
                [[1, 0, True, zlib.compress(msgpack.packb([1, [["s", 2**63, [1], [1.0], [1.0], {}]]]))]],
            ],
            "bad_shape",
        ),
        (
            [
                3,
                "C",
                "gw",
                "ab",
                [],
                [[1, 0, True, zlib.compress(msgpack.packb([1, [["s", 1, [2**64 - 1], [1.0], [1.0], {}]]]))]],
            ],
            "bad_shape",
        ),
        (
            [
                3,
                "C",
                "gw",
                "ab",
                [],
                [[1, 0, True, zlib.compress(msgpack.packb([1, [["s", 1, [1], [1e300], [1.0], {}]]]))]],
            ],
            "bad_shape",
        ),
        (
            [
                3,
                "C",
                "gw",
                "ab",
                [],
                [[1, 0, True, zlib.compress(msgpack.packb([1, [["s", 1, [1], [1.0], [-0.5], {}]]]))]],
            ],
            "bad_shape",
        ),
        (
            [
                3,
                "C",
                "gw",
                "ab",
                [],
                [[1, 0, True, zlib.compress(msgpack.packb([1, [["s", 1, [1], [1.0], [1.0], {"t": [float("inf")]}]]]))]],
            ],
            "bad_shape",
        ),
        (
            [
                3,
                "C",
                "gw",
                "ab",
                [],
                [[1, 0, True, zlib.compress(msgpack.packb([1, [["s", 1, [1], [1.0], [1.0], {"t": [2**64 - 1]}]]]))]],
            ],
            "bad_shape",
        ),
        ([3, "S", "gw", "ab", 1, {}], "bad_shape"),  # 6 items
        ([3, "S", "gw", "", 1, {}, []], "bad_shape"),  # no origin
    ],
)
def test_named_bad_payloads(body, reason):
    with pytest.raises(core.PayloadError) as err:
        core.decode(msgpack.packb(body))
    assert err.value.reason == reason


def test_oversized_payload_refused_before_parsing():
    with pytest.raises(core.PayloadError) as err:
        core.decode(b"\x00" * (core.MAX_PAYLOAD_BYTES + 1))
    assert err.value.reason == "too_large"


def test_message_id_is_the_content_identity():
    a = core.Readings("gw", "s.1", 7, [3, 4, 5], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], {"t": [1.0, 2.0, 3.0]})
    m1 = core.readings_message("telemetry", a)
    m2 = core.readings_message("telemetry", core.decode(m1.payload))
    assert m1.msg_id == m2.msg_id and m1.msg_id.startswith("gw.s%2E1.7.3-5.3.")
    assert (m1.datagrams, m1.readings) == (3, 3)
    # same identity fields, other content (a boot-less sensor that restarted its seqs): other id
    b = core.Readings("gw", "s.1", 7, [3, 4, 5], [9.0, 9.5, 9.9], [1.0, 2.0, 3.0], {"t": [1.0, 2.0, 3.0]})
    assert core.readings_message("telemetry", b).msg_id != m1.msg_id
    none_boot = core.Readings("gw", "s", None, [1], [1.0], [1.0], {})
    assert core.readings_message("telemetry", none_boot).msg_id.startswith("gw.s.-.1-1.1.")


def flatten(items):
    out = []
    for r in items:
        for i, seq in enumerate(r.seqs):
            out.append(
                (
                    r.sensor,
                    r.boot,
                    seq,
                    r.ts[i],
                    r.received[i],
                    tuple(sorted((k, v[i]) for k, v in r.metrics.items() if v[i] is not None)),
                )
            )
    return out


def flatten_groups(entries):
    out = []
    for e in entries:
        for g in e.groups:
            for i, seq in enumerate(g.seqs):
                out.append(
                    (
                        g.sensor,
                        g.boot,
                        seq,
                        g.ts[i],
                        g.received[i],
                        tuple(sorted((k, v[i]) for k, v in g.metrics.items() if v[i] is not None)),
                    )
                )
    return out


@settings(max_examples=200)
@given(st.data())
def test_batching_keeps_every_datagram_once_and_respects_the_size(data):
    rng = random.Random(data.draw(st.integers(0, 10**6)))
    entries = []
    seq = {}
    for eid in range(1, data.draw(st.integers(1, 6)) + 1):
        groups = []
        for sensor in rng.sample(["a", "b.c", "d:e"], rng.randint(1, 3)):
            boot = rng.choice([None, 1, 2])
            n = rng.randint(1, 7)
            seqs = []
            for _ in range(n):
                seq[sensor] = seq.get(sensor, 0) + 1
                seqs.append(seq[sensor])
            metrics = {
                m: [rng.choice([None, rng.random()]) for _ in range(n)]
                for m in rng.sample(["t", "h", "p"], rng.randint(0, 3))
            }
            groups.append(group(sensor, boot, seqs, metrics))
        entries.append(Entry(eid, float(eid), groups))
    size = data.draw(st.integers(1, 10))
    items = core.batch("gw", entries, size)
    assert all(1 <= r.datagrams <= size for r in items)
    assert sorted(flatten(items), key=repr) == sorted(flatten_groups(entries), key=repr)
    # per (sensor, boot), commit order is kept
    for key in {(r.sensor, r.boot) for r in items}:
        got = [s for r in items if (r.sensor, r.boot) == key for s in r.seqs]
        want = [s for e in entries for g in e.groups if (g.sensor, g.boot) == key for s in g.seqs]
        assert got == want
    for r in items:  # every metric a piece carries has a value in it
        assert all(any(v is not None for v in column) for column in r.metrics.values())


def test_batching_merges_entries_per_sensor_and_boot():
    e1 = Entry(1, 1.0, [group("a", 1, [1, 2]), group("b", 1, [1])])
    e2 = Entry(2, 2.0, [group("a", 1, [3], {"temp": [3.0], "hum": [50.0]}), group("a", 2, [1])])
    items = core.batch("gw", [e1, e2], 100)
    assert [(r.sensor, r.boot, r.seqs) for r in items] == [("a", 1, [1, 2, 3]), ("b", 1, [1]), ("a", 2, [1])]
    assert items[0].metrics == {"temp": [1.0, 2.0, 3.0], "hum": [None, None, 50.0]}


def test_backoff_is_bounded_jittered_and_resets():
    b = core.Backoff(0.1, 2.0, random.Random(1))
    delays = [b.next() for _ in range(12)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(d <= 2.0 for d in delays) and max(delays) >= 1.0
    assert len({round(d, 6) for d in delays[6:]}) > 1  # jittered at the cap
    b.reset()
    assert b.next() <= 0.1


@pytest.mark.parametrize("data, expected", [(b"0\n", 0), (b"42\n", 42), (b"42", 42)])
def test_cursor_format(data, expected):
    assert core.parse_cursor(data) == expected
    assert core.parse_cursor(core.format_cursor(expected)) == expected


@pytest.mark.parametrize("data", [b"", b"\n", b"-1\n", b"4 2\n", b"42\n\n", b"x", b"1" * 20])
def test_damaged_cursor_is_refused(data):
    with pytest.raises(ValueError):
        core.parse_cursor(data)


def test_accounts_changed():
    prev = {"a": (1, 2), "b": (3, 4)}
    assert core.accounts_changed(prev, [("a", 1, 2), ("b", 3, 5), ("c", 0, 0)]) == [("b", 3, 5), ("c", 0, 0)]


def test_the_protocol_doc_example_is_what_the_code_sends():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()
    item = core.Readings(
        "site-7",
        "gh/1.a",
        1700000000,
        [41, 42],
        [1764633600.0, 1764633601.0],
        [1764633600.25, 1764633601.25],
        {"temp": [21.5, None]},
    )
    m = core.readings_message("telemetry", item)
    assert f"subject  {m.subject}\n" in doc and f"msg id   {m.msg_id}\n" in doc
    section = doc[doc.index(f"payload  ({len(m.payload)} bytes)") :]
    lines = section.splitlines()[1:]
    lines = lines[: lines.index("```")]
    hex_bytes = "".join(line.strip().split("  ")[0].replace(" ", "") for line in lines)
    assert hex_bytes == m.payload.hex()


def test_a_message_too_large_for_the_broker_is_split_and_keeps_every_datagram():
    n = 300
    wide = {f"m{k:02d}": [float(i * k) for i in range(n)] for k in range(40)}
    item = core.Readings(
        "gw", "s", 1, list(range(1, n + 1)), [float(i) for i in range(n)], [float(i) for i in range(n)], wide
    )
    whole = core.readings_message("telemetry", item)
    messages = core.readings_messages("telemetry", item, max_bytes=len(whole.payload) // 3)
    assert len(messages) == 4 and all(len(m.payload) <= len(whole.payload) // 3 for m in messages)
    parts = [core.decode(m.payload) for m in messages]
    assert [s for p in parts for s in p.seqs] == item.seqs
    assert sum(m.readings for m in messages) == item.readings == n * 40
    assert len({m.msg_id for m in messages}) == 4
    assert core.readings_messages("telemetry", item) == [whole]  # fits the default limit


# ---------------------------------------------------------------- payload 2: columns


def block(row_id, groups):
    body = ingestlog.encode_body(groups)
    datagrams, readings = ingestlog.counts(groups)
    return core.Block(row_id, datagrams, readings, body, len(zlib.decompress(body)))


def test_columns_carry_the_log_rows_as_committed():
    b1 = block(7, [group("a.b", 1, [1, 2]), group("c", None, [5], {"temp": [None], "hum": [40.0]})])
    b2 = block(8, [group("a.b", 1, [3])])
    (m,) = core.columns_messages("telemetry", "site-7", [b1, b2])
    assert m.subject == "telemetry.site-7.columns"
    assert m.msg_id.startswith("site-7.log.7-8.4.") and (m.datagrams, m.readings) == (4, 4)
    body = msgpack.unpackb(m.payload)
    assert body == [2, "C", "site-7", [b1.body, b2.body]]  # bodies forwarded byte for byte
    got = core.decode(m.payload)
    assert isinstance(got, core.Columns) and (got.datagrams, got.readings) == (4, 4)
    # merged per (sensor, boot) in order of first appearance, commit order within each
    assert [(r.sensor, r.boot, r.seqs, r.metrics) for r in got.items] == [
        ("a.b", 1, [1, 2, 3], {"temp": [1.0, 2.0, 3.0]}),
        ("c", None, [5], {"temp": [None], "hum": [40.0]}),
    ]
    assert all(r.gateway == "site-7" for r in got.items)
    # the id is the content's: the same rows again give the same id, other content another
    assert core.columns_messages("telemetry", "site-7", [b1, b2]) == [m]
    other = block(8, [group("a.b", 1, [3], {"temp": [3.5]})])
    assert core.columns_messages("telemetry", "site-7", [b1, other])[0].msg_id != m.msg_id


def flatten_blocks_of(messages):
    out = []
    for m in messages:
        item = core.decode(m.payload)
        if isinstance(item, core.Blocks):  # payload 3: the groups as the rows hold them
            parts = [ingestlog.Group(*g) for b in item.blocks for g in b.groups]
        else:
            parts = item.items
        for r in parts:
            for i, seq in enumerate(r.seqs):
                out.append((r.sensor, r.boot, seq, r.ts[i], tuple(sorted((k, v[i]) for k, v in r.metrics.items()))))
    return out


def covered_keys(messages):
    """Every (row id, datagram offset) a payload-3 message's blocks name, in order."""
    out = []
    for m in messages:
        for b in core.decode(m.payload).blocks:
            out += [(b.id, b.offset + i) for i in range(b.datagrams)]
    return out


def flatten_rows(rows):
    out = []
    for groups in rows:
        for g in groups:
            for i, seq in enumerate(g.seqs):
                out.append(
                    (
                        g.sensor,
                        g.boot,
                        seq,
                        g.ts[i],
                        tuple(sorted((k, v[i]) for k, v in g.metrics.items() if v[i] is not None)),
                    )
                )
    return out


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_columns_packing_keeps_every_datagram_once_in_order_within_every_limit(data):
    rng = random.Random(data.draw(st.integers(0, 10**6)))
    rows, seq = [], {}
    for _ in range(data.draw(st.integers(1, 8))):
        groups = []
        for sensor in rng.sample(["a", "b.c", "d:e", "f/g"], rng.randint(1, 4)):
            n = rng.randint(1, 30)
            seqs = []
            for _ in range(n):
                seq[sensor] = seq.get(sensor, 0) + 1
                seqs.append(seq[sensor])
            metrics = {
                m: [rng.choice([None, rng.random()]) for _ in range(n)]
                for m in rng.sample(["t", "h", "p"], rng.randint(0, 3))
            }
            groups.append(group(sensor, rng.choice([None, 1]), seqs, metrics))
        rows.append(groups)
    blocks = [block(i + 1, groups) for i, groups in enumerate(rows)]
    max_bytes = data.draw(st.integers(400, 6000))
    max_datagrams = data.draw(st.integers(1, 80))
    max_readings = data.draw(st.integers(4, 400))
    origin = data.draw(st.sampled_from([None, "ab12"]))  # payload 2, or 3: blocks named by row and offset
    messages = core.columns_messages("p", "gw", blocks, max_bytes, max_datagrams, max_readings, origin=origin)
    if origin is not None:  # each row's datagrams named once each, in order, the last block of a row says so
        assert covered_keys(messages) == [(b.id, i) for b in blocks for i in range(b.datagrams)]
        ends = [(b.id, b.offset + b.datagrams) for m in messages for b in core.decode(m.payload).blocks if b.last]
        assert ends == [(b.id, b.datagrams) for b in blocks]
    for m in messages:
        item = core.decode(m.payload)
        assert len(m.payload) <= max_bytes
        assert m.datagrams == item.datagrams <= max_datagrams
        assert m.readings == item.readings
        assert m.readings <= max_readings or m.datagrams == 1
    # every datagram once (a metric a datagram lacks is None or absent alike), and in commit
    # order within each (sensor, boot): a message's groups are merged per (sensor, boot)
    strip = [
        (s, b, q, t, tuple((k, v) for k, v in ms if v is not None)) for s, b, q, t, ms in flatten_blocks_of(messages)
    ]
    want = flatten_rows(rows)
    assert sorted(strip, key=repr) == sorted(want, key=repr) and len(strip) == len(want)
    for key in {(d[0], d[1]) for d in want}:
        assert [d for d in strip if d[:2] == key] == [d for d in want if d[:2] == key]
    assert len({m.msg_id for m in messages}) == len(messages)
    assert sum(m.readings for m in messages) == sum(b.readings for b in blocks)


def test_a_row_too_large_for_one_message_is_cut_and_keeps_every_datagram():
    n = 2000
    wide = {f"m{k:02d}": [float(i * k) + 0.1 for i in range(n)] for k in range(20)}
    big = block(5, [group("s", 1, range(1, n + 1), wide), group("t", 2, [1, 2])])
    assert len(big.body) > 40_000
    messages = core.columns_messages("telemetry", "gw", [block(4, [group("a")]), big, block(6, [group("b")])], 40_000)
    assert len(messages) >= 4 and all(len(m.payload) <= 40_000 for m in messages)
    assert messages[0].msg_id.startswith("gw.log.4-4.") and messages[-1].msg_id.startswith("gw.log.6-6.")
    assert all(".log.5-5." in m.msg_id for m in messages[1:-1])
    parts = [r for m in messages[1:-1] for r in core.decode(m.payload).items]
    assert [s for r in parts if r.sensor == "s" for s in r.seqs] == list(range(1, n + 1))
    assert sum(m.readings for m in messages[1:-1]) == big.readings == n * 20 + 2


def test_a_zlib_bomb_is_refused_before_it_is_inflated():
    bomb = zlib.compress(b"\x00" * (core.MAX_INFLATED_BYTES + 1), 9)
    assert len(bomb) < 64 * 1024
    with pytest.raises(core.PayloadError) as err:
        core.decode(msgpack.packb([2, "C", "gw", [bomb]]))
    assert err.value.reason == "too_large"


def test_the_inflate_limit_holds_over_all_the_blocks_of_a_message(monkeypatch):
    b = block(1, [group("s", 1, range(1, 40))])
    monkeypatch.setattr(core, "MAX_INFLATED_BYTES", b.inflated * 2 - 1)
    assert core.decode(msgpack.packb([2, "C", "gw", [b.body]])).datagrams == 39
    with pytest.raises(core.PayloadError) as err:
        core.decode(msgpack.packb([2, "C", "gw", [b.body, b.body]]))
    assert err.value.reason == "too_large"
    # and the uplink packs below it: two such rows go in two messages
    messages = core.columns_messages("p", "gw", [b, block(2, [group("s", 1, range(40, 79))])])
    assert [m.datagrams for m in messages] == [39, 39]


def test_accounts_keep_the_uplinks_payload_version():
    item = core.Accounts("site-7", "s/1", 42, 1.0, 2.0, 10, 20, 3, 1, 2, 1, (), 0)
    for version in (1, 2):
        m = core.accounts_message("telemetry", item, version)
        assert msgpack.unpackb(m.payload)[0] == version and core.decode(m.payload) == item


def test_snapshots_carry_many_sensors_accounts_and_split_at_the_size_limit():
    gaps = tuple(core.Gap(0, 7, 10 * i, 10 * i + 1, 2, 1000.5 + i) for i in range(core.MAX_GAPS_PER_SNAPSHOT))
    items = [
        core.Accounts("site-7", f"s/{i}", 42, 1.0, 2.0, 10 + i, 20, 3, 1, 2, 1, gaps if i % 3 == 0 else (), 1500)
        for i in range(30)
    ]
    (one,) = core.snapshots_messages("telemetry", "site-7", items[1:3])
    assert one.subject == "telemetry.site-7.accounts" and one.msg_id.startswith("site-7.accounts.42.2.")
    got = core.decode(one.payload)
    assert isinstance(got, core.Snapshots) and got.items == tuple(items[1:3])
    messages = core.snapshots_messages("telemetry", "site-7", items, max_bytes=100_000)
    assert len(messages) > 1 and all(len(m.payload) <= 100_000 for m in messages)
    assert [a for m in messages for a in core.decode(m.payload).items] == items
    assert len({m.msg_id for m in messages}) == len(messages)
    # at the default limit a snapshot with the most gaps fits many times over
    assert len(core.snapshots_messages("telemetry", "site-7", items[:1])[0].payload) < core.MAX_MESSAGE_BYTES // 10


def test_payload_3_names_the_rows_and_carries_what_the_gateway_lost_and_its_counters():
    blocks = [block(7, [group("a")]), block(8, [group("b", 1, [1, 2])])]
    (m,) = core.columns_messages("telemetry", "gw", blocks, origin="ab12", gone=[(3, 6)])
    item = core.decode(m.payload)
    assert isinstance(item, core.Blocks) and item.origin == "ab12" and item.gone == ((3, 6),)
    assert [(b.id, b.offset, b.last, b.datagrams) for b in item.blocks] == [(7, 0, True, 3), (8, 0, True, 2)]
    assert m.msg_id.startswith("gw.log.7-8.5.")
    # only what was lost, no row to send: one message still says so
    (gone,) = core.columns_messages("telemetry", "gw", [], origin="ab12", gone=[(9, 9)])
    assert core.decode(gone.payload).gone == ((9, 9),) and gone.msg_id.startswith("gw.log.9-9.0.")
    counters = {"uplink_dropped": 5, "budget_dropped": 0}
    (s,) = core.snapshots_messages("telemetry", "gw", [], origin="ab12", as_of=42, counters=counters)
    snap = core.decode(s.payload)
    assert (snap.origin, snap.as_of, snap.counters, snap.items) == ("ab12", 42, counters, ())
    assert core.snapshots_messages("telemetry", "gw", [], origin="ab12", as_of=42) == []
