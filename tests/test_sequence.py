"""The sequence tracker's rules, case by case, and exact accounts under any faults.

Named cases read like the rules in docs/SEQUENCE.md; the hypothesis tests
check the accounts against a ground truth computed independently from the
arrivals (lost = missing in [min, max] received, reordered = unique arrivals
after a higher seq), with and without a snapshot/restore in the middle.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from collector.sequence import (
    _SLACK,
    MAX_DROPOUT,
    MAX_MISORDER,
    MIN_SEQUENTIAL,
    WINDOW,
    Duplicate,
    First,
    Gap,
    GapRecord,
    InOrder,
    Late,
    Reordered,
    Restart,
    SensorTracker,
    Stray,
)

M = 2**32
NOW = 1000.0


def feed(t: SensorTracker, boot, seqs, now=NOW):
    return [t.observe(boot, s, now) for s in seqs]


def counters(t: SensorTracker) -> tuple[int, int, int, int, int]:
    return (t.datagrams, t.lost, t.duplicates, t.reordered, t.restarts)


def gaps(t: SensorTracker) -> list[tuple[int, int, int, int]]:
    return [(g.stream, g.first_seq, g.last_seq, g.missing) for g in t.open_gaps()]


def roundtrip(t: SensorTracker, db: dict) -> SensorTracker:
    """What the collector does: apply the gap changes, store the snapshot as JSON, restore."""
    apply(db, t.pop_gap_changes())
    return SensorTracker.restore(json.loads(json.dumps(t.snapshot())), list(db.values()))


def apply(db: dict, changes: dict) -> None:
    """What collector/store.py does with a change log: a piece of a written row
    copies that row's detected_at (origin), then deletes, then the rest."""
    resolved = {}
    for key, rec in changes.items():
        if rec is not None and rec.detected_at is None:
            stored = db[(rec.stream, rec.origin)]  # a KeyError: an origin never written
            rec = replace(rec, detected_at=stored.detected_at, origin=None)
        resolved[key] = rec
    for key, rec in resolved.items():
        if rec is None:
            del db[key]  # a KeyError here would mean a delete of a row never written
    for key, rec in resolved.items():
        if rec is not None:
            db[key] = rec


def test_constants_are_consistent():
    assert WINDOW >= 1024 and MAX_MISORDER == WINDOW and MIN_SEQUENTIAL == 2
    assert WINDOW < MAX_DROPOUT < 2**31


# --- in order, gaps, late fills ---------------------------------------------


def test_first_datagram_starts_the_accounts_without_a_gap_before_it():
    t = SensorTracker()
    assert t.observe(None, 1_000_000, NOW) == First()
    assert t.observe(None, 1_000_001, NOW) == InOrder()
    assert counters(t) == (2, 0, 0, 0, 0)
    assert t.stream == 0 and t.open_gaps() == []


def test_in_order():
    t = SensorTracker()
    assert feed(t, 3, range(5)) == [First()] + [InOrder()] * 4
    assert counters(t) == (5, 0, 0, 0, 0)


def test_gap():
    t = SensorTracker()
    feed(t, None, [4, 5])
    assert t.observe(None, 9, 1234.5) == Gap(6, 8)
    assert counters(t) == (3, 3, 0, 0, 0)
    assert t.open_gaps() == [GapRecord(0, None, 6, 8, 3, 1234.5)]


def test_late_fill_shrinks_the_front_back_and_splits_the_middle():
    t = SensorTracker()
    feed(t, None, [0, 10])  # gap 1..9
    assert t.observe(None, 1, NOW) == Late(1)
    assert gaps(t) == [(0, 2, 9, 8)]
    assert t.observe(None, 9, NOW) == Late(9)
    assert gaps(t) == [(0, 2, 8, 7)]
    assert t.observe(None, 5, NOW) == Late(5)
    assert gaps(t) == [(0, 2, 4, 3), (0, 6, 8, 3)]
    assert feed(t, None, [2, 3, 4]) == [Late(2), Late(3), Late(4)]
    assert gaps(t) == [(0, 6, 8, 3)]
    assert counters(t) == (8, 3, 0, 6, 0)
    assert [g.detected_at for g in t.open_gaps()] == [NOW]  # a shrunk gap keeps its detection time


def test_duplicate_in_window():
    t = SensorTracker()
    feed(t, 1, [100, 101])
    assert t.observe(1, 101, NOW) == Duplicate()  # the highest
    assert t.observe(1, 100, NOW) == Duplicate()  # the base
    feed(t, 1, range(102, 100 + WINDOW + 1))
    assert t.observe(1, 100, NOW) == Duplicate()  # exactly WINDOW behind the highest
    assert counters(t) == (WINDOW + 1, 0, 3, 0, 0)


