"""The demo: the whole system on loopback for a bounded time, then exit 0.

`python -m sensor_sim.demo` makes a throwaway CA and certificates, starts the
collector (unicast and multicast) and the query server (mutual TLS) on free
ports with a fresh database, runs simulated sensors with a little injected
loss, duplication and reordering, then asks the real `telemetry-query` client
what happened and sets the simulator's ground truth beside the collector's
accounts.  Everything runs as real processes, exactly as an operator would run
them.  Ctrl-C at any moment stops every child and removes the scratch
directory; children also die with the demo if it is killed outright
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

UNICAST_SENSORS = 12
MULTICAST_SENSORS = 4
GROUP = "239.255.77.1"  # organisation-local scope (RFC 2365); joined on 127.0.0.1 only
FAULTS = {"--loss": "0.03", "--duplicate": "0.02", "--reorder": "0.03"}
STARTUP_TIMEOUT_S = 15.0


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the demo itself dies (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _CtrlC:
    """SIGINT raises KeyboardInterrupt, as by default, and remembers it: Python swallows an
    exception raised where nothing can catch it (it prints "Exception ignored in ..."), and
    a Ctrl-C landing in the fork of a child runs in logging's at-fork hook, one such place.
    check() raises it again at the demo's next step."""

    def __init__(self) -> None:
        self.hit = False

    def __call__(self, signum: int, frame: object) -> None:
        self.hit = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt


CTRL_C = _CtrlC()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.kill(proc.pid, sig)  # not yet reaped by us: the pid is still our child's (or its zombie's)
    except ProcessLookupError:
        pass


def _reap(proc: subprocess.Popen, timeout: float) -> tuple[bool, int | None]:
    """Wait up to `timeout` s for a child to exit: (exited, exit code: -N for signal N, None
    while it runs or if the code was lost).  Uses waitpid itself, never Popen.wait: in CPython
    3.11 a KeyboardInterrupt landing in Popen.wait or poll between their lock's acquire and
    the try that releases it leaves the lock held (9 in 11,028 interrupted waits), and every
    later Popen.wait() then blocks for ever: the demo hung after Ctrl-C (1 in 110 runs)."""
    deadline = time.monotonic() + timeout
    while proc.returncode is None:
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped inside an interrupted Popen call: the code is lost
            return True, None
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            return False, None
        time.sleep(0.02)
    return True, proc.returncode


