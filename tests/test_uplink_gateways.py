"""The uplink with real gateways: `telemetry-collector` processes fed by `sensor-sim`
(loss, duplication, reordering, restarts), each with its own `telemetry-uplink run`,
one real JetStream (nats-server), one `telemetry-uplink consume`.

Every check is exact: each gateway committed every datagram its simulators
reported sent (`received`), and the central database holds every reading of
every gateway once and each sensor's accounts (datagrams, readings, lost,
duplicates, reordered, restarts, first/last seen, and its gap rows) equal to the
gateway's.  tests/test_uplink_e2e.py keeps the scenarios whose gateway is a
scripted writer (tests/uplinkgw.py): a broker outage longer than the duplicate
window, a three-node cluster losing a node, TLS and tokens.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import nkeys
import pytest
from natsauth import Operator, identity
from natsserver import Cluster, NatsServer, free_port, wait_jetstream_ready
from uplinkfleet import (
    Gateway,
    StreamWatch,
    kill_mid_publish,
    status,
    wait_central,
    wait_central_equals,
)
from uplinkgw import log_readings

from collector.uplink import core

from helpers import db_counters, db_query, run, wait_for

FAULTS = ["--loss", "0.05", "--duplicate", "0.05", "--reorder", "0.1"]


@pytest.fixture
def gateways(bin_path, tmp_path):
    """Make real gateways; every process of theirs is killed at the end of the test."""
    made: list[Gateway] = []

    def make(name: str, *collector_args: str) -> Gateway:
        gw = Gateway(bin_path, tmp_path, name, *collector_args)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


def faults_happened(gw: Gateway) -> dict:
    """The gateway's totals: each fault the simulators injected really reached its accounts."""
    acc = gw.accounts()
    totals = {k: sum(a[i] for a in acc.values()) for i, k in ((3, "lost"), (4, "duplicates"), (5, "reordered"))}
    totals["restarts"] = sum(a[6] for a in acc.values())
    totals["gaps"] = sum(len(a) - 7 for a in acc.values())
    return totals


def test_three_gateways_with_simulators_every_reading_once_and_the_same_accounts(
    tmp_path, gateways, consumer, bin_path
):
    with NatsServer(tmp_path) as ns:
        gws = [gateways(f"site-{i}") for i in range(3)]
        # systemd's side of sd_notify for one uplink, read as it arrives (an unread AF_UNIX
        # datagram queue holds net.unix.max_dgram_qlen = 10 messages, then the sender blocks)
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
            # every sensor restarts between the two runs: a new boot, or (without one) seqs from 0 again
            first = [["--boot-value", "100"], ["--no-boot", "--start-seq", "1000000"], ["--boot-value", "100"]]
            second = [["--boot-value", "200"], ["--no-boot", "--start-seq", "0"], ["--boot-value", "200"]]
            prefix = [["--id-prefix", "odd.id:with/slash"], [], []]  # characters the ids allow and subjects do not
            run = ["--sensors", "3", "--count", "200", "--rate", "max", *FAULTS]
            for i, gw in enumerate(gws):  # what a gateway holds before its uplink first starts
                gw.sim(*run, "--seed", str(i), *first[i], *prefix[i])
            for i, gw in enumerate(gws):
                env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")} if i == 0 else None
                gw.start_uplink([ns.url], env=env)
            central = str(tmp_path / "central.db")
            consume = consumer(central, [ns.url])
            for i, gw in enumerate(gws):  # and what it ingests while everything runs
                gw.sim(*run, "--seed", str(10 + i), *second[i], *prefix[i])
            for gw in gws:
                gw.wait_ingested()
                totals = faults_happened(gw)
                assert all(totals.values()), (gw.name, totals)  # every kind of fault really arrived
            _, want_a = wait_central(central, gws)
            assert len(want_a) == 9
            for gw in gws:
                up = gw.uplinks[-1]
                assert up.stop() == 0
                assert "DATA LOST" not in up.text() and " ERROR " not in up.text()
            assert consume.stop() == 0
        finally:  # a failure must not leave the reader running (the run could not exit)
            done.set()
            listener.join()
            notify.close()
        assert notes[0] == "READY=1" and notes[-1] == "STOPPING=1"
        status_notes = [n for n in notes if n.startswith("STATUS=")]
        assert status_notes and "acked" in status_notes[-1] and "pending 0 readings" in status_notes[-1]


