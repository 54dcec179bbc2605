"""The uplink's CPU scheduling policy (`scheduling`): taken at start, before any thread, by the
real `telemetry-uplink run` process against a real nats-server; the policy of every one of its
threads, read from /proc (field 41 of /proc/PID/task/TID/stat), is what the kernel applies.
Started at the policy already (systemd's CPUSchedulingPolicy=, emulated with chrt) it makes no
call of its own.  A value that is no policy, and a policy the kernel refuses, are one line and
exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from natsserver import NatsServer
from test_uplink_e2e import uplink_args
from uplinkfleet import clean_env
from uplinkgw import GatewayDB

from collector.uplink import priority

from helpers import wait_for
from processes import Daemon


def thread_policies(pid: int) -> set[int]:
    """The scheduling policy of each thread of a process (/proc/PID/task/TID/stat, field 41)."""
    return {
        int((task / "stat").read_text().rsplit(")", 1)[1].split()[38]) for task in Path(f"/proc/{pid}/task").iterdir()
    }


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install util-linux")
    return path


def chrt(policy: int) -> list[str]:
    """The command prefix that starts a process at `policy`, as systemd's CPUSchedulingPolicy= does."""
    return [tool("chrt"), f"--{priority.NAMES[policy]}", "0"]


@pytest.fixture
def gw(tmp_path):
    g = GatewayDB(str(tmp_path / "gw.db"))
    g.flush()
    yield g
    g.close()


@pytest.mark.parametrize(
    "flags, policy, started_at",
    [
        ((), os.SCHED_BATCH, os.SCHED_OTHER),
        (("--scheduling", "idle"), os.SCHED_IDLE, os.SCHED_OTHER),
        (("--scheduling", "other"), os.SCHED_OTHER, os.SCHED_BATCH),
        ((), os.SCHED_BATCH, os.SCHED_BATCH),
    ],
    ids=["default-batch", "idle", "other", "started-at-batch"],
)
def test_the_daemon_and_all_its_threads_run_at_the_policy_it_was_given(
    flags, policy, started_at, gw, tmp_path, bin_path
):
    with NatsServer(tmp_path) as ns:
        cmd = [*chrt(started_at), bin_path("telemetry-uplink"), *uplink_args(gw, "site-1", [ns.url], *flags)]
        up = Daemon(cmd, tmp_path / "uplink.log", r"started: ", env=clean_env(), timeout=30)
        try:
            wait_for(lambda: "connected to" in up.text(), 20, what="the uplink connected")
            assert thread_policies(up.proc.pid) == {policy}
            # the niceness it inherits from this run (nice -n 10 pytest, a CI runner's own)
            said = f"scheduling policy {priority.NAMES[policy]}, nice {os.getpriority(os.PRIO_PROCESS, 0)}"
            assert said + (" (set here)" if started_at != policy else "\n") in up.text()
        finally:
            assert up.stop() == 0


def test_a_policy_the_kernel_refuses_is_one_line_and_exit_2(gw, bin_path):
    """Out of SCHED_IDLE only a process with CAP_SYS_NICE (or an RLIMIT_NICE) may go (sched(7))."""
    cmd = [
        *(tool("setpriv"), "--inh-caps=-all", "--bounding-set=-all"),
        *(tool("prlimit"), "--nice=0"),
        *chrt(os.SCHED_IDLE),
        *(bin_path("telemetry-uplink"), "run", "--db", gw.path, "--gateway", "g", "--scheduling", "other"),
        *("--servers", "nats://127.0.0.1:9"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: cannot run at scheduling policy other (now idle): Operation not permitted; start the uplink at "
        "that policy (systemd: CPUSchedulingPolicy= in its unit) or set scheduling to idle"
    ]
    assert "Traceback" not in result.stderr
