"""wire.decode's fast path against the careful decoder, wire._decode_reference.

The fast path (msgspec, typed) may only ever answer what the careful path
would: the same Datagram, value for value and bit for bit, or hand the bytes
over so the careful path gives its own verdict.  A differential fuzz
(bench/fuzz_wire.py's structured and mutated datagrams), hypothesis over any
bytes and any well-formed map, and named cases for each rule the fast path
checks after msgspec.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import wire

REPO = Path(__file__).resolve().parent.parent
SEED = 20261201


def _load_engine():
    spec = importlib.util.spec_from_file_location("fuzz_wire", REPO / "bench" / "fuzz_wire.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzz = _load_engine()
outcome = fuzz._outcome


def same(data: bytes) -> tuple:
    got, want = outcome(wire.decode, data), outcome(wire._decode_reference, data)
    assert got == want, data.hex()
    return got


@pytest.fixture
def reference_calls(monkeypatch):
    """How many datagrams decode handed to the careful path."""
    calls = []
    reference = wire._decode_reference

    def counting(data):
        calls.append(data)
        return reference(data)

    monkeypatch.setattr(wire, "_decode_reference", counting)
    return calls


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_the_fast_path_is_in_use():
    assert wire._fast_decode is not None, "msgspec is a dependency: pip install -e ."


def test_common_datagram_is_answered_by_the_fast_path(reference_calls):
    data = wire.encode("bench-0042", 12345, {"temp": 21.5, "hum": 40.25}, boot=1, ts=1_700_000_000.25)
    first = same(data)  # may teach the memo the names
    reference_calls.clear()
    assert wire.decode(data) == wire.Datagram("bench-0042", 12345, 1, 1_700_000_000.25, {"temp": 21.5, "hum": 40.25})
    assert reference_calls == []
    assert first[0] == "accepted"


@pytest.mark.parametrize(
    "obj, why",
    [
        ({"v": 1, "id": "s1", "seq": 7, "r": {"t": True}}, "a bool reading becomes 1"),
        ({"v": 1, "id": "s1", "seq": 7, "r": {"t": 1.0}, "fw": 3}, "an unknown key"),
        ({"v": 1, "id": "s1", "seq": 7, "r": {"never-seen-before-name": 1.0}}, "a name not yet memoized"),
        ({"v": 1, "id": "s1", "seq": 7, "r": {"t": 1.0}, "ts": msgpack.Timestamp(1764000000, 5)}, "a Timestamp"),
    ],
)
def test_unusual_valid_datagrams_take_the_careful_path(obj, why, reference_calls):
    data = pack(obj)
    assert same(data)[0] == "accepted", why
    assert reference_calls, why


@pytest.mark.parametrize(
    "obj, reason",
    [
        ({"v": 1, "id": "s1", "seq": 7, "r": {"t": float("nan")}}, "bad_readings"),
        ({"v": 1, "id": "s1", "seq": 7, "r": {"t": 1.0, "u": float("-inf")}}, "bad_readings"),
        ({"v": 1, "id": "s1", "seq": 7, "r": {"t": 2**63}}, "bad_readings"),
        ({"v": 1, "id": "s 1", "seq": 7, "r": {"t": 1.0}}, "bad_id"),
        ({"v": 1, "id": "a" * 65, "seq": 7, "r": {"t": 1.0}}, "bad_id"),
        ({"v": True, "id": "s1", "seq": 7, "r": {"t": 1.0}}, "bad_version"),
        ({"v": 1, "id": "s1", "seq": True, "r": {"t": 1.0}}, "bad_seq"),
        ({"v": 1, "id": "s1", "seq": 2**32, "r": {"t": 1.0}}, "bad_seq"),
        ({"v": 1, "id": "s1", "seq": 7, "boot": -1, "r": {"t": 1.0}}, "bad_boot"),
        ({"v": 1, "id": "s1", "seq": 7, "ts": 2.0**32, "r": {"t": 1.0}}, "bad_ts"),
        ({"v": 1, "id": "s1", "seq": 7, "ts": True, "r": {"t": 1.0}}, "bad_ts"),
        ({"v": 1, "id": "s1", "seq": 7, "r": {}}, "bad_readings"),
        ({"v": 1, "id": "s1", "seq": 7, "r": {f"m{i}": 1 for i in range(65)}}, "bad_readings"),
    ],
)
def test_bad_datagrams_get_the_careful_paths_reason_and_detail(obj, reason):
    got = same(pack(obj))
    assert got[:2] == ("rejected", reason)


def test_nan_payloads_and_float32_nan_and_infinity_are_bad_readings():
    head = b"\x84" + pack("v") + b"\x01" + pack("id") + pack("s1") + pack("seq") + b"\x07" + pack("r") + b"\x81\xa1t"
    for value in (
        b"\xcb" + bytes.fromhex("7ff8000000000001"),
        b"\xcb" + bytes.fromhex("fff0000000000000"),
        b"\xca" + bytes.fromhex("7fc00000"),
        b"\xca" + bytes.fromhex("ff800000"),
        b"\xca" + bytes.fromhex("7f800001"),
    ):
        assert same(head + value)[:2] == ("rejected", "bad_readings"), value.hex()


def test_largest_finite_floats_are_accepted_on_both_paths():
    for value in (1.7976931348623157e308, -1.7976931348623157e308):
        got = same(pack({"v": 1, "id": "s1", "seq": 7, "r": {"t": value, "u": value}}))
        assert got[0] == "accepted"


def test_trailing_bytes_and_truncation_are_the_careful_paths_verdicts():
    data = pack({"v": 1, "id": "s1", "seq": 7, "r": {"t": 1.0}})
    assert same(data + b"\x00")[:2] == ("rejected", "not_msgpack")
    for cut in range(len(data)):
        assert same(data[:cut])[0] == "rejected"


def test_duplicate_keys_last_one_wins_on_both_paths():
    head = b"\x85" + pack("v") + b"\x01" + pack("id") + pack("s1") + pack("seq") + b"\x07" + pack("r")
    twice_seq = head + pack({"t": 1.5}) + pack("seq") + b"\x09"
    assert same(twice_seq)[3] == ("int", 9)
    twice_name = b"\x84" + head[1:] + b"\x83\xa1t\x01\xa1u\x02\xa1t\x03"
    got = same(twice_name)
    assert got[-1] == ((("str", "t"), ("int", 3)), (("str", "u"), ("int", 2)))


def test_values_come_back_bit_exact():
    for value in (-0.0, 5e-324, 0.1, 2.0**53 + 2, -(2**63), 2**63 - 1, 2**53 + 1):
        data = pack({"v": 1, "id": "s1", "seq": 7, "r": {"t": value}, "ts": 0, "boot": 0})
        got = same(data)
        assert got[0] == "accepted"
        want = struct.pack("<d", value) if type(value) is float else value
        assert got[-1] == ((("str", "t"), (type(value).__name__, want)),)
    float32 = (
        b"\x84"
        + pack("v")
        + b"\x01"
        + pack("id")
        + pack("s1")
        + pack("seq")
        + b"\x07"
        + pack("r")
        + b"\x81\xa1t\xca"
        + struct.pack(">f", 0.1)
    )
    assert same(float32)[-1][0][1] == ("float", struct.pack("<d", struct.unpack(">f", struct.pack(">f", 0.1))[0]))


def test_int_ts_is_a_float_on_both_paths(reference_calls):
    data = pack({"v": 1, "id": "s1", "seq": 7, "r": {"t": 1.0}, "ts": 1764000000})
    same(data)
    reference_calls.clear()
    assert wire.decode(data).ts == 1764000000.0 and type(wire.decode(data).ts) is float
    assert reference_calls == []


# A soak: its worth is the number of cases, and line tracing doubled its time; every line it
# reaches, the named and hypothesis tests beside it reach too (wire.py's coverage is the same).
@pytest.mark.untraced  # conftest.py
def test_differential_fuzz_200k():
    result = fuzz.differential(SEED, 200_000)
    assert result["examples"] == [] and result["mismatches"] == 0
    verdicts = result["verdicts"]
    assert sum(verdicts.values()) == 200_000
    assert set(verdicts) == {"accepted", *wire.REASONS}  # every verdict was reached
    # The fast path answered a good share, so the comparison is not idle.
    assert result["fast_path_answered"] > 10_000, result


_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.floats(width=32),
    st.text(max_size=70),
    st.binary(max_size=8),
    st.sampled_from(["s1", "t", "rh", "bench-0042"]),
)


@pytest.mark.untraced  # conftest.py: a property test; the named tests beside it reach its lines
@settings(max_examples=1500, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "v": st.one_of(st.just(1), _scalar),
            "id": st.one_of(st.sampled_from(["s1", "bench-0042", "a" * 64]), _scalar),
            "seq": st.one_of(st.integers(0, 2**32 - 1), _scalar),
            "r": st.one_of(
                st.dictionaries(
                    st.sampled_from(["t", "rh", "temp_c", "hum", "x y", ""]) | st.text(max_size=3),
                    st.one_of(
                        st.floats(), st.floats(width=32), st.integers(-(2**63), 2**64 - 1), st.booleans(), st.none()
                    ),
                    max_size=66,
                ),
                _scalar,
            ),
        },
        optional={
            "boot": st.one_of(st.integers(0, 2**32 - 1), _scalar),
            "ts": st.one_of(st.floats(0, 2**32), st.integers(-1, 2**32), _scalar),
            "x": _scalar,
        },
    )
)
def test_any_datagram_like_map_gets_the_same_answer(obj):
    same(msgpack.packb(obj, use_bin_type=True))


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_get_the_same_answer(data):
    same(data)


@pytest.mark.slow
def test_differential_fuzz_long_run():
    result = fuzz.differential(SEED + 1, 1_500_000)
    assert result["mismatches"] == 0, result["examples"]
    assert sum(result["verdicts"].values()) == 1_500_000
