"""Storage v3 against v2: the same datagrams, the same queries, the same answers.

The differential test feeds one random stream of datagrams (loss, duplicates,
reordering, restarts by boot and by seq reset, seq wraparound, stuck clocks,
missing ts, late data older than a closed chunk) through the ingest core, and
writes every flush twice: into the v3 store (real file) and into the frozen
v2 row store (tests/v2ref.py, another real file).  Collector restarts reopen
the v3 store and rebuild the core from it (a clean stop, or a crash that loses
the unflushed batch on both sides alike).  Then random queries go to both
`Ops` and every answer is compared: exactly, except aggregate sums (float
addition in another order: equal to 1e-9 relative).
"""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3

import pytest

from collector import schema, wire
from collector.ingest import IngestCore
from collector.store import open_ingest
from query.ops import Ops
from query.protocol import RequestError, parse_request

import v2ref

T0 = 1_700_000_000.0


def request(**params):
    return parse_request(json.dumps(params).encode())


class Pair:
    """The v3 store (with its ingest core) and the v2 reference writer, fed the same flushes."""

    def __init__(self, tmp_path, chunk_datagrams: int, chunk_span: float, between: bool = False) -> None:
        self.v3_path = str(tmp_path / "v3.db")
        self.v2_path = str(tmp_path / "v2.db")
        self.options = {"chunk_datagrams": chunk_datagrams, "chunk_span": chunk_span, "close_between_flushes": between}
        self.store, self.core = open_ingest(self.v3_path, store_options=self.options)
        self.v2 = v2ref.BatchWriter(self.v2_path)

    def receive(self, data: bytes, now: float):
        return self.core.receive(data, now)

    def flush(self, now: float) -> None:
        batch = self.core.batch()
        v2 = self.v2
        v2.rows = []
        for sensor, boot, seq, ts, received, readings in batch.datagrams:
            ids = self.core.sensors[sensor].series
            b = schema.NO_BOOT if boot is None else boot
            v2.rows += [(ids[name], ts, b, seq, value, received) for name, value in readings.items()]
        v2.dirty = set(batch.dirty)
        v2._new_series = list(batch.new_series)
        v2._pending_gaps = dict(batch.gaps)
        v2.counters = dict(self.core.counters)
        v2.pending_datagrams = len(batch.datagrams)
        assert v2.flush(now)
        assert self.store.flush(self.core, now)

    def restart(self, crash: bool) -> None:
        if crash:
            self.core.discard_pending()  # the unflushed batch dies with the process, on both sides
        self.store.close()
        self.store, self.core = open_ingest(self.v3_path, store_options=self.options)

    def close(self) -> None:
        self.store.close()
        self.v2.close()


