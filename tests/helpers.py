"""Helpers for tests: waiting on conditions with a deadline (never fixed sleeps),
reading a database the way an operator would, and a loopback UDP receiver."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import threading
import time
from contextlib import contextmanager


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01, what="condition"):
    """Poll `predicate` until it returns a truthy value or the deadline passes.

    `what` names what was awaited in the timeout's message; a callable is called
    then, so the message can say how far it got (e.g. lambda: f"... (got {n})")."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without TELEMETRY_* variables (the host's must not leak in), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
    env.update(extra)
    return env


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run a command to completion (30 s at most) in clean_env(**env), capturing its output."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=clean_env(**env))


def db_query(db_path: str, sql: str, *params) -> list[tuple]:
    """Run one read on its own connection (closed again: no lock outlives the call).

    Storage v3 keeps readings in chunks and the ingest log, not one row each:
    a statement that names `readings` runs against a TEMP table holding every
    stored reading (series, ts, boot, seq, value, received), decoded from the
    file with collector.readback, so tests keep checking exact rows in SQL.
    """
    conn = sqlite3.connect(db_path)
    try:
        if "readings" in sql and not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'readings'").fetchone():
            from collector.readback import all_readings

            conn.execute(
                "CREATE TEMP TABLE readings (series INTEGER, ts REAL, boot INTEGER, seq INTEGER,"
                " value REAL, received REAL)"
            )
            conn.executemany("INSERT INTO temp.readings VALUES (?, ?, ?, ?, ?, ?)", all_readings(conn))
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def as_plain_primary_key(path: str, table: str, version: int) -> None:
    """Turn a file this code made back into the `version` it grew from, where `table`'s id was a
    plain INTEGER PRIMARY KEY with no sqlite_sequence row (the inverse of
    schema.declare_autoincrement: version 5 for `chunks`, 6 for `uplink_quarantine`)."""
    conn = sqlite3.connect(path, isolation_level=None)
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    (schema_version,) = conn.execute("PRAGMA schema_version").fetchone()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("PRAGMA writable_schema=ON")
    conn.execute(
        "UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = ?",
        (sql.replace("PRIMARY KEY AUTOINCREMENT,", "PRIMARY KEY,"), table),
    )
    conn.execute(f"PRAGMA schema_version={schema_version + 1}")
    conn.execute("PRAGMA writable_schema=OFF")
    conn.execute("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    conn.execute("COMMIT")
    conn.close()


def db_counters(db_path: str) -> dict:
    return dict(db_query(db_path, "SELECT name, value FROM counters"))


def db_dict(db_path: str, sql: str, *params) -> dict:
    """A two-column read as a dict."""
    return dict(db_query(db_path, sql, *params))


ACCOUNT_COLUMNS = ("datagrams", "readings", "lost", "duplicates", "reordered", "restarts")


def accounts(db_path: str) -> dict[str, dict]:
    """Each sensor's accounts as the collector stored them."""
    rows = db_query(db_path, f"SELECT sensor, {', '.join(ACCOUNT_COLUMNS)} FROM sensors")
    return {r[0]: dict(zip(ACCOUNT_COLUMNS, r[1:])) for r in rows}


def load_fuzz_engine():
    """bench/fuzz_wire.py, the wire fuzz engine, imported as a module."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "fuzz_wire", Path(__file__).resolve().parent.parent / "bench" / "fuzz_wire.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Receiver:
    """A UDP socket on loopback (port 0) drained by a thread: the raw bytes, in arrival order.

    `group` joins an IPv4 multicast group on 127.0.0.1 instead.
    """

    def __init__(self, family: int = socket.AF_INET, host: str = "127.0.0.1", group: str | None = None) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        # Room for a whole test's traffic even if the thread is slow to run.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((group or host, 0))
        if group:
            mreq = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        self.port = self.sock.getsockname()[1]
        self.target = f"[{host}]:{self.port}" if family == socket.AF_INET6 else f"{group or host}:{self.port}"
        self.raw: list[bytes] = []
        self.sock.settimeout(0.02)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="test-receiver")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.raw.append(self.sock.recv(65535))
            except TimeoutError:
                pass

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def datagrams(self):
        from collector.wire import decode

        return [decode(d) for d in list(self.raw)]

    def wait(self, n: int) -> list[bytes]:
        wait_for(lambda: len(self.raw) >= n, 10, what=lambda: f"{n} datagrams (got {len(self.raw)})")
        return list(self.raw)


@contextmanager
def running_collector(db_path: str, *, clock=time.time, **overrides):
    """A Collector serving in a thread on 127.0.0.1 (port 0); yields (collector, notify messages).

    Flushes every 50 ms; `clock` is its wall clock (receive times, the rejection
    log's rate limit); `overrides` are further Settings.  On exit it is shut
    down (final flush included) and closed.
    """
    from collector.server import Collector, Settings

    values = dict(db=db_path, listen=(("127.0.0.1", 0),), flush_interval=0.05, status_interval=3600.0)
    values.update(overrides)
    notes: list[str] = []
    collector = Collector(Settings(**values), notify=notes.append, clock=clock)
    with serving(collector):
        yield collector, notes


def in_loop(collector, func, timeout: float = 10.0):
    """Run `func` in the collector loop's thread, at the end of one of its turns, and
    return its result.  Counters read from another thread can be caught in the
    middle of a burst (`received` is counted before the burst's datagrams are
    judged); read here, they are as the loop left them.  The store is the writer
    thread's while `collector.writing`."""
    done = threading.Event()
    result: list = []

    def call():
        try:
            result.append(func())
        finally:
            done.set()

    collector.call_soon(call)
    wait_for(done.is_set, timeout, what=f"the collector loop to run {getattr(func, '__name__', func)}")
    if not result:
        raise AssertionError(f"{func!r} raised in the collector loop (its traceback is in the log)")
    return result[0]


@contextmanager
def serving(collector):
    """Run a constructed Collector's loop in a thread (e.g. once its sockets hold
    datagrams); on exit it is shut down (final flush included) and closed."""
    thread = threading.Thread(target=collector.serve_forever, name="collector")
    thread.start()
    try:
        yield collector
    finally:
        collector.shutdown()
        thread.join(10)
        collector.server_close()
