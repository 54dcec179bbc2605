"""A sensor's previous choices tried first (chunkstore.CloseHints, chunkenc.encode_reusing).

A reused choice may change a chunk's bytes, never what it decodes to: every
blob closed with hints must decode to exactly the head's columns (bit for
bit, None for an absent value), and everything else in the chunk row (the
statistics, rollups and minute blocks) must be the reference's.  The named
tests each break one of the checks that decide whether a choice still holds.
"""

from __future__ import annotations

import math
import random
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_chunkenc import SPECIAL_FLOATS
from test_chunkenc_diff import assert_same_row, close_both, decoded_same, head_columns

from collector import chunkenc, chunkstore

import chunkenc_ref

SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]


def head(seqs, ts, received, metrics, sensor="s-1"):
    h = chunkstore.Head(sensor, 3, 1, 0.0)
    h.extend(seqs, ts, received, {k: [None if v != v else v for v in col] for k, col in metrics.items()})
    return h


def nulled(metrics):
    return {k: [None if v != v else v for v in col] for k, col in metrics.items()}


def close_with(hints, cols):
    """Close cols with hints: the row, checked against the reference row and the columns."""
    seqs, ts, received, metrics = cols
    row = head(*cols).close(True, hints)
    ref = close_both(*cols, True)[1]
    assert_same_row(row._replace(blob=ref.blob, crc=ref.crc), ref, True)
    assert row.crc == chunkenc.zlib.crc32(row.blob)
    assert decoded_same(chunkenc_ref.decode_chunk(row.blob), (seqs, ts, received, nulled(metrics)))
    return row


def mutate(cols, how: str, rnd: random.Random):
    """The next head of the same sensor: like the last one, or changed in one way a choice may not survive."""
    seqs, ts, received, metrics = cols
    n = len(seqs)
    seqs = [s + n for s in seqs] if seqs and max(seqs) < 2**62 else list(seqs)
    metrics = {k: list(v) for k, v in metrics.items()}
    if not metrics or not n:
        return seqs, ts, received, metrics
    name = rnd.choice(sorted(metrics))
    col = metrics[name]
    i = rnd.randrange(n)
    if how == "finer":  # one more decimal than the column had
        col[i] = col[i] + 0.001 if col[i] == col[i] and abs(col[i]) < 1e12 else 0.125
    elif how == "hole":
        col[i] = math.nan
    elif how == "jump":  # a value far from the others: a wider stream
        col[i] = rnd.choice([1e15, -(2.0**52), 123456789.0])
    elif how == "special":
        col[i] = rnd.choice([v for v in SPECIAL_FLOATS if v == v])
    elif how == "ts":
        ts = list(ts)
        ts[i] = ts[i] + rnd.choice([0.0001, 1e6, -30.0])
    elif how == "received":
        received = list(received)
        received[i] = received[i] + rnd.choice([1e-7, 0.5, 1e9])
    return seqs, ts, received, metrics


@settings(max_examples=120, deadline=None, suppress_health_check=SLOW)
@given(
    head_columns(),
    st.lists(st.sampled_from(["same", "same", "finer", "hole", "jump", "special", "ts", "received"]), max_size=6),
    st.integers(0, 2**32),
)
def test_a_sensors_successive_heads_decode_exactly_with_reused_choices(cols, changes, seed):
    if not cols[0]:
        return  # an empty head never closes
    rnd = random.Random(seed)
    hints = chunkstore.CloseHints()
    close_with(hints, cols)
    for how in changes:
        cols = mutate(cols, how, rnd)
        close_with(hints, cols)
    assert hints.reused + hints.searched == len(changes) + 1


def realistic(n=1024, seed=1, scale=2):
    rnd = random.Random(seed)
    ts = [round(1_700_000_000 + i * 0.01 + rnd.random() * 1e-3, 3) for i in range(n)]
    received = [round(t + 0.002 + rnd.random() * 1e-4, 6) for t in ts]
    metrics = {
        "temp": [round(21 + rnd.random(), scale) for _ in range(n)],
        "bits": [struct.unpack("<d", rnd.getrandbits(62).to_bytes(8, "little"))[0] for _ in range(n)],
        "count": [float(i) for i in range(n)],
    }
    return list(range(n)), ts, received, metrics


def test_reused_choices_give_the_full_searchs_bytes_when_they_hold():
    hints = chunkstore.CloseHints()
    first = close_with(hints, realistic(seed=1))
    second = close_with(hints, realistic(seed=1))
    assert (hints.searched, hints.reused) == (1, 1)
    assert second.blob == first.blob == chunkstore_blob(realistic(seed=1))


def chunkstore_blob(cols):
    seqs, ts, received, metrics = cols
    return chunkenc.encode_arrays(
        np.array(seqs), np.array(ts), np.array(received), {k: np.array(v) for k, v in metrics.items()}, fast=True
    )


def test_a_column_with_more_decimals_than_before_is_searched_again():
    """Reused at 2 decimals, 21.005 would come back 21.0 or 21.01 (fails with the exactness check skipped)."""
    hints = chunkstore.CloseHints()
    close_with(hints, realistic(seed=1))
    cols = realistic(seed=2)
    cols[3]["temp"][500] = 21.005
    close_with(hints, cols)
    assert (hints.searched, hints.reused) == (2, 0)


