"""End to end: the real `sensor-sim` and the real `telemetry-collector` as processes on loopback.

The simulator's ground-truth report says what it generated, dropped, sent
twice and sent out of order; the collector's accounts in SQLite must match it
exactly.  Expected values are derived from the report here, in one place
(`expected`), with the rule the tracker keeps: lost = dropped seqs strictly
between the lowest and the highest delivered seq of a stream.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest

from helpers import accounts, wait_for
from helpers import db_dict as query_dict
from helpers import db_query as query
from processes import CollectorProcess

MASK = 0xFFFFFFFF
METRICS = 3  # sensor-sim's default metrics: temp, hum, battery


@pytest.fixture
def collector(bin_path, db_path, tmp_path):
    started: list[CollectorProcess] = []

    def start(*args: str, prefix: tuple[str, ...] = ()) -> CollectorProcess:
        proc = CollectorProcess(
            bin_path("telemetry-collector"), db_path, tmp_path / f"collector{len(started)}.log", *args, prefix=prefix
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.kill()


@pytest.fixture
def sim(bin_path, tmp_path):
    runs = iter(range(1000))

    def run(target: str, *args: str, prefix: tuple[str, ...] = ()) -> dict:
        report = tmp_path / f"report{next(runs)}.json"
        # Paced, not --rate max: with an unprivileged, default 208 KiB socket
        # buffer (rmem_max on a stock host) a flush stall must not overflow it.
        rate = [] if "--rate" in args else ["--rate", "1000"]
        cmd = [*prefix, bin_path("sensor-sim"), "--target", target, *rate, "--report", str(report), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(report.read_text())

    return run


def expected(*truths: dict) -> dict:
    """Accounts of one stream from the simulator's truth (several runs = one stream, in order)."""
    first = truths[0]["first_seq"]
    dropped, delivered = set(), []
    duplicates = reordered = 0
    for t in truths:
        offset = (t["first_seq"] - first) & MASK
        drops = {((s - t["first_seq"]) & MASK) + offset for s in t["dropped"]}
        dropped |= drops
        delivered += [offset + i for i in range(t["generated"]) if offset + i not in drops]
        duplicates += len(t["duplicated"])
        reordered += t["reordered"]
        assert t["send_failed"] == []
    lo, hi = min(delivered), max(delivered)
    return {
        "datagrams": len(set(delivered)),
        "readings": METRICS * len(set(delivered)),
        "lost": sum(1 for i in dropped if lo < i < hi),
        "duplicates": duplicates,
        "reordered": reordered,
    }


def stored_readings_per_sensor(db) -> dict[str, int]:
    return dict(
        query(db, "SELECT s.sensor, count(*) FROM readings r JOIN series s ON s.id = r.series GROUP BY s.sensor")
    )


def test_loss_and_reordering_accounts_equal_the_simulator_report(collector, sim, db_path):
    c = collector()
    report = sim(
        f"127.0.0.1:{c.port()}",
        "--sensors",
        "8",
        "--count",
        "400",
        "--seed",
        "11",
        "--loss",
        "0.05",
        "--reorder",
        "0.05",
    )
    c.wait_received(report["datagrams_sent"])
    assert c.stop() == 0
    got = accounts(db_path)
    assert set(got) == set(report["sensors"])
    for sensor, truth in report["sensors"].items():
        exp = expected(truth)
        assert exp["lost"] > 0 and exp["reordered"] > 0  # the faults really happened
        assert got[sensor] == {**exp, "restarts": 0}, sensor
    assert stored_readings_per_sensor(db_path) == {s: a["readings"] for s, a in got.items()}
    # The gap rows add up to the accounts (docs/SCHEMA.md).
    missing = dict(query(db_path, "SELECT sensor, sum(missing) FROM gaps GROUP BY sensor"))
    assert missing == {s: a["lost"] for s, a in got.items() if a["lost"]}
    counters = query_dict(db_path, "SELECT name, value FROM counters")
    assert counters["received"] == report["datagrams_sent"] and counters["kernel_drops"] == 0


