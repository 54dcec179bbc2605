"""The numpy codec against the frozen list codec (tests/chunkenc_ref.py): same bytes, same values.

The chunk format did not change: for the same columns and `fast` flag the
encoder must give the reference's bytes exactly, and the decoder must give
the reference's values for any blob (bit for bit, int apart from float,
None apart from NaN) or raise ChunkError where the reference does.
"""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_chunkenc import SPECIAL_FLOATS, SPECIAL_INTS, chunks, same
from test_chunkstore import same as stats_same

from collector import chunkenc, chunkstore
from collector.chunkenc import ChunkError

import chunkenc_ref
import chunkstore_ref

SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]


def decoded_same(a, b) -> bool:
    (s1, t1, r1, m1), (s2, t2, r2, m2) = a, b
    if not (same(s1, s2) and same(t1, t2)):
        return False
    if (r1 is None) != (r2 is None) or (r1 is not None and not same(r1, r2)):
        return False
    return list(m1) == list(m2) and all(same(m1[k], m2[k]) for k in m1)


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW)
@given(chunks(), st.booleans())
def test_same_bytes_as_the_reference_encoder(chunk, fast):
    blob = chunkenc.encode_chunk(*chunk, fast=fast)
    assert blob == chunkenc_ref.encode_chunk(*chunk, fast=fast)
    assert decoded_same(chunkenc.decode_chunk(blob), chunkenc_ref.decode_chunk(blob))


@st.composite
def head_columns(draw):
    """A head's arrays as the collector closes them: realistic or hostile, NaN for an absent value."""
    n = draw(st.sampled_from([0, 1, 2, 3, 17, 200, 1024, 1500]))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    start = draw(st.sampled_from([0, 5, 2**32 - 600, 2**62, -(2**63)]))
    seqs = [
        start + i * rnd.choice([1, 1, 1, 2]) if start < 2**62 else rnd.randint(-(2**63), 2**63 - 1) for i in range(n)
    ]
    t0 = draw(st.sampled_from([1_764_600_000.0, 0.0, 1e18, 5e-324, -30.0]))
    res = draw(st.sampled_from([0, 3, 6, None]))
    ts, t = [], t0
    for _ in range(n):
        t += rnd.choice([1.0, 1.0, 1.0, 0.0, -5.0, 0.001, 60.0, 1e-9, 1.0 + rnd.random() / 100])
        ts.append(round(t, res) if res is not None else t)
    rstyle = draw(st.sampled_from(["round6", "raw", "same", "hostile"]))
    if rstyle == "round6":
        received = [round(x + rnd.random() / 100, 6) for x in ts]
    elif rstyle == "raw":
        received = [x + rnd.random() / 100 for x in ts]
    elif rstyle == "same":
        received = list(ts)
    else:
        received = [rnd.choice(SPECIAL_FLOATS) for _ in ts]
    metrics = {}
    for name in draw(st.lists(st.sampled_from(["temp", "hum", "pres", "bat", "count", "x"]), unique=True, max_size=5)):
        style = draw(st.sampled_from(["dec", "int", "special", "bits", "const", "holes", "empty"]))
        k = rnd.randint(0, 4)
        if style == "dec":
            col = [round(20 + rnd.gauss(0, 3), k) for _ in range(n)]
        elif style == "int":
            col = [float(rnd.randint(0, 2**20) * rnd.choice([1, 1, 1000])) for _ in range(n)]
        elif style == "special":
            pool = [v for v in SPECIAL_FLOATS if v == v] + [float(v) for v in SPECIAL_INTS]
            col = [rnd.choice(pool) if rnd.random() < 0.3 else round(rnd.random(), 2) for _ in range(n)]
        elif style == "bits":
            col = [struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(n)]
            col = [v if v == v else 0.5 for v in col]
        elif style == "const":
            col = [rnd.choice([21.53, -0.0, 0.0, 3.712])] * n
        elif style == "holes":
            col = [math.nan if rnd.random() < 0.3 else round(rnd.random() * 100, 1) for _ in range(n)]
        else:
            col = [math.nan] * n
        metrics[name] = col
    return seqs, ts, received, metrics


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW)
@given(head_columns(), st.booleans())
def test_encode_arrays_gives_the_bytes_of_the_list_encoder(cols, fast):
    seqs, ts, received, metrics = cols
    blob = chunkenc.encode_arrays(
        np.array(seqs, dtype=np.int64),
        np.array(ts),
        np.array(received),
        {k: np.array(v) for k, v in metrics.items()},
        fast=fast,
    )
    lists = {k: [None if v != v else v for v in col] for k, col in metrics.items()}
    assert blob == chunkenc_ref.encode_chunk(seqs, ts, received, lists, fast=fast)
    assert decoded_same(chunkenc.decode_chunk(blob), (seqs, ts, received, lists))


