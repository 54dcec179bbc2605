"""Storage v3 retention, disk budget and corrupt chunks, on real SQLite files."""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3

from collector import schema, wire
from collector.retention import BUDGET_HIGH, bytes_to_free
from collector.store import open_ingest
from query.ops import Ops
from query.protocol import parse_request

T0 = 1_700_000_000.0
DAY = 86400.0


def ask(path: str, **params):
    ops = Ops(schema.open_reader(path))
    try:
        result = ops.run(parse_request(json.dumps(params).encode()))
        return result, ops.meta
    finally:
        ops.close()


def fill(
    store,
    core,
    sensor: str,
    seqs,
    t0: float,
    step: float = 1.0,
    noise: random.Random | None = None,
    flush_every: int = 16,
) -> None:
    for i, seq in enumerate(seqs):
        now = t0 + i * step
        value = noise.random() if noise else float(seq)
        core.receive(wire.encode(sensor, seq, {"v": value, "w": -value}, boot=1, ts=now), now)
        if i % flush_every == flush_every - 1:
            assert store.flush(core, now)
    assert store.flush(core, t0 + len(seqs) * step)


def test_bytes_to_free_is_zero_under_the_high_mark():
    assert bytes_to_free(100, None) == 0
    assert bytes_to_free(int(1000 * BUDGET_HIGH), 1000) == 0
    assert bytes_to_free(1000, 1000) == 150  # down to 85 %


def test_retention_drops_old_raw_chunks_counts_them_and_rollups_answer_for_them(db_path):
    store, core = open_ingest(db_path, store_options={"chunk_datagrams": 8, "retain": 2 * DAY})
    try:
        fill(store, core, "s", range(64), T0)  # 8 chunks, received at T0 .. T0 + 64
        fill(store, core, "s", range(64, 72), T0 + 3 * DAY)  # one more, three days later
        assert store.maintain(core.counters, T0 + 3 * DAY + 10)
    finally:
        store.close()
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (1,)
    assert dict(conn.execute("SELECT name, value FROM counters"))["retention_dropped"] == 128  # 64 x 2 readings
    conn.close()
    stats, _ = ask(db_path, op="stats")
    assert stats["retention_dropped"] == 128 and stats["stored_readings"] == 144
    assert stats["lost"] == 0 and stats["storage_dropped"] == 0  # never reported as loss
    sensors, _ = ask(db_path, op="sensors")
    assert (sensors[0]["datagrams"], sensors[0]["readings"]) == (72, 144)  # accounts never deleted
    rows, meta = ask(db_path, op="readings", sensor="s", metric="v", since=T0 - 10)
    assert [r["seq"] for r in rows["rows"]] == list(range(64, 72))
    assert "removed" in " ".join(meta["notes"])  # not a silent short list
    buckets, meta = ask(db_path, op="aggregate", sensor="s", metric="v", bucket=3600, since=T0 - 800)  # on the hour
    assert meta["resolution"] == "1h" and buckets[0]["count"] == 64  # from the rollups
    buckets, meta = ask(db_path, op="aggregate", sensor="s", metric="v", bucket=7, since=T0 - 10, until=T0 + 100)
    assert sum(b["count"] for b in buckets) == 64 and "rollup" in " ".join(meta["notes"])


def test_rollup_retention_keeps_hours_forever_by_default(db_path):
    store, core = open_ingest(db_path, store_options={"chunk_datagrams": 4, "retain": DAY, "retain_1m": 2 * DAY})
    try:
        fill(store, core, "s", range(8), T0)
        # The next flush (nothing new) trims the log row of the closing flush: a
        # (sensor, boot)'s newest chunk goes only once its log rows are gone.
        assert store.flush(core, T0 + 5 * DAY)
        for _ in range(3):  # the series visited in slices: a few steps
            assert store.maintain(core.counters, T0 + 5 * DAY)
    finally:
        store.close()
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT count(*) FROM rollup_1m_blocks").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM rollup_1h").fetchone() == (2,)  # two series, one hour
    assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,)
    conn.close()


