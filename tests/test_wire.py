"""Wire format v1: round trips, one named test per known-bad datagram, the
hex a C encoder emits (the examples in docs/PROTOCOL.md, read from the doc
itself), and hypothesis properties for any bytes and any valid datagram."""

from __future__ import annotations

import re
import struct
import tracemalloc

import msgpack
import pytest
from doc_examples import DOC, doc_examples
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import wire
from collector.errors import DecodeError, EncodeError
from collector.wire import REASONS, Datagram, decode, encode


def reason(data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.reason in REASONS
    return info.value.reason


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def good(**changes) -> dict:
    """A valid datagram as a dict; `changes` replace keys (None value: drop it)."""
    obj = {"v": 1, "id": "s1", "seq": 7, "r": {"t": 21.5}}
    for key, value in changes.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


def nested(depth: int, leaf: bytes = b"\x00") -> bytes:
    """`depth` arrays, each holding the next: [[[...leaf...]]]."""
    return b"\x91" * depth + leaf


def with_unknown(value: bytes) -> bytes:
    """A valid datagram plus an unknown key "x" whose value is `value` (raw msgpack)."""
    return (
        b"\x85"
        + pack("v")
        + b"\x01"
        + pack("id")
        + pack("s1")
        + pack("seq")
        + b"\x07"
        + pack("r")
        + pack({"t": 7})
        + pack("x")
        + value
    )


# --- the examples in docs/PROTOCOL.md, checked verbatim ----------------------------------

DOC_ACCEPTED = {
    "minimal": Datagram("s1", 7, None, None, {"t": 21.5, "rh": 48}),
    "boot-and-timestamp32": Datagram("s1", 0, 3, 1764000000.0, {"t": -4.25, "dbm": -70}),
    "seq-near-wrap": Datagram("barn/n1", 2**32 - 1, 300, 1764000000.5, {"p": 1013.25}),
}
DOC_REJECTED = {
    "rejected-nan": "bad_readings",
    "rejected-seq-too-big": "bad_seq",
    "rejected-unknown-ext": "not_msgpack",
    "rejected-lying-length": "not_msgpack",
}


def test_doc_examples_are_all_checked_here():
    assert set(doc_examples()) == set(DOC_ACCEPTED) | set(DOC_REJECTED)


@pytest.mark.parametrize("name", sorted(DOC_ACCEPTED))
def test_doc_example_is_accepted(name):
    data, verdict = doc_examples()[name]
    assert verdict == "accepted"
    got = decode(data)
    assert got == DOC_ACCEPTED[name]
    # == would let 48 equal 48.0: the int/float type is part of the contract.
    assert [type(v) for v in got.readings.values()] == [type(v) for v in DOC_ACCEPTED[name].readings.values()]


@pytest.mark.parametrize("name", sorted(DOC_REJECTED))
def test_doc_example_is_rejected(name):
    data, verdict = doc_examples()[name]
    assert verdict == f"rejected: {DOC_REJECTED[name]}"
    assert reason(data) == DOC_REJECTED[name]


def test_doc_example_parser_reads_annotated_lines():
    text = '```msgpack-hex demo\n81 a1 76  fixmap, "v"\n  01      one\n=> rejected: x\n```\n'
    assert doc_examples(text=text) == {"demo": (b"\x81\xa1\x76\x01", "rejected: x")}


def test_reason_table_in_doc_matches_reasons():
    section = DOC.read_text().split("### Rejection reasons", 1)[1].split("###", 1)[0]
    assert tuple(re.findall(r"^\| `(\w+)`", section, re.M)) == REASONS


# --- more bytes as a C encoder writes them -----------------------------------------------

C_ENCODER = {
    # Timestamp 96 (ext 8, length 12, type -1): uint32 nanoseconds, int64 seconds.
    "timestamp96": (
        "85 a1 76 01 a2 69 64 a2 73 31 a3 73 65 71 01 a2 74 73"
        " c7 0c ff 0e e6 b2 80 00 00 00 00 69 24 81 00 a1 72 81 a1 74 01",
        Datagram("s1", 1, None, 1764000000.25, {"t": 1}),
    ),
    # Timestamp 32 at its largest: 2106-02-07T06:28:15Z.
    "timestamp32-max": (
        "85 a1 76 01 a2 69 64 a2 73 31 a3 73 65 71 01 a2 74 73 d6 ff ff ff ff ff a1 72 81 a1 74 01",
        Datagram("s1", 1, None, 4294967295.0, {"t": 1}),
    ),
    # Signed widths for small values (some encoders always use int32), float64,
    # uint8 seq, str8 id, map16 at the top.
    "wide-forms": (
        "de 00 04 a1 76 d2 00 00 00 01 a2 69 64 d9 02 73 31 a3 73 65 71 cc 80"
        " a1 72 83 a1 61 d1 ff 00 a1 62 d3 80 00 00 00 00 00 00 00"
        " a1 63 cb 3f b0 00 00 00 00 00 00",
        Datagram("s1", 128, None, None, {"a": -256, "b": -(2**63), "c": 0.0625}),
    ),
    # seq as uint64 holding a small value, boot as uint32, ts as uint32, bools.
    "uint64-seq-bools": (
        "86 a1 76 01 a2 69 64 a2 73 31 a3 73 65 71 cf 00 00 00 00 00 00 00 05"
        " a4 62 6f 6f 74 ce 00 01 00 00 a2 74 73 ce 69 24 81 00"
        " a1 72 82 a2 6f 6e c3 a3 6f 66 66 c2",
        Datagram("s1", 5, 65536, 1764000000.0, {"on": 1, "off": 0}),
    ),
}


@pytest.mark.parametrize("name", sorted(C_ENCODER))
def test_c_encoder_bytes_decode(name):
    hex_text, expected = C_ENCODER[name]
    got = decode(bytes.fromhex(hex_text))
    assert got == expected
    assert [type(v) for v in got.readings.values()] == [type(v) for v in expected.readings.values()]


def test_float32_values_decode_exactly():
    for value in (21.5, -4.25, 1013.25, 0.1):
        f32 = struct.unpack(">f", struct.pack(">f", value))[0]
        data = b"\x84\xa1v\x01\xa2id\xa2s1\xa3seq\x00\xa1r\x81\xa1t\xca" + struct.pack(">f", value)
        assert decode(data).readings == {"t": f32}


# --- round trips -------------------------------------------------------------------------


def test_round_trip_minimal():
    assert decode(encode("s1", 7, {"t": 21.5})) == Datagram("s1", 7, None, None, {"t": 21.5})


def test_round_trip_all_fields():
    data = encode("barn/n1:a", 2**32 - 1, {"t": -4.25, "n": 2**63 - 1}, boot=0, ts=1764000000.5)
    assert decode(data) == Datagram("barn/n1:a", 2**32 - 1, 0, 1764000000.5, {"t": -4.25, "n": 2**63 - 1})


def test_round_trip_timestamp_and_int_ts():
    ts = msgpack.Timestamp(1764000000, 250_000_000)
    assert decode(encode("s1", 1, {"t": 1}, ts=ts)).ts == 1764000000.25
    got = decode(encode("s1", 1, {"t": 1}, ts=1764000000)).ts
    assert got == 1764000000.0 and type(got) is float


def test_round_trip_64_readings_and_longest_names():
    readings = {f"{i:02d}" + "n" * 62: i * 0.5 for i in range(64)}
    sensor = "s" * 64
    assert decode(encode(sensor, 0, readings)) == Datagram(sensor, 0, None, None, readings)


def test_bool_reading_is_0_or_1():
    got = decode(pack(good(r={"on": True, "off": False, "t": 2.5})))
    assert got.readings == {"on": 1, "off": 0, "t": 2.5}
    assert type(got.readings["on"]) is int


def test_nil_boot_and_nil_ts_are_absent():
    obj = good()
    obj["boot"] = obj["ts"] = None
    assert decode(pack(obj)) == Datagram("s1", 7, None, None, {"t": 21.5})


def test_unknown_keys_are_ignored():
    obj = good(fw="1.4.2", loc={"lat": 1.5, "lon": [2, 3]}, note=None)
    obj[b"v"] = 2  # a bin key never names a field
    obj["extra"] = msgpack.Timestamp(0, 0)
    assert decode(pack(obj)) == Datagram("s1", 7, None, None, {"t": 21.5})


def test_accepts_datagram_of_exactly_max_size():
    obj = good(pad="")
    obj["pad"] = "x" * (wire.MAX_DATAGRAM_BYTES - len(pack(obj)) - 2)  # str8 -> str16: +2
    data = pack(obj)
    assert len(data) == wire.MAX_DATAGRAM_BYTES
    assert decode(data).sensor == "s1"


def test_accepts_int64_extremes():
    got = decode(pack(good(r={"lo": -(2**63), "hi": 2**63 - 1})))
    assert got.readings == {"lo": -(2**63), "hi": 2**63 - 1}


def test_accepts_nesting_up_to_max_depth():
    # top map = level 1, so the unknown value may be 15 arrays deep (levels 2-16)
    assert decode(with_unknown(nested(wire.MAX_DEPTH - 1))).sensor == "s1"


def test_accepts_bytearray_and_memoryview():
    data = encode("s1", 7, {"t": 21.5})
    assert decode(bytearray(data)) == decode(memoryview(data)) == decode(data)


def test_timestamp_judged_by_its_seconds_field():
    # 2**32-1 s + 999999999 ns is in range, though it rounds up to 2**32 as a float
    data = pack(good(ts=msgpack.Timestamp(2**32 - 1, 999_999_999)))
    assert decode(data).ts == pytest.approx(2.0**32)


# --- one named test per known-bad datagram -----------------------------------------------


def test_rejects_oversized_datagram():
    assert reason(encode("s1", 1, {"t": 1}) + b"\x00" * wire.MAX_DATAGRAM_BYTES) == "too_large"


def test_rejects_oversized_datagram_before_parsing():
    assert reason(b"\xc1" * (wire.MAX_DATAGRAM_BYTES + 1)) == "too_large"


def test_rejects_empty_datagram():
    assert reason(b"") == "not_msgpack"


def test_rejects_every_truncation():
    data = encode("greenhouse-3", 41, {"temp_c": 21.5, "co2": 612}, boot=7, ts=1764000000.25)
    for cut in range(len(data)):
        assert reason(data[:cut]) == "not_msgpack", cut


def test_rejects_trailing_bytes():
    assert reason(encode("s1", 1, {"t": 1}) + b"\x00") == "not_msgpack"


def test_rejects_two_datagrams_in_one():
    data = encode("s1", 1, {"t": 1})
    assert reason(data + data) == "not_msgpack"


def test_rejects_lying_str32_length():
    assert reason(b"\x81\xa1v\xdb\xff\xff\xff\xffab") == "not_msgpack"


def test_rejects_lying_bin32_length():
    assert reason(with_unknown(b"\xc6\xff\xff\xff\xff\x00")) == "not_msgpack"


def test_rejects_lying_array32_and_map32_lengths_without_allocating():
    cases = [
        with_unknown(b"\xdd\xff\xff\xff\xff" + b"\x00" * 64),
        b"\xdd\xff\xff\xff\xff",
        with_unknown(b"\xdf\xff\xff\xff\xff" + b"\x00" * 64),
        b"\xdf\xff\xff\xff\xff",
    ]
    for data in cases:
        tracemalloc.start()
        try:
            decode(data)
        except DecodeError as exc:
            got = exc.reason
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert got == "not_msgpack"
        assert peak < 64 * 1024, data.hex()  # a 2**32-entry list would be 32 GiB


def test_rejects_lying_map_length_in_readings():
    data = pack(good(r={"t": 1}))
    assert data.endswith(b"\x81\xa1t\x01")
    assert reason(data[:-4] + b"\xde\x00\x02\xa1t\x01") == "not_msgpack"


def test_rejects_nested_bombs():
    assert reason(nested(1000)) == "not_msgpack"  # C msgpack would build it
    assert reason(nested(1100)) == "not_msgpack"  # past C msgpack's 1024
    assert reason(b"\x81\xa1k" * 1000 + b"\x00") == "not_msgpack"
    assert reason(with_unknown(nested(1000))) == "not_msgpack"  # valid fields + bomb


def test_rejects_bomb_in_a_known_field():
    # The error detail once repr()'d the value: RecursionError escaped decode.
    assert reason(b"\x83\xa1v\x01\xa2id" + nested(1000) + b"\xa1x\x00") == "not_msgpack"
    assert reason(b"\x81\xa1v" + nested(1000)) == "not_msgpack"


def test_rejects_nesting_one_past_max_depth():
    assert reason(with_unknown(nested(wire.MAX_DEPTH))) == "not_msgpack"
    assert reason(nested(wire.MAX_DEPTH + 1)) == "not_msgpack"


def test_nesting_outranks_field_faults():
    # The verdict must not depend on whether a field check fails first.
    bomb = nested(wire.MAX_DEPTH)
    assert reason(b"\x82\xa1v" + bomb + b"\xa1x\x00") == "not_msgpack"
    assert reason(b"\x82\xa1v\x02\xa1x" + bomb) == "not_msgpack"


def test_deep_but_allowed_nesting_in_a_field_gives_the_field_reason():
    assert reason(pack(good(id=[[[1]]]))) == "bad_id"
    assert reason(nested(3)) == "not_a_map"


def test_rejects_unknown_ext_type():
    assert reason(with_unknown(b"\xd4\x05\x00")) == "not_msgpack"


def test_rejects_negative_ext_type_other_than_timestamp():
    assert reason(with_unknown(b"\xd4\xfe\x00")) == "not_msgpack"


def test_rejects_timestamp_ext_of_wrong_length():
    assert reason(with_unknown(b"\xd5\xff\x00\x00")) == "not_msgpack"
    assert reason(with_unknown(b"\xc7\x05\xff" + b"\x00" * 5)) == "not_msgpack"


def test_rejects_timestamp_with_nanoseconds_over_a_second():
    ns = 1_000_000_000
    assert reason(with_unknown(b"\xd7\xff" + (ns << 34 | 5).to_bytes(8, "big"))) == "not_msgpack"


def test_rejects_oversized_ext():
    assert reason(with_unknown(b"\xc7\x0d\xff" + b"\x00" * 13)) == "not_msgpack"


def test_rejects_invalid_utf8_str():
    assert reason(with_unknown(b"\xa2\xc3\x28")) == "not_msgpack"
    assert reason(with_unknown(b"\xa3\xed\xa0\x80")) == "not_msgpack"  # a UTF-8 surrogate


def test_rejects_int_map_key():
    assert reason(b"\x85\x01\x01" + pack(good())[1:]) == "not_msgpack"


def test_rejects_nil_map_key_in_unknown_value():
    assert reason(with_unknown(b"\x81\xc0\x00")) == "not_msgpack"


def test_rejects_never_used_byte_c1():
    assert reason(with_unknown(b"\xc1")) == "not_msgpack"


def test_rejects_not_bytes():
    assert reason("not bytes") == "not_msgpack"


@pytest.mark.parametrize("obj", [[1, 2], 7, "v", None, True, b"\x81"])
def test_rejects_top_level_that_is_not_a_map(obj):
    assert reason(pack(obj)) == "not_a_map"


@pytest.mark.parametrize("v", [None, 2, 0, "1", True, 1.0, [1]])
def test_rejects_bad_version(v):
    assert reason(pack(good(v=v))) == "bad_version"  # None: v missing


@pytest.mark.parametrize("sensor", [None, "", "s" * 65, "a b", "caf\u00e9", "a\n", b"s1", 7, ["s1"]])
def test_rejects_bad_id(sensor):
    assert reason(pack(good(id=sensor))) == "bad_id"


@pytest.mark.parametrize("seq", [None, -1, 2**32, 2**64 - 1, "7", True, 7.0])
def test_rejects_bad_seq(seq):
    assert reason(pack(good(seq=seq))) == "bad_seq"


@pytest.mark.parametrize("boot", [-1, 2**32, "x", True, 1.5, [1]])
def test_rejects_bad_boot(boot):
    assert reason(pack(good(boot=boot))) == "bad_boot"


@pytest.mark.parametrize(
    "ts", [-1, -0.5, 2**32, 2.0**32, float("nan"), float("inf"), "now", True, [1], msgpack.Timestamp(2**32, 0)]
)
def test_rejects_bad_ts(ts):
    assert reason(pack(good(ts=ts))) == "bad_ts"


def test_rejects_timestamp_before_1970():
    # Timestamp 96 is the only form with signed seconds: -1 s + 0.5 s.
    ts96 = b"\xc7\x0c\xff" + (500_000_000).to_bytes(4, "big") + (-1).to_bytes(8, "big", signed=True)
    data = (
        b"\x85"
        + pack("v")
        + b"\x01"
        + pack("id")
        + pack("s1")
        + pack("seq")
        + b"\x07"
        + pack("ts")
        + ts96
        + pack("r")
        + pack({"t": 7})
    )
    assert reason(data) == "bad_ts"


def test_rejects_missing_readings():
    assert reason(pack(good(r=None))) == "bad_readings"


@pytest.mark.parametrize("r", [[1], {}, "t", 5])
def test_rejects_readings_that_are_not_a_nonempty_map(r):
    assert reason(pack(good(r=r))) == "bad_readings"


def test_rejects_65_readings():
    assert reason(pack(good(r={f"m{i}": i for i in range(65)}))) == "bad_readings"


@pytest.mark.parametrize("name", ["", "n" * 65, "a b", "a:b", "a/b", "t\u00e9", "t\n", b"t"])
def test_rejects_bad_reading_name(name):
    assert reason(pack(good(r={"ok": 1, name: 2}))) == "bad_readings"


def test_rejects_nan_reading():
    assert reason(pack(good(r={"t": float("nan")}))) == "bad_readings"


def test_rejects_float32_nan_and_infinity_readings():
    base = b"\x84\xa1v\x01\xa2id\xa2s1\xa3seq\x00\xa1r\x81\xa1t"
    assert decode(base + b"\xca\x41\xac\x00\x00").readings == {"t": 21.5}
    for bits in (b"\x7f\xc0\x00\x00", b"\x7f\x80\x00\x00", b"\xff\x80\x00\x00"):
        assert reason(base + b"\xca" + bits) == "bad_readings"


@pytest.mark.parametrize(
    "value",
    [float("inf"), float("-inf"), 2**63, 2**64 - 1, "21.5", None, [1], {"a": 1}, b"\x01", msgpack.Timestamp(1, 0)],
)
def test_rejects_bad_reading_value(value):
    assert reason(pack(good(r={"t": value}))) == "bad_readings"


def test_one_bad_reading_rejects_the_whole_datagram():
    assert reason(pack(good(r={"a": 1, "b": 2, "c": float("nan")}))) == "bad_readings"


def test_first_failing_check_wins():
    assert reason(pack(good(v=2, seq=-1, r={}))) == "bad_version"
    assert reason(pack(good(seq=-1, boot=-1, ts=-1, r={}))) == "bad_seq"
    assert reason(pack(good(boot=-1, ts=-1, r={}))) == "bad_boot"
    assert reason(pack(good(ts=-1, r={}))) == "bad_ts"


def test_error_detail_stays_short_for_hostile_values():
    for obj in (good(id="x" * 8000), good(v="v" * 8000), good(id=list(range(2000)))):
        with pytest.raises(DecodeError) as info:
            decode(pack(obj))
        assert len(str(info.value)) < 120


# --- encode refuses what would not decode ------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode("", 1, {"t": 1}),
        lambda: encode("a b", 1, {"t": 1}),
        lambda: encode("s1", -1, {"t": 1}),
        lambda: encode("s1", 2**32, {"t": 1}),
        lambda: encode("s1", True, {"t": 1}),
        lambda: encode("s1", 1, {"t": 1}, boot=2**32),
        lambda: encode("s1", 1, {"t": 1}, ts=-1),
        lambda: encode("s1", 1, {"t": 1}, ts=float("nan")),
        lambda: encode("s1", 1, {}),
        lambda: encode("s1", 1, {"t": float("inf")}),
        lambda: encode("s1", 1, {"a:b": 1}),
        lambda: encode("s1", 1, {f"m{i}": i for i in range(65)}),
    ],
)
def test_encode_refuses_invalid_datagrams(call):
    with pytest.raises(EncodeError):
        call()