def test_encode_arrays_refuses_columns_of_other_lengths():
    with pytest.raises(ValueError, match="column temp has 1 values for 2 rows"):
        chunkenc.encode_arrays(np.arange(2), np.zeros(2), np.zeros(2), {"temp": np.zeros(1)})


@settings(max_examples=200, deadline=None, suppress_health_check=SLOW)
@given(chunks(), st.data())
def test_mutated_blobs_decode_as_the_reference_does(chunk, data):
    blob = bytearray(chunkenc_ref.encode_chunk(*chunk, fast=data.draw(st.booleans())))
    d = __import__("zlib").decompressobj(wbits=-15)
    body = bytearray(d.decompress(bytes(blob[1:-4])))
    for _ in range(data.draw(st.integers(1, 4))):
        if body:
            body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    c = __import__("zlib").compressobj(9, 8, -15)
    raw = bytes((1,)) + c.compress(bytes(body)) + c.flush()
    forged = raw + struct.pack("<I", __import__("zlib").crc32(raw))
    outcomes = []
    for codec in (chunkenc, chunkenc_ref):
        try:
            outcomes.append(codec.decode_chunk(forged))
        except (ChunkError, chunkenc_ref.ChunkError):
            outcomes.append(None)
    if outcomes[1] is None:
        assert outcomes[0] is None
    else:
        assert outcomes[0] is not None and decoded_same(outcomes[0], outcomes[1])


def close_both(seqs, ts, received, metrics, fast):
    rows = []
    for module in (chunkstore, chunkstore_ref):
        head = module.Head("s-1", 3, 1, 0.0)
        head.extend(seqs, ts, received, {k: [None if v != v else v for v in col] for k, col in metrics.items()})
        rows.append(head.close(fast))
    return rows


def ref_minutes(minutes, fast):
    """chunkstore_ref.encode_minutes, with the `fast` flag the head closed with."""
    if not fast:
        return chunkstore_ref.encode_minutes(minutes)
    starts, count, lo, hi, total = (list(c) for c in zip(*minutes))
    nulls = [None] * len(minutes)
    return chunkenc_ref.encode_chunk(
        starts, nulls, nulls, {"count": count, "min": lo, "max": hi, "sum": total}, fast=True
    )


def assert_same_row(new, ref, fast):
    """The same chunk row, and the minute blocks of its rollups encoded as the reference does."""
    assert new.blob == ref.blob
    assert stats_same(tuple(new)[:6], tuple(ref)[:6])
    assert stats_same(new.stats, ref.stats)
    assert stats_same(new.rollups, ref.rollups)
    blocks = {}
    for name, r in ref.rollups.items():
        minutes = sorted((b, *v) for (w, b), v in r.items() if w == 60)
        blocks[name] = (minutes[0][0], minutes[-1][0], ref_minutes(minutes, fast))
    assert new.blocks == blocks


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW)
@given(head_columns(), st.booleans(), st.booleans())
def test_a_closed_head_is_the_reference_chunk_row(cols, fast, sort):
    seqs, ts, received, metrics = cols
    if sort:
        ts = sorted(ts)
    if not seqs:
        return  # an empty head never closes (min of no receive times)
    assert_same_row(*close_both(seqs, ts, received, metrics, fast), fast)