def test_kill_9_the_uplink_mid_publish_five_times_while_the_collector_ingests(tmp_path, gateways, consumer):
    """Each kill lands inside a round: JetStream already holds messages the uplink's position
    does not cover (published, the position not yet written), and the next uplink sends them
    again.  The central side still ends with every reading once and the gateway's accounts."""
    with NatsServer(tmp_path) as ns, StreamWatch(ns.url) as stream:
        gw = gateways("site-9")
        central = str(tmp_path / "central.db")
        consume = consumer(central, [ns.url])
        # the simulator sends until told to stop (Ctrl-C writes its report): ingest goes on throughout
        gw.start_sim("--sensors", "4", "--rate", "100", "--duration", "60", "--seed", "9", *FAULTS)
        gw.collector.wait_received(1)
        # one datagram a message: a round is hundreds of publishes, so a kill lands inside one
        kills = attempts = 0
        while kills < 5:
            attempts += 1
            assert attempts <= 15, f"only {kills} of {attempts - 1} kills landed inside a round"
            kills += kill_mid_publish(gw, stream, [ns.url], "--max-datagrams", "1")
        gw.stop_sim()
        gw.wait_ingested()
        up = gw.start_uplink([ns.url], "--max-datagrams", "1")
        wait_central(central, [gw])
        totals = faults_happened(gw)
        assert all(v for k, v in totals.items() if k != "restarts"), totals  # the faults really arrived
        assert up.stop() == 0 and consume.stop() == 0
        assert "DATA LOST" not in up.text()


def central_messages(central: str) -> int:
    """Messages the central database has committed (0 before the consumer created it)."""
    try:
        return int(db_counters(central).get("uplink_messages", 0))
    except Exception:  # not created yet, or the schema is being made
        return 0


def committed_unacked(central: str, stream: StreamWatch) -> bool:
    """The oldest message the broker holds unacked is in the central database already: the
    consumer committed it and had not acked it yet (a payload-3 block, one datagram: its key
    is in uplink_ranges)."""
    data = stream.first_unacked()
    if data is None:
        return False
    item = core.decode(data)
    if not isinstance(item, core.Blocks) or not item.blocks:
        return False  # an accounts message: not told apart here
    (block,) = item.blocks
    lo, _ = block.range
    return bool(
        db_query(
            central,
            "SELECT count(*) FROM uplink_ranges WHERE gateway = ? AND origin = ? AND lo <= ? AND hi >= ?",
            item.gateway,
            item.origin,
            lo,
            lo,
        )[0][0]
    )


def backlogs_in_the_stream(gateways, ns: NatsServer, *, sensors: int, count: int, seed: int, max_datagrams: int):
    """Three gateways, site-0..2, each fed by a faulty simulator and its whole backlog
    published to `ns` (`max_datagrams` a message) before any consumer runs."""
    gws = [gateways(f"site-{i}") for i in range(3)]
    for i, gw in enumerate(gws):
        gw.sim("--sensors", str(sensors), "--count", str(count), "--rate", "max", "--seed", str(seed + i), *FAULTS)
        gw.wait_ingested()
        gw.start_uplink([ns.url], "--max-datagrams", str(max_datagrams))
    for gw in gws:
        wait_for(lambda gw=gw: gw.position() == gw.last_entry(), 30, 0.05, what=f"{gw.name}'s uplink to catch up")
    return gws