def test_duplicate_of_a_very_old_seq_is_kept_as_a_stray_not_dropped():
    # Beyond the window, a seq in no gap cannot be told from the first
    # datagram of a seq reset: it is stored (Stray), and without a sequential
    # follower it never enters the accounts.
    t = SensorTracker()
    feed(t, None, range(0, 10_000))
    assert t.observe(None, 5, NOW) == Stray(5)
    assert t.observe(None, 10_000, NOW) == InOrder()
    assert counters(t) == (10_002, 0, 0, 0, 0)
    assert t.stream == 0


def test_a_seq_older_than_the_window_is_a_stray_even_in_a_gap():
    # A gap that left the window is final: it stays lost, its row stays, and
    # the tracker no longer remembers it (memory per sensor is the window's).
    t = SensorTracker()
    feed(t, None, [0, 2])  # gap 1..1
    feed(t, None, range(3, 2 + WINDOW))
    assert t.open_gaps() == [GapRecord(0, None, 1, 1, 1, NOW)]  # still in the window
    assert t.observe(None, 2 + WINDOW, NOW) == InOrder()
    assert t.open_gaps() == []  # 1 is now WINDOW + 1 behind the highest
    assert t.observe(None, 1, NOW) == Stray(1)
    assert t.lost == 1 and t.reordered == 0
    assert t.pop_gap_changes() == {(0, 1): GapRecord(0, None, 1, 1, 1, NOW)}  # written, never deleted


# --- wraparound ----------------------------------------------------------------


def test_wraparound_is_in_order():
    t = SensorTracker()
    assert feed(t, None, [M - 2, M - 1, 0, 1]) == [First(), InOrder(), InOrder(), InOrder()]
    assert counters(t) == (4, 0, 0, 0, 0)
    assert t.observe(None, M - 1, NOW) == Duplicate()


def test_gap_across_the_wrap():
    t = SensorTracker()
    feed(t, 9, [M - 3])
    assert t.observe(9, 1, NOW) == Gap(M - 2, 0)
    assert gaps(t) == [(0, M - 2, 0, 3)]
    assert t.observe(9, M - 1, NOW) == Late(M - 1)
    assert gaps(t) == [(0, M - 2, M - 2, 1), (0, 0, 0, 1)]
    assert t.lost == 2


# --- restarts ------------------------------------------------------------------


def test_boot_change_is_a_restart_and_old_gaps_stay_lost():
    t = SensorTracker()
    feed(t, 1, [0, 1, 5])  # stream 0 loses 2..4
    assert t.observe(2, 0, NOW) == Restart("boot")
    assert t.stream == 1
    assert t.observe(2, 1, NOW) == InOrder()  # no gap invented across streams
    assert counters(t) == (5, 3, 0, 0, 1)
    assert gaps(t) == [(0, 2, 4, 3)]  # the previous stream's gap is still remembered
    assert t.observe(3, 7, NOW) == Restart("boot")  # a second restart forgets stream 0's gaps
    assert t.stream == 2 and t.open_gaps() == [] and t.lost == 3 and t.restarts == 2
    assert t.observe(1, 3, NOW) == Restart("boot")  # boot 1 is two streams back: a new stream
    assert t.lost == 3


def test_stragglers_of_the_previous_boot_are_accounted_to_its_stream():
    t = SensorTracker()
    feed(t, 1, [0, 1, 5])
    assert t.observe(2, 0, NOW) == Restart("boot")
    assert t.observe(1, 3, NOW) == Late(3)  # fills the old stream's gap
    assert t.observe(1, 1, NOW) == Duplicate()
    assert t.observe(1, 8, NOW) == Reordered(8)  # its tail, sent before the reboot
    assert t.observe(2, 1, NOW) == InOrder()  # the new stream never noticed
    assert gaps(t) == [(0, 2, 2, 1), (0, 4, 4, 1), (0, 6, 7, 2)]
    assert counters(t) == (7, 4, 1, 2, 1)
    assert t.stream == 1


def test_previous_boot_takes_stragglers_only_while_the_new_stream_is_young():
    t = SensorTracker()
    feed(t, 1, range(0, 50))
    feed(t, 2, range(0, WINDOW))
    assert t.observe(1, 50, NOW) == Reordered(50)  # the new stream is WINDOW - 1 long: still young
    feed(t, 2, [WINDOW])
    assert t.observe(1, 10, NOW) == Restart("boot")  # boot 1 reused: a new run, not old duplicates
    assert t.observe(1, 11, NOW) == InOrder()
    assert t.stream == 2 and t.restarts == 2 and t.duplicates == 0 and t.reordered == 1


