"""Real gateways for the uplink tests: on each, a `telemetry-collector` process fed by
real `sensor-sim` runs over loopback UDP, and its own `telemetry-uplink run`;
centrally one `telemetry-uplink consume`.  Everything is a child process started
the one way (processes.Daemon, ready at its `started:` line), and everything is
compared exactly: the central database against each gateway's database (read as
telemetry-query reads them), each gateway's `received` counter against what the
simulator reports it sent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from uplinkgw import accounts, readings

from helpers import db_counters, wait_for
from processes import CollectorProcess, Daemon

# Fast enough for tests: poll often, back off briefly, a status file twice a second, the
# position file each second (still many rounds a write: the pacing is what runs).
FAST = [
    *("--poll-interval", "0.05", "--backoff-max", "0.5", "--status-interval", "0.5", "--ack-timeout", "3"),
    *("--position-interval", "1"),
]


def clean_env(extra: dict | None = None) -> dict:
    """This process's environment without TELEMETRY_* or NOTIFY_SOCKET (the host's must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEMETRY_", "NOTIFY_SOCKET"))}
    env.update(extra or {})
    return env


def uplink(bin_path, log: Path, *args: str, env: dict | None = None) -> Daemon:
    """`telemetry-uplink ARGS`, ready at its `started:` line."""
    return Daemon([bin_path("telemetry-uplink"), *args], log, r"started: ", env=clean_env(env), timeout=30)


class Uplinks:
    """`telemetry-uplink` commands started by one test, each logging to WORKDIR/NAME.log;
    close() kills those still running (a fixture's teardown)."""

    def __init__(self, bin_path, workdir: Path) -> None:
        self.bin_path, self.workdir = bin_path, Path(workdir)
        self.started: list[Daemon] = []

    def start(self, name: str, *args: str, env: dict | None = None) -> Daemon:
        d = uplink(self.bin_path, self.workdir / f"{name}.log", *args, env=env)
        self.started.append(d)
        return d

    def close(self) -> None:
        for d in self.started:
            if d.proc.poll() is None:
                d.kill()


def consume_args(db: str, servers: list[str], *extra: str) -> list[str]:
    args = ["consume", "--db", db, "--backoff-max", "0.5", "--ack-wait", "2", "--status-interval", "3600", *extra]
    for s in servers:
        args += ["--servers", s]
    return args


