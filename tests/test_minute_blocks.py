"""Minute blocks (schema version 5): 1-minute rollups stored as one blob per series and chunk."""

from __future__ import annotations

import json
import math
import random
import sqlite3
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import schema, wire
from collector.chunkstore import ChunkError, decode_minutes, encode_minutes, rollup
from collector.store import open_ingest
from query.ops import Ops
from query.protocol import parse_request

T0 = 1_700_000_000.0


def bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-(2**40), 2**40), st.integers(1, 2**20), finite, finite, finite),
        max_size=80,
        unique_by=lambda r: r[0],
    )
)
def test_minute_block_round_trip_is_bit_exact(rows):
    rows = sorted((b * 60, n, lo, hi, s) for b, n, lo, hi, s in rows)
    back = decode_minutes(encode_minutes(rows))
    assert [(b, n, bits(lo), bits(hi), bits(s)) for b, n, lo, hi, s in back] == [
        (b, n, bits(lo), bits(hi), bits(s)) for b, n, lo, hi, s in rows
    ]
    assert all(type(r[0]) is int and type(r[1]) is int and type(r[2]) is float for r in back)


def test_minute_block_of_a_realistic_chunk_is_small():
    rng = random.Random(3)
    ts = [T0 + i + rng.gauss(0, 0.002) for i in range(1024)]
    values = [round(21 + math.sin(i / 300) + rng.gauss(0, 0.05), 2) for i in range(1024)]
    minutes = sorted((b, *acc) for (w, b), acc in rollup(ts, values).items() if w == 60)
    assert sum(m[1] for m in minutes) == 1024 and len(minutes) == 18
    blob = encode_minutes(minutes)
    assert len(blob) <= 18 * 10, len(blob)  # under 10 bytes a minute (156 here), against ~40 for a row per minute
    assert decode_minutes(blob) == minutes


def test_a_damaged_minute_block_raises_chunk_error_only():
    blob = bytearray(encode_minutes([(60, 3, 1.0, 2.0, 4.5), (120, 1, 0.5, 0.5, 0.5)]))
    for i in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ChunkError):
            decode_minutes(bytes(flipped))


def ask(path: str, **params):
    ops = Ops(schema.open_reader(path))
    try:
        return ops.run(parse_request(json.dumps(params).encode())), ops.meta
    finally:
        ops.close()


def fill(db_path: str, n: int = 600, chunk: int = 64):
    store, core = open_ingest(db_path, store_options={"chunk_datagrams": chunk})
    try:
        for i in range(n):
            now = T0 + i * 0.5
            core.receive(wire.encode("s", i, {"v": float(i % 7), "w": i * 0.25}, boot=1, ts=now), now)
            if i % 16 == 15:
                assert store.flush(core, now)
        assert store.flush(core, T0 + n)
    finally:
        store.close()


def expected_minutes(n: int, closed: int, metric: str = "v"):
    out: dict[int, list[float]] = {}
    for i in range(n):
        out.setdefault(math.floor((T0 + i * 0.5) / 60) * 60, []).append(float(i % 7) if metric == "v" else i * 0.25)
    return out


def test_one_minute_aggregate_comes_from_the_blocks_and_adds_a_minute_two_blocks_share(db_path):
    fill(db_path)  # 64-datagram chunks of 32 s: nearly every minute is split between two blocks
    conn = sqlite3.connect(db_path)
    blocks = conn.execute("SELECT count(*) FROM rollup_1m_blocks").fetchone()[0]
    closed = conn.execute("SELECT total(count) FROM chunk_series WHERE series = 1").fetchone()[0]
    conn.close()
    assert blocks == 2 * 9 and closed == 576  # 9 chunks x 2 series; 24 datagrams still in the head
    got, meta = ask(db_path, op="aggregate", sensor="s", metric="v", bucket=60, since=T0 - 20, until=T0 + 340)
    assert meta["resolution"] == "1m"
    want = expected_minutes(600, 576)
    assert [(b["start"], b["count"], b["min"], b["max"]) for b in got] == [
        (k, len(v), min(v), max(v)) for k, v in sorted(want.items())
    ]
    assert [b["sum"] for b in got] == pytest.approx([math.fsum(v) for _, v in sorted(want.items())])


