"""Heads closed by worker processes (closer.py): the same chunks as the writer makes, every
reading readable at every commit, and a worker or a writer killed loses and doubles nothing."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import zlib

import pytest
from uplinkgw import readings

from collector import ingestlog
from collector.uplink import closer, core
from collector.uplink.central import Central

from helpers import db_query, wait_for

SENSORS = [f"s{i}" for i in range(6)]
BUDGET = 6 * 1024  # bytes of open heads: a few rows' worth, so heads close every few transactions


def rows(count: int, start: int = 1) -> list[list[ingestlog.Group]]:
    """Gateway log rows: each sensor 1-3 datagrams a row, two metrics (one absent now and then)."""
    out = []
    seq = {s: 0 for s in SENSORS}
    for r in range(1, start + count):
        groups = []
        for i, s in enumerate(SENSORS):
            n = 1 + (r + i) % 3
            seqs = list(range(seq[s] + 1, seq[s] + 1 + n))
            seq[s] += n
            ts = [1000.0 + r + k / 4 for k in range(n)]
            hum = [None if (q + i) % 7 == 0 else 40.0 + q / 10 for q in seqs]
            metrics = {"temp": [20.0 + q / 100 for q in seqs]}
            if any(v is not None for v in hum):
                metrics["hum"] = hum
            groups.append(ingestlog.Group(s, 1, seqs, ts, [t + 0.5 for t in ts], metrics))
        if r >= start:
            out.append(groups)
    return out


def message(row: list[ingestlog.Group], row_id: int) -> core.Blocks:
    body = ingestlog.encode_body(row)
    datagrams, n = ingestlog.counts(row)
    block = core.Block(row_id, datagrams, n, body, len(zlib.decompress(body)))
    (m,) = core.columns_messages("telemetry", "site-7", [block], origin="ab01")
    return core.decode(m.payload)


def readings_of(row_list) -> int:
    return sum(ingestlog.counts(r)[1] for r in row_list)


def chunks(path: str) -> list[tuple]:
    return db_query(path, "SELECT sensor, boot, log_id, datagrams, crc, blob FROM chunks ORDER BY sensor, boot, log_id")


def writer_only(path: str, data) -> list[tuple]:
    c = Central(path, 0, BUDGET)
    try:
        for i, row in enumerate(data, 1):
            c.apply([message(row, i)], now=5000.0 + i)
    finally:
        c.close()
    return chunks(path)


def test_heads_closed_by_a_worker_make_the_writers_chunks_and_every_reading_stays_readable(tmp_path):
    data = rows(40)
    want = writer_only(str(tmp_path / "writer.db"), data)
    assert len(want) >= 20  # the budget closes heads all along
    path = str(tmp_path / "workers.db")
    c = Central(path, 1, BUDGET)
    total = 0
    log_rows_seen = []
    try:
        for i, row in enumerate(data, 1):
            done = c.apply([message(row, i)], now=5000.0 + i)
            total += readings_of([row])
            assert done["uplink_readings"] == readings_of([row])
            # committed: every reading readable (in a chunk or, closed and not yet inserted, in the log)
            assert len(readings(path)) == total
            log_rows_seen.append(db_query(path, "SELECT count(*) FROM ingest_log")[0][0])
        assert c.store.closed_later or chunks(path)  # chunks came in later transactions
        closer = c.closer
    finally:
        c.close()  # inserts what is still out
    assert closer.closed_here == 0 and closer.deaths == 0
    assert chunks(path) == want  # the same chunks, bytes and log ids
    assert (
        len(readings(path))
        == total
        == db_query(path, "SELECT value FROM counters WHERE name = 'uplink_readings'")[0][0]
    )
    assert max(log_rows_seen) < 40  # rows whose chunks were inserted were trimmed


def worker_pids(c: Central) -> list[int]:
    wait_for(lambda: c.closer.pids(), 30, 0.01, what="a close worker to start")
    return c.closer.pids()


def test_a_close_worker_killed_costs_nothing_the_writer_closes_its_heads(tmp_path, caplog):
    data = rows(40)
    want = writer_only(str(tmp_path / "writer.db"), data)
    path = str(tmp_path / "workers.db")
    c = Central(path, 1, BUDGET)
    kills = 0
    try:
        with caplog.at_level(logging.WARNING, logger="uplink.consume"):
            for i, row in enumerate(data, 1):
                c.apply([message(row, i)], now=5000.0 + i)
                if i in (10, 25) and c.closer.pool is not None:
                    for pid in worker_pids(c):
                        os.kill(pid, signal.SIGKILL)
                        kills += 1
        closer = c.closer
    finally:
        c.close()
    assert kills == 2
    assert closer.deaths == 2 and closer.closed_here > 0
    assert chunks(path) == want
    assert len(readings(path)) == readings_of(data)
    assert caplog.text.count("a worker process died") == 2


def test_the_writer_killed_with_chunks_not_yet_inserted_loses_and_doubles_nothing(tmp_path):
    data = rows(40)
    path = str(tmp_path / "workers.db")
    c = Central(path, 1, BUDGET)
    for i, row in enumerate(data[:17], 1):
        c.apply([message(row, i)], now=5000.0 + i)
    assert c.store.closed_later  # closed heads whose chunks are not in the database
    # as a kill -9 leaves it: the connection gone, nothing settled
    c.closer.shutdown()
    c.store.close()
    assert len(readings(path)) == readings_of(data[:17])
    again = Central(path, 1, BUDGET)
    try:
        # the gateway sends rows 10.. again (its position was behind): dropped by range
        for i, row in enumerate(data[9:], 10):
            again.apply([message(row, i)], now=6000.0 + i)
    finally:
        again.close()
    assert len(readings(path)) == readings_of(data)
    got = db_query(path, "SELECT name, value FROM counters WHERE name LIKE 'uplink_%readings'")
    assert dict(got) == {
        "uplink_readings": readings_of(data),
        "uplink_replayed_readings": readings_of(data[9:17]),
        "uplink_expired_readings": 0,  # no retention
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_settle_writes_out_what_the_workers_closed(tmp_path, workers):
    path = str(tmp_path / "c.db")
    c = Central(path, workers, BUDGET)
    try:
        for i, row in enumerate(rows(12), 1):
            c.apply([message(row, i)], now=5000.0 + i)
        c.settle()
        assert not c.store.closed_later
        n = len(chunks(path))
        assert n > 0
    finally:
        c.close()
    assert len(chunks(path)) == n


def test_a_close_worker_does_not_outlive_a_kill_9_of_its_writer(tmp_path):
    """The worker holds the writer's descriptors (forked): it must end with the writer."""
    code = (
        "import sys, time\n"
        "from collector.chunkstore import Head\n"
        "from collector.uplink.closer import Closer\n"
        "c = Closer(1)\n"
        "h = Head('a', 1, 1, 0.0)\n"
        "h.extend([1], [1.0], [1.5], {'t': [2.0]})\n"
        "assert c([h], False).rows()[0].datagrams == 1\n"
        "print(c.pids()[0], flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(proc.stdout.readline())
        assert alive(worker)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    wait_for(lambda: not alive(worker), 10, 0.01, what=f"worker {worker} to end with its writer")


def test_a_sigterm_to_a_worker_before_its_initializer_waits_for_it_and_never_reaches_the_writer():
    """A worker is forked with the writer's SIGTERM handler and asyncio's wake-up fd, which its
    initializer (_die_with_parent) undoes.  A SIGTERM sent to it before then (the pool sends one
    to every worker when a sibling dies) must not run the writer's handler in the fork, which
    writes into the writer's wake-up fd: the writer's loop took it as its own SIGTERM and the
    consumer stopped (seen in CI).  Here the initializer is held 1 s (the window, opened wide)
    and the worker is sent SIGTERM inside it: the worker dies of it once its handlers are
    undone, the writer closes the head itself, and the writer's handler never runs."""
    code = (
        "import asyncio, json, os, signal, time\n"
        "from collector.chunkstore import Head\n"
        "from collector.uplink import closer\n"
        "undo = closer._die_with_parent\n"
        "def held():\n"
        "    time.sleep(1.0)\n"
        "    undo()\n"
        "closer._die_with_parent = held\n"
        "def alive(pid):\n"
        "    try:\n"
        "        with open(f'/proc/{pid}/stat') as f:\n"
        "            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'\n"
        "    except OSError:\n"
        "        return False\n"
        "async def main():\n"
        "    got = []\n"
        "    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, got.append, 'SIGTERM')\n"
        "    c = closer.Closer(1)\n"
        "    h = Head('a', 1, 1, 0.0)\n"
        "    h.extend([1], [1.0], [1.5], {'t': [2.0]})\n"
        "    pending = c([h], False)\n"
        "    (worker,) = c.pids()\n"
        "    os.kill(worker, signal.SIGTERM)\n"
        "    deadline = time.monotonic() + 20\n"
        "    while alive(worker) and not got and time.monotonic() < deadline:\n"
        "        await asyncio.sleep(0.01)\n"
        "    for _ in range(5):\n"
        "        await asyncio.sleep(0)  # a byte in the wake-up fd is read and its handler run\n"
        "    rows = pending.rows()\n"
        "    out = dict(got=got, worker_alive=alive(worker), datagrams=rows[0].datagrams, here=c.closed_here)\n"
        "    c.shutdown()\n"
        "    print(json.dumps(out), flush=True)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"got": [], "worker_alive": False, "datagrams": 1, "here": 1}, done.stderr


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class NoPool(closer.Closer):
    """A host where the pool cannot start (no /dev/shm for its semaphores, say)."""

    def _pool(self):
        raise PermissionError(13, "Permission denied", "/dev/shm/sem.mp-x")


def test_workers_that_cannot_start_leave_the_closing_to_the_writer_said_once(tmp_path, caplog):
    data = rows(30)
    want = writer_only(str(tmp_path / "writer.db"), data)
    path = str(tmp_path / "noworkers.db")
    c = Central(path, 0, BUDGET)
    c.closer = c.store.close_later = NoPool(1)
    try:
        with caplog.at_level(logging.WARNING, logger="uplink.consume"):
            for i, row in enumerate(data, 1):
                c.apply([message(row, i)], now=5000.0 + i)
        assert c.closer.unavailable and c.closer.closed_here > 0
    finally:
        c.close()
    assert chunks(path) == want
    assert caplog.text.count("cannot start worker processes") == 1
