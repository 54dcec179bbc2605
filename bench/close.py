"""Chunk close microbenchmark: the CPU of one Head.close, in process.

A collector at ingest rates closes a head every chunk_datagrams (1,024)
datagrams with the codec's `fast` choice (store.FAST_CLOSE_RATE), so the
close is part of each datagram's cost.  This times `Head.close(fast)` of
heads of 2 and 5 metrics (and `chunkstore.close_heads` of the same heads
when asked), process CPU time, the median of several repeats, and prints
milliseconds per close and microseconds per datagram.  Two shapes of data:

- realistic: ms-jittered sensor times, values quantized like devices
  (0.01, 0.1, 0.01, 0.001 and an integer counter), receive times at 1 us;
- ingest: what bench/ingest.py sends (one sensor time and the same values
  in every datagram of a sensor), receive times at 1 us;
- seconds: bench/ingest_core.py's (the same values, the sensor time one
  second further each datagram: a head spans 17 minutes, so its minute
  blocks have ~18 rows, as with many sensors at 1 Hz).

`--against DIR` times another checkout's code (DIR's collector package,
with DIR/.venv/bin/python) in turn with this one, `--pairs` times, so the
ratio comes from one run on a shared box.

    .venv/bin/python bench/close.py
    .venv/bin/python bench/close.py --rows 256 1024 4096 --together
    flock /work/bench.lock .venv/bin/python bench/close.py --against /work/main --pairs 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("temp", "hum", "press", "volt", "count")
SHAPES = ("realistic", "ingest", "seconds")


def make_head(Head, shape: str, rows: int, metrics: int, sensor: int, rnd: random.Random, name: int | None = None):
    """One head of `rows` datagrams of `metrics` metrics, as the collector's flushes fill it
    (`name`: the sensor it belongs to, when not `sensor`)."""
    head = Head(f"bench-{sensor if name is None else name:04d}", 1, 1, 1.7e9)
    t0 = 1_700_000_000.0 + sensor
    seqs = list(range(1000 * sensor, 1000 * sensor + rows))
    received = [round(t0 + 0.5 + i * 0.0008 + rnd.random() * 1e-4, 6) for i in range(rows)]
    if shape in ("ingest", "seconds"):  # bench/ingest.py: one ts and the same readings in every datagram
        ts = [t0] * rows if shape == "ingest" else [t0 + i for i in range(rows)]
        values = {"temp": 21.53, "hum": 40.2, "press": 1013.25, "volt": 3.712, "count": 123456.0}
        cols = {k: [values[k]] * rows for k in NAMES[:metrics]}
    else:
        ts = [round(t0 + i * 0.001 + rnd.random() * 2e-4, 3) for i in range(rows)]
        cols = {
            "temp": [round(21 + rnd.random(), 2) for _ in range(rows)],
            "hum": [round(40 + rnd.random() * 5, 1) for _ in range(rows)],
            "press": [round(1013 + rnd.random(), 2) for _ in range(rows)],
            "volt": [round(3.3 + rnd.random() * 0.01, 3) for _ in range(rows)],
            "count": [float(1000 * sensor + i) for i in range(rows)],
        }
        cols = {k: cols[k] for k in NAMES[:metrics]}
    head.extend(seqs, ts, received, cols)
    return head


def measure(
    root: Path, rows_list: list[int], heads: int, repeat: int, together: bool, fast: bool, shapes: list[str]
) -> list[dict]:
    sys.path.insert(0, str(root))
    from collector import chunkstore
    from collector.chunkstore import Head, close_heads

    # The store's memory of each sensor's last choices (Head.close's hints), where the code has it.
    hints = chunkstore.CloseHints() if fast and hasattr(chunkstore, "CloseHints") else None
    args = (fast, hints) if hints is not None else (fast,)

    out = []
    for shape in shapes:
        for metrics in (2, 5):
            for rows in rows_list:
                rnd = random.Random(rows * 10 + metrics)
                # Each sensor's heads in turn, each of its own values (a sensor's successive heads).
                sensors = max(1, heads // 4)
                batch = [make_head(Head, shape, rows, metrics, s, rnd, s % sensors) for s in range(heads)]
                for h in batch:  # warm up (imports, numpy's first calls, the hints)
                    h.close(*args)
                ways = {"Head.close": lambda: [h.close(*args) for h in batch]}
                if together:
                    ways["close_heads"] = lambda: close_heads(batch, *args)
                for way, run in ways.items():
                    times = []
                    for _ in range(repeat):
                        t = time.process_time()
                        closed = run()
                        times.append((time.process_time() - t) / heads)
                    per = statistics.median(times)
                    size = sum(len(r.blob) + sum(len(b[2]) for b in (r.blocks or {}).values()) for r in closed)
                    out.append(
                        {
                            "shape": shape,
                            "metrics": metrics,
                            "rows": rows,
                            "way": way,
                            "ms_per_close": per * 1e3,
                            "us_per_datagram": per / rows * 1e6,
                            "bytes_per_close": size / heads,
                        }
                    )
    return out


def run_child(python: str, root: Path, args) -> list[dict]:
    cmd = [python, str(Path(__file__).resolve()), "--_json", "--_root", str(root), "--heads", str(args.heads)]
    cmd += ["--repeat", str(args.repeat), "--rows", *map(str, args.rows)]
    cmd += ["--together"] if args.together else []
    cmd += ["--slow"] if args.slow else []
    cmd += ["--shapes", *args.shapes]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1024], help="datagrams per head (default 1024)")
    p.add_argument("--heads", type=int, default=20, help="heads closed per repeat (default 20)")
    p.add_argument("--repeat", type=int, default=7, help="repeats, the median is printed (default 7)")
    p.add_argument("--together", action="store_true", help="also time chunkstore.close_heads of the same heads")
    p.add_argument("--slow", action="store_true", help="fast=False (the 1 Hz choice) instead of fast=True")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES, help="data shapes (default: all)")
    p.add_argument("--against", type=Path, help="another checkout (DIR/.venv/bin/python, DIR's collector), in turn")
    p.add_argument("--pairs", type=int, default=1, help="with --against: runs of each, in turn (default 1)")
    p.add_argument("--_json", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._json:
        print(
            json.dumps(
                measure(args._root, args.rows, args.heads, args.repeat, args.together, not args.slow, args.shapes)
            )
        )
        return
    programs = [("this", sys.executable, ROOT)]
    if args.against:
        programs.append(("against", str(args.against / ".venv" / "bin" / "python"), args.against.resolve()))
    runs: dict[str, list[list[dict]]] = {name: [] for name, _, _ in programs}
    for _ in range(args.pairs if args.against else 1):
        for name, python, root in programs:
            runs[name].append(run_child(python, root, args))
    print(f"fast={not args.slow}, {args.heads} heads a repeat, median of {args.repeat}; process CPU time")
    header = f"{'shape':<10} {'metrics':>7} {'rows':>6} {'way':<11}"
    for name, _, root in programs:
        header += f" | {name} ({root.name}): ms/close us/datagram bytes/close"
    if args.against:
        header += " | CPU against/this"
    print(header)
    for i, row in enumerate(runs["this"][0]):
        line = f"{row['shape']:<10} {row['metrics']:>7} {row['rows']:>6} {row['way']:<11}"
        medians = {}
        for name, _, _ in programs:
            ms = statistics.median(r[i]["ms_per_close"] for r in runs[name])
            medians[name] = ms
            line += f" | {ms:8.3f} {ms / row['rows'] * 1e3:8.3f} {runs[name][0][i]['bytes_per_close']:8.0f}"
        if args.against:
            line += f" | x{medians['against'] / medians['this']:.2f}"
        print(line)


if __name__ == "__main__":
    main()
