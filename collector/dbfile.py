"""Is the file at --db still the one we write?  And what to do when it is not.

A SQLite connection writes to the inode it opened.  Delete, move or replace
the file while the collector runs and it would go on "flushing" into an inode
no path names, then say at exit that everything is stored (issue 13 item 1).
So at every flush the collector compares `os.stat(path)` with the `fstat` of
the descriptor it holds (device and inode, and the link count), and says
which of these it is:

* ``gone``: nothing at the path (deleted, or moved away; also a removable
  disk unmounted under us, whose mount point is now empty), or our inode has
  no link left.  The collector still holds the whole database open, so it
  copies it back to the path (SQLite's online backup through our own
  connection, into a temporary file renamed into place) and writes on there:
  nothing is lost, not even what was flushed before the deletion.  Until the
  copy succeeds (the directory is gone too, the disk is read-only), nothing
  more is written to the lost inode; readings wait in memory, bounded like
  any backlog, and the exit code says what was not kept.
* ``replaced``: another file is at the path (a restored backup, another
  program's file).  Ours is saved beside it as ``PATH.saved-<unix time>`` and
  the collector stops with exit code 1: mixing two databases' accounts would
  be worse, and the operator decides which to keep.
* ``unreachable``: the path cannot be examined (EIO on a failing disk,
  EACCES): like ``gone`` without the copy, until it can be examined again.

`classify` is the decision, pure; `check`, `copy_beside` and `save_aside`
are the file edge (Store.restore_at_path swaps the connection).
"""

from __future__ import annotations

import os
import sqlite3
import stat as stat_module
from dataclasses import dataclass

OK = "ok"
GONE = "gone"
REPLACED = "replaced"
UNREACHABLE = "unreachable"


class Stranded(Exception):
    """The database was copied to `copy`, but could not be put at the path and
    reopened: the collector cannot go on writing; the copy holds everything."""

    def __init__(self, copy: str, cause: BaseException) -> None:
        super().__init__(copy, cause)
        self.copy = copy
        self.cause = cause


@dataclass(frozen=True)
class FileCheck:
    verdict: str  # OK, GONE, REPLACED or UNREACHABLE
    detail: str = ""


def classify(opened: tuple[int, int, int], found: tuple[int, int] | None, error: str | None) -> FileCheck:
    """The verdict from our descriptor's (st_dev, st_ino, st_nlink), the path's
    (st_dev, st_ino) or None when nothing is there, and the error of a stat
    that failed otherwise."""
    if error is not None:
        return FileCheck(UNREACHABLE, f"cannot examine it: {error}")
    if found is None:
        return FileCheck(GONE, "deleted or moved away while in use")
    if found != opened[:2]:
        return FileCheck(REPLACED, "replaced by another file while in use")
    if opened[2] == 0:
        return FileCheck(GONE, "deleted while in use")
    return FileCheck(OK)


def check(path: str, fd: int) -> FileCheck:
    """Compare the file at `path` with the open descriptor `fd` (two system calls)."""
    try:
        mine = os.fstat(fd)
    except OSError as exc:
        return FileCheck(UNREACHABLE, f"cannot examine the open file: {exc.strerror}")
    try:
        there = os.stat(path)
    except FileNotFoundError:
        found, error = None, None
    except NotADirectoryError:  # a directory on the way replaced by a file
        found, error = None, None
    except OSError as exc:
        found, error = None, exc.strerror or str(exc)
    else:
        found, error = (there.st_dev, there.st_ino), None
        if not stat_module.S_ISREG(there.st_mode):
            found = (-1, -1)  # a directory or FIFO in its place: replaced
    return classify((mine.st_dev, mine.st_ino, mine.st_nlink), found, error)


def copy_beside(conn: sqlite3.Connection, dest: str) -> str:
    """SQLite's online backup of `conn` (WAL content included) into a temporary
    file beside `dest`, fsynced; returns its name.  The caller renames it into
    place once its own connection is closed: the old connection's `-wal` and
    `-shm` are named after the path too, and must be gone (closing
    checkpoints and removes them) before a new file is opened there.  Raises
    OSError or sqlite3.Error with nothing changed but a removed temporary."""
    tmp = f"{dest}.restoring-{os.getpid()}"
    _remove(tmp)
    try:
        target = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file to rename
        finally:
            target.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(name: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(name + suffix)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # the directory is gone or read-only: nothing of ours is there


def save_aside(conn: sqlite3.Connection, path: str, now: float) -> str:
    """Save the database we hold beside `path` (someone else's file is there); returns the name."""
    dest = f"{path}.saved-{int(now)}"
    n = 1
    while os.path.exists(dest):
        dest = f"{path}.saved-{int(now)}-{n}"
        n += 1
    tmp = copy_beside(conn, dest)
    os.replace(tmp, dest)
    return dest
