"""The pure ingest core: bytes in, accounts and a batch out. No socket, no file."""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector import auth, wire
from collector.ingest import REPORTED, Failed, IngestCore, Refused, Rejected, SensorState, group_batch
from collector.schema import REJECT_REASONS
from collector.sequence import Duplicate, Gap, InOrder, Late, SensorTracker, Stray

KEY = bytes(range(32))


def signed(sensor: str, seq: int, boot: int = 1, key_id: str | None = None) -> bytes:
    return auth.sign(wire.encode(sensor, seq, {"t": 1.0}, boot=boot), key_id or sensor, KEY)


def accounted(core: IngestCore) -> int:
    c = core.counters
    return (
        core.pending_datagrams
        + c["duplicates"]
        + c["refused_sensors"]
        + c["internal_errors"]
        + sum(c.get(f"rejected:{r}", 0) for r in REJECT_REASONS)
    )


def test_events_batch_and_accounts():
    core = IngestCore()
    enc = lambda seq, r=None: wire.encode("s1", seq, r or {"t": 20.5, "h": 3}, boot=7, ts=100.0 + seq)  # noqa: E731
    assert core.receive(enc(0), 1.0).__class__.__name__ == "First"
    assert core.receive(enc(1), 1.1) == InOrder()
    assert core.receive(enc(4), 1.2) == Gap(2, 3)
    assert core.receive(enc(2, {"t": -0.0}), 1.3) == Late(2)
    assert core.receive(enc(2), 1.4) == Duplicate()
    assert core.pending_datagrams == 4 and core.pending_readings == 7
    assert core.counters["duplicates"] == 1
    state = core.sensors["s1"]
    assert state.series == {"t": 1, "h": 2} and state.readings == 7
    assert (state.tracker.datagrams, state.tracker.lost, state.tracker.reordered) == (4, 1, 1)
    batch = core.batch()
    assert batch.new_series == [(1, "s1", "t"), (2, "s1", "h")]
    assert [(k[0], k[2], r.missing) for k, r in batch.gaps.items()] == [("s1", 3, 1)]  # 2 came late
    [group] = group_batch(batch.datagrams)
    assert group.sensor == "s1" and group.boot == 7 and group.seqs == [0, 1, 4, 2]
    assert group.received == [1.0, 1.1, 1.2, 1.3] and group.ts == [100.0, 101.0, 104.0, 102.0]
    assert group.metrics["h"] == [3, 3, 3, None]
    assert str(group.metrics["t"][3]) == "-0.0"
    core.committed(batch, 2.0)
    assert core.pending == [] and core.counters["stored"] == 4 and core.counters["stored_readings"] == 7


def test_missing_ts_is_the_receive_time_and_boot_none_groups_apart():
    core = IngestCore()
    core.receive(wire.encode("a", 1, {"x": 1}), 50.0)
    core.receive(wire.encode("a", 2, {"x": 2}, boot=3), 51.0)
    groups = group_batch(core.batch().datagrams)
    assert [(g.boot, g.ts) for g in groups] == [(None, [50.0]), (3, [51.0])]


def test_guards_refuse_new_sensors_and_metrics_and_count_them():
    core = IngestCore(max_sensors=1, max_series_per_sensor=2)
    assert core.receive(wire.encode("one", 0, {"a": 1, "b": 2}), 1.0).__class__ not in REPORTED
    out = core.receive(wire.encode("two", 0, {"a": 1}), 1.0)
    assert isinstance(out, Refused) and out.counter == "refused_sensors" and "MAX_SENSORS" in out.what
    out = core.receive(wire.encode("one", 1, {"a": 1, "c": 3, "d": 4}), 1.0)
    assert isinstance(out, Refused) and out.counter == "refused_readings" and out.event == InOrder()
    assert "reading c, d of sensor one" in out.what
    assert core.counters["refused_sensors"] == 1 and core.counters["refused_readings"] == 2
    assert core.pending[-1][5] == {"a": 1} and core.sensors["one"].readings == 3


def test_signed_datagrams_window_and_not_signed():
    core = IngestCore(keyring={"s1": KEY})
    assert core.receive(signed("s1", 5), 1.0).__class__.__name__ == "First"
    out = core.receive(signed("s1", 5), 1.0)
    assert isinstance(out, Rejected) and out.reason == "replayed"
    out = core.receive(wire.encode("s1", 6, {"t": 1.0}, boot=1), 1.0)
    assert isinstance(out, Rejected) and out.reason == "not_signed"  # s1 has a key
    assert core.receive(wire.encode("free", 1, {"t": 1.0}), 1.0).__class__ not in REPORTED
    out = core.receive(signed("s1", 7, key_id="other"), 1.0)
    assert isinstance(out, Rejected) and out.reason == "unknown_key"
    strict = IngestCore(keyring={"s1": KEY}, require_auth=True)
    assert strict.receive(wire.encode("free", 1, {"t": 1.0}), 1.0).reason == "not_signed"
    core.set_keys({})
    assert core.receive(signed("s1", 8), 1.0).reason == "unknown_key"
    assert core.counters["rejected:replayed"] == 1 and core.counters["rejected:unknown_key"] == 2


