"""The chunk codec: exact round trips on random and adversarial columns, and hostile blobs."""

import math
import random
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector import chunkenc
from collector.chunkenc import ChunkError, chunk_stats, decode_chunk, encode_chunk

INT64 = st.integers(-(2**63), 2**63 - 1)
SPECIAL_FLOATS = [
    0.0,
    -0.0,
    5e-324,
    -5e-324,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    math.inf,
    -math.inf,
    math.nan,
    struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0],
    float(struct.unpack("<f", struct.pack("<f", 0.1))[0]),
    0.1,
    0.30000000000000004,
    1.2345678901234567,
    2.0**53 + 2,
    1e22,
    1e23,
    123456.789012345678,
]
SPECIAL_INTS = [0, 1, -1, 2**53 + 1, -(2**53) - 1, 2**63 - 1, -(2**63), 2**32 - 1]


def bits(x):
    """A value as something == compares bit-exactly: floats by their bytes, with the type."""
    if type(x) is float:
        return ("f", struct.pack("<d", x))
    return (type(x).__name__, x)


def same(a, b):
    return [bits(x) for x in a] == [bits(x) for x in b]


def assert_round_trip(seqs, ts, received, metrics):
    for fast in (True, False):
        blob = encode_chunk(seqs, ts, received, metrics, fast=fast)
        s2, t2, r2, m2 = decode_chunk(blob)
        assert same(seqs, s2)
        assert same(ts, t2)
        assert same(received, r2)
        assert list(m2) == list(metrics)
        for name in metrics:
            assert same(metrics[name], m2[name]), name
    return blob


def decimal_floats(draw, n):
    """Quantized like devices report: k decimals, a slow walk, now and then a special value."""
    k = draw(st.integers(0, 9))
    start = draw(st.integers(-(10**12), 10**12))
    step = draw(st.integers(0, 10 ** draw(st.integers(0, 6))))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    out = []
    n_i = start
    for _ in range(n):
        n_i += rnd.randint(-step, step)
        x = n_i / 10**k
        if rnd.random() < 0.05:
            x = rnd.choice(SPECIAL_FLOATS)
        out.append(x)
    return out


@st.composite
def columns(draw, n, allow_none=True):
    style = draw(st.sampled_from(["floats", "ints", "mixed", "decimal", "clock"]))
    # A few values from hypothesis (it shrinks and hunts edges), the rest
    # drawn from them and from random 64-bit patterns (NaN payloads,
    # subnormals, every exponent), so long columns cost little to generate.
    rnd = random.Random(draw(st.integers(0, 2**32)))
    if style in ("floats", "ints", "mixed"):
        pool = []
        if style != "ints":
            pool += draw(st.lists(st.floats(), max_size=4)) + SPECIAL_FLOATS
        if style != "floats":
            pool += draw(st.lists(INT64, max_size=4)) + SPECIAL_INTS
        col = []
        for _ in range(n):
            if rnd.random() < 0.5:
                col.append(rnd.choice(pool))
            elif style != "ints" and (style == "floats" or rnd.random() < 0.5):
                col.append(struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0])
            else:
                col.append(rnd.randint(-(2**63), 2**63 - 1))
    elif style == "decimal":
        col = decimal_floats(draw, n)
    else:  # a clock: steady, stuck, jumping back, at some resolution
        t = draw(st.floats(0, 2**32))
        k = draw(st.sampled_from([0, 3, 6, None]))
        rnd = random.Random(draw(st.integers(0, 2**32)))
        col = []
        for _ in range(n):
            t += rnd.choice([1.0, 1.0, 0.0, -5.0, 0.001, 86400.0, 0.5])
            col.append(round(t, k) if k is not None else t)
    if allow_none and draw(st.booleans()):
        rnd = random.Random(draw(st.integers(0, 2**32)))
        col = [None if rnd.random() < 0.2 else v for v in col]
    return col


@st.composite
def chunks(draw):
    n = draw(st.integers(0, 70))
    start = draw(st.integers(0, 2**32 - 1))
    step = draw(st.sampled_from([1, 2, 0]))
    seqs = [(start + i * step) % 2**32 for i in range(n)]
    if draw(st.booleans()):
        seqs = draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n))
    ts = draw(columns(n, allow_none=False))
    if draw(st.booleans()):  # received a little after ts, as the collector sees it
        rnd = random.Random(draw(st.integers(0, 2**32)))
        received = [t + rnd.choice([0.001, 0.0023, 0.000001, 1e-9]) if type(t) is float else t for t in ts]
    else:
        received = draw(columns(n, allow_none=False))
    names = draw(st.lists(st.from_regex(r"[A-Za-z0-9._-]{1,12}", fullmatch=True), max_size=6, unique=True))
    metrics = {name: draw(columns(n)) for name in names}
    return seqs, ts, received, metrics


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(chunks())
def test_round_trip_is_bit_exact(chunk):
    assert_round_trip(*chunk)


