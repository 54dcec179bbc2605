"""telemetry-query export's pace and memory: one series of N readings paged out over TLS.

Builds a database (one sensor, one metric, N readings, plain executemany through
collector.schema), serves it with an in-process QueryServer (trustme certificates),
and writes the export (CSV, ISO times) to a sink that discards, with several page
sizes.  Prints rows/s per page size, beside the same rows read with one SELECT on
a read-only sqlite3 connection in this process (the baseline; ratio = export time /
baseline time), and tracemalloc's peak during an export against what holding every
row would take.

    .venv/bin/python bench/export.py [--rows 200000] [--pages 1000,5000,10000]
"""

from __future__ import annotations

import argparse
import io
import sqlite3
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trustme  # noqa: E402

from collector.schema import NO_BOOT, open_reader, open_writer  # noqa: E402
from query import export  # noqa: E402
from query.client import QueryClient  # noqa: E402
from query.ops import Ops  # noqa: E402
from query.server import QueryServer, Service, server_context  # noqa: E402

T0 = 1_764_000_000.0


class Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


def build(path: str, rows: int) -> None:
    db = open_writer(path)
    with db.conn as conn:
        conn.execute("INSERT INTO series (id, sensor, metric) VALUES (1, 'bench', 'v')")
        conn.executemany(
            "INSERT INTO readings (series, ts, boot, seq, value, received) VALUES (1, ?, ?, ?, ?, ?)",
            ((T0 + i * 0.5, NO_BOOT, i, 20 + (i % 1000) / 100, T0 + i * 0.5) for i in range(rows)),
        )
        conn.execute(
            "INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings, lost, duplicates,"
            " reordered, restarts, tracker) VALUES ('bench', ?, ?, ?, ?, 0, 0, 0, 0, '{}')",
            (T0, T0 + rows * 0.5, rows, rows),
        )
    db.conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--pages", default="1000,5000,10000")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="export-bench-"))
    db = str(work / "bench.db")
    build(db, args.rows)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(work / "s.pem"))
    cert.private_key_pem.write_to_path(str(work / "s.key"))
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    server = QueryServer(
        server_context(str(work / "s.pem"), str(work / "s.key")),
        ("127.0.0.1", 0),
        Service(lambda: Ops(open_reader(db)), 2),
    )
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        start = time.perf_counter()
        baseline_rows = len(
            conn.execute("SELECT ts, boot, seq, value FROM readings WHERE series = 1 ORDER BY ts, boot, seq").fetchall()
        )
        baseline = time.perf_counter() - start
        conn.close()
        print(
            f"{args.rows} readings; baseline: one SELECT of {baseline_rows} rows on sqlite3 directly: "
            f"{baseline:.2f} s ({baseline_rows / baseline:,.0f} rows/s)"
        )
        with QueryClient("localhost", server.server_address[1], ca=str(work / "ca.pem")) as client:

            def run(page: int) -> tuple[int, float]:
                start = time.perf_counter()
                writer = export.Writer(Discard(), "csv", iso=True)
                for rows in export.pages(
                    client.request, ["bench"], metric=None, since=None, until=None, page_rows=page
                ):
                    writer.write_page(rows)
                return writer.rows, time.perf_counter() - start

            for page in (int(p) for p in args.pages.split(",")):
                count, elapsed = run(page)
                tracemalloc.start()  # a second pass for memory: tracing slows the first one's clock
                run(page)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                print(
                    f"page {page:>6}: {count} rows in {elapsed:.2f} s = {count / elapsed:,.0f} rows/s "
                    f"(x{elapsed / baseline:.0f} the baseline), peak traced {peak / 1e6:.1f} MB "
                    "(client and in-process server)"
                )
            tracemalloc.start()
            held = [
                r
                for rows in export.pages(
                    client.request, ["bench"], metric=None, since=None, until=None, page_rows=10_000
                )
                for r in rows
            ]
            print(f"holding all {len(held)} rows instead: {tracemalloc.get_traced_memory()[0] / 1e6:.1f} MB traced")
            tracemalloc.stop()
    finally:
        server.shutdown()
        thread.join(10)


if __name__ == "__main__":
    main()
