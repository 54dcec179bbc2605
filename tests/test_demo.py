"""The README's first command: the whole system on loopback, ending clean.

Runs the real demo as a process (as a person would), checks that its ground
truth and the collector's accounts agree, and that no process survives it:
neither after a normal run nor after Ctrl-C in the middle.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import wait_for
from processes import SIGINT_STATES, with_sigint


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (the demo's scratch directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry))
    return found


def workdir_of(output: str) -> str:
    match = re.search(r"client 'demo' in (\S+)/tls", output)
    assert match, output
    return match.group(1)


def test_demo_runs_end_to_end_and_leaves_nothing_behind():
    result = subprocess.run(
        [sys.executable, "-m", "sensor_sim.demo", "--duration", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for step in ("certificates", "collector", "query server", "sensors", "questions", "ground truth", "shutdown"):
        assert f"] {step}: " in out
    for command in ("sensors", "latest field-0001", "aggregate field-0001", "gaps field-0006", "stats"):
        assert f"$ telemetry-query {command}" in out
    truth = re.findall(
        r"^  (datagrams that reached the wire|dropped between first and last seq|sent twice"
        r"|sent after a higher seq)\s+(\d+)\s+(\d+)  ok$",
        out,
        re.M,
    )
    assert len(truth) == 4, out
    sent = int(truth[0][1])
    assert sent >= 16 * 10  # 16 sensors at 10 Hz for 2 s, minus a little loss
    assert "DIFFERS" not in out
    for name in ("collector", "query-server", "sensors-unicast", "sensors-multicast"):
        assert re.search(rf"^  {name}\s+exit 0$", out, re.M), name
    workdir = workdir_of(out)
    assert processes_mentioning(workdir) == []
    assert not Path(workdir).exists()


@pytest.mark.parametrize("sigint", SIGINT_STATES)
def test_ctrl_c_stops_every_process_and_cleans_up(sigint):
    # "ignored": how a non-interactive shell starts `python -m sensor_sim.demo &`.  The
    # daemons stop on SIGINT either way; the demo must too, not carry on without them.
    proc = subprocess.Popen(
        with_sigint(sigint, [sys.executable, "-m", "sensor_sim.demo", "--duration", "30"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        # Read until the sensors are running: every child is up by then.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "] sensors: " in line:
                break
        output = "".join(lines)
        assert "] sensors: " in output, output
        workdir = workdir_of(output)
        # collector, query server and both simulators
        wait_for(lambda: len(processes_mentioning(workdir)) >= 4, timeout=15, what="demo children")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, rest
    assert "interrupted: stopping every process" in rest
    wait_for(lambda: processes_mentioning(workdir) == [], timeout=10, what="demo children to exit")
    assert not Path(workdir).exists()


def test_stop_all_reaps_a_child_whose_popen_lock_an_interrupt_left_held(tmp_path):
    """Ctrl-C landing inside Popen.wait or poll can leave Popen's wait lock held (CPython 3.11:
    9 in 11,028 interrupted waits); every later Popen.wait() then blocks for ever, and the
    demo hung after "interrupted" about once in 110 Ctrl-C runs.  Its clean-up must still stop
    and reap every child: a Python of its own holds the lock as the race leaves it, with a
    deadline (the old stop_all never returned)."""
    script = (
        "import subprocess, sys\n"
        "from pathlib import Path\n"
        "from sensor_sim.demo import Demo\n"
        "demo = Demo(Path(sys.argv[1]), 1)\n"
        "proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "demo.children.append(('sleeper', proc))\n"
        "proc._waitpid_lock.acquire()  # what the interrupted wait leaves\n"
        "print(demo.stop_all())\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[('sleeper', -15)]"


def test_a_ctrl_c_python_swallows_in_a_fork_hook_still_stops_the_demo(tmp_path):
    """Ctrl-C landing while the demo forks a child raises KeyboardInterrupt inside an at-fork
    hook (logging's), where Python prints "Exception ignored" and carries on: the demo went on
    to fail "sensor-sim exited with -2" (1 in 80 Ctrl-C runs).  A hook of our own sends the
    SIGINT at exactly that point; the next step must raise it again."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from sensor_sim import demo as d\n"
        "signal.signal(signal.SIGINT, d.CTRL_C)\n"
        "os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGINT))\n"
        "demo = d.Demo(Path(sys.argv[1]), 1)\n"
        "try:\n"
        "    demo.start('sleeper', 'timeit', '-n', '1', 'import time; time.sleep(60)')\n"
        "    print('carried on')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n"
        "print(demo.stop_all())\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert "Exception ignored" in result.stderr and "KeyboardInterrupt" in result.stderr  # swallowed, as in the wild
    assert result.stdout.splitlines() == ["interrupted", "[('sleeper', -15)]"], result.stdout + result.stderr
