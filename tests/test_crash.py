"""Power cuts: kill -9 the collector again and again while it ingests.

After every kill the database must pass PRAGMA integrity_check, and at the end
every seq a sensor sent between its first and last stored one is either stored
or counted lost, never both, never neither, and nothing is a false duplicate:
the accounts agree with the readings because the tracker's state is written in
the same transaction as the readings it describes.
"""

from __future__ import annotations

import signal
import subprocess

from helpers import accounts, wait_for
from helpers import db_query as query
from processes import CollectorProcess

KILLS = 4
SENSORS = 10


def seqs_by_sensor(db: str, sql: str) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for sensor, seq in query(db, sql):
        out.setdefault(sensor, set()).add(seq)
    return out


def test_repeated_kill_9_keeps_the_database_consistent_and_the_accounts_exact(bin_path, db_path, tmp_path):
    exe = bin_path("telemetry-collector")
    collector = CollectorProcess(exe, db_path, tmp_path / "c0.log", "--listen", "127.0.0.1:0")
    port = collector.port()
    # ~3,000 datagrams/s for at most 20 s: long enough to be killed mid-stream KILLS times even when
    # each collector start takes seconds (a loaded CI box: importing alone measured 2.6 s).
    sender = subprocess.Popen(
        [
            bin_path("sensor-sim"),
            "--target",
            f"127.0.0.1:{port}",
            "--sensors",
            str(SENSORS),
            "--count",
            "6000",
            "--rate",
            "300",
            "--boot-value",
            "9",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Each collector, the last one too, stores part of the stream; then the simulator stops
        # (Ctrl-C: exit 130) rather than running out its 20 s: the rest would add nothing checked.
        for i in range(KILLS + 1):
            stored_before = collector.counters().get("stored", 0)
            wait_for(
                lambda: collector.counters().get("stored", 0) > stored_before, 10, what=f"progress before kill {i + 1}"
            )
            assert sender.poll() is None, "the simulator finished early: the kills were not mid-stream"
            if i == KILLS:
                break
            collector.kill()
            assert query(db_path, "PRAGMA integrity_check") == [("ok",)]
            collector = CollectorProcess(exe, db_path, tmp_path / f"c{i + 1}.log", "--listen", f"127.0.0.1:{port}")
        sender.send_signal(signal.SIGINT)
        assert sender.wait(60) == 130
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    # Everything the last collector received is flushed by a clean stop.
    assert collector.stop() == 0
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]

    stored = seqs_by_sensor(db_path, "SELECT DISTINCT s.sensor, r.seq FROM readings r JOIN series s ON s.id = r.series")
    missing: dict[str, set[int]] = {}
    for sensor, first, last in query(db_path, "SELECT sensor, first_seq, last_seq FROM gaps"):
        missing.setdefault(sensor, set()).update(range(first, last + 1))
    got = accounts(db_path)
    assert len(got) == SENSORS
    total_lost = 0
    for sensor, acct in got.items():
        seqs, gaps = stored[sensor], missing.get(sensor, set())
        assert not seqs & gaps, f"{sensor}: a seq both stored and counted lost"
        assert seqs | gaps == set(range(min(seqs), max(seqs) + 1)), f"{sensor}: a seq neither stored nor lost"
        assert (acct["datagrams"], acct["lost"], acct["duplicates"], acct["restarts"]) == (len(seqs), len(gaps), 0, 0)
        total_lost += len(gaps)
    # The kills really cost something, and it was all accounted for above.
    assert total_lost > 0


def test_kill_9_while_the_writer_thread_waits_to_commit_loses_only_that_batch(bin_path, db_path, tmp_path):
    """The flush in the collector's writer thread waits for a write lock another
    connection holds while the loop reads on; kill -9 then.  The database keeps what
    was committed before, state and data together; the next collector counts the
    datagrams that died with the process as lost (a real gap, seen when the sensors
    go on), nothing both stored and lost, nothing neither."""
    import socket
    import sqlite3

    from collector import wire

    def send(port: int, seqs: range) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for seq in seqs:
                for k in range(3):
                    s.sendto(
                        wire.encode(f"w{k}", seq, {"t": seq / 4}, boot=5, ts=1_700_000_000 + seq), ("127.0.0.1", port)
                    )

    exe = bin_path("telemetry-collector")
    collector = CollectorProcess(exe, db_path, tmp_path / "c0.log")
    port = collector.port()
    send(port, range(10))
    wait_for(lambda: collector.counters().get("stored", 0) == 30, 15, what="30 stored")
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        send(port, range(10, 20))
        # A flush of them was tried, and refused (the log says so once per episode).
        wait_for(lambda: "cannot write to" in collector.text(), 15, what="a flush refused while the lock is held")
        collector.kill()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]
    assert {s: (a["datagrams"], a["lost"]) for s, a in accounts(db_path).items()} == {
        f"w{k}": (10, 0) for k in range(3)
    }
    assert collector.counters()["stored"] == 30
    collector = CollectorProcess(exe, db_path, tmp_path / "c1.log", "--listen", f"127.0.0.1:{port}")
    send(port, range(20, 30))
    wait_for(lambda: collector.counters().get("stored", 0) == 60, 15, what="60 stored")
    assert collector.stop() == 0
    stored = seqs_by_sensor(db_path, "SELECT DISTINCT s.sensor, r.seq FROM readings r JOIN series s ON s.id = r.series")
    for sensor, acct in accounts(db_path).items():
        assert stored[sensor] == set(range(10)) | set(range(20, 30))
        assert query(db_path, "SELECT first_seq, last_seq FROM gaps WHERE sensor = ?", sensor) == [(10, 19)]
        assert (acct["datagrams"], acct["lost"], acct["duplicates"]) == (20, 10, 0)
