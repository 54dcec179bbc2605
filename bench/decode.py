"""Decoder benchmark: wire.decode (fast path) against wire._decode_reference.

Times one datagram of the common shape (id, seq, boot, ts and 2 or 5
readings, as bench/ingest.py sends) decoded over and over, and prints the
median of several repeats in microseconds per datagram, with the ratio to
the careful decoder measured in the same run.  For context it also times
msgpack.unpackb alone (what the careful path starts with) and, when
installed, ormsgpack.unpackb and msgspec's untyped decode: parsers that do
no validation at all.

    .venv/bin/python bench/decode.py
    .venv/bin/python bench/decode.py --number 100000 --repeat 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack  # noqa: E402

from collector import wire  # noqa: E402

FIVE = {"temp": 21.53, "hum": 40.2, "pres": 1013.25, "bat": 3.712, "count": 123456}


def datagrams() -> dict[str, bytes]:
    two = {k: FIVE[k] for k in ("temp", "hum")}
    return {
        "2 readings": wire.encode("bench-0042", 123456, two, boot=1, ts=1_700_000_000.25),
        "5 readings": wire.encode("bench-0042", 123456, FIVE, boot=1, ts=1_700_000_000.25),
    }


def contenders() -> dict:
    out = {
        "wire._decode_reference (before)": wire._decode_reference,
        "wire.decode (fast path)": wire.decode,
        "msgpack.unpackb alone": msgpack.unpackb,
    }
    try:
        import ormsgpack

        out["ormsgpack.unpackb alone"] = ormsgpack.unpackb
    except ImportError:
        pass
    try:
        import msgspec

        out["msgspec untyped decode alone"] = msgspec.msgpack.decode
    except ImportError:
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--number", type=int, default=50_000, help="decodes per repeat")
    p.add_argument("--repeat", type=int, default=9)
    args = p.parse_args()
    print(f"median of {args.repeat} repeats x {args.number:,} decodes; msgpack build {msgpack.Unpacker.__module__}")
    for label, data in datagrams().items():
        assert wire.decode(data) == wire._decode_reference(data)
        print(f"{label} ({len(data)} bytes):")
        base = None
        for name, fn in contenders().items():
            times = timeit.repeat(lambda: fn(data), number=args.number, repeat=args.repeat)
            us = statistics.median(times) / args.number * 1e6
            base = base or us
            print(f"  {name:32s} {us:6.3f} us/datagram   x{base / us:4.2f} vs before")


if __name__ == "__main__":
    main()
