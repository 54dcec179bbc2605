"""collector/uplink/source.py against a real SQLite file: the gaps each snapshot carries.

A sensor's gap rows are read again only when its (lost, reordered) moved; these
tests write the database as the collector does (a new gap adds to lost, a late
datagram filling one adds to reordered) and check every snapshot's gaps, and how
many gap reads the uplink made, exactly.
"""

from __future__ import annotations

import pytest

from collector import ingestlog, schema
from collector.uplink import core, source


class Gateway:
    """A collector's database written by hand: sensors and gaps, one transaction per flush."""

    def __init__(self, path: str) -> None:
        self.db = schema.open_writer(path)
        self.conn = self.db.conn
        self.conn.execute(ingestlog.CREATE_TABLE)
        self.now = 1_800_000_000.0

    def flush(self, sensor: str, datagrams: int, lost: int = 0, reordered: int = 0, gaps=(), drop=()) -> None:
        self.now += 1
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute(
            "INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings, lost, duplicates, reordered, "
            "restarts) VALUES (?, ?, ?, ?, ?, ?, 0, ?, 0) ON CONFLICT (sensor) DO UPDATE SET "
            "last_seen = excluded.last_seen, datagrams = excluded.datagrams, readings = excluded.readings, "
            "lost = excluded.lost, reordered = excluded.reordered",
            (sensor, 1_800_000_000.0, self.now, datagrams, 2 * datagrams, lost, reordered),
        )
        for first in drop:
            self.conn.execute("DELETE FROM gaps WHERE sensor = ? AND stream = 0 AND first_seq = ?", (sensor, first))
        for first, last in gaps:
            self.conn.execute(
                "INSERT OR REPLACE INTO gaps (sensor, stream, boot, first_seq, last_seq, missing, detected_at) "
                "VALUES (?, 0, 7, ?, ?, ?, ?)",
                (sensor, first, last, last - first + 1, self.now),
            )
        self.conn.execute("COMMIT")

    def gaps(self, sensor: str) -> tuple[core.Gap, ...]:
        rows = self.conn.execute(
            "SELECT stream, boot, first_seq, last_seq, missing, detected_at FROM gaps WHERE sensor = ? "
            "ORDER BY detected_at DESC, stream DESC, first_seq DESC",
            (sensor,),
        ).fetchall()
        return tuple(core.Gap(*r) for r in rows)


@pytest.fixture
def gw(tmp_path):
    g = Gateway(str(tmp_path / "gw.db"))
    yield g
    g.conn.close()


@pytest.fixture
def src(gw, tmp_path):
    s = source.Source(str(tmp_path / "gw.db"), "site-1")
    yield s
    s.close()


def snapshot(src: source.Source) -> dict[str, core.Accounts]:
    """One round as the publisher runs it: read, then (acked) mark the accounts published."""
    snap = src.read(0, 100, 10_000)
    src.mark_published(snap.account_rows)
    return {a.sensor: a for a in snap.accounts}


def test_gaps_are_read_again_exactly_when_lost_or_reordered_moved(gw, src):
    gw.flush("a", 10, lost=2, gaps=[(3, 4)])
    gw.flush("b", 10)
    got = snapshot(src)
    assert got["a"].gaps == gw.gaps("a") and got["a"].gaps_total == 1 and got["a"].lost == 2
    assert got["b"].gaps == () and got["b"].gaps_total == 0
    assert src.gap_queries == 2

    # more datagrams, no new gap and no late one: the gaps are the ones held
    gw.flush("a", 20, lost=2)
    gw.flush("b", 20)
    got = snapshot(src)
    assert got["a"].datagrams == 20 and got["a"].gaps == gw.gaps("a") and got["b"].gaps == ()
    assert src.gap_queries == 2

    # a new gap (lost moved)
    gw.flush("a", 30, lost=5, gaps=[(12, 14)])
    got = snapshot(src)
    assert set(got) == {"a"} and got["a"].gaps == gw.gaps("a") and got["a"].gaps_total == 2
    assert src.gap_queries == 3

    # a late datagram splits the gap 12-14 into 12 and 14 (lost down, reordered up)
    gw.flush("a", 31, lost=4, reordered=1, gaps=[(12, 12), (14, 14)], drop=[12])
    got = snapshot(src)
    assert got["a"].gaps == gw.gaps("a") and got["a"].gaps_total == 3
    assert {(g.first_seq, g.last_seq) for g in got["a"].gaps} == {(3, 4), (12, 12), (14, 14)}
    assert src.gap_queries == 4

    # unchanged accounts: no snapshot, no read
    assert snapshot(src) == {}
    assert src.gap_queries == 4


def test_a_long_gap_list_is_read_each_time_and_counted_whole(gw, src):
    many = core.MAX_GAPS_PER_SNAPSHOT + 5
    gw.flush("a", 10_000, lost=many, gaps=[(10 * i, 10 * i) for i in range(many)])
    for k in range(3):
        got = snapshot(src)
        assert len(got["a"].gaps) == core.MAX_GAPS_PER_SNAPSHOT and got["a"].gaps_total == many
        assert got["a"].gaps == gw.gaps("a")[: core.MAX_GAPS_PER_SNAPSHOT]
        assert src.gap_queries == k + 1
        gw.flush("a", 10_001 + k, lost=many)


def test_the_gaps_held_stay_within_the_bound(gw, src, monkeypatch):
    monkeypatch.setattr(source, "GAP_CACHE_TOTAL", 5)
    for s in ("a", "b", "c"):
        gw.flush(s, 10, lost=2, gaps=[(3, 3), (5, 5)])
    snapshot(src)
    assert src.gap_queries == 3 and src._gaps_held == 4  # two sensors' lists fit, the third does not
    for s in ("a", "b", "c"):
        gw.flush(s, 20, lost=2)
    got = snapshot(src)
    assert all(got[s].gaps == gw.gaps(s) for s in ("a", "b", "c"))
    assert src.gap_queries == 4 and src._gaps_held == 4
