"""The database's filesystem goes read-only, or disappears, under a running
collector (issue 13 item 1, second half): a real collector process, a real
ext4 filesystem, in a mount namespace the test makes for itself.

The filesystem is an ext4 image on a loop device mounted with
`errors=remount-ro`, the usual setting for an SD card or USB stick, inside a
private mount namespace (`unshare -m`) that a holder process keeps alive; the
collector runs in it (`nsenter`), and the test reads the files through
/proc/HOLDER/root.  "Goes read-only" is the kernel's own emergency remount
(`/sys/fs/ext4/DEV/trigger_fs_error`): a plain `mount -o remount,ro` is
refused while the database is open for writing.  "Disappears" is a lazy
unmount.  Needs root, util-linux and e2fsprogs: without them the tests fail
saying so, never skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from collector import wire

from helpers import db_query, wait_for
from processes import CollectorProcess

TOOLS = ("unshare", "nsenter", "mkfs.ext4", "mount", "umount", "findmnt")


class Namespace:
    """A private mount namespace holding an ext4 image mounted at `mnt`."""

    def __init__(self, tmp_path: Path) -> None:
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if os.geteuid() != 0 or missing:
            pytest.fail(
                "this test mounts a filesystem in its own mount namespace: it needs root "
                f"(euid {os.geteuid()}) and {', '.join(TOOLS)} (util-linux, e2fsprogs); missing: {missing or 'none'}"
            )
        self.image = tmp_path / "usb.img"
        self.mnt = tmp_path / "usb"
        self.mnt.mkdir()
        with open(self.image, "wb") as f:
            f.truncate(32 * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.image)], check=True, capture_output=True, timeout=60)
        script = f'mount -o loop,errors=remount-ro "{self.image}" "{self.mnt}" && echo mounted && exec sleep 600'
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.holder.stdout.readline()  # the shell exits if the mount fails: bounded
        if line.strip() != "mounted":
            self.holder.wait(10)
            pytest.fail(f"cannot mount an ext4 image in a new mount namespace: {self.holder.stderr.read().strip()}")
        self.prefix = ("nsenter", "-t", str(self.holder.pid), "-m", "--")
        self.device = self.run("findmnt", "-n", "-o", "SOURCE", str(self.mnt)).strip()

    def run(self, *cmd: str) -> str:
        return subprocess.run([*self.prefix, *cmd], check=True, capture_output=True, text=True, timeout=30).stdout

    def outside(self, path: str) -> str:
        """The path as this process reaches it: through the holder's root (for plain
        file reads; SQLite resolves the /proc link itself and would miss the mount)."""
        return f"/proc/{self.holder.pid}/root{path}"

    def query(self, db: str, sql: str) -> list[list]:
        """helpers.db_query run inside the namespace."""
        code = "import json, sys; sys.path.insert(0, sys.argv[1]); from helpers import db_query; "
        code += "print(json.dumps(db_query(sys.argv[2], sys.argv[3])))"
        return json.loads(self.run(sys.executable, "-c", code, str(Path(__file__).parent), db, sql))

    def counters(self, db: str) -> dict:
        try:
            return dict(self.query(db, "SELECT name, value FROM counters"))
        except subprocess.CalledProcessError:
            return {}

    def go_read_only(self) -> None:
        """What ext4 does on an I/O error with errors=remount-ro."""
        Path(f"/sys/fs/ext4/{os.path.basename(self.device)}/trigger_fs_error").write_text("test\n")
        wait_for(
            lambda: "emergency_ro" in self.run("findmnt", "-n", "-o", "OPTIONS", str(self.mnt)),
            10,
            what="the emergency read-only remount",
        )

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()  # the namespace goes with it: the image is unmounted, the loop device freed
        self.holder.wait(15)
        self.holder.stdout.close()
        self.holder.stderr.close()


@pytest.fixture
def ns(tmp_path):
    n = Namespace(tmp_path)
    yield n
    n.close()


class Sensor:
    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.port = port
        self.seq = 0

    def send(self, n: int) -> None:
        for _ in range(n):
            readings = {"t": float(self.seq), "h": 50.0}  # 2 readings a datagram
            self.sock.sendto(wire.encode("s1", self.seq, readings, boot=1), ("127.0.0.1", self.port))
            self.seq += 1


def _counters(db: str) -> dict:
    return dict(db_query(db, "SELECT name, value FROM counters"))


def _copy_out(ns: Namespace, db: str, dest: Path) -> str:
    """The database as it is on the (read-only) disk, copied out with its WAL to read it normally."""
    dest.mkdir()
    for suffix in ("", "-wal"):
        src = Path(ns.outside(db + suffix))
        if src.exists():
            shutil.copyfile(src, dest / ("telemetry.db" + suffix))
    return str(dest / "telemetry.db")


def test_a_filesystem_that_goes_read_only_keeps_the_backlog_and_the_exit_says_what_is_unsaved(ns, bin_path, tmp_path):
    db = str(ns.mnt / "telemetry.db")
    log = tmp_path / "collector.log"
    c = CollectorProcess(bin_path("telemetry-collector"), db, log, "--status-interval", "0.2", prefix=ns.prefix)
    sensor = Sensor(c.port())
    try:
        sensor.send(100)
        wait_for(lambda: ns.counters(db).get("stored") == 100, 20, 0.2, what="100 stored on the disk")
        ns.go_read_only()
        sensor.send(30)
        wait_for(lambda: f"ERROR cannot write to {db}:" in log.read_text(), 15, what="the error line")
        sensor.send(20)
        # It keeps receiving and holds what it cannot write (backlog, in readings), retrying.
        status = re.compile(r"status: received 150 .* stored 100 .* lost 0 .* storage_dropped 0 backlog 100 sensors 1")
        wait_for(lambda: status.search(log.read_text()), 15, what="a status line: received 150, backlog 100")
        assert c.proc.poll() is None
        assert c.stop(signal.SIGTERM) == 1
    finally:
        if c.proc.poll() is None:
            c.kill()
        sensor.sock.close()
    text = log.read_text()
    assert text.count(f"ERROR cannot write to {db}:") == 1  # once for the episode, not per retry
    assert "its filesystem is read-only now" in text
    assert "every accepted datagram is stored" not in text
    last = text.rstrip().splitlines()[-1]
    assert last.endswith(
        f"ERROR exiting with 100 readings of 50 datagrams not written to {db} (database refused the final "
        "flush); the sequence accounts of 1 sensor since the last good flush are not written either"
    ), last
    # What the disk holds is exactly the last good flush: nothing half-written.
    copy = _copy_out(ns, db, tmp_path / "copy")
    assert _counters(copy)["stored"] == 100
    assert db_query(copy, "SELECT count(*), min(seq), max(seq) FROM readings") == [(200, 0, 99)]
    assert db_query(copy, "SELECT datagrams, lost FROM sensors") == [(100, 0)]


def test_a_filesystem_that_disappears_is_put_back_from_the_open_file(ns, bin_path, tmp_path):
    # The disk is unmounted under it (a stick pulled, a lazy umount): the path
    # is the empty mount point again.  The collector notices the file is gone,
    # copies the database it holds open back to the path, and writes on there.
    db = str(ns.mnt / "telemetry.db")
    log = tmp_path / "collector.log"
    c = CollectorProcess(bin_path("telemetry-collector"), db, log, prefix=ns.prefix)
    sensor = Sensor(c.port())
    try:
        sensor.send(100)
        wait_for(lambda: ns.counters(db).get("stored") == 100, 20, 0.2, what="100 stored on the disk")
        ns.run("umount", "-l", str(ns.mnt))
        sensor.send(50)
        wait_for(lambda: "put back there from the open file" in log.read_text(), 15, what="the put-back line")
        sensor.send(50)
        wait_for(lambda: ns.counters(db).get("stored") == 200, 20, 0.2, what="200 stored at the path")
        assert c.stop(signal.SIGTERM) == 0
    finally:
        if c.proc.poll() is None:
            c.kill()
        sensor.sock.close()
    text = log.read_text()
    assert f"ERROR database {db} was deleted or moved away while in use: put back there" in text
    assert text.rstrip().splitlines()[-1].endswith("stopped cleanly; every accepted datagram is stored")
    assert ns.query(db, "SELECT count(*), min(seq), max(seq) FROM readings") == [[400, 0, 199]]
    assert ns.query(db, "SELECT datagrams, lost FROM sensors") == [[200, 0]]
