"""The uplink's position file: written (fsync'd) at most every --position-interval and on stop.

Rounds come several times a second beside a busy collector, and each fsync of
`<db>-uplink` forces an ext4 journal commit on the disk the collector's WAL is
on; so the acked position lives in memory and reaches the file at most every
position_interval seconds (an injected clock here), at once when the uplink
stops.  A kill -9 between two writes sends again what was acked since the last
one: against a real nats-server and the real central consumer, every reading
lands once.  The status file carries the acked position (within a second, at
once when a backlog has drained).  A round cut by its limits (a backlog) is
followed at once; one that reached the newest entry sleeps poll_interval.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3

import pytest
import uplinkfleet
from natsserver import NatsServer
from test_uplink_e2e import uplink_args, wait_central
from uplinkfleet import Uplinks, consume_args
from uplinkgw import GatewayDB

from collector.uplink import broker, source
from collector.uplink.publisher import Uplink, UplinkSettings

from helpers import wait_for


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(condition, timeout: float = 20.0, what: str = "the condition") -> None:
    """Wait (the uplink's loop runs meanwhile) until condition() holds, or fail after timeout."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def gw(tmp_path):
    g = GatewayDB(str(tmp_path / "gw.db"), seed=3)
    yield g
    g.close()


def settings(gw: GatewayDB, url: str, **kw) -> UplinkSettings:
    kw.setdefault("poll_interval", 0.02)
    return UplinkSettings(
        db=gw.path, gateway="site-1", broker=broker.BrokerSettings(servers=(url,)), status_interval=3600, **kw
    )


def test_the_position_reaches_the_file_at_most_every_interval_and_on_stop(tmp_path, gw):
    clock = Clock()
    with NatsServer(tmp_path) as ns:
        up = Uplink(settings(gw, ns.url, position_interval=5.0), clock=clock)

        async def scenario() -> None:
            run = asyncio.create_task(up.run())
            for _ in range(3):
                gw.flush()
                await until(lambda: up.cursor == gw.flushes, what="the flush acked")
            # three flushes acked, in three rounds at least; the clock has not moved: the file
            # holds the 0 the uplink wrote when it found none
            assert up.stats["rounds"] >= 3
            assert source.read_cursor(gw.path) == 0 and up.position_writes == 0
            clock.now += 4.99
            gw.flush()
            await until(lambda: up.cursor == 4, what="the fourth flush acked")
            await asyncio.sleep(0.1)  # five loop turns: still not due
            assert source.read_cursor(gw.path) == 0 and up.position_writes == 0
            clock.now += 0.01
            await until(lambda: source.read_cursor(gw.path) == 4, what="the position written when due")
            assert up.position_writes == 1
            gw.flush()
            gw.flush()
            await until(lambda: up.cursor == 6, what="two more flushes acked")
            assert source.read_cursor(gw.path) == 4  # the interval starts again at each write
            # the status file (telemetry-uplink status) has the acked position within a second or so
            await until(lambda: uplinkfleet.status(gw.path).get("position") == 6, what="the status file")
            assert source.read_cursor(gw.path) == 4 and uplinkfleet.status(gw.path)["position_written"] == 4
            up.stop.set()
            await run

        asyncio.run(scenario())
    assert source.read_cursor(gw.path) == 6 and up.position_writes == 2  # stopping wrote what was acked


def test_a_round_cut_by_its_limits_is_followed_at_once(tmp_path, gw):
    """A backlog of 7 entries, 2 a round, with a poll interval of an hour: the uplink drains
    it in 4 rounds without sleeping between them, and then sleeps: the round that reached the
    newest entry is not followed by another read (one more read transaction on the
    collector's database, which would find nothing) nor the new flush by one."""
    for _ in range(7):
        gw.flush()
    with NatsServer(tmp_path) as ns:
        up = Uplink(settings(gw, ns.url, poll_interval=3600, round_entries=2))

        async def scenario() -> None:
            run = asyncio.create_task(up.run())
            await until(lambda: up.cursor == 7, timeout=20, what="the backlog drained")
            assert uplinkfleet.status(gw.path)["position"] == 7  # written as the backlog drained
            gw.flush()
            await asyncio.sleep(0.3)
            assert up.stats["rounds"] == up.reads == 4 and up.cursor == 7  # asleep: the new flush waits
            up.stop.set()
            await run

        asyncio.run(scenario())
    assert source.read_cursor(gw.path) == 7


def test_kill_9_after_rounds_the_file_did_not_cover_sends_them_again_and_nothing_doubles(tmp_path, gw, bin_path):
    """An uplink whose position file lags (an hour's interval) acks ten flushes in several
    rounds and is killed with SIGKILL: its file still says 0.  The next uplink sends all of
    it again; the central database holds every reading once and the gateway's accounts."""
    uplinks = Uplinks(bin_path, tmp_path)
    try:
        with NatsServer(tmp_path) as ns:
            first = uplinks.start("uplink-1", *uplink_args(gw, "site-1", [ns.url], "--position-interval", "3600"))
            for k in range(10):
                gw.flush()
                wait_for(
                    lambda: uplinkfleet.status(gw.path).get("position") == gw.flushes,
                    20,
                    0.02,
                    what=f"flush {k + 1} acked",
                )
            assert uplinkfleet.position(gw.path) == 0
            assert first.stop(signal.SIGKILL) == -signal.SIGKILL
            second = uplinks.start("uplink-2", *uplink_args(gw, "site-1", [ns.url]))
            central = str(tmp_path / "central.db")
            consumer = uplinks.start("consume", *consume_args(central, [ns.url]))
            wait_central(central, {"site-1": gw})
            wait_for(lambda: uplinkfleet.position(gw.path) == gw.flushes, 10, 0.02, what="the position written")
            assert second.stop() == 0 and consumer.stop() == 0
            assert "DATA LOST" not in second.text()
    finally:
        uplinks.close()


def said_once_entries_1_2_lost(caplog, up: Uplink) -> None:
    """One DATA LOST line for the hole of entries 1-2, and those 2 entries counted."""
    lost = [r.getMessage() for r in caplog.records if "DATA LOST" in r.getMessage()]
    assert len(lost) == 1 and "entries 1-2 were deleted" in lost[0], lost
    assert up.stats["skipped_entries"] == 2


def test_a_round_that_fails_after_finding_entries_gone_says_data_lost_once(tmp_path, gw, caplog):
    """Entries 1-2 are deleted before the uplink sent them (the collector's disk budget) and the
    round that finds the hole fails (the broker stopped: no ack within ack_timeout).  The rounds
    after it (the broker back) find the same hole: one ERROR line and two entries counted, not
    two lines and four."""
    caplog.set_level("ERROR", logger="collector.uplink")
    with NatsServer(tmp_path) as ns:
        up = Uplink(settings(gw, ns.url, ack_timeout=1.0, backoff_max=0.2))

        async def scenario() -> None:
            run = asyncio.create_task(up.run())
            await until(lambda: up.nc is not None and up.stats["rounds"] >= 1, what="the uplink connected and idle")
            ns.proc.send_signal(signal.SIGSTOP)
            try:
                # No await between these: the uplink's loop cannot read in the middle.
                for _ in range(3):
                    gw.flush()
                with sqlite3.connect(gw.path) as conn:
                    conn.execute("DELETE FROM ingest_log WHERE id <= 2")
                conn.close()
                await until(lambda: up.stats["failed_rounds"] >= 1, what="the round failed")
            finally:
                ns.proc.send_signal(signal.SIGCONT)
            await until(lambda: up.cursor == 3, what="entry 3 acked")
            up.stop.set()
            await run

        asyncio.run(scenario())
    said_once_entries_1_2_lost(caplog, up)
    assert uplinkfleet.status(gw.path)["skipped_entries"] == 2


def test_every_unsent_entry_deleted_is_data_lost_too(tmp_path, gw, caplog):
    """The collector's disk budget deleted every entry the uplink had not sent (entries 1-2):
    no row follows the position, but the log's newest id (sqlite_sequence) is past it.  That is
    said and counted as a hole, and the position moves past it, without waiting for an entry."""
    caplog.set_level("ERROR", logger="collector.uplink")
    gw.flush()
    gw.flush()
    with sqlite3.connect(gw.path) as conn:
        conn.execute("DELETE FROM ingest_log")
    conn.close()
    with NatsServer(tmp_path) as ns:
        up = Uplink(settings(gw, ns.url))

        async def scenario() -> None:
            run = asyncio.create_task(up.run())
            await until(lambda: up.cursor == 2, what="the position past the hole")
            up.stop.set()
            await run

        asyncio.run(scenario())
    said_once_entries_1_2_lost(caplog, up)
    assert source.read_cursor(gw.path) == 2
