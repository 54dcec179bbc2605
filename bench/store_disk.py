"""Storage v3 on the realistic day: bytes on disk per reading, the whole file included.

Feeds the workload of bench/workload.py (20 sensors x 5 metrics at 1 Hz,
quantized values; lane CODEC's generator) through the real ingest core and
store (one flush per second of data, as the collector would), into a real
SQLite file, then reports the file's size (after a WAL checkpoint) per
reading, and per table (dbstat when SQLite has it).  The v2 row store gets the
same datagrams in the same run (tests/v2ref.py) as the baseline.

    .venv/bin/python bench/store_disk.py                  # the full day (a few minutes)
    .venv/bin/python bench/store_disk.py --seconds 21600  # a quarter day
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from collector import schema, wire  # noqa: E402
from collector.store import open_ingest  # noqa: E402


def load_workload():
    try:
        from bench.workload import Workload  # noqa: PLC0415
    except ImportError:
        sys.exit("bench/workload.py (lane CODEC's realistic-day generator) is missing: land it first")
    return Workload


def file_bytes(path: str) -> int:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    wal = path + "-wal"
    return os.path.getsize(path) + (os.path.getsize(wal) if os.path.exists(wal) else 0)


def tables(path: str) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"))
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sensors", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=86400)
    ap.add_argument("--no-v2", action="store_true", help="skip the v2 baseline (it is slow and large)")
    args = ap.parse_args()
    Workload = load_workload()
    w = Workload(sensors=args.sensors, seconds=args.seconds, seed=1)
    with tempfile.TemporaryDirectory() as d:
        v3_path = os.path.join(d, "v3.db")
        store, core = open_ingest(v3_path)
        v2 = None
        if not args.no_v2:
            import v2ref

            v2 = v2ref.BatchWriter(os.path.join(d, "v2.db"))
        started = time.monotonic()
        readings = datagrams = 0
        next_flush = None
        for dg in w.datagrams():
            if next_flush is None:
                next_flush = dg.received + 1.0
            if dg.received >= next_flush:
                flush(store, core, v2, next_flush)
                next_flush += 1.0
            core.receive(wire.encode(dg.sensor, dg.seq, dg.readings, boot=dg.boot, ts=dg.ts), dg.received)
            readings += len(dg.readings)
            datagrams += 1
        flush(store, core, v2, next_flush or 0.0)
        elapsed = time.monotonic() - started
        store.close()
        v3_bytes = file_bytes(v3_path)
        print(
            f"workload: {args.sensors} sensors x {args.seconds} s: {datagrams} datagrams, {readings} readings "
            f"(fed in {elapsed:.0f} s)"
        )
        print(
            f"v3 file: {v3_bytes} bytes = {v3_bytes / readings:.3f} bytes/reading (everything in the file: "
            f"chunks, open heads' log, rollups, sensors, gaps, counters)"
        )
        for name, size in tables(v3_path).items():
            print(f"  {name:24s} {size:>12d} bytes  {size / readings:.3f} B/reading")
        if v2 is not None:
            v2.close()
            v2_bytes = file_bytes(os.path.join(d, "v2.db"))
            print(
                f"v2 file (baseline, same run): {v2_bytes} bytes = {v2_bytes / readings:.2f} bytes/reading; "
                f"v3/v2 = {v3_bytes / v2_bytes:.3f}"
            )


def flush(store, core, v2, now: float) -> None:
    if v2 is not None:
        batch = core.batch()
        v2.rows = []
        for sensor, boot, seq, ts, received, readings in batch.datagrams:
            ids = core.sensors[sensor].series
            b = schema.NO_BOOT if boot is None else boot
            v2.rows += [(ids[n], ts, b, seq, v, received) for n, v in readings.items()]
        v2.dirty = set(batch.dirty)
        v2._new_series = list(batch.new_series)
        v2._pending_gaps = dict(batch.gaps)
        v2.counters = dict(core.counters)
        v2.pending_datagrams = len(batch.datagrams)
        assert v2.flush(now)
    assert store.flush(core, now)
    assert store.maintain(core.counters, now)  # as the collector does after each flush


if __name__ == "__main__":
    main()
