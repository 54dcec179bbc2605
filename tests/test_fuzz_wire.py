"""Bounded mutation fuzz of wire.decode (bench/fuzz_wire.py is the engine).

Any bytes give a Datagram or a DecodeError with a documented reason, nothing
else, in bounded memory; and the pure-Python msgpack fallback reaches the very
same verdict as the C extension for every one of the same fuzz cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from collector import wire

from helpers import load_fuzz_engine

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "fuzz_wire.py"
SEED = 20261125


fuzz = load_fuzz_engine()


def _run_fallback(code_or_args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, MSGPACK_PUREPYTHON="1")
    return subprocess.run(
        [sys.executable, *code_or_args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


# A soak: its worth is the number of cases, and line tracing doubled its time; every line it
# reaches, the named and hypothesis tests beside it reach too (wire.py's coverage is the same).
@pytest.mark.untraced  # conftest.py
def test_fuzz_200k_mutated_datagrams():
    result = fuzz.run(SEED, 200_000, trace_memory=False)
    assert result["escapes"] == []
    assert result["msgpack"] == "msgpack._cmsgpack"  # the build the collector runs
    verdicts = result["verdicts"]
    assert sum(verdicts.values()) == 200_000
    assert set(verdicts) == {"accepted", *wire.REASONS}  # every path was reached
    assert verdicts["accepted"] > 1000


def test_fuzz_memory_peak_is_bounded():
    result = fuzz.run(SEED + 1, 10_000, trace_memory=True)
    assert result["escapes"] == []
    assert sum(result["verdicts"].values()) == 10_000
    # Datagrams are at most 8 KiB; the peak covers the fuzz engine's own state
    # and decode's memo of names (capped at 4096 entries).
    assert result["peak_bytes"] < 4 * 1024 * 1024, result["peak_bytes"]


def test_fuzz_pure_python_fallback_gives_the_same_verdicts():
    count = 20_000
    proc = _run_fallback([str(SCRIPT), "--seed", str(SEED), "--count", str(count), "--json", "--no-trace"])
    assert proc.returncode == 0, proc.stderr + proc.stdout
    fallback = json.loads(proc.stdout)
    assert fallback["msgpack"] == "msgpack.fallback"
    assert fallback["escapes"] == []
    assert sum(fallback["verdicts"].values()) == count
    native = fuzz.run(SEED, count, trace_memory=False)
    assert fallback["verdicts"] == native["verdicts"]
    assert fallback["digest"] == native["digest"]  # the same verdict, datagram by datagram


def test_1000_deep_nesting_is_rejected_by_both_msgpack_builds():
    check = (
        "from collector import wire\n"
        "from collector.errors import DecodeError\n"
        "cases = [b'\\x91' * 1000 + b'\\x00', b'\\x81\\xa1k' * 1000 + b'\\x00',\n"
        "         b'\\x85\\xa1v\\x01\\xa2id\\xa2s1\\xa3seq\\x07\\xa1r\\x81\\xa1t\\x07\\xa1x'\n"
        "         + b'\\x91' * 1000 + b'\\x00']\n"
        "out = []\n"
        "for data in cases:\n"
        "    try:\n"
        "        wire.decode(data)\n"
        "        out.append('accepted')\n"
        "    except DecodeError as exc:\n"
        "        out.append(exc.reason)\n"
        "print(wire.msgpack.Unpacker.__module__, *out)\n"
    )
    proc = _run_fallback(["-c", check])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["msgpack.fallback"] + ["not_msgpack"] * 3
    native = subprocess.run(
        [sys.executable, "-c", check],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "MSGPACK_PUREPYTHON"},
    )
    assert native.stdout.split() == ["msgpack._cmsgpack"] + ["not_msgpack"] * 3


@pytest.mark.slow
def test_fuzz_long_run():
    result = fuzz.run(SEED + 2, 1_000_000, trace_memory=False)
    assert result["escapes"] == []
    assert sum(result["verdicts"].values()) == 1_000_000
