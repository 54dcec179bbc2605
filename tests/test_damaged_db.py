"""A damaged database at --db (issue 13 item 7): refused with the integrity-check
and restore advice, never "is the directory writable"; damaged rows inside an
otherwise good database never become a traceback.  Both daemons run for real."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from collector import schema
from collector.errors import SetupError
from collector.store import open_ingest
from query.ops import Ops
from query.protocol import parse_request

from helpers import db_query

ADVICE = "PRAGMA integrity_check\"'; restore a backup or move the file aside to start a new one)"


def _good_db(path: str, rows: int = 3000) -> bytes:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(rows)])
    conn.commit()
    conn.close()
    with open(path, "rb") as f:
        return f.read()


def _damaged(tmp_path, kind: str) -> str:
    path = str(tmp_path / f"{kind}.db")
    if kind == "garbage":
        with open(path, "wb") as f:
            f.write(bytes(range(256)) * 32)
    elif kind == "truncated":
        data = _good_db(str(tmp_path / "whole.db"))
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    elif kind == "header-only":
        with open(path, "wb") as f:
            f.write(b"SQLite format 3\x00" + b"\xff" * 200)
    return path


@pytest.mark.parametrize(
    "kind, cause",
    [
        ("garbage", "file is not a database"),
        ("truncated", "database disk image is malformed"),
        ("header-only", "file is not a database"),
    ],
)
def test_both_daemons_refuse_a_damaged_file_with_integrity_advice(tmp_path, bin_path, kind, cause):
    path = _damaged(tmp_path, kind)
    before = Path(path).read_bytes()
    collector = subprocess.run(
        [bin_path("telemetry-collector"), "--db", path, "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert collector.returncode == 2, collector.stderr
    assert collector.stderr == (
        f"Error: cannot open database {path}: {cause} (check it with 'sqlite3 {path} \"{ADVICE}\n"
    )
    with pytest.raises(SetupError) as info:
        schema.open_reader(path)  # what telemetry-query serve opens
    assert str(info.value).endswith(ADVICE) and "has the collector created it" not in str(info.value)
    assert Path(path).read_bytes() == before  # refused, not "repaired"


def test_a_fifo_at_the_database_path_is_refused_without_hanging(tmp_path, bin_path):
    path = str(tmp_path / "fifo.db")
    os.mkfifo(path)
    proc = subprocess.run(
        [bin_path("telemetry-collector"), "--db", path, "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr == f"Error: cannot open database {path}: not a regular file (give --db the path of "
        "a database file, or of one to create)\n"
    )


def test_a_non_numeric_counter_is_a_log_line_not_a_traceback(db_path, caplog):
    store, core = open_ingest(db_path)
    core.counters["received"] = 5
    assert store.flush(core, 1.0)
    store.close()
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE counters SET value = 'lots' WHERE name = 'received'")
    conn.execute("UPDATE counters SET value = 'soon' WHERE name = 'last_flush'")
    conn.commit()
    conn.close()
    # The query server answers stats with the damaged counter as null and a note, not a traceback.
    ops = Ops(schema.open_reader(db_path))
    try:
        stats = ops.run(parse_request(b'{"op": "stats"}'))
        assert stats["received"] is None and stats["stored"] == 0
        assert ops.meta["notes"] == [
            "counter 'received' in the database holds 'lots', not a number (shown as "
            "null; check the database with 'PRAGMA integrity_check'; the collector "
            "rewrites the row at its next flush)"
        ]
    finally:
        ops.close()
    store, core = open_ingest(db_path)
    try:
        assert core.counters["received"] == 0 and core.counters["last_flush"] == 0
        assert "counter 'received' in" in caplog.text and "holds 'lots', not a number" in caplog.text
        core.counters["received"] += 2
        assert store.flush(core, 2.0)
    finally:
        store.close()
    assert db_query(db_path, "SELECT value FROM counters WHERE name = 'received'") == [(2.0,)]


def test_a_non_numeric_schema_version_is_damage_not_a_traceback(db_path, bin_path):
    schema.open_writer(db_path).conn.close()
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE meta SET value = 'two' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    proc = subprocess.run(
        [bin_path("telemetry-collector"), "--db", db_path, "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"Error: database {db_path}: schema_version 'two' in table meta is not a number")
    with pytest.raises(SetupError, match="schema_version 'two' in table meta is not a number"):
        schema.open_reader(db_path)