def test_kill_9_the_consumer_between_commit_and_ack_and_mid_batch(tmp_path, gateways, consumer):
    """Three gateways' backlogs in JetStream, one datagram a message.  The consumer is frozen
    (SIGSTOP) right after a COMMIT and killed (SIGKILL) until it was caught twice holding
    messages it had committed and not acked, and otherwise while it held deliveries it had
    not acked (its next transaction in flight), five kills in all.  JetStream redelivers what
    it had not acked; the central database ends with every reading of every gateway once and
    each sensor's accounts equal to the gateway's, exactly, and the redelivered readings it
    already had are counted as replayed."""
    rng = random.Random(7)
    with NatsServer(tmp_path) as ns, StreamWatch(ns.url) as stream:
        gws = backlogs_in_the_stream(gateways, ns, sensors=3, count=1000, seed=30, max_datagrams=1)
        central = str(tmp_path / "central.db")
        after_commit = in_flight = runs = 0
        while after_commit < 2 or after_commit + in_flight < 5:
            runs += 1
            assert runs <= 25, f"{after_commit} kills after a commit, {in_flight} mid-transaction in {runs - 1} runs"
            before = central_messages(central)
            c = consumer(central, [ns.url], "--batch", "100")
            wait_for(
                lambda: central_messages(central) > before or c.proc.poll() is not None,
                20,
                0.002,
                what="the consumer's next commit",
            )
            assert c.proc.poll() is None, c.text()[-2000:]
            caught = False
            if after_commit < 2:
                # freeze it at its next COMMIT (a reader sees it before the acks reach the broker,
                # when the freeze is quick enough) and look: killed there either way
                reader = sqlite3.connect(f"file:{central}?mode=ro", uri=True)
                try:
                    seen = now = central_messages(central)
                    deadline = time.monotonic() + 15
                    while now == seen and time.monotonic() < deadline:
                        (now,) = reader.execute("SELECT value FROM counters WHERE name = 'uplink_messages'").fetchone()
                    c.proc.send_signal(signal.SIGSTOP)
                    caught = committed_unacked(central, stream)
                finally:
                    reader.close()
            else:
                time.sleep(rng.uniform(0, 0.02))
            assert c.stop(signal.SIGKILL) == -signal.SIGKILL
            after_commit += caught
            in_flight += not caught and stream.ack_pending() > 0  # it died holding deliveries unacked
        want = sum(len(gw.readings()) for gw in gws)
        assert db_counters(central)["uplink_readings"] < want  # the kills landed before the end
        final = consumer(central, [ns.url])
        wait_central(central, gws, timeout=60)  # exact: each reading once, accounts equal, nothing rejected
        assert final.stop() == 0
        counters = db_counters(central)
        assert counters["uplink_readings"] == want
        # the committed-and-unacked messages came again (in a later run) and added nothing
        assert counters["uplink_replayed_readings"] > 0
        assert " ERROR " not in final.text() and "Traceback" not in final.text()


