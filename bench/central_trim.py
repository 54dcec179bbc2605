"""What forgetting uplink_seen rows costs a central retention step (collector/uplink/central.py `_forget_seen`).

A central database with a retention gets a payload-2 gateway's backlog (10
sensors x 7,000 datagrams of 2 readings, --rows rows of 1,000 datagrams), its
heads closed into chunks; then one retention step (Central.maintain) deletes
them, as it does once they are older than `retain`.  Timed in turn, on fresh
copies, --pairs times: the step as landed (each deleted chunk's datagrams'
uplink_seen rows deleted with it) and the same step with the hook switched off
(the rows kept, as before).  CPU of the step (the writer's thread does it, between
transactions), and what it deleted.

    .venv/bin/python bench/central_trim.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from collector import ingestlog  # noqa: E402
from collector.uplink import core  # noqa: E402
from collector.uplink.central import Central  # noqa: E402

from helpers import db_query  # noqa: E402

NOW = 1000.0
DAY = 86400.0


def group(sensor: str, seqs: range) -> ingestlog.Group:
    s = list(seqs)
    return ingestlog.Group(
        sensor,
        1,
        s,
        [NOW + q for q in s],
        [NOW + q + 0.5 for q in s],
        {"temp": [float(q) for q in s], "hum": [50.0 + q for q in s]},
    )


def messages(n_rows: int) -> list[core.Message]:
    blocks = []
    for i in range(n_rows):
        gs = [group(f"s{k}", range(i * 100, i * 100 + 100)) for k in range(10)]
        body = ingestlog.encode_body(gs)
        datagrams, readings = ingestlog.counts(gs)
        blocks.append(core.Block(i + 1, datagrams, readings, body, len(zlib.decompress(body))))
    return core.columns_messages("telemetry", "site-8", blocks)


def step(path: str, msgs: list[core.Message], forget: bool) -> tuple[float, int, int]:
    c = Central(path, 0, retain=2 * DAY)
    try:
        for m in msgs:
            c.apply([core.decode(m.payload)], now=NOW)
        c.apply([], now=NOW + DAY)  # the heads are past their span: chunks
        c.apply([], now=NOW + DAY)  # and the log rows trimmed
        if not forget:
            c.store.maintenance.on_expire = None
        count = "SELECT (SELECT count(*) FROM chunks), (SELECT count(*) FROM uplink_seen)"
        ((chunks, seen),) = db_query(path, count)
        started = time.process_time()
        c.maintain(now=NOW + 3 * DAY)
        cpu = time.process_time() - started
        ((chunks_after, seen_after),) = db_query(path, count)
    finally:
        c.close()
    return cpu, chunks - chunks_after, seen - seen_after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=70)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    msgs = messages(args.rows)
    with tempfile.TemporaryDirectory(prefix="central-trim-") as tmp:
        for pair in range(args.pairs):
            for forget in (False, True):
                path = os.path.join(tmp, f"{pair}-{forget}.db")
                cpu, chunks, rows = step(path, msgs, forget)
                what = "forgetting" if forget else "keeping   "
                print(
                    f"pair {pair} {what}: {cpu * 1000:6.1f} ms of CPU, {chunks} chunks and {rows:,} uplink_seen rows deleted"
                )


if __name__ == "__main__":
    main()
