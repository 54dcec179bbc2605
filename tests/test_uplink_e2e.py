"""telemetry-uplink against real nats-server processes (JetStream), end to end.

Gateway databases are real SQLite files written flush by flush (tests/uplinkgw.py:
the schema, the ingest log, accounts and gaps in one transaction per flush); the
uplink and the central consumer run as the real commands, killed with SIGKILL
where the scenario says so.  Every check compares the central database with the
gateways' exactly: the same readings, each once, and the same accounts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
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


def test_three_gateways_one_jetstream_every_reading_exactly_once(tmp_path, daemons):
    with NatsServer(tmp_path) as ns:
        gws = {f"site-{i}": GatewayDB(str(tmp_path / f"gw{i}.db"), seed=i) for i in range(3)}
        for gw in gws.values():
            for _ in range(5):
                gw.flush()
        # systemd's side of sd_notify, read as it arrives (an unread AF_UNIX datagram queue
        # holds net.unix.max_dgram_qlen = 10 messages, then the sender blocks)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(0.05)
        notes: list[str] = []
        done = threading.Event()

        def listen() -> None:
            while not done.is_set():
                try:
                    notes.append(notify.recv(4096).decode())
                except TimeoutError:
                    pass

        listener = threading.Thread(target=listen, name="notify-socket")
        listener.start()
        try:
            _three_gateways(tmp_path, daemons, ns, gws)
        finally:  # a failure must not leave the reader running (the run could not exit)
            done.set()
            listener.join()
            notify.close()
        assert notes[0] == "READY=1" and notes[-1] == "STOPPING=1"
        status_notes = [n for n in notes if n.startswith("STATUS=")]
        assert status_notes and "acked" in status_notes[-1] and "pending 0 readings" in status_notes[-1]


def _three_gateways(tmp_path, daemons, ns, gws) -> None:
    """Three uplinks and one consumer until the central database equals the gateways."""
    ups = [
        daemons(
            name,
            *uplink_args(gw, name, [ns.url]),
            env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")} if name == "site-0" else None,
        )
        for name, gw in gws.items()
    ]
    central = str(tmp_path / "central.db")
    consumer = daemons("consume", *consume_args(central, [ns.url]))
    for _ in range(10):  # the gateways keep committing while everything runs
        for gw in gws.values():
            gw.flush()
        time.sleep(0.02)
    wait_central(central, gws)
    for up in ups:
        assert up.stop() == 0
        assert "DATA LOST" not in up.text()
    assert consumer.stop() == 0
    assert all(position(gw) == gw.flushes for gw in gws.values())
    # the query server's reader opens the central database as it is
    from collector import schema

    schema.open_reader(central).close()


def test_kill_9_the_uplink_mid_publish_five_times(tmp_path, daemons):
    with NatsServer(tmp_path) as ns:
        gw = GatewayDB(str(tmp_path / "gw.db"), seed=7)
        for _ in range(40):
            gw.flush()
        central = str(tmp_path / "central.db")
        consumer = daemons("consume", *consume_args(central, [ns.url]))
        kills = 0
        # small messages: a round is many publishes, so a kill lands inside one
        args = uplink_args(gw, "site-9", [ns.url], "--max-datagrams", "2")
        while kills < 5:
            before = status(gw).get("sent", 0) if kills == 0 else 0
            up = daemons(f"uplink{kills}", *args)
            wait_for(
                lambda: (
                    up.text().count("connected to") >= 1
                    and status(gw).get("pid") == up.proc.pid
                    and status(gw).get("sent", 0) > before
                ),
                15,
                0.005,
                what="the uplink to publish",
            )
            assert up.stop(signal.SIGKILL) == -signal.SIGKILL
            kills += 1
            for _ in range(3):
                gw.flush()
        up = daemons("uplink-last", *args)
        wait_for(lambda: position(gw) == gw.flushes, 30, 0.05, what="the uplink to catch up")
        wait_central(central, {"site-9": gw})
        assert up.stop() == 0 and consumer.stop() == 0


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


# ---------------------------------------------------------------- brokers that refuse us


def _garbage_server(stop: threading.Event):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.05)

    def loop():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass
        srv.close()

    thread = threading.Thread(target=loop, name="garbage-server")
    thread.start()
    return srv.getsockname()[1], thread


def _refused(daemons, gw, name, servers, extra, line):
    up = daemons(name, *uplink_args(gw, "site-1", servers, *extra))
    wait_for(lambda: up.text().count(line) >= 2, 15, 0.05, what=f"two attempts saying {line!r}")
    assert up.proc.poll() is None  # still running, still retrying
    assert up.stop() == 0
    warnings = [x for x in up.text().splitlines() if " WARNING " in x]
    assert warnings and all(line in x and "retrying in" in x for x in warnings)
    assert "Traceback" not in up.text()
    return up.text()


def test_wrong_credentials_wrong_ca_and_a_non_nats_server_each_one_clear_line(tmp_path, daemons):
    import trustme

    gw = GatewayDB(str(tmp_path / "gw.db"))
    gw.flush()
    secret = tmp_path / "password"
    secret.write_text("wrong-secret-123\n")
    secret.chmod(0o600)
    with NatsServer(tmp_path, "auth", conf='authorization { user: "site-1", password: "right-secret" }') as ns:
        text = _refused(
            daemons,
            gw,
            "badpass",
            [ns.url],
            ["--user", "site-1", "--password-file", str(secret)],
            "the broker refused our credentials (authorization violation)",
        )
        assert "wrong-secret-123" not in text

    ca, other_ca = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    other_ca.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    tls = f'tls {{ cert_file: "{tmp_path / "server.pem"}", key_file: "{tmp_path / "server.pem"}" }}'
    with NatsServer(tmp_path, "tls", conf=tls) as ns:
        _refused(
            daemons,
            gw,
            "badca",
            [f"tls://127.0.0.1:{ns.port}"],
            ["--ca", str(tmp_path / "other-ca.pem")],
            "TLS: the broker's certificate did not verify",
        )

    stop = threading.Event()
    port, thread = _garbage_server(stop)
    try:
        _refused(daemons, gw, "garbage", [f"nats://127.0.0.1:{port}"], [], "the peer does not speak the NATS protocol")
    finally:
        stop.set()
        thread.join()
    assert position(gw) == 0  # nothing was claimed sent


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


def test_a_plaintext_broker_is_refused_when_tls_is_asked_for(tmp_path, daemons):
    with NatsServer(tmp_path) as ns:
        gw = GatewayDB(str(tmp_path / "gw.db"))
        gw.flush()
        _refused(daemons, gw, "plain", [f"tls://127.0.0.1:{ns.port}"], [], "the broker does not offer TLS")
        assert position(gw) == 0


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
