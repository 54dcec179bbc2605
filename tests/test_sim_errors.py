"""sensor-sim says what went wrong (issue 13 item 11): a run whose every sendto
failed exits non-zero, --replay errors point at the bad line and name the
column, and usage errors are one line as docs/SIMULATOR.md promises."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from sensor_sim.replay import load

# --- no route: ENETUNREACH on every send ---------------------------------------------------


def _unshare() -> str:
    path = shutil.which("unshare")
    if path is None:
        pytest.fail("this test needs unshare(1) (util-linux) to make a network namespace with no route")
    probe = subprocess.run([path, "-n", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.fail(
            f"unshare -n cannot make a network namespace here: {probe.stderr.strip()} (needs root or user namespaces)"
        )
    return path


def test_every_send_unreachable_is_said_and_exits_1(bin_path, tmp_path):
    # A fresh network namespace has only `lo`, and it is down: sending to
    # 127.0.0.1 there fails with ENETUNREACH, and nothing leaves the namespace.
    report = tmp_path / "truth.json"
    proc = subprocess.run(
        [
            _unshare(),
            "-n",
            bin_path("sensor-sim"),
            "--target",
            "127.0.0.1:4739",
            "--sensors",
            "2",
            "--count",
            "3",
            "--rate",
            "max",
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "0 datagrams sent" in proc.stderr and "6 sendto failed (ENETUNREACH x6)" in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "Error: nothing reached 127.0.0.1:4739: every sendto failed (ENETUNREACH x6); check the route to the target"
    )
    truth = json.loads(report.read_text())  # the report still says what happened
    assert truth["datagrams_sent"] == 0 and truth["send_failures"] == 6


def test_every_target_that_got_nothing_is_named(bin_path):
    proc = subprocess.run(
        [
            _unshare(),
            "-n",
            bin_path("sensor-sim"),
            "--target",
            "127.0.0.1:4739",
            "--target",
            "127.0.0.2:4739",
            "--sensors",
            "1",
            "--count",
            "2",
            "--rate",
            "max",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        "Error: nothing reached 127.0.0.1:4739, 127.0.0.2:4739: every "
        "sendto failed (ENETUNREACH x4); check the route to the target"
    )


# --- replay errors point at the bad line -----------------------------------------------------


def _load_error(tmp_path, text: str, name: str = "rec.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load(path)
    return str(info.value).removeprefix(f"{path}:")


@pytest.mark.parametrize(
    "rows, expected",
    [
        ("gh,1,temp,\n", "2: value '' is not a number"),
        (",1,temp,1\n", "2: sensor id '' must be 1-64 of [A-Za-z0-9._:/-]"),
        ("gh,,temp,1\n", "2: ts '' is not a number"),
        ("gh,soon,temp,1\n", "2: ts 'soon' is not a number"),
        ("gh,1,temp,1\ngh,1,hum,nan\n", "3: value 'nan' is not finite"),
        # a bad row inside a group: its own line, not the group's first
        ("gh,1,temp,1\ngh,1,hum,2\ngh,1,bad name,3\n", "4: bad reading name 'bad name'"),
        ("gh,1,temp,1\ngh,1,big,99999999999999999999\n", "3: reading big is out of int64 range"),
    ],
)
def test_csv_errors_name_the_line_and_the_column(tmp_path, rows, expected):
    message = _load_error(tmp_path, "sensor,ts,metric,value\n" + rows)
    assert message.startswith(expected), message


def test_a_group_over_64_readings_points_at_the_65th_row_not_the_first(tmp_path):
    rows = "".join(f"gh,1,m{i},{i}\n" for i in range(70))
    message = _load_error(tmp_path, "sensor,ts,metric,value\n" + rows)
    assert message.startswith(
        "66: r must be a map of 1-64 readings (the datagram of sensor 'gh' at ts 1.0 from line 2 on)"
    ), message


def test_jsonl_errors_point_at_their_own_line_too(tmp_path):
    lines = [
        {"sensor": "gh", "ts": 1, "metric": "temp", "value": 1},
        {"sensor": "gh", "ts": 1, "metric": "b@d", "value": 2},
    ]
    message = _load_error(tmp_path, "".join(json.dumps(x) + "\n" for x in lines), "rec.jsonl")
    assert message.startswith("2: bad reading name 'b@d'"), message


def test_a_recording_that_is_not_utf8_names_the_byte_offset_and_line(tmp_path):
    path = tmp_path / "rec.csv"
    path.write_bytes(b"sensor,ts,metric,value\ngh,1,caf\xe9,1\n")
    with pytest.raises(ValueError) as info:
        load(path)
    assert str(info.value) == f"{path}: not UTF-8 text: byte 0xe9 at offset 31 (line 2)"


# --- usage errors: one line --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "127.0.0.1:9", "--count", "1", "--duration", "1"], "give --count or --duration, not both"),
        (["--target", "127.0.0.1:9", "--rate", "fast"], "'fast' is not a number of Hz or 'max'"),
        (["--count", "1"], "Missing option '--target'"),
        (["--target", "127.0.0.1:9", "--nope"], "No such option '--nope'"),
        (["--target", "127.0.0.1:9", "--speed", "2"], "--speed only applies to --replay"),
    ],
)
def test_usage_errors_are_one_line_exit_2(bin_path, args, message):
    proc = subprocess.run([bin_path("sensor-sim"), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: ") and message in proc.stderr, proc.stderr
    assert "Usage:" not in proc.stderr and "Try " not in proc.stderr


def test_help_and_version_still_exit_0(bin_path):
    for flag in ("-h", "--version"):
        proc = subprocess.run([bin_path("sensor-sim"), flag], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and proc.stdout and not proc.stderr
