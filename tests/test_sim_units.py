"""sensor_sim without sockets: fault decisions, ground truth, signal models, replay parsing."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor_sim.faults import MAX_HOLD, FaultRates, Faults, Truth
from sensor_sim.replay import load
from sensor_sim.signals import DEFAULT_METRICS, MODELS, SensorSignals, parse_metrics
from sensor_sim.sim import derive_boots


def simulate(rates: FaultRates, n: int, seed: int):
    """Run one sensor's n datagrams through Faults; returns (dropped, emissions in order)."""
    faults = Faults(rates, random.Random(seed))
    held: list = []
    dropped, order = [], []
    for idx in range(n):
        was_dropped, out = faults.admit(held, idx, b"%d" % idx)
        if was_dropped:
            dropped.append(idx)
        order.extend(out)
    order.extend(faults.drain(held))
    return dropped, order


@settings(max_examples=200)
@given(
    loss=st.floats(0, 1),
    duplicate=st.floats(0, 1),
    reorder=st.floats(0, 1),
    n=st.integers(0, 300),
    seed=st.integers(0, 2**32),
)
def test_every_datagram_is_dropped_or_sent_once_plus_its_copy(loss, duplicate, reorder, n, seed):
    dropped, order = simulate(FaultRates(loss, duplicate, reorder), n, seed)
    firsts = [e.idx for e in order if not e.copy]
    copies = [e.idx for e in order if e.copy]
    assert sorted(firsts + dropped) == list(range(n))
    assert set(copies) <= set(firsts) and len(set(copies)) == len(copies)
    for e in order:
        assert e.payload == b"%d" % e.idx
    for i, e in enumerate(order):  # a copy follows its original at once
        if e.copy:
            assert order[i - 1] == (e.idx, e.payload, False)


@settings(max_examples=200)
@given(reorder=st.floats(0, 1), loss=st.floats(0, 1), n=st.integers(1, 300), seed=st.integers(0, 2**32))
def test_no_datagram_is_displaced_by_more_than_max_hold(reorder, loss, n, seed):
    _, order = simulate(FaultRates(loss=loss, reorder=reorder), n, seed)
    highest = -1
    for e in order:
        assert highest - e.idx <= MAX_HOLD
        highest = max(highest, e.idx)


def _running_max(order):
    highest, out = -1, []
    for e in order:
        highest = max(highest, e.idx)
        out.append(highest)
    return out


def test_reordering_reaches_but_never_exceeds_max_hold():
    _, order = simulate(FaultRates(reorder=0.5), 2000, 5)
    displacement = Counter(h - e.idx for h, e in zip(_running_max(order), order))
    assert max(displacement) == MAX_HOLD and displacement[1] > 0


def test_no_faults_keeps_order():
    dropped, order = simulate(FaultRates(), 100, 1)
    assert dropped == [] and [e.idx for e in order] == list(range(100))


def test_certain_loss_drops_everything_and_certain_duplicate_doubles():
    assert simulate(FaultRates(loss=1.0), 50, 1) == (list(range(50)), [])
    _, order = simulate(FaultRates(duplicate=1.0), 3, 1)
    assert [(e.idx, e.copy) for e in order] == [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True)]


def test_same_seed_same_faults_other_seed_differs():
    rates = FaultRates(0.1, 0.1, 0.2)
    assert simulate(rates, 500, 7) == simulate(rates, 500, 7)
    assert simulate(rates, 500, 7) != simulate(rates, 500, 8)


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan")])
def test_probability_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match="probability must be in"):
        FaultRates(loss=bad)


def test_truth_counts_datagrams_sent_after_a_higher_idx():
    t = Truth(boot=None, first_seq=2**32 - 2)
    for idx, copy in [(0, False), (2, False), (1, False), (1, True), (3, False), (2, True)]:
        t.sent(idx, copy)
    assert t.reordered == 3  # 1, its copy, and the late copy of 2
    assert t.reordered_copies == 2  # the two copies among them
    assert t.duplicated == [2**32 - 1, 0]  # seqs, wrapped
    assert t.seq(3) == 1


def test_parse_metrics():
    assert parse_metrics("temp,hum") == ("temp", "hum")
    assert parse_metrics(" pressure , counter ") == ("pressure", "counter")
    assert parse_metrics("all") == tuple(MODELS)
    with pytest.raises(ValueError, match="unknown metric 'tmp'"):
        parse_metrics("tmp")
    with pytest.raises(ValueError, match="listed twice"):
        parse_metrics("temp,temp")
    with pytest.raises(ValueError, match="at least one"):
        parse_metrics(",")


def test_signals_stay_in_physical_ranges_over_a_simulated_week():
    rng = random.Random(3)
    t0 = 1.7e9
    s = SensorSignals(tuple(MODELS), rng, t0)
    last_counter = -1
    temps = []
    for step in range(7 * 24 * 6):  # every 10 minutes for a week
        r = s.sample(t0 + step * 600)
        assert set(r) == set(MODELS)
        assert -20 < r["temp"] < 45 and 0 <= r["hum"] <= 100
        assert 950 < r["pressure"] < 1080 and 3.0 <= r["battery"] <= 4.21
        assert type(r["counter"]) is int and r["counter"] >= last_counter
        last_counter = r["counter"]
        temps.append(r["temp"])
    assert max(temps) - min(temps) > 5  # the daily cycle is there


def test_default_metrics_are_known():
    assert set(DEFAULT_METRICS) <= set(MODELS)


