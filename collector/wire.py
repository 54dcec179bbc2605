"""Wire format v1: bytes <-> Datagram. No sockets, no clock.

The promise, in h11's fuzz wording: any bytes given to `decode` give a
`Datagram` or raise `DecodeError` with one reason from `REASONS`; nothing else
escapes, and the work done is bounded by the datagram size (at most
MAX_DATAGRAM_BYTES) because every msgpack length is capped before it is
allocated and nesting is capped at MAX_DEPTH.  docs/PROTOCOL.md is the
byte-level contract; this module is its reference implementation, shared by
the simulator and the collector.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, NamedTuple

import msgpack

try:  # the fast path's parser; without it every datagram takes the careful path
    import msgspec
except ImportError:  # pragma: no cover - msgspec is a declared dependency
    msgspec = None  # type: ignore[assignment]

from .errors import DecodeError, EncodeError

VERSION = 1
MAX_DATAGRAM_BYTES = 8192
MAX_ID_BYTES = 64
MAX_NAME_BYTES = 64
MAX_READINGS = 64
# Containers nest at most this deep (the top-level map is level 1).  Without
# a cap of our own the verdict on deep nesting would depend on the msgpack
# build: the C extension follows 1024 levels, the pure-Python fallback stops
# near 990 (Python's recursion limit).  Our own datagram is 2 deep.
MAX_DEPTH = 16
SEQ_MODULUS = 2**32  # seq and boot are unsigned 32-bit; seq wraps 2**32-1 -> 0
# Sensor times must fit an unsigned 32-bit seconds field (until 2106): a
# negative or absurd time is a broken clock, not data worth keeping.
MAX_TS = float(2**32)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # what SQLite INTEGER holds

# The fixed, documented set of reasons a datagram is rejected (PROTOCOL.md),
# in the order they are checked: a datagram with several faults gets the first.
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
_KNOWN_KEYS = frozenset(("v", "id", "seq", "boot", "ts", "r"))

# Everything msgpack's unpacker may raise on hostile bytes.  ValueError covers
# FormatError, StackError (nesting), ExtraData, UnicodeDecodeError and
# strict_map_key violations; RecursionError is how the pure-Python fallback
# fails on deep nesting; the rest are belt and braces.
_UNPACK_ERRORS = (ValueError, TypeError, OverflowError, RecursionError, MemoryError, msgpack.UnpackException)

# Memo of ids and reading names already found valid: a sensor sends the same
# few names in every datagram, and a set lookup is several times cheaper than
# the regex (bench/decode.py).  Capped so hostile names cannot grow it:
# past the cap, names are still checked, only no longer remembered.
_MEMO_MAX = 4096
_good_ids: set[str] = set()
_good_names: set[str] = set()


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


_new_datagram = tuple.__new__  # skips NamedTuple's Python-level __new__ (~0.1 us)


def _reject_ext(code: int, data: bytes) -> Any:
    # Valid Timestamps (-1) are decoded by msgpack itself; a type -1 ext of a
    # length no Timestamp has also lands here.
    raise DecodeError("not_msgpack", f"ext type {code} is not allowed")


def _show(value: Any) -> str:
    """A short, safe description of a hostile value for an error detail.

    Never repr() a container: a 1000-deep list raises RecursionError inside
    repr, and a wide one costs time for a message nobody reads in full.
    """
    t = type(value)
    if t is str or t is bytes:
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if value is None or t is int or t is float or t is bool:
        return repr(value)
    return t.__name__


def _too_deep(values: Any, level: int) -> bool:
    """True if any container among `values` (at `level`) nests past MAX_DEPTH.

    Iterative, so it cannot hit the recursion limit; its work is bounded by
    the number of objects, hence by the datagram size: the worst case, 8000
    empty containers in 8 KiB, measured ~1.3 ms here against ~0.25 ms for
    msgpack to build them.  Valid datagrams without unknown keys skip it.
    """
    stack = [(v, level) for v in values if type(v) is list or type(v) is dict]
    while stack:
        obj, lvl = stack.pop()
        if lvl > MAX_DEPTH:
            return True
        for child in obj.values() if type(obj) is dict else obj:
            if type(child) is list or type(child) is dict:
                stack.append((child, lvl + 1))
    return False


def _memo_match(value: Any, memo: set[str], pattern: re.Pattern[str]) -> bool:
    """Is `value` a str matching `pattern`?  Remembered in `memo` (capped)."""
    if type(value) is not str:  # also keeps unhashable lists out of the set lookup
        return False
    if value in memo:
        return True
    # The regexes are ASCII-only, so character count == byte count.
    if pattern.match(value) is None:
        return False
    if len(memo) < _MEMO_MAX:
        memo.add(value)
    return True


def _is_valid_id(value: Any) -> bool:
    return _memo_match(value, _good_ids, _ID_RE)


def _is_valid_name(value: Any) -> bool:
    return _memo_match(value, _good_names, _NAME_RE)


def _check_readings(r: Any) -> dict[str, int | float]:
    """Validate a readings map; returns it (copied only if a bool needed 0/1)."""
    if type(r) is not dict or not 0 < len(r) <= MAX_READINGS:
        raise DecodeError("bad_readings", "r must be a map of 1-64 readings")
    fixed = None
    for name, value in r.items():
        if name not in _good_names:
            if type(name) is not str or _NAME_RE.match(name) is None:
                raise DecodeError("bad_readings", f"bad reading name {_show(name)}")
            if len(_good_names) < _MEMO_MAX:
                _good_names.add(name)
        t = type(value)
        if t is float:
            if value - value != 0.0:  # NaN and +-inf; cheaper than math.isfinite
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
        # Judge the exact seconds field, not the float: Timestamp(2**32-1,
        # 999999999) is in range but rounds up to 2**32 as a float64.
        if not 0 <= ts.seconds < SEQ_MODULUS:
            raise DecodeError("bad_ts", f"Timestamp seconds {ts.seconds} not in [0, 2**32)")
        return ts.to_unix()
    if t is int:
        ts = float(ts) if 0 <= ts < MAX_TS else -1.0
    elif t is not float:
        raise DecodeError("bad_ts", f"ts is {t.__name__}")
    if not 0.0 <= ts < MAX_TS:  # also false for NaN
        raise DecodeError("bad_ts", "ts must be finite Unix seconds in [0, 2**32)")
    return ts


def _check_fields(obj: dict) -> Datagram:
    v = obj.get("v")
    if type(v) is not int or v != VERSION:
        raise DecodeError("bad_version", f"v={_show(v)}")
    sensor = obj.get("id")
    if not _is_valid_id(sensor):
        raise DecodeError("bad_id", f"id={_show(sensor)}")
    seq = obj.get("seq")
    if type(seq) is not int or not 0 <= seq < SEQ_MODULUS:
        raise DecodeError("bad_seq", f"seq={_show(seq)}")
    boot = obj.get("boot")
    if boot is not None and (type(boot) is not int or not 0 <= boot < SEQ_MODULUS):
        raise DecodeError("bad_boot", f"boot={_show(boot)}")
    ts = obj.get("ts")
    if ts is not None:
        ts = _check_ts(ts)
    readings = _check_readings(obj.get("r"))
    return _new_datagram(Datagram, (sensor, seq, boot, ts, readings))


def _decode_reference(data: bytes) -> Datagram:
    """The careful path: decode and validate any bytes, or raise DecodeError(reason).

    This is the definition of every verdict; `decode` answers the common valid
    shape faster and hands everything else here (tests/test_wire_fast.py
    checks that both give the same answer on mutated and random datagrams).
    """
    if len(data) > MAX_DATAGRAM_BYTES:
        raise DecodeError("too_large", f"{len(data)} bytes > {MAX_DATAGRAM_BYTES}")
    try:
        # msgpack caps every str/bin/array/map length at len(data) by default
        # (unpackb, C and fallback alike), so a lying length can never make it
        # allocate more than the datagram justifies; passing the four
        # max_*_len caps explicitly cost 0.2 us per call for no change.
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            timestamp=0,
            ext_hook=_reject_ext,
            max_ext_len=12,  # the largest Timestamp is 12 bytes
        )
    except DecodeError:
        raise
    except _UNPACK_ERRORS as exc:
        raise DecodeError("not_msgpack", type(exc).__name__) from None
    if type(obj) is not dict:
        if _too_deep((obj,), 1):
            raise DecodeError("not_msgpack", f"nested deeper than {MAX_DEPTH}")
        raise DecodeError("not_a_map", f"top level is {type(obj).__name__}")
    try:
        datagram = _check_fields(obj)
    except DecodeError:
        # Nesting is a property of the msgpack, so it outranks field faults
        # (and the verdict must not depend on which field was looked at).
        if _too_deep(obj.values(), 2):
            raise DecodeError("not_msgpack", f"nested deeper than {MAX_DEPTH}") from None
        raise
    # Valid fields are flat (r is level 2); only values of unknown keys, which
    # are otherwise ignored, can hide deep nesting.  Most datagrams have none.
    if len(obj) > 4 + (datagram.boot is not None) + (datagram.ts is not None):
        unknown = [value for key, value in obj.items() if key not in _KNOWN_KEYS]
        if _too_deep(unknown, 2):
            raise DecodeError("not_msgpack", f"nested deeper than {MAX_DEPTH}")
    return datagram


# --- the fast path ---------------------------------------------------------------------
#
# msgspec decodes the common shape straight into a typed Struct, checking
# types, ranges and lengths in C (bench/decode.py measures it against the
# careful path).  It is only ever trusted to ACCEPT: a datagram it takes is
# one the careful path takes too, with the same values, because every rule it
# cannot state as a type is checked here after it (the id and reading names,
# by the memo and regex the careful path uses), and anything else it meets (an unknown key, a bool, a
# Timestamp, trailing bytes, a name not yet seen) makes it give up, and the
# careful path judges the datagram afresh: verdicts and reasons are the
# careful path's alone.
if msgspec is not None:
    _U32 = Annotated[int, msgspec.Meta(ge=0, lt=SEQ_MODULUS)]
    _I64 = Annotated[int, msgspec.Meta(ge=_INT64_MIN, le=_INT64_MAX)]
    _TS = Annotated[float, msgspec.Meta(ge=0.0, lt=MAX_TS)]
    # Finite floats: NaN fails every comparison, so msgspec refuses it here
    # (tests/test_wire_fast.py checks NaN payloads, float32 NaN and +-inf).
    _F64 = Annotated[float, msgspec.Meta(ge=-1.7976931348623157e308, le=1.7976931348623157e308)]

    class _Common(msgspec.Struct, forbid_unknown_fields=True, gc=False):
        v: Literal[1]
        id: str
        seq: _U32
        r: Annotated[dict[str, _I64 | _F64], msgspec.Meta(min_length=1, max_length=MAX_READINGS)]
        boot: _U32 | None = None
        ts: _TS | None = None

    _fast_decode = msgspec.msgpack.Decoder(_Common).decode
else:  # pragma: no cover
    _fast_decode = None

_names_known = _good_names.issuperset

# The fast path's pieces for a caller that decodes a burst inline
# (IngestCore.receive_many): it may trust `fast_decode` only as `decode`
# does (size first, a valid id, valid reading names) and hands anything
# else to `decode`.
fast_decode = _fast_decode
is_valid_id = _is_valid_id
is_valid_name = _is_valid_name


def decode(data: bytes, _max=MAX_DATAGRAM_BYTES, _ids=_good_ids) -> Datagram:
    """Decode and validate one datagram, or raise DecodeError(reason).

    The same verdict as `_decode_reference` for any bytes, about 3x faster on
    the common valid shape (a memoized id and reading names, no bools, no
    Timestamp, no unknown keys).
    """
    if _fast_decode is not None and len(data) <= _max:
        try:
            d = _fast_decode(data)
        except Exception:  # noqa: BLE001 - anything unusual goes to the careful path
            pass
        else:
            # Reading names are only trusted when already memoized (one set
            # check in C); the careful path memoizes them on first sight.
            r = d.r
            sensor = d.id
            if (sensor in _ids or _is_valid_id(sensor)) and _names_known(r):
                return _new_datagram(Datagram, (sensor, d.seq, d.boot, d.ts, r))
    return _decode_reference(data)


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
