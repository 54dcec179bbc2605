"""The disk budget (issue 9): a run that writes 3x --max-disk ends with the file at or under it.

Feeds the realistic workload (bench/workload.py: 20 sensors x 5 metrics at
1 Hz, the full day by default) through the real ingest core and store with a
disk budget (`max_disk`, what `--max-disk` sets), one flush per second of data
and one maintenance step after each, as the collector runs them.  After every
flush it takes the file's size as the operator sees it (os.stat of the
database plus its -wal), and prints the largest seen, the size at the end,
the bytes written against the budget, the readings dropped (budget_dropped),
and checks what must survive: every sensor's accounts (datagrams and readings
as sent, nothing lost), readings kept + budget_dropped = readings stored, and
that nothing was called network loss.  Exit 1 if a check fails.

    .venv/bin/python bench/disk_budget.py                         # the day, 4 MB budget
    .venv/bin/python bench/disk_budget.py --seconds 21600 --max-disk 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.workload import Workload  # noqa: E402
from collector import ingestlog, schema, wire  # noqa: E402
from collector.store import open_ingest  # noqa: E402
from query.ops import Ops  # noqa: E402
from query.protocol import parse_request  # noqa: E402


def file_size(path: str) -> int:
    """What `ls -l` shows: the database file and its WAL."""
    wal = path + "-wal"
    return os.stat(path).st_size + (os.stat(wal).st_size if os.path.exists(wal) else 0)


def kept_readings(path: str) -> int:
    """Readings still stored: in closed chunks, and in the open heads (log rows after each head's last chunk)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")
        n = int(conn.execute("SELECT total(count) FROM chunk_series").fetchone()[0])
        closed = {(s, b): i for s, b, i in conn.execute("SELECT sensor, boot, max(log_id) FROM chunks GROUP BY 1, 2")}
        after = 0
        while entries := list(ingestlog.read_after(conn, after, 200)):
            for entry in entries:
                for g in entry.groups:
                    boot = schema.NO_BOOT if g.boot is None else g.boot
                    if closed.get((g.sensor, boot), 0) < entry.id:
                        n += sum(v is not None for values in g.metrics.values() for v in values)
            after = entries[-1].id
        conn.execute("COMMIT")
        return n
    finally:
        conn.close()


def ask(path: str, op: str):
    ops = Ops(schema.open_reader(path))
    try:
        return ops.run(parse_request(json.dumps({"op": op}).encode()))
    finally:
        ops.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[-1])
    ap.add_argument("--sensors", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=86400, help="seconds of the workload (default the day)")
    ap.add_argument("--max-disk", type=int, default=4_000_000, help="the budget in bytes (default 4,000,000)")
    args = ap.parse_args()
    w = Workload(sensors=args.sensors, seconds=args.seconds, seed=1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "budget.db")
        store, core = open_ingest(path, store_options={"max_disk": args.max_disk})
        largest = 0
        over = 0
        flushes = 0
        sent = {s: 0 for s in w.sensor_ids()}
        started = time.monotonic()
        next_flush = None

        def flush(now: float) -> None:
            nonlocal largest, over, flushes
            assert store.flush(core, now)
            store.maintain(core.counters, now)
            size = file_size(path)
            largest = max(largest, size)
            over += size > args.max_disk
            flushes += 1

        for dg in w.datagrams():
            if next_flush is None:
                next_flush = dg.received + 1.0
            if dg.received >= next_flush:
                flush(next_flush)
                next_flush += 1.0
            core.receive(wire.encode(dg.sensor, dg.seq, dg.readings, boot=dg.boot, ts=dg.ts), dg.received)
            sent[dg.sensor] += 1
        flush(next_flush or 0.0)
        elapsed = time.monotonic() - started
        stored = int(core.counters["stored_readings"])
        dropped = int(core.counters["budget_dropped"])
        store.close()
        end = file_size(path)
        kept = kept_readings(path)
        stats = ask(path, "stats")
        sensors = ask(path, "sensors")
        # What the same readings take without a budget: the bytes a budget-less file would hold,
        # estimated from what is kept (bytes per reading kept) times all readings stored.
        written_x = stored / max(kept, 1) * end / args.max_disk
        print(
            f"workload: {args.sensors} sensors x {args.seconds} s = {stored} readings stored "
            f"(fed in {elapsed:.0f} s, {flushes} flushes, each followed by a maintenance step)"
        )
        print(
            f"budget {args.max_disk} bytes: file (os.stat of the database + -wal) largest after any flush "
            f"{largest} ({largest / args.max_disk:.3f} of the budget; {over} of {flushes} flushes ended over it), "
            f"at the end {end} ({end / args.max_disk:.3f})"
        )
        print(
            f"readings kept {kept}, budget_dropped {dropped}: kept + dropped = {kept + dropped} of {stored} stored; "
            f"written ~{written_x:.1f}x the budget"
        )
        ok_accounts = all(
            (s["datagrams"], s["readings"], s["lost"]) == (sent[s["sensor"]], 5 * sent[s["sensor"]], 0) for s in sensors
        )
        print(
            f"accounts: {len(sensors)} sensors, datagrams/readings as sent and lost 0: {ok_accounts}; "
            f"stats: budget_dropped {stats['budget_dropped']}, lost {stats['lost']}, "
            f"storage_dropped {stats['storage_dropped']}"
        )
        failed = []
        if end > args.max_disk:
            failed.append("the file ended over the budget")
        if kept + dropped != stored:
            failed.append("kept + budget_dropped != stored")
        if not ok_accounts or len(sensors) != args.sensors:
            failed.append("a sensor's accounts are not as sent")
        if stats["lost"] or stats["storage_dropped"] or stats["budget_dropped"] != dropped:
            failed.append("the budget's deletions show as loss, or stats disagree")
        if written_x < 3:
            failed.append(f"the run wrote only {written_x:.1f}x the budget: raise --seconds or lower --max-disk")
        print("FAILED: " + "; ".join(failed) if failed else "ok: at or under the budget, every account intact")
        if failed:
            sys.exit(1)


if __name__ == "__main__":
    main()
