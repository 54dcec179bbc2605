"""Signed datagrams end to end: sensor-sim and the Sensor API sign, a plain
receiver verifies with collector.auth; then the collector (in a thread, and as
a real process for SIGHUP and exit codes) verifies, rejects replays (also
after a restart), counts every reason, and never logs a key."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
from collections import Counter
from contextlib import contextmanager

import pytest

from collector import auth, wire
from collector.errors import ConfigError
from collector.schema import REJECT_REASONS, open_reader
from collector.server import Collector, Settings
from query.ops import Ops
from sensor_sim import Sensor

from helpers import Receiver, db_counters, db_query, running_collector, wait_for
from processes import CollectorProcess

KEY = bytes(range(32))
KEY_HEX = KEY.hex()
KEY2_HEX = "6b0e4c2f8a3d91e7c5b2f4a8d6e1093c7f2a5b8e0d4c6f1a3b9e7d2c5f8a0b4e"
KEY2 = bytes.fromhex(KEY2_HEX)


def write_keys(path, mode: int = 0o600, **keys: str):
    path.write_text("".join(f"{k.replace('__', '@')} = {v}\n" for k, v in keys.items()))
    os.chmod(path, mode)
    return path


def run_sim(bin_path, tmp_path, *args: str, env: dict | None = None):
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [bin_path("sensor-sim"), *args, "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=60,
        env=None if env is None else {**os.environ, **env},
    )
    return proc, (json.loads(report.read_text()) if report.exists() else None)


# --- sensor-sim and the Sensor API sign -------------------------------------------------


def test_sim_signs_every_datagram_with_one_key_for_all_sensors(bin_path, tmp_path):
    with Receiver() as rx:
        proc, report = run_sim(
            bin_path,
            tmp_path,
            "--target",
            rx.target,
            "--sensors",
            "3",
            "--count",
            "20",
            "--rate",
            "max",
            "--seed",
            "5",
            "--key",
            KEY_HEX,
        )
        assert proc.returncode == 0, proc.stderr
        raw = rx.wait(60)
    assert len(raw) == 60 == report["datagrams_sent"]
    keyring = {f"sim-000{i}": KEY for i in (1, 2, 3)}
    seen = Counter()
    for data in raw:
        assert data[0] == auth.SIGNED_MARKER
        datagram, key_id = auth.decode_signed(data, keyring)
        assert key_id == datagram.sensor
        assert datagram.boot == report["sensors"][datagram.sensor]["boot"]
        seen[(datagram.sensor, datagram.seq)] += 1
    assert seen == Counter({(f"sim-000{i}", s): 1 for i in (1, 2, 3) for s in range(20)})


def test_sim_signs_each_sensor_with_its_own_key_from_a_key_file(bin_path, tmp_path):
    keys = write_keys(
        tmp_path / "keys", **{"sim-0001__2026": KEY_HEX, "sim-0002__2026": KEY2_HEX, "sim-0001": KEY2_HEX}
    )
    with Receiver() as rx:
        proc, report = run_sim(
            bin_path,
            tmp_path,
            "--target",
            rx.target,
            "--sensors",
            "2",
            "--count",
            "5",
            "--rate",
            "max",
            "--keys",
            str(keys),
            "--key-id",
            "{sensor}@2026",
        )
        assert proc.returncode == 0, proc.stderr
        raw = rx.wait(10)
    ring = auth.load_keys(keys)
    got = sorted((auth.decode_signed(d, ring)[1], auth.decode_signed(d, ring)[0].seq) for d in raw)
    assert got == [(f"sim-000{i}@2026", s) for i in (1, 2) for s in range(5)]
    # and each really is under its own key: sim-0001@2026's datagrams fail under sim-0002's key
    first = next(d for d in raw if auth.decode_signed(d, ring)[1] == "sim-0001@2026")
    with pytest.raises(Exception) as info:
        auth.verify(first, {"sim-0001@2026": KEY2})
    assert info.value.reason == "bad_mac"


def test_sim_key_from_the_environment_and_faults_still_signed(bin_path, tmp_path):
    with Receiver() as rx:
        proc, report = run_sim(
            bin_path,
            tmp_path,
            "--target",
            rx.target,
            "--sensors",
            "1",
            "--count",
            "200",
            "--rate",
            "max",
            "--seed",
            "9",
            "--duplicate",
            "0.1",
            "--reorder",
            "0.1",
            env={"SENSOR_SIM_KEY": KEY2_HEX},
        )
        assert proc.returncode == 0, proc.stderr
        raw = rx.wait(report["datagrams_sent"])
    t = report["sensors"]["sim-0001"]
    assert len(raw) == 200 + len(t["duplicated"]) and t["duplicated"]
    seqs = Counter(auth.decode_signed(d, {"sim-0001": KEY2})[0].seq for d in raw)
    assert seqs == Counter(list(range(200)) + t["duplicated"])
    assert KEY2_HEX not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--key", "abcd"], "Invalid value for --key: a key must be 16-64 bytes"),
        (["--key", "zz" * 16], "Invalid value for --key: a key must be an even number of hex digits"),
        (["--key", KEY_HEX, "--key-id", "other"], "key id 'other' cannot sign for sensor 'sim-0001'"),
        (["--key", KEY_HEX, "--key-id", "{sensor}@bad id"], "key id"),
        (["--key", KEY_HEX, "--no-boot"], "signed datagrams carry boot: drop --no-boot"),
        (["--key", KEY_HEX, "--start-seq", "4294967290"], "would wrap seq under one boot"),
        (["--key-id", "sim-0001"], "--key-id needs --key or --keys"),
    ],
)
def test_sim_signing_flag_errors_give_one_line_and_exit_2(bin_path, args, message):
    proc = subprocess.run(
        [bin_path("sensor-sim"), "--target", "127.0.0.1:9", "--sensors", "1", "--count", "10", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert KEY_HEX not in proc.stderr


def test_sim_refuses_a_world_readable_key_file_and_a_missing_key(bin_path, tmp_path):
    keys = write_keys(tmp_path / "keys", mode=0o644, **{"sim-0001": KEY_HEX})
    proc = subprocess.run(
        [bin_path("sensor-sim"), "--target", "127.0.0.1:9", "--count", "1", "--sensors", "1", "--keys", str(keys)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "chmod 600" in proc.stderr and KEY_HEX not in proc.stderr
    os.chmod(keys, 0o600)
    proc = subprocess.run(
        [bin_path("sensor-sim"), "--target", "127.0.0.1:9", "--count", "1", "--sensors", "2", "--keys", str(keys)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "no key 'sim-0002' in the key file" in proc.stderr
    assert KEY_HEX not in proc.stderr


def test_sim_signed_replay_of_a_recording(bin_path, tmp_path):
    rec = tmp_path / "rec.csv"
    rec.write_text("sensor,ts,metric,value\ngh-1,100,temp,20.5\ngh-1,101,temp,20.6\ngh-2,101,temp,19\n")
    with Receiver() as rx:
        proc, _ = run_sim(
            bin_path, tmp_path, "--target", rx.target, "--replay", str(rec), "--speed", "1000", "--key", KEY_HEX
        )
        assert proc.returncode == 0, proc.stderr
        raw = rx.wait(3)
    got = sorted((d.sensor, d.seq, d.ts) for d, _ in (auth.decode_signed(x, {"gh-1": KEY, "gh-2": KEY}) for x in raw))
    assert got == [("gh-1", 0, 100), ("gh-1", 1, 101), ("gh-2", 0, 101)]


def test_sensor_api_signs_and_bumps_boot_instead_of_wrapping():
    with Receiver() as rx:
        with Sensor("gh-1", target=("127.0.0.1", rx.port), boot=41, seq=2**32 - 2, key=KEY_HEX) as s:
            assert [s.send({"t": i}) for i in range(4)] == [2**32 - 2, 2**32 - 1, 0, 1]
            assert s.boot == 42
        with Sensor("gh-1", target=("127.0.0.1", rx.port), boot=1, key=KEY2, key_id="gh-1@2026") as s:
            s.send({"t": 9})
        raw = rx.wait(5)
    ring = {"gh-1": KEY, "gh-1@2026": KEY2}
    got = [
        (auth.decode_signed(d, ring)[1], auth.decode_signed(d, ring)[0].boot, auth.decode_signed(d, ring)[0].seq)
        for d in raw
    ]
    assert got == [
        ("gh-1", 41, 2**32 - 2),
        ("gh-1", 41, 2**32 - 1),
        ("gh-1", 42, 0),
        ("gh-1", 42, 1),
        ("gh-1@2026", 1, 0),
    ]


def test_sensor_api_refuses_bad_signing_arguments():
    with pytest.raises(ConfigError, match="cannot sign for sensor"):
        Sensor("gh-1", target=("127.0.0.1", 9), key=KEY, key_id="gh-2")
    with pytest.raises(ConfigError, match="carry boot"):
        Sensor("gh-1", target=("127.0.0.1", 9), key=KEY, boot=False)
    with pytest.raises(ConfigError, match="16-64 bytes"):
        Sensor("gh-1", target=("127.0.0.1", 9), key="abcd")
    with pytest.raises(ConfigError, match="key_id without key"):
        Sensor("gh-1", target=("127.0.0.1", 9), key_id="gh-1")


# --- the collector verifies ------------------------------------------------------------------

AUTH_REASONS = ("not_signed", "bad_envelope", "unknown_key", "bad_mac", "wrong_key", "replayed")


@contextmanager
def running(db_path: str, **overrides):
    with running_collector(db_path, **overrides) as (collector, _):
        yield collector


def signed(
    sensor: str, seq: int, boot: int = 1, key: bytes = KEY, key_id: str | None = None, value: float = 20.0
) -> bytes:
    body = wire.encode(sensor, seq, {"temp": value}, boot=boot, ts=1_700_000_000 + seq)
    return auth.sign(body, key_id or sensor, key)


class Link:
    """A plain UDP socket on 127.0.0.1 that sends to one collector and waits until it has read."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.address = collector.addresses[0]
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))

    def send(self, *datagrams: bytes) -> None:
        before = self.collector.counters["received"]
        for d in datagrams:
            self.sock.sendto(d, self.address)
        wait_for(
            lambda: self.collector.counters["received"] >= before + len(datagrams),
            5,
            what=f"{len(datagrams)} datagrams read",
        )

    def flushed(self) -> dict:
        """The counters as the database has them, after a flush of everything read."""
        done = threading.Event()
        self.collector.call_soon(lambda: (self.collector.flush(), done.set()))
        assert done.wait(5)
        return db_counters(self.collector.settings.db)

    def close(self) -> None:
        self.sock.close()