def test_an_exact_repeat_of_a_stray_is_stored_once():
    core = IngestCore()
    core.receive(wire.encode("s", 0, {"t": 1}, boot=1, ts=10.0), 1.0)
    far = wire.encode("s", 5_000_000, {"t": 2}, boot=1, ts=11.0)
    assert core.receive(far, 2.0) == Stray(5_000_000)
    assert core.receive(far, 2.0) == Stray(5_000_000)  # the tracker's verdict, unchanged
    assert core.pending_datagrams == 2 and core.repeated_strays == 1 and core.counters["duplicates"] == 1
    assert core.sensors["s"].tracker.datagrams == 3 and core.sensors["s"].readings == 2


def test_trim_drops_the_oldest_whole_datagrams_and_counts_readings():
    core = IngestCore()
    for seq in range(10):
        core.receive(wire.encode("s", seq, {"a": 1, "b": 2}), 1.0)
    assert core.trim(10) == 12  # 10 excess + 1 slack, rounded up to whole datagrams
    assert [d[2] for d in core.pending] == [6, 7, 8, 9] and core.counters["storage_dropped"] == 12


def test_a_bug_costs_one_datagram_not_the_loop():
    core = IngestCore()
    core.receive(wire.encode("s", 0, {"a": 1}), 1.0)
    core.sensors["s"].tracker = None  # the next datagram of s hits a bug
    out = core.receive(wire.encode("s", 1, {"a": 1}), 1.0)
    assert isinstance(out, Failed) and core.counters["internal_errors"] == 1
    assert core.receive(wire.encode("t", 0, {"a": 1}), 1.0).__class__ not in REPORTED


junk = st.binary(max_size=64) | st.sampled_from(
    [b"", b"\xc1", msgpack.packb([1, 2]), b"\x93\x00", msgpack.packb({"v": 1, "id": "s", "seq": 1, "r": {}})]
)
valid = st.builds(
    lambda sensor, seq, boot, n: wire.encode(f"p-{sensor}", seq, {f"m{i}": float(i) for i in range(n)}, boot=boot),
    st.integers(0, 5),
    st.integers(0, 2**32 - 1),
    st.none() | st.integers(0, 3),
    st.integers(1, 4),
)
sig = st.builds(lambda seq: signed("k-1", seq), st.integers(0, 50))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(valid | junk | sig, max_size=40))
def test_any_bytes_are_accounted_exactly_once(burst):
    core = IngestCore(keyring={"k-1": KEY}, max_sensors=4)
    for data in burst:
        before = accounted(core)
        out = core.receive(data, 1_700_000_000.0)
        assert accounted(core) - before == 1, out
    assert core.counters["internal_errors"] == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(
                st.just("dg"),
                st.sampled_from(["a", "b", "c"]),
                st.sampled_from([None, 1, 2]),
                st.integers(0, 40),
                st.dictionaries(st.sampled_from(["t", "h", "p"]), st.integers(-5, 5), min_size=1),
            ),
            st.tuples(st.just("trim"), st.integers(0, 30)),
        ),
        max_size=80,
    )
)
def test_the_batch_columns_are_the_arrival_list_grouped(ops):
    """The core keeps the batch in columns; grouping its datagrams in arrival
    order (group_batch, the reference) gives the same groups, through trims too."""
    core = IngestCore()
    now = 1.0
    for op in ops:
        if op[0] == "trim":
            before = core.pending_readings
            dropped = core.trim(op[1])
            assert core.pending_readings == before - dropped
            continue
        _, sensor, boot, seq, readings = op
        now += 0.5
        core.receive(wire.encode(sensor, seq, readings, boot=boot, ts=now), now)
    batch = core.batch()
    pending = core.pending
    assert batch.datagrams == pending and batch.count == len(pending) == core.pending_datagrams
    assert batch.readings == sum(len(d[5]) for d in pending) == core.pending_readings
    if not any(op[0] == "trim" for op in ops):
        assert batch.groups == group_batch(pending)  # in order of first arrival, too
    else:  # a trim may leave a group placed by a datagram it dropped: same groups
        key = lambda g: (g.sensor, -1 if g.boot is None else g.boot)  # noqa: E731
        assert sorted(batch.groups, key=key) == sorted(group_batch(pending), key=key)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([None, 1, 2**32 - 1]), st.integers(0, 2**32 - 1)), max_size=60),
    st.lists(st.integers(0, 2**32 - 1), max_size=20),
)
def test_a_sensor_row_holds_its_tracker_and_window_as_json_dumps_writes_them(observed, signed):
    """SensorState.row writes the snapshots with msgspec's encoder: the same text as
    json.dumps(snapshot, separators=(",", ":")), which the rows held before (a restart
    reads them back with json.loads)."""
    import json

    from collector.replay import ReplayWindow

    state = SensorState("s-1", SensorTracker(), {}, 1.0, 2.0)
    for boot, seq in observed:
        state.tracker.observe(boot, seq, 3.0)
    if signed:
        state.replay = ReplayWindow()
        for seq in signed:
            if state.replay.check(9, seq):
                state.replay.accept(9, seq)
    row = state.row()
    assert row[9] == json.dumps(state.tracker.snapshot(), separators=(",", ":"))
    window = None if state.replay is None else json.dumps(state.replay.snapshot(), separators=(",", ":"))
    assert row[10] == window