@pytest.mark.parametrize("boot", [None, 5])
def test_seq_reset_without_boot_change_is_a_restart_after_two_sequential(boot):
    t = SensorTracker()
    feed(t, boot, range(20_000, 30_000))
    feed(t, boot, [30_005])  # a gap of 5 that stays lost
    assert t.observe(boot, 0, NOW) == Stray(0)  # RFC 3550 probation: not yet believed
    assert t.observe(boot, 1, NOW) == Restart("seq_jump")
    assert t.observe(boot, 2, NOW) == InOrder()
    assert t.stream == 1
    assert counters(t) == (10_004, 5, 0, 0, 1)
    assert t.observe(boot, 0, NOW) == Duplicate()  # the Stray became the new stream's base


def test_wild_single_jump_is_not_believed():
    t = SensorTracker()
    feed(t, None, [100, 101])
    assert t.observe(None, 3_000_000, NOW) == Stray(3_000_000)
    assert feed(t, None, [102, 103]) == [InOrder(), InOrder()]
    assert counters(t) == (5, 0, 0, 0, 0) and t.stream == 0 and t.open_gaps() == []
    # RFC 3550 keeps bad_seq across in-order datagrams: the follower still confirms.
    assert t.observe(None, 3_000_001, NOW) == Restart("seq_jump")
    assert t.observe(None, 3_000_000, NOW) == Duplicate()


def test_forward_jump_limit_is_max_dropout():
    t = SensorTracker()
    feed(t, None, [0])
    # RFC 3550: a forward step (udelta) below MAX_DROPOUT is in order with a gap.
    assert t.observe(None, MAX_DROPOUT - 1, NOW) == Gap(1, MAX_DROPOUT - 2)
    assert t.observe(None, 2 * MAX_DROPOUT - 1, NOW) == Stray(2 * MAX_DROPOUT - 1)
    assert t.lost == MAX_DROPOUT - 2


# --- the stream's base ----------------------------------------------------------


def test_reorder_before_stream_start_extends_the_base_down():
    t = SensorTracker()
    feed(t, None, [10, 11])
    assert t.observe(None, 7, NOW) == Reordered(7)
    assert gaps(t) == [(0, 8, 9, 2)]
    assert t.observe(None, 9, NOW) == Late(9)
    assert t.observe(None, 6, NOW) == Reordered(6)  # adjacent: no gap
    assert t.observe(None, 7, NOW) == Duplicate()
    assert counters(t) == (5, 1, 1, 3, 0)
    assert gaps(t) == [(0, 8, 8, 1)]


def test_reorder_before_stream_start_across_the_wrap():
    t = SensorTracker()
    feed(t, None, [1])
    assert t.observe(None, M - 2, NOW) == Reordered(M - 2)
    assert gaps(t) == [(0, M - 1, 0, 2)]
    assert t.lost == 2


def test_below_the_base_beyond_the_window_is_a_stray():
    t = SensorTracker()
    feed(t, None, range(10_000, 10_000 + WINDOW + 1))
    assert t.observe(None, 9_999, NOW) == Stray(9_999)  # WINDOW + 1 behind the highest
    assert t.lost == 0 and t.reordered == 0


# --- the gap change log -------------------------------------------------------------


