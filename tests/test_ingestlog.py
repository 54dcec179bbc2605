"""The ingest log format: pure round trips, and the table read in commit order."""

import math
import sqlite3
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector import ingestlog
from collector.ingestlog import Group


def bits(x):
    return struct.pack("<d", x) if isinstance(x, float) else x


values = st.one_of(st.none(), st.floats(allow_nan=False), st.integers(-(2**63), 2**63 - 1))


@st.composite
def groups(draw):
    out = []
    for _ in range(draw(st.integers(0, 4))):
        n = draw(st.integers(1, 6))
        metrics = {
            name: draw(st.lists(values, min_size=n, max_size=n))
            for name in draw(st.sets(st.sampled_from(["temp", "hum", "c", "v"]), max_size=3))
        }
        out.append(
            Group(
                draw(st.sampled_from(["s-1", "site-7:sim-0001"])),
                draw(st.one_of(st.none(), st.integers(0, 2**32 - 1))),
                draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n)),
                draw(st.lists(st.floats(0, 2**32, allow_nan=False), min_size=n, max_size=n)),
                draw(st.lists(st.floats(0, 2**32, allow_nan=False), min_size=n, max_size=n)),
                metrics,
            )
        )
    return out


@given(groups())
def test_body_round_trips_bit_exact(gs):
    back = ingestlog.decode_body(ingestlog.encode_body(gs))
    assert len(back) == len(gs)
    for a, b in zip(gs, back):
        assert (a.sensor, a.boot, a.seqs) == (b.sensor, b.boot, b.seqs)
        assert [bits(x) for x in a.ts] == [bits(x) for x in b.ts]
        assert [bits(x) for x in a.received] == [bits(x) for x in b.received]
        assert {k: [bits(x) for x in v] for k, v in a.metrics.items()} == {
            k: [bits(x) for x in v] for k, v in b.metrics.items()
        }
        assert [type(x) for v in a.metrics.values() for x in v] == [type(x) for v in b.metrics.values() for x in v]


wide = st.one_of(
    values,
    st.integers(-(2**63), 2**64 - 1),
    st.binary(min_size=8, max_size=8).map(lambda b: struct.unpack("<d", b)[0]),  # NaN payloads, subnormals, inf
)


@given(groups(), st.lists(wide, max_size=40), st.text(max_size=300))
def test_body_bytes_are_msgpack_packbs_whatever_encoder_writes_them(gs, column, name):
    """The body is written with msgspec for speed; the bytes must be those the
    format was defined with (msgpack.packb, use_bin_type): the uplink forwards
    them raw and older readers parse them."""
    import zlib

    import msgpack

    gs = gs + [
        Group(
            name or "s",
            2**32 - 1,
            list(range(len(column))),
            [0.5] * len(column),
            [1.0] * len(column),
            {name or "m": column},
        )
    ]
    expected = msgpack.packb([ingestlog.BODY_VERSION, [list(g) for g in gs]], use_bin_type=True)
    assert zlib.decompress(ingestlog.encode_body(gs)) == expected


def test_negative_zero_and_big_int_survive():
    g = Group("s", None, [1], [-0.0], [1.5], {"x": [-0.0], "n": [2**53 + 1]})
    (back,) = ingestlog.decode_body(ingestlog.encode_body([g]))
    assert math.copysign(1, back.metrics["x"][0]) == -1 and math.copysign(1, back.ts[0]) == -1
    assert back.metrics["n"] == [2**53 + 1]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"garbage",
        ingestlog.zlib.compress(b"\x92\x03\x90"),
        ingestlog.zlib.compress(b"\x92\x01\x91\x93\x01\x02\x03"),
        ingestlog.zlib.compress(b"\x92\x02\xc0"),  # version 2 without its list of parts
        ingestlog.encode_refs([("p:", b"garbage")]),
        ingestlog.zlib.compress(ingestlog.msgpack.packb([2, [["p:"]]])),
        ingestlog.zlib.compress(ingestlog.msgpack.packb([2, [[1, ingestlog.encode_body([])]]])),
        ingestlog.encode_refs([("p:", ingestlog.encode_refs([]))]),  # version 2 inside version 2
        ingestlog.encode_refs(
            [("p:", ingestlog.zlib.compress(ingestlog.msgpack.packb([1, [[7, 1, [1], [1.0], [1.0], {}]]])))]
        ),
    ],
)
def test_bad_bodies_are_refused_with_one_error(body):
    with pytest.raises(ingestlog.LogFormatError):
        ingestlog.decode_body(body)


@given(st.lists(st.tuples(st.sampled_from(["", "site-7:", "b:"]), groups()), max_size=4))
def test_a_version_2_body_reads_as_its_parts_groups_in_turn_their_sensors_prefixed(parts):
    body = ingestlog.encode_refs([(prefix, ingestlog.encode_body(gs)) for prefix, gs in parts])

    def exact(gs):
        return [
            (g.sensor, g.boot, g.seqs, [bits(x) for x in g.ts], [bits(x) for x in g.received])
            + ({k: [(type(x), bits(x)) for x in v] for k, v in g.metrics.items()},)
            for g in gs
        ]

    assert exact(ingestlog.decode_body(body)) == exact([g._replace(sensor=p + g.sensor) for p, gs in parts for g in gs])
    assert ingestlog.zlib.decompress(body)[:1] == b"\x92"  # stored: msgpack as it is, level 0


def test_table_reads_in_commit_order_and_ids_are_never_reused(tmp_path):
    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    conn.execute(ingestlog.CREATE_TABLE)
    assert ingestlog.last_id(conn) == 0
    g = Group("s", 7, [1, 2], [1.0, 2.0], [1.1, 2.1], {"t": [20.5, None]})
    ids = [ingestlog.append(conn, 100.0 + i, [g]) for i in range(3)]
    assert ids == [1, 2, 3]
    assert conn.execute("SELECT datagrams, readings FROM ingest_log WHERE id = 1").fetchone() == (2, 1)
    assert [e.id for e in ingestlog.read_after(conn, 1)] == [2, 3]
    assert [e.id for e in ingestlog.read_after(conn, 0, limit=2)] == [1, 2]
    conn.execute("DELETE FROM ingest_log")
    assert ingestlog.last_id(conn) == 3
    assert ingestlog.append(conn, 200.0, [g]) == 4
    (entry,) = ingestlog.read_after(conn, 3)
    assert entry.committed == 200.0 and entry.groups == [g]