def rejected(c: dict) -> dict:
    return {r: int(c[f"rejected:{r}"]) for r in REJECT_REASONS if c.get(f"rejected:{r}")}


def temps(db_path, sensor: str) -> list[tuple]:
    return db_query(
        db_path,
        "SELECT r.boot, r.seq, r.value FROM readings r JOIN series s ON s.id = r.series "
        "WHERE s.sensor = ? ORDER BY r.boot, r.seq",
        sensor,
    )


def test_every_reason_is_a_counter_from_the_start_and_stats_lists_them(db_path, tmp_path):
    keys = write_keys(tmp_path / "keys", s1=KEY_HEX)
    with running(db_path, keys=str(keys)) as c:
        link = Link(c)
        link.send(signed("s1", 0))
        counts = link.flushed()
        link.close()
    for reason in AUTH_REASONS + tuple(wire.REASONS):
        assert counts[f"rejected:{reason}"] == 0
    conn = open_reader(db_path)
    try:
        stats = Ops(conn).op_stats()
    finally:
        conn.close()
    assert set(stats["rejected"]) == set(REJECT_REASONS) >= set(AUTH_REASONS)
    assert stats["stored"] == 1 and not any(stats["rejected"].values())


def test_signed_sim_to_collector_stores_everything_and_accounts_exactly(bin_path, db_path, tmp_path):
    keys = write_keys(tmp_path / "keys", **{f"sim-000{i}": KEY_HEX for i in (1, 2, 3)})
    with running(db_path, keys=str(keys), require_auth=True) as c:
        proc, report = run_sim(
            bin_path,
            tmp_path,
            "--target",
            f"127.0.0.1:{c.addresses[0][1]}",
            "--sensors",
            "3",
            "--count",
            "200",
            "--rate",
            "300",
            "--seed",
            "11",
            "--loss",
            "0.05",
            "--duplicate",
            "0.03",
            "--reorder",
            "0.05",
            "--key",
            KEY_HEX,
        )
        assert proc.returncode == 0, proc.stderr
        link = Link(c)
        wait_for(lambda: c.counters["received"] >= report["datagrams_sent"], 10, what="all datagrams")
        counts = link.flushed()
        link.close()
    truths = report["sensors"]
    dropped = sum(len(t["dropped"]) for t in truths.values())
    duplicated = sum(len(t["duplicated"]) for t in truths.values())
    assert dropped and duplicated and sum(t["reordered"] for t in truths.values())
    assert counts["received"] == report["datagrams_sent"] == 600 - dropped + duplicated
    assert counts["stored"] == 600 - dropped
    # a duplicate of a signed datagram is a byte-identical copy: a replay
    assert rejected(counts) == {"replayed": duplicated}
    rows = db_query(db_path, "SELECT sensor, datagrams, lost, duplicates, restarts FROM sensors ORDER BY sensor")
    assert rows == [(sid, 200 - len(t["dropped"]), _lost(t), 0, 0) for sid, t in sorted(truths.items())]