def test_a_closed_head_keeps_the_first_of_equal_zeros_and_the_newest_of_equal_times():
    n = 130
    seqs = [5, 9, 7] + list(range(10, 10 + n - 3))
    ts = [60.0, 60.0, 60.0] + [61.0 + i // 50 for i in range(n - 3)]
    ts[-2:] = [ts[-3], ts[-3]]
    metrics = {
        "z": [0.0, -0.0] * (n // 2),
        "nz": [-0.0, 0.0] * (n // 2),
        "big": [1e308, 1e308, -1e308] + [1e308] * (n - 3),
        "neg": [-0.0] * n,
    }
    for fast in (True, False):
        assert_same_row(*close_both(seqs, ts, [t + 0.5 for t in ts], metrics, fast), fast)


@settings(max_examples=100, deadline=None, suppress_health_check=SLOW)
@given(st.lists(chunks(), min_size=1, max_size=4), st.booleans())
def test_encode_many_gives_each_chunks_bytes(many, fast):
    n = min(len(c[0]) for c in many)
    cut = [(s[:n], t[:n], r[:n], {k: v[:n] for k, v in m.items()}) for s, t, r, m in many]
    for batch in (many, cut):  # chunks of one length go through numpy together
        assert chunkenc.encode_many(batch, fast=fast) == [chunkenc_ref.encode_chunk(*c, fast=fast) for c in batch]


@settings(max_examples=60, deadline=None, suppress_health_check=SLOW)
@given(st.lists(head_columns(), min_size=1, max_size=4), st.booleans(), st.booleans())
def test_heads_closed_together_are_each_the_reference_chunk_row(many, fast, sort):
    """chunkstore.close_heads (the central consumer's batches): each head's row as the reference
    closes it alone, whether the heads (and their minute blocks) share a length or not."""
    many = [(s, sorted(t) if sort else t, r, m) for s, t, r, m in many if s]
    if not many:
        return
    n = min(len(c[0]) for c in many)
    cut = [(s[:n], t[:n], r[:n], {k: v[:n] for k, v in m.items()}) for s, t, r, m in many]
    for batch in (many, cut, many + cut):  # lengths that differ, one length, both
        heads = []
        for seqs, ts, received, metrics in batch:
            head = chunkstore.Head("s-1", 3, 1, 0.0)
            head.extend(seqs, ts, received, {k: [None if v != v else v for v in c] for k, c in metrics.items()})
            heads.append(head)
        rows = chunkstore.close_heads(heads, fast)
        together, chunkstore.CLOSE_TOGETHER = chunkstore.CLOSE_TOGETHER, 3  # in slices of 3 heads
        try:
            sliced = chunkstore.close_heads(heads, fast)
        finally:
            chunkstore.CLOSE_TOGETHER = together
        assert len(rows) == len(sliced) == len(batch)
        for row, row_sliced, cols in zip(rows, sliced, batch):
            ref = close_both(*cols, fast)[1]
            assert_same_row(row, ref, fast)
            assert_same_row(row_sliced, ref, fast)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, -1, 2**62, -(2**62), 1_700_000_000])),
    st.dictionaries(
        st.sampled_from(["count", "min", "max", "sum", "x" * 70]),
        st.one_of(
            st.integers(-(2**63), 2**63 - 1),
            st.floats(),
            st.sampled_from(SPECIAL_FLOATS),
            st.builds(round, st.floats(-1e6, 1e6), st.integers(0, 9)),
        ),
        max_size=5,
    ),
    st.booleans(),
)
def test_a_one_row_chunk_is_the_reference_chunk(seq, metrics, fast):
    """chunkenc.encode_row (a minute block of one minute) gives encode_chunk's bytes."""
    blob = chunkenc.encode_row(seq, metrics, fast=fast)
    assert blob == chunkenc_ref.encode_chunk([seq], [None], [None], {k: [v] for k, v in metrics.items()}, fast=fast)
