"""telemetry-uplink against real nats-server processes (JetStream), end to end.

Gateway databases are real SQLite files written flush by flush (tests/uplinkgw.py:
the schema, the ingest log, accounts and gaps in one transaction per flush); the
uplink and the central consumer run as the real commands, killed with SIGKILL
where the scenario says so.  Every check compares the central database with the
gateways' exactly: the same readings, each once, and the same accounts.

The scenarios with real collectors fed by sensor-sim (three gateways, kill -9
mid-publish, a broker outage longer than the duplicate window, brokers that
refuse us while ingest goes on, NKey and creds credentials) are in
tests/test_uplink_gateways.py; here the gateway is a scripted writer, which
commits exactly when the scenario needs it (around a node's death), for the
cluster, TLS and token cases.
"""

from __future__ import annotations

import time

import pytest
import uplinkfleet
from natsserver import Cluster, NatsServer, wait_jetstream_ready
from uplinkfleet import FAST, Uplinks, consume_args, wait_central_equals
from uplinkgw import GatewayDB, accounts, log_readings

from helpers import wait_for


@pytest.fixture
def daemons(bin_path, tmp_path):
    """Start telemetry-uplink commands (ready at their `started:` line); all are killed at
    the end of the test if still running."""
    uplinks = Uplinks(bin_path, tmp_path)
    yield uplinks.start
    uplinks.close()


def uplink_args(gw: GatewayDB, name: str, servers: list[str], *extra: str) -> list[str]:
    args = ["run", "--db", gw.path, "--gateway", name, *FAST, *extra]
    for s in servers:
        args += ["--servers", s]
    return args


def wait_central(central: str, gws: dict[str, GatewayDB], timeout: float = 30.0) -> None:
    """Until the central database holds exactly the gateways' readings (from their ingest
    logs) and accounts, each reading once."""
    want_r: set = set()
    want_a: dict = {}
    for name, gw in gws.items():
        want_r |= log_readings(gw.path, f"{name}:")
        want_a.update(accounts(gw.path, f"{name}:"))
    wait_central_equals(central, want_r, want_a, timeout)


def position(gw: GatewayDB) -> int:
    return uplinkfleet.position(gw.path)


def status(gw: GatewayDB) -> dict:
    return uplinkfleet.status(gw.path)


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
        # the central side may hold the last round before the uplink has written its position
        wait_for(lambda: position(gw) == gw.flushes, 10, 0.02, what="the position to cover every flush")
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
        # payload 1 (one sensor a message, as older uplinks send): the consumer takes both versions
        up = daemons(
            "uplink", *uplink_args(gw, "site-1", [ns.url], "--token-file", str(token), "--payload-version", "1")
        )
        consumer = daemons("consume", *consume_args(central, [ns.url], "--token-file", str(token)))
        wait_central(central, {"site-1": gw})
        assert up.stop() == 0 and consumer.stop() == 0
        assert "tok-3f9a" not in up.text() + consumer.text()