def _lost(truth: dict) -> int:
    """Dropped seqs between the lowest and highest received (the tracker's definition)."""
    got = sorted(set(range(truth["generated"])) - set(truth["dropped"]))
    return sum(1 for s in truth["dropped"] if got[0] < s < got[-1])


def test_replays_are_rejected_now_after_a_restart_and_with_a_lower_boot(db_path, tmp_path):
    keys = write_keys(tmp_path / "keys", s1=KEY_HEX)
    captured = [signed("s1", seq, boot=5, value=seq) for seq in range(4)]
    with running(db_path, keys=str(keys)) as c:
        link = Link(c)
        link.send(*captured)
        link.send(captured[1])  # resent later, same bytes, from another socket than the sensor's
        counts = link.flushed()
        link.close()
    assert counts["stored"] == 4 and rejected(counts) == {"replayed": 1}
    assert temps(db_path, "s1") == [(5, s, float(s)) for s in range(4)]

    with running(db_path, keys=str(keys)) as c:  # a restart: the window comes back from the database
        link = Link(c)
        link.send(*captured)  # every one of them again
        link.send(signed("s1", 1000, boot=4))  # a lower boot, never seen: replayed too
        link.send(signed("s1", 2, boot=5, value=99.0))  # a new datagram claiming an old seq
        link.send(signed("s1", 4, boot=5, value=4.0), signed("s1", 0, boot=6, value=60.0))  # fresh
        counts = link.flushed()
        link.close()
    assert rejected(counts) == {"replayed": 1 + 4 + 1 + 1}
    assert counts["stored"] == 6
    assert temps(db_path, "s1") == [(5, s, float(s)) for s in range(5)] + [(6, 0, 60.0)]
    assert db_query(db_path, "SELECT datagrams, duplicates, restarts FROM sensors") == [(6, 0, 1)]