def position(db: str) -> int:
    """The uplink's acked position (`<db>-uplink`), 0 before its first ack."""
    try:
        return int(Path(db + "-uplink").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def status(db: str) -> dict:
    """The uplink's status file, {} before it wrote one."""
    try:
        return json.loads(Path(db + "-uplink.status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


class Gateway:
    """One site: a real collector on 127.0.0.1 (a port of its own) and, once started, its uplink."""

    def __init__(self, bin_path, workdir: Path, name: str, *collector_args: str) -> None:
        self.bin_path = bin_path
        self.workdir = Path(workdir)
        self.name = name
        self.db = str(self.workdir / f"{name}.db")
        self.sent = 0  # datagrams the simulator runs reported sent to this gateway
        self.sims = 0
        self.uplinks: list[Daemon] = []
        self.collector = CollectorProcess(
            bin_path("telemetry-collector"),
            self.db,
            self.workdir / f"{name}-collector.log",
            *collector_args,
            env=clean_env(),
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.collector.port()}"

    def sim_cmd(self, *args: str) -> tuple[list[str], Path]:
        self.sims += 1
        report = self.workdir / f"{self.name}-sim{self.sims}.json"
        cmd = [self.bin_path("sensor-sim"), "--target", self.target, *args, "--report", str(report)]
        return cmd, report

    def sim(self, *args: str) -> dict:
        """Run sensor-sim against this gateway to completion; its report."""
        cmd, path = self.sim_cmd(*args)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=clean_env())
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return self.reported(path)

    def start_sim(self, *args: str) -> None:
        """sensor-sim in the background (give it --duration); stop_sim() ends it with Ctrl-C."""
        cmd, self._report = self.sim_cmd(*args)
        self._sim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env())

    def stop_sim(self) -> dict:
        """Ctrl-C: the simulator writes its report and exits 130; its report."""
        self._sim.send_signal(signal.SIGINT)
        _, err = self._sim.communicate(timeout=30)
        assert self._sim.returncode == 130, err
        return self.reported(self._report)

    def reported(self, path: Path) -> dict:
        report = json.loads(path.read_text())
        assert report["send_failures"] == 0
        self.sent += report["datagrams_sent"]
        return report

    def wait_ingested(self, timeout: float = 15) -> None:
        """Until the collector has committed every datagram the simulators sent (exactly: no more)."""
        self.collector.wait_received(self.sent, timeout)
        counters = self.collector.counters()
        assert counters["received"] == self.sent and counters.get("kernel_drops", 0) == 0, counters

    def start_uplink(self, servers: list[str], *extra: str, env: dict | None = None, tag: str = "") -> Daemon:
        args = ["run", "--db", self.db, "--gateway", self.name, *FAST, *extra]
        for s in servers:
            args += ["--servers", s]
        up = uplink(self.bin_path, self.workdir / f"{self.name}-uplink{tag or len(self.uplinks)}.log", *args, env=env)
        self.uplinks.append(up)
        return up

    def position(self) -> int:
        return position(self.db)

    def last_entry(self) -> int:
        """The newest ingest_log id the collector committed (what a caught-up uplink has acked)."""
        import sqlite3

        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT coalesce(max(id), 0) FROM ingest_log").fetchone()[0]
        finally:
            conn.close()

    def readings(self) -> set[tuple]:
        return readings(self.db, f"{self.name}:")

    def accounts(self) -> dict:
        return accounts(self.db, f"{self.name}:")

    def close(self) -> None:
        sim = getattr(self, "_sim", None)
        if sim is not None and sim.poll() is None:
            sim.kill()
            sim.communicate()
        for up in self.uplinks:
            if up.proc.poll() is None:
                up.kill()
        if self.collector.proc.poll() is None:
            self.collector.kill()


def kill_mid_publish(gw: Gateway, stream: StreamWatch, servers: list[str], *extra: str) -> bool:
    """Start an uplink and kill -9 it as soon as JetStream holds messages of its first round;
    True when it died inside the round: the broker holds messages its position does not cover
    (published, the position not yet written), which the next uplink must send again."""
    start, held = gw.position(), stream.messages()
    up = gw.start_uplink(servers, *extra)
    wait_for(
        lambda: stream.messages() > held or up.proc.poll() is not None, 15, 0.002, what="the uplink's first publishes"
    )
    assert up.stop(signal.SIGKILL) == -signal.SIGKILL
    return gw.position() == start and stream.messages() > held


def wait_central(central: str, gateways: list[Gateway], timeout: float = 30.0) -> tuple[set, dict]:
    """Until the central database holds exactly the gateways' readings and accounts."""
    want_r: set = set()
    want_a: dict = {}
    for gw in gateways:
        want_r |= gw.readings()
        want_a.update(gw.accounts())
    wait_central_equals(central, want_r, want_a, timeout)
    return want_r, want_a


def wait_central_equals(central: str, want_r: set, want_a: dict, timeout: float = 30.0) -> None:
    """Until the central database holds exactly these readings and accounts (prefixed sensor
    ids); then nothing doubled: the consumer inserted each reading once and rejected nothing.
    The wait is `timeout` and one second more per 10,000 readings awaited (a loaded box)."""
    timeout += len(want_r) / 10_000

    def same() -> bool:
        if not os.path.exists(central):
            return False
        try:
            return readings(central) == want_r and accounts(central) == want_a
        except Exception:  # the consumer is still creating the schema
            return False

    try:
        wait_for(same, timeout, 0.1, what="the central database to equal the gateways'")
    except AssertionError:
        got = readings(central) if os.path.exists(central) else set()
        got_a = accounts(central) if os.path.exists(central) else {}
        wrong = {k: (got_a.get(k), v) for k, v in want_a.items() if got_a.get(k) != v}
        raise AssertionError(
            f"central has {len(got)} readings, gateways {len(want_r)}; missing {len(want_r - got)}, "
            f"unexpected {len(got - want_r)}; accounts that differ (central, gateway): {wrong}; "
            f"central sensors not on a gateway: {sorted(set(got_a) - set(want_a))}"
        ) from None
    counters = db_counters(central)
    assert counters["uplink_readings"] == len(want_r)
    assert sum(v for k, v in counters.items() if k.startswith("uplink_rejected:")) == 0


class StreamWatch:
    """The broker's own count of the messages a stream holds, read over a client connection
    of the test's (one event loop, kept open: a read is one JetStream API round trip)."""

    def __init__(self, url: str, stream: str = "TELEMETRY", **connect: object) -> None:
        import asyncio

        import nats

        self.stream = stream
        self.loop = asyncio.new_event_loop()
        self.nc = self.loop.run_until_complete(nats.connect(url, allow_reconnect=False, **connect))
        self.js = self.nc.jetstream(timeout=2)

    def messages(self) -> int:
        import nats.js.errors

        try:
            return self.loop.run_until_complete(self.js.stream_info(self.stream)).state.messages
        except nats.js.errors.NotFoundError:
            return 0

    def ack_pending(self, durable: str = "telemetry-central") -> int:
        """Messages the broker delivered to this durable consumer that it has not acked yet
        (0 before the consumer first made it)."""
        import nats.js.errors

        try:
            return self.loop.run_until_complete(self.js.consumer_info(self.stream, durable)).num_ack_pending
        except nats.js.errors.NotFoundError:
            return 0

    def first_unacked(self, durable: str = "telemetry-central") -> bytes | None:
        """The payload of the oldest stream message the durable consumer has not acked (None
        when every message is acked, or before the consumer exists)."""
        import nats.js.errors

        try:
            info = self.loop.run_until_complete(self.js.consumer_info(self.stream, durable))
            if info.num_ack_pending == 0:
                return None
            msg = self.loop.run_until_complete(self.js.get_msg(self.stream, info.ack_floor.stream_seq + 1))
        except nats.js.errors.NotFoundError:
            return None
        return msg.data

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.nc.close())
        finally:
            self.loop.close()

    def __enter__(self) -> StreamWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
