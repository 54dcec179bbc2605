"""The v3 store on real SQLite files: one transaction per flush, restart safety, disk full."""

from __future__ import annotations

import json
import random
import sqlite3

import pytest

from collector import schema, wire
from collector.errors import SetupError
from collector.sequence import Duplicate, Gap, Late
from collector.store import open_ingest

from helpers import db_query as rows


class W:
    """A store and its ingest core, driven as the collector does (without sockets)."""

    def __init__(self, path: str, **store_options) -> None:
        self.store, self.core = open_ingest(path, store_options=store_options)
        self.conn = self.store.conn
        self.counters = self.core.counters

    def flush(self, now: float, monotonic: float | None = None) -> bool:
        return self.store.flush(self.core, now, monotonic)

    def __getattr__(self, name):
        return getattr(self.store, name)

    def close(self) -> None:
        self.store.close()


def feed(w: W, sensor: str, boot, seq: int, now: float, readings=None):
    """One datagram (ts = now) through the ingest core; returns the tracker's event."""
    readings = readings or {"temp": 20.0 + seq, "hum": 50}
    return w.core.receive(wire.encode(sensor, seq, readings, boot=boot, ts=now), now)


def test_flush_writes_readings_sensors_gaps_and_counters_together(db_path):
    w = W(db_path)
    for seq in (0, 1, 4, 5):  # 2 and 3 missing
        feed(w, "s1", 7, seq, 100.0 + seq)
    feed(w, "s2", None, 10, 100.5, {"v": 1.5})
    w.counters["received"] = 5
    assert w.flush(200.0) is True
    assert w.core.pending == [] and w.core.dirty == set() and w.core.pending_datagrams == 0
    got = rows(
        db_path,
        "SELECT sensor, first_seen, last_seen, datagrams, readings, lost, duplicates, reordered, restarts"
        " FROM sensors ORDER BY sensor",
    )
    assert got == [("s1", 100.0, 105.0, 4, 8, 2, 0, 0, 0), ("s2", 100.5, 100.5, 1, 1, 0, 0, 0, 0)]
    assert rows(db_path, "SELECT sensor, stream, boot, first_seq, last_seq, missing FROM gaps") == [
        ("s1", 0, 7, 2, 3, 2)
    ]
    assert rows(db_path, "SELECT id, sensor, metric FROM series ORDER BY id") == [
        (1, "s1", "temp"),
        (2, "s1", "hum"),
        (3, "s2", "v"),
    ]
    assert rows(db_path, "SELECT count(*) FROM readings WHERE boot = 7") == [(8,)]
    assert rows(db_path, "SELECT boot, seq, value FROM readings WHERE series = 3") == [(-1, 10, 1.5)]
    counters = dict(rows(db_path, "SELECT name, value FROM counters"))
    assert counters["received"] == 5 and counters["stored"] == 5 and counters["stored_readings"] == 9
    assert counters["last_flush"] == 200.0
    snapshot = json.loads(rows(db_path, "SELECT tracker FROM sensors WHERE sensor = 's1'")[0][0])
    assert snapshot["lost"] == 2
    # A late arrival fills part of the gap: the gap row follows in the next flush.
    assert feed(w, "s1", 7, 2, 300.0) == Late(2)
    assert w.flush(301.0)
    assert rows(db_path, "SELECT first_seq, last_seq, missing FROM gaps") == [(3, 3, 1)]
    assert feed(w, "s1", 7, 3, 302.0) == Late(3)
    assert w.flush(303.0)
    assert rows(db_path, "SELECT count(*) FROM gaps") == [(0,)]
    assert rows(db_path, "SELECT lost, reordered FROM sensors WHERE sensor = 's1'") == [(0, 2)]
    w.close()


def test_restart_rebuilds_trackers_so_no_gap_is_invented_and_duplicates_are_known(db_path):
    w = W(db_path)
    for seq in (10, 11, 13):
        feed(w, "s1", 3, seq, 1.0)
    w.counters["received"] = 3
    assert w.flush(2.0)
    w.close()

    again = W(db_path)
    assert again.counters["received"] == 3 and again.counters["stored"] == 3
    assert feed(again, "s1", 3, 13, 5.0) == Duplicate()
    assert feed(again, "s1", 3, 12, 5.0) == Late(12)  # the gap survived the restart and is fillable
    assert feed(again, "s1", 3, 14, 5.0).__class__.__name__ == "InOrder"
    assert feed(again, "s1", 3, 16, 5.0) == Gap(15, 15)
    state = again.core.sensors["s1"]
    assert state.series == {"temp": 1, "hum": 2}  # series ids reused, none re-created
    assert again.flush(6.0)
    assert rows(db_path, "SELECT datagrams, readings, lost, duplicates, reordered FROM sensors") == [(6, 12, 1, 1, 1)]
    assert rows(db_path, "SELECT count(*) FROM series") == [(2,)]
    assert rows(db_path, "SELECT first_seq, last_seq FROM gaps") == [(15, 15)]
    again.close()