def test_loss_duplicates_and_reordering_together(collector, sim, db_path):
    c = collector()
    report = sim(
        f"127.0.0.1:{c.port()}",
        "--sensors",
        "8",
        "--count",
        "400",
        "--seed",
        "5",
        "--loss",
        "0.05",
        "--duplicate",
        "0.05",
        "--reorder",
        "0.05",
    )
    c.wait_received(report["datagrams_sent"])
    assert c.stop() == 0
    got = accounts(db_path)
    assert sum(t["reordered_copies"] for t in report["sensors"].values()) > 0  # the case really arose
    for sensor, truth in report["sensors"].items():
        exp = expected(truth)
        a = got[sensor]
        assert (a["datagrams"], a["readings"], a["lost"], a["duplicates"], a["restarts"]) == (
            exp["datagrams"],
            exp["readings"],
            exp["lost"],
            exp["duplicates"],
            0,
        ), sensor
        # The report's `reordered` also counts the second copy of a held-back
        # duplicated datagram (it too is sent below the highest seq), which the
        # tracker rightly calls a Duplicate: `reordered_copies` says how many.
        assert a["reordered"] == exp["reordered"] - truth["reordered_copies"], sensor
    counters = query_dict(db_path, "SELECT name, value FROM counters")
    dups = sum(len(t["duplicated"]) for t in report["sensors"].values())
    assert counters["duplicates"] == dups
    assert counters["stored"] == report["datagrams_sent"] - dups


def test_restarts_by_boot_change_and_by_seq_reset(collector, sim, db_path):
    c = collector()
    target = f"127.0.0.1:{c.port()}"
    sent = 0
    sent += sim(target, "--sensors", "3", "--count", "50", "--boot-value", "1", "--id-prefix", "boot")["datagrams_sent"]
    sent += sim(target, "--sensors", "3", "--count", "50", "--boot-value", "2", "--id-prefix", "boot")["datagrams_sent"]
    sent += sim(
        target, "--sensors", "3", "--count", "50", "--no-boot", "--start-seq", "1000000", "--id-prefix", "noboot"
    )["datagrams_sent"]
    sent += sim(target, "--sensors", "3", "--count", "50", "--no-boot", "--start-seq", "0", "--id-prefix", "noboot")[
        "datagrams_sent"
    ]
    c.wait_received(sent)
    assert c.stop() == 0
    got = accounts(db_path)
    assert len(got) == 6
    for sensor, a in got.items():
        assert a == {"datagrams": 100, "readings": 300, "lost": 0, "duplicates": 0, "reordered": 0, "restarts": 1}, (
            sensor
        )
    boots = query(
        db_path,
        "SELECT DISTINCT r.boot FROM readings r JOIN series s ON s.id = r.series "
        "WHERE s.sensor LIKE 'boot-%' ORDER BY 1",
    )
    assert boots == [(1,), (2,)]


def test_wraparound_is_in_order(collector, sim, db_path):
    c = collector()
    report = sim(
        f"127.0.0.1:{c.port()}",
        "--sensors",
        "4",
        "--count",
        "40",
        "--start-seq",
        "4294967290",
        "--seed",
        "3",
        "--loss",
        "0.1",
    )
    c.wait_received(report["datagrams_sent"])
    assert c.stop() == 0
    got = accounts(db_path)
    for sensor, truth in report["sensors"].items():
        assert got[sensor] == {**expected(truth), "restarts": 0}, sensor
    seqs = {s for (s,) in query(db_path, "SELECT DISTINCT seq FROM readings")}
    assert 4294967295 in seqs and 0 in seqs and max(seqs) == 4294967295


def test_ipv4_multicast_on_loopback(collector, sim, db_path):
    c = collector("--multicast", "239.77.4.1", "--multicast-interface", "127.0.0.1")
    port = c.port()
    assert c.ports == [f"127.0.0.1:{port}", f"239.77.4.1:{port}"]
    report = sim(
        f"239.77.4.1:{port}", "--sensors", "5", "--count", "60", "--multicast-interface", "127.0.0.1", "--ttl", "0"
    )
    c.wait_received(report["datagrams_sent"])
    assert c.stop() == 0
    got = accounts(db_path)
    assert {s: a["datagrams"] for s, a in got.items()} == {s: 60 for s in report["sensors"]}
    assert query_dict(db_path, "SELECT name, value FROM counters")["received"] == 300