def test_boots_from_seed_time_value_or_none():
    assert derive_boots(3, enabled=False, seed=1, value=None, now=5.0) == [None] * 3
    assert derive_boots(2, enabled=True, seed=None, value=None, now=1.7e9 + 0.9) == [1700000000] * 2
    assert derive_boots(2, enabled=True, seed=1, value=42, now=0) == [42, 42]
    seeded = derive_boots(3, enabled=True, seed=1, value=None, now=0)
    assert seeded == derive_boots(3, enabled=True, seed=1, value=None, now=99)
    assert len(set(seeded)) == 3


def test_replay_load_groups_rows_of_one_sensor_and_ts(tmp_path):
    p = tmp_path / "rec.csv"
    p.write_text(
        "sensor,ts,metric,value\n"
        "b,1700000001.5,temp,20.5\n"
        "a,1700000000,temp,19\n"
        "b,1700000001.5,hum,40\n"
        "a,1700000002,temp,1e-3\n"
    )
    groups = load(p)
    assert [(g.sensor, g.ts, g.readings) for g in groups] == [
        ("a", 1700000000.0, {"temp": 19}),
        ("b", 1700000001.5, {"temp": 20.5, "hum": 40}),
        ("a", 1700000002.0, {"temp": 0.001}),
    ]
    assert type(groups[0].readings["temp"]) is int


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.csv", "sensor,ts,metric\nx,1,t\n", "a.csv:1: CSV header must name sensor, ts, metric, value"),
        ("a.csv", "sensor,ts,metric,value\nx,1,t,abc\n", "a.csv:2: value 'abc' is not a number"),
        ("a.csv", "sensor,ts,metric,value\nx,1,t,1\nx,1,t,2\n", "a.csv:3: metric 't' given twice"),
        ("a.csv", "sensor,ts,metric,value\nx,-5,t,1\n", "a.csv:2: ts -5.0 is not Unix seconds"),
        ("a.csv", "sensor,ts,metric,value\nbad id,1,t,1\n", "a.csv:2: sensor id 'bad id'"),
        ("a.csv", "sensor,ts,metric,value\n", "a.csv: no readings"),
        ("a.jsonl", '{"sensor":"x","ts":1,"metric":"t","value":1}\n{"sensor":"x"\n', "a.jsonl:2: not JSON"),
        ("a.jsonl", '{"sensor":"x","ts":1,"metric":"t","value":"1"}\n', "a.jsonl:1: value must be a number"),
        ("a.jsonl", '{"sensor":"x","ts":1,"metric":"t"}\n', "a.jsonl:1: expected an object with keys"),
        # Hostile files: each is one line naming file and line, never a traceback.
        ("a.csv", "sensor,ts,metric,value\nx,1,t," + "1" * 200_000 + "\n", "a.csv:2: field larger than"),
        (
            "a.jsonl",
            '{"sensor":"x","ts":1,"metric":"t","value":1}\n' + "[" * 100_000 + "\n",
            "a.jsonl:2: not JSON: nested too deeply",
        ),
        (
            "a.jsonl",
            '{"sensor":"x","ts":1' + "0" * 400 + ',"metric":"t","value":1}\n',
            "a.jsonl:1: ts is not Unix seconds",
        ),
    ],
)
def test_replay_load_names_the_bad_line(tmp_path, name, text, message):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ValueError) as info:
        load(p)
    assert message in str(info.value)


def test_replay_load_sniffs_jsonl_without_suffix(tmp_path):
    p = tmp_path / "rec"
    p.write_text('{"sensor":"x","ts":1,"metric":"t","value":2.5}\n\n')
    assert [(g.sensor, g.readings) for g in load(p)] == [("x", {"t": 2.5})]


def test_counter_values_are_reproducible_with_the_seed():
    a = SensorSignals(("counter", "temp"), random.Random("s"), 0.0)
    b = SensorSignals(("counter", "temp"), random.Random("s"), 0.0)
    assert [a.sample(i) for i in range(20)] == [b.sample(i) for i in range(20)]
    assert Counter(type(v) for v in a.sample(1.0).values()) == Counter({int: 1, float: 1})


class FakeClock:
    """Monotonic and wall time that move only when the simulator sleeps."""

    def __init__(self, wall0: float = 1_700_000_000.0) -> None:
        self.now = 0.0
        self.wall0 = wall0

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.wall0 + self.now

    def sleep(self, seconds: float) -> None:
        # A real sleep always overshoots a little; so does this one, or a
        # wake-up a rounding error short of the next slot would spin forever.
        self.now += max(seconds, 0.0) + 1e-6


def test_fixed_rate_and_duration_spread_slots_evenly_on_a_fake_clock():
    from sensor_sim.net import parse_target
    from sensor_sim.sim import SimConfig, run

    from helpers import Receiver

    fake = FakeClock()
    with Receiver() as rx:
        cfg = SimConfig([parse_target(rx.target)], sensors=4, rate=50, duration=0.5, seed=1)
        report = run(cfg, clock=fake.clock, wall=fake.wall, sleep=fake.sleep)
        got = [(d.sensor, d.ts) for d in rx.datagrams()] if rx.wait(100) else []
    # 4 sensors x 50 Hz = one slot every 5 ms: 100 slots in 0.5 s, slot j at j x 5 ms,
    # owned by sensor j mod 4.
    assert report["datagrams_sent"] == 100
    assert report["elapsed_s"] == pytest.approx(99 * 0.005, abs=1e-3)
    assert sorted(got, key=lambda g: g[1]) == [
        (f"sim-{j % 4 + 1:04d}", pytest.approx(fake.wall0 + j * 0.005, abs=1e-3)) for j in range(100)
    ]
