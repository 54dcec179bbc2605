"""A chunk id is never handed out twice, even after retention deleted every chunk.

Things remember chunk ids beyond the row: a query server's open-head cache
(the newest chunk id it has read) and its cache of decoded chunks, the
corrupt-chunk records (`chunk_faults`) and the minute blocks (`chunk`, which
outlive the chunk).  Real SQLite files under tmp_path.
"""

from __future__ import annotations

import json
import sqlite3

from collector import schema, wire
from collector.store import open_ingest
from query.ops import Ops
from query.protocol import parse_request

from helpers import as_plain_primary_key

T0 = 1_700_000_000.0
DAY = 86400.0


def fill(store, core, seqs, t0: float) -> None:
    for i, seq in enumerate(seqs):
        core.receive(wire.encode("s", seq, {"v": float(seq)}, boot=1, ts=t0 + i), t0 + i)
    assert store.flush(core, t0 + len(seqs))


def seqs_of(ops: Ops) -> list[int]:
    result = ops.run(parse_request(json.dumps({"op": "readings", "sensor": "s", "metric": "v"}).encode()))
    return [r["seq"] for r in result["rows"]]


def test_after_retention_deleted_every_chunk_new_chunks_get_new_ids_and_a_running_reader_sees_them(db_path):
    store, core = open_ingest(db_path, store_options={"chunk_datagrams": 4, "retain": DAY})
    ops = None
    try:
        fill(store, core, range(8), T0)
        ops = Ops(schema.open_reader(db_path))  # a query server that stays up
        assert seqs_of(ops) == list(range(8))
        conn = sqlite3.connect(db_path)
        assert conn.execute("SELECT id FROM chunks").fetchall() == [(1,)]
        assert store.flush(core, T0 + 5 * DAY)  # trims the log rows: every chunk may go
        assert store.maintain(core.counters, T0 + 5 * DAY)
        assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,)
        assert core.counters["retention_dropped"] == 8
        assert seqs_of(ops) == []
        fill(store, core, range(8, 16), T0 + 5 * DAY + 10)
        assert conn.execute("SELECT id FROM chunks").fetchall() == [(2,)]
        conn.close()
        # The reader read chunk 1 before: a new one with that id would be
        # missed (their readings counted twice, from the chunk and the open head)
        # or answered from its cache of the deleted chunks' readings.
        assert seqs_of(ops) == list(range(8, 16))
    finally:
        if ops is not None:
            ops.close()
        store.close()


def test_a_corrupt_chunk_record_stays_with_its_chunk_not_a_later_one(db_path):
    store, core = open_ingest(db_path, store_options={"chunk_datagrams": 4, "retain": DAY})
    try:
        fill(store, core, range(4), T0)  # chunk 1
        conn = sqlite3.connect(db_path)
        conn.execute("UPDATE chunks SET crc = crc + 1 WHERE id = 1")
        conn.commit()
        assert store.maintain(core.counters, T0 + 10)
        assert core.counters["corrupt_chunks"] == 1
        assert store.flush(core, T0 + 5 * DAY)
        assert store.maintain(core.counters, T0 + 5 * DAY)  # the corrupt chunk ages out
        assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,)
        fill(store, core, range(4, 8), T0 + 5 * DAY + 10)  # a healthy chunk: not chunk 1 again
        assert conn.execute("SELECT id FROM chunks").fetchall() == [(2,)]
        conn.execute("UPDATE chunks SET crc = crc + 1 WHERE id = 2")  # and it goes bad too
        conn.commit()
        assert store.maintain(core.counters, T0 + 5 * DAY + 20)
        assert core.counters["corrupt_chunks"] == 2  # found and counted, not taken for chunk 1's record
        assert conn.execute("SELECT chunk FROM chunk_faults ORDER BY chunk").fetchall() == [(1,), (2,)]
        conn.close()
    finally:
        store.close()


def as_version_5(path: str) -> None:
    """Turn a file this collector made into the version 5 it grew from: `chunks.id` a plain
    INTEGER PRIMARY KEY, no sqlite_sequence row for it (the migration's inverse)."""
    as_plain_primary_key(path, "chunks", 5)


def test_the_version_6_migration_counts_on_from_the_highest_id_a_minute_block_or_fault_still_names(db_path):
    store, core = open_ingest(db_path, store_options={"chunk_datagrams": 4, "retain": DAY})
    try:
        for first in (0, 4, 8):
            fill(store, core, range(first, first + 4), T0 + first)  # chunks 1, 2, 3
        assert store.flush(core, T0 + 5 * DAY)
        assert store.maintain(core.counters, T0 + 5 * DAY)  # all three go; their minute blocks stay
    finally:
        store.close()
    as_version_5(db_path)
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,)
    assert conn.execute("SELECT max(chunk) FROM rollup_1m_blocks").fetchone() == (3,)
    assert conn.execute("SELECT sql LIKE '%AUTOINCREMENT%' FROM sqlite_master WHERE name = 'chunks'").fetchone() == (0,)
    conn.close()
    store, core = open_ingest(db_path, store_options={"chunk_datagrams": 4, "retain": DAY})  # migrates
    try:
        fill(store, core, range(12, 16), T0 + 5 * DAY + 10)
    finally:
        store.close()
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(schema.SCHEMA_VERSION),
    )
    assert conn.execute("SELECT id FROM chunks").fetchall() == [(4,)]  # not 1 again
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    ops = Ops(schema.open_reader(db_path))
    try:
        assert seqs_of(ops) == list(range(12, 16))
    finally:
        ops.close()
