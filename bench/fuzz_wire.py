"""Mutation fuzz of collector.wire.decode: any bytes give a Datagram or a DecodeError.

Deterministic for a given seed and count (the same bytes on every run and with
either msgpack build), so a failure can be replayed and the C extension and
the pure-Python fallback can be compared verdict by verdict.  Used by
tests/test_fuzz_wire.py (bounded counts, in CI) and by hand for long runs:

    python bench/fuzz_wire.py --count 5000000 --seed 7
    MSGPACK_PUREPYTHON=1 python bench/fuzz_wire.py --count 200000 --json
    python bench/fuzz_wire.py --differential --count 2000000   # decode vs _decode_reference

The differential mode feeds the same cases to `wire.decode` (the fast path
with its fallback) and `wire._decode_reference` (the careful decoder, the
definition of every verdict) and counts every case where the two disagree on
anything: accepted or not, the reason and detail, or the decoded values down
to each float's bits, each value's type and the readings' order.  Its cases
are structured datagrams built field by field with every msgpack encoding of
each value (non-minimal int widths, float32, str8/16/32, bin, Timestamp
exts, keys in any order, duplicated or unknown keys, values at and past each
limit), and the same cases mutated by `mutate`.
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
_HEADERS = bytes(
    [
        0x80,
        0x8F,
        0x90,
        0x9F,
        0xA0,
        0xBF,
        0xC0,
        0xC1,
        0xC2,
        0xC3,
        0xC4,
        0xC5,
        0xC6,
        0xC7,
        0xC8,
        0xC9,
        0xCA,
        0xCB,
        0xCC,
        0xCD,
        0xCE,
        0xCF,
        0xD0,
        0xD3,
        0xD4,
        0xD5,
        0xD6,
        0xD7,
        0xD8,
        0xD9,
        0xDA,
        0xDB,
        0xDC,
        0xDD,
        0xDE,
        0xDF,
        0xE0,
        0xFF,
        0x00,
        0x7F,
    ]
)
# Length-prefixed headers with a huge claimed size (str/bin/array/map/ext 32).
_HUGE = [
    b"\xdb\xff\xff\xff\xff",
    b"\xc6\xff\xff\xff\xff",
    b"\xdd\xff\xff\xff\xff",
    b"\xdf\xff\xff\xff\xff",
    b"\xc9\xff\xff\xff\xff\x05",
    b"\xda\xff\xff",
    b"\xdc\xff\xff",
    b"\xde\xff\xff",
    b"\xd9\xff",
    b"\xc4\xff",
    b"\xdd\x00\x00\x1f\xff",
]
_NASTY_VALUES = [
    b"\xca\x7f\xc0\x00\x00",
    b"\xca\x7f\x80\x00\x00",
    b"\xcb\xff\xf0\x00\x00\x00\x00\x00\x00",
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",
    b"\xc3",
    b"\xc0",
    b"\xa0",
    b"\x90",
    b"\x80",
    b"\xc4\x00",
    b"\xd4\x05\x00",
    b"\xd6\xff\xff\xff\xff\xff",
    b"\xd7\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xc7\x0c\xff\xff\xff\xff\xff\xff\xff\xff\xff\x00\x00\x00\x00",  # Timestamp 96, pre-1970
    b"\xc7\x0c\xff\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00",  # Timestamp 96, 2**32 s
    b"\xd5\xff\x00\x00",
    b"\xc7\x05\xff\x00\x00\x00\x00\x00",  # type -1, wrong lengths
    b"\xa3\xed\xa0\x80",
    b"\xa2\xc3\x28",  # invalid UTF-8 (a surrogate; a bad continuation)
]


def seeds() -> list[bytes]:
    """Valid datagrams to mutate: encode() output and C-encoder style bytes."""
    out = [
        wire.encode("s1", 7, {"t": 21.5, "rh": 48}),
        wire.encode("greenhouse-3", 41, {"temp_c": 21.5, "rh": 48.25, "co2_ppm": 612}, boot=7, ts=1764000000.25),
        wire.encode("barn/n1:a", 2**32 - 1, {f"m{i}": i * 0.5 for i in range(64)}, boot=2**32 - 1, ts=1764000000),
        # fixmap/fixstr/float32/Timestamp 32, as docs/PROTOCOL.md's examples
        bytes.fromhex("84a17601a26964a27331a373657107a17282a174ca41ac0000a2726830"),
        bytes.fromhex("86a17601a26964a27331a373657100a4626f6f7403a27473d6ff69248100a17282a174cac0880000a364626dd0ba"),
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


# The differential fuzz spends its time near the valid shape: the costly
# hostile forms (wide containers, deep nesting, 9 KB of noise) are judged by
# the careful path alone, whatever the fast path does, so they are rarer here.
_DIFF_WEIGHTS = [10, 10, 10, 10, 1, 10, 1, 4, 6, 0.5, 6, 0.02, 10, 10]


def mutate(rng: random.Random, corpus: list[bytes], weights: list[float] = _WEIGHTS) -> bytes:
    """One fuzz case: a mutated seed, or bytes built to be hostile."""
    base = rng.choice(corpus)
    op = rng.choices(_OPS, weights)[0]
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
        return base[:i] + rng.choice(_HUGE) + base[i + rng.randint(0, 3) :]
    if op == 4:  # deep nesting
        return _deep(rng)
    if op == 5:  # a nasty value in place of some bytes
        i = rng.randrange(1, len(base))
        return base[:i] + rng.choice(_NASTY_VALUES) + base[i + rng.randint(0, 9) :]
    if op == 6:  # random bytes
        return rng.randbytes(rng.choice([0, 1, 2, rng.randint(0, 64), rng.randint(0, 9000)]))
    if op == 7:  # trailing bytes
        return base + rng.randbytes(rng.randint(1, 4))
    if op == 8:  # splice two datagrams
        other = rng.choice(corpus)
        return base[: rng.randrange(len(base))] + other[rng.randrange(len(other)) :]
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
        b = mutate(rng, corpus, weights)
        return mutate(rng, [b], weights) if len(b) >= 2 else b
    # a valid map with one field replaced by a random small value
    fields = {"v": b"\x01", "id": b"\xa2s1", "seq": b"\x07", "r": b"\x81\xa1t\x07"}
    key = rng.choice([*fields, "boot", "ts"])
    fields[key] = rng.choice(_NASTY_VALUES + [rng.randbytes(rng.randint(1, 9))])
    body = b"".join(bytes([0xA0 + len(k)]) + k.encode() + v for k, v in fields.items())
    return bytes([0x80 + len(fields)]) + body


# --- structured datagrams for the differential fuzz ------------------------------------


def _enc_int(rng: random.Random, v: int) -> bytes:
    """`v` in a random msgpack int encoding that holds it (minimal or not)."""
    forms = []
    if 0 <= v <= 0x7F:
        forms.append(bytes([v]))
    if -32 <= v < 0:
        forms.append(struct.pack("b", v))
    for code, fmt, lo, hi in (
        (0xCC, ">B", 0, 2**8),
        (0xCD, ">H", 0, 2**16),
        (0xCE, ">I", 0, 2**32),
        (0xCF, ">Q", 0, 2**64),
        (0xD0, ">b", -(2**7), 2**7),
        (0xD1, ">h", -(2**15), 2**15),
        (0xD2, ">i", -(2**31), 2**31),
        (0xD3, ">q", -(2**63), 2**63),
    ):
        if lo <= v < hi:
            forms.append(bytes([code]) + struct.pack(fmt, v))
    return rng.choice(forms)


def _enc_str(rng: random.Random, text: str, raw: bytes | None = None) -> bytes:
    b = text.encode() if raw is None else raw
    forms = [
        b"\xd9" + struct.pack(">B", len(b)) if len(b) < 2**8 else None,
        b"\xda" + struct.pack(">H", len(b)),
        b"\xdb" + struct.pack(">I", len(b)),
    ]
    if len(b) < 32:
        forms.append(bytes([0xA0 + len(b)]))
    if rng.random() < 0.02:  # the same bytes as bin: msgpack gives bytes, never a str
        forms = [b"\xc4" + struct.pack(">B", len(b))] if len(b) < 2**8 else [b"\xc5" + struct.pack(">H", len(b))]
    return rng.choice([f for f in forms if f is not None]) + b


def _enc_map_header(rng: random.Random, n: int) -> bytes:
    forms = [b"\xde" + struct.pack(">H", n), b"\xdf" + struct.pack(">I", n)]
    if n < 16:
        forms.append(bytes([0x80 + n]))
    return rng.choice(forms)


def _float_bits(rng: random.Random) -> float:
    return struct.unpack("<d", rng.randbytes(8))[0]


def _enc_number(rng: random.Random) -> bytes:
    """A reading value: mostly valid numbers, sometimes each kind of invalid one."""
    k = rng.random()
    if k < 0.35:
        v = rng.choice(
            [
                21.5,
                -0.0,
                0.0,
                5e-324,
                2.2250738585072014e-308,
                1.7976931348623157e308,
                -1.7976931348623157e308,
                0.1,
                round(rng.uniform(-50, 50), 2),
                _float_bits(rng),
            ]
        )
        return (
            (b"\xcb" + struct.pack(">d", v))
            if rng.random() < 0.7
            else (b"\xca" + struct.pack(">f", v) if abs(v) < 3e38 or v != v else b"\xcb" + struct.pack(">d", v))
        )
    if k < 0.42:
        return b"\xca" + rng.randbytes(4)  # any float32 bits: NaN, inf, subnormals
    if k < 0.75:
        v = rng.choice(
            [
                0,
                1,
                -1,
                127,
                128,
                -33,
                2**31,
                2**53 + 1,
                2**63 - 1,
                -(2**63),
                rng.randint(-(2**63), 2**63 - 1),
                rng.randint(-1000, 100_000),
            ]
        )
        return _enc_int(rng, v)
    if k < 0.8:
        return _enc_int(rng, rng.choice([2**63, 2**64 - 1]))
    if k < 0.86:
        return rng.choice([b"\xc2", b"\xc3"])  # bools: accepted as 0/1
    return rng.choice(
        [
            b"\xc0",
            b"\xa1x",
            b"\xc4\x00",
            b"\x90",
            b"\x80",
            b"\xd6\xff\x00\x00\x00\x01",
            b"\xcb" + struct.pack(">d", float("nan")),
            b"\xcb" + struct.pack(">d", float("inf")),
        ]
    )


_IDS = ["s1", "bench-0042", "greenhouse-3", "barn/n1:a", "a" * 64, "A.b_c-d:e/f", "x"]
_BAD_IDS = ["", "a" * 65, "has space", "caf\u00e9", "tab\t", "new\nline"]
_NAMES = ["t", "rh", "temp_c", "co2_ppm", "m" * 64, "a.b-c_d", "battery", "hum"]
_BAD_NAMES = ["", "m" * 65, "a:b", "a/b", "sp ace", "\u00b0C"]


def _enc_field(rng: random.Random, key: str) -> bytes:
    """A value for a known key: valid most of the time, in any encoding."""
    bad = rng.random() < 0.06
    if key == "v":
        return (
            _enc_int(rng, 1)
            if not bad
            else rng.choice([b"\x02", b"\xc3", b"\xcb" + struct.pack(">d", 1.0), b"\xa11", b"\xc0", b"\x00"])
        )
    if key == "id":
        return _enc_str(rng, rng.choice(_BAD_IDS if bad else _IDS)) if rng.random() > 0.02 else _enc_int(rng, 7)
    if key in ("seq", "boot"):
        if bad:
            return rng.choice(
                [_enc_int(rng, rng.choice([-1, 2**32, 2**64 - 1])), b"\xc3", b"\xcb" + struct.pack(">d", 7.0), b"\xa17"]
                + ([] if key == "seq" else [])
            )
        if key == "boot" and rng.random() < 0.15:
            return b"\xc0"
        return _enc_int(rng, rng.choice([0, 1, 7, 2**16, 2**32 - 1, rng.randrange(2**32)]))
    if key == "ts":
        choices = [
            b"\xcb" + struct.pack(">d", rng.choice([1764000000.25, 0.0, -0.0, 4294967295.999, 5e-324])),
            b"\xca" + struct.pack(">f", 1764000000.0),
            _enc_int(rng, rng.choice([0, 1764000000, 2**32 - 1])),
            b"\xc0",
            b"\xd6\xff" + struct.pack(">I", 1764000000),
            b"\xd7\xff" + struct.pack(">Q", (5 << 34) | 1764000000),
        ]
        if bad:
            choices = [
                b"\xcb" + struct.pack(">d", rng.choice([-1.0, 2.0**32, float("nan"), float("inf")])),
                _enc_int(rng, rng.choice([-1, 2**32, 2**64 - 1])),
                b"\xc3",
                b"\xa1t",
                b"\xc7\x0c\xff" + struct.pack(">Iq", 0, 2**32),
                b"\xca" + rng.randbytes(4),
            ]
        return rng.choice(choices)
    # "r"
    n = rng.choice([1, 1, 2, 2, 2, 3, 5, 5, 8, 64 if rng.random() < 0.2 else 5] + ([0, 65] if bad else []))
    names = [rng.choice(_NAMES) if rng.random() < 0.8 else f"n{rng.randrange(1000)}" for _ in range(n)]
    if bad and n and rng.random() < 0.5:
        names[rng.randrange(n)] = rng.choice(_BAD_NAMES)
    if bad and rng.random() < 0.2:
        return rng.choice([b"\xc0", b"\x90", b"\x80", b"\xa1r", b"\x07"])
    body = b"".join(_enc_str(rng, name) + _enc_number(rng) for name in names)
    return _enc_map_header(rng, n) + body


def structured(rng: random.Random) -> bytes:
    """One datagram built field by field (see the module docstring)."""
    keys = ["v", "id", "seq", "r"]
    for optional in ("boot", "ts"):
        if rng.random() < 0.6:
            keys.append(optional)
    if rng.random() < 0.05:
        keys.remove(rng.choice(keys))  # a required key missing
    if rng.random() < 0.7:
        rng.shuffle(keys)
    pairs = [(k, _enc_field(rng, k)) for k in keys]
    if rng.random() < 0.05:  # a duplicated key: the last one wins
        k = rng.choice(keys) if keys else "v"
        pairs.insert(rng.randrange(len(pairs) + 1), (k, _enc_field(rng, k)))
    if rng.random() < 0.05:  # an unknown key, ignored unless nested too deep
        pairs.insert(
            rng.randrange(len(pairs) + 1),
            (
                rng.choice(["x", "fw", "V", "rr"]),
                rng.choice([b"\x01", b"\xa3abc", b"\x91\x91\x00", b"\x91" * 20 + b"\x00", _enc_number(rng)]),
            ),
        )
    body = b"".join(_enc_str(rng, k) + v for k, v in pairs)
    return _enc_map_header(rng, len(pairs)) + body


def _outcome(decoder, data: bytes) -> tuple:
    """Everything a caller can see of one decode, floats by their bits."""
    try:
        d = decoder(data)
    except DecodeError as exc:
        return ("rejected", exc.reason, exc.detail)
    except BaseException as exc:  # noqa: BLE001 - an escape is a finding too
        return ("escape", type(exc).__name__, str(exc)[:200])

    def exact(x):
        return (type(x).__name__, struct.pack("<d", x) if type(x) is float else x)

    return (
        "accepted",
        type(d).__name__,
        exact(d.sensor),
        exact(d.seq),
        exact(d.boot),
        exact(d.ts),
        type(d.readings).__name__,
        tuple((exact(k), exact(v)) for k, v in d.readings.items()),
    )


def differential(seed: int, count: int, *, fresh: float = 0.35) -> dict:
    """`count` cases through decode and _decode_reference; returns the tally.

    A fraction `fresh` of the cases are new structured datagrams (kept in a
    pool of the last 1,024); the rest are pool members mutated by `mutate`,
    now and then spliced with the seeds() corpus.  Building a datagram field by
    field costs more than mutating one, which is why the pool exists.
    """
    rng = random.Random(seed)
    corpus = seeds()
    pool: list[bytes] = [structured(rng) for _ in range(64)]
    verdicts = Counter()
    mismatches: list[str] = []
    fast_taken = 0
    reference = wire._decode_reference
    calls = [0]

    def counting(data):
        calls[0] += 1
        return reference(data)

    started = time.perf_counter()
    wire._decode_reference = counting  # count the datagrams the fast path handed over
    try:
        for _ in range(count):
            if rng.random() < fresh:
                data = structured(rng)
                if len(pool) < 1024:
                    pool.append(data)
                else:
                    pool[rng.randrange(1024)] = data
            else:
                base = rng.choice(pool)
                data = mutate(rng, [base, *corpus] if rng.random() < 0.1 else [base], _DIFF_WEIGHTS)
            before = calls[0]
            got = _outcome(wire.decode, data)
            if calls[0] == before:
                fast_taken += 1
            want = _outcome(reference, data)
            verdicts[want[0] if want[0] != "rejected" else want[1]] += 1
            if got != want and len(mismatches) < 20:
                mismatches.append(f"{data.hex()}: decode {got!r} != reference {want!r}")
            elif got != want:
                mismatches.append("...")
    finally:
        wire._decode_reference = reference
    return {
        "seed": seed,
        "count": count,
        "verdicts": dict(sorted(verdicts.items())),
        "fast_path_answered": fast_taken,
        "mismatches": len(mismatches),
        "examples": mismatches[:20],
        "seconds": time.perf_counter() - started,
    }


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
    parser.add_argument(
        "--differential", action="store_true", help="compare decode against _decode_reference case by case"
    )
    args = parser.parse_args(argv)
    if args.differential:
        result = differential(args.seed, args.count)
        print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
        return 1 if result["mismatches"] else 0
    result = run(args.seed, args.count, trace_memory=not args.no_trace)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 1 if result["escapes"] else 0


if __name__ == "__main__":
    sys.exit(main())