def test_a_corrupt_minute_block_is_skipped_with_a_note(db_path):
    fill(db_path)
    conn = sqlite3.connect(db_path)
    chunk, blob = conn.execute("SELECT chunk, blob FROM rollup_1m_blocks WHERE series = 1 ORDER BY chunk").fetchone()
    damaged = bytearray(blob)
    damaged[5] ^= 0x10  # one bit flip: the block's CRC catches it
    with conn:
        conn.execute("UPDATE rollup_1m_blocks SET blob = ? WHERE series = 1 AND chunk = ?", (bytes(damaged), chunk))
    conn.close()
    got, meta = ask(db_path, op="aggregate", sensor="s", metric="v", bucket=60, since=T0 - 20, until=T0 + 340)
    assert "corrupt" in " ".join(meta["notes"]) and meta["resolution"] == "1m"
    assert sum(b["count"] for b in got) == 600 - 64  # the first chunk's 64 readings are not counted


@pytest.mark.parametrize("auto_vacuum", ["NONE", "INCREMENTAL"])
def test_a_version_4_database_converts_its_minute_rows_into_blocks(db_path, caplog, auto_vacuum):
    """A v4 file (rollup_1m rows) opens as v5 and answers the same 1-minute aggregates.

    Version 4 created files without auto_vacuum (set after WAL mode, too
    late): those are compacted once with it turned on; the others hand the
    freed pages back."""
    import logging

    fill(db_path)
    before, _ = ask(db_path, op="aggregate", sensor="s", metric="w", bucket=60, since=T0 - 20, until=T0 + 340)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute(
        "CREATE TABLE rollup_1m (series INTEGER NOT NULL, bucket INTEGER NOT NULL, count INTEGER NOT NULL,"
        " min REAL NOT NULL, max REAL NOT NULL, sum REAL NOT NULL, PRIMARY KEY (series, bucket)) WITHOUT ROWID"
    )
    merged: dict[tuple[int, int], list] = {}
    for sid, blob in conn.execute("SELECT series, blob FROM rollup_1m_blocks").fetchall():
        for b, n, lo, hi, s in decode_minutes(blob):
            acc = merged.setdefault((sid, b), [0, lo, hi, 0.0])
            acc[0] += n
            acc[1], acc[2], acc[3] = min(acc[1], lo), max(acc[2], hi), acc[3] + s
    conn.executemany("INSERT INTO rollup_1m VALUES (?, ?, ?, ?, ?, ?)", [(*k, *v) for k, v in merged.items()])
    conn.execute("DROP TABLE rollup_1m_blocks")
    conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    conn.execute("COMMIT")
    conn.execute(f"PRAGMA auto_vacuum={auto_vacuum}")
    conn.execute("VACUUM")
    assert conn.execute("PRAGMA auto_vacuum").fetchone() == ({"NONE": 0, "INCREMENTAL": 2}[auto_vacuum],)
    conn.close()
    caplog.set_level(logging.INFO, logger="collector.schema")
    schema.open_writer(db_path).conn.close()
    assert f"converted {len(merged)} 1-minute rollup rows of 2 series into minute blocks" in caplog.text
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(schema.SCHEMA_VERSION),
    )
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'rollup_1m'").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM rollup_1m_blocks").fetchone() == (2,)  # one block per series
    assert conn.execute("PRAGMA freelist_count").fetchone() == (0,)  # rollup_1m's pages handed back
    assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental from now on
    conn.close()
    after, meta = ask(db_path, op="aggregate", sensor="s", metric="w", bucket=60, since=T0 - 20, until=T0 + 340)
    assert meta["resolution"] == "1m"
    assert [(b["start"], b["count"], b["min"], b["max"]) for b in after] == [
        (b["start"], b["count"], b["min"], b["max"]) for b in before
    ]
    assert [b["sum"] for b in after] == pytest.approx([b["sum"] for b in before], rel=1e-12)


def test_a_minute_sum_beyond_the_float_range_is_infinite_not_an_error():
    from collector.chunkstore import decimal_sum

    assert decimal_sum([1e308, 1e308]) == math.inf  # math.fsum raises OverflowError here
    assert decimal_sum([-1e308, -1e308, 5.0]) == -math.inf
    assert decimal_sum([21.39] * 7) == 149.73  # math.fsum gives 149.73000000000002
    assert decimal_sum([0.1, 0.2]) == 0.3  # and 0.30000000000000004
    assert decimal_sum([1 / 3, 1 / 3]) == 2 / 3  # no short decimal within 4 ulps: fsum's