def test_ipv6_unicast_on_loopback(collector, sim, db_path):
    c = collector("--listen", "[::1]:0")
    assert c.ports[0].startswith("[::1]:")
    report = sim(f"[::1]:{c.port()}", "--sensors", "3", "--count", "30")
    c.wait_received(report["datagrams_sent"])
    assert c.stop() == 0
    assert {s: a["datagrams"] for s, a in accounts(db_path).items()} == {s: 30 for s in report["sensors"]}


def _netns_or_skip(name: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("IPv6 multicast test needs root to create a network namespace (ip netns add)")
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "-n", name, "link", "set", "lo", "up"],
        ["ip", "-n", name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"],
        ["ip", "-n", name, "link", "set", "veth0", "multicast", "on", "up"],
        ["ip", "-n", name, "link", "set", "veth1", "multicast", "on", "up"],
        ["ip", "-n", name, "addr", "add", "fd00:7e1e::1/64", "dev", "veth0", "nodad"],
        ["ip", "-n", name, "addr", "add", "fd00:7e1e::2/64", "dev", "veth1", "nodad"],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=10)
        if result.returncode != 0:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
            pytest.skip(f"cannot build the test network namespace ({' '.join(step)}: {result.stderr.strip()})")


def test_ipv6_multicast_in_a_private_network_namespace(collector, sim, db_path, request):
    name = f"tcol{os.getpid()}"
    _netns_or_skip(name)
    request.addfinalizer(lambda: subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10))
    inside = ("ip", "netns", "exec", name)
    # A site-scope group and a link-local one (which needs the interface as its scope id).
    c = collector(
        "--listen",
        "[::1]:0",
        "--multicast",
        "[ff15::7e1e]:4739",
        "--multicast",
        "[ff02::7e1e]:4739",
        "--multicast-interface",
        "veth0",
        prefix=inside,
    )
    assert c.ports[1:] == ["[ff15::7e1e]:4739", "[ff02::7e1e]:4739"]
    site = sim(
        "[ff15::7e1e]:4739",
        "--sensors",
        "4",
        "--count",
        "50",
        "--multicast-interface",
        "veth1",
        "--ttl",
        "1",
        "--id-prefix",
        "site",
        prefix=inside,
    )
    link = sim(
        "[ff02::7e1e%veth1]:4739",
        "--sensors",
        "2",
        "--count",
        "30",
        "--multicast-interface",
        "veth1",
        "--ttl",
        "1",
        "--id-prefix",
        "link",
        prefix=inside,
    )
    c.wait_received(site["datagrams_sent"] + link["datagrams_sent"])
    assert c.stop() == 0
    expected_counts = {**{s: 50 for s in site["sensors"]}, **{s: 30 for s in link["sensors"]}}
    assert {s: a["datagrams"] for s, a in accounts(db_path).items()} == expected_counts
    counters = query_dict(db_path, "SELECT name, value FROM counters")
    assert counters["received"] == 260 and counters["duplicates"] == 0  # one copy each: joined on veth0 only


def test_sigterm_flushes_everything_accepted(collector, sim, db_path):
    c = collector("--flush-interval", "3600", "--status-interval", "0.05")
    report = sim(f"127.0.0.1:{c.port()}", "--sensors", "10", "--count", "100")
    sent = report["datagrams_sent"]
    wait_for(lambda: f"status: received {sent} " in c.log.read_text(), 10, what="all received (status line)")
    assert query(db_path, "SELECT count(*) FROM readings") == [(0,)]  # nothing flushed before the signal
    assert c.stop(signal.SIGTERM) == 0
    assert query(db_path, "SELECT count(*) FROM readings") == [(sent * METRICS,)]
    assert "stopped cleanly" in c.log.read_text()