def test_each_rejection_reason_of_a_signed_datagram(db_path, tmp_path):
    keys = write_keys(tmp_path / "keys", s1=KEY_HEX, s2=KEY2_HEX)
    good = signed("s1", 7)
    tampered = bytearray(good)
    tampered[20] ^= 0x01  # a body byte
    bad_tag = good[:-1] + bytes([good[-1] ^ 0x80])
    cases = {
        "bad_mac": [bytes(tampered), bad_tag, signed("s1", 8, key=KEY2)],
        "unknown_key": [signed("s3", 1, key=KEY), signed("s1", 9, key_id="s1@2027")],
        "wrong_key": [signed("s1", 10, key=KEY2, key_id="s2")],
        "bad_envelope": [b"\x93\xa2s1" + b"\x80" * 3, good[:-1]],
        "bad_boot": [auth.sign(wire.encode("s1", 11, {"t": 1}), "s1", KEY)],
        "not_msgpack": [auth.sign(b"\xc1", "s1", KEY)],
    }
    with running(db_path, keys=str(keys)) as c:
        link = Link(c)
        link.send(good)
        for datagrams in cases.values():
            link.send(*datagrams)
        counts = link.flushed()
        link.close()
    assert rejected(counts) == {reason: len(d) for reason, d in cases.items()}
    assert counts["stored"] == 1
    assert temps(db_path, "s1") == [(1, 7, 20.0)]
    assert [r[0] for r in db_query(db_path, "SELECT sensor FROM sensors")] == ["s1"]


