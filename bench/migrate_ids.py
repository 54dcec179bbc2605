"""Migration figure (schema versions 6 and 7): how long a version-5 file takes to get `chunks.id` AUTOINCREMENT
(and, with --quarantine, a central file's `uplink_quarantine.id` too).

Builds a file of --chunks chunks (--blob-bytes of random bytes each: the
migration reads no blob) and --blocks minute blocks, turns it back into the
version 5 it grew from (tests/test_chunk_ids.py `as_version_5`: the plain
INTEGER PRIMARY KEY, no sqlite_sequence row), then opens it as the collector
does (collector/schema.open_writer), which migrates it.  The step rewrites the
table's declaration and seeds sqlite_sequence from the highest id a chunk, a
corrupt-chunk record or a minute block names; it copies nothing, so the time
should not grow with the blobs.  With --quarantine N the file is a central one: N
messages of --payload-bytes set aside in `uplink_quarantine`, declared as
version 6 declared it, which version 7 rewrites the same way.  Building the
file is not timed.

    .venv/bin/python bench/migrate_ids.py                           # 100,000 chunks of 4 kB (~0.5 GB)
    .venv/bin/python bench/migrate_ids.py --chunks 10000 --blocks 50000
    .venv/bin/python bench/migrate_ids.py --quarantine 10000              # a central file, versions 6 and 7
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_chunk_ids import as_version_5  # noqa: E402

from collector import schema  # noqa: E402

CHUNK = (
    "INSERT INTO chunks (sensor, boot, log_id, datagrams, first_received, last_received, crc, blob)"
    " VALUES (?, 1, 0, 1024, ?, ?, 0, ?)"
)
BLOCK = "INSERT INTO rollup_1m_blocks (series, first_bucket, chunk, last_bucket, blob) VALUES (?, ?, ?, ?, ?)"


# uplink_quarantine as a version 6 central database declared it (collector/uplink/central.py then)
QUARANTINE_V6 = """CREATE TABLE uplink_quarantine (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    gateway TEXT NOT NULL,
    subject TEXT NOT NULL,
    stream_seq INTEGER NOT NULL,
    error TEXT NOT NULL,
    payload BLOB NOT NULL
)"""
QUARANTINE = (
    "INSERT INTO uplink_quarantine (at, gateway, subject, stream_seq, error, payload) VALUES (?, ?, ?, ?, ?, ?)"
)


def build(path: str, chunks: int, blocks: int, blob_bytes: int, quarantine: int = 0, payload_bytes: int = 0) -> None:
    conn = schema.open_writer(path).conn
    conn.execute("BEGIN")
    conn.executemany(CHUNK, ((f"s{i % 500}", float(i), float(i + 1), os.urandom(blob_bytes)) for i in range(chunks)))
    conn.executemany(BLOCK, ((i % 2500, i * 60, 1 + i % chunks, i * 60, os.urandom(64)) for i in range(blocks)))
    if quarantine:
        conn.execute(QUARANTINE_V6)
        conn.executemany(
            QUARANTINE,
            (
                (float(i), "site-1", "telemetry.site-1.columns", i, "IntegrityError", os.urandom(payload_bytes))
                for i in range(quarantine)
            ),
        )
        conn.execute("INSERT INTO counters (name, value) VALUES ('uplink_quarantined', ?)", (quarantine,))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    as_version_5(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--blocks", type=int, default=500_000)
    parser.add_argument("--blob-bytes", type=int, default=4000)
    parser.add_argument("--quarantine", type=int, default=0, help="messages set aside (a central file)")
    parser.add_argument("--payload-bytes", type=int, default=65536, help="of each message set aside")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="migrate-ids-") as tmp:
        path = os.path.join(tmp, "v5.db")
        build(path, args.chunks, args.blocks, args.blob_bytes, args.quarantine, args.payload_bytes)
        size = os.path.getsize(path)
        started, cpu = time.monotonic(), time.process_time()
        conn = schema.open_writer(path).conn
        took, cpu = time.monotonic() - started, time.process_time() - cpu
        (seq,) = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'chunks'").fetchone()
        aside = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'uplink_quarantine'").fetchone()
        (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        (check,) = conn.execute("PRAGMA quick_check").fetchone()
        conn.close()
    print(
        f"a version-5 file of {size / 1e6:.0f} MB ({args.chunks:,} chunks, {args.blocks:,} minute blocks, "
        f"{args.quarantine:,} messages set aside): opened and migrated in {took * 1000:.0f} ms "
        f"({cpu * 1000:.0f} ms of CPU); version {version}, chunk ids go on after {seq}"
        + (f", quarantine ids after {aside[0]}" if aside else "")
        + f", quick_check {check}"
    )


if __name__ == "__main__":
    main()
