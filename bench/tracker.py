"""How long does SensorTracker.observe take per datagram?

Prints ns per observe() for three streams fed to one tracker each: in order
(the collector's hot path), lossy (5% of seqs dropped, so ~1 in 20 calls
opens a gap), and reordered (5% of datagrams held back 1-3 places, so they
arrive Late into a gap, plus 1% duplicated).  The streams are built before
timing; the loop only calls observe.  Best of --repeat runs.

The baseline of the same run: the same streams through the tracker of git
revision --baseline-rev (default 0bfe8a9, the last one that kept gaps as
sorted arrays, before the window bitmap of issue 13 item 9), loaded from git
beside the current one; ratios are current / baseline.

    .venv/bin/python bench/tracker.py [--count 200000] [--repeat 5] [--baseline-rev REV]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
import types
from pathlib import Path

from collector.sequence import SensorTracker

START = 2**32 - 1000  # cross the wraparound during the run


def in_order(n: int, rng: random.Random) -> list[int]:
    return [(START + i) & 0xFFFFFFFF for i in range(n)]


def lossy(n: int, rng: random.Random) -> list[int]:
    return [(START + i) & 0xFFFFFFFF for i in range(n) if i == 0 or rng.random() >= 0.05]


def reordered(n: int, rng: random.Random) -> list[int]:
    out: list[int] = []
    held: list[list[int]] = []  # [remaining, seq]
    for i in range(n):
        seq = (START + i) & 0xFFFFFFFF
        for h in held:
            h[0] -= 1
        if i and rng.random() < 0.05:
            held.append([rng.randint(1, 3), seq])
        else:
            out.append(seq)
            if rng.random() < 0.01:
                out.append(seq)
        for h in [h for h in held if h[0] <= 0]:
            held.remove(h)
            out.append(h[1])
    out.extend(h[1] for h in held)
    return out


def load_baseline(rev: str) -> type | None:
    """SensorTracker as it was at git revision `rev`, or None (not a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        src = subprocess.run(
            ["git", "-C", str(root), "show", f"{rev}:collector/sequence.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no baseline: cannot read collector/sequence.py at {rev} ({exc})", file=sys.stderr)
        return None
    mod = types.ModuleType(f"sequence_{rev}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:collector/sequence.py", "exec"), mod.__dict__)
    return mod.SensorTracker


def ns_per_observe(seqs: list[int], repeat: int, cls: type = SensorTracker) -> tuple[float, SensorTracker]:
    best = float("inf")
    for _ in range(repeat):
        t = cls()
        observe = t.observe
        t0 = time.perf_counter()
        for seq in seqs:
            observe(7, seq, 0.0)
        best = min(best, (time.perf_counter() - t0) / len(seqs))
    return best * 1e9, t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200_000, help="seqs generated per stream")
    ap.add_argument("--repeat", type=int, default=5, help="runs per stream; the best is shown")
    ap.add_argument("--baseline-rev", default="0bfe8a9", help="git revision of the baseline tracker")
    args = ap.parse_args()
    baseline = load_baseline(args.baseline_rev)
    rng = random.Random(1)

    # Calibrate: the bare loop calling a trivial method, to read the figures against.
    class Empty:
        def observe(self, boot, seq, now):  # noqa: ANN001
            return None

    e = Empty().observe
    seqs = in_order(args.count, rng)
    t0 = time.perf_counter()
    for seq in seqs:
        e(7, seq, 0.0)
    print(f"{'empty method (loop + call)':30} {(time.perf_counter() - t0) / len(seqs) * 1e9:7.0f} ns")
    for name, make in (("in order", in_order), ("lossy 5%", lossy), ("reordered 5% + dup 1%", reordered)):
        seqs = make(args.count, rng)
        # Current and baseline alternate, so load on the machine hits both alike.
        ns = base_ns = float("inf")
        for _ in range(args.repeat):
            run_ns, t = ns_per_observe(seqs, 1)
            ns = min(ns, run_ns)
            if baseline is not None:
                run_ns, b = ns_per_observe(seqs, 1, baseline)
                base_ns = min(base_ns, run_ns)
                assert (b.lost, b.reordered, b.duplicates) == (t.lost, t.reordered, t.duplicates)
        line = (
            f"{name:30} {ns:7.0f} ns/observe  ({len(seqs)} calls: lost={t.lost} "
            f"reordered={t.reordered} duplicates={t.duplicates} open gaps={len(t.open_gaps())})"
        )
        if baseline is not None:
            line += f"; {args.baseline_rev}: {base_ns:.0f} ns, ratio {ns / base_ns:.2f}"
        print(line)


if __name__ == "__main__":
    main()