def children(pid: int) -> set[int]:
    """The process ids of `pid`'s children (every thread's)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:  # the thread ended meanwhile
            pass
    return out


def freeze_new_workers(c, known: set[int], count: int) -> set[int]:
    """Wait for the consumer `c` to have `count` worker processes not in `known` (a pool starts
    its workers when the writer first hands it work), and stop them at once (SIGSTOP): the writer
    then waits for their results, so its drain is held mid-way, however fast it was, until the
    test kills one and continues the others."""
    new = wait_for(
        lambda: (
            len(children(c.proc.pid) - known) >= count and children(c.proc.pid) - known or c.proc.poll() is not None
        ),
        30,
        0.002,
        what=lambda: f"a new worker of the consumer (known {sorted(known)}): {c.text()[-1500:]}",
    )
    assert c.proc.poll() is None, c.text()[-2000:]
    for pid in new:
        os.kill(pid, signal.SIGSTOP)
    return new


def test_kill_9_a_close_worker_of_the_consumer_twice_nothing_lost_or_doubled(tmp_path, gateways, consumer):
    """The consumer closes heads into chunks in a worker process (--close-workers 1; a small
    --head-budget makes heads close all along).  Its worker is killed (SIGKILL) twice while
    it drains three gateways' backlogs: the writer closes those heads itself, says so, starts
    a new worker, and the central database ends with every reading once, the accounts equal."""
    with NatsServer(tmp_path) as ns:
        gws = backlogs_in_the_stream(gateways, ns, sensors=4, count=800, seed=50, max_datagrams=4)
        central = str(tmp_path / "central.db")
        c = consumer(central, [ns.url], "--batch", "2", "--close-workers", "1", "--head-budget", "0.01")
        want = sum(len(gw.readings()) for gw in gws)
        killed: set[int] = set()
        for _ in range(2):
            (worker,) = freeze_new_workers(c, killed, 1)
            assert db_counters(central).get("uplink_readings", 0) < want  # the kill lands before the end
            os.kill(worker, signal.SIGKILL)
            killed.add(worker)
        wait_central(central, gws, timeout=60)  # exact: each reading once, accounts equal, nothing rejected
        assert c.stop() == 0
        text = c.text()
        assert text.count("a worker process died") == 2, text[-3000:]
        assert " ERROR " not in text and "Traceback" not in text
        assert db_query(central, "SELECT count(*) FROM chunks")[0][0] > 0


def test_two_workers_decode_the_messages_one_killed_nothing_lost_or_doubled(tmp_path, gateways, consumer):
    """With two workers (--close-workers 2) they decode the messages too (prepared.py: merged
    per sensor into arrays ahead of the writer).  One is killed (SIGKILL) while the consumer
    drains three gateways' backlogs: the writer decodes those messages itself, says so once,
    starts new workers, and the central database ends with every reading once, the accounts
    equal."""
    with NatsServer(tmp_path) as ns:
        gws = backlogs_in_the_stream(gateways, ns, sensors=4, count=800, seed=70, max_datagrams=40)
        central = str(tmp_path / "central.db")
        c = consumer(central, [ns.url], "--batch", "3", "--close-workers", "2", "--head-budget", "0.01")
        workers = freeze_new_workers(c, set(), 2)
        want = sum(len(gw.readings()) for gw in gws)
        assert db_counters(central).get("uplink_readings", 0) < want  # the kill lands before the end
        os.kill(min(workers), signal.SIGKILL)
        os.kill(max(workers), signal.SIGCONT)
        wait_central(central, gws, timeout=60)  # exact: each reading once, accounts equal, nothing rejected
        assert c.stop() == 0
        text = c.text()
        assert "2 worker processes decode messages and close heads into chunks" in text
        assert text.count("a worker process died") == 1, text[-3000:]
        assert " ERROR " not in text and "Traceback" not in text


def test_three_node_cluster_kill_9_the_uplinks_node_while_the_collector_ingests(tmp_path, gateways, consumer):
    """The issue's cluster case with a real gateway (tests/test_uplink_e2e.py has it with a
    scripted writer): sensor-sim (loss, duplication, reordering) feeds the collector throughout;
    the uplink publishes to an R3 stream of a three-node cluster on loopback, and the node it
    talks to is killed with SIGKILL mid-stream.  The uplink moves to another node and its
    position keeps moving (every move is a JetStream ack); centrally every reading once and the
    gateway's accounts."""
    with Cluster(tmp_path) as cluster:
        wait_jetstream_ready(cluster.urls[0], replicas=3)
        gw = gateways("site-3")
        gw.start_sim("--sensors", "4", "--rate", "100", "--duration", "60", "--seed", "3", *FAULTS)
        gw.collector.wait_received(1)
        up = gw.start_uplink(cluster.urls, "--replicas", "3")
        central = str(tmp_path / "central.db")
        consume = consumer(central, list(reversed(cluster.urls)), "--replicas", "3")
        wait_for(lambda: gw.position() > 0, 30, 0.02, what="the first entries acked")
        connected = wait_for(lambda: status(gw.db).get("connected"), 10, 0.05, what="the status file")
        victim = next(n for n in cluster.nodes if n.url == connected)
        victim.kill()  # mid-stream: the simulator is sending, the uplink following the collector
        acked = gw.position()
        wait_for(
            lambda: status(gw.db).get("connected") not in (None, victim.url) and gw.position() >= acked + 3,
            30,
            0.05,
            what="the uplink to publish on through another node",
        )
        gw.stop_sim()
        gw.wait_ingested()
        wait_central(central, [gw], timeout=45)
        totals = faults_happened(gw)
        assert all(v for k, v in totals.items() if k != "restarts"), totals  # the faults really arrived
        assert up.stop() == 0 and consume.stop() == 0
        assert "DATA LOST" not in up.text() and " ERROR " not in up.text()


# ---------------------------------------------------------------- brokers that refuse us


def _garbage_server(stop: threading.Event):
    """A TCP server that is not NATS: it answers anything with an HTTP error and hangs up."""
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


RETRY = re.compile(r"retrying in (\d+\.\d) s")