def test_pop_gap_changes_exact_contents():
    t = SensorTracker()
    db: dict = {}
    feed(t, 4, [0, 10], now=1.0)  # gap 1..9
    assert t.pop_gap_changes() == {(0, 1): GapRecord(0, 4, 1, 9, 9, 1.0)}
    assert t.pop_gap_changes() == {}
    apply(db, {(0, 1): GapRecord(0, 4, 1, 9, 9, 1.0)})
    # Pieces of a written row: the tracker no longer holds its detection time,
    # so they name the row they come from (origin) and the writer copies it.
    t.observe(4, 1, 2.0)  # front: the key moves
    changes = t.pop_gap_changes()
    assert changes == {(0, 1): None, (0, 2): GapRecord(0, 4, 2, 9, 8, None, 1)}
    apply(db, changes)
    t.observe(4, 9, 2.0)  # back: replaced in place
    changes = t.pop_gap_changes()
    assert changes == {(0, 2): GapRecord(0, 4, 2, 8, 7, None, 2)}
    apply(db, changes)
    t.observe(4, 5, 2.0)  # split
    changes = t.pop_gap_changes()
    assert changes == {(0, 2): GapRecord(0, 4, 2, 4, 3, None, 2), (0, 6): GapRecord(0, 4, 6, 8, 3, None, 2)}
    apply(db, changes)
    # Created and filled between two pops: never written, so nothing to delete.
    feed(t, 4, [13, 11, 12], now=3.0)
    assert t.pop_gap_changes() == {}
    # A key that moves twice between pops nets out to one delete and one insert,
    # still naming the row that was written.
    feed(t, 4, [6, 7], now=3.0)
    changes = t.pop_gap_changes()
    assert changes == {(0, 6): None, (0, 8): GapRecord(0, 4, 8, 8, 1, None, 6)}
    apply(db, changes)
    assert db == {(0, 2): GapRecord(0, 4, 2, 4, 3, 1.0), (0, 8): GapRecord(0, 4, 8, 8, 1, 1.0)}
    # A fresh gap shrunk before it was written carries its own time.
    feed(t, 4, [20, 15], now=4.0)
    assert t.pop_gap_changes() == {(0, 14): GapRecord(0, 4, 14, 14, 1, 4.0), (0, 16): GapRecord(0, 4, 16, 19, 4, 4.0)}
    t.observe(5, 0, 4.0)  # restart: no change to the old rows
    assert t.pop_gap_changes() == {}
    t.observe(5, 3, 5.0)
    assert t.pop_gap_changes() == {(1, 1): GapRecord(1, 5, 1, 2, 2, 5.0)}


def test_gaps_behind_the_window_are_final_and_the_state_stays_the_window():
    # Every odd seq missing: each gap is one seq.  Only the gaps reaching into
    # the window are remembered; the others stay lost, with their rows.
    t = SensorTracker()
    db: dict = {}
    top = 6 * WINDOW
    seqs = range(0, top + 1, 2)
    feed(t, None, seqs[:2])
    apply(db, t.pop_gap_changes())
    assert list(db) == [(0, 1)]
    feed(t, None, seqs[2:])
    in_window = list(range(top - WINDOW + 1, top, 2))
    assert len(in_window) == WINDOW // 2
    assert [g.first_seq for g in t.open_gaps()] == in_window
    assert t.lost == top // 2
    changes = t.pop_gap_changes()
    assert None not in changes.values()  # a final gap's row is never deleted
    apply(db, changes)
    assert len(db) == top // 2
    assert t._cur.miss.bit_length() <= WINDOW + _SLACK  # the whole gap state: one window's bitmap
    assert t.observe(None, top - WINDOW - 1, NOW) == Stray(top - WINDOW - 1)  # just behind: final
    assert t.observe(None, top - WINDOW + 1, NOW) == Late(top - WINDOW + 1)  # the lowest in the window
    assert t.observe(None, top - 1, NOW) == Late(top - 1)
    assert t.lost == top // 2 - 2
    changes = t.pop_gap_changes()
    assert changes == {(0, top - WINDOW + 1): None, (0, top - 1): None}
    apply(db, changes)
    # Restore recognises the final rows and leaves them alone.
    t2 = roundtrip(t, db)
    assert t2.open_gaps() == t.open_gaps()
    assert t2.observe(None, 3, NOW) == Stray(3)
    assert t2.observe(None, top - 3, NOW) == t.observe(None, top - 3, NOW) == Late(top - 3)