def test_a_gap_row_split_after_it_was_written_keeps_its_detection_time(db_path):
    # The tracker keeps only its window's bitmap, not the detection times of
    # rows it wrote: a piece copies its row's time in SQL, across a collector
    # restart and across a flush the database refused.
    gaps = "SELECT first_seq, last_seq, missing, detected_at FROM gaps ORDER BY first_seq"
    w = W(db_path)
    for seq in (0, 10):
        feed(w, "s1", 7, seq, 100.0)  # gap 1..9, found at 100
    assert w.flush(101.0)
    assert feed(w, "s1", 7, 1, 200.0) == Late(1)  # front: the row's key moves to 2
    assert feed(w, "s1", 7, 5, 200.0) == Late(5)  # split: 2..4 and 6..9
    assert w.flush(201.0)
    assert rows(db_path, gaps) == [(2, 4, 3, 100.0), (6, 9, 4, 100.0)]
    w.close()

    again = W(db_path)  # the tracker is rebuilt from the rows
    assert feed(again, "s1", 7, 9, 300.0) == Late(9)  # back: 6..8
    assert feed(again, "s1", 7, 20, 300.0) == Gap(11, 19)  # a new gap, found at 300
    again.conn.execute("PRAGMA query_only = 1")  # the database refuses the next flush
    assert not again.flush(301.0)
    assert feed(again, "s1", 7, 6, 302.0) == Late(6)  # piece of a written row (6..8 -> 7..8)
    assert feed(again, "s1", 7, 11, 302.0) == Late(11)  # piece of a row never written (11..19 -> 12..19)
    assert feed(again, "s1", 7, 2, 302.0) == Late(2)  # 2..4 -> 3..4
    again.conn.execute("PRAGMA query_only = 0")
    assert again.flush(400.0)
    assert rows(db_path, gaps) == [(3, 4, 2, 100.0), (7, 8, 2, 100.0), (12, 19, 8, 300.0)]
    assert rows(db_path, "SELECT lost, reordered FROM sensors") == [(12, 6)]
    again.close()


def test_database_full_keeps_a_bounded_backlog_counts_drops_and_recovers(db_path, caplog):
    w = W(db_path, max_backlog_rows=100)
    assert w.flush(0.0)
    pages = w.conn.execute("PRAGMA page_count").fetchone()[0]
    w.conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from now on
    sent_readings = 0
    noise = random.Random(9)  # values zlib cannot squeeze: the log needs new pages soon
    for seq in range(400):  # 2 readings each: 800 offered
        feed(w, "s1", 1, seq, 10.0, {"temp": noise.random(), "hum": noise.random()})
        sent_readings += 2
        if seq % 20 == 19:
            if not w.flush(10.0 + seq):
                w.core.trim(100)
    assert w.failing_since is not None
    assert w.core.pending_readings <= 100
    dropped = w.counters["storage_dropped"]
    assert dropped > 0 and dropped % 2 == 0  # whole datagrams only
    stored_before = w.counters["stored_readings"]  # pages with free room took some first
    assert dropped + w.core.pending_readings + stored_before == sent_readings
    assert w.retry_at > w.failing_since
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "database or disk is full" in errors[0].getMessage()  # once per episode

    w.conn.execute("PRAGMA max_page_count = 1073741823")
    kept = w.core.pending_readings
    assert w.flush(500.0)
    assert w.failing_since is None
    assert rows(db_path, "SELECT count(*) FROM readings") == [(stored_before + kept,)]
    counters = dict(rows(db_path, "SELECT name, value FROM counters"))
    assert counters["stored_readings"] == stored_before + kept
    assert counters["stored"] == (stored_before + kept) // 2
    assert counters["storage_dropped"] == dropped == sent_readings - kept - stored_before
    # The accounts were never lost: all 400 datagrams counted, seqs all present.
    assert rows(db_path, "SELECT datagrams, readings, lost FROM sensors") == [(400, 800, 0)]
    assert any("writable again" in r.getMessage() for r in caplog.records)
    w.close()


