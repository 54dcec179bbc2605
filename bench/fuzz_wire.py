"""Mutation fuzz of collector.wire.decode: any bytes give a Datagram or a DecodeError.

Deterministic for a given seed and count (the same bytes on every run and with
either msgpack build), so a failure can be replayed and the C extension and
the pure-Python fallback can be compared verdict by verdict.  Used by
tests/test_fuzz_wire.py (bounded counts, in CI) and by hand for long runs:

    python bench/fuzz_wire.py --count 5000000 --seed 7
    MSGPACK_PUREPYTHON=1 python bench/fuzz_wire.py --count 200000 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import struct
import sys
import time
import tracemalloc
from collections import Counter

from collector import wire
from collector.errors import DecodeError

# Header bytes worth planting: every container/str/bin/ext form, the unused
# 0xc1, and the extremes of the fix ranges.
_HEADERS = bytes([0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5,
                  0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD3,
                  0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF,
                  0xE0, 0xFF, 0x00, 0x7F])
# Length-prefixed headers with a huge claimed size (str/bin/array/map/ext 32).
_HUGE = [b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
         b"\xdf\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x05", b"\xda\xff\xff",
         b"\xdc\xff\xff", b"\xde\xff\xff", b"\xd9\xff", b"\xc4\xff", b"\xdd\x00\x00\x1f\xff"]
_NASTY_VALUES = [
    b"\xca\x7f\xc0\x00\x00", b"\xca\x7f\x80\x00\x00", b"\xcb\xff\xf0\x00\x00\x00\x00\x00\x00",
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",
    b"\xc3", b"\xc0", b"\xa0", b"\x90", b"\x80", b"\xc4\x00", b"\xd4\x05\x00",
    b"\xd6\xff\xff\xff\xff\xff", b"\xd7\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xc7\x0c\xff\xff\xff\xff\xff\xff\xff\xff\xff\x00\x00\x00\x00",  # Timestamp 96, pre-1970
    b"\xc7\x0c\xff\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00",  # Timestamp 96, 2**32 s
    b"\xd5\xff\x00\x00", b"\xc7\x05\xff\x00\x00\x00\x00\x00",  # type -1, wrong lengths
    b"\xa3\xed\xa0\x80", b"\xa2\xc3\x28",  # invalid UTF-8 (a surrogate; a bad continuation)
]


def seeds() -> list[bytes]:
    """Valid datagrams to mutate: encode() output and C-encoder style bytes."""
    out = [
        wire.encode("s1", 7, {"t": 21.5, "rh": 48}),
        wire.encode("greenhouse-3", 41, {"temp_c": 21.5, "rh": 48.25, "co2_ppm": 612},
                    boot=7, ts=1764000000.25),
        wire.encode("barn/n1:a", 2**32 - 1, {f"m{i}": i * 0.5 for i in range(64)},
                    boot=2**32 - 1, ts=1764000000),
        # fixmap/fixstr/float32/Timestamp 32, as docs/PROTOCOL.md's examples
        bytes.fromhex("84a17601a26964a27331a373657107a17282a174ca41ac0000a2726830"),
        bytes.fromhex("86a17601a26964a27331a373657100a4626f6f7403a27473d6ff69248100"
                      "a17282a174cac0880000a364626dd0ba"),
    ]
    return out


def _deep(rng: random.Random) -> bytes:
    depth = rng.choice([MAX := wire.MAX_DEPTH, MAX + 1, rng.randint(1, 1100), 995, 1000, 1025, 1100])
    kind = rng.random()
    if kind < 0.4:
        inner = b"\x91" * depth + b"\x00"
    elif kind < 0.7:
        inner = b"\x81\xa1k" * depth + b"\x00"
    else:
        inner = b"".join(rng.choice([b"\x91", b"\x81\xa1k", b"\x92\x00"]) for _ in range(depth)) + b"\xc0"
    if rng.random() < 0.5:
        return inner
    # As the value of an unknown key, or of a known one, in a valid datagram.
    key = rng.choice([b"\xa1x", b"\xa2fw", b"\xa1r", b"\xa2id", b"\xa1v", b"\xa2ts"])
    return b"\x85\xa1v\x01\xa2id\xa2s1\xa3seq\x07\xa1r\x81\xa1t\x07" + key + inner


# Operation weights.  Wide containers (op 11) are rare because each costs
# ~1.3 ms to decode and reject; the others are all cheap.
_OPS = range(14)
_WEIGHTS = [10, 10, 10, 10, 6, 10, 6, 4, 6, 2, 6, 0.5, 10, 10]


def mutate(rng: random.Random, corpus: list[bytes]) -> bytes:
    """One fuzz case: a mutated seed, or bytes built to be hostile."""
    base = rng.choice(corpus)
    op = rng.choices(_OPS, _WEIGHTS)[0]
    if op == 0:  # flip 1-8 bits
        b = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if op == 1:  # truncate
        return base[: rng.randrange(len(base))]
    if op == 2:  # plant a header byte
        b = bytearray(base)
        b[rng.randrange(len(b))] = rng.choice(_HEADERS)
        return bytes(b)
    if op == 3:  # a length field that lies
        i = rng.randrange(len(base))
        return base[:i] + rng.choice(_HUGE) + base[i + rng.randint(0, 3):]
    if op == 4:  # deep nesting
        return _deep(rng)
    if op == 5:  # a nasty value in place of some bytes
        i = rng.randrange(1, len(base))
        return base[:i] + rng.choice(_NASTY_VALUES) + base[i + rng.randint(0, 9):]
    if op == 6:  # random bytes
        return rng.randbytes(rng.choice([0, 1, 2, rng.randint(0, 64), rng.randint(0, 9000)]))
    if op == 7:  # trailing bytes
        return base + rng.randbytes(rng.randint(1, 4))
    if op == 8:  # splice two datagrams
        other = rng.choice(corpus)
        return base[: rng.randrange(len(base))] + other[rng.randrange(len(other)):]
    if op == 9:  # oversized, possibly valid at the front
        return base + b"\xc0" * (wire.MAX_DATAGRAM_BYTES + 1 - len(base) + rng.randint(0, 100))
    if op == 10:  # an unknown ext type, any length form
        code = rng.choice([rng.randint(0, 127), rng.randint(-128, -2)])
        ext = rng.choice([b"\xd4", b"\xd5", b"\xd6", b"\xd7", b"\xd8"]) + struct.pack("b", code)
        ext += b"\x00" * {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}[ext[0]]
        i = rng.randrange(1, len(base))
        return base[:i] + ext + base[i:]
    if op == 11:  # a wide container: many small items (time bound check)
        n = rng.randint(1000, 8000)
        item = rng.choice([b"\x90", b"\x80", b"\x00", b"\xa0", b"\x91\x90"])
        return (b"\x81\xa1x\xdd" + struct.pack(">I", n) + item * n)[: wire.MAX_DATAGRAM_BYTES]
    if op == 12:  # several mutations at once
        b = mutate(rng, corpus)
        return mutate(rng, [b]) if len(b) >= 2 else b
    # a valid map with one field replaced by a random small value
    fields = {"v": b"\x01", "id": b"\xa2s1", "seq": b"\x07", "r": b"\x81\xa1t\x07"}
    key = rng.choice([*fields, "boot", "ts"])
    fields[key] = rng.choice(_NASTY_VALUES + [rng.randbytes(rng.randint(1, 9))])
    body = b"".join(bytes([0xA0 + len(k)]) + k.encode() + v for k, v in fields.items())
    return bytes([0x80 + len(fields)]) + body


def run(seed: int, count: int, *, trace_memory: bool = True) -> dict:
    """Decode `count` fuzz cases; returns the tally (escapes are listed, not raised)."""
    rng = random.Random(seed)
    corpus = seeds()
    verdicts = Counter()
    escapes: list[str] = []
    digest = hashlib.sha256()
    slowest = 0.0
    if trace_memory:
        tracemalloc.start()
    started = time.perf_counter()
    try:
        for _ in range(count):
            data = mutate(rng, corpus)
            t0 = time.perf_counter()
            try:
                wire.decode(data)
                verdict = "accepted"
            except DecodeError as exc:
                verdict = exc.reason if exc.reason in wire.REASONS else f"BAD REASON {exc.reason}"
                if verdict != exc.reason:
                    escapes.append(f"{data.hex()}: unknown reason {exc.reason!r}")
            except BaseException as exc:  # noqa: BLE001 - the point is to catch anything
                verdict = "escape"
                if len(escapes) < 20:
                    escapes.append(f"{data.hex()}: {type(exc).__name__}: {exc}")
            slowest = max(slowest, time.perf_counter() - t0)
            verdicts[verdict] += 1
            digest.update(verdict.encode() + b"\n")
        peak = tracemalloc.get_traced_memory()[1] if trace_memory else 0
    finally:
        if trace_memory:
            tracemalloc.stop()
    return {
        "seed": seed,
        "count": count,
        "verdicts": dict(sorted(verdicts.items())),
        "escapes": escapes,
        "digest": digest.hexdigest(),
        "peak_bytes": peak,
        "slowest_decode_s": slowest,
        "seconds": time.perf_counter() - started,
        "msgpack": wire.msgpack.Unpacker.__module__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--json", action="store_true", help="print the tally as one JSON line")
    parser.add_argument("--no-trace", action="store_true", help="skip tracemalloc (faster)")
    args = parser.parse_args(argv)
    result = run(args.seed, args.count, trace_memory=not args.no_trace)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 1 if result["escapes"] else 0


if __name__ == "__main__":
    sys.exit(main())
