"""sensor-sim end to end: the console script as a real process, real UDP receivers on loopback.

Every check compares what a receiver decoded with the simulator's report,
exactly: the report is the ground truth the collector's tests rely on.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
from collections import Counter, defaultdict

import pytest

from sensor_sim import DEFAULT_UDP_PORT, Sensor
from sensor_sim.signals import DEFAULT_METRICS

from helpers import Receiver

MCAST_GROUP = "239.255.77.1"


def sim(bin_path, tmp_path, *args: str, check: bool = True):
    """Run sensor-sim to completion; returns (CompletedProcess, report dict or None)."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [bin_path("sensor-sim"), *args, "--report", str(report)], capture_output=True, text=True, timeout=60
    )
    if check:
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    return proc, (json.loads(report.read_text()) if report.exists() else None)


def expected_multiset(report) -> Counter:
    """Generated minus dropped (and failed sends) plus duplicated, as (sensor, seq) counts."""
    want: Counter = Counter()
    for sid, t in report["sensors"].items():
        for i in range(t["generated"]):
            want[(sid, (t["first_seq"] + i) % 2**32)] += 1
        for seq in t["dropped"] + t["send_failed"]:
            want[(sid, seq)] -= 1
        for seq in t["duplicated"]:
            want[(sid, seq)] += 1
    return +want


def observed_reordered(report, datagrams) -> dict[str, int]:
    """Per sensor, how many datagrams arrived after one with a higher seq (seqs from first_seq)."""
    highest: dict[str, int] = {}
    late: dict[str, int] = defaultdict(int)
    for d in datagrams:
        idx = (d.seq - report["sensors"][d.sensor]["first_seq"]) % 2**32
        if idx < highest.get(d.sensor, -1):
            late[d.sensor] += 1
        else:
            highest[d.sensor] = idx
    return {sid: late[sid] for sid in report["sensors"]}


def check_against_report(rx: Receiver, report) -> list:
    rx.wait(report["datagrams_sent"])
    got = rx.datagrams()
    assert len(got) == report["datagrams_sent"]
    assert Counter((d.sensor, d.seq) for d in got) == expected_multiset(report)
    assert observed_reordered(report, got) == {s: t["reordered"] for s, t in report["sensors"].items()}
    return got


def test_clean_run_delivers_every_seq_of_every_sensor_once(bin_path, tmp_path):
    with Receiver() as rx:
        proc, report = sim(
            bin_path,
            tmp_path,
            "--target",
            rx.target,
            "--sensors",
            "20",
            "--count",
            "50",
            "--rate",
            "max",
            "--seed",
            "11",
        )
        got = check_against_report(rx, report)
    assert report["datagrams_sent"] == 1000 and report["send_failures"] == 0
    assert report["targets"] == {rx.target: 1000}
    assert sorted(report["sensors"]) == [f"sim-{i:04d}" for i in range(1, 21)]
    by_sensor = defaultdict(list)
    for d in got:
        by_sensor[d.sensor].append(d.seq)
        assert d.boot == report["sensors"][d.sensor]["boot"] is not None
        assert set(d.readings) == set(DEFAULT_METRICS) and d.ts > 1.6e9
    assert all(seqs == list(range(50)) for seqs in by_sensor.values())
    for t in report["sensors"].values():
        assert (t["generated"], t["dropped"], t["duplicated"], t["reordered"]) == (50, [], [], 0)
    assert "1000 datagrams sent" in proc.stderr


@pytest.mark.parametrize("seed", [1, 2])
def test_faults_reach_the_receiver_exactly_as_reported(bin_path, tmp_path, seed):
    with Receiver() as rx:
        _, report = sim(
            bin_path,
            tmp_path,
            "--target",
            rx.target,
            "--sensors",
            "10",
            "--count",
            "200",
            "--rate",
            "max",
            "--seed",
            str(seed),
            "--loss",
            "0.1",
            "--duplicate",
            "0.1",
            "--reorder",
            "0.2",
            "--metrics",
            "counter",
        )
        check_against_report(rx, report)
    sensors = report["sensors"].values()
    dropped = sum(len(t["dropped"]) for t in sensors)
    duplicated = sum(len(t["duplicated"]) for t in sensors)
    reordered = sum(t["reordered"] for t in sensors)
    assert 100 < dropped < 300 and 100 < duplicated < 300 and reordered > 100
    assert report["datagrams_sent"] == 2000 - dropped + duplicated


