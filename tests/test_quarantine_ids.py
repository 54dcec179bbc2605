"""A central database's uplink_quarantine id is never handed out twice (schema version 7).

The consumer's ERROR line and `telemetry-uplink status --central` name a message set aside by
its row id, and the operator deletes the row once the message is published again
(docs/OPERATIONS.md "A write that fails").  With a plain INTEGER PRIMARY KEY, SQLite gave the id
of a deleted newest row to the next message set aside, so an old log line then named another
message.  Real SQLite files under tmp_path, the consumer's own writer (central.Central).
"""

from __future__ import annotations

import sqlite3

from collector import schema
from collector.uplink.central import Central, summary

from helpers import as_plain_primary_key, db_counters, db_query


def set_aside(path: str, n: int, now: float = 1000.0) -> list[int]:
    c = Central(path, 0)
    try:
        return [
            c.quarantine("site-1", "telemetry.site-1.accounts", 10 + i, "IntegrityError: refused", b"\x01", now + i)
            for i in range(n)
        ]
    finally:
        c.close()


def operator_deletes(path: str, *ids: int) -> None:
    """What docs/OPERATIONS.md tells the operator to do once a message is published again."""
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany("DELETE FROM uplink_quarantine WHERE id = ?", [(i,) for i in ids])
    conn.close()


def test_the_id_of_a_deleted_newest_row_is_not_given_to_the_next_message_set_aside(tmp_path):
    path = str(tmp_path / "central.db")
    assert set_aside(path, 2) == [1, 2]
    operator_deletes(path, 2)
    assert set_aside(path, 1) == [3]  # before: 2 again, the id an earlier ERROR line named
    assert db_query(path, "SELECT id, stream_seq FROM uplink_quarantine ORDER BY id") == [(1, 10), (3, 10)]
    assert [row["id"] for row in summary(path)["set_aside"]] == [3, 1]
    assert db_counters(path)["uplink_quarantined"] == 3


def as_version_6(path: str) -> None:
    """Turn a central file this code made into the version 6 it grew from: uplink_quarantine.id a
    plain INTEGER PRIMARY KEY, no sqlite_sequence row for it (the v7 migration's inverse)."""
    as_plain_primary_key(path, "uplink_quarantine", 6)


def test_the_version_7_migration_counts_on_from_every_message_ever_set_aside(tmp_path):
    """A version 6 file whose operator deleted its two newest rows (ids 2 and 3): the highest id
    left is 1, but uplink_quarantined says 3 were handed out, so the next is 4."""
    path = str(tmp_path / "central.db")
    assert set_aside(path, 3) == [1, 2, 3]
    operator_deletes(path, 2, 3)
    as_version_6(path)
    assert db_query(path, "SELECT sql LIKE '%AUTOINCREMENT%' FROM sqlite_master WHERE name = 'uplink_quarantine'") == [
        (0,)
    ]
    assert set_aside(path, 1) == [4]  # opening it migrates
    assert db_query(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(schema.SCHEMA_VERSION),)]
    assert db_query(path, "SELECT id FROM uplink_quarantine ORDER BY id") == [(1,), (4,)]
    assert db_query(path, "PRAGMA integrity_check") == [("ok",)]


def test_a_gateway_database_has_no_quarantine_table_and_migrates_to_version_7(db_path):
    schema.open_writer(db_path).conn.close()
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    conn.close()
    schema.open_writer(db_path).conn.close()
    assert db_query(db_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("7",)]
    assert db_query(db_path, "SELECT count(*) FROM sqlite_master WHERE name = 'uplink_quarantine'") == [(0,)]