def test_plain_datagrams_with_and_without_require_auth(db_path, tmp_path):
    keys = write_keys(tmp_path / "keys", s1=KEY_HEX)
    plain_keyed = wire.encode("s1", 1, {"t": 1.0}, boot=1)  # s1 has a key: must sign
    plain_free = wire.encode("p1", 1, {"t": 1.0}, boot=1)  # p1 has none
    with running(db_path, keys=str(keys)) as c:
        link = Link(c)
        link.send(plain_keyed, plain_free, signed("s1", 2))
        counts = link.flushed()
        link.close()
    assert rejected(counts) == {"not_signed": 1} and counts["stored"] == 2
    with running(db_path, keys=str(keys), require_auth=True) as c:
        link = Link(c)
        link.send(plain_free, wire.encode("p1", 2, {"t": 1.0}), b"", signed("s1", 3))
        counts = link.flushed()
        link.close()
    assert rejected(counts) == {"not_signed": 1 + 3} and counts["stored"] == 3


def test_oversized_plain_datagrams_are_too_large_before_not_signed(db_path, tmp_path):
    # issue 13 item 4: under --require-auth an oversized plain datagram was not_signed.
    keys = write_keys(tmp_path / "keys", s1=KEY_HEX)
    big = [b"\x81" + b"\x00" * (n - 1) for n in (8193, 9000, 65507)]
    with running(db_path, keys=str(keys), require_auth=True) as c:
        link = Link(c)
        link.send(*big, wire.encode("p1", 1, {"t": 1.0}), signed("s1", 1))
        counts = link.flushed()
        link.close()
    assert rejected(counts) == {"too_large": 3, "not_signed": 1} and counts["stored"] == 1
    with running(db_path, keys=str(keys)) as c:  # a keyed sensor's oversized plain datagram too
        link = Link(c)
        link.send(*big)
        counts = link.flushed()
        link.close()
    assert rejected(counts) == {"too_large": 3 + 3, "not_signed": 1}


def test_bad_key_settings_are_config_errors_naming_no_key(db_path, tmp_path):
    from collector.errors import ConfigError

    keys = write_keys(tmp_path / "keys", mode=0o644, s1=KEY_HEX)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        Collector(Settings(db=db_path, listen=(("127.0.0.1", 0),), keys=str(keys)))
    assert KEY_HEX not in str(info.value)
    with pytest.raises(ConfigError, match="--require-auth needs --keys"):
        Collector(Settings(db=db_path, listen=(("127.0.0.1", 0),), require_auth=True))


# --- the collector as a process: SIGHUP, exit codes, logs ----------------------------------


def start_collector(bin_path, db_path, log_path, *args):
    collector = CollectorProcess(bin_path("telemetry-collector"), db_path, log_path, *args)
    return collector.proc, collector.port()