class Demo:
    def __init__(self, workdir: Path, duration: float) -> None:
        self.dir = workdir
        self.duration = duration
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"

    # --- processes ---------------------------------------------------------------------

    def start(self, name: str, module: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = self.dir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=_die_with_parent,
            )
        self.children.append((name, proc))
        CTRL_C.check()
        return proc, log

    def wait_for_line(self, proc: subprocess.Popen, log: Path, pattern: str) -> list[re.Match]:
        """Wait (with a deadline) until the log shows `pattern`; return every match."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            CTRL_C.check()
            text = log.read_text(errors="replace")
            found = list(regex.finditer(text))
            if found:
                return found
            if proc.poll() is not None:
                raise click.ClickException(f"{log.stem} exited with {proc.returncode}:\n{text.strip()}")
            time.sleep(0.05)
        raise click.ClickException(f"{log.stem} did not start within {STARTUP_TIMEOUT_S:.0f} s; see {log}")

    def stop_all(self) -> list[tuple[str, int | None]]:
        """SIGTERM every live child, wait, SIGKILL stragglers; returns (name, exit code), None
        where the code was lost (see _reap).  Runs after Ctrl-C too: no Popen.wait/poll here."""
        results = []
        for _name, proc in self.children:
            if proc.returncode is None:
                _signal(proc, signal.SIGTERM)
        for name, proc in self.children:
            done, code = _reap(proc, 10)
            if not done:
                _signal(proc, signal.SIGKILL)
                done, code = _reap(proc, 10)
            results.append((name, code))
        self.children.clear()
        return results

    def query(self, *args: str, show: bool = True, fmt: str = "table") -> str:
        cmd = [sys.executable, "-m", "query", "--format", fmt, *args]
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise click.ClickException(f"telemetry-query {' '.join(args)} failed: {result.stderr.strip()}")
        if show:
            click.secho(f"$ telemetry-query {' '.join(args)}", fg="cyan")
            click.echo(result.stdout.rstrip() + "\n")
        return result.stdout

    # --- the story ---------------------------------------------------------------------

    def run(self) -> None:
        from query import certs

        step = _Steps()
        tls = self.dir / "tls"
        step("certificates", f"throwaway CA, server certificate for localhost/127.0.0.1, client 'demo' in {tls}")
        certs.make_ca(tls, name="gateway-telemetry demo CA", days=1)
        certs.issue(tls, "server", "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",), days=1)
        certs.issue(tls, "demo", "demo", server=False, days=1)

        db = self.dir / "telemetry.db"
        collector, clog = self.start(
            "collector",
            "collector",
            "--db",
            str(db),
            "--listen",
            "127.0.0.1:0",
            "--multicast",
            GROUP,
            "--multicast-interface",
            "127.0.0.1",
            "--flush-interval",
            "0.5",
        )
        bound = self.wait_for_line(collector, clog, r"listening udp (\S+):(\d+)")
        port = bound[0].group(2)
        step("collector", f"udp 127.0.0.1:{port} and multicast {GROUP}:{port} on lo, database {db.name}")

        server, slog = self.start(
            "query-server",
            "query",
            "serve",
            "--db",
            str(db),
            "--listen",
            "127.0.0.1:0",
            "--cert",
            str(tls / "server.pem"),
            "--key",
            str(tls / "server.key"),
            "--client-ca",
            str(tls / "ca.pem"),
        )
        qport = self.wait_for_line(server, slog, r"listening tls \S+:(\d+)")[0].group(1)
        step("query server", f"tls 127.0.0.1:{qport}, mutual TLS, database opened read-only")
        self.env.update(
            {
                "TELEMETRY_SERVER": f"localhost:{qport}",
                "TELEMETRY_CA": str(tls / "ca.pem"),
                "TELEMETRY_CERT": str(tls / "demo.pem"),
                "TELEMETRY_KEY": str(tls / "demo.key"),
            }
        )

        faults = " ".join(f"{k} {v}" for k, v in FAULTS.items())
        step(
            "sensors",
            f"{UNICAST_SENSORS} over unicast and {MULTICAST_SENSORS} over multicast, "
            f"10 Hz for {self.duration:g} s, with {faults}",
        )
        common = [
            "--rate",
            "10",
            "--duration",
            str(self.duration),
            *sum(FAULTS.items(), ()),
            "--metrics",
            "temp,hum,battery",
        ]
        uni, _ = self.start(
            "sensors-unicast",
            "sensor_sim",
            "--target",
            f"127.0.0.1:{port}",
            "--sensors",
            str(UNICAST_SENSORS),
            "--id-prefix",
            "field",
            "--seed",
            "7",
            "--report",
            str(self.dir / "unicast.json"),
            *common,
        )
        multi, _ = self.start(
            "sensors-multicast",
            "sensor_sim",
            "--target",
            f"{GROUP}:{port}",
            "--multicast-interface",
            "127.0.0.1",
            "--ttl",
            "0",
            "--sensors",
            str(MULTICAST_SENSORS),
            "--id-prefix",
            "mcast",
            "--seed",
            "8",
            "--report",
            str(self.dir / "multicast.json"),
            *common,
        )
        for proc in (uni, multi):
            proc.wait(timeout=self.duration + 30)
            CTRL_C.check()  # they stop on SIGINT: this is no failure of theirs
            if proc.returncode != 0:
                raise click.ClickException(f"sensor-sim exited with {proc.returncode}")
        truth = _ground_truth(self.dir / "unicast.json", self.dir / "multicast.json")
        self._wait_until_stored(truth["delivered"])

        step("questions", "the real telemetry-query client, over mutual TLS")
        self.query("sensors")
        self.query("latest", "field-0001")
        self.query("aggregate", "field-0001", "--metric", "temp", "--bucket", "2s", "--since", "1m")
        self.query("gaps", "field-0006")
        stats = json.loads(self.query("stats", show=False, fmt="json"))
        sensors = json.loads(self.query("sensors", show=False, fmt="json"))
        self.query("stats")

        step("ground truth", "what the simulators did on purpose, against what the collector worked out")
        lost = sum(s["lost"] for s in sensors)
        dups = sum(s["duplicates"] for s in sensors)
        late = sum(s["reordered"] for s in sensors)
        rows = [
            ("datagrams that reached the wire", truth["sent"], stats.get("received")),
            ("dropped between first and last seq", truth["lost"], lost),
            ("sent twice", truth["duplicates"], dups),
            ("sent after a higher seq", truth["reordered"], late),
        ]
        width = max(len(r[0]) for r in rows)
        click.echo(f"  {'':{width}}  {'simulator':>9}  {'collector':>9}")
        for label, expected, seen in rows:
            mark = click.style("ok", fg="green") if expected == seen else click.style("DIFFERS", fg="red")
            click.echo(f"  {label:{width}}  {expected:>9}  {seen:>9}  {mark}")

        step("shutdown", "SIGTERM to every process; the collector flushes its last batch")
        codes = self.stop_all()
        for name, code in codes:
            click.echo(f"  {name:<18} exit {'?' if code is None else code}")
        if any(code != 0 for name, code in codes if name in ("collector", "query-server")):
            raise click.ClickException("a daemon did not exit cleanly; see the logs in " + str(self.dir))
        if any(expected != seen for _, expected, seen in rows):
            raise click.ClickException("the accounts differ from the ground truth; see " + str(self.dir))
        click.secho("\nDone: every reading stored, every loss accounted for.", fg="green", bold=True)

    def _wait_until_stored(self, delivered: int) -> None:
        """Wait for the collector's counters to reach what the simulators delivered."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                stats = json.loads(self.query("stats", show=False, fmt="json"))
            except click.ClickException:
                stats = {}
            if stats.get("received", 0) >= delivered and stats.get("last_flush"):
                time.sleep(0.6)  # one more flush interval: the last batch is on disk
                return
            time.sleep(0.2)


