"""Signed datagrams end to end: sensor-sim and the Sensor API sign, a plain
receiver verifies with collector.auth; then the collector (in a thread, and as
a real process for SIGHUP and exit codes) verifies, rejects replays (also
after a restart), counts every reason, and never logs a key."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections import Counter

import pytest

from collector import auth
from collector.errors import ConfigError
from helpers import wait_for
from sensor_sim import Sensor

KEY = bytes(range(32))
KEY_HEX = KEY.hex()
KEY2_HEX = "6b0e4c2f8a3d91e7c5b2f4a8d6e1093c7f2a5b8e0d4c6f1a3b9e7d2c5f8a0b4e"
KEY2 = bytes.fromhex(KEY2_HEX)


class Receiver:
    """A UDP socket on 127.0.0.1 (port 0) drained by a thread: the raw bytes, in order."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.target = f"127.0.0.1:{self.port}"
        self.raw: list[bytes] = []
        self.sock.settimeout(0.02)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="test-receiver")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.raw.append(self.sock.recv(65535))
            except TimeoutError:
                pass

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def wait(self, n: int) -> list[bytes]:
        wait_for(lambda: len(self.raw) >= n, 10, what=f"{n} datagrams (got {len(self.raw)})")
        return list(self.raw)


def write_keys(path, mode: int = 0o600, **keys: str):
    path.write_text("".join(f"{k.replace('__', '@')} = {v}\n" for k, v in keys.items()))
    os.chmod(path, mode)
    return path


def run_sim(bin_path, tmp_path, *args: str, env: dict | None = None):
    report = tmp_path / "report.json"
    proc = subprocess.run([bin_path("sensor-sim"), *args, "--report", str(report)],
                          capture_output=True, text=True, timeout=60,
                          env=None if env is None else {**os.environ, **env})
    return proc, (json.loads(report.read_text()) if report.exists() else None)


# --- sensor-sim and the Sensor API sign -------------------------------------------------


def test_sim_signs_every_datagram_with_one_key_for_all_sensors(bin_path, tmp_path):
    with Receiver() as rx:
        proc, report = run_sim(bin_path, tmp_path, "--target", rx.target, "--sensors", "3",
                               "--count", "20", "--rate", "max", "--seed", "5", "--key", KEY_HEX)
        assert proc.returncode == 0, proc.stderr
        raw = rx.wait(60)
    assert len(raw) == 60 == report["datagrams_sent"]
    keyring = {f"sim-000{i}": KEY for i in (1, 2, 3)}
    seen = Counter()
    for data in raw:
        assert auth.is_signed(data)
        datagram, key_id = auth.decode_signed(data, keyring)
        assert key_id == datagram.sensor
        assert datagram.boot == report["sensors"][datagram.sensor]["boot"]
        seen[(datagram.sensor, datagram.seq)] += 1
    assert seen == Counter({(f"sim-000{i}", s): 1 for i in (1, 2, 3) for s in range(20)})


