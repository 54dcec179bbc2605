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

import signal
import socket
import subprocess
import threading

import pytest
from natsserver import NatsServer
from uplinkfleet import Gateway, StreamWatch, clean_env, consume_args, uplink, wait_central

from helpers import wait_for

FAULTS = ["--loss", "0.05", "--duplicate", "0.05", "--reorder", "0.1"]


@pytest.fixture
def gateways(bin_path, tmp_path):
    """Make real gateways; every process of theirs is killed at the end of the test."""
    made: list[Gateway] = []

    def make(name: str) -> Gateway:
        gw = Gateway(bin_path, tmp_path, name)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


@pytest.fixture
def consumer(bin_path, tmp_path):
    """Start `telemetry-uplink consume` (killed at the end of the test if still running)."""
    started = []

    def make(central: str, servers: list[str], *extra: str):
        d = uplink(bin_path, tmp_path / f"consume{len(started)}.log", *consume_args(central, servers, *extra))
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc.poll() is None:
            d.kill()


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
        cmd, report = gw.sim_cmd("--sensors", "4", "--rate", "100", "--duration", "60", "--seed", "9", *FAULTS)
        sim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env())
        try:
            gw.collector.wait_received(1)
            # one datagram a message: a round is hundreds of publishes, so a kill lands inside one
            kills = attempts = 0
            while kills < 5:
                attempts += 1
                assert attempts <= 15, f"only {kills} of {attempts - 1} kills landed inside a round"
                start, held = gw.position(), stream.messages()
                up = gw.start_uplink([ns.url], "--max-datagrams", "1")
                wait_for(
                    lambda: stream.messages() > held or up.proc.poll() is not None,
                    15,
                    0.002,
                    what="the uplink's first publishes",
                )
                assert up.stop(signal.SIGKILL) == -signal.SIGKILL
                if gw.position() == start and stream.messages() > held:
                    kills += 1  # died with published messages its position does not cover
        finally:
            sim.send_signal(signal.SIGINT)
            _, err = sim.communicate(timeout=30)
        assert sim.returncode == 130, err
        gw.reported(report)
        gw.wait_ingested()
        up = gw.start_uplink([ns.url], "--max-datagrams", "1")
        wait_central(central, [gw])
        totals = faults_happened(gw)
        assert all(v for k, v in totals.items() if k != "restarts"), totals  # the faults really arrived
        assert up.stop() == 0 and consume.stop() == 0
        assert "DATA LOST" not in up.text()