def test_same_seed_gives_the_same_report(bin_path, tmp_path):
    args = [
        "--sensors",
        "3",
        "--count",
        "100",
        "--rate",
        "max",
        "--seed",
        "5",
        "--loss",
        "0.2",
        "--duplicate",
        "0.2",
        "--reorder",
        "0.3",
    ]
    with Receiver() as rx:
        _, first = sim(bin_path, tmp_path, "--target", rx.target, *args)
        _, second = sim(bin_path, tmp_path, "--target", rx.target, *args)
    assert first["sensors"] == second["sensors"]
    assert first["datagrams_sent"] == second["datagrams_sent"]


def test_wraparound_from_start_seq(bin_path, tmp_path):
    with Receiver() as rx:
        _, report = sim(
            bin_path,
            tmp_path,
            "--target",
            rx.target,
            "--sensors",
            "2",
            "--count",
            "12",
            "--rate",
            "max",
            "--start-seq",
            "4294967290",
            "--seed",
            "3",
            "--reorder",
            "0.3",
        )
        got = check_against_report(rx, report)
    seqs = {d.seq for d in got}
    assert seqs == set(range(4294967290, 2**32)) | set(range(6))
    assert all(t["first_seq"] == 4294967290 for t in report["sensors"].values())


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="::1 is not available on this host")
def test_ipv6_unicast(bin_path, tmp_path):
    with Receiver(socket.AF_INET6, "::1") as rx:
        _, report = sim(
            bin_path, tmp_path, "--target", rx.target, "--sensors", "3", "--count", "20", "--rate", "max", "--no-boot"
        )
        got = check_against_report(rx, report)
    assert report["datagrams_sent"] == 60 and all(d.boot is None for d in got)
    assert report["targets"] == {f"[::1]:{rx.port}": 60}


def test_ipv4_multicast_on_loopback(bin_path, tmp_path):
    with Receiver(group=MCAST_GROUP) as rx:
        _, report = sim(
            bin_path,
            tmp_path,
            "--target",
            rx.target,
            "--multicast-interface",
            "127.0.0.1",
            "--ttl",
            "0",
            "--sensors",
            "4",
            "--count",
            "25",
            "--rate",
            "max",
            "--loss",
            "0.1",
            "--seed",
            "9",
        )
        check_against_report(rx, report)
    assert 0 < report["datagrams_sent"] < 100


