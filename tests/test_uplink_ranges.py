"""collector/uplink/ranges.py: the central side's merged key ranges, against a set of keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.uplink import ranges
from collector.uplink.ranges import Ranges

span = st.tuples(st.integers(0, 60), st.integers(0, 8)).map(lambda t: (t[0], t[0] + t[1]))


@given(st.lists(span, max_size=30), st.lists(span, max_size=10))
def test_ranges_cover_exactly_what_was_added_merged_and_disjoint(added, probes):
    r = Ranges()
    model: set[int] = set()
    for lo, hi in added:
        r.add(lo, hi)
        model |= set(range(lo, hi + 1))
        items = r.items()
        # disjoint, sorted, never adjacent (adjacent ranges are merged)
        assert all(a[1] + 1 < b[0] for a, b in zip(items, items[1:]))
        assert {k for lo_, hi_ in items for k in range(lo_, hi_ + 1)} == model
    for lo, hi in probes:
        gaps = r.uncovered(lo, hi)
        assert {k for a, b in gaps for k in range(a, b + 1)} == set(range(lo, hi + 1)) - model
        assert all(a <= b for a, b in gaps) and all(x[1] + 1 < y[0] for x, y in zip(gaps, gaps[1:]))
    assert Ranges(r.items()).items() == r.items() and r.copy().items() == r.items()


def test_consecutive_rows_and_the_pieces_of_a_row_make_one_range():
    r = Ranges()
    for row in range(1, 5):
        r.add(*ranges.block_range(row, 0, 7, True))
    assert r.items() == [ranges.rows_range(1, 4)]
    # row 5 cut in three pieces, arriving last piece first
    r.add(*ranges.block_range(5, 200, 50, True))
    r.add(*ranges.block_range(5, 0, 100, False))
    assert len(r) == 2
    assert r.uncovered(*ranges.block_range(5, 0, 250, True)) == [ranges.block_range(5, 100, 100, False)]
    r.add(*ranges.block_range(5, 100, 100, False))
    assert r.items() == [ranges.rows_range(1, 5)]


@pytest.mark.parametrize(
    "args",
    [(0, 0, 1, True), (1, -1, 1, True), (1, 0, 0, True), (1, ranges.MAX_OFFSET, 2, False), (1 << 43, 0, 1, True)],
)
def test_a_block_outside_the_key_space_is_refused(args):
    with pytest.raises(ValueError):
        ranges.block_range(*args)


def test_keys_stay_sqlite_integers():
    assert ranges.rows_range(ranges.MAX_ROW_ID, ranges.MAX_ROW_ID)[1] == (1 << 63) - 1
