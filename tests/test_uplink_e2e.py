"""telemetry-uplink against real nats-server processes (JetStream), end to end.

Gateway databases are real SQLite files written flush by flush (tests/uplinkgw.py:
the schema, the ingest log, accounts and gaps in one transaction per flush); the
uplink and the central consumer run as the real commands, killed with SIGKILL
where the scenario says so.  Every check compares the central database with the
gateways' exactly: the same readings, each once, and the same accounts.

The scenarios with real collectors fed by sensor-sim (three gateways, kill -9
mid-publish, brokers that refuse us while ingest goes on) are in
tests/test_uplink_gateways.py; here the gateway is a scripted writer, which
commits exactly when the scenario needs it (during an outage, around a node's
death).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from natsserver import Cluster, NatsServer, wait_jetstream_ready
from uplinkgw import GatewayDB, accounts, log_readings, readings

from helpers import db_counters, wait_for
from processes import Daemon

FAST = ["--poll-interval", "0.05", "--backoff-max", "0.5", "--status-interval", "0.5", "--ack-timeout", "3"]


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEMETRY_", "NOTIFY_SOCKET"))}
    env.update(extra or {})
    return env


@pytest.fixture
def daemons(bin_path, tmp_path):
    """Start telemetry-uplink commands (processes.Daemon: ready at their `started:` line); all
    are killed at the end of the test if still running."""
    started: list[Daemon] = []

    def make(name: str, *args: str, env: dict | None = None) -> Daemon:
        d = Daemon(
            [bin_path("telemetry-uplink"), *args], tmp_path / f"{name}.log", r"started: ", env=_env(env), timeout=30
        )
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc.poll() is None:
            d.kill()


def uplink_args(gw: GatewayDB, name: str, servers: list[str], *extra: str) -> list[str]:
    args = ["run", "--db", gw.path, "--gateway", name, *FAST, *extra]
    for s in servers:
        args += ["--servers", s]
    return args


def consume_args(db: str, servers: list[str], *extra: str) -> list[str]:
    args = ["consume", "--db", db, "--backoff-max", "0.5", "--ack-wait", "2", "--status-interval", "3600", *extra]
    for s in servers:
        args += ["--servers", s]
    return args


def expected(gws: dict[str, GatewayDB]) -> tuple[set, dict]:
    want_r: set = set()
    want_a: dict = {}
    for name, gw in gws.items():
        want_r |= log_readings(gw.path, f"{name}:")
        want_a.update(accounts(gw.path, f"{name}:"))
    return want_r, want_a


def wait_central(central: str, gws: dict[str, GatewayDB], timeout: float = 30.0) -> None:
    """Until the central database holds exactly the gateways' readings and accounts."""
    want_r, want_a = expected(gws)

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
        raise AssertionError(
            f"central has {len(got)} readings, gateways {len(want_r)}; missing "
            f"{len(want_r - got)}, unexpected {len(got - want_r)}"
        ) from None
    counters = db_counters(central)
    # nothing doubled: every reading row the consumer inserted is one of the gateways'
    assert counters["uplink_readings"] == len(want_r)
    assert sum(v for k, v in counters.items() if k.startswith("uplink_rejected:")) == 0