def test_trim_drops_oldest_whole_datagrams(db_path):
    w = W(db_path)
    for seq in range(9):
        feed(w, "s1", None, seq, 1.0, {"a": 1, "b": 2, "c": 3})  # 27 readings
    dropped = w.core.trim(10)
    assert dropped == 18  # 17 excess + 1 slack = 18, already a datagram boundary
    assert [d[2] for d in w.core.pending] == [6, 7, 8]
    assert w.core.pending_datagrams == 3 and w.core.pending_readings == 9
    w.close()


def test_an_exact_repeat_of_a_stray_is_stored_once_and_trim_stays_exact(db_path):
    """A far-off seq sent twice: the tracker calls both copies Strays (it keeps a
    Stray, never calls it a duplicate); the core stores the exact repeat once
    (counted in duplicates, as v2's primary key kept one row), and `stored`
    counts exactly the datagrams kept after a trim."""
    w = W(db_path)
    feed(w, "s1", 1, 0, 100.0)
    for _ in range(2):
        assert type(feed(w, "s1", 1, 5_000_000, 101.0)).__name__ == "Stray"
    for seq in range(1, 6):
        feed(w, "s1", 1, seq, 102.0)  # 7 datagrams queued, 14 readings
    assert w.core.pending_datagrams == 7 and w.counters["duplicates"] == 1
    assert w.core.trim(10) == 6  # 4 excess + 1 slack, rounded up to the end of a datagram
    assert [d[2] for d in w.core.pending] == [2, 3, 4, 5]
    assert w.flush(103.0)
    assert w.counters["stored"] == 4 and w.counters["stored_readings"] == 8
    assert rows(db_path, "SELECT count(*) FROM readings") == [(8,)]
    w.close()


def test_corrupt_tracker_snapshot_starts_afresh_with_a_warning(db_path, caplog):
    w = W(db_path)
    feed(w, "s1", 1, 5, 1.0)
    assert w.flush(1.0)
    w.conn.execute("UPDATE sensors SET tracker = ?", (json.dumps({"v": 999}),))
    w.close()
    again = W(db_path)
    assert "s1" in again.core.sensors and again.core.sensors["s1"].tracker.datagrams == 0
    assert "start afresh" in caplog.text
    again.close()


def test_writer_opens_wal_and_refuses_an_unwritable_place(tmp_path):
    from collector.errors import SetupError

    w = W(str(tmp_path / "t.db"))
    assert w.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert w.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    w.close()
    with pytest.raises(SetupError, match="cannot open database"):
        W(str(tmp_path / "missing-dir" / "t.db"))


def test_locked_database_fails_fast_and_the_retry_succeeds(db_path, caplog):
    w = W(db_path)
    feed(w, "s1", 1, 0, 1.0)
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        from collector import tuning

        # The wait for the lock is SQLite's busy_timeout: short, so the receive loop is not held for long.
        assert w.conn.execute("PRAGMA busy_timeout").fetchone()[0] == tuning.WRITER_BUSY_TIMEOUT_MS <= 250
        assert w.flush(2.0, 100.0) is False
        assert w.failing_since == 100.0 and w.retry_at == 100.5
        assert "database is locked" in caplog.text
        assert w.flush(3.0, 100.5) is False
        assert w.retry_at == 101.5  # backoff doubles
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert w.flush(4.0, 101.5) is True
    assert w.failing_since is None and w.retry_at == 0.0
    assert rows(db_path, "SELECT count(*) FROM readings") == [(2,)]
    w.close()


