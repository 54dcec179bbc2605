"""Our daemons as real child processes, each started the one way: `Daemon`.

A daemon's stderr goes to a log file that the test polls; the daemon is ready
when its ready line appears (the collector's `started:` line, the query
server's `listening tls HOST:PORT`), and a daemon that exits first fails the
test with its log.  Nothing here sleeps for a fixed time.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from helpers import db_query, wait_for

COLLECTOR_READY = r"started: "
QUERY_READY = r"listening tls (\S+):(\d+)"

# How a parent can leave SIGINT to a child (both ignored and blocked survive
# exec): at its default, as a terminal's foreground job has it; ignored, as a
# non-interactive shell starts `command &` (and everything a CI job started so
# runs); blocked.  A Ctrl-C test names the state instead of inheriting the
# test runner's.
SIGINT_STATES = ("default", "ignored", "blocked")
_SIGINT_SETUP = {
    "default": "signal.signal(signal.SIGINT, signal.SIG_DFL); signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])",
    "ignored": "signal.signal(signal.SIGINT, signal.SIG_IGN); signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])",
    "blocked": "signal.signal(signal.SIGINT, signal.SIG_DFL); signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])",
}


def with_sigint(state: str, cmd: list[str]) -> list[str]:
    """`cmd` (cmd[0] a path) run by a small Python that sets SIGINT to `state`, then execs it."""
    setup = _SIGINT_SETUP[state]
    return [sys.executable, "-c", f"import os, signal, sys; {setup}; os.execv(sys.argv[1], sys.argv[1:])", *cmd]


class Daemon:
    """A command run as a child process whose log (stderr) is a file we can poll."""

    def __init__(
        self,
        cmd: list[str],
        log: Path,
        ready: str,
        *,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
        cwd: Path | None = None,
    ) -> None:
        self.cmd = cmd
        self.log = log
        self._log_file = open(log, "ab")
        full_env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log_file, env=full_env, cwd=cwd)
        found = wait_for(
            lambda: re.search(ready, self.text()) or self._dead(),
            timeout,
            what=f"the ready line of {Path(cmd[0]).name} ({ready!r})",
        )
        if found == "dead":
            self._log_file.close()
            raise AssertionError(
                f"{Path(cmd[0]).name} exited {self.proc.returncode} before it was ready:\n{self.text()}"
            )
        self.ready = found

    def _dead(self) -> str | None:
        return "dead" if self.proc.poll() is not None else None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Send `sig` (SIGTERM by default) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(15)
        self._log_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()
        else:
            self._log_file.close()


class CollectorProcess(Daemon):
    """telemetry-collector; `ports` are the UDP ports it logged, in order."""

    def __init__(
        self,
        exe: str,
        db: str,
        log: Path,
        *args: str,
        prefix: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.db = db
        cmd = [*prefix, exe, "--db", db, "--flush-interval", "0.05", *args]
        if "--listen" not in args and "--config" not in args:
            cmd += ["--listen", "127.0.0.1:0"]
        super().__init__(cmd, log, COLLECTOR_READY, env=env, cwd=cwd)
        self.ports = re.findall(r"listening udp (\S+)", self.text())

    def port(self, i: int = 0) -> int:
        return int(self.ports[i].rsplit(":", 1)[1])

    def counters(self) -> dict:
        try:
            return dict(db_query(self.db, "SELECT name, value FROM counters"))
        except sqlite3.Error:
            return {}

    def wait_received(self, n: int, timeout: float = 15) -> None:
        """Until the collector has committed `n` datagrams received: `timeout` seconds, and one
        more per 2,000 datagrams (a loaded 2-core box still commits that many a second).
        Datagrams the kernel dropped never arrive: that fails at once, saying so."""

        def received() -> bool:
            counters = self.counters()
            if counters.get("kernel_drops", 0):
                raise AssertionError(
                    f"waiting for {n} datagrams received: the kernel dropped {counters['kernel_drops']} "
                    f"(received {counters.get('received', 0)}), which never arrive: the collector fell "
                    "behind the sender (starved of CPU, or a receive buffer too small for the burst)"
                )
            return counters.get("received", 0) >= n

        wait_for(
            received,
            timeout + n / 2000,
            what=lambda: f"{n} datagrams received (committed: {self.counters().get('received', 0)})",
        )


class QueryServerProcess(Daemon):
    """telemetry-query serve; `port` is the TLS port it logged."""

    def __init__(
        self, exe: str, log: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        cmd = [exe, "serve", *args]
        if "--listen" not in args and "--config" not in args:
            cmd += ["--listen", "127.0.0.1:0"]
        super().__init__(cmd, log, QUERY_READY, env=env, cwd=cwd)
        self.port = int(self.ready.group(2))