def test_a_run_writing_three_times_the_budget_ends_at_or_under_it_with_accounts_intact(db_path):
    budget = 1024 * 1024
    store, core = open_ingest(db_path, store_options={"chunk_datagrams": 256, "max_disk": budget})
    noise = random.Random(1)  # incompressible values: ~18 bytes per datagram in chunks
    sent = 0
    try:
        for round_ in range(40):
            for s in range(10):
                seqs = range(round_ * 400, round_ * 400 + 400)
                fill(store, core, f"s{s}", seqs, T0 + round_ * 400, noise=noise, flush_every=400)
                sent += 400
                store.maintain(core.counters, T0)
            size = os.path.getsize(db_path) + os.path.getsize(db_path + "-wal")
            assert size <= budget * 1.02, (round_, size)  # between steps: at most one flush over
        written = core.counters["stored_readings"]
        assert core.counters["budget_dropped"] > 0
    finally:
        store.close()
    assert (
        os.path.getsize(db_path) + (os.path.getsize(db_path + "-wal") if os.path.exists(db_path + "-wal") else 0)
        <= budget
    )
    stats, _ = ask(db_path, op="stats")
    conn = sqlite3.connect(db_path)
    in_chunks = conn.execute("SELECT total(count) FROM chunk_series").fetchone()[0]
    conn.close()
    from helpers import db_query

    stored_now = db_query(db_path, "SELECT count(*) FROM readings")[0][0]
    assert stored_now >= in_chunks
    assert stored_now + stats["budget_dropped"] == written == 2 * sent  # every reading: kept or counted
    assert stats["budget_dropped"] >= 2 * stored_now  # at least three times what the budget holds went through
    sensors, _ = ask(db_path, op="sensors")
    assert [(s["datagrams"], s["lost"]) for s in sensors] == [(16_000, 0)] * 10


def test_a_corrupt_chunk_is_found_counted_logged_and_skipped_with_a_note(db_path, caplog):
    store, core = open_ingest(db_path, store_options={"chunk_datagrams": 8})
    try:
        fill(store, core, "s", range(24), T0, flush_every=8)  # three chunks
        conn = sqlite3.connect(db_path)
        blob = bytearray(conn.execute("SELECT blob FROM chunks WHERE id = 2").fetchone()[0])
        for i in (3, 10, 11):
            blob[i] ^= 0x41  # flash bit flips
        conn.execute("UPDATE chunks SET blob = ? WHERE id = 2", (bytes(blob),))
        conn.commit()
        conn.close()
        rows, meta = ask(db_path, op="readings", sensor="s", metric="v")
        assert [r["seq"] for r in rows["rows"]] == list(range(8)) + list(range(16, 24))
        assert meta["notes"] == [
            "chunk 2 of sensor s is corrupt (its checksum does not match): its readings are skipped"
        ]
        latest, _ = ask(db_path, op="latest", sensor="s")
        assert [r["seq"] for r in latest] == [23, 23]  # from the chunk statistics
        caplog.set_level(logging.ERROR, logger="collector.retention")
        assert store.maintain(core.counters, T0 + 100)
        assert store.maintain(core.counters, T0 + 101)  # found once, counted once
        assert core.counters["corrupt_chunks"] == 1
        assert "chunk 2 of sensor s" in caplog.text and "corrupt" in caplog.text
    finally:
        store.close()
    stats, _ = ask(db_path, op="stats")
    assert stats["corrupt_chunks"] == 1
    # The collector starts again on the same file (heads rebuilt, nothing crashes).
    store, core = open_ingest(db_path)
    store.close()