def test_sigint_stops_cleanly_too(collector, db_path):
    c = collector()
    assert c.stop(signal.SIGINT) == 0
    assert "stopped cleanly" in c.log.read_text()
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]


def test_collector_restart_mid_stream_invents_no_gap_and_misses_no_duplicate(collector, sim, db_path):
    first = collector()
    target = f"127.0.0.1:{first.port()}"
    sent = sim(target, "--sensors", "5", "--count", "100", "--boot-value", "9")["datagrams_sent"]
    first.wait_received(sent)
    assert first.stop() == 0
    second = collector("--listen", target)
    # Seq 99 again (a duplicate across the restart), then 100..198 in order.
    report = sim(target, "--sensors", "5", "--count", "100", "--boot-value", "9", "--start-seq", "99")
    second.wait_received(sent + report["datagrams_sent"])
    assert second.stop() == 0
    for sensor, a in accounts(db_path).items():
        assert a == {"datagrams": 199, "readings": 597, "lost": 0, "duplicates": 1, "reordered": 0, "restarts": 0}, (
            sensor
        )
    assert query(db_path, "SELECT count(*) FROM gaps") == [(0,)]


def test_kill_9_leaves_a_consistent_database_that_restarts(collector, bin_path, db_path, tmp_path):
    c = collector()
    target = f"127.0.0.1:{c.port()}"
    # About one second of traffic; the collector dies mid-stream, after its first flushes.
    sender = subprocess.Popen(
        [
            bin_path("sensor-sim"),
            "--target",
            target,
            "--sensors",
            "20",
            "--count",
            "100",
            "--rate",
            "100",
            "--boot-value",
            "4",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: c.counters().get("stored", 0) > 0, 10, what="a first flush")
        c.kill()
        assert sender.poll() is None, "the simulator finished before the kill: not mid-stream"
    finally:
        sender.wait(30)
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]
    # State and data agree: every account matches the readings stored with it.
    got = accounts(db_path)
    assert got and stored_readings_per_sensor(db_path) == {s: a["readings"] for s, a in got.items()}
    per_sensor_seqs = dict(
        query(
            db_path,
            "SELECT s.sensor, count(DISTINCT r.seq) FROM readings r JOIN series s ON s.id = r.series GROUP BY s.sensor",
        )
    )
    assert per_sensor_seqs == {s: a["datagrams"] for s, a in got.items()}
    assert all(a["datagrams"] < 100 for a in got.values())
    again = collector("--listen", target)
    assert again.stop() == 0
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]


# --- the command line edge: one line, exit code 2 ---------------------------------------


