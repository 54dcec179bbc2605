"""How long does SensorTracker.observe take per datagram?

Prints ns per observe() for three streams fed to one tracker each: in order
(the collector's hot path), lossy (5% of seqs dropped, so ~1 in 20 calls
opens a gap), and reordered (5% of datagrams held back 1-3 places, so they
arrive Late into a gap, plus 1% duplicated).  The streams are built before
timing; the loop only calls observe.  Best of --repeat runs.

    .venv/bin/python bench/tracker.py [--count 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import time

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


def ns_per_observe(seqs: list[int], repeat: int) -> tuple[float, SensorTracker]:
    best = float("inf")
    for _ in range(repeat):
        t = SensorTracker()
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
    args = ap.parse_args()
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
        ns, t = ns_per_observe(seqs, args.repeat)
        print(
            f"{name:30} {ns:7.0f} ns/observe  ({len(seqs)} calls: lost={t.lost} "
            f"reordered={t.reordered} duplicates={t.duplicates} open gaps={len(t.open_gaps())})"
        )


if __name__ == "__main__":
    main()