def position(gw: GatewayDB) -> int:
    try:
        return int(Path(gw.path + "-uplink").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def status(gw: GatewayDB) -> dict:
    try:
        return json.loads(Path(gw.path + "-uplink.status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def test_broker_down_longer_than_the_dedup_window_then_back(tmp_path, daemons):
    ns = NatsServer(tmp_path).start()
    try:
        gw = GatewayDB(str(tmp_path / "gw.db"), seed=3)
        for _ in range(5):
            gw.flush()
        central = str(tmp_path / "central.db")
        args = uplink_args(gw, "site-3", [ns.url], "--duplicate-window", "1", "--max-datagrams", "3")
        up = daemons("uplink", *args)
        consumer = daemons("consume", *consume_args(central, [ns.url], "--duplicate-window", "1"))
        wait_for(lambda: position(gw) == gw.flushes, 15, 0.02, what="the first entries acked")
        ns.kill()
        down_since = time.monotonic()
        while time.monotonic() - down_since < 2.0:  # twice the duplicate window, ingest going on
            gw.flush()
            time.sleep(0.05)
        wait_for(lambda: "retrying in" in up.text(), 10, 0.05, what="the uplink to report the outage")
        pending = status(gw)
        assert pending.get("pending_entries", 0) > 0 or position(gw) < gw.flushes
        ns.start()  # same port, same store
        wait_central(central, {"site-3": gw})
        assert position(gw) == gw.flushes
        assert up.stop() == 0 and consumer.stop() == 0
        assert "DATA LOST" not in up.text()
    finally:
        ns.stop()


def test_three_node_cluster_kill_9_one_node_mid_stream(tmp_path, daemons):
    with Cluster(tmp_path) as cluster:
        wait_jetstream_ready(cluster.urls[0], replicas=3)
        gw = GatewayDB(str(tmp_path / "gw.db"), seed=5)
        for _ in range(5):
            gw.flush()
        central = str(tmp_path / "central.db")
        up = daemons("uplink", *uplink_args(gw, "site-5", cluster.urls, "--replicas", "3"))
        consumer = daemons("consume", *consume_args(central, list(reversed(cluster.urls)), "--replicas", "3"))
        wait_for(lambda: position(gw) == gw.flushes, 30, 0.02, what="the first entries acked")
        connected = wait_for(lambda: status(gw).get("connected"), 10, 0.05, what="the status file")
        victim = next(n for n in cluster.nodes if n.url == connected)
        for _ in range(5):
            gw.flush()
        victim.kill()  # the node the uplink talks to, mid-stream
        for _ in range(20):
            gw.flush()
            time.sleep(0.02)
        wait_central(central, {"site-5": gw}, timeout=45)
        assert position(gw) == gw.flushes
        wait_for(
            lambda: status(gw).get("connected") not in (None, victim.url),
            10,
            0.05,
            what="the status file to name the node the uplink moved to",
        )
        assert up.stop() == 0 and consumer.stop() == 0


def test_tls_with_the_right_ca_delivers(tmp_path, daemons):
    import trustme

    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls = f'tls {{ cert_file: "{tmp_path / "server.pem"}", key_file: "{tmp_path / "server.pem"}" }}'
    with NatsServer(tmp_path, "tls", conf=tls) as ns:
        gw = GatewayDB(str(tmp_path / "gw.db"))
        for _ in range(3):
            gw.flush()
        url = f"tls://127.0.0.1:{ns.port}"
        central = str(tmp_path / "central.db")
        up = daemons("uplink", *uplink_args(gw, "site-1", [url], "--ca", str(tmp_path / "ca.pem")))
        consumer = daemons("consume", *consume_args(central, [url], "--ca", str(tmp_path / "ca.pem")))
        wait_central(central, {"site-1": gw})
        assert up.stop() == 0 and consumer.stop() == 0


def test_token_from_a_file_delivers(tmp_path, daemons):
    token = tmp_path / "token"
    token.write_text("tok-3f9a\n")
    token.chmod(0o600)
    with NatsServer(tmp_path, "tokensrv", conf='authorization { token: "tok-3f9a" }') as ns:
        gw = GatewayDB(str(tmp_path / "gw.db"))
        for _ in range(2):
            gw.flush()
        central = str(tmp_path / "central.db")
        up = daemons("uplink", *uplink_args(gw, "site-1", [ns.url], "--token-file", str(token)))
        consumer = daemons("consume", *consume_args(central, [ns.url], "--token-file", str(token)))
        wait_central(central, {"site-1": gw})
        assert up.stop() == 0 and consumer.stop() == 0
        assert "tok-3f9a" not in up.text() + consumer.text()
