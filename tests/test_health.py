"""collector/health.py: send interval, staleness and clock offset from injected times."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from collector.health import (
    INTERVAL_SAMPLES,
    OFFSET_EPOCH,
    HealthBook,
    HealthPolicy,
    SensorHealth,
    is_stale,
)


def feed(health: SensorHealth, samples):
    for stream, seq, received, ts in samples:
        health.sample(stream, seq, received, ts)
    return health


def test_nothing_learned_from_one_sample():
    h = feed(SensorHealth(), [(0, 1, 100.0, 100.0)])
    assert h.interval is None
    assert h.clock_offset == 0.0


def test_interval_of_a_steady_sensor():
    h = feed(SensorHealth(), [(0, seq, 1000.0 + 5 * seq, None) for seq in range(1, 6)])
    assert h.interval == 5.0
    assert h.clock_offset is None  # it sends no ts


def test_loss_does_not_stretch_the_interval():
    # Every other datagram lost, and some runs of five: delta seq counts them.
    seqs = [1, 3, 5, 10, 11, 16, 18]
    h = feed(SensorHealth(), [(0, s, 50.0 + 2.0 * s, None) for s in seqs])
    assert h.interval == 2.0


def test_one_late_sample_does_not_move_the_median():
    samples = [(0, s, 10.0 * s, None) for s in range(1, 8)]
    samples.insert(4, (0, 5, 10.0 * 5 + 9.0, None))  # seq 5 again, 9 s late: no advance, no ratio
    samples.append((0, 9, 10.0 * 9 + 7.0, None))  # delayed 7 s: one ratio of 13.5 among 10s
    h = feed(SensorHealth(), samples)
    assert h.interval == 10.0


def test_a_restart_starts_a_new_baseline():
    h = feed(
        SensorHealth(),
        [
            (0, 100, 0.0, None),
            (0, 101, 2.0, None),
            (1, 1, 500.0, None),  # new stream, seq back to 1: no ratio
            (1, 2, 502.0, None),
        ],
    )
    assert h.ratios == [2.0, 2.0]


def test_only_the_recent_ratios_count():
    h = SensorHealth()
    for seq in range(1, 30):
        h.sample(0, seq, 1.0 * seq, None)  # 1 s
    t = 29.0
    for seq in range(30, 30 + INTERVAL_SAMPLES):
        t += 60.0
        h.sample(0, seq, t, None)  # then once a minute
    assert h.interval == 60.0


def test_clock_offset_ignores_network_delay():
    # Sensor clock 3 s ahead; delays of 0.01-0.8 s make the raw difference jitter.
    delays = [0.3, 0.01, 0.8, 0.05, 0.2]
    h = feed(SensorHealth(), [(0, i + 1, 100.0 + i + d, 100.0 + i + 3.0) for i, d in enumerate(delays)])
    assert h.clock_offset == pytest.approx(3.0 - 0.01)


def test_clock_offset_follows_a_clock_set_right():
    h = SensorHealth()
    t = 0.0
    for seq in range(1, 20):
        t += 1.0
        h.sample(0, seq, t, t - 3600.0)  # an hour behind
    assert h.clock_offset == -3600.0
    for seq in range(20, 20 + 2 * OFFSET_EPOCH):
        t += 1.0
        h.sample(0, seq, t, t)  # NTP fixed it
    assert h.clock_offset == 0.0


def test_staleness_rule_factor_and_floor():
    policy = HealthPolicy(stale_factor=3.0, stale_floor=10.0)
    assert policy.stale_after(None) is None
    assert policy.stale_after(1.0) == 10.0  # the floor
    assert policy.stale_after(60.0) == 180.0  # three intervals
    assert not is_stale(100.0, 180.0, 280.0)  # exactly at the threshold: not yet
    assert is_stale(100.0, 180.0, 280.001)
    assert not is_stale(100.0, None, 1e12)  # not learned: never called stale


def test_policy_refuses_nonsense():
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError):
            HealthPolicy(stale_factor=bad)
    with pytest.raises(ValueError):
        HealthPolicy(clock_threshold=0)


def test_book_rows_and_counts():
    book = HealthBook(HealthPolicy(stale_factor=3.0, stale_floor=10.0, clock_threshold=2.0))
    for seq in range(1, 4):
        book.sample("fast", 0, seq, 100.0 + seq, 100.0 + seq)  # 1 s, clock right
        book.sample("slow", 0, seq, 100.0 + 30 * seq, 100.0 + 30 * seq + 5.0)  # 30 s, clock 5 s ahead
    book.sample("once", 0, 1, 100.0, None)
    assert book.row("fast") == (1.0, 10.0, 0.0, 0)
    assert book.row("slow") == (30.0, 90.0, 5.0, 1)
    assert book.row("once") == (None, None, None, None)
    assert book.row("unknown") == (None, None, None, None)
    last_seen = {"fast": 103.0, "slow": 190.0, "once": 100.0}
    assert book.count(last_seen, 113.0) == (0, 1)
    assert book.count(last_seen, 113.5) == (1, 1)  # fast: silent 10.5 s > 10 s floor
    assert book.count(last_seen, 280.5) == (2, 1)  # slow: silent 90.5 s > 3 x 30 s
    assert sorted(book.stale(last_seen, 280.5)) == ["fast", "slow"]


def test_book_primed_from_the_database_until_it_learns_anew():
    book = HealthBook()
    book.prime("s", 5.0, -1.5)
    assert book.row("s") == (5.0, 15.0, -1.5, 0)
    book.sample("s", 0, 10, 1000.0, 1000.0)
    book.sample("s", 0, 11, 1020.0, 1020.0)
    assert book.row("s")[0] == 20.0


@settings(max_examples=150, deadline=None)
@given(
    interval=st.floats(0.01, 3600),
    steps=st.lists(st.integers(1, 50), min_size=2, max_size=60),
    start=st.floats(0, 2e9),
    stream=st.integers(0, 5),
)
def test_any_loss_pattern_gives_the_true_interval(interval, steps, start, stream):
    h = SensorHealth()
    seq = 0
    for step in steps:
        seq += step
        h.sample(stream, seq, start + interval * seq, start + interval * seq)
    # Times near 2e9 s carry ~2.4e-7 s of float resolution: that bounds what any estimate can do.
    resolution = 4 * math.ulp(start + interval * seq)
    assert h.interval == pytest.approx(interval, rel=1e-6, abs=resolution)
    assert h.clock_offset == pytest.approx(0.0, abs=resolution)


@settings(max_examples=150, deadline=None)
@given(
    offset=st.floats(-1e6, 1e6),
    delays=st.lists(st.floats(0, 5), min_size=1, max_size=40),
)
def test_offset_estimate_is_offset_minus_the_smallest_recent_delay(offset, delays):
    h = SensorHealth()
    for i, d in enumerate(delays):
        h.sample(0, i + 1, 1000.0 + i + d, 1000.0 + i + offset)
    # The estimate covers the current epoch and the one before.
    kept = len(delays) % OFFSET_EPOCH
    recent = delays[-(kept + OFFSET_EPOCH) :] if len(delays) >= OFFSET_EPOCH else delays
    assert h.clock_offset == pytest.approx(offset - min(recent), abs=1e-6)
    assert h.clock_offset <= offset + 1e-6  # never claims the sensor is further ahead than it is


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 100), st.floats(0, 1e4), st.none() | st.floats(-1e4, 1e4)),
        max_size=50,
    )
)
@example([(0, 0, 0.0, None), (0, 2, 5e-324, None)])  # the step underflows to a 0.0 ratio
def test_any_sample_sequence_keeps_bounded_sane_state(samples):
    h = feed(SensorHealth(), samples)
    assert len(h.ratios) <= INTERVAL_SAMPLES
    assert all(r > 0 for r in h.ratios)
    assert h.interval is None or h.interval > 0


def test_book_hands_out_only_changed_rows_rounded_against_jitter():
    book = HealthBook(HealthPolicy(stale_factor=3.0, stale_floor=1.0, clock_threshold=2.0))
    book.sample("a", 0, 1, 100.0, 100.0)
    assert book.changed_rows(["a"]) == [(None, None, 0.0, 0, "a")]
    assert book.changed_rows(["a"]) == []  # nothing new
    book.sample("a", 0, 2, 100.5000001, 100.5)  # an interval of 0.5 s, and 0.1 us of jitter
    assert book.changed_rows(["a"]) == [(0.5, 1.5, 0.0, 0, "a")]
    book.sample("a", 0, 3, 101.0000002, 101.0)
    assert book.changed_rows(["a"]) == []  # the same rounded row
    book.forget_written()  # the flush that carried it was refused
    assert book.changed_rows(["a"]) == [(0.5, 1.5, 0.0, 0, "a")]
    book.prime("b", 60.0, 0.25)
    assert book.changed_rows(["b"]) == []  # what the database holds already
