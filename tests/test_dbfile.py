"""The file at --db changes under a running collector (issue 13 item 1): deleted,
moved, replaced, or its directory gone.  Nothing accepted may vanish without a
word, and the last line and exit code never claim what is false.  The pure
verdict is tested exhaustively; the rest with the real collector process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3

import pytest

from collector import dbfile, wire

from helpers import db_query, wait_for
from processes import CollectorProcess

# --- the verdict, pure -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "opened, found, error, verdict",
    [
        ((1, 10, 1), (1, 10), None, dbfile.OK),
        ((1, 10, 2), (1, 10), None, dbfile.OK),  # a hard link elsewhere changes nothing
        ((1, 10, 0), None, None, dbfile.GONE),  # deleted
        ((1, 10, 1), None, None, dbfile.GONE),  # moved away (still linked elsewhere)
        ((1, 10, 0), (1, 10), None, dbfile.GONE),  # no link left (a racing stat)
        ((1, 10, 1), (1, 11), None, dbfile.REPLACED),  # another inode
        ((1, 10, 1), (2, 10), None, dbfile.REPLACED),  # same inode number on another device
        ((1, 10, 0), (1, 11), None, dbfile.REPLACED),  # deleted, then a new file made there
        ((1, 10, 1), None, "Input/output error", dbfile.UNREACHABLE),
    ],
)
def test_classify(opened, found, error, verdict):
    assert dbfile.classify(opened, found, error).verdict == verdict


def test_check_on_real_files(tmp_path):
    path = tmp_path / "t.db"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert dbfile.check(str(path), fd).verdict == dbfile.OK
        os.rename(path, tmp_path / "moved.db")
        assert dbfile.check(str(path), fd).verdict == dbfile.GONE
        path.write_bytes(b"y")
        assert dbfile.check(str(path), fd).verdict == dbfile.REPLACED
        path.unlink()
        path.mkdir()
        assert dbfile.check(str(path), fd).verdict == dbfile.REPLACED
        path.rmdir()
        (tmp_path / "moved.db").unlink()
        assert dbfile.check(str(path), fd) == dbfile.FileCheck(dbfile.GONE, "deleted or moved away while in use")
    finally:
        os.close(fd)


# --- the real collector ----------------------------------------------------------------------


class Sensor:
    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.port = port
        self.seq = 0

    def send(self, n: int) -> None:
        for _ in range(n):
            self.sock.sendto(wire.encode("s1", self.seq, {"t": float(self.seq)}, boot=1), ("127.0.0.1", self.port))
            self.seq += 1

    def close(self) -> None:
        self.sock.close()


def _values(db: str) -> list[float]:
    return [v for (v,) in db_query(db, "SELECT value FROM readings ORDER BY seq")]


def _stored(db: str) -> int:
    try:
        return int(dict(db_query(db, "SELECT name, value FROM counters")).get("stored", 0))
    except sqlite3.Error:
        return -1


@pytest.fixture
def run(bin_path, tmp_path):
    started = []

    def start(db: str) -> tuple[CollectorProcess, Sensor]:
        c = CollectorProcess(bin_path("telemetry-collector"), db, tmp_path / f"c{len(started)}.log")
        started.append(c)
        return c, Sensor(c.port())

    yield start
    for c in started:
        if c.proc.poll() is None:
            c.kill()


@pytest.mark.parametrize("also", [(), ("-wal", "-shm")], ids=["main-file-only", "with-wal-and-shm"])
def test_a_deleted_database_is_put_back_with_everything(run, tmp_path, also):
    db = str(tmp_path / "telemetry.db")
    c, sensor = run(db)
    sensor.send(100)
    wait_for(lambda: _stored(db) == 100, 15, what="100 stored")
    for suffix in ("",) + also:
        os.unlink(db + suffix)
    sensor.send(50)  # flushed into the unlinked file first, then the whole database is copied back
    wait_for(lambda: "put back there from the open file" in c.log.read_text(), 15, what="the restore line")
    sensor.send(50)  # and written on there
    wait_for(lambda: _stored(db) == 200, 15, what="200 stored at the path")
    assert c.stop(signal.SIGTERM) == 0
    log = c.log.read_text()
    assert f"ERROR database {db} was deleted or moved away while in use: put back there" in log
    assert log.rstrip().endswith("stopped cleanly; every accepted datagram is stored")  # true now
    assert _values(db) == [float(i) for i in range(200)]
    assert db_query(db, "SELECT datagrams, lost, duplicates FROM sensors") == [(200, 0, 0)]
    assert db_query(db, "PRAGMA integrity_check") == [("ok",)]
    assert sorted(os.listdir(tmp_path)) == sorted(["telemetry.db", "c0.log"])  # no temporary left
    sensor.close()


def test_a_moved_database_is_put_back_and_the_moved_one_is_left_alone(run, tmp_path):
    db = str(tmp_path / "telemetry.db")
    c, sensor = run(db)
    sensor.send(30)
    wait_for(lambda: _stored(db) == 30, 15, what="30 stored")
    os.rename(db, tmp_path / "archive.db")
    wait_for(lambda: "put back there" in c.log.read_text(), 15, what="the restore line")
    sensor.send(30)
    wait_for(lambda: _stored(db) == 60, 15, what="60 stored at the path")
    assert c.stop() == 0
    assert _values(db) == [float(i) for i in range(60)]
    sensor.close()


def test_a_replaced_database_is_saved_aside_and_the_collector_stops_with_exit_1(run, tmp_path):
    db = str(tmp_path / "telemetry.db")
    c, sensor = run(db)
    sensor.send(40)
    wait_for(lambda: _stored(db) == 40, 15, what="40 stored")
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE mine (x)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    os.replace(other, db)
    assert c.proc.wait(15) == 1  # stops by itself
    c.stop()
    log = c.log.read_text()
    (saved,) = [n for n in os.listdir(tmp_path) if n.startswith("telemetry.db.saved-")]
    assert (
        f"ERROR database {db} was replaced by another file while in use; this collector's database "
        f"(40 readings) is saved as {tmp_path / saved}: restart to use the new file" in log
    )
    assert "stopped cleanly" not in log and "every accepted datagram is stored" not in log
    assert _values(str(tmp_path / saved)) == [float(i) for i in range(40)]
    assert open(db, "rb").read() == before  # the operator's file is untouched
    sensor.close()


def test_a_vanished_directory_is_retried_and_never_claimed_stored(run, tmp_path):
    # A removable disk pulled: the directory goes with the file.  The collector
    # keeps writing into the open file, retries, and when the directory is back
    # puts everything there; if it is not back at exit, the exit code is 1.
    disk = tmp_path / "usb"
    disk.mkdir()
    db = str(disk / "telemetry.db")
    c, sensor = run(db)
    sensor.send(20)
    wait_for(lambda: _stored(db) == 20, 15, what="20 stored")
    shutil.rmtree(disk)
    sensor.send(20)
    wait_for(lambda: "cannot be put back" in c.log.read_text(), 15, what="the error line")
    disk.mkdir()  # plugged back in
    wait_for(lambda: "put back there" in c.log.read_text(), 30, what="the restore line")
    wait_for(lambda: _stored(db) == 40, 15, what="40 stored at the path")
    shutil.rmtree(disk)  # pulled again, for good
    sensor.send(5)
    wait_for(lambda: c.log.read_text().count("cannot be put back") == 2, 15, what="the second error line")
    assert c.stop() == 1
    log = c.log.read_text()
    assert "every accepted datagram is stored" not in log
    assert (
        log.rstrip()
        .splitlines()[-1]
        .endswith(
            f"ERROR exiting: database {db} was deleted or moved away while in use, and cannot be put back "
            f"(unable to open database file): the 45 readings in the open file are lost with it"
        )
    )
    sensor.close()