a_datagram = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from([None, 1, 2]),
    st.integers(0, 40),
    st.dictionaries(st.sampled_from(["t", "h", "p"]), st.integers(-5, 5), min_size=1),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rounds=st.lists(
        st.tuples(
            st.lists(a_datagram, max_size=10),  # before the take
            st.lists(a_datagram, max_size=10),  # while the batch is out
            st.booleans(),  # refused
            st.none() | st.integers(0, 30),  # a trim after it
        ),
        max_size=8,
    )
)
def test_a_taken_batch_leaves_the_core_and_comes_back_whole_when_refused(rounds):
    """take() hands the pending datagrams over to the batch (no copy): the core then holds
    exactly what came since; committed() forgets the batch, refused() puts it back in front,
    in arrival order, through groups that changed names, boots and trims in between."""
    core = IngestCore()
    expected: list[tuple] = []  # what core.pending must be
    now = 1.0
    key = lambda g: (g.sensor, -1 if g.boot is None else g.boot)  # noqa: E731

    def receive(datagrams, out_readings):
        nonlocal now
        for sensor, boot, seq, readings in datagrams:
            now += 0.5
            before = core.pending_datagrams
            core.receive(wire.encode(sensor, seq, readings, boot=boot, ts=now), now)
            if core.pending_datagrams > before:
                expected.append((sensor, boot, seq, now, now, readings))
        assert core.pending == expected and core.pending_datagrams == len(expected)
        assert core.pending_readings == sum(len(d[5]) for d in expected) + out_readings

    for before, meanwhile, refused, trim in rounds:
        receive(before, 0)
        batch = core.take()
        assert batch.datagrams == expected and batch.count == len(expected)
        assert sorted(batch.groups, key=key) == sorted(group_batch(expected), key=key)
        taken, expected = expected, []
        receive(meanwhile, batch.readings)
        if refused:
            core.refused(batch)
            expected = taken + expected
        else:
            core.committed(batch, now)
        assert core.pending == expected and core.pending_readings == sum(len(d[5]) for d in expected)
        if trim is not None:
            dropped = core.trim(trim)
            cut = 0
            while sum(len(d[5]) for d in expected[:cut]) < dropped:
                cut += 1
            assert sum(len(d[5]) for d in expected[:cut]) == dropped
            expected = expected[cut:]
            assert core.pending == expected and core.pending_readings == sum(len(d[5]) for d in expected)
    assert sorted(core.batch().groups, key=key) == sorted(group_batch(expected), key=key)


new_metric = st.builds(
    lambda sensor, seq, name: msgpack.packb(
        {"v": 1, "id": f"p-{sensor}", "seq": seq, "boot": 1, "r": {name: 1.5, "m0": 2}}
    ),
    st.integers(0, 5),
    st.integers(0, 40),
    st.sampled_from(["n1", "n2", "bad name", "m0"]),
)
odd = st.sampled_from(
    [
        wire.encode("p-1", 3, {"m0": True}, boot=1),  # a bool: the careful path
        msgpack.packb({"v": 1, "id": "p-1", "seq": 4, "r": {"m0": 1}, "x": [1]}),  # an unknown key
        msgpack.packb({"v": 1, "id": "p-1", "seq": 5, "r": {"m0": 1}}) + b"\x00",  # trailing bytes
        msgpack.packb({"v": 1, "id": "p-1", "seq": 6, "r": {"m0": 1}, "pad": "x" * 8200}),  # too_large
        wire.encode("p-1", 7, {"m0": 1}, boot=1, ts=5.0),
        wire.encode("k-1", 1, {"t": 1.0}, boot=1),  # not_signed: k-1 has a key
    ]
)


