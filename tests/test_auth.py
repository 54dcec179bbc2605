"""Signed datagrams: the doc's test vector verbatim, every tampering rejected with
its reason, the key file parser's refusals, and hypothesis properties."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import os
import random

import pytest
from doc_examples import DOC, doc_examples
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import auth, wire
from collector.auth import decode_signed, load_keys, sign, verify
from collector.errors import ConfigError, DecodeError, EncodeError
from collector.wire import Datagram

KEY = bytes(range(32))
BODY = bytes.fromhex("85a17601a26964a27331a373657107a4626f6f7403a17282a174ca41ac0000a2726830")
TAG = "9c2ee3c450cd7c47bae29bf2d5021649"
FULL_HMAC = "9c2ee3c450cd7c47bae29bf2d50216495f8fba0a92f0804dd6c4a95cb8d4a0a5"
ALL_REASONS = set(auth.REASONS) | set(wire.REASONS)


def reason_of(call, *args) -> str:
    with pytest.raises(DecodeError) as info:
        call(*args)
    return info.value.reason


def body(sensor="s1", seq=7, boot=3) -> bytes:
    return wire.encode(sensor, seq, {"t": 21.5}, boot=boot)


# --- the test vector in docs/PROTOCOL.md --------------------------------------------------


def test_doc_test_vector_verbatim():
    examples = doc_examples("signed-hex")
    assert set(examples) == {"test-vector"}
    data, verdict = examples["test-vector"]
    assert verdict == "signed by s1"
    assert data == sign(BODY, "s1", KEY)
    assert data.hex().endswith("c410" + TAG)
    assert len(data) == 57
    # computed independently of auth.py, over every byte before the tag
    assert hmac.new(KEY, data[:-16], hashlib.sha256).hexdigest() == FULL_HMAC
    assert verify(data, {"s1": KEY}) == (BODY, "s1")
    assert decode_signed(data, {"s1": KEY}) == (Datagram("s1", 7, 3, None, {"t": 21.5, "rh": 48}), "s1")


def test_doc_states_the_vector_key_tag_and_body():
    text = DOC.read_text()
    assert KEY.hex() in text and FULL_HMAC in text
    assert ("93a27331" + BODY.hex() + "c410") in text  # the openssl command's input
    assert wire.decode(BODY) == Datagram("s1", 7, 3, None, {"t": 21.5, "rh": 48})


def test_doc_tampered_vector_examples():
    data = doc_examples("signed-hex")["test-vector"][0]
    assert reason_of(verify, data[:-1] + b"\x48", {"s1": KEY}) == "bad_mac"
    as_s2 = sign(BODY, "s2", KEY)
    assert reason_of(decode_signed, as_s2, {"s1": KEY}) == "unknown_key"
    assert reason_of(decode_signed, as_s2, {"s2": KEY}) == "wrong_key"


# --- round trips -------------------------------------------------------------------------


def test_sign_verify_with_str8_key_id():
    key_id = "s1@" + "k" * 40  # 43 bytes: str8
    data = sign(body(), key_id, KEY)
    assert data[1:3] == b"\xd9\x2b"
    assert decode_signed(data, {key_id: KEY})[1] == key_id


def test_verify_accepts_memoryview_and_bytearray():
    data = sign(BODY, "s1", KEY)
    assert verify(memoryview(data), {"s1": KEY}) == verify(bytearray(data), {"s1": KEY}) == (BODY, "s1")


def test_key_with_suffix_speaks_for_its_sensor_only():
    assert auth.key_allows("s1", "s1") and auth.key_allows("s1@2026", "s1")
    assert not auth.key_allows("s10", "s1") and not auth.key_allows("s1", "s10")
    assert not auth.key_allows("s1@2026", "s1@2026x")
    keys = {"s1@2026": KEY}
    assert decode_signed(sign(body("s1"), "s1@2026", KEY), keys)[0].sensor == "s1"
    assert reason_of(decode_signed, sign(body("s10"), "s1@2026", KEY), keys) == "wrong_key"


# --- rejections --------------------------------------------------------------------------


def test_rejects_every_single_bit_flip():
    data = sign(BODY, "s1", KEY)
    for i in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        assert reason_of(decode_signed, bytes(flipped), {"s1": KEY}) in {
            "not_signed",
            "bad_envelope",
            "unknown_key",
            "bad_mac",
        }, i


def test_rejects_every_truncation_and_extension():
    data = sign(BODY, "s1", KEY)
    for cut in range(len(data)):
        assert reason_of(verify, data[:cut], {"s1": KEY}) in {"not_signed", "bad_envelope", "bad_mac"}, cut
    assert reason_of(verify, data + b"\x00", {"s1": KEY}) in {"bad_envelope", "bad_mac"}


def test_rejects_tag_of_another_key():
    assert reason_of(verify, sign(BODY, "s1", bytes(32)), {"s1": KEY}) == "bad_mac"


def test_rejects_replayed_body_under_another_key_id():
    # Moving a signed body to another envelope breaks the tag: the key id is signed too.
    data = sign(BODY, "s1", KEY)
    moved = b"\x93\xa7s1@2026" + data[4:]
    assert reason_of(verify, moved, {"s1": KEY, "s1@2026": KEY}) == "bad_mac"


def test_rejects_unknown_key():
    assert reason_of(verify, sign(BODY, "s9", KEY), {"s1": KEY}) == "unknown_key"


def test_rejects_plain_datagram_as_not_signed():
    assert reason_of(verify, BODY, {"s1": KEY}) == "not_signed"
    assert reason_of(verify, b"", {"s1": KEY}) == "not_signed"


@given(st.integers(0, 70_000))
def test_a_plain_datagram_under_require_auth_is_too_large_before_not_signed(n):
    # issue 13 item 4: the size check comes first, as PROTOCOL.md's order says.
    verdict = auth.refuse_plain(b"\x81" * n)
    assert verdict.reason == ("too_large" if n > wire.MAX_DATAGRAM_BYTES else "not_signed")
    # the same order as verify() gives a signed-looking datagram of that size
    assert verdict.reason == reason_of(verify, b"\x80" * n, {"s1": KEY})


def test_rejects_oversized_signed_datagram():
    assert reason_of(verify, b"\x93" + b"\x00" * 8192, {"s1": KEY}) == "too_large"


@pytest.mark.parametrize(
    "envelope",
    [
        b"\x93\xa0" + BODY + b"\xc4\x10" + bytes(16),  # empty key id
        b"\x93\xda\x00\x02s1" + BODY + b"\xc4\x10" + bytes(16),  # str16 key id
        b"\x93\xd9\x02s1" + BODY + b"\xc4\x10" + bytes(16),  # str8 for 2 bytes: not smallest
        b"\x93\xd9\x41" + b"k" * 65 + BODY + b"\xc4\x10" + bytes(16),  # 65-byte key id
        b"\x93\xa3s 1" + BODY + b"\xc4\x10" + bytes(16),  # space in key id
        b"\x93\xa2\xc3\xa9" + BODY + b"\xc4\x10" + bytes(16),  # non-ASCII key id
        b"\x93\xa2s1" + BODY + b"\xc4\x0f" + bytes(16),  # bin8 of 15
        b"\x93\xa2s1" + BODY + b"\xc5\x00\x10" + bytes(16),  # bin16 tag
        b"\x93\xa2s1\xc4\x10" + bytes(16),  # no body
        b"\x93\xa2s1",  # nothing after the key id
        b"\x93",
    ],
)
def test_rejects_bad_envelope(envelope):
    assert reason_of(verify, envelope, {"s1": KEY}) == "bad_envelope"


def test_signed_body_is_decoded_with_wire_reasons():
    assert reason_of(decode_signed, sign(b"\x01", "s1", KEY), {"s1": KEY}) == "not_a_map"
    bad = wire.encode("s1", 1, {"t": 1}, boot=1)[:-1] + b"\xc1"
    assert reason_of(decode_signed, sign(bad, "s1", KEY), {"s1": KEY}) == "not_msgpack"


def test_rejects_signed_body_without_boot():
    assert reason_of(decode_signed, sign(body(boot=None), "s1", KEY), {"s1": KEY}) == "bad_boot"


@pytest.mark.parametrize(
    "call",
    [
        lambda: sign(BODY, "", KEY),
        lambda: sign(BODY, "s 1", KEY),
        lambda: sign(BODY, "k" * 65, KEY),
        lambda: sign(BODY, "s1", bytes(15)),
        lambda: sign(BODY, "s1", bytes(65)),
        lambda: sign(b"", "s1", KEY),
        lambda: sign(b"\x00" * 8171, "s1", KEY),  # 8193 bytes signed
    ],
)
def test_sign_refuses_what_would_not_verify(call):
    with pytest.raises(EncodeError):
        call()


# --- properties --------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: b"\x93" + b))
def test_any_bytes_verify_or_raise_a_documented_reason(data):
    try:
        datagram, key_id = decode_signed(data, {"s1": KEY})
    except DecodeError as exc:
        assert exc.reason in ALL_REASONS
    else:  # only possible by forging HMAC-SHA-256-128
        pytest.fail(f"forged: {data.hex()}")


KEY_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/-"


@settings(max_examples=200)
@given(
    st.text(KEY_ID_CHARS, min_size=1, max_size=40),
    st.text(KEY_ID_CHARS, max_size=20),
    st.binary(min_size=16, max_size=64),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
def test_sign_then_decode_round_trips(sensor, suffix, key, seq, boot):
    key_id = f"{sensor}@{suffix}" if suffix else sensor
    plain = wire.encode(sensor, seq, {"t": 1.5}, boot=boot)
    data = sign(plain, key_id, key)
    assert decode_signed(data, {key_id: key}) == (wire.decode(plain), key_id)


# --- the key file ------------------------------------------------------------------------


def write_keys(tmp_path, text: str, mode: int = 0o600):
    path = tmp_path / "keys"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_load_keys_reads_ids_and_hex(tmp_path):
    path = write_keys(tmp_path, "# keys\n\ns1 = " + KEY.hex() + "\n  s1@2026=" + "AB" * 16 + "   # rotated\n")
    assert load_keys(path) == {"s1": KEY, "s1@2026": b"\xab" * 16}


def test_load_keys_allows_group_read(tmp_path):
    assert load_keys(write_keys(tmp_path, f"s1 = {KEY.hex()}\n", 0o640)) == {"s1": KEY}


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o620, 0o666])
def test_load_keys_refuses_a_file_others_can_read_or_write(tmp_path, mode):
    path = write_keys(tmp_path, f"s1 = {KEY.hex()}\n", mode)
    with pytest.raises(ConfigError) as info:
        load_keys(path)
    assert f"chmod 600 {path}" in str(info.value) and f"{mode:04o}" in str(info.value)


@pytest.mark.parametrize(
    "line, what",
    [
        ("s1 " + KEY.hex(), "expected `key_id = hex`"),
        ("s 1 = " + KEY.hex(), "expected `key_id = hex`"),
        ("s1! = " + KEY.hex(), "key id must be"),
        ("s1 = " + KEY.hex()[:-1], "even number of hex digits"),
        ("s1 = " + KEY.hex()[:30], "16-64 bytes"),
        ("s1 = " + "ab" * 65, "16-64 bytes"),
        ("s1 = zz" + KEY.hex(), "expected `key_id = hex`"),
    ],
)
def test_load_keys_names_the_bad_line_never_the_key(tmp_path, line, what):
    path = write_keys(tmp_path, f"# header\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_keys(path)
    message = str(info.value)
    assert f"{path} line 2" in message and what in message
    assert KEY.hex()[:30] not in message and "abab" not in message


def test_load_keys_refuses_a_repeated_id(tmp_path):
    path = write_keys(tmp_path, f"s1 = {KEY.hex()}\ns1 = {KEY.hex()}\n")
    with pytest.raises(ConfigError, match="line 2: key id s1 appears twice"):
        load_keys(path)


def test_load_keys_refuses_missing_file_directory_and_fifo(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load_keys(tmp_path / "absent")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_keys(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):  # and does not hang
        load_keys(fifo)


def test_load_keys_of_an_empty_file_is_empty(tmp_path):
    assert load_keys(write_keys(tmp_path, "# no sensors yet\n")) == {}


def test_parse_key_for_the_command_line():
    assert auth.parse_key(" " + KEY.hex().upper() + "\n") == KEY
    with pytest.raises(ConfigError):
        auth.parse_key("xyz")


def test_load_keys_refuses_a_huge_file(tmp_path):
    path = write_keys(tmp_path, f"s1 = {KEY.hex()}\n" + "#" * (1 << 20))
    with pytest.raises(ConfigError, match="over 1048576 bytes"):
        load_keys(path)


def test_sign_accepts_exactly_max_size():
    assert len(sign(b"\x00" * 8170, "s1", KEY)) == wire.MAX_DATAGRAM_BYTES


def test_fuzz_mutated_signed_datagrams_never_verify():
    spec = importlib.util.spec_from_file_location("fuzz_wire", DOC.parent.parent / "bench" / "fuzz_wire.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    keys = {"s1": KEY, "s1@2026": KEY}
    corpus = [sign(BODY, "s1", KEY), sign(body(seq=2**32 - 1), "s1@2026", KEY)]
    rng = random.Random(4)
    tally = {}
    for _ in range(20_000):
        data = fuzz.mutate(rng, corpus)
        try:
            decode_signed(data, keys)
        except DecodeError as exc:
            tally[exc.reason] = tally.get(exc.reason, 0) + 1
        else:
            assert data in corpus, data.hex()  # a mutation that changed nothing
            tally["unchanged"] = tally.get("unchanged", 0) + 1
    assert sum(tally.values()) == 20_000
    assert set(tally) <= ALL_REASONS | {"unchanged"}
    assert tally["bad_mac"] > 1000


def test_load_keys_turns_a_read_error_into_a_config_error():
    # /proc/self/mem is a regular file of mode 0600 owned by us whose read at
    # offset 0 fails with EIO: a real read error (a failing flash page) with
    # no mock.  An OSError escaping here would kill the collector on SIGHUP.
    with pytest.raises(ConfigError, match="key file /proc/self/mem: Input/output error"):
        load_keys("/proc/self/mem")