def test_sim_signs_each_sensor_with_its_own_key_from_a_key_file(bin_path, tmp_path):
    keys = write_keys(tmp_path / "keys", **{"sim-0001__2026": KEY_HEX, "sim-0002__2026": KEY2_HEX,
                                            "sim-0001": KEY2_HEX})
    with Receiver() as rx:
        proc, report = run_sim(bin_path, tmp_path, "--target", rx.target, "--sensors", "2",
                               "--count", "5", "--rate", "max", "--keys", str(keys),
                               "--key-id", "{sensor}@2026")
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
        proc, report = run_sim(bin_path, tmp_path, "--target", rx.target, "--sensors", "1",
                               "--count", "200", "--rate", "max", "--seed", "9", "--duplicate", "0.1",
                               "--reorder", "0.1", env={"SENSOR_SIM_KEY": KEY2_HEX})
        assert proc.returncode == 0, proc.stderr
        raw = rx.wait(report["datagrams_sent"])
    t = report["sensors"]["sim-0001"]
    assert len(raw) == 200 + len(t["duplicated"]) and t["duplicated"]
    seqs = Counter(auth.decode_signed(d, {"sim-0001": KEY2})[0].seq for d in raw)
    assert seqs == Counter(list(range(200)) + t["duplicated"])
    assert KEY2_HEX not in proc.stderr + proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--key", "abcd"], "Invalid value for --key: a key must be 16-64 bytes"),
    (["--key", "zz" * 16], "Invalid value for --key: a key must be an even number of hex digits"),
    (["--key", KEY_HEX, "--key-id", "other"], "key id 'other' cannot sign for sensor 'sim-0001'"),
    (["--key", KEY_HEX, "--key-id", "{sensor}@bad id"], "key id"),
    (["--key", KEY_HEX, "--no-boot"], "signed datagrams carry boot: drop --no-boot"),
    (["--key", KEY_HEX, "--start-seq", "4294967290"], "would wrap seq under one boot"),
    (["--key-id", "sim-0001"], "--key-id needs --key or --keys"),
])
def test_sim_signing_flag_errors_give_one_line_and_exit_2(bin_path, args, message):
    proc = subprocess.run([bin_path("sensor-sim"), "--target", "127.0.0.1:9", "--sensors", "1",
                           "--count", "10", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert KEY_HEX not in proc.stderr


def test_sim_refuses_a_world_readable_key_file_and_a_missing_key(bin_path, tmp_path):
    keys = write_keys(tmp_path / "keys", mode=0o644, **{"sim-0001": KEY_HEX})
    proc = subprocess.run([bin_path("sensor-sim"), "--target", "127.0.0.1:9", "--count", "1",
                           "--sensors", "1", "--keys", str(keys)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "chmod 600" in proc.stderr and KEY_HEX not in proc.stderr
    os.chmod(keys, 0o600)
    proc = subprocess.run([bin_path("sensor-sim"), "--target", "127.0.0.1:9", "--count", "1",
                           "--sensors", "2", "--keys", str(keys)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "no key 'sim-0002' in the key file" in proc.stderr
    assert KEY_HEX not in proc.stderr


def test_sim_signed_replay_of_a_recording(bin_path, tmp_path):
    rec = tmp_path / "rec.csv"
    rec.write_text("sensor,ts,metric,value\ngh-1,100,temp,20.5\ngh-1,101,temp,20.6\ngh-2,101,temp,19\n")
    with Receiver() as rx:
        proc, _ = run_sim(bin_path, tmp_path, "--target", rx.target, "--replay", str(rec),
                          "--speed", "1000", "--key", KEY_HEX)
        assert proc.returncode == 0, proc.stderr
        raw = rx.wait(3)
    got = sorted((d.sensor, d.seq, d.ts) for d, _ in (auth.decode_signed(x, {"gh-1": KEY, "gh-2": KEY})
                                                      for x in raw))
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
    got = [(auth.decode_signed(d, ring)[1], auth.decode_signed(d, ring)[0].boot,
            auth.decode_signed(d, ring)[0].seq) for d in raw]
    assert got == [("gh-1", 41, 2**32 - 2), ("gh-1", 41, 2**32 - 1), ("gh-1", 42, 0), ("gh-1", 42, 1),
                   ("gh-1@2026", 1, 0)]


def test_sensor_api_refuses_bad_signing_arguments():
    with pytest.raises(ConfigError, match="cannot sign for sensor"):
        Sensor("gh-1", target=("127.0.0.1", 9), key=KEY, key_id="gh-2")
    with pytest.raises(ConfigError, match="carry boot"):
        Sensor("gh-1", target=("127.0.0.1", 9), key=KEY, boot=False)
    with pytest.raises(ConfigError, match="16-64 bytes"):
        Sensor("gh-1", target=("127.0.0.1", 9), key="abcd")
    with pytest.raises(ConfigError, match="key_id without key"):
        Sensor("gh-1", target=("127.0.0.1", 9), key_id="gh-1")