def core_state(core: IngestCore) -> tuple:
    trackers = {s: (st.tracker.snapshot(), st.readings, st.last_seen, st.last_ts) for s, st in core.sensors.items()}
    return dict(core.counters), core.pending, trackers, core.repeated_strays


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.lists(valid | junk | sig | new_metric | odd, max_size=12), max_size=8))
def test_receive_many_is_receive_per_datagram(bursts):
    """The burst path gives the same outcomes and the same state as `receive`
    one datagram at a time, whatever the mix (junk, signed, new sensors, new
    metrics, the guards, strays, duplicates)."""
    one = IngestCore(keyring={"k-1": KEY}, max_sensors=4, max_series_per_sensor=3)
    many = IngestCore(keyring={"k-1": KEY}, max_sensors=4, max_series_per_sensor=3)
    now = 1_700_000_000.0
    for burst in bursts:
        now += 1.0
        expected = [(i, out) for i, data in enumerate(burst) if (out := one.receive(data, now)).__class__ in REPORTED]
        got = many.receive_many(burst, now)
        assert [(i, type(o), getattr(o, "reason", None)) for i, o in got] == [
            (i, type(o), getattr(o, "reason", None)) for i, o in expected
        ]
        assert core_state(many) == core_state(one)
    assert many.batch().groups == one.batch().groups
    assert many.counters["internal_errors"] == 0


def test_receive_many_loaded_sensors_and_a_bug():
    """Sensors handed in at start (as loaded from a database) take the inline
    path only with valid ids and names; a bug costs one datagram there too."""
    tracker = SensorTracker()
    tracker.observe(None, 0, 1.0)
    sensors = {
        "s": SensorState("s", tracker, {"a": 1, "b c": 2}, 1.0, 1.0, 1),
        "bad id": SensorState("bad id", SensorTracker(), {"a": 3}, 1.0, 1.0),
    }
    loaded = IngestCore(sensors=sensors, next_series_id=4)
    assert sensors["s"].names == {"a"} and "bad id" not in loaded._plain
    assert loaded.receive_many([wire.encode("s", 1, {"a": 2})], 2.0) == []
    assert loaded.pending[-1][2:] == (1, 2.0, 2.0, {"a": 2})
    loaded.sensors["s"].tracker = None  # the next datagram of s hits a bug
    [(i, out)] = loaded.receive_many([wire.encode("t", 0, {"a": 1}), wire.encode("s", 2, {"a": 1})], 3.0)
    assert i == 1 and isinstance(out, Failed) and loaded.counters["internal_errors"] == 1
    assert [d[0] for d in loaded.pending] == ["s", "t"]


def test_a_group_keeps_readings_flat_until_a_datagram_brings_other_names():
    """Same names in any order stay flat; other names (fewer, more, different)
    switch the group to dicts from there on; the columns are the same as the
    reference's either way, through a trim of the flat part too."""
    core = IngestCore()
    sent = [
        {"t": 1, "h": 2},
        {"h": 4, "t": 3},
        {"t": 5, "h": 6},
        {"t": 7},
        {"t": 8, "h": 9, "p": 10},
        {"h": 11, "t": 12},
    ]
    for seq, readings in enumerate(sent):
        core.receive_many([wire.encode("s", seq, readings, boot=1)], 1.0 + seq)
    (g,) = core._groups.values()
    assert g.names == ("t", "h") and g.values == [1, 2, 3, 4, 5, 6] and len(g.rest) == 3
    assert [d[5] for d in core.pending] == sent
    assert core.batch().groups == group_batch(core.pending)
    assert core.batch().groups[0].metrics == {
        "t": [1, 3, 5, 7, 8, 12],
        "h": [2, 4, 6, None, 9, 11],
        "p": [None, None, None, None, 10, None],
    }
    assert core.trim(5) == 7  # the 3 flat datagrams and one of the rest: oldest first
    assert [d[2] for d in core.pending] == [4, 5] and core.batch().groups == group_batch(core.pending)
    assert core.batch().groups[0].metrics == {"t": [8, 12], "h": [9, 11], "p": [10, None]}


def test_one_metric_groups_keep_names_apart():
    """A group of one metric name is flat too; a datagram with one other name is
    not taken for it (it goes to the group's dicts)."""
    core = IngestCore()
    for seq, readings in enumerate([{"t": 1}, {"h": 2}, {"t": 3}]):
        core.receive(wire.encode("a", seq, readings), 1.0)
        core.receive_many([wire.encode("b", seq, readings)], 1.0)
    for group in core.batch().groups:
        assert group.metrics == {"t": [1, None, 3], "h": [None, 2, None]}, group
    assert core.batch().groups == group_batch(core.pending)