def test_every_target_gets_every_datagram(bin_path, tmp_path):
    with Receiver() as a, Receiver() as b:
        _, report = sim(
            bin_path,
            tmp_path,
            "--target",
            a.target,
            "--target",
            b.target,
            "--sensors",
            "5",
            "--count",
            "30",
            "--rate",
            "max",
            "--seed",
            "4",
            "--duplicate",
            "0.1",
        )
        a.wait(report["datagrams_sent"] // 2)
        b.wait(report["datagrams_sent"] // 2)
        got_a, got_b = a.datagrams(), b.datagrams()
    per_target = len(got_a)
    assert report["targets"] == {a.target: per_target, b.target: per_target}
    assert report["datagrams_sent"] == 2 * per_target
    assert [(d.sensor, d.seq) for d in got_a] == [(d.sensor, d.seq) for d in got_b]
    assert Counter((d.sensor, d.seq) for d in got_a) == expected_multiset(report)


def test_fixed_rate_and_duration_give_an_exact_count_on_time(bin_path, tmp_path):
    with Receiver() as rx:
        _, report = sim(
            bin_path, tmp_path, "--target", rx.target, "--sensors", "4", "--rate", "50", "--duration", "0.5"
        )
        got = check_against_report(rx, report)
    assert report["datagrams_sent"] == 100
    # That the slots are spread evenly over the duration is checked on a fake
    # clock in test_sim_units.py (no wall-clock bound here: CI cores stall).
    assert sorted(d.ts for d in got) == [d.ts for d in got]


def test_replay_csv_keeps_values_grouping_and_timing(bin_path, tmp_path):
    rec = tmp_path / "rec.csv"
    rec.write_text(
        "sensor,ts,metric,value\n"
        "gh-1,1700000000.25,temp,21.5\n"
        "gh-1,1700000000.25,hum,40\n"
        "gh-2,1700000005,temp,19.0\n"
        "gh-1,1700000010,temp,22\n"
    )
    with Receiver() as rx:
        _, report = sim(
            bin_path, tmp_path, "--target", rx.target, "--replay", str(rec), "--speed", "50", "--boot-value", "77"
        )
        got = check_against_report(rx, report)
    assert [(d.sensor, d.seq, d.boot, d.ts, d.readings) for d in got] == [
        ("gh-1", 0, 77, 1700000000.25, {"temp": 21.5, "hum": 40}),
        ("gh-2", 0, 77, 1700000005.0, {"temp": 19.0}),
        ("gh-1", 1, 77, 1700000010.0, {"temp": 22}),
    ]
    assert report["elapsed_s"] >= 9.75 / 50  # the recorded spacing, 50 times faster


def test_replay_jsonl_with_faults(bin_path, tmp_path):
    rec = tmp_path / "rec.jsonl"
    rows = [
        {"sensor": f"s{i % 3}", "ts": 1700000000 + i // 3, "metric": m, "value": i}
        for i in range(300)
        for m in ("a", "b")
    ]
    rec.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with Receiver() as rx:
        _, report = sim(
            bin_path,
            tmp_path,
            "--target",
            rx.target,
            "--replay",
            str(rec),
            "--speed",
            "10000",
            "--seed",
            "2",
            "--loss",
            "0.1",
            "--reorder",
            "0.2",
        )
        got = check_against_report(rx, report)
    assert {s: t["generated"] for s, t in report["sensors"].items()} == {"s0": 100, "s1": 100, "s2": 100}
    for d in got:
        i = int(d.ts - 1700000000) * 3 + int(d.sensor[1])
        assert d.readings == {"a": i, "b": i} and d.seq == i // 3


def test_sigint_stops_writes_the_report_and_exits_130(bin_path, tmp_path):
    report_path = tmp_path / "report.json"
    with Receiver() as rx:
        proc = subprocess.Popen(
            [
                bin_path("sensor-sim"),
                "--target",
                rx.target,
                "--sensors",
                "5",
                "--rate",
                "100",
                "--reorder",
                "0.3",
                "--seed",
                "1",
                "--report",
                str(report_path),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            rx.wait(50)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr and "interrupted" in stderr
        report = json.loads(report_path.read_text())
        check_against_report(rx, report)
    assert report["interrupted"] is True and report["datagrams_sent"] >= 50
    assert not any(p.name.startswith("report.json.tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "127.0.0.1"], "a port is required"),
        (["--target", "a..b:4739"], "cannot resolve host"),
        (["--target", "127.0.0.1:0"], "out of range 1-65535"),
        (["--target", "::1:4739"], "an IPv6 address needs brackets: write [::1]:4739"),
        (["--target", "127.0.0.1:9", "--loss", "1.5"], "--loss"),
        (["--target", "127.0.0.1:9", "--reorder", "-0.1"], "--reorder"),
        (["--target", "127.0.0.1:9", "--count", "5", "--duration", "1"], "--count or --duration"),
        (["--target", "127.0.0.1:9", "--metrics", "temp,co2"], "unknown metric 'co2'"),
        (["--target", "127.0.0.1:9", "--rate", "fast"], "'fast' is not a number"),
        (["--target", "127.0.0.1:9", "--rate", "0"], "must be > 0"),
        (
            ["--target", "127.0.0.1:9", "--id-prefix", "bad id"],
            "Invalid value for --id-prefix: sensor id 'bad id-0010'",
        ),
        (["--target", "127.0.0.1:9", "--id-prefix", "x" * 60], "must be 1-64"),
        (["--target", "127.0.0.1:9", "--speed", "2"], "--speed only applies to --replay"),
        (["--sensors", "3"], "Missing option '--target'"),
        # Found before the run, not after it (the report of a long run would be lost).
        (
            ["--target", "127.0.0.1:9", "--report", "/nonexistent-dir/truth.json"],
            "Invalid value for --report: /nonexistent-dir is not a directory",
        ),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(bin_path, args, message):
    proc = subprocess.run(
        [bin_path("sensor-sim"), *args, "--count", "1"]
        if "--count" not in args and "--duration" not in args
        else [bin_path("sensor-sim"), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def test_replay_errors_name_the_line_and_exit_2(bin_path, tmp_path):
    rec = tmp_path / "rec.csv"
    rec.write_text("sensor,ts,metric,value\ngh-1,1,temp,warm\n")
    proc = subprocess.run(
        [bin_path("sensor-sim"), "--target", "127.0.0.1:9", "--replay", str(rec)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{rec}:2:" in proc.stderr
    proc = subprocess.run(
        [bin_path("sensor-sim"), "--target", "127.0.0.1:9", "--replay", str(rec), "--rate", "5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "drop --rate" in proc.stderr


def test_help_has_an_example(bin_path):
    proc = subprocess.run([bin_path("sensor-sim"), "-h"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "Example:" in proc.stdout and "--report" in proc.stdout


def test_sensor_api_sends_one_datagram_per_call():
    with Receiver() as rx:
        with Sensor("greenhouse-1", target=("127.0.0.1", rx.port)) as s:
            assert s.send({"temp": 21.5, "hum": 40}) == 0
            assert s.send({"temp": 21.6}, ts=1700000000.5) == 1
            assert s.seq == 2 and s.sent == 2
        with Sensor("greenhouse-2", target=rx.target, boot=False, seq=2**32 - 1) as s2:
            assert s2.send({"x": 1}) == 2**32 - 1 and s2.send({"x": 2}) == 0
        rx.wait(4)
        got = rx.datagrams()
    assert [(d.sensor, d.seq, d.readings) for d in got] == [
        ("greenhouse-1", 0, {"temp": 21.5, "hum": 40}),
        ("greenhouse-1", 1, {"temp": 21.6}),
        ("greenhouse-2", 2**32 - 1, {"x": 1}),
        ("greenhouse-2", 0, {"x": 2}),
    ]
    assert got[0].boot == got[1].boot and got[0].boot > 1.6e9
    assert got[1].ts == 1700000000.5 and got[0].ts > 1.6e9
    assert got[2].boot is None


def test_sensor_api_refuses_bad_input_before_sending():
    from collector.errors import EncodeError

    with pytest.raises(EncodeError):
        Sensor("bad id", target=("127.0.0.1", 9))
    with pytest.raises(ValueError, match="cannot resolve"):
        Sensor("ok", target=("a..b", 9))
    with Receiver() as rx, Sensor("ok", target=("127.0.0.1", rx.port), boot=7) as s:
        with pytest.raises(EncodeError):
            s.send({"temp": "warm"})
        assert s.seq == 0 and s.sent == 0  # a refused reading uses up no seq
        s.send({"temp": 1})
        rx.wait(1)
        assert rx.datagrams()[0].boot == 7 and rx.datagrams()[0].seq == 0
    assert DEFAULT_UDP_PORT == 4739


class FakeClock:
    """A monotonic clock that advances one second per reading: progress without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_progress_every_five_seconds_and_a_stop_flag_in_process():
    from sensor_sim.faults import FaultRates
    from sensor_sim.net import resolve
    from sensor_sim.sim import SimConfig, run

    stop = threading.Event()
    seen = []

    def progress(p):
        seen.append((p.elapsed, p.sent, p.failed))
        if len(seen) == 2:
            stop.set()

    with Receiver() as rx:
        cfg = SimConfig(
            targets=[resolve("127.0.0.1", rx.port)],
            sensors=100,
            rate=None,
            count=1000,
            seed=3,
            faults=FaultRates(reorder=0.5),
        )
        report = run(cfg, stop=stop, progress=progress, clock=FakeClock())
        check_against_report(rx, report)
    # One clock reading per batch of 256 slots: progress at 5 s and 10 s, then stop.
    assert [(e, f) for e, _, f in seen] == [(5.0, 0), (10.0, 0)]
    assert report["interrupted"] is True
    assert sum(t["generated"] for t in report["sensors"].values()) == 10 * 256
    assert seen[1][1] <= report["datagrams_sent"]  # held-back datagrams were sent at the stop


def test_duration_bounds_a_run_that_cannot_keep_up_with_its_rate():
    """--rate beyond one core with --duration: stop within LATE_GRACE_S of the duration, not after
    every slot (at ~100,000/s, 5,000,000 slots would take most of a minute)."""
    from sensor_sim.net import parse_target
    from sensor_sim.sim import LATE_GRACE_S, SimConfig, run

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:  # nobody reads: sendto still succeeds
        sink.bind(("127.0.0.1", 0))
        cfg = SimConfig(
            targets=[parse_target(f"127.0.0.1:{sink.getsockname()[1]}")],
            sensors=1,
            rate=5_000_000.0,
            duration=0.2,
            seed=1,
        )
        report = run(cfg)
    assert 0.2 <= report["elapsed_s"] < 0.2 + LATE_GRACE_S + 0.5
    sensor = report["sensors"]["sim-0001"]
    assert 0 < sensor["generated"] < 1_000_000
    assert report["datagrams_sent"] + report["send_failures"] == sensor["generated"]