def run_cli(bin_path, *args, env=None, timeout=15):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
    full_env.update(env or {})
    return subprocess.run(
        [bin_path("telemetry-collector"), *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_second_collector_on_the_same_database_is_refused(collector, bin_path, db_path):
    first = collector()
    error = _one_line_error(run_cli(bin_path, "--listen", "127.0.0.1:0", "--db", db_path))
    assert error == (
        f"Error: database {db_path} is in use by another telemetry-collector: "
        "one collector writes one database (give this one its own --db)"
    )
    assert first.stop() == 0
    again = collector()  # the lock went with the first process
    assert again.stop() == 0


def test_cli_errors_are_one_line_with_exit_code_2(bin_path, tmp_path, db_path):
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text("[collector]\nflush-intervall = 2\n")
    assert "unknown key 'flush-intervall' (did you mean 'flush-interval'?)" in _one_line_error(
        run_cli(bin_path, "--config", str(bad_key), "--db", db_path)
    )
    assert "not a multicast group" in _one_line_error(run_cli(bin_path, "--multicast", "10.1.2.3", "--db", db_path))
    assert "unknown interface 'nosuchif0'" in _one_line_error(
        run_cli(
            bin_path,
            "--listen",
            "127.0.0.1:0",
            "--multicast",
            "239.1.2.3",
            "--multicast-interface",
            "nosuchif0",
            "--db",
            db_path,
        )
    )
    assert "cannot open database" in _one_line_error(
        run_cli(bin_path, "--listen", "127.0.0.1:0", "--db", str(tmp_path / "no" / "such" / "dir.db"))
    )
    assert "an IPv6 address needs brackets: write [::1]:4739" in _one_line_error(
        run_cli(bin_path, "--listen", "::1:4739")
    )
    assert "must be > 0" in _one_line_error(run_cli(bin_path, "--flush-interval", "0"))
    assert "'1.5' is not a whole number" in _one_line_error(run_cli(bin_path, "--batch-size", "1.5"))


def test_cli_port_in_use_is_one_line(bin_path, collector, db_path, tmp_path):
    c = collector()
    result = run_cli(bin_path, "--listen", f"127.0.0.1:{c.port()}", "--db", str(tmp_path / "other.db"))
    assert f"port {c.port()} is in use" in _one_line_error(result)
    assert c.stop() == 0


def test_cli_flags_win_over_env_over_file(bin_path, collector, tmp_path, db_path, monkeypatch):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[collector]\nlisten = ["127.0.0.1:0"]\nstatus-interval = 3600\nbatch-size = 7\n')
    monkeypatch.setenv("TELEMETRY_CONFIG", str(cfg))
    monkeypatch.setenv("TELEMETRY_COLLECTOR_BATCH_SIZE", "9")
    c = collector("--flush-interval", "0.5")
    log = c.log.read_text()
    assert "flush every 0.5 s or 9 rows" in log  # flag over default, env over file
    assert c.stop() == 0


def test_help_has_an_example(bin_path):
    result = run_cli(bin_path, "-h")
    assert result.returncode == 0 and "Example:" in result.stdout and "TELEMETRY_COLLECTOR_" in result.stdout


def test_config_file_multicast_only_env_over_file(collector, sim, tmp_path, db_path, monkeypatch):
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a free port for the group
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    cfg = tmp_path / "gateway.toml"
    # No unicast listener at all; the interface in the file is wrong, the environment's wins.
    cfg.write_text(
        f'[collector]\nlisten = []\nmulticast = "239.77.6.1:{port}"\nmulticast-interface = "192.0.2.1"\n'
        f"status-interval = 3600\n"
    )
    monkeypatch.setenv("TELEMETRY_COLLECTOR_MULTICAST_INTERFACE", "lo")
    c = collector("--config", str(cfg))
    assert c.ports == [f"239.77.6.1:{port}"]
    report = sim(
        f"239.77.6.1:{port}", "--sensors", "2", "--count", "10", "--multicast-interface", "127.0.0.1", "--ttl", "0"
    )
    c.wait_received(report["datagrams_sent"])
    assert c.stop() == 0
    assert {s: a["datagrams"] for s, a in accounts(db_path).items()} == {s: 10 for s in report["sensors"]}


def test_a_receive_buffer_beyond_a_c_int_is_one_line_from_flag_and_file(bin_path, tmp_path, db_path):
    # The kernel takes SO_RCVBUF as a C int: a bigger number must be refused
    # at the edge, not crash socket set-up with a traceback.
    message = "must be at most 2147483647"
    assert message in _one_line_error(
        run_cli(bin_path, "--listen", "127.0.0.1:0", "--db", db_path, "--rcvbuf", "3000000000")
    )
    cfg = tmp_path / "c.toml"
    cfg.write_text("[collector]\nrcvbuf = 3000000000\n")
    assert message in _one_line_error(
        run_cli(bin_path, "--listen", "127.0.0.1:0", "--db", db_path, "--config", str(cfg))
    )


def test_a_database_path_sqlite_would_not_keep_is_refused(bin_path, tmp_path):
    # "" and ":memory:" open a database that vanishes at exit: every reading lost.
    for path in ("", ":memory:"):
        assert "the database must be a file" in _one_line_error(run_cli(bin_path, "--db", path, "--check"))
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[collector]\ndb = "{path}"\n')
        assert "the database must be a file" in _one_line_error(run_cli(bin_path, "--config", str(cfg), "--check"))
