"""A payload-3 message read as arrays from its bytes (prepared.parse, session 10) is what
core.decode + prepared.from_blocks make of it, field for field, or it is not read that way
(None: prepare takes the way before).  Whatever core.decode refuses, parse refuses too."""

from __future__ import annotations

import math
import random
import zlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import ingestlog
from collector.ingestlog import Group
from collector.uplink import core, prepared


def message(rows: list[list[Group]], first_id: int = 1, gateway: str = "site-7") -> bytes:
    blocks = []
    for i, row in enumerate(rows):
        body = ingestlog.encode_body(row)
        datagrams, n = ingestlog.counts(row)
        blocks.append(core.Block(first_id + i, datagrams, n, body, len(zlib.decompress(body))))
    return core.encode_columns3(gateway, "ab01", blocks)


def raw_message(bodies: list[bytes], first_id: int = 1) -> bytes:
    """A message of log bodies given as msgpack bytes (compressed here), one block each."""
    return msgpack.packb(
        [3, "C", "site-7", "ab01", [], [[first_id + i, 0, True, zlib.compress(b)] for i, b in enumerate(bodies)]],
        use_bin_type=True,
    )


def the_way_before(data: bytes):
    """(what core.decode + from_blocks make of it, or the refusal's reason)."""
    try:
        item = core.decode(data)
    except core.PayloadError as exc:
        return ("refused", exc.reason)
    assert isinstance(item, core.Blocks)
    try:
        return ("made", prepared.from_blocks(item))
    except ValueError:
        return ("not ready", None)


def check(data: bytes) -> prepared.Prepared | None:
    """parse agrees with the way before; returns what it made (None: left to the way before)."""
    got = prepared.parse(data)
    kind, want = the_way_before(data)
    if got is not None:
        assert kind == "made"
        assert got == want
    return got


def group(sensor: str, boot, seqs, ts=None, received=None, **metrics) -> Group:
    ts = ts if ts is not None else [1_800_000_000.0 + s / 8 for s in seqs]
    received = received if received is not None else [t + 0.001 for t in ts]
    return Group(sensor, boot, list(seqs), list(ts), list(received), metrics)


def test_the_usual_message_is_read_as_arrays_and_holds_what_the_way_before_holds():
    rows = [
        [group(f"s{k}", 1, range(10 * r + 1, 10 * r + 3), temp=[20.5 + k, -0.0], hum=[40.0, 41.5]) for k in range(30)]
        for r in range(4)
    ]
    got = check(message(rows))
    assert got is not None
    assert got.datagrams == 4 * 30 * 2 and got.readings == 4 * 30 * 4
    assert len(got.keys) == 30 and got.keys[0] == ("site-7:s0", 1)
    assert got.bodies == tuple(core.decode(message(rows)).blocks[i].body for i in range(4))


@pytest.mark.parametrize(
    "metrics",
    [
        {"v": [1, 2, 3]},  # ints
        {"v": [-1, -33, -129]},  # negative ints of three widths: one column each in a group
        {"v": [2**53 + 1, -(2**63), 2**63 - 1]},  # ints a float64 rounds
        {"v": [5e-324, -1.5e308, 1e-310]},  # subnormals, huge
        {"v": [1.0, None, 3.0], "w": [None, 2.0, 3.0]},  # absent values
        {"v": [None, None, None], "w": [1.0, 2.0, 3.0]},  # a metric with no value: not ready
    ],
)
def test_values_of_every_kind_are_read_as_the_way_before_reads_them(metrics):
    rows = [[group("a", None, [1, 2, 3], **metrics), group("b", 7, [4, 5, 6], **metrics)]]
    check(message(rows))


def test_what_changes_from_group_to_group_is_read_so():
    rows = [
        [
            group("α-sensor-" + "x" * 40, 2**40, range(1, 40), w=[float(i) for i in range(39)]),  # str8, array16
            group("b", -5, [7, 8], u=[1.0, 2.0]),  # other metrics: NaN where a group does not carry them
            group("b", -5, [9], u=[4.0]),  # one key in two groups
            group("c", None, [2**40, 2**40 + 1], ts=[0, 100], received=[2**32 - 2, 2**32 - 1], w=[1, 2]),  # int times
        ],
        [group("b", -5, [10, 11], u=[5.0, 6.0]), group("a", 0, [1], w=[1.5])],
    ]
    got = check(message(rows))
    assert got is not None
    assert len(got.keys) == 4 and got.readings == 39 + 2 + 1 + 2 + 2 + 1


