"""The Collector run in a thread: real sockets on loopback, a real SQLite file."""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading

import msgpack
import pytest

from collector import wire
from collector.errors import SetupError
from collector.schema import REJECT_REASONS
from collector.server import Collector, Settings

from helpers import db_counters as counters
from helpers import db_query as query
from helpers import in_loop, running_collector, serving, wait_for

running = running_collector

# The loop reads with recvmmsg where libc has it (collector/mmsg.py) and with
# recv otherwise: the tests of what reading decides run on both paths.
both_paths = pytest.mark.parametrize("batch_receive", [True, False], ids=["recvmmsg", "recv"])


def sender(family=socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    return s


def send_paced(s: socket.socket, collector: Collector, datagrams, address, window: int = 100) -> int:
    """Send, keeping at most `window` datagrams unread: fits a stock 208 KiB socket buffer."""
    sent = 0
    for data in datagrams:
        s.sendto(data, address)
        sent += 1
        if sent % window == 0:
            wait_for(
                lambda: collector.counters["received"] >= sent - window // 2,
                10,
                what=lambda: (
                    f"the collector to catch up to {sent - window // 2} (got {collector.counters['received']})"
                ),
            )
    return sent


def good(sensor: str, seq: int, boot: int | None = 1) -> bytes:
    return wire.encode(sensor, seq, {"temp": 20.0 + seq / 10, "hum": seq % 100}, boot=boot, ts=1_700_000_000 + seq)


# One named datagram per rejection reason (zeroconf names its bad packets after the attack).
JUNK = {
    "too_large": b"\x80" + b"\x00" * 9000,
    "not_msgpack": b"\xc1",
    "not_a_map": msgpack.packb([1, 2]),  # not [1, 2, 3]: a fixarray of 3 (0x93) is the signed form
    "bad_version": msgpack.packb({"v": 2, "id": "s", "seq": 1, "r": {"a": 1}}),
    "bad_id": msgpack.packb({"v": 1, "id": "no spaces allowed", "seq": 1, "r": {"a": 1}}),
    "bad_seq": msgpack.packb({"v": 1, "id": "s", "seq": -1, "r": {"a": 1}}),
    "bad_boot": msgpack.packb({"v": 1, "id": "s", "seq": 1, "boot": "x", "r": {"a": 1}}),
    "bad_ts": msgpack.packb({"v": 1, "id": "s", "seq": 1, "ts": -5, "r": {"a": 1}}),
    "bad_readings": msgpack.packb({"v": 1, "id": "s", "seq": 1, "r": {}}),
}


def test_junk_is_named_for_every_reason():
    for reason, data in JUNK.items():
        with pytest.raises(wire.DecodeError) as info:
            wire.decode(data)
        assert info.value.reason == reason
    assert set(JUNK) == set(wire.REASONS)


@both_paths
def test_storm_of_junk_loses_no_valid_datagram_and_counts_each_junk_by_reason(db_path, caplog, batch_receive):
    caplog.set_level(logging.WARNING, logger="collector")
    valid = 400
    # The collector's clock stands still: "one line per reason" is the rate limit's promise
    # for REJECT_LOG_INTERVAL_S, not for however long a loaded machine takes over the storm.
    with running(db_path, clock=lambda: 1_800_000_000.0, batch_receive=batch_receive) as (collector, _):
        port = collector.addresses[0][1]
        s = sender()
        stream = []
        junk_sent = 0
        for seq in range(valid):
            stream.append(good("storm-1", seq))
            if seq % 2 == 0:  # 200 junk: 23 of the first two reasons, 22 of the others
                stream.append(JUNK[wire.REASONS[junk_sent % len(JUNK)]])
                junk_sent += 1
        total = send_paced(s, collector, stream, ("127.0.0.1", port))
        assert total == valid + junk_sent
        wait_for(
            lambda: collector.counters["received"] == total,
            10,
            what=lambda: f"{total} datagrams received (got {collector.counters['received']})",
        )
        sender_port = s.getsockname()[1]
        s.close()
    c = counters(db_path)
    expected = {r: junk_sent // len(JUNK) + (1 if i < junk_sent % len(JUNK) else 0) for i, r in enumerate(wire.REASONS)}
    assert {r: c[f"rejected:{r}"] for r in wire.REASONS} == expected
    assert c["received"] == total and c["stored"] == valid and c["stored_readings"] == 2 * valid
    assert c["duplicates"] == 0 and c["truncated"] == 0 and c["internal_errors"] == 0
    assert c["received"] == c["stored"] + c["duplicates"] + sum(c[f"rejected:{r}"] for r in wire.REASONS)
    assert query(db_path, "SELECT datagrams, readings, lost, duplicates FROM sensors") == [(valid, 2 * valid, 0, 0)]
    assert query(db_path, "SELECT count(*), min(seq), max(seq) FROM readings") == [(2 * valid, 0, valid - 1)]
    # Rate-limited: one line per reason, naming the reason and the source.
    lines = [r.getMessage() for r in caplog.records if "rejected datagram" in r.getMessage()]
    assert sorted(line.split(": ")[1] for line in lines) == sorted(wire.REASONS)
    # The source is named, unless the datagram was read in a burst by recv (its fast path records no
    # address); recvmmsg has every source at hand.
    assert all(
        f"from 127.0.0.1:{sender_port} " in line
        or (not batch_receive and "from a source not recorded (read in a burst)" in line)
        for line in lines
    ), lines


@both_paths
def test_truncated_datagrams_are_counted_never_half_stored(db_path, batch_receive):
    with running(db_path, recv_buffer_bytes=256, batch_receive=batch_receive) as (collector, _):
        port = collector.addresses[0][1]
        s = sender()
        big = wire.encode("big-1", 1, {f"m{i}": float(i) for i in range(40)})
        assert len(big) > 256
        for seq in range(10):
            s.sendto(good("small-1", seq), ("127.0.0.1", port))
            s.sendto(big, ("127.0.0.1", port))
        s.close()
        wait_for(lambda: collector.counters["received"] == 20, 10, what="20 received")
    c = counters(db_path)
    assert c["truncated"] == 10 and c["stored"] == 10 and c["rejected:too_large"] == 0
    assert query(db_path, "SELECT sensor FROM sensors") == [("small-1",)]


def _flood_then_serve(db_path, flush_interval, batch_receive=True):
    """A collector with a tiny socket buffer, flooded before its loop starts."""
    collector = Collector(
        Settings(
            db=db_path,
            listen=(("127.0.0.1", 0),),
            rcvbuf=4096,
            flush_interval=flush_interval,
            status_interval=3600.0,
            batch_receive=batch_receive,
        )
    )
    s = sender()
    for seq in range(3000):
        s.sendto(good("burst-1", seq), collector.addresses[0])
    thread = threading.Thread(target=collector.serve_forever, name="collector")
    thread.start()
    return collector, thread, s


def _stop(collector, thread, s):
    s.close()
    collector.shutdown()
    thread.join(10)
    collector.server_close()


@both_paths
def test_kernel_drops_from_ancillary_data_of_the_next_datagram(db_path, batch_receive):
    """SO_RXQ_OVFL: with no flush due, the drops arrive with the next datagram queued."""
    collector, thread, s = _flood_then_serve(db_path, flush_interval=3600.0, batch_receive=batch_receive)
    try:
        received = wait_for(lambda: collector.counters["received"], 5, what="the queued datagrams")
        assert 0 < received < 3000
        s.sendto(good("burst-1", 3000), collector.addresses[0])
        wait_for(
            lambda: collector.counters["received"] + collector.counters["kernel_drops"] == 3001,
            5,
            what="drops accounted",
        )
    finally:
        _stop(collector, thread, s)
    c = counters(db_path)
    assert c["kernel_drops"] > 0 and c["received"] + c["kernel_drops"] == 3001
    # The tracker sees the kernel's drops as a gap (it cannot tell who lost them).
    assert query(db_path, "SELECT lost FROM sensors") == [(c["kernel_drops"],)]


def test_kernel_drops_polled_at_flush_without_further_traffic(db_path):
    """SO_MEMINFO at each flush: drops at the end of a burst are counted without waiting."""
    collector, thread, s = _flood_then_serve(db_path, flush_interval=0.05)
    try:
        wait_for(
            lambda: counters(db_path).get("received", 0) + counters(db_path).get("kernel_drops", 0) == 3000,
            5,
            what="drops accounted in the database",
        )
    finally:
        _stop(collector, thread, s)
    c = counters(db_path)
    assert c["kernel_drops"] > 0 and c["received"] + c["kernel_drops"] == 3000
    (stored,) = query(db_path, "SELECT count(DISTINCT seq) FROM readings")[0]
    assert stored == c["received"]


def test_batch_size_flushes_before_the_interval(db_path):
    with running(db_path, flush_interval=3600.0, batch_size=10) as (collector, _):
        port = collector.addresses[0][1]
        s = sender()
        for seq in range(30):
            s.sendto(good("batch-1", seq), ("127.0.0.1", port))
        s.close()
        wait_for(lambda: query(db_path, "SELECT count(*) FROM readings")[0][0] >= 10, 5, what="a size-triggered flush")
        # Shutdown flushes what was read: on a loaded box the first flush can commit
        # (in the writer thread) before the loop has read the last datagrams.
        wait_for(lambda: collector.counters["received"] == 30, 5, what="30 received")
    assert query(db_path, "SELECT count(*) FROM readings") == [(60,)]  # and shutdown flushed the rest


@pytest.mark.parametrize(("interval", "steps"), [(0.0, 3), (3600.0, 1)])
def test_a_maintenance_step_follows_a_flush_at_most_once_per_interval(db_path, interval, steps):
    """Three size-triggered flushes: each is followed by a maintenance step (retention,
    budget, scrub) only once `maintain_interval` has passed since the last (0: every
    flush, as before; one hour: the first only).  The final flush takes none."""
    with running(db_path, flush_interval=3600.0, batch_size=10, maintain_interval=interval) as (collector, _):
        taken = []
        maintain = collector.store.maintain

        def counted(counters, now):
            taken.append(now)
            return maintain(counters, now)

        collector.store.maintain = counted  # the real step, counted
        port = collector.addresses[0][1]
        s = sender()
        for flush in range(3):
            for seq in range(5 * flush, 5 * flush + 5):  # 10 readings: a flush
                s.sendto(good("maint-1", seq), ("127.0.0.1", port))
            wait_for(lambda n=flush: counters(db_path).get("stored", 0) == 5 * (n + 1), 5, what="a flush")
        s.close()
        wait_for(lambda: not collector.writing, 5, what="the writer done")
        assert len(in_loop(collector, lambda: list(taken))) == steps


def test_shutdown_flushes_everything_accepted_and_notifies(db_path):
    with running(db_path, flush_interval=3600.0) as (collector, notes):
        port = collector.addresses[0][1]
        s = sender()
        for seq in range(50):
            s.sendto(good("bye-1", seq), ("127.0.0.1", port))
        s.close()
        wait_for(lambda: collector.counters["received"] == 50, 5, what="50 received")
        assert query(db_path, "SELECT count(*) FROM readings") == [(0,)]  # nothing flushed yet
    assert query(db_path, "SELECT count(*) FROM readings") == [(100,)]
    assert notes[0] == "READY=1" and notes[-1] == "STOPPING=1"
    assert "WATCHDOG=1" in notes


def test_ipv4_multicast_and_unicast_on_one_port_each_datagram_once(db_path):
    with running(db_path, multicast=(("239.77.2.1", None),), multicast_interface="127.0.0.1") as (collector, _):
        unicast, group = collector.addresses
        assert group == ("239.77.2.1", unicast[1])  # the group's port defaults to the first --listen port
        s = sender()
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
        for seq in range(20):
            s.sendto(good("mc-1", seq), group)
            s.sendto(good("uc-1", seq), unicast)
        s.close()
        wait_for(lambda: collector.counters["received"] >= 40, 5, what="40 received")
    c = counters(db_path)
    assert c["received"] == 40 and c["duplicates"] == 0 and c["stored"] == 40
    assert query(db_path, "SELECT sensor, datagrams FROM sensors ORDER BY sensor") == [("mc-1", 20), ("uc-1", 20)]


def test_ipv6_unicast_on_loopback(db_path):
    with running(db_path, listen=(("::1", 0),)) as (collector, _):
        (address,) = collector.addresses
        assert address[0] == "::1"
        s = sender(socket.AF_INET6)
        for seq in range(10):
            s.sendto(good("v6-1", seq, boot=None), ("::1", address[1]))
        s.close()
        # Summed in the loop's thread: a flush counts `stored` before it empties the pending batch.
        wait_for(
            lambda: in_loop(collector, lambda: collector.counters["stored"] + collector.core.pending_datagrams) >= 10,
            5,
            what="10 accepted",
        )
    assert query(db_path, "SELECT count(*), min(boot), max(boot) FROM readings") == [(20, -1, -1)]


@both_paths
def test_one_busy_socket_does_not_starve_another(db_path, batch_receive):
    settings = Settings(
        db=db_path,
        listen=(("127.0.0.1", 0), ("127.0.0.1", 0)),
        drain_budget=4,
        flush_interval=0.05,
        batch_receive=batch_receive,
    )
    collector = Collector(settings)
    busy, quiet = collector.addresses
    s = sender()
    for seq in range(250):  # both sockets are full before the loop starts (250 fit a stock buffer)
        s.sendto(good("busy-1", seq), busy)
    for seq in range(5):
        s.sendto(good("quiet-1", seq), quiet)
    s.close()
    with serving(collector):
        wait_for(lambda: collector.counters["received"] == 255, 10, what="255 received")
    seen = dict(
        (
            (sensor, (first, last))
            for sensor, first, last in query(db_path, "SELECT sensor, first_seen, last_seen FROM sensors")
        )
    )
    # 4 per wake: the quiet socket was served in the first rounds, not after 250 busy datagrams.
    assert seen["quiet-1"][1] < seen["busy-1"][1]
    assert query(db_path, "SELECT sensor, datagrams FROM sensors ORDER BY sensor") == [("busy-1", 250), ("quiet-1", 5)]


def test_status_line_reports_totals(db_path, caplog):
    caplog.set_level(logging.INFO, logger="collector")
    with running(db_path, status_interval=0.05) as (collector, _):
        s = sender()
        s.sendto(good("st-1", 1), collector.addresses[0])
        s.sendto(b"\xc1", collector.addresses[0])
        s.close()
        wait_for(
            lambda: any(
                "received 2 " in r.getMessage() and "rejected 1 not_msgpack=1" in r.getMessage() for r in caplog.records
            ),
            5,
            what="a status line with the totals",
        )


def test_nothing_to_listen_on_is_a_setup_error(db_path):
    with pytest.raises(SetupError, match="nothing to listen on"):
        Collector(Settings(db=db_path, listen=()))


def test_counters_are_cumulative_across_restarts(db_path):
    for round_ in range(2):
        with running(db_path) as (collector, _):
            s = sender()
            for seq in range(round_ * 10, round_ * 10 + 10):
                s.sendto(good("cum-1", seq), collector.addresses[0])
            s.sendto(b"\xc1", collector.addresses[0])
            s.close()
            wait_for(lambda: collector.counters["received"] == 11 * (round_ + 1), 5, what="received")
    c = counters(db_path)
    assert c["received"] == 22 and c["stored"] == 20 and c["rejected:not_msgpack"] == 2
    assert query(db_path, "SELECT datagrams, lost, restarts FROM sensors") == [(20, 0, 0)]


def fill_disk(collector: Collector) -> None:
    """Cap the database at the pages it has now, from the loop thread: the next flush finds the disk full."""
    conn = collector.store.conn
    full = threading.Event()

    def cap():
        collector._wait_for_writer()  # the connection is the writer thread's while it writes
        conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
        full.set()

    collector.call_soon(cap)
    wait_for(full.is_set, 5, what="the disk to fill")


def free_disk(collector: Collector) -> None:
    """Lift the cap again: space has returned."""
    conn = collector.store.conn
    collector.call_soon(lambda: (collector._wait_for_writer(), conn.execute("PRAGMA max_page_count = 1073741823")))


def test_disk_full_while_running_keeps_receiving_counts_drops_and_recovers(db_path, caplog):
    caplog.set_level(logging.INFO, logger="collector")
    with running(db_path, max_backlog_rows=60, batch_size=20) as (collector, _):
        fill_disk(collector)
        s = sender()
        # 1,200 readings, far more than the backlog and than the room left in the
        # pages the ingest log has (a flush of 10 datagrams adds ~250 bytes to it).
        send_paced(s, collector, [good("full-1", seq) for seq in range(600)], collector.addresses[0])
        wait_for(lambda: collector.counters["received"] == 600, 5, what="600 received")
        wait_for(lambda: collector.counters["storage_dropped"] > 0, 5, what="backlog overflow")
        # Read in the loop's thread at the end of a turn with no write in progress: the backlog
        # is trimmed after each flush attempt, and grows while one is in the writer thread.
        failing_since, pending = wait_for(
            lambda: in_loop(
                collector,
                lambda: None if collector.writing else (collector.store.failing_since, collector.core.pending_readings),
            ),
            10,
            what="a turn of the loop with no write in progress",
        )
        assert failing_since is not None
        assert pending <= 60

        free_disk(collector)
        wait_for(lambda: collector.store.failing_since is None, 10, what="recovery")
        s.sendto(good("full-1", 600), collector.addresses[0])  # and it goes on storing
        wait_for(lambda: collector.counters["received"] == 601, 5, what="601 received")
        s.close()
    c = counters(db_path)
    stored_rows = query(db_path, "SELECT count(*) FROM readings")[0][0]
    assert c["stored_readings"] == stored_rows
    assert stored_rows + c["storage_dropped"] == 1202
    assert c["stored"] * 2 == stored_rows
    assert query(db_path, "SELECT datagrams, readings, lost FROM sensors") == [(601, 1202, 0)]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("database or disk is full" in m for m in messages) == 1  # once per episode
    assert sum("writable again" in m for m in messages) == 1


def test_cardinality_guards_refuse_new_sensors_and_metrics_beyond_the_limits(db_path, caplog):
    caplog.set_level(logging.WARNING, logger="collector")
    with running(db_path, max_sensors=3, max_series_per_sensor=2) as (collector, _):
        s = sender()
        datagrams = [good(f"card-{i}", 1) for i in range(5)]  # 2 of these 5 sensors are one too many
        datagrams += [wire.encode("card-0", 2, {"temp": 1.0, "hum": 2.0, "extra": 3.0})]  # a third metric
        send_paced(s, collector, datagrams, collector.addresses[0])
        s.close()
        wait_for(lambda: collector.counters["received"] == 6, 5, what="6 received")
    c = counters(db_path)
    assert c["refused_sensors"] == 2 and c["refused_readings"] == 1
    assert c["stored"] == 4 and c["stored_readings"] == 8
    assert query(db_path, "SELECT sensor, datagrams, readings FROM sensors ORDER BY sensor") == [
        ("card-0", 2, 4),
        ("card-1", 1, 2),
        ("card-2", 1, 2),
    ]
    assert query(db_path, "SELECT count(*) FROM series") == [(6,)]
    text = caplog.text
    assert "refusing datagrams from new sensor card-3" in text and "MAX_SENSORS" in text
    assert "card-4" not in text  # rate-limited: one line per interval
    assert "refusing reading extra of sensor card-0" in text


def test_any_bytes_are_accounted_exactly_once_and_never_hit_a_bug(tmp_path):
    """Property: each datagram of a burst lands in exactly one account; internal_errors stays 0."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from collector.server import _Source

    valid = st.builds(
        lambda sensor, seq, boot, n: wire.encode(f"p-{sensor}", seq, {f"m{i}": float(i) for i in range(n)}, boot=boot),
        st.integers(0, 5),
        st.integers(0, 2**32 - 1),
        st.none() | st.integers(0, 3),
        st.integers(1, 4),
    )
    junk = st.binary(max_size=64) | st.sampled_from(list(JUNK.values()))
    collector = Collector(Settings(db=str(tmp_path / "p.db"), listen=(("127.0.0.1", 0),)))
    source = _Source(collector.endpoints[0])
    c = collector.counters

    def accounted():
        return (
            collector.core.pending_datagrams
            + c["duplicates"]
            + c["truncated"]
            + c["refused_sensors"]
            + c["internal_errors"]
            + sum(c[f"rejected:{r}"] for r in REJECT_REASONS)
        )

    @settings(max_examples=150)
    @given(st.lists(valid | junk, max_size=30))
    def check(burst):
        before = accounted()
        collector._process(list(burst), None, source, 1_700_000_000.0)
        assert accounted() - before == len(burst)
        assert c["internal_errors"] == 0

    try:
        check()
    finally:
        collector.server_close()


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_settings_refused_before_binding_leave_no_socket_open(db_path, tmp_path):
    from collector.errors import ConfigError

    before = _open_fds()
    # pytest.raises keeps the traceback, and with it the half-built Collector:
    # anything it left open is still open when we count.
    with pytest.raises(ConfigError, match="--require-auth needs --keys") as info:
        Collector(Settings(db=db_path, listen=(("127.0.0.1", 0),), require_auth=True))
    assert _open_fds() == before
    with pytest.raises(ConfigError, match="No such file") as info:
        Collector(Settings(db=db_path, listen=(("127.0.0.1", 0),), keys=str(tmp_path / "absent")))
    assert _open_fds() == before
    del info


def test_rejection_log_lines_resume_at_once_after_the_wall_clock_steps_back(db_path, caplog):
    """A gateway without an RTC may boot with a clock far ahead and be set
    back by NTP: the rate limit of log lines must not then stay shut for the
    size of the step (here a day)."""
    from collector.server import _Source

    caplog.set_level(logging.WARNING, logger="collector")
    collector = Collector(Settings(db=db_path, listen=(("127.0.0.1", 0),)))
    try:
        source = _Source(collector.endpoints[0])
        bad, peer = JUNK["bad_seq"], ("127.0.0.1", 40000)
        t = 1_800_000_000.0
        for now in (t, t + 1, t - 86_400, t - 86_399):
            collector._process([bad], [peer], source, now)
    finally:
        collector.server_close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected datagram")]
    assert len(lines) == 2, lines
    assert collector.counters["rejected:bad_seq"] == 4


def test_refusal_log_lines_resume_at_once_after_the_wall_clock_steps_back(db_path, caplog):
    from collector.server import _Source

    caplog.set_level(logging.WARNING, logger="collector")
    collector = Collector(Settings(db=db_path, listen=(("127.0.0.1", 0),), max_sensors=1))
    try:
        source = _Source(collector.endpoints[0])
        t = 1_800_000_000.0
        collector._process([good("only", 1)], None, source, t)
        for i, now in enumerate((t, t + 1, t - 86_400, t - 86_399)):
            collector._process([good(f"extra-{i}", 1)], None, source, now)
    finally:
        collector.server_close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refusing")]
    assert len(lines) == 2, lines
    assert collector.counters["refused_sensors"] == 4


def test_intervals_too_long_for_epoll_still_run_the_loop(db_path):
    """epoll takes at most 2**31-1 ms (24.8 days): a longer or infinite
    `flush-interval` and `status-interval` (TOML has `inf`) must not crash
    the loop on its first select()."""
    errors = []
    hook, threading.excepthook = threading.excepthook, errors.append
    try:
        with running(db_path, flush_interval=float("inf"), status_interval=30 * 86400.0, batch_size=2) as (c, _):
            s = sender()
            s.sendto(good("long-1", 1), c.addresses[0])  # 2 readings: a full batch
            s.close()
            wait_for(lambda: c.counters["stored"] == 1 or errors, 5, what="a flush by batch size")
    finally:
        threading.excepthook = hook
    assert errors == []
    assert counters(db_path)["stored_readings"] == 2


def test_the_last_line_says_so_when_this_run_dropped_readings(db_path):
    with running(db_path) as (collector, _):
        pass
    assert collector.stop_message() == (logging.INFO, "stopped cleanly; every accepted datagram is stored")

    with running(db_path, max_backlog_rows=60, batch_size=20) as (collector, _):
        fill_disk(collector)
        s = sender()
        send_paced(s, collector, [good("drop-1", seq) for seq in range(600)], collector.addresses[0])
        s.close()
        wait_for(lambda: collector.counters["storage_dropped"] > 0, 5, what="backlog overflow")
        free_disk(collector)
        wait_for(lambda: collector.store.failing_since is None, 10, what="recovery")
    assert collector.unflushed_at_exit == 0
    dropped = int(counters(db_path)["storage_dropped"])
    assert dropped > 0
    assert collector.stop_message() == (
        logging.WARNING,
        f"stopped; {dropped} readings of this run were dropped while the database refused writes "
        f"(storage_dropped); every other accepted datagram is stored",
    )

    with running(db_path) as (collector, _):  # the next run dropped nothing itself
        pass
    assert collector.stop_message()[0] == logging.INFO


def _queued_then_served(db_path, datagrams: int, **settings) -> list[int]:
    """Queue `datagrams` of one sensor before the loop starts (so its socket is empty
    only once all are read), serve them with a flush after every drain, and return
    the datagrams of each chunk the collector closed, oldest first.  Flushes and
    closes run in the loop's thread (writer_thread=False): with the writer thread
    the loop reads on during a flush, and the next flush brings whatever it read.
    The datagrams come at loopback speed, far over store.FAST_HEAD_RATE: the heads
    keep chunk_datagrams as their count (fast_head_factor=1), the rule under test here
    (a fast sensor's count is tests/test_store_v3.py's)."""
    collector = Collector(
        Settings(
            db=db_path, listen=(("127.0.0.1", 0),), batch_size=2, flush_interval=3600, fast_head_factor=1, **settings
        )
    )
    s = sender()
    for seq in range(datagrams):
        s.sendto(good("cont-1", seq), collector.addresses[0])
    s.close()
    with serving(collector):
        wait_for(lambda: collector.counters["stored"] == datagrams, 10, what=f"{datagrams} stored")
    c = counters(db_path)
    assert (c["received"], c["stored"], c["kernel_drops"]) == (datagrams, datagrams, 0)
    assert query(db_path, "SELECT datagrams, readings FROM sensors") == [(datagrams, 2 * datagrams)]
    return [n for (n,) in query(db_path, "SELECT datagrams FROM chunks ORDER BY id")]


@both_paths
def test_heads_close_between_drains_while_the_socket_is_never_empty(db_path, batch_receive):
    """Under continuous traffic the loop never finds its socket empty: a head at its
    count closes between drains (one per half a chunk received) while the queue is
    short, not in a flush at twice the count.  80 small datagrams fill a sixth of a
    stock socket buffer (425,984 bytes granted), under CLOSE_QUEUE_FILL_MAX."""
    chunks = _queued_then_served(
        db_path, 80, drain_budget=4, chunk_datagrams=16, batch_receive=batch_receive, writer_thread=False
    )
    # Closed at 16 plus at most half a chunk and a drain; a flush would have
    # waited for 32 (the first chunk then holds 32-35 datagrams).
    assert len(chunks) >= 2 and all(16 <= n <= 16 + 8 + 4 for n in chunks[:2]), chunks


def test_heads_wait_while_the_queue_is_long(db_path):
    """A long queue is read first: with 200 datagrams queued in a 300,000-byte buffer
    (~830 bytes each: over a third of it still full when the head reaches its count),
    no head closes between drains, and the flush closes it at twice the count."""
    chunks = _queued_then_served(db_path, 200, drain_budget=16, chunk_datagrams=64, rcvbuf=150_000, writer_thread=False)
    assert chunks and 128 <= chunks[0] <= 128 + 16, chunks


@pytest.mark.parametrize("writer_thread", [True, False], ids=["writer", "loop"])
def test_the_loop_reads_on_while_a_flush_waits_for_the_database(db_path, writer_thread):
    """Another connection holds the write lock: every flush waits for it (busy
    timeout) and is refused.  With the writer thread, the loop has read every
    datagram sent while a flush is still waiting: that flush is in the writer
    thread, not in the loop.  In the loop's own thread (writer_thread=False) it
    never is: the check fails, as it did before the writer thread."""
    with running_collector(db_path, writer_thread=writer_thread) as (c, _notes):
        s = sender()
        for seq in range(5):
            s.sendto(good("lock-1", seq), c.addresses[0])
        wait_for(lambda: counters(db_path).get("stored") == 5, 10, what="5 stored")
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            for seq in range(5, 25):
                s.sendto(good("lock-1", seq), c.addresses[0])

            def reading_while_writing():
                return in_loop(c, lambda: (c.writing, int(c.counters["received"])), timeout=5) == (True, 25)

            if writer_thread:
                wait_for(reading_while_writing, 10, what="all 25 read while a flush waits in the writer thread")
            else:
                with pytest.raises(AssertionError, match="timed out"):
                    wait_for(reading_while_writing, 2, what="never: the loop itself waits")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
            s.close()
        wait_for(lambda: counters(db_path).get("stored") == 25, 10, what="25 stored once the lock is gone")
    c = counters(db_path)
    assert (c["received"], c["stored"], c["stored_readings"], c["kernel_drops"]) == (25, 25, 50, 0)
    assert query(db_path, "SELECT datagrams, readings, lost FROM sensors") == [(25, 50, 0)]


def test_a_stalled_write_bounds_what_the_loop_holds(db_path, caplog):
    """The writer thread's flush does not come back (a stalled disk: here its
    store.write waits on an event before it writes for real).  The loop reads
    until max_backlog_rows readings wait, then reads nothing more: the rest stays
    in the socket's buffer, not in this process.  Once the write is back every
    datagram is read and stored, none dropped.  Without the hold the loop read
    all 200 while the write was out (pending 400 readings)."""
    caplog.set_level(logging.WARNING, logger="collector")
    release = threading.Event()
    with running_collector(
        db_path, max_backlog_rows=40, batch_size=10, drain_budget=4, rcvbuf=1 << 20, flush_interval=3600.0
    ) as (c, _notes):
        real_write = c.store.write

        def stalled_write(job):
            release.wait(20)
            return real_write(job)

        c.store.write = stalled_write
        s = sender()
        try:
            for seq in range(200):  # 2 readings each
                s.sendto(good("stall-1", seq), c.addresses[0])
            wait_for(lambda: c.holding_reads, 10, what="the loop to hold its reads for the writer")
            # The first flush took the first batch; the loop read on until 40 readings
            # waited, plus at most one drain (4 datagrams, 8 readings).
            assert 40 <= c.core.pending_readings <= 40 + 8, c.core.pending_readings
            assert c.counters["received"] <= 20 + 4, c.counters["received"]
        finally:
            release.set()
            s.close()
        wait_for(lambda: counters(db_path).get("stored") == 200, 10, what="200 stored once the write is back")
    assert "is not done and" in caplog.text and "reading nothing until it is" in caplog.text
    c = counters(db_path)
    assert (c["received"], c["stored"], c["stored_readings"], c["kernel_drops"], c["storage_dropped"]) == (
        200,
        200,
        400,
        0,
        0,
    )


def test_the_cli_collector_serves_with_a_short_gil_switch_interval(db_path):
    """switch_interval (the CLI's setting, tuning.WRITER_SWITCH_INTERVAL_S): set while
    the loop serves, so it waits at most that long for the GIL from its writer
    thread; the interpreter's own interval is back once it stops."""
    import sys

    from collector import tuning

    before = sys.getswitchinterval()
    assert before != tuning.WRITER_SWITCH_INTERVAL_S
    with running(db_path, switch_interval=tuning.WRITER_SWITCH_INTERVAL_S) as (collector, notes):
        wait_for(lambda: "READY=1" in notes, 5, what="the loop to start")
        assert sys.getswitchinterval() == tuning.WRITER_SWITCH_INTERVAL_S
    assert sys.getswitchinterval() == before
    with running(db_path) as (collector, notes):  # embedders: left alone by default
        wait_for(lambda: "READY=1" in notes, 5, what="the loop to start")
        assert sys.getswitchinterval() == before


def test_the_cli_collector_serves_with_a_higher_gc_threshold(db_path):
    """gc_threshold (the CLI's setting, tuning.GC_THRESHOLD0): gc's youngest generation
    is collected at that many new containers while the loop serves, not Python's 700
    (a flush's young objects live until its transaction ends); the thresholds are back
    once it stops, and embedders' are left alone."""
    import gc

    from collector import tuning

    before = gc.get_threshold()
    assert before[0] != tuning.GC_THRESHOLD0
    with running(db_path, gc_threshold=tuning.GC_THRESHOLD0) as (collector, notes):
        wait_for(lambda: "READY=1" in notes, 5, what="the loop to start")
        assert gc.get_threshold() == (tuning.GC_THRESHOLD0, *before[1:])
    assert gc.get_threshold() == before
    with running(db_path) as (collector, notes):
        wait_for(lambda: "READY=1" in notes, 5, what="the loop to start")
        assert gc.get_threshold() == before


def test_the_cli_collector_freezes_what_start_up_built(db_path):
    """freeze_gc (the CLI's setting): gen-2 collections skip the objects alive at start."""
    import gc

    assert gc.get_freeze_count() == 0
    try:
        with running(db_path, freeze_gc=True) as (collector, notes):
            wait_for(lambda: "READY=1" in notes, 5, what="the loop to start")
            wait_for(lambda: gc.get_freeze_count() > 0, 5, what="gc.freeze()")
    finally:
        gc.unfreeze()
    with running(db_path) as (collector, notes):  # embedders: the setting is off by default
        wait_for(lambda: "READY=1" in notes, 5, what="the loop to start")
    assert gc.get_freeze_count() == 0
