"""Shared fixtures: real files under tmp_path, and hygiene checks.

Every test must leave no thread and no child process behind (zeroconf's
conftest does the same): a leaked collector or simulator would keep a port
bound and make later tests flaky in ways that are hard to trace.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parent.parent

# One hypothesis profile for the suite: no per-example deadline (a shared CI
# core stalls now and then), and fixtures reused across examples are fine.
# A test that wants fewer or more examples says only that:
# @settings(max_examples=N).
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.load_profile("ci")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """Compile the three packages to bytecode once, before any test starts a daemon.

    The suite starts a few hundred processes of our programs.  Where
    PYTHONDONTWRITEBYTECODE is set (as in CI's environment) none of them writes
    the .pyc of the modules it compiled, so every start compiled them again:
    ~80 ms of CPU per collector start (430 -> 351 ms, median of 9 starts).
    compileall writes them whatever that setting says,
    and skips the ones already up to date.  Once, in the controller: xdist's
    workers and the daemons read them."""
    if hasattr(session.config, "workerinput"):
        return
    import compileall

    for package in ("collector", "query", "sensor_sim"):
        compileall.compile_dir(REPO / package, quiet=1)


def _children() -> set[int]:
    """PIDs of this process's live (non-zombie) children, from /proc."""
    me = str(os.getpid())
    found = set()
    try:
        entries = os.listdir("/proc")
    except OSError:  # not Linux: nothing to check
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, ...
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) >= 2 and fields[1] == me and fields[0] != "Z":
            found.add(int(entry))
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """An `untraced` test runs with no coverage tracer at all (a soak: its worth is its
    number of cases, and every line it reaches the tests beside it reach too).

    Not pytest-cov's own `no_cover` marker: under xdist, pytest-cov 7.1 starts two
    Coverage objects in each worker and pausing its own resumed the other, so the
    200,000-case soaks were still traced with -n 2 (58 s for test_differential_fuzz_200k
    against 16 s with -n 0); and with --no-cov its hook raised AttributeError.  This
    stops whatever Coverage traces and starts it again (in the same order) after."""
    if item.get_closest_marker("untraced") is None:
        yield
        return
    import coverage

    stopped = []
    while (cov := coverage.Coverage.current()) is not None:
        cov.stop()  # pops it: current() is then the one started before it
        stopped.append(cov)
    try:
        yield
    finally:
        for cov in reversed(stopped):
            cov.start()


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves a thread or a child process running."""
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        children = _children() - children_before
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    described = [_describe(pid) for pid in sorted(children)]  # before the kill: what each was doing
    for pid in children:  # do not let one leak poison the rest of the run
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    pytest.fail(f"test leaked threads {[t.name for t in threads]} / child processes {described}")


def _describe(pid: int) -> str:
    """'PID STATE command line' of a child, from /proc (the state says whether it was running,
    asleep, or stopped), so that a leak seen once in CI says what leaked."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().decode(errors="replace").rsplit(")", 1)[-1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} {state} {cmdline[:300]}"


@pytest.fixture(scope="session")
def tls(tmp_path_factory):
    """A trustme CA with server and client certificates, made once per run."""
    from query_fixtures import make_tls

    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def known_db(tmp_path_factory) -> str:
    """The query tests' database of known values (query_fixtures), written once per run; read-only."""
    from query_fixtures import fill_known_db

    path = str(tmp_path_factory.mktemp("known") / "known.db")
    fill_known_db(path)
    return path


@pytest.fixture(autouse=True)
def sensor_boot_state(tmp_path_factory, monkeypatch):
    """The Sensor API keeps each sensor's last boot in a state directory: a fresh
    one per test (children inherit it), never the user's ~/.local/state."""
    monkeypatch.setenv("SENSOR_SIM_STATE_DIR", str(tmp_path_factory.mktemp("sensor-sim-state")))


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "telemetry.db")


@pytest.fixture
def bin_path():
    """Path of a console script installed beside this interpreter."""

    def find(name: str) -> str:
        path = Path(sys.executable).parent / name
        if not path.exists():
            pytest.fail(f"{name} is not installed next to {sys.executable}: run pip install -e .")
        return str(path)

    return find


@pytest.fixture
def consumer(bin_path, tmp_path):
    """Start `telemetry-uplink consume` (killed at the end of the test if still running):
    consumer(central_db, [server_url], *extra_flags) -> the started process (uplinkfleet.Uplinks)."""
    from uplinkfleet import Uplinks, consume_args

    uplinks = Uplinks(bin_path, tmp_path)
    yield lambda central, servers, *extra: uplinks.start(
        f"consume{len(uplinks.started)}", *consume_args(central, servers, *extra)
    )
    uplinks.close()