def test_retention_flags_are_checked_and_bad_values_are_one_line(bin_path, tmp_path):
    import subprocess

    exe = bin_path("telemetry-collector")
    ok = subprocess.run(
        [
            exe,
            "--db",
            str(tmp_path / "x.db"),
            "--retain",
            "30d",
            "--retain-1h",
            "forever",
            "--max-disk",
            "500M",
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    assert 'retain = "30d"' in ok.stdout and 'max-disk = "500M"' in ok.stdout
    for flag, value, words in (
        ("--max-disk", "lots", "not a size"),
        ("--max-disk", "10k", "at least 1 MiB"),
        ("--retain", "-3d", "must be > 0"),
        ("--retain-1m", "soon", "not a duration"),
    ):
        bad = subprocess.run(
            [exe, "--db", str(tmp_path / "x.db"), flag, value, "--check"], capture_output=True, text=True, timeout=30
        )
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert words in bad.stderr.strip().splitlines()[-1]  # click's usage error: one line says what


def test_free_pages_left_by_the_ingest_log_go_back_to_the_file_system(db_path):
    from collector.retention import FREE_SLACK_PAGES, VACUUM_PAGES_PER_STEP

    store, core = open_ingest(db_path, store_options={"chunk_datagrams": 4000, "chunk_span": 1e9})
    noise = random.Random(2)
    try:
        for s in range(12):  # the log holds every datagram until the heads close
            fill(store, core, f"s{s}", range(3000), T0, noise=noise, flush_every=4)
        fill(store, core, "s0", range(3000, 4000), T0 + 3000, noise=noise, flush_every=4)
        for s in range(1, 12):
            fill(store, core, f"s{s}", range(3000, 4000), T0 + 3000, noise=noise, flush_every=4000)
        for _ in range(20):  # the log rows go, a bounded number per flush
            assert store.flush(core, T0 + 5000)
        conn = store.conn
        assert conn.execute("SELECT count(*) FROM ingest_log").fetchone() == (0,)
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # a new file: incremental
        free_before = conn.execute("PRAGMA freelist_count").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        assert free_before > max(FREE_SLACK_PAGES, pages // 32) + 32  # what the log left
        size_before = os.path.getsize(db_path)
        for _ in range(free_before // VACUUM_PAGES_PER_STEP + 1):
            assert store.maintain(core.counters, T0 + 5000)
        pages, free = (
            conn.execute("PRAGMA page_count").fetchone()[0],
            conn.execute("PRAGMA freelist_count").fetchone()[0],
        )
        assert free <= max(FREE_SLACK_PAGES, pages // 32)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert os.path.getsize(db_path) <= size_before - (free_before - free) * 4096  # the file itself shrank
    finally:
        store.close()
    stats, _ = ask(db_path, op="stats")
    assert stats["stored_readings"] == 2 * 12 * 4000 and stats["budget_dropped"] == 0


def test_the_budget_keeps_a_newest_chunk_while_its_log_rows_remain(db_path):
    """Readers take the log rows after a (sensor, boot)'s newest chunk as its open head:
    deleting that chunk first would bring its readings back (kept and dropped both)."""
    from collector.readback import all_readings

    store, core = open_ingest(db_path, store_options={"chunk_datagrams": 4, "max_disk": 4096})  # always over
    try:
        fill(store, core, "s", range(6), T0, flush_every=100)  # one flush: a chunk of 6, its log row stays
        assert store.maintain(core.counters, T0 + 10)
        conn = sqlite3.connect(db_path)
        assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM ingest_log").fetchone() == (1,)
        assert len(all_readings(conn)) == 12 and core.counters["budget_dropped"] == 0
        fill(store, core, "s", range(6, 12), T0 + 20, flush_every=100)  # a second chunk; the first one's row goes
        assert store.maintain(core.counters, T0 + 30)
        kept = len(all_readings(conn))
        assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (1,)  # the older chunk went
        assert (kept, core.counters["budget_dropped"]) == (12, 12)  # kept + dropped = stored, nothing twice
        conn.close()
    finally:
        store.close()