def test_adversarial_values_in_every_column():
    n = len(SPECIAL_FLOATS) + len(SPECIAL_INTS)
    col = SPECIAL_FLOATS + SPECIAL_INTS
    assert_round_trip(
        SPECIAL_INTS + [0] * len(SPECIAL_FLOATS),
        col,
        col[::-1],
        {"x": col, "y": [None] * n, "z": [None if i % 3 else v for i, v in enumerate(col)]},
    )


def test_seq_wraps_within_a_chunk():
    seqs = [2**32 - 3, 2**32 - 2, 2**32 - 1, 0, 1, 2]
    ts = [1764600000.0 + i for i in range(6)]
    assert_round_trip(seqs, ts, ts, {"c": list(range(6))})


def test_int_stays_int_and_float_stays_float():
    _, _, _, m = decode_chunk(
        encode_chunk(
            [1, 2, 3], [1.0, 2.0, 3.0], [1.5, 2.5, 3.5], {"v": [5, 5.0, None], "n": [2**53 + 1, -(2**63), 2**63 - 1]}
        )
    )
    assert [type(v) for v in m["v"]] == [int, float, type(None)]
    assert m["n"] == [2**53 + 1, -(2**63), 2**63 - 1]


def test_negative_zero_and_float32_widened_survive():
    f32 = struct.unpack("<f", struct.pack("<f", 0.1))[0]
    _, ts, _, m = decode_chunk(encode_chunk([1, 2], [-0.0, 0.0], [0.0, 0.0], {"x": [-0.0, f32]}))
    assert math.copysign(1, ts[0]) == -1 and math.copysign(1, ts[1]) == 1
    assert math.copysign(1, m["x"][0]) == -1 and m["x"][1] == f32


def test_empty_chunk_and_metric_order():
    assert decode_chunk(encode_chunk([], [], [], {})) == ([], [], [], {})
    _, _, _, m = decode_chunk(encode_chunk([1], [1.0], [1.0], {"b": [1], "a": [None]}))
    assert list(m) == ["b", "a"] and m == {"b": [1], "a": [None]}


def realistic(n=1024, seed=7):
    rnd = random.Random(seed)
    t0 = 1764600000.0
    ts = [round(t0 + i + rnd.uniform(-0.005, 0.005), 3) for i in range(n)]
    return (
        list(range(n)),
        ts,
        [round(t + rnd.uniform(0.001, 0.004), 6) for t in ts],
        {
            "temp": [round(21.5 + 3 * math.sin(i / 4000) + rnd.choice((0, 0, 0.01)), 2) for i in range(n)],
            "hum": [round(45.0 + rnd.choice((0, 0, 0.1)), 1) for i in range(n)],
            "pressure": [round(1013.25 + rnd.choice((0, 0.01, -0.01)), 2) for i in range(n)],
            "battery": [round(3.7 - i * 1e-6, 3) for i in range(n)],
            "count": list(range(5000, 5000 + n)),
        },
    )


def test_realistic_chunk_is_small():
    """Quantized device values compress well below InfluxDB's 4.6 B/value (bench/disk.py measures)."""
    blob = assert_round_trip(*realistic())
    assert len(blob) < 2.0 * 1024 * 5


def test_unquantized_clock_falls_back_to_float_bits_exactly():
    rnd = random.Random(3)
    ts = [1764600000.0 + i + rnd.random() * 1e-3 for i in range(500)]  # time.time()-like, no decimal scale
    blob = assert_round_trip(list(range(500)), ts, [t + 0.002 for t in ts], {"x": [1.0] * 500})
    assert len(blob) < 500 * 8  # deltas of the bits, not 2 x 8 bytes per row


# ------------------------------------------------------------ hostile blobs


def rebuild(body: bytes, version: int = chunkenc.VERSION) -> bytes:
    """A blob with a valid checksum around any body: reaches the parser behind the CRC."""
    blob = bytes((version,)) + zlib.compress(body, 9, wbits=-15)
    return blob + struct.pack("<I", zlib.crc32(blob))