def test_an_absent_value_in_a_raw_bits_column_is_searched_again():
    """The bits column is stored as its 64 bits; a NaN there is an absent value, which only a
    bitmap keeps (fails with the NaN check skipped: it decodes as NaN, not None)."""
    hints = chunkstore.CloseHints()
    close_with(hints, realistic(seed=1))
    cols = realistic(seed=2)
    cols[3]["bits"][7] = math.nan
    close_with(hints, cols)
    assert (hints.searched, hints.reused) == (2, 0)


def remembered(hints, name, sensor="s-1"):
    """(transform, width) remembered for a column of a sensor's last chunk."""
    names, choices = hints._last[sensor][0]
    rep, transform, width, relative = choices[3 + names.index(name)]
    return transform, width


def test_a_stream_wider_than_before_has_its_transform_chosen_again():
    """count steps by 1: deltas of deltas, all 0 (width 0).  One jump of 10**6 makes two of
    them 4 bytes wide: that column's transform is chosen again (deltas of deltas still, now
    remembered at width 4), the others are reused (fails with the width check skipped: width 0
    stays remembered, the growth unseen)."""
    hints = chunkstore.CloseHints()
    close_with(hints, realistic(seed=1))
    assert remembered(hints, "count") == (chunkenc._DOD, 0)
    cols = realistic(seed=2)
    cols[3]["count"][100:] = [v + 1e6 for v in cols[3]["count"][100:]]
    close_with(hints, cols)
    assert remembered(hints, "count") == (chunkenc._DOD, 4)
    assert (hints.searched, hints.reused) == (1, 1)


def test_other_metrics_than_before_are_searched_again():
    hints = chunkstore.CloseHints()
    close_with(hints, realistic(seed=1))
    cols = realistic(seed=2)
    del cols[3]["bits"]
    close_with(hints, cols)
    assert (hints.searched, hints.reused) == (2, 0)


def test_every_refresh_th_chunk_is_searched_afresh():
    hints = chunkstore.CloseHints()
    for seed in range(2 * chunkstore.CloseHints.REFRESH + 3):
        close_with(hints, realistic(n=128, seed=seed % 2))
    assert hints.searched == 3  # the first, and after each REFRESH reuses
    assert hints.reused == 2 * chunkstore.CloseHints.REFRESH


def test_hints_remember_at_most_max_sensors():
    class Small(chunkstore.CloseHints):
        MAX_SENSORS = 3

    hints = Small()
    cols = realistic(n=64)
    for s in range(5):
        head(*cols, sensor=f"s-{s}").close(True, hints)
    assert len(hints) == 3
    head(*cols, sensor="s-4").close(True, hints)
    head(*cols, sensor="s-0").close(True, hints)  # forgotten: searched again
    assert (hints.searched, hints.reused) == (6, 1)


def test_close_heads_with_hints_closes_each_as_head_close_does():
    hints, alone = chunkstore.CloseHints(), chunkstore.CloseHints()
    heads = [head(*realistic(n=200, seed=s), sensor=f"s-{s % 2}") for s in range(4)]
    rows = chunkstore.close_heads(heads, True, hints)
    assert [r.blob for r in rows] == [h.close(True, alone).blob for h in heads]
    assert (hints.searched, hints.reused) == (2, 2)


def test_a_head_longer_than_search_rows_is_searched_on_its_first_rows():
    """A fast sensor's head (4,096 rows) is searched on its first SEARCH_ROWS rows and those
    choices are checked on all of it: the values come back exactly, the choices are the
    prefix's, and the next head reuses them."""
    n = chunkstore.CloseHints.SEARCH_ROWS
    hints = chunkstore.CloseHints()
    cols = realistic(n=4 * n, seed=1)
    close_with(hints, cols)
    assert (hints.searched, hints.reused) == (1, 0)
    prefix = chunkstore.CloseHints()
    seqs, ts, received, metrics = cols
    close_with(prefix, (seqs[:n], ts[:n], received[:n], {k: v[:n] for k, v in metrics.items()}))
    assert hints._last["s-1"][0] == prefix._last["s-1"][0]
    close_with(hints, realistic(n=4 * n, seed=2))
    assert (hints.searched, hints.reused) == (1, 1)


def test_a_head_whose_later_rows_break_the_prefixs_choices_is_searched_in_full():
    """A value with more decimals past the first SEARCH_ROWS rows: the prefix's scale does not
    hold, so the whole head is searched: the full search's bytes (fails if the prefix's
    choices were kept unchecked: 21.005 would come back rounded)."""
    n = chunkstore.CloseHints.SEARCH_ROWS
    hints = chunkstore.CloseHints()
    cols = realistic(n=2 * n, seed=3)
    cols[3]["temp"][n + 10] = 21.005
    row = close_with(hints, cols)
    assert row.blob == chunkstore_blob(cols)
    assert (hints.searched, hints.reused) == (1, 0)
