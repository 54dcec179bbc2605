"""Heads closing into chunk rows: the C-loop statistics give the loops' answers, bit for bit.

`Head.close` takes C loops over columns without NaN (no absent value) and
times that never decrease; `series_stats` and `rollup` without those hints
are the reference loops.  Every field must come back identical (not close:
the same float, -0.0 kept apart from 0.0), whatever the values and however
the times fall around minute and hour boundaries.
"""

from __future__ import annotations

import math
import struct
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from collector.chunkstore import Head, minute_runs, newest_row, rollup, series_stats

finite = st.floats(allow_nan=False, allow_infinity=False)
# Values that make ties and signed zeros likely, and sums that overflow.
values = st.one_of(finite, st.sampled_from([0.0, -0.0, 1.5, -1.5, 1e308, -1e308, 5e-324]))
# Times near minute and hour boundaries (t / 60 rounding up just below one).
boundary = st.integers(28_333_333, 28_333_400).map(lambda m: m * 60.0)
times = st.one_of(
    boundary.flatmap(lambda b: st.sampled_from([b, math.nextafter(b, 0), math.nextafter(b, math.inf), b - 1e-6])),
    st.floats(0.0, 2.0**32, exclude_max=True),
)


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def same(a, b) -> bool:
    """Equal, with floats compared bit for bit."""
    if isinstance(a, float) or isinstance(b, float):
        return type(a) is type(b) and bits(a) == bits(b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.tuples(times, st.integers(0, 20), values), min_size=1, max_size=60),
    sort=st.booleans(),
)
def test_c_loop_stats_and_rollups_equal_the_loops(rows, sort):
    if sort:
        rows.sort(key=lambda r: r[0])
    ts = [r[0] for r in rows]
    seqs = [r[1] for r in rows]
    col = [r[2] for r in rows]
    reference = series_stats(7, array("q", seqs), array("d", ts), array("d", col))
    fast = series_stats(7, seqs, ts, col, newest=newest_row(seqs, ts, 7))
    assert same(tuple(fast), tuple(reference))
    runs = minute_runs(ts)
    if sort:
        assert runs is not None
    if runs is not None:
        assert same(rollup(ts, col, runs), rollup(array("d", ts), array("d", col)))


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(times, st.integers(0, 20), st.one_of(st.none(), values), st.one_of(st.none(), values)),
        min_size=1,
        max_size=40,
    ),
    sort=st.booleans(),
)
def test_a_closed_head_has_the_reference_stats_with_and_without_absent_values(rows, sort):
    if sort:
        rows.sort(key=lambda r: r[0])
    head = Head("s", 3, 1, 0.0)
    ts = [r[0] for r in rows]
    seqs = [r[1] for r in rows]
    metrics = {"a": [r[2] for r in rows], "b": [r[3] for r in rows]}
    head.extend(seqs, ts, ts, metrics)
    row = head.close()
    for name, col in head.metrics.items():
        ref = series_stats(3, head.seqs, head.ts, col)
        if ref is None:
            assert name not in row.stats
            continue
        assert same(tuple(row.stats[name]), tuple(ref))
        assert same(row.rollups[name], rollup(head.ts, col))


def test_a_time_just_below_a_minute_whose_quotient_rounds_up_stays_in_the_loops_bucket():
    b = 28_333_350 * 60.0
    below = math.nextafter(b, 0)
    ts = [b - 30, below, b, b + 1]
    runs = minute_runs(ts)
    col = [1.0, 2.0, 3.0, 4.0]
    assert same(rollup(ts, col, runs), rollup(array("d", ts), array("d", col)))
    assert sum(j - i for _, i, j in runs) == 4