def test_sighup_reloads_keys_and_a_bad_file_keeps_the_old_ones(bin_path, db_path, tmp_path):
    keys = write_keys(tmp_path / "keys", s1=KEY_HEX)
    log_path = tmp_path / "collector.log"
    proc, port = start_collector(bin_path, db_path, log_path, "--keys", str(keys), "--require-auth")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:

        def counter(name):
            try:
                return db_counters(db_path).get(name, 0)
            except sqlite3.Error:
                return 0

        sock.sendto(signed("s2", 0, key=KEY2), ("127.0.0.1", port))
        wait_for(lambda: counter("rejected:unknown_key") == 1, 10, what="unknown_key")

        write_keys(keys, s1=KEY_HEX, s2=KEY2_HEX)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keys reloaded" in log_path.read_text(), 10, what="the reload line")
        sock.sendto(signed("s2", 1, key=KEY2), ("127.0.0.1", port))
        wait_for(lambda: counter("stored") == 1, 10, what="s2 stored")

        os.chmod(keys, 0o644)  # a reload that fails: the old keys stay in force
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keys not reloaded" in log_path.read_text(), 10, what="the refusal line")
        sock.sendto(signed("s2", 2, key=KEY2), ("127.0.0.1", port))
        wait_for(lambda: counter("stored") == 2, 10, what="s2 still stored")

        os.chmod(keys, 0o600)
        write_keys(keys, s1=KEY_HEX)  # s2's key removed
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log_path.read_text().count("keys reloaded") == 2, 10, what="the second reload")
        sock.sendto(signed("s2", 3, key=KEY2), ("127.0.0.1", port))
        wait_for(lambda: counter("rejected:unknown_key") == 2, 10, what="unknown_key again")
    finally:
        sock.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    text = log_path.read_text()
    assert len([line for line in text.splitlines() if "keys not reloaded" in line]) == 1
    for secret in (KEY_HEX, KEY2_HEX, KEY.hex().upper(), KEY2_HEX.upper()):
        assert secret not in text
    assert "Traceback" not in text