def _ground_truth(*reports: Path) -> dict[str, int]:
    """Totals from sensor-sim reports: sent, lost as the collector can see it, duplicates."""
    sent = lost = dups = reordered = 0
    for path in reports:
        report = json.loads(path.read_text())
        sent += report["datagrams_sent"]
        for info in report["sensors"].values():
            first, n = info["first_seq"], info["generated"]
            dropped = set(info["dropped"])
            delivered = [i for i in range(n) if (first + i) % 2**32 not in dropped]
            if delivered:
                # Losses before the first or after the last delivered seq are invisible.
                lo, hi = delivered[0], delivered[-1]
                lost += sum(1 for i in range(lo, hi + 1) if (first + i) % 2**32 in dropped)
            dups += len(info["duplicated"])
            # A reordered second copy is a duplicate to the collector, not reordered.
            reordered += info["reordered"] - info["reordered_copies"]
    return {"sent": sent, "delivered": sent, "lost": lost, "duplicates": dups, "reordered": reordered}


class _Steps:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, title: str, detail: str) -> None:
        self.n += 1
        click.secho(f"[{self.n}] {title}: ", bold=True, nl=False)
        click.echo(detail)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--duration",
    type=click.FloatRange(1, 60),
    default=8.0,
    show_default=True,
    help="Seconds the simulated sensors send.",
)
@click.option("--keep", is_flag=True, help="Keep the scratch directory (database, logs, certificates).")
def main(duration: float, keep: bool) -> None:
    """Run the whole system on loopback for a few seconds and show what it saw.

    Example:

        python -m sensor_sim.demo --duration 10 --keep
    """
    from query.interrupt import interruptible

    interruptible()  # the daemons stop on SIGINT whatever we inherited: so must the demo that runs them
    signal.signal(signal.SIGINT, CTRL_C)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-telemetry-demo-"))
    demo = Demo(workdir, duration)
    click.secho(
        "gateway-telemetry demo: collector, query server and sensors as real processes on loopback\n", bold=True
    )
    try:
        try:
            demo.run()
        except click.ClickException:
            CTRL_C.check()  # a step failed because Ctrl-C stopped the daemons: say so
            raise
    except KeyboardInterrupt:
        click.echo("\ninterrupted: stopping every process", err=True)
        raise SystemExit(130) from None
    finally:
        demo.stop_all()
        if keep:
            click.echo(f"\nkept {workdir}", err=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
