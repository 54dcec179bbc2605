"""Wire format v1: bytes <-> Datagram. No sockets, no clock.

The promise, in h11's fuzz wording: any bytes given to `decode` give a
`Datagram` or raise `DecodeError` with one reason from `REASONS`; nothing else
escapes, and the work done is bounded by the datagram size (at most
MAX_DATAGRAM_BYTES) because every msgpack length is capped before it is
allocated.  docs/PROTOCOL.md is the byte-level contract; this module is its
reference implementation, shared by the simulator and the collector.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import msgpack

from .errors import DecodeError, EncodeError

VERSION = 1
MAX_DATAGRAM_BYTES = 8192
MAX_ID_BYTES = 64
MAX_NAME_BYTES = 64
MAX_READINGS = 64
SEQ_MODULUS = 2**32  # seq and boot are unsigned 32-bit; seq wraps 2**32-1 -> 0
# Sensor times must fit an unsigned 32-bit seconds field (until 2106): a
# negative or absurd time is a broken clock, not data worth keeping.
MAX_TS = float(2**32)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # what SQLite INTEGER holds

# The fixed, documented set of reasons a datagram is rejected (PROTOCOL.md).
REASONS = (
    "too_large",
    "not_msgpack",
    "not_a_map",
    "bad_version",
    "bad_id",
    "bad_seq",
    "bad_boot",
    "bad_ts",
    "bad_readings",
)

_ID_RE = re.compile(r"[A-Za-z0-9._:/-]{1,64}\Z")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")

# Everything msgpack's unpacker may raise on hostile bytes.  ValueError covers
# FormatError, StackError (nesting), ExtraData, UnicodeDecodeError and
# strict_map_key violations; the rest are belt and braces.
_UNPACK_ERRORS = (ValueError, TypeError, OverflowError, RecursionError, MemoryError,
                  msgpack.UnpackException, DecodeError)


class Datagram(NamedTuple):
    """One decoded, validated datagram.

    `readings` maps metric name -> int or float (bools already made 0/1).
    `ts` is sensor time in Unix seconds, or None when the sensor sent none.
    """

    sensor: str
    seq: int
    boot: int | None
    ts: float | None
    readings: dict[str, int | float]


def _reject_ext(code: int, data: bytes) -> Any:
    # Timestamp (-1) is decoded by msgpack itself before this hook is asked.
    raise DecodeError("not_msgpack", f"ext type {code} is not allowed")


def _is_valid_id(value: Any) -> bool:
    # The regex is ASCII-only, so character count == byte count.
    return type(value) is str and _ID_RE.match(value) is not None


def _check_readings(r: Any) -> dict[str, int | float]:
    """Validate a readings map; returns it (copied only if a bool needed 0/1)."""
    if type(r) is not dict or not 0 < len(r) <= MAX_READINGS:
        raise DecodeError("bad_readings", "r must be a map of 1-64 readings")
    fixed = None
    for name, value in r.items():
        if type(name) is not str or _NAME_RE.match(name) is None:
            raise DecodeError("bad_readings", f"bad reading name {name!r:.80}")
        t = type(value)
        if t is float:
            if not math.isfinite(value):
                raise DecodeError("bad_readings", f"reading {name} is not finite")
        elif t is int:
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise DecodeError("bad_readings", f"reading {name} is out of int64 range")
        elif t is bool:
            if fixed is None:
                fixed = dict(r)
            fixed[name] = int(value)
        else:
            raise DecodeError("bad_readings", f"reading {name} is {t.__name__}, not a number")
    return r if fixed is None else fixed


def _check_ts(ts: Any) -> float | None:
    t = type(ts)
    if ts is None:
        return None
    if t is msgpack.Timestamp:
        ts = ts.to_unix()
    elif t is int:
        ts = float(ts) if 0 <= ts < MAX_TS else -1.0
    elif t is not float:
        raise DecodeError("bad_ts", f"ts is {t.__name__}")
    if not 0.0 <= ts < MAX_TS:  # also false for NaN
        raise DecodeError("bad_ts", "ts must be finite Unix seconds in [0, 2**32)")
    return ts


def decode(data: bytes) -> Datagram:
    """Decode and validate one datagram, or raise DecodeError(reason)."""
    if len(data) > MAX_DATAGRAM_BYTES:
        raise DecodeError("too_large", f"{len(data)} bytes > {MAX_DATAGRAM_BYTES}")
    try:
        # Lengths are capped by the datagram size anyway (msgpack sizes them
        # from len(data)); the explicit caps state the contract.
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            timestamp=0,
            ext_hook=_reject_ext,
            max_str_len=MAX_DATAGRAM_BYTES,
            max_bin_len=MAX_DATAGRAM_BYTES,
            max_array_len=MAX_DATAGRAM_BYTES,
            max_map_len=MAX_DATAGRAM_BYTES,
            max_ext_len=12,  # the largest Timestamp is 12 bytes
        )
    except DecodeError:
        raise
    except _UNPACK_ERRORS as exc:
        raise DecodeError("not_msgpack", type(exc).__name__) from None
    if type(obj) is not dict:
        raise DecodeError("not_a_map", f"top level is {type(obj).__name__}")
    v = obj.get("v")
    if type(v) is not int or v != VERSION:
        raise DecodeError("bad_version", f"v={v!r:.20}")
    sensor = obj.get("id")
    if not _is_valid_id(sensor):
        raise DecodeError("bad_id", f"id={sensor!r:.80}")
    seq = obj.get("seq")
    if type(seq) is not int or not 0 <= seq < SEQ_MODULUS:
        raise DecodeError("bad_seq", f"seq={seq!r:.30}")
    boot = obj.get("boot")
    if boot is not None and (type(boot) is not int or not 0 <= boot < SEQ_MODULUS):
        raise DecodeError("bad_boot", f"boot={boot!r:.30}")
    ts = _check_ts(obj.get("ts"))
    readings = _check_readings(obj.get("r"))
    return Datagram(sensor, seq, boot, ts, readings)


def encode(
    sensor: str,
    seq: int,
    readings: dict[str, int | float],
    *,
    boot: int | None = None,
    ts: float | int | msgpack.Timestamp | None = None,
) -> bytes:
    """Encode one datagram; raises EncodeError if it would not decode.

    Floats go out as float64 and ints in their smallest msgpack width.  Keys
    are written in the order v, id, seq, boot, ts, r (any order decodes).
    """
    if not _is_valid_id(sensor):
        raise EncodeError(f"sensor id {sensor!r} must be 1-64 of [A-Za-z0-9._:/-]")
    if type(seq) is not int or not 0 <= seq < SEQ_MODULUS:
        raise EncodeError(f"seq {seq!r} must be an int in [0, 2**32)")
    obj: dict[str, Any] = {"v": VERSION, "id": sensor, "seq": seq}
    if boot is not None:
        if type(boot) is not int or not 0 <= boot < SEQ_MODULUS:
            raise EncodeError(f"boot {boot!r} must be an int in [0, 2**32)")
        obj["boot"] = boot
    if ts is not None:
        try:
            _check_ts(ts)
        except DecodeError as exc:
            raise EncodeError(exc.detail) from None
        obj["ts"] = ts
    try:
        obj["r"] = _check_readings(readings)
    except DecodeError as exc:
        raise EncodeError(exc.detail) from None
    data = msgpack.packb(obj, use_bin_type=True, datetime=False)
    if len(data) > MAX_DATAGRAM_BYTES:
        raise EncodeError(f"datagram is {len(data)} bytes, over {MAX_DATAGRAM_BYTES}")
    return data