def test_a_long_gap_reaching_into_the_window_keeps_its_row():
    # The run began far below the window: fills inside the window shrink or
    # split the row keyed by its first seq, which the window's edge remembers.
    t = SensorTracker()
    db: dict = {}
    feed(t, 1, [0, 3 * WINDOW], now=1.0)  # gap 1 .. 3W-1
    apply(db, t.pop_gap_changes())
    assert db == {(0, 1): GapRecord(0, 1, 1, 3 * WINDOW - 1, 3 * WINDOW - 1, 1.0)}
    t2 = roundtrip(t, db)
    for tr in (t, t2):
        assert tr.observe(1, 3 * WINDOW - 1, 2.0) == Late(3 * WINDOW - 1)  # back
        assert tr.observe(1, 2 * WINDOW, 2.0) == Late(2 * WINDOW)  # the window's lowest: split
        assert tr.observe(1, 2 * WINDOW - 1, 2.0) == Stray(2 * WINDOW - 1)  # behind the window
        assert tr.lost == 3 * WINDOW - 3
    assert (
        t.pop_gap_changes()
        == t2.pop_gap_changes()
        == {
            (0, 1): GapRecord(0, 1, 1, 2 * WINDOW - 1, 2 * WINDOW - 1, None, 1),
            (0, 2 * WINDOW + 1): GapRecord(0, 1, 2 * WINDOW + 1, 3 * WINDOW - 2, WINDOW - 2, None, 1),
        }
    )
    feed(t, 1, [3 * WINDOW + 10])
    assert gaps(t) == [(0, 2 * WINDOW + 1, 3 * WINDOW - 2, WINDOW - 2), (0, 3 * WINDOW + 1, 3 * WINDOW + 9, 9)]
    feed(t, 1, [3 * WINDOW + 11 + WINDOW // 2])
    # The window slid by half: the remaining run is still keyed by its first seq.
    assert gaps(t)[0] == (0, 2 * WINDOW + 1, 3 * WINDOW - 2, WINDOW - 2)
    assert t.observe(1, 3 * WINDOW - 2, 3.0) == Late(3 * WINDOW - 2)
    assert t.pop_gap_changes()[(0, 2 * WINDOW + 1)].last_seq == 3 * WINDOW - 3


# --- snapshot / restore ---------------------------------------------------------


def test_snapshot_restore_mid_stream_behaves_identically():
    t = SensorTracker()
    db: dict = {}
    feed(t, 8, [M - 5, M - 4, M - 1, 2, 3])  # gaps M-3..M-2 and 0..1, across the wrap
    feed(t, 8, [M - 2])
    t2 = roundtrip(t, db)
    assert json.loads(json.dumps(t2.snapshot())) == json.loads(json.dumps(t.snapshot()))
    assert t2.open_gaps() == t.open_gaps()
    assert counters(t2) == counters(t)
    tail = [4, 3, M - 4, M - 3, 0, 9, 1, 1, 7, 20]
    want = [
        InOrder(),
        Duplicate(),
        Duplicate(),
        Late(M - 3),
        Late(0),
        Gap(5, 8),
        Late(1),
        Duplicate(),
        Late(7),
        Gap(10, 19),
    ]  # no gap invented at the restore point, duplicates still caught
    assert feed(t2, 8, tail) == feed(t, 8, tail) == want
    assert feed(t2, 8, [5, 6]) == [Late(5), Late(6)]
    assert feed(t, 8, [5, 6]) == [Late(5), Late(6)]
    assert t2.pop_gap_changes() == t.pop_gap_changes()
    assert t2.open_gaps() == t.open_gaps()
    assert counters(t2) == counters(t) == (15, 11, 3, 7, 0)


def test_restore_keeps_probation_and_the_previous_boot():
    t = SensorTracker()
    db: dict = {}
    feed(t, 1, [0, 3])
    feed(t, 2, [50, 51])
    feed(t, 2, [9_000_000])  # a Stray: the follower must still confirm after restore
    t2 = roundtrip(t, db)
    assert t2.observe(1, 2, NOW) == Late(2)  # the previous boot's gap survived the restore
    assert t2.observe(2, 9_000_001, NOW) == Restart("seq_jump")
    assert t2.stream == 2 and t2.restarts == 2


def test_restore_ignores_rows_of_older_streams():
    t = SensorTracker()
    db: dict = {}
    feed(t, 1, [0, 3])
    feed(t, 2, [0, 3])
    feed(t, 3, [0, 3])  # stream 0's gap is forgotten; its row stays final
    t2 = roundtrip(t, db)
    assert sorted(db) == [(0, 1), (1, 1), (2, 1)]
    assert gaps(t2) == [(1, 1, 2, 2), (2, 1, 2, 2)]
    assert t2.observe(1, 1, NOW) == Restart("boot")


def test_restore_of_an_empty_tracker():
    t2 = SensorTracker.restore(json.loads(json.dumps(SensorTracker().snapshot())), [])
    assert t2.observe(None, 5, NOW) == First()


def test_restore_rejects_an_unknown_snapshot_version():
    with pytest.raises(ValueError, match="version"):
        SensorTracker.restore({"v": 99}, [])


# --- properties -------------------------------------------------------------------


@st.composite
def faulty_stream(draw, max_len=150):
    """Arrivals (extended seqs) of one stream with drops, duplicates and bounded reordering.

    Hypothesis draws the shape (start seq, length, burst losses, fault rates);
    a drawn Random makes the per-datagram choices, which keeps generation fast.
    """
    start = draw(st.one_of(st.integers(0, M - 1), st.integers(M - 300, M - 1), st.integers(0, 300)))
    n = draw(st.integers(1, max_len))
    bursts = draw(st.dictionaries(st.integers(1, n), st.integers(2, 3 * WINDOW), max_size=3))
    loss, dup = draw(st.sampled_from([0.0, 0.05, 0.3])), draw(st.sampled_from([0.0, 0.05, 0.3]))
    reorder, depth = draw(st.sampled_from([0.0, 0.1, 0.5])), draw(st.sampled_from([1, 3, 40]))
    rnd = draw(st.randoms(use_true_random=False))
    keyed = []
    ext = start
    for pos in range(n):
        ext += bursts.get(pos, 1) if pos else 0
        if rnd.random() < loss:
            continue
        copies = 1 + (rnd.random() < dup) + (rnd.random() < dup / 3)
        for _ in range(copies):
            delay = rnd.randint(1, depth) if rnd.random() < reorder else 0
            keyed.append((pos + delay, len(keyed), ext))
    arrivals = [e for _, _, e in sorted(keyed)]
    # Stay in the regime where every arrival is accounted: within WINDOW of
    # the highest at that time (older ones are Strays by design, see
    # test_window_semantics_against_a_reference_model).  Others are lost on the way.
    kept, hi = [], None
    for e in arrivals:
        if hi is not None and e < hi - WINDOW:
            continue
        kept.append(e)
        hi = e if hi is None else max(hi, e)
    assume(kept)
    return kept


def truth(arrivals: list[int]) -> dict:
    seen: set[int] = set()
    hi = None
    reordered = 0
    for ext in arrivals:
        if ext not in seen and hi is not None and ext < hi:
            reordered += 1
        seen.add(ext)
        hi = ext if hi is None else max(hi, ext)
    received = sorted(seen)
    runs = [(a + 1, b - 1) for a, b in zip(received, received[1:]) if b > a + 1]
    return {
        "datagrams": len(seen),
        "duplicates": len(arrivals) - len(seen),
        "lost": received[-1] - received[0] + 1 - len(seen),
        "reordered": reordered,
        "gaps": [(a % M, b % M, b - a + 1) for a, b in runs],
        # the gaps the tracker still remembers: those reaching into the window
        "open": [(a % M, b % M, b - a + 1) for a, b in runs if b >= received[-1] - WINDOW],
    }


def check(t: SensorTracker, want: dict, db: dict, stream: int = 0) -> None:
    assert (t.datagrams, t.duplicates, t.lost, t.reordered, t.restarts) == (
        want["datagrams"],
        want["duplicates"],
        want["lost"],
        want["reordered"],
        0,
    )
    assert [(g.first_seq, g.last_seq, g.missing) for g in t.open_gaps()] == want["open"]
    apply(db, t.pop_gap_changes())
    assert sorted((k[1], r.last_seq, r.missing) for k, r in db.items()) == sorted(want["gaps"])
    assert all(k == (r.stream, r.first_seq) for k, r in db.items())


def check_events(events: list, arrivals: list[int]) -> None:
    assert not any(isinstance(e, (Stray, Restart)) for e in events)
    assert type(events[0]) is First
    seen = set()
    for e, ext in zip(events, arrivals):
        assert (type(e) is Duplicate) == (ext in seen)
        seen.add(ext)


# Sized so the whole file runs in ~5 s on an idle core.
PROPS = settings(max_examples=200)
FEWER = settings(PROPS, max_examples=100)


@PROPS
@given(arrivals=faulty_stream(), boot=st.one_of(st.none(), st.integers(0, M - 1)))
def test_accounts_equal_the_ground_truth(arrivals, boot):
    t = SensorTracker()
    events = [t.observe(boot, ext % M, float(i)) for i, ext in enumerate(arrivals)]
    check_events(events, arrivals)
    check(t, truth(arrivals), {})


@PROPS
@given(arrivals=faulty_stream(), cut=st.floats(0.0, 1.0), boot=st.one_of(st.none(), st.integers(0, M - 1)))
def test_accounts_survive_snapshot_restore_at_any_point(arrivals, cut, boot):
    k = int(cut * len(arrivals))
    ref, t, db = SensorTracker(), SensorTracker(), {}
    for ext in arrivals[:k]:
        assert t.observe(boot, ext % M, 1.0) == ref.observe(boot, ext % M, 1.0)
    t = roundtrip(t, db)
    ref.pop_gap_changes()
    for ext in arrivals[k:]:
        assert t.observe(boot, ext % M, 2.0) == ref.observe(boot, ext % M, 2.0)
    assert t.open_gaps() == ref.open_gaps()
    check(t, truth(arrivals), db)


@FEWER
@given(streams=st.lists(faulty_stream(max_len=40), min_size=1, max_size=4))
def test_accounts_over_boot_restarts(streams):
    t, db = SensorTracker(), {}
    want_lost = 0
    for boot, arrivals in enumerate(streams):
        events = [t.observe(boot, ext % M, 0.0) for ext in arrivals]
        assert type(events[0]) is (First if boot == 0 else Restart)
        want_lost += truth(arrivals)["lost"]
    apply(db, t.pop_gap_changes())
    wants = [truth(a) for a in streams]
    assert t.restarts == t.stream == len(streams) - 1
    assert t.datagrams == sum(w["datagrams"] for w in wants)
    assert t.duplicates == sum(w["duplicates"] for w in wants)
    assert t.reordered == sum(w["reordered"] for w in wants)
    assert t.lost == want_lost
    # Every stream's gaps have rows (old ones final); the last two are remembered.
    assert sorted((k[0], k[1], r.last_seq) for k, r in db.items()) == sorted(
        (i, a, b) for i, w in enumerate(wants) for a, b, _ in w["gaps"]
    )
    assert [(g.stream, g.first_seq) for g in t.open_gaps()] == [
        (i, a) for i, w in enumerate(wants) if i >= len(wants) - 2 for a, _, _ in w["open"]
    ]


@FEWER
@given(
    old=faulty_stream(max_len=60),
    new=faulty_stream(max_len=60),
    late=st.integers(0, 8),
    where=st.randoms(use_true_random=False),
    boots=st.sampled_from([(1, 2), (None, 7), (7, None)]),
)
def test_stragglers_across_a_boot_restart(old, new, late, where, boots):
    """The old boot's last arrivals overtaken by the new boot's first ones still count to the old stream."""
    late = min(late, len(old) - 1)
    head, tail = old[: len(old) - late], old[len(old) - late :]
    arrivals = [(boots[0], e) for e in head] + [(boots[1], e) for e in new]
    # Each straggler lands somewhere after the new stream's first datagram;
    # the old stream's own order is kept (it was drawn inside the exact regime).
    # It stays a straggler while the new stream spans less than WINDOW seqs.
    young = next((j for j in range(1, len(new) + 1) if max(new[:j]) - min(new[:j]) >= WINDOW), len(new) + 1) - 1
    spots = sorted(where.randint(len(head) + 1, len(head) + young) for _ in tail)
    for k, (spot, e) in enumerate(zip(spots, tail)):
        arrivals.insert(spot + k, (boots[0], e))
    t, db = SensorTracker(), {}
    events = [t.observe(b, e % M, 0.0) for b, e in arrivals]
    assert events.count(Restart("boot")) == 1 and not any(type(e) is Stray for e in events)
    apply(db, t.pop_gap_changes())
    # Ground truth per stream; a straggler counts as reordered even above its stream's highest.
    began = arrivals.index((boots[1], new[0]))
    wants = []
    for boot in boots:
        mine = [(i, e) for i, (b, e) in enumerate(arrivals) if b == boot]
        w = truth([e for _, e in mine])
        seen, hi = set(), None
        w["reordered"] = 0
        for i, e in mine:
            if e not in seen and hi is not None and (e < hi or (boot == boots[0] and i > began)):
                w["reordered"] += 1
            seen.add(e)
            hi = e if hi is None else max(hi, e)
        wants.append(w)
    assert (t.datagrams, t.duplicates, t.lost, t.reordered, t.restarts, t.stream) == (
        sum(w["datagrams"] for w in wants),
        sum(w["duplicates"] for w in wants),
        sum(w["lost"] for w in wants),
        sum(w["reordered"] for w in wants),
        1,
        1,
    )
    assert [(g.stream, g.first_seq, g.last_seq, g.missing) for g in t.open_gaps()] == [
        (i, a, b, n) for i, w in enumerate(wants) for a, b, n in w["open"]
    ]
    assert sorted((k, r.last_seq, r.boot) for k, r in db.items()) == sorted(
        ((i, a), b, boots[i]) for i, w in enumerate(wants) for a, b, _ in w["gaps"]
    )


# --- the window semantics against a reference model --------------------------------


class WindowModel:
    """The tracker's rules for one boot, written with sets instead of bitmaps.

    Extended seqs; forward steps stay below MAX_DROPOUT.  Per stream, the
    received seqs and [base, max]; an arrival within WINDOW behind the highest
    is a duplicate, a late fill or below the base; an older one is a Stray
    (RFC 3550 probation: its seq + 1 next confirms a restart).  Gap rows are
    the runs of [base, max] not received, each seq stamped with the time it
    was found missing.
    """

    def __init__(self) -> None:
        self.streams: list[dict] = []
        self.bad = None
        self.duplicates = self.reordered = self.datagrams = 0

    def observe(self, ext: int, now: float):
        seq = ext % M
        if not self.streams:
            self.streams.append({"got": {ext}, "base": ext, "max": ext, "found": {}})
            self.datagrams += 1
            return First()
        s = self.streams[-1]
        if ext == s["max"] or (s["max"] - WINDOW <= ext < s["max"] and ext >= s["base"] and ext in s["got"]):
            self.duplicates += 1
            return Duplicate()
        self.datagrams += 1
        if ext > s["max"]:
            for k in range(s["max"] + 1, ext):
                s["found"][k] = now
            first, s["max"] = s["max"] + 1, ext
            s["got"].add(ext)
            return InOrder() if ext == first else Gap(first % M, (ext - 1) % M)
        if ext >= s["max"] - WINDOW:
            self.reordered += 1
            s["got"].add(ext)
            if ext >= s["base"]:
                return Late(seq)
            for k in range(ext + 1, s["base"]):
                s["found"][k] = now
            s["base"] = ext
            return Reordered(seq)
        if seq == self.bad:
            self.bad = None
            self.streams.append({"got": {ext - 1, ext}, "base": ext - 1, "max": ext, "found": {}})
            return Restart("seq_jump")
        self.bad = (seq + 1) % M
        return Stray(seq)

    def lost(self) -> int:
        return sum(s["max"] - s["base"] + 1 - len(s["got"]) for s in self.streams)

    def rows(self, boot) -> dict:
        out = {}
        for i, s in enumerate(self.streams):
            missing = sorted(set(range(s["base"], s["max"] + 1)) - s["got"])
            runs: list[list[int]] = []
            for k in missing:
                if runs and runs[-1][1] == k - 1:
                    runs[-1][1] = k
                else:
                    runs.append([k, k])
            for a, b in runs:
                when = {s["found"][k] for k in range(a, b + 1)}
                assert len(when) == 1  # a run is part of one gap, found at one time
                out[(i, a % M)] = GapRecord(i, boot, a % M, b % M, b - a + 1, when.pop())
        return out


@st.composite
def window_arrivals(draw):
    """A stream with losses and bursts where some datagrams arrive very late
    (beyond the window, in pairs: a seq-jump restart) or are replayed later."""
    start = draw(st.one_of(st.integers(0, M - 1), st.integers(M - 300, M - 1)))
    n = draw(st.integers(1, 120))
    bursts = draw(st.dictionaries(st.integers(1, n), st.integers(2, 2 * WINDOW + 10), max_size=4))
    loss = draw(st.sampled_from([0.0, 0.1, 0.4]))
    late = draw(st.sampled_from([0.0, 0.05, 0.2]))
    rnd = draw(st.randoms(use_true_random=False))
    keyed = []
    ext = start
    for pos in range(n):
        ext += bursts.get(pos, 1) if pos else 0
        if rnd.random() < loss:
            continue
        delay = rnd.randint(1, n) if pos and rnd.random() < late else 0
        keyed.append((pos + delay, len(keyed), ext))
        if rnd.random() < late / 2:  # a replay, any time later
            keyed.append((pos + rnd.randint(0, n), len(keyed), ext))
    assume(keyed)
    return [e for _, _, e in sorted(keyed)]


@PROPS
@given(
    arrivals=window_arrivals(),
    cuts=st.lists(st.floats(0.0, 1.0), max_size=3),
    boot=st.one_of(st.none(), st.integers(0, M - 1)),
)
def test_window_semantics_against_a_reference_model(arrivals, cuts, boot):
    """Every event, counter and gap row (with its detection time) equals the
    model's, with the tracker snapshotted and restored from its rows at any
    points, as the collector does at each flush."""
    model, t, db = WindowModel(), SensorTracker(), {}
    cut_at = {int(c * len(arrivals)) for c in cuts}
    for i, ext in enumerate(arrivals):
        if i in cut_at:
            t = roundtrip(t, db)
        assert t.observe(boot, ext % M, float(i)) == model.observe(ext, float(i))
    apply(db, t.pop_gap_changes())
    assert (t.datagrams, t.duplicates, t.reordered, t.lost, t.restarts, t.stream) == (
        model.datagrams,
        model.duplicates,
        model.reordered,
        model.lost(),
        len(model.streams) - 1,
        len(model.streams) - 1,
    )
    assert db == model.rows(boot)
    assert t._cur.miss.bit_length() <= WINDOW + _SLACK  # the state is the window, whatever happened