def test_a_damaged_database_is_a_setup_error_not_a_traceback(db_path):
    from collector.errors import SetupError

    w = W(db_path)
    pages_before = w.conn.execute("PRAGMA page_count").fetchone()[0]
    for i in range(400):  # sensors rows (and their index) on pages added after the schema's
        feed(w, f"sensor-with-a-long-name-{i:04d}", 1, 0, 100.0)
    assert w.flush(100.0)
    w.close()  # the last connection checkpoints the WAL into the file
    with open(db_path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(4096 * pages_before)
        f.write(b"\xa5" * (size - 4096 * pages_before))  # flash pages gone bad
    with pytest.raises(SetupError, match=r"cannot read database .*malformed"):
        W(db_path)  # the schema pages are intact: it opens, and loading fails


def test_a_database_from_a_newer_collector_is_refused_and_left_closed(db_path):
    import os

    from collector.errors import SetupError

    schema.open_writer(db_path).conn.close()
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    before = len(os.listdir("/proc/self/fd"))
    # pytest.raises keeps the traceback and its frames: a connection left
    # open by the failed open would still hold its file descriptors here.
    with pytest.raises(
        SetupError, match=f"schema version 99 is newer than this collector's {schema.SCHEMA_VERSION}"
    ) as info:
        schema.open_writer(db_path)
    assert len(os.listdir("/proc/self/fd")) == before
    del info


def test_a_second_writer_on_the_same_database_is_refused_until_the_first_closes(db_path):
    first = W(db_path)
    with pytest.raises(SetupError, match="in use by another telemetry-collector"):
        W(db_path)
    first.close()
    second = W(db_path)  # the lock went with the first writer
    second.close()


def _meanwhile(w: W) -> None:
    """What the loop queues while a writer thread writes the batch taken before:
    more of s1's head (with a gap: 4 missing) and a new sensor (new series)."""
    assert feed(w, "s1", 1, 5, 111.0) == Gap(4, 4)
    feed(w, "s2", None, 0, 111.5, {"v": 2.5})


@pytest.mark.parametrize("refused", [False, True], ids=["committed", "refused"])
def test_a_flush_written_in_another_thread_keeps_what_arrives_meanwhile(db_path, refused):
    """Store.begin takes the batch; the loop queues more while Store.write runs in
    another thread; Store.end then forgets exactly what was written (committed),
    or nothing (refused: another connection held the write lock), and the next
    flush writes the rest with the accounts as they stand: nothing lost, nothing twice."""
    import threading

    w = W(db_path)
    for seq in range(3):
        feed(w, "s1", 1, seq, 100.0 + seq)
    assert w.flush(105.0)
    feed(w, "s1", 1, 3, 106.0)
    w.counters["received"] = 4
    job = w.store.begin(w.core, 110.0)
    holder = None
    if refused:
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    _meanwhile(w)
    w.counters["received"] = 6
    writer = threading.Thread(target=w.store.write, args=(job,))
    writer.start()
    writer.join()
    if holder is not None:
        holder.execute("ROLLBACK")
        holder.close()
    assert w.store.end(w.core, job, 110.0) is not refused
    # What the database says now: the batch as it stood at begin, or the flush before.
    stored = 3 if refused else 4
    assert rows(db_path, "SELECT count(*) FROM readings") == [(2 * stored,)]
    assert rows(db_path, "SELECT sensor, datagrams, lost FROM sensors") == [("s1", stored, 0)]
    assert rows(db_path, "SELECT count(*) FROM gaps") == [(0,)]
    assert w.counters["stored"] == stored
    pending = [d[:3] for d in w.core.pending]
    assert pending == ([("s1", 1, 3)] if refused else []) + [("s1", 1, 5), ("s2", None, 0)]
    assert w.core.pending_readings == 2 * len(pending) - 1
    assert {state.sensor for state in w.core.dirty} == {"s1", "s2"}
    assert w.flush(120.0)
    assert w.core.pending == [] and w.core.dirty == set() and w.core.pending_datagrams == 0
    assert rows(db_path, "SELECT sensor, datagrams, readings, lost FROM sensors ORDER BY sensor") == [
        ("s1", 5, 10, 1),
        ("s2", 1, 1, 0),
    ]
    assert rows(db_path, "SELECT sensor, first_seq, last_seq, missing FROM gaps") == [("s1", 4, 4, 1)]
    assert rows(
        db_path,
        "SELECT s.sensor, r.seq FROM readings r JOIN series s ON s.id = r.series WHERE s.metric != 'hum' ORDER BY 1, 2",
    ) == [("s1", 0), ("s1", 1), ("s1", 2), ("s1", 3), ("s1", 5), ("s2", 0)]
    assert rows(db_path, "SELECT id, sensor, metric FROM series ORDER BY id") == [
        (1, "s1", "temp"),
        (2, "s1", "hum"),
        (3, "s2", "v"),
    ]
    counters = dict(rows(db_path, "SELECT name, value FROM counters"))
    assert (counters["received"], counters["stored"], counters["stored_readings"]) == (6, 6, 11)
    w.close()
