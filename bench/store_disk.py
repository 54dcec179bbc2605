"""Storage v3 on the realistic day: bytes on disk per reading, the whole file included.

Feeds the workload of bench/workload.py (20 sensors x 5 metrics at 1 Hz,
quantized values; lane CODEC's generator) through the real ingest core and
store (one flush per second of data, as the collector would), into a real
SQLite file, then reports the file's size (after a WAL checkpoint) per
reading, and per table (dbstat when SQLite has it).  The v2 row store gets the
same datagrams in the same run (tests/v2ref.py) as the baseline.

    .venv/bin/python bench/store_disk.py                  # the full day with the v2 baseline (~10 minutes)
    .venv/bin/python bench/store_disk.py --no-v2          # the full day, v3 only (~2 minutes)
    .venv/bin/python bench/store_disk.py --seconds 21600  # a quarter day
    .venv/bin/python bench/store_disk.py --influx         # and InfluxDB 1.6 on the same day (+~5 minutes)
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
    ap.add_argument(
        "--influx",
        action="store_true",
        help="also write the day to InfluxDB 1.6 (bench/disk.py: TSM fully compacted) and print the ratio",
    )
    ap.add_argument("--sample", type=int, default=8, help="per metric kind: re-encode every Nth chunk (default 8)")
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
        sizes = tables(v3_path)
        free = v3_bytes - sum(sizes.values())
        for name, size in sizes.items():
            print(f"  {name:24s} {size:>12d} bytes  {size / readings:.3f} B/reading")
        if sizes:
            print(f"  {'(free pages, WAL)':24s} {free:>12d} bytes  {free / readings:.3f} B/reading")
        per_kind(v3_path, readings, v3_bytes, args.sample)
        if args.influx:
            from bench.disk import influx_figures  # noqa: PLC0415

            got = influx_figures(w, {"day": False}, 3600)["day"]
            per_value = got["per_value"]
            print(
                f"InfluxDB 1.6 (same values, TSM fully compacted, same run): {per_value:.2f} bytes per value; "
                f"this file {v3_bytes / readings:.3f} B/reading = {v3_bytes / readings / per_value:.3f} of it "
                f"({per_value / (v3_bytes / readings):.1f}x smaller, seq and receive times included here, not there)"
            )
        if v2 is not None:
            v2.close()
            v2_bytes = file_bytes(os.path.join(d, "v2.db"))
            print(
                f"v2 file (baseline, same run): {v2_bytes} bytes = {v2_bytes / readings:.2f} bytes/reading; "
                f"v3/v2 = {v3_bytes / v2_bytes:.3f}"
            )


def per_kind(path: str, readings: int, total: int, sample: int) -> None:
    """Bytes per reading of each metric kind: its columns in the chunks and its minute blocks.

    A metric's share of a chunk is the chunk's size minus the size of the same
    chunk encoded without that metric (bench/disk.py's method), over every
    `sample`-th chunk and scaled to all; its minute blocks are counted exactly.
    What no one metric owns (seq, ts and received columns, chunk rows and
    statistics, hour rollups, the log, free pages) is printed apart.
    """
    from collector.chunkenc import decode_chunk, encode_chunk  # noqa: PLC0415

    conn = sqlite3.connect(path)
    try:
        counts = dict(
            conn.execute(
                "SELECT s.metric, total(cs.count) FROM chunk_series cs JOIN series s ON s.id = cs.series GROUP BY 1"
            )
        )
        minutes = dict(
            conn.execute(
                "SELECT s.metric, total(length(b.blob)) FROM rollup_1m_blocks b JOIN series s ON s.id = b.series"
                " GROUP BY 1"
            )
        )
        share = dict.fromkeys(counts, 0)
        sampled = all_bytes = 0
        for i, (blob,) in enumerate(conn.execute("SELECT blob FROM chunks ORDER BY id")):
            all_bytes += len(blob)
            if i % sample:
                continue
            sampled += len(blob)
            seqs, ts, received, metrics = decode_chunk(blob)
            for name in metrics:
                rest = {k: v for k, v in metrics.items() if k != name}
                share[name] += len(blob) - len(encode_chunk(seqs, ts, received, rest))
    finally:
        conn.close()
    scale = all_bytes / max(sampled, 1)
    print(f"per metric kind (chunk columns from every {sample}th chunk, scaled; minute blocks exact):")
    owned = 0.0
    for name, n in counts.items():
        col = share[name] * scale
        mins = minutes.get(name, 0)
        owned += col + mins
        print(
            f"  {name:10s} {n:>10.0f} readings in chunks: columns {col / n:.3f} + minute blocks {mins / n:.3f}"
            f" = {(col + mins) / n:.3f} B/reading"
        )
    print(
        f"  shared (seq, ts, received columns, chunk and statistics rows, hour rollups, log, free pages): "
        f"{(total - owned) / readings:.3f} B/reading of the whole file's {total / readings:.3f}"
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
