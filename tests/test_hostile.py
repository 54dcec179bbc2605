"""Hostile input end to end: a junk storm beside real sensors, against the real collector process.

Tens of thousands of mutated and random datagrams (the fuzz engine's cases:
bit flips, truncation, lying lengths, deep nesting, unknown ext types) are
sent while `sensor-sim` sends valid readings.  Every valid datagram must be
stored with exact accounts, every junk datagram counted under the reason the
decoder gives it, and nothing may crash or stall the loop.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
from collections import Counter

from collector import wire
from collector.errors import DecodeError

from helpers import accounts, load_fuzz_engine, wait_for
from helpers import db_dict as query_dict
from processes import CollectorProcess

fuzz = load_fuzz_engine()

JUNK = 30_000
SENSORS, COUNT = 10, 400
WINDOW = 500  # junk datagrams in flight before waiting for the collector to catch up


def junk_cases(n: int, seed: int) -> tuple[list[bytes], Counter]:
    """n datagrams the decoder rejects, with the reason it gives each.

    Mutations that happen to decode are left out (they would be valid data
    from invented sensors), and so are those that start like a signed
    datagram (0x93), whose reasons belong to tests/test_auth*.py.
    """
    rng = random.Random(seed)
    corpus = fuzz.seeds()
    cases: list[bytes] = []
    reasons: Counter = Counter()
    while len(cases) < n:
        data = fuzz.mutate(rng, corpus) if rng.random() < 0.9 else rng.randbytes(rng.randrange(1, 300))
        if not data or data[0] == 0x93:
            continue
        try:
            wire.decode(data)
        except DecodeError as exc:
            cases.append(data)
            reasons[exc.reason] += 1
    return cases, reasons


def test_junk_storm_beside_real_sensors_loses_no_valid_datagram(bin_path, db_path, tmp_path):
    cases, reasons = junk_cases(JUNK, seed=6)
    assert len(reasons) >= 8  # the storm exercises nearly every reason
    collector = CollectorProcess(bin_path("telemetry-collector"), db_path, tmp_path / "c.log")
    port = collector.port()
    report_path = tmp_path / "truth.json"
    sim = subprocess.Popen(
        [
            bin_path("sensor-sim"),
            "--target",
            f"127.0.0.1:{port}",
            "--sensors",
            str(SENSORS),
            "--count",
            str(COUNT),
            "--rate",
            "200",
            "--seed",
            "3",
            "--report",
            str(report_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i, data in enumerate(cases, 1):
            sock.sendto(data, ("127.0.0.1", port))
            if i % WINDOW == 0:
                wait_for(
                    lambda: collector.counters().get("received", 0) >= i - WINDOW,
                    10,
                    what="the collector to keep up with the storm",
                )
        _, err = sim.communicate(timeout=60)
        assert sim.returncode == 0, err
    finally:
        sock.close()
        if sim.poll() is None:
            sim.kill()
            sim.wait()
    report = json.loads(report_path.read_text())
    total = JUNK + report["datagrams_sent"]
    collector.wait_received(total)
    assert collector.stop() == 0

    counters = query_dict(db_path, "SELECT name, value FROM counters")
    assert counters["kernel_drops"] == 0  # so the counts below are exact
    assert {r: counters.get(f"rejected:{r}", 0) for r in wire.REASONS} == {r: reasons[r] for r in wire.REASONS}
    assert counters["received"] == total
    assert counters["stored"] == report["datagrams_sent"] == SENSORS * COUNT
    assert counters["internal_errors"] == 0
    got = accounts(db_path)
    assert set(got) == set(report["sensors"])
    for sensor, acct in got.items():
        assert acct == {
            "datagrams": COUNT,
            "readings": 3 * COUNT,
            "lost": 0,
            "duplicates": 0,
            "reordered": 0,
            "restarts": 0,
        }, sensor