def stream(rng: random.Random) -> list[tuple]:
    """(sensor, boot, seq, ts, readings) in send order, faults applied."""
    out = []
    for n in range(rng.randint(2, 4)):
        sensor = f"s{n}"
        has_boot = rng.random() < 0.7
        clock = rng.choice(["normal", "normal", "stuck", "none"])
        if clock == "stuck" and not has_boot:
            has_boot = True  # a boot-less reset under a stuck clock would repeat keys (v2 drops those)
        boot = rng.randrange(2**32) if has_boot else None
        seq = rng.choice([0, rng.randrange(2**32), 2**32 - rng.randint(1, 20)])
        metrics = rng.sample(["t", "h", "p", "v"], rng.randint(1, 3))
        period = rng.choice([1.0, 0.5, 10.0])
        base = T0 + rng.uniform(-100, 100)
        stuck = T0 + 5.0
        for i in range(rng.randint(20, 90)):
            if rng.random() < 0.03:  # a restart
                if has_boot:
                    boot = (boot + 1) % 2**32
                seq = rng.randint(0, 3)
                if not has_boot:
                    base += 10_000.0  # a new stream, new times: keys never repeat
            ts = {"normal": base + i * period + rng.choice([0.0, 0.001, 0.123]), "stuck": stuck, "none": None}[clock]
            readings = {}
            for m in metrics:
                if rng.random() < 0.85:
                    readings[m] = rng.choice(
                        [
                            round(rng.uniform(-50, 50), 2),
                            rng.randint(-1000, 1000),
                            -0.0,
                            0.0,
                            1e-310,
                            rng.random() * 1e300,
                            2**53 + 1,
                            0.1,
                        ]
                    )
            if not readings:
                readings[metrics[0]] = 1.5
            out.append((sensor, boot, seq, ts, readings))
            seq = (seq + 1) % 2**32
    # Interleave the sensors at random, each in its own send order.
    by_sensor: dict[str, list] = {}
    for d in out:
        by_sensor.setdefault(d[0], []).append(d)
    queues = [list(reversed(v)) for v in by_sensor.values()]
    out = []
    while queues:
        q = rng.choice(queues)
        out.append(q.pop())
        if not q:
            queues.remove(q)
    faulty = []
    for d in out:
        r = rng.random()
        if r < 0.05:
            continue  # lost
        faulty.append(d)
        if r < 0.10:
            faulty.append(d)  # duplicated
    for _ in range(len(faulty) // 15):  # reordered, some far: late data older than a closed chunk
        i = rng.randrange(len(faulty))
        j = min(len(faulty) - 1, i + rng.choice([1, 2, 5, 40]))
        faulty.insert(j, faulty.pop(i))
    return faulty


def compare(a, b, path="") -> None:
    """Equal, with aggregate sums and averages to 1e-9 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (path, a, b)
        for k in a:
            if k in ("sum", "avg") and isinstance(a[k], float):
                assert math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-6), (path + "." + k, a, b)
            else:
                compare(a[k], b[k], path + "." + k)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{path}[{i}]")
    else:
        assert a == b and type(a) is type(b), (path, a, b)


def queries(rng: random.Random, sensors: dict[str, list[str]]) -> list[dict]:
    out: list[dict] = [{"op": "sensors"}, {"op": "latest"}, {"op": "gaps"}, {"op": "stats"}]
    for sensor, metrics in sensors.items():
        out.append({"op": "latest", "sensor": sensor})
        out.append({"op": "gaps", "sensor": sensor})
        for metric in metrics + [None]:
            if metric:
                out.append({"op": "latest", "sensor": sensor, "metric": metric})
            for _ in range(3):
                q = {
                    "op": "readings",
                    "sensor": sensor,
                    "limit": rng.choice([1, 3, 7, 50, 1000]),
                    "order": rng.choice(["asc", "desc"]),
                }
                if metric:
                    q["metric"] = metric
                if rng.random() < 0.5:
                    q["since"] = T0 + rng.uniform(-200, 300)
                if rng.random() < 0.5:
                    q["until"] = T0 + rng.uniform(-100, 10_500)
                out.append(q)
            if metric:
                for bucket in (1, 7.5, 60, 120, 3600, 7200):
                    q = {"op": "aggregate", "sensor": sensor, "metric": metric, "bucket": bucket}
                    if rng.random() < 0.5:
                        q["since"] = rng.choice([T0 - 3600 * 2, T0 + rng.uniform(-100, 100), T0 - 120])
                    if rng.random() < 0.5:
                        q["until"] = rng.choice([T0 + 3600 * 4, T0 + rng.uniform(0, 400), T0 + 60])
                    out.append(q)
    return out


def answer(ops, req):
    try:
        return ops.run(req)
    except RequestError as exc:  # refusals must agree too
        return {"error": exc.code, "message": exc.message}


def run_pages(ops, q: dict) -> list:
    """Every page of a readings query (following cursors), or one answer."""
    if q["op"] != "readings":
        return [answer(ops, request(**q))]
    pages = []
    cursor = None
    for _ in range(500):
        page = answer(ops, request(**q, cursor=cursor) if cursor else request(**q))
        pages.append(page)
        cursor = page.get("next")
        if cursor is None:
            break
    return pages


between: dict[int, int] = {}  # heads closed between flushes per seed


@pytest.mark.parametrize("seed", range(int(os.environ.get("V3_DIFF_SEEDS", "6"))))
def test_v3_answers_every_query_as_v2_does(tmp_path, seed):
    rng = random.Random(seed)
    # Odd seeds close heads between flushes as the collector's loop does (close_one),
    # at random moments drawn apart from the stream's own draws.
    closer = random.Random(seed + 1000) if seed % 2 else None
    pair = Pair(tmp_path, rng.choice([4, 8, 16]), rng.choice([30.0, 1e9]), between=closer is not None)
    now = T0
    try:
        for sensor, boot, seq, ts, readings in stream(rng):
            now += rng.choice([0.01, 0.3, 1.0])
            pair.receive(wire.encode(sensor, seq, readings, boot=boot, ts=ts), now)
            if rng.random() < 0.15:
                pair.flush(now)
            if closer is not None and pair.store.full and closer.random() < 0.3:
                if pair.store.close_one():  # as the loop does while its sockets are empty
                    between[seed] = between.get(seed, 0) + 1
            if rng.random() < 0.01:
                crash = rng.random() < 0.5
                if not crash:
                    pair.flush(now)
                pair.restart(crash)
        pair.flush(now + 1)
        assert pair.store.chunks_closed or pair.store.heads  # both paths exercised over the seeds
        assert closer is None or between.get(seed, 0) > 0
        sensors = {s: sorted(st.series) for s, st in pair.core.sensors.items()}
    finally:
        pair.close()
    closed = sqlite3.connect(pair.v3_path).execute("SELECT count(*) FROM chunks").fetchone()[0]
    assert closed > 0  # some readings are in chunks, some (usually) in heads
    v2_ops = v2ref.Ops(schema_v2_reader(pair.v2_path))
    v3_ops = Ops(schema.open_reader(pair.v3_path))
    try:
        check_answers(v2_ops, v3_ops, queries(rng, sensors))
    finally:
        v2_ops.close()
        v3_ops.close()


def check_answers(v2_ops, v3_ops, qs) -> None:
    for q in qs:
        expected = run_pages(v2_ops, q)
        got = run_pages(v3_ops, q)
        if q["op"] == "stats":  # v3 has more counters
            got = [{k: v for k, v in got[0].items() if k in expected[0]}]
        if q["op"] == "sensors":  # and the sensor health fields (issue 11), not in the frozen v2 ops
            got = [[{k: v for k, v in row.items() if k in ref} for row, ref in zip(got[0], expected[0])]]
        compare(got, expected, json.dumps(q))


@pytest.mark.parametrize("seed", range(int(os.environ.get("V3_DIFF_SEEDS", "6"))))
def test_a_long_lived_reader_answers_as_v2_after_every_flush(tmp_path, seed):
    """One reader kept open while the collector writes, as a query-server worker is: its open
    heads follow the log and the chunks incrementally (heads trimmed as chunks close, also
    by span in a flush with no new log row, between flushes on odd seeds), and it answers
    as v2 after each flush."""
    rng = random.Random(1000 + seed)
    closer = random.Random(seed + 2000) if seed % 2 else None
    pair = Pair(
        tmp_path,
        chunk_datagrams=rng.choice([4, 8, 16]),
        chunk_span=rng.choice([3.0, 30.0, 1e9]),
        between=closer is not None,
    )
    v2_ops = v2ref.Ops(schema_v2_reader(pair.v2_path))
    v3_ops = Ops(schema.open_reader(pair.v3_path))
    now = T0
    checks = 0
    try:
        for sensor, boot, seq, ts, readings in stream(rng):
            now += rng.choice([0.01, 0.3, 1.0])
            pair.receive(wire.encode(sensor, seq, readings, boot=boot, ts=ts), now)
            if rng.random() < 0.15:
                pair.flush(now)
                if rng.random() < 0.2:
                    pair.flush(now + 5.0)  # nothing new: heads may close by span alone
                if closer is not None and pair.store.full and closer.random() < 0.5:
                    pair.store.close_one()  # as the collector's loop does while its sockets are empty
                if pair.core.sensors and rng.random() < 0.4:
                    sensors = {s: sorted(st.series) for s, st in pair.core.sensors.items()}
                    check_answers(v2_ops, v3_ops, rng.sample(queries(rng, sensors), 6))
                    checks += 1
            if rng.random() < 0.01:
                crash = rng.random() < 0.5
                if not crash:
                    pair.flush(now)
                pair.restart(crash)
        pair.flush(now + 1)
        sensors = {s: sorted(st.series) for s, st in pair.core.sensors.items()}
        check_answers(v2_ops, v3_ops, queries(rng, sensors))
        assert checks > 3
    finally:
        v2_ops.close()
        v3_ops.close()
        pair.close()


def schema_v2_reader(path: str) -> sqlite3.Connection:
    from urllib.parse import quote

    return sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, check_same_thread=False)


def test_negative_zero_and_wide_ints_come_back_as_stored(tmp_path):
    """Every float64 reading comes back bit-exact, from a head and from a chunk (issue 13 item 8)."""
    path = str(tmp_path / "z.db")
    store, core = open_ingest(path, store_options={"chunk_datagrams": 2})
    values = [-0.0, 5e-324, 0.1, -1.7976931348623157e308, float(2**53 + 2)]
    try:
        for seq, v in enumerate(values):
            core.receive(wire.encode("z", seq, {"v": v}, boot=1, ts=T0 + seq), T0 + seq)
            assert store.flush(core, T0 + seq)
    finally:
        store.close()
    ops = Ops(schema.open_reader(path))
    try:
        rows = ops.run(request(op="readings", sensor="z"))["rows"]
        assert [r["value"].hex() for r in rows] == [v.hex() for v in values]
        assert math.copysign(1.0, rows[0]["value"]) == -1.0
        assert ops.run(request(op="latest", sensor="z"))[0]["value"] == values[-1]
        chunks = ops.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        assert chunks == 2  # four readings in chunks, one in the open head
    finally:
        ops.close()


def test_a_v2_database_migrates_in_place_and_answers_as_before(tmp_path, caplog):
    """The same random stream written by v2 only, converted on open: every query answers as v2 did."""
    import logging
    import shutil

    rng = random.Random(99)
    v2_path = str(tmp_path / "before.db")
    writer = v2ref.BatchWriter(v2_path)
    core = IngestCore()
    now = T0
    for sensor, boot, seq, ts, readings in stream(rng) + stream(rng):
        now += 0.5
        core.receive(wire.encode(sensor, seq, readings, boot=boot, ts=ts), now)
    batch = core.batch()
    for sensor, boot, seq, ts, received, readings in batch.datagrams:
        ids = core.sensors[sensor].series
        b = schema.NO_BOOT if boot is None else boot
        writer.rows += [(ids[name], ts, b, seq, value, received) for name, value in readings.items()]
    writer.dirty = set(batch.dirty)
    writer._new_series = list(batch.new_series)
    writer._pending_gaps = dict(batch.gaps)
    writer.counters = dict(core.counters)
    writer.pending_datagrams = len(batch.datagrams)
    assert writer.flush(now)
    writer.close()
    v3_path = str(tmp_path / "after.db")
    shutil.copy(v2_path, v3_path)
    total = sqlite3.connect(v2_path).execute("SELECT count(*) FROM readings").fetchone()[0]
    caplog.set_level(logging.INFO, logger="collector.schema")
    schema.open_writer(v3_path).conn.close()
    assert f"migrated {total} readings to storage v3 chunks" in caplog.text
    v3 = sqlite3.connect(v3_path)
    assert v3.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(schema.SCHEMA_VERSION),)
    assert v3.execute("SELECT count(*) FROM sqlite_master WHERE name = 'readings'").fetchone() == (0,)
    assert v3.execute("SELECT total(count) FROM chunk_series").fetchone()[0] == total
    assert v3.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental, for retention
    v3.close()
    sensors = {s: sorted(st.series) for s, st in core.sensors.items()}
    v2_ops = v2ref.Ops(schema_v2_reader(v2_path))
    v3_ops = Ops(schema.open_reader(v3_path))
    try:
        check_answers(v2_ops, v3_ops, queries(rng, sensors))
    finally:
        v2_ops.close()
        v3_ops.close()


def test_heads_that_fill_together_close_over_several_flushes_within_the_budget(tmp_path):
    """20 sensors in step reach the chunk count in the same flush: a flush closes
    the oldest due heads up to the datagrams it brings plus CLOSE_FLOOR_CHUNKS
    chunks, the rest in the next flushes; nothing is lost or stored twice."""
    from collector.store import CLOSE_FLOOR_CHUNKS

    path = str(tmp_path / "spread.db")
    store, core = open_ingest(path, store_options={"chunk_datagrams": 8})
    sensors, per_flush = 20, 2  # each flush brings 40 datagrams; the budget is 40 + 4 x 8
    closed_per_flush = []
    try:
        now = T0
        for f in range(12):
            for seq in range(f * per_flush, (f + 1) * per_flush):
                for i in range(sensors):
                    now += 0.001
                    core.receive(wire.encode(f"s{i:02d}", seq, {"v": float(seq)}, boot=1, ts=now), now)
            before = store.chunks_closed
            assert store.flush(core, now)
            closed_per_flush.append(store.chunks_closed - before)
        budget = sensors * per_flush + 8 * CLOSE_FLOOR_CHUNKS  # 72 datagrams
        # Flush 4 brings all 20 heads to 8 datagrams: the 9 oldest close (9 x 8 = 72),
        # then 8 of 10 datagrams, then the last 3; the first nine are due again at flush 8.
        assert budget == 72
        assert closed_per_flush == [0, 0, 0, 9, 8, 3, 0, 9, 8, 3, 0, 9]
        total_in_heads = sum(len(h) for h in store.heads.values())
        conn = sqlite3.connect(path)
        in_chunks = conn.execute("SELECT sum(datagrams) FROM chunks").fetchone()[0]
        conn.close()
        assert in_chunks + total_in_heads == 12 * per_flush * sensors == core.counters["stored"]
    finally:
        store.close()


def test_heads_close_with_the_fast_transform_choice_only_above_the_rate(tmp_path):
    """Over FAST_CLOSE_RATE datagrams/s a chunk is encoded with chunkenc's fast=True,
    under it with the full search: each stored blob is what that choice makes."""
    from collector import chunkenc
    from collector.store import FAST_CLOSE_RATE

    rng = random.Random(3)
    blobs = {}
    for label, per_second in (("slow", FAST_CLOSE_RATE // 2), ("fast", FAST_CLOSE_RATE * 2)):
        path = str(tmp_path / f"{label}.db")
        store, core = open_ingest(path, store_options={"chunk_datagrams": 600})
        try:
            now = T0
            core.receive(wire.encode("other", 0, {"v": 1.0}, boot=1, ts=now), now)
            assert store.flush(core, now)  # the rate is known from the second flush on
            for flush in range(3):
                for i in range(per_second // 10):  # a tenth of a second's datagrams per flush
                    value = round(rng.gauss(20, 3), 2)
                    core.receive(wire.encode("s", flush * 10_000 + i, {"v": value}, boot=1, ts=now), now)
                now += 0.1
                assert store.flush(core, now)
        finally:
            store.close()
        conn = sqlite3.connect(path)
        blobs[label] = [row[0] for row in conn.execute("SELECT blob FROM chunks ORDER BY id")]
        conn.close()
        assert blobs[label]
    for label, fast in (("slow", False), ("fast", True)):
        for blob in blobs[label]:
            columns = chunkenc.decode_chunk(blob)
            assert chunkenc.encode_chunk(*columns, fast=fast) == blob
            assert chunkenc.encode_chunk(*columns, fast=not fast) != blob  # the choice shows


def _chunk_sizes(path: str) -> dict[str, list[int]]:
    conn = sqlite3.connect(path)
    try:
        sizes: dict[str, list[int]] = {}
        for sensor, datagrams in conn.execute("SELECT sensor, datagrams FROM chunks ORDER BY id"):
            sizes.setdefault(sensor, []).append(datagrams)
        return sizes
    finally:
        conn.close()


@pytest.mark.parametrize("between", [False, True], ids=["in-flushes", "between-flushes"])
def test_a_fast_sensors_heads_close_at_fast_head_factor_times_the_count(tmp_path, between):
    """With fast_head_factor (the collector's), a sensor sending over FAST_HEAD_RATE datagrams
    a second has its heads closed at that many times the count, one under it at the count;
    a sensor that slows down is due at the count again.  Without it (the default) every head
    closes at the count.  Nothing is lost or stored twice."""
    from collector.store import FAST_HEAD_RATE

    path = str(tmp_path / "fast.db")
    store, core = open_ingest(
        path, store_options={"chunk_datagrams": 8, "fast_head_factor": 4, "close_between_flushes": between}
    )
    fast_gap, slow_gap = 0.5 / FAST_HEAD_RATE, 2.0 / FAST_HEAD_RATE  # 1,000/s and 250/s of receive time
    try:
        now = T0
        for seq in range(40):
            now += fast_gap
            core.receive(wire.encode("fast", seq, {"v": float(seq)}, boot=1, ts=now), now)
            core.receive(
                wire.encode("slow", seq, {"v": float(seq)}, boot=1, ts=T0 + seq * slow_gap), T0 + seq * slow_gap
            )
            if seq % 4 == 3:
                assert store.flush(core, max(now, T0 + seq * slow_gap))
                while between and store.close_one():  # as the loop does while its sockets are empty
                    pass
        assert _chunk_sizes(path) == {"slow": [8, 8, 8, 8, 8], "fast": [32]}
        assert len(store.heads[("fast", 1)]) == 8
        # The fast sensor pauses: its head is slower than the rate now, so due at the count.
        now += 1.0
        core.receive(wire.encode("fast", 40, {"v": 40.0}, boot=1, ts=now), now)
        assert store.flush(core, now)
        while between and store.close_one():
            pass
        assert _chunk_sizes(path) == {"slow": [8, 8, 8, 8, 8], "fast": [32, 9]}
        assert core.counters["stored"] == 81
    finally:
        store.close()
    store, core = open_ingest(path, store_options={"chunk_datagrams": 8, "close_between_flushes": between})
    try:
        now += 1.0
        for seq in range(41, 49):  # fast again, but this writer never lets a head grow
            now += fast_gap
            core.receive(wire.encode("fast", seq, {"v": float(seq)}, boot=1, ts=now), now)
        assert store.flush(core, now)
        while between and store.close_one():
            pass
        assert _chunk_sizes(path)["fast"] == [32, 9, 8]
    finally:
        store.close()
