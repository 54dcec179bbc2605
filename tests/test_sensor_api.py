"""The Sensor API (issue 13 item 10): a boot that cannot repeat across back-to-back
restarts, boot and seq refused outside uint32 instead of masked, numpy-like
numbers accepted, EncodeError importable from sensor_sim."""

from __future__ import annotations

import decimal
import fractions
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sensor_sim
from collector.errors import ConfigError
from sensor_sim import EncodeError, Sensor
from sensor_sim.bootstate import BOOT_LIMIT, boot_file_for, claim_boot, next_boot

from helpers import Receiver, db_query, running_collector, wait_for

# --- the rule, pure ----------------------------------------------------------------------


@given(st.one_of(st.none(), st.integers(0, BOOT_LIMIT - 2)), st.floats(0, BOOT_LIMIT - 1))
def test_next_boot_follows_the_clock_and_never_repeats(last, now):
    boot = next_boot(last, now)
    assert boot >= int(now) and (last is None or boot == max(int(now), last + 1))
    assert 0 <= boot < BOOT_LIMIT


def test_next_boot_refuses_to_leave_uint32():
    with pytest.raises(ConfigError, match="outside uint32"):
        next_boot(BOOT_LIMIT - 1, 1.7e9)


# --- the state file ------------------------------------------------------------------------


def test_claims_in_the_same_second_grow_and_are_persisted(tmp_path):
    path = tmp_path / "state" / "boot-s1"
    boots = [claim_boot(path, 1_700_000_000.25) for _ in range(5)]
    assert boots == list(range(1_700_000_000, 1_700_000_005))
    assert path.read_text() == "1700000004\n"
    assert claim_boot(path, 1_800_000_000.0) == 1_800_000_000  # the clock moved on: it leads again


def test_claims_from_threads_are_distinct(tmp_path):
    path, got = tmp_path / "boot-s1", []
    threads = [threading.Thread(target=lambda: got.extend(claim_boot(path, 5.0) for _ in range(20))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(5, 85))


def test_a_damaged_or_unwritable_state_is_a_clear_error(tmp_path):
    path = tmp_path / "boot-s1"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match=r"boot counter .*boot-s1 holds .*not a boot value: fix or delete it"):
        claim_boot(path, 1.0)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot keep the boot counter in .*pass boot=N"):
        claim_boot(tmp_path / "file" / "boot-s1", 1.0)


def test_state_files_of_ids_with_slashes_and_dots_stay_apart(tmp_path):
    names = {boot_file_for(i, tmp_path).name for i in ("a/b", "a_b", "..", ".", "a%2Fb")}
    assert len(names) == 5 and all(n.startswith("boot-") and "/" not in n for n in names)


# --- restarts, with a real collector -------------------------------------------------------

BRIDGE = """
import sys
from sensor_sim import Sensor
with Sensor("bridge-1", target=("127.0.0.1", int(sys.argv[1]))) as s:
    s.send({"temp": float(sys.argv[2])})
"""


def test_eight_one_reading_bridges_back_to_back_store_eight_readings(db_path):
    # Before: boot = int(time.time()), so bridges restarted within one second
    # reused (boot, seq 0): 2 stored, 6 duplicates.  Two bridges are real
    # processes (a process start is ~1 s on the loaded CI box), six are
    # Sensor objects made and closed in turn: the boot lives in the state file.
    with running_collector(db_path) as (collector, _):
        port = collector.addresses[0][1]
        for i in range(8):
            if i in (3, 4):
                proc = subprocess.run(
                    [sys.executable, "-c", BRIDGE, str(port), str(i)], capture_output=True, text=True, timeout=60
                )
                assert proc.returncode == 0, proc.stderr
            else:
                with Sensor("bridge-1", target=("127.0.0.1", port)) as s:
                    s.send({"temp": float(i)})
        wait_for(lambda: collector.counters["received"] >= 8, 10, what="8 datagrams")
    rows = db_query(db_path, "SELECT r.boot, r.seq, r.value FROM readings r ORDER BY r.boot")
    assert [(seq, value) for _, seq, value in rows] == [(0, float(i)) for i in range(8)]
    assert len({boot for boot, _, _ in rows}) == 8
    assert db_query(db_path, "SELECT datagrams, duplicates, restarts FROM sensors") == [(8, 0, 7)]
    assert db_query(db_path, "SELECT value FROM counters WHERE name = 'duplicates'") == [(0.0,)]


def test_a_signed_bridge_persists_the_boot_it_bumps_at_the_seq_wrap(tmp_path):
    state = tmp_path / "boot-gh"
    key = bytes(range(32))
    with Receiver() as rx:
        with Sensor("gh", target=("127.0.0.1", rx.port), seq=2**32 - 1, key=key, boot_file=state) as s:
            first = s.boot
            s.send({"t": 1})
            assert s.boot == first + 1 and state.read_text() == f"{first + 1}\n"
        with Sensor("gh", target=("127.0.0.1", rx.port), key=key, boot_file=state) as s:
            assert s.boot == first + 2  # a restart never reuses the bumped boot
        rx.wait(1)


# --- arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("boot", 2**32), ("boot", -1), ("seq", 2**32), ("seq", -1), ("seq", 1.5), ("boot", "7"), ("boot", 2**40 + 3)],
)
def test_boot_and_seq_outside_uint32_are_refused_not_masked(field, value):
    with pytest.raises(EncodeError, match=f"^{field} "):
        Sensor("s1", target=("127.0.0.1", 9), **{field: value})


class IndexOnly:
    def __init__(self, n: int) -> None:
        self.n = n

    def __index__(self) -> int:
        return self.n


class Float64(float):
    """What numpy.float64 is: a float subclass (type() is not float)."""


def test_numpy_like_numbers_are_sent_as_plain_numbers():
    readings = {
        "a": Float64(21.5),
        "b": IndexOnly(7),
        "c": fractions.Fraction(1, 4),
        "d": decimal.Decimal("2.5"),
        "e": True,
    }
    with Receiver() as rx, Sensor("s1", target=("127.0.0.1", rx.port), boot=IndexOnly(3), seq=IndexOnly(9)) as s:
        s.send(readings, ts=Float64(1_700_000_000.5))
        got = rx.datagrams() if rx.wait(1) else None
    (d,) = got
    assert (d.boot, d.seq, d.ts) == (3, 9, 1_700_000_000.5)
    assert d.readings == {"a": 21.5, "b": 7, "c": 0.25, "d": 2.5, "e": 1}
    assert type(d.readings["b"]) is int and type(d.readings["a"]) is float


def test_what_is_not_a_number_is_named_with_what_is_accepted():
    with Sensor("s1", target=("127.0.0.1", 9), boot=1) as s:
        with pytest.raises(EncodeError, match="reading t is str, not a number .*__index__ or __float__"):
            s.send({"t": "warm"})
        assert s.seq == 0


def test_sensor_sim_exports_what_sensor_raises():
    assert sensor_sim.EncodeError is EncodeError and issubclass(EncodeError, ValueError)
    assert "EncodeError" in sensor_sim.__all__ and "ConfigError" in sensor_sim.__all__