def test_cli_key_file_errors_are_one_line_exit_2_without_the_key(bin_path, db_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
    keys = write_keys(tmp_path / "keys", mode=0o604, s1=KEY_HEX)
    broken = write_keys(tmp_path / "broken", s1="00" * 8)
    conf = tmp_path / "gateway.toml"
    conf.write_text(f'[collector]\nkeys = "{keys}"\nrequire-auth = "yes"\n')
    for args, message in (
        (["--keys", str(keys)], f"key file {keys} is mode 0604"),
        (["--keys", str(broken)], f"key file {broken} line 1 (key s1): a key must be 16-64 bytes"),
        (["--keys", str(tmp_path / "missing")], "No such file"),
        (["--require-auth"], "--require-auth needs --keys"),
        (["--config", str(conf)], "bad value for 'require-auth'"),
    ):
        proc = subprocess.run(
            [bin_path("telemetry-collector"), "--db", db_path, "--listen", "127.0.0.1:0", *args],
            capture_output=True,
            text=True,
            timeout=15,
            env=env,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr
        assert KEY_HEX not in proc.stderr and "00" * 8 not in proc.stderr


def test_keys_and_require_auth_from_the_environment_and_the_file(bin_path, db_path, tmp_path):
    keys = write_keys(tmp_path / "keys", s1=KEY_HEX)
    conf = tmp_path / "gateway.toml"
    conf.write_text(f'[collector]\nkeys = "{keys}"\nrequire-auth = true\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
    for extra_env, args in (
        ({}, ["--config", str(conf)]),
        ({"TELEMETRY_COLLECTOR_KEYS": str(keys), "TELEMETRY_COLLECTOR_REQUIRE_AUTH": "1"}, []),
    ):
        with CollectorProcess(
            bin_path("telemetry-collector"),
            db_path,
            tmp_path / f"c{len(extra_env)}.log",
            "--listen",
            "127.0.0.1:0",
            *args,
            env={**env, **extra_env},
        ) as collector:
            assert "signed datagrams: 1 key" in collector.text()
            assert "unsigned datagrams are rejected" in collector.text()
            assert collector.stop() == 0


def test_any_mix_of_signed_forged_replayed_and_junk_is_accounted_exactly_once(tmp_path):
    """Property: with keys loaded, every datagram of a burst lands in exactly one
    account, internal_errors stays 0, and a resent signed datagram is always replayed."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from collector.server import _Source

    keys = write_keys(tmp_path / "keys", s1=KEY_HEX, s2=KEY2_HEX)
    collector = Collector(Settings(db=str(tmp_path / "p.db"), listen=(("127.0.0.1", 0),), keys=str(keys)))
    source = _Source(collector.endpoints[0])
    c = collector.counters
    next_seq = {"s1": 0, "s2": 0}
    sent: list[bytes] = []

    def accounted():
        return (
            collector.core.pending_datagrams
            + c["duplicates"]
            + c["truncated"]
            + c["refused_sensors"]
            + c["internal_errors"]
            + sum(c[f"rejected:{r}"] for r in REJECT_REASONS)
        )

    def fresh(sensor: str) -> bytes:
        next_seq[sensor] += 1
        d = signed(sensor, next_seq[sensor], key=KEY if sensor == "s1" else KEY2)
        sent.append(d)
        return d

    kinds = st.one_of(
        st.sampled_from(["s1", "s2"]).map(lambda s: ("fresh", s)),
        st.just(("replay", None)),
        st.tuples(st.just("flip"), st.integers(0, 200)),
        st.tuples(st.just("plain"), st.sampled_from(["s1", "p1"])),
        st.tuples(st.just("junk93"), st.binary(max_size=80)),
        st.tuples(st.just("junk"), st.binary(max_size=80)),
    )

    @settings(max_examples=120)
    @given(st.lists(kinds, max_size=30))
    def check(plan):
        burst, replays = [], 0
        for kind, arg in plan:
            if kind == "fresh":
                burst.append(fresh(arg))
            elif kind == "replay" and sent:
                burst.append(sent[len(sent) // 2])
                replays += 1
            elif kind == "flip" and sent:
                d = bytearray(sent[-1])
                d[arg % len(d)] ^= 0x04
                burst.append(bytes(d))
            elif kind == "plain":
                burst.append(wire.encode(arg, len(sent), {"t": 1.0}, boot=1))
            elif kind == "junk93":
                burst.append(b"\x93" + arg)
            elif kind == "junk":
                burst.append(arg)
        before, replayed = accounted(), c["rejected:replayed"]
        collector._process(burst, None, source, 1_700_000_000.0)
        assert accounted() - before == len(burst)
        assert c["internal_errors"] == 0
        assert c["rejected:replayed"] - replayed >= replays

    try:
        check()
    finally:
        collector.server_close()
    assert c["rejected:replayed"] and c["rejected:bad_mac"] and c["rejected:not_signed"]


def test_a_key_file_that_fails_to_read_on_reload_keeps_the_old_keys(db_path, tmp_path, caplog):
    keys = write_keys(tmp_path / "keys", s1=KEY_HEX)
    link = tmp_path / "keys-link"
    link.symlink_to(keys)
    collector = Collector(Settings(db=db_path, listen=(("127.0.0.1", 0),), keys=str(link)))
    try:
        link.unlink()
        link.symlink_to("/proc/self/mem")  # a regular 0600 file whose read fails with EIO
        assert collector.reload_keys() is False
        assert set(collector.keyring) == {"s1"}
        assert sum("keys not reloaded" in r.getMessage() for r in caplog.records) == 1
    finally:
        collector.server_close()


def test_check_refuses_require_auth_without_keys_as_a_start_would(bin_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
    proc = subprocess.run(
        [bin_path("telemetry-collector"), "--db", str(tmp_path / "c.db"), "--require-auth", "--check"],
        capture_output=True,
        text=True,
        timeout=15,
        env=env,
    )
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr == "Error: --require-auth needs --keys FILE: without keys every datagram would be rejected\n"
    assert proc.stdout == ""