def body_of(blob: bytes) -> bytes:
    return zlib.decompress(blob[1:-4], wbits=-15)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_chunk_error(data):
    with pytest.raises(ChunkError):
        decode_chunk(data)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bodies_behind_a_good_checksum_raise_only_chunk_error(body):
    try:
        decode_chunk(rebuild(body))
    except ChunkError:
        pass


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(chunks(), st.data())
def test_mutated_bodies_decode_or_raise_chunk_error(chunk, data):
    body = bytearray(body_of(encode_chunk(*chunk)))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(body) - 1)))
        if op == "flip" and body:
            body[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del body[i : i + data.draw(st.integers(1, 8))]
        else:
            body[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        seqs, ts, received, metrics = decode_chunk(rebuild(bytes(body)))
    except ChunkError:
        return
    assert len(ts) == len(seqs) == len(received)
    assert all(len(col) == len(seqs) for col in metrics.values())


def test_every_single_bit_flip_is_caught_by_the_checksum():
    blob = encode_chunk(*realistic(64))
    for i in range(len(blob) * 8):
        bad = bytearray(blob)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ChunkError):
            decode_chunk(bytes(bad))


def test_truncated_and_extended_blobs_are_refused():
    blob = encode_chunk(*realistic(64))
    for n in (0, 1, 5, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ChunkError):
            decode_chunk(blob[:n])
    with pytest.raises(ChunkError):
        decode_chunk(blob + b"\x00")
    with pytest.raises(ChunkError, match="trailing"):
        decode_chunk(rebuild(body_of(blob) + b"\x00"))


def test_unknown_version_is_refused():
    blob = encode_chunk(*realistic(8))
    with pytest.raises(ChunkError, match="version"):
        decode_chunk(rebuild(body_of(blob), version=2))


def test_declared_sizes_over_the_limits_are_refused_before_allocating():
    def varint(n):
        out = bytearray()
        chunkenc._uvarint(out, n)
        return bytes(out)

    for rows, metrics in (
        (chunkenc.MAX_ROWS + 1, 0),
        (10, chunkenc.MAX_METRICS + 1),
        (chunkenc.MAX_ROWS, 200),
        (2**64, 0),
    ):
        with pytest.raises(ChunkError, match="limits"):
            decode_chunk(rebuild(varint(rows) + varint(metrics)))


def test_decompression_bomb_is_cut_off():
    with pytest.raises(ChunkError, match="larger"):
        decode_chunk(rebuild(bytes(chunkenc._MAX_BODY + 1)))


def test_not_bytes_is_chunk_error():
    with pytest.raises(ChunkError):
        decode_chunk("not bytes")


# ---------------------------------------------------------- caller misuse


def test_encode_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="int64"):
        encode_chunk([1], [1.0], [1.0], {"x": [2**63]})
    with pytest.raises(TypeError):
        encode_chunk([1], [1.0], [1.0], {"x": [True]})
    with pytest.raises(TypeError):
        encode_chunk([1], [1.0], [1.0], {"x": ["5"]})
    with pytest.raises(ValueError, match="values for"):
        encode_chunk([1, 2], [1.0], [1.0, 2.0], {})
    with pytest.raises(ValueError, match="rows"):
        n = chunkenc.MAX_ROWS + 1
        encode_chunk([0] * n, [0.0] * n, [0.0] * n, {})


# ----------------------------------------------------------------- stats


def test_chunk_stats():
    ts = [10.0, 9.0, 11.0, 12.0]
    assert chunk_stats(ts, [1, None, 3, 2]) == (3, 1, 3, 6, 10.0, 12.0)
    assert chunk_stats(ts, [None, -0.5, 0.25, None]) == (2, -0.5, 0.25, -0.25, 9.0, 11.0)
    assert chunk_stats(ts, [None] * 4) == (0, None, None, None, None, None)
    count, lo, hi, total, _, _ = chunk_stats([1.0, 2.0], [2**62, 2**62])
    assert (count, lo, hi, total) == (2, 2**62, 2**62, 2**63) and type(total) is int


def test_int64_extremes_next_to_each_other():
    """Deltas of 2**64 - 1 do not fit int64: those transforms must not be chosen."""
    lo, hi = -(2**63), 2**63 - 1
    for col in ([lo, hi, hi, hi], [hi, lo, lo, lo, lo], [lo, hi] * 8, [0, hi, 0, lo]):
        n = len(col)
        assert_round_trip(col, [0.0] * n, [0.0] * n, {"x": col})


def test_a_float_column_of_no_rows_is_no_base_for_received():
    """Found by the mutation fuzz: a body with 0 rows whose ts column says KIND float."""
    body = bytes([0, 0, 0x00, 0x02, 0x0A])  # 0 rows, 0 metrics; seqs int, ts float, received float+RELATIVE
    with pytest.raises(ChunkError):
        decode_chunk(rebuild(body))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(chunks(), st.data())
def test_decoding_some_columns_gives_exactly_those_of_the_full_decode(chunk, data):
    """A reader naming the metrics it wants (and no receive times) gets those columns bit-exact."""
    blob = encode_chunk(*chunk)
    seqs, ts, received, metrics = decode_chunk(blob)
    names = list(metrics) + ["absent"]
    wanted = data.draw(st.lists(st.sampled_from(names), unique=True))
    want_received = data.draw(st.booleans())
    got = decode_chunk(blob, metrics=wanted, received=want_received)
    assert same(got[0], seqs) and same(got[1], ts)
    assert got[2] is None if not want_received else same(got[2], received)
    assert list(got[3]) == [name for name in metrics if name in wanted]
    for name, col in got[3].items():
        assert same(col, metrics[name]), name


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(chunks(), st.data())
def test_mutated_bodies_decoded_in_part_decode_or_raise_chunk_error(chunk, data):
    body = bytearray(body_of(encode_chunk(*chunk)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, max(0, len(body) - 1)))
        if body:
            body[i] ^= 1 << data.draw(st.integers(0, 7))
    wanted = data.draw(st.lists(st.sampled_from(list(chunk[3]) + ["x"]), unique=True))
    try:
        seqs, ts, received, metrics = decode_chunk(rebuild(bytes(body)), metrics=wanted, received=False)
    except ChunkError:
        return
    assert received is None and len(ts) == len(seqs)
    assert set(metrics) <= set(wanted) and all(len(col) == len(seqs) for col in metrics.values())
