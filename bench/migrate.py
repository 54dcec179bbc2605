"""Migration figure (issue 9): a version-2 database of 10 M readings converted in place, timed.

Builds a v2 file (tests/v2ref.py's schema: one `readings` row per reading,
WITHOUT ROWID) from the realistic workload (bench/workload.py: 20 sensors x 5
quantized metrics at 1 Hz, as many seconds as --readings needs), with the
sensors' accounts and counters a v2 collector leaves; then opens it as the
collector does (collector/schema.open_writer), which converts every reading
into chunks, the minute blocks and hour rollups, drops `readings` and
compacts the file once.  The progress lines the collector logs are printed
as they come (with the time since the start), then the figures: total time,
readings per second, the conversion and the compaction apart, file sizes
before and after, and a check that every reading arrived (chunk_series
counts against the v2 row count).  Building the v2 file is not timed.

    .venv/bin/python bench/migrate.py                      # 10 M readings (the issue's figure)
    .venv/bin/python bench/migrate.py --readings 1000000   # quicker
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.workload import METRICS, Workload  # noqa: E402
from collector import schema  # noqa: E402

INSERT = "INSERT INTO readings (series, ts, boot, seq, value, received) VALUES (?, ?, ?, ?, ?, ?)"


def build_v2(path: str, sensors: int, seconds: int) -> int:
    """A v2 database of the workload; returns the readings written."""
    import v2ref  # noqa: PLC0415

    db = v2ref.open_v2(path)
    conn = db.conn
    w = Workload(sensors=sensors, seconds=seconds, seed=1)
    total = 0
    sid = 0
    for sensor in w.sensor_ids():
        ids = {}
        conn.execute("BEGIN")
        for metric in METRICS:
            sid += 1
            ids[metric] = sid
            conn.execute("INSERT INTO series (id, sensor, metric) VALUES (?, ?, ?)", (sid, sensor, metric))
        rows = []
        first = last = None
        n = 0
        for r in w.rows(sensor):
            first = r.received if first is None else first
            last = r.received
            n += 1
            for metric, value in r.readings.items():
                rows.append((ids[metric], r.ts, r.boot, r.seq, float(value), r.received))
            if len(rows) >= 100_000:
                conn.executemany(INSERT, rows)
                total += len(rows)
                rows = []
        conn.executemany(INSERT, rows)
        total += len(rows)
        conn.execute(
            "INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings) VALUES (?, ?, ?, ?, ?)",
            (sensor, first, last, n, n * len(METRICS)),
        )
        conn.execute("COMMIT")
    conn.executemany(
        "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
        [("received", total // len(METRICS)), ("stored", total // len(METRICS)), ("stored_readings", total)],
    )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return total


def size(path: str) -> int:
    return sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))


class Progress(logging.Handler):
    """Prints the collector's migration log lines as they come, with the time since the start."""

    def __init__(self, started: float) -> None:
        super().__init__()
        self.started = started
        self.marks: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic() - self.started
        text = record.getMessage()
        for mark in ("migrated", "compacting", "compacted"):
            if text.startswith(mark) or text.startswith("database " + mark):
                self.marks[mark] = now
        print(f"  [{now:6.1f} s] {text}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Example: .venv/bin/python bench/migrate.py --readings 1000000"
    )
    ap.add_argument("--readings", type=int, default=10_000_000, help="size of the v2 database (default 10,000,000)")
    ap.add_argument("--sensors", type=int, default=20)
    ap.add_argument("--dir", help="where to build the files (default: a temporary directory)")
    args = ap.parse_args()
    if args.readings < len(METRICS) * args.sensors or args.sensors < 1:
        ap.error("--readings must be at least 5 per sensor, --sensors at least 1")
    seconds = args.readings // (args.sensors * len(METRICS))
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "v2.db")
        t = time.monotonic()
        total = build_v2(path, args.sensors, seconds)
        before = size(path)
        print(
            f"built a v2 database: {total} readings ({args.sensors} sensors x {len(METRICS)} metrics x {seconds} s), "
            f"{before / 1e6:.1f} MB, in {time.monotonic() - t:.0f} s (not timed)",
            flush=True,
        )
        log = logging.getLogger("collector.schema")
        log.setLevel(logging.INFO)
        started = time.monotonic()
        progress = Progress(started)
        log.addHandler(progress)
        cpu0 = time.process_time()
        schema.open_writer(path).conn.close()
        took = time.monotonic() - started
        cpu = time.process_time() - cpu0
        log.removeHandler(progress)
        conn = sqlite3.connect(path)
        moved = conn.execute("SELECT total(count) FROM chunk_series").fetchone()[0]
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        conn.close()
        after = size(path)
        converted = progress.marks.get("migrated", took)
        print(
            f"converted in place in {took:.1f} s ({took / 60:.1f} min; CPU {cpu:.1f} s): "
            f"{total / took:,.0f} readings/s overall; the conversion {converted:.1f} s "
            f"({total / max(converted, 1e-9):,.0f} readings/s), the one-time compaction {took - converted:.1f} s"
        )
        print(
            f"file {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB (schema version {version}); "
            f"readings in chunks {int(moved)} of {total}: {'all there' if int(moved) == total else 'MISSING READINGS'}"
        )
        if int(moved) != total:
            sys.exit(1)


if __name__ == "__main__":
    main()