@pytest.mark.parametrize(
    "maps",
    [[{"u": [1.0]}, {"w": [3.0], "u": [4.0]}], [{"u": [1.0], "w": [2.0]}, {"w": [3.0], "u": [4.0]}]],
)
def test_a_key_whose_groups_name_their_metrics_otherwise_is_left_to_the_way_before(maps):
    data = message([[group("b", 1, [k + 1], **m) for k, m in enumerate(maps)]])
    assert prepared.parse(data) is None
    item = prepared.prepare(data)
    assert isinstance(item, prepared.Prepared) and item == prepared.from_blocks(core.decode(data))


@pytest.mark.parametrize(
    "seqs",
    [[126, 127, 128, 129], [255, 256], [65535, 65536], [2**32 - 1, 2**32]],
)
def test_a_column_whose_items_change_width_is_left_to_the_way_before(seqs):
    data = message([[group("a", 1, seqs, v=[1.0] * len(seqs))]])
    assert prepared.parse(data) is None
    item = prepared.prepare(data)
    assert isinstance(item, prepared.Prepared) and item == prepared.from_blocks(core.decode(data))


def pack(*items) -> bytes:
    return b"".join(items)


F = b"\xcb"  # float64


def f64(x: float) -> bytes:
    return F + msgpack.packb(x)[1:]


def body_bytes(groups: bytes, count: int) -> bytes:
    return b"\x92\x01" + bytes([0x90 | count]) + groups


def one_group(sensor=b"\xa1a", boot=b"\x01", seqs=b"\x91\x01", ts=None, received=None, metrics=None) -> bytes:
    ts = ts if ts is not None else b"\x91" + f64(1_800_000_000.0)
    received = received if received is not None else b"\x91" + f64(1_800_000_000.5)
    metrics = metrics if metrics is not None else b"\x81\xa1v\x91" + f64(1.0)
    return b"\x96" + sensor + boot + seqs + ts + received + metrics


@pytest.mark.parametrize(
    "group_bytes",
    [
        one_group(metrics=b"\x82\xa1v\x91" + f64(math.nan) + b"\xa1v\x91" + f64(1.0)),  # a key twice, a NaN hidden
        one_group(metrics=b"\x82\xa1v\x91" + f64(2.0) + b"\xa1v\x91" + f64(1.0)),  # a key twice
        one_group(sensor=b"\xd9\x01a"),  # a str not written the shortest way
        one_group(boot=b"\xcd\x00\x01"),  # an int not written the shortest way
        one_group(seqs=b"\xdc\x00\x01\x01"),  # an array header not the shortest: read as it is
        one_group(metrics=b"\x81\xa1v\x91\xca\x3f\xc0\x00\x00"),  # float32
        one_group(metrics=b"\x81\xa1v\x91" + f64(math.inf)),
        one_group(metrics=b"\x81\xa1v\x91\xcf" + (2**63).to_bytes(8, "big")),  # beyond int64
        one_group(ts=b"\x91" + f64(-1.0)),
        one_group(ts=b"\x91" + f64(2.0**32)),
        one_group(ts=b"\x91\xc0"),
        one_group(seqs=b"\x91" + f64(1.0)),  # a float seq
        one_group(seqs=b"\x91\xc0"),
        one_group(seqs=b"\x90", ts=b"\x90", received=b"\x90", metrics=b"\x80"),  # no datagram
        one_group(ts=b"\x92" + f64(1.0) + f64(2.0)),  # lengths differ
        one_group(metrics=b"\x81\xa1v\x92" + f64(1.0) + f64(2.0)),
        one_group(metrics=b"\x81\xa1v\xa1x"),  # not an array
        one_group(metrics=b"\x81\xa1v\x91\xa1x"),  # not a number
        one_group(metrics=b"\x80"),  # no metric
        one_group(sensor=b"\xa2\xff\xfe"),  # not UTF-8
        one_group(boot=b"\xc3"),  # a bool
    ],
)
def test_bodies_written_otherwise_are_read_as_the_way_before_reads_them_or_refused_alike(group_bytes):
    check(raw_message([body_bytes(group_bytes, 1)]))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_damage_to_a_body_gives_what_the_way_before_gives_or_is_left_to_it(data):
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    groups = []
    for _ in range(rng.randint(1, 4)):
        n = rng.choice([1, 2, 3, 17])
        seq0 = rng.choice([1, 120, 250, 65530, 2**32 - 2])
        metrics = {
            name: [rng.choice([1.5, -2, 0, None, 1e300, 127, 128]) for _ in range(n)]
            for name in ("v", "w")[: rng.randint(0, 2)]
        }
        groups.append(group(f"s{rng.randint(0, 2)}", rng.choice([None, 0, 200, -40]), range(seq0, seq0 + n), **metrics))
    raw = bytearray(msgpack.packb([1, groups], use_bin_type=True))
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    check(raw_message([bytes(raw)]))