def refused_while_ingesting(gw: Gateway, servers: list[str], extra: list[str], line: str, seed: int) -> str:
    """The uplink is refused: one WARNING line per attempt, each saying `line` and the wait,
    the waits growing (jittered doubling from 0.1 s up to --backoff-max 0.5), the daemon
    still running; meanwhile the collector beside it stores every datagram sent to it."""
    up = gw.start_uplink(servers, *extra, tag=f"-{seed}")
    wait_for(lambda: line in up.text(), 15, 0.02, what=f"a first attempt saying {line!r}")
    gw.sim("--sensors", "3", "--count", "100", "--rate", "max", "--seed", str(seed), *FAULTS)
    gw.wait_ingested()  # ingest unaffected: every datagram sent is committed, exactly
    wait_for(lambda: len(RETRY.findall(up.text())) >= 4, 15, 0.02, what="four attempts")
    assert up.proc.poll() is None  # still running, still retrying
    cmdline = Path(f"/proc/{up.proc.pid}/cmdline").read_bytes().decode()
    assert up.stop() == 0
    text = up.text() + cmdline
    warnings = [x for x in text.splitlines() if " WARNING " in x]
    assert len(warnings) >= 4 and all(line in x and "retrying in" in x for x in warnings), warnings
    waits = [float(w) for w in RETRY.findall(text)]
    # uniform in [d/2, d] for d = 0.1, 0.2, 0.4, 0.5, 0.5, ...: the third wait is longer than the first
    assert waits[0] <= 0.1 and waits[2] >= 0.2 and max(waits) <= 0.5, waits
    assert "Traceback" not in text and " ERROR " not in text
    assert gw.position() == 0  # nothing was claimed sent
    return text  # the log and the command line (`ps`)


def test_wrong_credentials_wrong_ca_not_nats_and_no_tls_each_one_line_and_ingest_goes_on(tmp_path, gateways):
    import trustme

    gw = gateways("site-1")
    secret = tmp_path / "password"
    secret.write_text("wrong-secret-123\n")
    secret.chmod(0o600)
    with NatsServer(tmp_path, "auth", conf='authorization { user: "site-1", password: "right-secret" }') as ns:
        text = refused_while_ingesting(
            gw,
            [ns.url],
            ["--user", "site-1", "--password-file", str(secret)],
            "the broker refused our credentials (authorization violation)",
            seed=1,
        )
        assert "wrong-secret-123" not in text

    ca, other_ca = trustme.CA(), trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    other_ca.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    tls = f'tls {{ cert_file: "{tmp_path / "server.pem"}", key_file: "{tmp_path / "server.pem"}" }}'
    with NatsServer(tmp_path, "tls", conf=tls) as ns:
        refused_while_ingesting(
            gw,
            [f"tls://127.0.0.1:{ns.port}"],
            ["--ca", str(tmp_path / "other-ca.pem")],
            "TLS: the broker's certificate did not verify",
            seed=2,
        )

    stop = threading.Event()
    port, thread = _garbage_server(stop)
    try:
        refused_while_ingesting(
            gw, [f"nats://127.0.0.1:{port}"], [], "the peer does not speak the NATS protocol", seed=3
        )
    finally:
        stop.set()
        thread.join()

    with NatsServer(tmp_path, "plain") as ns:  # TLS asked for, a plaintext broker: nothing is sent in clear
        refused_while_ingesting(gw, [f"tls://127.0.0.1:{ns.port}"], [], "the broker does not offer TLS", seed=4)


# ---------------------------------------------------------------- NKey and creds (JWT) credentials