# --- properties --------------------------------------------------------------------------


@settings(max_examples=500)
@given(st.binary(max_size=9000))
def test_any_bytes_give_a_datagram_or_a_decode_error(data):
    try:
        got = decode(data)
    except DecodeError as exc:
        assert exc.reason in REASONS
    else:
        assert type(got) is Datagram


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=30,
)


@pytest.mark.untraced  # conftest.py: a property test; the named tests beside it reach its lines
@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["v", "id", "seq", "boot", "ts", "r", "x"]), msgpack_values))
def test_any_well_formed_map_gives_a_datagram_or_a_decode_error(obj):
    try:
        data = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError):  # ints beyond 64 bits cannot be packed
        return
    try:
        decode(data)
    except DecodeError as exc:
        assert exc.reason in REASONS


ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/-"
ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=64)
names = st.text(alphabet=ID_CHARS.replace(":", "").replace("/", ""), min_size=1, max_size=64)
values = st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans()
timestamps = st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 999_999_999))
times = st.none() | st.integers(0, 2**32 - 1) | timestamps | st.floats(0, 2.0**32, exclude_max=True)


@settings(max_examples=300)
@given(
    ids,
    st.integers(0, 2**32 - 1),
    st.dictionaries(names, values, min_size=1, max_size=64),
    st.none() | st.integers(0, 2**32 - 1),
    times,
)
def test_encode_decode_round_trips_any_valid_datagram(sensor, seq, readings, boot, ts):
    got = decode(encode(sensor, seq, readings, boot=boot, ts=ts))
    expected_ts = ts.to_unix() if type(ts) is msgpack.Timestamp else None if ts is None else float(ts)
    assert got == Datagram(
        sensor, seq, boot, expected_ts, {k: int(v) if type(v) is bool else v for k, v in readings.items()}
    )
    assert all(type(v) in (int, float) for v in got.readings.values())