def secret_file(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def assert_never_shown(secret: str, *daemons) -> None:
    """Not in any log, command line (`ps`) or environment of these processes (run while they run)."""
    for d in daemons:
        for what in ("cmdline", "environ"):
            assert secret not in Path(f"/proc/{d.proc.pid}/{what}").read_bytes().decode(errors="replace"), what
    for d in daemons:
        d.stop()
        assert secret not in d.text()


def test_nkey_seed_files_deliver_and_the_seed_is_never_shown(tmp_path, gateways, consumer):
    site, central_user, stranger = identity(), identity(), identity()
    users = f'authorization {{ users = [ {{ nkey: "{site.public}" }}, {{ nkey: "{central_user.public}" }} ] }}'
    with NatsServer(tmp_path, "nkeys", conf=users) as ns:
        gw = gateways("site-4")
        gw.sim("--sensors", "2", "--count", "100", "--rate", "max", "--seed", "4", *FAULTS)
        # a seed the broker does not know: refused in one line, ingest unaffected
        wrong = secret_file(tmp_path / "stranger.nk", stranger.seed + "\n")
        text = refused_while_ingesting(
            gw, [ns.url], ["--nkey-seed-file", wrong], "the broker refused our credentials", seed=5
        )
        assert stranger.seed not in text
        seed = secret_file(tmp_path / "site.nk", site.seed + "\n")
        up = gw.start_uplink([ns.url], "--nkey-seed-file", seed)
        central = str(tmp_path / "central.db")
        consume = consumer(central, [ns.url], "--nkey-seed-file", secret_file(tmp_path / "c.nk", central_user.seed))
        wait_central(central, [gw])
        assert_never_shown(site.seed, up)
        assert_never_shown(central_user.seed, consume)
        assert up.proc.returncode == 0 and consume.proc.returncode == 0


def test_a_creds_file_delivers_through_an_operator_and_account_chain(tmp_path, gateways, consumer):
    op = Operator.make()
    with NatsServer(tmp_path, "operator", conf=op.server_conf()) as ns:
        gw = gateways("site-6")
        gw.sim("--sensors", "2", "--count", "100", "--rate", "max", "--seed", "6", *FAULTS)
        # a user signed by an account the operator never signed: refused in one line
        forged, stranger = op.creds("site-6", signer=identity(nkeys.PREFIX_BYTE_ACCOUNT))
        text = refused_while_ingesting(
            gw,
            [ns.url],
            ["--creds-file", secret_file(tmp_path / "forged.creds", forged)],
            "the broker refused our credentials",
            seed=7,
        )
        assert stranger.seed not in text
        creds, user = op.creds("site-6")
        up = gw.start_uplink([ns.url], "--creds-file", secret_file(tmp_path / "site.creds", creds))
        central_creds, central_user = op.creds("central")
        central = str(tmp_path / "central.db")
        consume = consumer(central, [ns.url], "--creds-file", secret_file(tmp_path / "c.creds", central_creds))
        wait_central(central, [gw])
        assert_never_shown(user.seed, up)
        assert_never_shown(central_user.seed, consume)
        assert up.proc.returncode == 0 and consume.proc.returncode == 0


def test_the_collector_keeps_the_log_for_an_uplink_that_never_reached_the_broker(tmp_path, gateways, consumer):
    """A new site whose broker is not reachable yet: the uplink has acked nothing, while the
    collector closes chunks (1024 datagrams a series) and trims its ingest log behind them.
    The log rows the uplink has not sent must stay; when the broker comes, all arrives."""
    ns = NatsServer(tmp_path, port=free_port())
    try:
        gw = gateways("site-8")
        up = gw.start_uplink([ns.url])
        wait_for(lambda: "connection refused" in up.text(), 15, 0.02, what="the uplink to find no broker")
        gw.sim(
            "--sensors", "2", "--count", "1500", "--rate", "2000", "--seed", "8", "--metrics", "temp"
        )  # many flushes
        gw.wait_ingested()
        # A chunk closed per series (trimmable).  The writer thread closes a head beside the
        # loop's flushes, so the second close can commit after the last datagram's flush.
        wait_for(
            lambda: db_query(gw.db, "SELECT count(*) FROM chunks")[0][0] == 2,
            15,
            0.02,
            what=lambda: f"a chunk per series (chunks: {db_query(gw.db, 'SELECT count(*) FROM chunks')[0][0]})",
        )
        ns.start()
        central = str(tmp_path / "central.db")
        consume = consumer(central, [ns.url])
        wait_central(central, [gw])
        assert up.stop() == 0 and consume.stop() == 0
        assert "DATA LOST" not in up.text()
        assert gw.collector.counters().get("uplink_dropped", 0) == 0
    finally:
        ns.stop()


def test_broker_down_longer_than_the_duplicate_window_while_the_collector_ingests(tmp_path, gateways, consumer):
    """The uplink dies inside a round, the broker goes down for more than twice the duplicate
    window (1 s) while the collector keeps ingesting, then comes back: the backlog drains, and
    the round the dead uplink had half published, sent again after the window (so JetStream
    stores it twice), is dropped centrally by key.  Nothing lost, nothing doubled."""
    ns = NatsServer(tmp_path).start()
    try:
        gw = gateways("site-3")
        central = str(tmp_path / "central.db")
        consume = consumer(central, [ns.url], "--duplicate-window", "1")
        gw.start_sim("--sensors", "3", "--rate", "100", "--duration", "60", "--seed", "3", *FAULTS)
        gw.collector.wait_received(1)
        args = ["--duplicate-window", "1", "--max-datagrams", "1"]
        with StreamWatch(ns.url) as stream:
            for _ in range(10):
                if kill_mid_publish(gw, stream, [ns.url], *args):
                    break
            else:
                raise AssertionError("no kill in 10 landed inside a round")
        ns.kill()
        down = time.monotonic()
        received = gw.collector.counters()["received"]
        up = gw.start_uplink([ns.url], *args)
        wait_for(
            lambda: time.monotonic() - down > 2.0 and "connection refused" in up.text(),
            15,
            0.05,
            what="an outage of twice the duplicate window",
        )
        assert gw.collector.counters()["received"] > received  # ingest went on meanwhile
        ns.start()  # same port, same store
        gw.stop_sim()
        gw.wait_ingested()
        wait_central(central, [gw])
        counters = db_counters(central)
        assert counters["uplink_replayed_readings"] > 0  # the re-sent round came after the window
        assert up.stop() == 0 and consume.stop() == 0
        assert "DATA LOST" not in up.text()
    finally:
        ns.stop()


def test_the_disk_budget_drops_unsent_log_entries_loudly_and_exactly(tmp_path, gateways, consumer, bin_path):
    """The broker is away and the collector's disk budget (1 MiB) forces it to drop ingest-log
    entries the uplink has not sent (after the raw chunks: readings lost on the gateway too).
    Both sides count it: the collector in `uplink_dropped` (readings), the uplink with an
    ERROR line and `LOST` in its status.  Every reading the collector stored is either in the
    central database, once, or counted as dropped; nothing else is missing."""
    ns = NatsServer(tmp_path, port=free_port())
    try:
        # A receive buffer that holds a whole burst (as root: SO_RCVBUFFORCE): a collector starved
        # of CPU on a loaded box for a second would otherwise lose datagrams in the kernel.
        gw = gateways("site-2", "--max-disk", "1M", "--rcvbuf", str(64 << 20))
        up = gw.start_uplink([ns.url])
        wait_for(lambda: "connection refused" in up.text(), 15, 0.02, what="the uplink to find no broker")
        for start in ("0", "1750"):  # in two bursts of 20,000 datagrams/s: the budget's work runs meanwhile
            gw.sim(
                "--sensors",
                "20",
                "--count",
                "1750",
                "--rate",
                "1000",
                "--metrics",
                "all",
                "--seed",
                "2",
                "--start-seq",
                start,
            )
            gw.wait_ingested(timeout=60)
        # raw chunks go first, then rollups, then log entries the uplink has not sent
        # The budget deletes raw chunks, then rollups, then log entries: its work grows with the
        # 70,000 datagrams stored, on a loaded box too.
        wait_for(
            lambda: gw.collector.counters()["uplink_dropped"],
            60,
            0.05,
            what=lambda: f"the budget to reach the log (counters {gw.collector.counters()})",
        )
        assert gw.collector.stop() == 0  # the budget's work goes on while idle: a still file from here
        counters = gw.collector.counters()
        assert counters["uplink_dropped"] > 0 and counters["budget_dropped"] > 0, counters
        unsent = log_readings(gw.db, "site-2:")  # what is left for the uplink to send
        assert len(unsent) + counters["uplink_dropped"] == counters["stored_readings"]
        ns.start()
        central = str(tmp_path / "central.db")
        consume = consumer(central, [ns.url])
        wait_central_equals(central, unsent, gw.accounts())
        wait_for(lambda: "DATA LOST to the central side" in up.text(), 10, 0.05, what="the uplink's DATA LOST line")
        lost = [x for x in up.text().splitlines() if "DATA LOST" in x]
        assert len(lost) == 1 and " ERROR " in lost[0], lost
        shown = run([bin_path("telemetry-uplink"), "status", "--db", gw.db])
        assert re.search(r"^LOST\s+\d+ ingest_log entries deleted before they were sent$", shown.stdout, re.M), shown
        # the central side knows too: the gateway's two counters (payload 3 snapshots), and the
        # log rows the gateway said were gone, counted once
        want = {
            "gateway_uplink_dropped:site-2": counters["uplink_dropped"],
            "gateway_budget_dropped:site-2": counters["budget_dropped"],
        }
        wait_for(lambda: {k: db_counters(central).get(k) for k in want} == want, 10, 0.05, what="the gateway counters")
        skipped = int(re.search(r"entries (\d+)-(\d+) were deleted", lost[0]).group(2)) - int(
            re.search(r"entries (\d+)-", lost[0]).group(1)
        )
        assert db_counters(central)["uplink_gone_rows"] == skipped + 1
        assert db_query(central, "SELECT count(*) FROM uplink_ranges") == [(1,)]  # the hole is closed
        assert up.stop() == 0 and consume.stop() == 0
    finally:
        ns.stop()
