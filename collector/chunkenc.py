"""Chunk encoding: one sensor's run of datagrams <-> bytes. No sockets, no files.

A chunk holds the columns of up to MAX_ROWS datagrams of one sensor (one
boot), rows shared by every column: seqs, sensor times, receive times and one
column per metric.  `encode_chunk` and `decode_chunk` are exact inverses:
every float64 comes back bit for bit (-0.0, subnormals, inf, NaN payloads,
float32 values widened), every int exactly (the int64 range, so beyond 2**53),
an int stays an int and a float a float, and None (the datagram did not carry
that metric) stays None.  docs/SCHEMA.md "Chunk format" is the byte-level
contract; this module is its reference implementation.

How it gets small (the ideas of Gorilla, VLDB 2015, and ALP, SIGMOD 2024):
each float column is turned into integers, either decimal-scaled (ALP: the
smallest k with round(x*10**k)/10**k == x bit-exact for the column, the few
values that do not fit kept raw as exceptions) or, failing that, the float's
own 64 bits read as an integer (monotonic for timestamps, so deltas are small).
Each integer stream is stored raw, as deltas, as deltas of deltas or as
residuals from a steady clock (whichever deflates smallest), in the
narrowest fixed width that holds it, byte planes apart (Blosc's shuffle: the
high bytes, nearly all 0x00 or 0xFF, sit together), and the receive times as
their difference from the sensor times when that is smaller.  The body is
deflated once, with a new block (its own Huffman tables) at every byte
plane.  Fixed widths rather than varints because decoding is then
array.frombytes and itertools.accumulate, C loops: no Python loop runs per
value (bench/disk.py measures decode time).

Receive times compress best quantized to 1 us (round(now, 6)), as the
sensor's ms timestamps are: then they are stored as a few-ms difference from
ts; unquantized time.time() floats cost ~9 % more (bench workload, 1,024-row
chunks: 0.948 against 1.033 B/reading).

The promise on hostile bytes, in h11's wording: any bytes given to
`decode_chunk` give the columns or raise ChunkError, nothing else, and the
memory used is bounded by MAX_ROWS, MAX_METRICS and MAX_CELLS whatever the
blob declares.  A CRC-32 of the blob catches bit flips before anything else.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from array import array
from collections.abc import Collection
from itertools import accumulate, repeat
from itertools import count as count_from
from operator import add, mul, sub

import numpy as np

Number = int | float

VERSION = 1
MAX_ROWS = 65_536  # datagrams in one chunk
MAX_METRICS = 256  # collector/tuning.py MAX_SERIES_PER_SENSOR
MAX_NAME_BYTES = 255  # wire names are at most 64 bytes
MAX_CELLS = 2**21  # rows x (3 + metrics): bounds a decoded chunk (~64 MiB of Python objects)
MAX_DECIMALS = 18  # largest decimal scale tried; 10**18 < 2**63
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# The decompressed body can never be larger than this for MAX_CELLS cells:
# per cell at most 8 bytes of stream, 8+10 bytes as an exception, 2 bits of
# bitmaps; plus names and per-column headers.  Decompression stops past it.
_MAX_BODY = MAX_CELLS * 27 + MAX_METRICS * (MAX_NAME_BYTES + 64) + 64
ZLIB_LEVEL = 9

# Column flags (one byte per column)
_HAS_NULLS = 0x01
_KIND_SHIFT = 1  # bits 1-2: 0 all int, 1 all float, 2 mixed, 3 all null
_KIND_INT, _KIND_FLOAT, _KIND_MIXED, _KIND_EMPTY = 0, 1, 2, 3
_RELATIVE = 0x08  # float ints are stored as differences from the ts column's
# Float representation byte
_REP_BITS = 0xFF  # the float64's 64 bits as a signed int64
# Integer stream: transform (high nibble) and width code (low nibble)
_RAW, _DELTA, _DOD, _LINEAR = 0, 1, 2, 3
_HEADS = {_RAW: 0, _DELTA: 1, _DOD: 2, _LINEAR: 2}  # varints before the body
_SKIP = {_RAW: 0, _DELTA: 1, _DOD: 2, _LINEAR: 1}  # values the body does not hold
_WIDTHS = (0, 1, 2, 4, 8)
_TYPECODE = {1: "b", 2: "h", 4: "i", 8: "q"}
_LIMIT = {0: 0, 1: 2**7, 2: 2**15, 4: 2**31, 8: 2**63}
_BIG_ENDIAN = sys.byteorder == "big"
for _w, _tc in _TYPECODE.items():
    assert array(_tc).itemsize == _w, "this platform's array sizes are not 1/2/4/8"


class ChunkError(ValueError):
    """A blob that is not a valid chunk (corrupt, truncated, hostile or too large)."""


# ---------------------------------------------------------------- varints


def _uvarint(out: bytearray, n: int) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _svarint(out: bytearray, n: int) -> None:
    _uvarint(out, (n << 1) if n >= 0 else ((-n) << 1) - 1)  # zigzag, any size


class _Reader:
    """A bounds-checked cursor over the decompressed body."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise ChunkError("chunk body truncated")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def uvarint(self) -> int:
        n = shift = 0
        while True:
            b = self.byte()
            n |= (b & 0x7F) << shift
            if b < 0x80:
                return n
            shift += 7
            if shift > 70:
                raise ChunkError("chunk varint too long")

    def svarint(self) -> int:
        z = self.uvarint()
        return (z >> 1) if not z & 1 else -((z + 1) >> 1)

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise ChunkError("chunk body truncated")
        out = self.buf[self.pos : end]
        self.pos = end
        return out


# ---------------------------------------------------------- integer streams


def _width(body: list[int]) -> int | None:
    if not body:
        return 0
    lo, hi = min(body), max(body)
    if lo == hi == 0:
        return 0
    for w in _WIDTHS[1:]:
        if -_LIMIT[w] <= lo and hi < _LIMIT[w]:
            return w
    return None


def _pack_body(body: list[int], w: int) -> bytes:
    if w == 0:
        return b""
    arr = array(_TYPECODE[w], body)
    if _BIG_ENDIAN:
        arr.byteswap()
    raw = arr.tobytes()
    if w == 1:
        return raw
    return b"".join(raw[b::w] for b in range(w))  # byte planes, low byte first


def _int_stream_candidates(xs: list[int]):
    """(transform, heads, body, width) for each transform whose body fits int64."""
    n = len(xs)
    out = []
    w = _width(xs)
    if w is not None:
        out.append((_RAW, [], xs, w))
    if n >= 1:
        d = list(map(sub, xs[1:], xs))
        w = _width(d)
        if w is not None:
            out.append((_DELTA, xs[:1], d, w))
        if n >= 2:
            dd = list(map(sub, d[1:], d))
            w = _width(dd)
            if w is not None and _INT64_MIN <= d[0] <= _INT64_MAX:
                out.append((_DOD, [xs[0], d[0]], dd, w))
            # Residuals from a steady clock: x0 + i * (the median step).
            step = sorted(d)[len(d) // 2]
            x0 = xs[0]
            res = list(map(sub, xs[1:], count_from(x0 + step, step)))
            w = _width(res)
            if w is not None and _INT64_MIN <= step <= _INT64_MAX:
                out.append((_LINEAR, [x0, step], res, w))
    return out


def _cost(packed: bytes, w: int) -> int:
    """The deflated size of a packed body, each byte plane its own block as _deflate does it.

    Z_RLE at memLevel 1 allocates little (it only looks one byte back), so
    this is cheaper than counting byte frequencies in Python.
    """
    if w == 0:
        return 0
    n = len(packed) // w
    total = 0
    for b in range(w):
        c = zlib.compressobj(1, zlib.DEFLATED, -15, 1, zlib.Z_RLE)
        total += len(c.compress(packed[b * n : (b + 1) * n])) + len(c.flush())
    return total


def _proxy(transform: int, body: list[int], w: int) -> int:
    """A cheap stand-in for the deflated size: the bits the values need (C loops only)."""
    if w == 0 or not body:
        return 0
    n = len(body)
    if transform == _RAW:  # raw values cost their spread, not their magnitude
        body = map(sub, body, repeat(min(body)))
    return (sum(map(int.bit_length, body)) + n) // 8


def _choose_stream(xs: list[int], fast: bool) -> tuple:
    """(cost, transform, heads, packed, width) of the transform that stores xs smallest."""
    best = None
    for transform, heads, body, w in _int_stream_candidates(xs):
        head_cost = sum(len(_zz(h)) for h in heads)
        if fast:
            cost = _proxy(transform, body, w) + head_cost
            if best is None or cost < best[0]:
                best = (cost, transform, heads, body, w)
        else:
            packed = _pack_body(body, w)
            cost = _cost(packed, w) + head_cost
            if best is None or cost < best[0]:
                best = (cost, transform, heads, packed, w)
    if best is None:  # a caller bug: values were checked to be int64 before
        raise ValueError("integer stream does not fit int64")
    if fast:
        cost, transform, heads, body, w = best
        best = (cost, transform, heads, _pack_body(body, w), w)
    return best


def _write_stream(out: bytearray, choice: tuple) -> None:
    _, transform, heads, packed, w = choice
    out.append((transform << 4) | _WIDTHS.index(w))
    for h in heads:
        _svarint(out, h)
    marks = getattr(out, "marks", None)
    if marks is not None and w:
        n = len(packed) // w
        for b in range(w):
            marks.append(len(out) + b * n)
        marks.append(len(out) + len(packed))
    out += packed


def _zz_len(n: int) -> int:
    """len(_zz(n)): the bytes of n's zigzag varint."""
    return (((n << 1) if n >= 0 else ((-n) << 1) - 1).bit_length() + 6) // 7 or 1


def _zz(n: int) -> bytes:
    b = bytearray()
    _svarint(b, n)
    return bytes(b)


# ------------------------------------------- integer streams, vectorised
#
# The same choices as the list functions above, in numpy's C loops over
# rows of int64 (every column of a chunk at once: numpy's cost per call,
# not per value, is what remains): same candidates in the same order, same
# costs, same bytes.  Values under _SAFE in magnitude keep every delta,
# delta of delta and clock residual inside int64 (no wrap-around); a row
# with larger values (a float column stored as its raw bits) or a huge
# clock step takes the exact list functions.

_SAFE = 2**61
_LE_TYPE = {1: np.dtype("<i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}
_POW2 = np.array([1 << k for k in range(63)], dtype=np.int64)  # bit_length(v) = #(2**k <= v)


def _widths_2d(body: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """_width of each row of an int64 matrix (an int64 always fits: never None), and
    each row's smallest and largest value (0 and 0 for rows of no values)."""
    if not body.shape[1]:
        zeros = [0] * body.shape[0]
        return zeros, zeros, zeros
    los, his = body.min(axis=1).tolist(), body.max(axis=1).tolist()
    out = []
    for lo, hi in zip(los, his):
        if lo == hi == 0:
            out.append(0)
            continue
        for w in _WIDTHS[1:]:
            if -_LIMIT[w] <= lo and hi < _LIMIT[w]:
                out.append(w)
                break
    return out, los, his


def _pack_np(body: np.ndarray, w: int) -> bytes:
    if w == 0:
        return b""
    raw = body.astype(_LE_TYPE[w])
    if w == 1:
        return raw.tobytes()
    return raw.view(np.uint8).reshape(-1, w).T.tobytes()  # byte planes, low byte first


_BIT_LENGTH_16 = np.array([v.bit_length() for v in range(2**16)], dtype=np.uint8)


def _bit_lengths(a: np.ndarray, top: int) -> np.ndarray:
    """int.bit_length of each value of a (|v| <= top < 2**62), summed per row."""
    if not a.size:
        return np.zeros(a.shape[0], dtype=np.int64)
    if top < 2**16:  # the usual small deltas: a table
        return _BIT_LENGTH_16[np.abs(a)].sum(axis=1, dtype=np.int64)
    a = np.abs(a)
    if top < 2**53:  # exact as floats: frexp's exponent is the bit length
        return np.frexp(a.astype(np.float64))[1].sum(axis=1, dtype=np.int64)
    return np.searchsorted(_POW2, a.ravel(), side="right").reshape(a.shape).sum(axis=1)


def _choose_streams(rows: list[np.ndarray], fast: bool) -> list[tuple]:
    """_choose_stream of each int64 row (all of one length): the same choices and bytes.
    Equal rows (the bucket starts and counts of a chunk's minute blocks) are chosen once."""
    keys = [row.tobytes() for row in rows]
    unique = dict.fromkeys(keys)
    if len(unique) < len(rows):
        first = {}
        for key, row in zip(keys, rows):
            first.setdefault(key, row)
        chosen = dict(zip(first, _choose_streams(list(first.values()), fast)))
        return [chosen[key] for key in keys]
    x = np.stack(rows)
    n = x.shape[1]
    if n:
        fits = ((x.max(axis=1) < _SAFE) & (x.min(axis=1) > -_SAFE)).tolist()
    else:
        fits = [True] * len(rows)
    out: list = [None] * len(rows)
    batch = [i for i, ok in enumerate(fits) if ok]
    for i, ok in enumerate(fits):
        if not ok:
            out[i] = _choose_stream(rows[i].tolist(), fast)
    if batch:
        for i, choice in zip(batch, _choose_2d(x[batch] if len(batch) < len(rows) else x, fast)):
            out[i] = choice
    return out


def _choose_2d(x: np.ndarray, fast: bool) -> list[tuple]:
    r, n = x.shape
    # (transform, heads per row, body matrix, (widths, lows, highs)) in _int_stream_candidates' order
    cands: list = [(_RAW, [[]] * r, x, _widths_2d(x))]
    if n >= 1:
        d = x[:, 1:] - x[:, :-1]
        x0 = x[:, 0].tolist()
        cands.append((_DELTA, [[a] for a in x0], d, _widths_2d(d)))
        if n >= 2:
            dd = d[:, 1:] - d[:, :-1]
            cands.append((_DOD, [[a, b] for a, b in zip(x0, d[:, 0].tolist())], dd, _widths_2d(dd)))
            half = (n - 1) // 2
            steps = np.partition(d, half, axis=1)[:, half]  # sorted(d)[len(d) // 2]
            step_list = steps.tolist()
            if max(map(abs, step_list)) * n >= _SAFE:  # a huge clock step: the exact list arithmetic
                return [_choose_stream(row, fast) for row in x.tolist()]
            res = (x[:, 1:] - x[:, :1]) - steps[:, None] * np.arange(1, n, dtype=np.int64)
            cands.append((_LINEAR, [[a, s] for a, s in zip(x0, step_list)], res, _widths_2d(res)))
    proxies = []
    if fast:
        for transform, _, body, (_, los, his) in cands:
            if transform == _RAW and n:  # raw values cost their spread
                body = body - x.min(axis=1, keepdims=True)
                top = max(h - lo for lo, h in zip(los, his))
            else:
                top = max(max(map(abs, los)), max(map(abs, his)))
            proxies.append(((_bit_lengths(body, top) + body.shape[1]) // 8).tolist())
    cands = [(transform, heads, body, sizes[0]) for transform, heads, body, sizes in cands]
    out = []
    for i in range(r):
        best = None
        for c, (transform, heads, body, widths) in enumerate(cands):
            w = widths[i]
            head_cost = sum(map(_zz_len, heads[i]))
            if fast:
                cost = (proxies[c][i] if w else 0) + head_cost
                if best is None or cost < best[0]:
                    best = (cost, transform, heads[i], body[i], w)
            else:
                packed = _pack_np(body[i], w)
                cost = _cost(packed, w) + head_cost
                if best is None or cost < best[0]:
                    best = (cost, transform, heads[i], packed, w)
        assert best is not None
        if fast:
            cost, transform, heads, body, w = best
            best = (cost, transform, heads, _pack_np(body, w), w)
        out.append(best)
    return out


def _choose_stream_np(xs: np.ndarray, fast: bool) -> tuple:
    return _choose_streams([xs], fast)[0]


def _stream_frame(r: _Reader, count: int) -> tuple[int, int, int]:
    """An integer stream's code byte, checked against its count: (transform, width code, heads)."""
    code = r.byte()
    transform, wcode = code >> 4, code & 0x0F
    if transform not in _HEADS or wcode >= len(_WIDTHS):
        raise ChunkError(f"chunk integer stream code {code:#x}")
    nheads = _HEADS[transform]
    if count < max(_SKIP[transform], 1 if nheads else 0):
        raise ChunkError("chunk integer stream shorter than its transform")
    return transform, wcode, nheads


def _decode_int_stream(r: _Reader, count: int, as_array: bool = False):
    """An integer stream's values: a list, or an int64 array when as_array (numpy's
    cumulative sums when no partial sum can leave int64, else the exact list arithmetic)."""
    transform, wcode, nheads = _stream_frame(r, count)
    heads = [r.svarint() for _ in range(nheads)]
    for h in heads:
        if not _INT64_MIN <= h <= _INT64_MAX:
            raise ChunkError("chunk integer stream head out of int64 range")
    n = count - _SKIP[transform]
    w = _WIDTHS[wcode]
    if as_array:
        body_np = _unpack_np(r.take(n * w), n, w)
        lim = _LIMIT[w]
        if transform == _RAW:
            return body_np
        if transform == _DELTA and abs(heads[0]) + (n + 1) * lim <= _INT64_MAX:
            xs = np.empty(n + 1, dtype=np.int64)
            xs[0] = heads[0]
            np.cumsum(body_np, out=xs[1:])
            xs[1:] += heads[0]
            return xs
        if transform == _DOD and abs(heads[0]) + (n + 1) * abs(heads[1]) + (n + 1) ** 2 * lim <= _INT64_MAX:
            inner = np.empty(n + 1, dtype=np.int64)
            inner[0] = heads[1]
            np.cumsum(body_np, out=inner[1:])
            inner[1:] += heads[1]
            xs = np.empty(n + 2, dtype=np.int64)
            xs[0] = heads[0]
            np.cumsum(inner, out=xs[1:])
            xs[1:] += heads[0]
            return xs
        if transform == _LINEAR and abs(heads[0]) + (n + 1) * abs(heads[1]) + lim <= _INT64_MAX:
            x0, step = heads
            xs = np.empty(n + 1, dtype=np.int64)
            xs[0] = x0
            xs[1:] = body_np + (x0 + step * np.arange(1, n + 1, dtype=np.int64))
            return xs
        body = body_np.tolist()  # sums that may leave int64 (a forged blob): the exact arithmetic
    elif w == 0:
        body = repeat(0, n)
        if transform == _RAW:
            return [0] * n
    else:
        raw = r.take(n * w)
        if w > 1:
            buf = bytearray(n * w)
            for b in range(w):
                buf[b::w] = raw[b * n : (b + 1) * n]
            raw = buf
        arr = array(_TYPECODE[w])
        arr.frombytes(raw)
        if _BIG_ENDIAN:
            arr.byteswap()
        if transform == _RAW:
            return arr.tolist()
        body = arr  # the transforms below iterate it once: no list of it needed
    lim = _LIMIT[w]
    if transform == _DELTA:
        xs = list(accumulate(body, initial=heads[0]))
        bound = abs(heads[0]) + n * lim
    elif transform == _LINEAR:
        x0, step = heads
        xs = [x0]
        xs += map(add, body, count_from(x0 + step, step))
        bound = abs(x0) + n * abs(step) + lim
    else:
        xs = list(accumulate(accumulate(body, initial=heads[1]), initial=heads[0]))
        bound = abs(heads[0]) + n * abs(heads[1]) + n * n * lim
    # Sums of int64 deltas can leave int64 only in a forged blob; the
    # bound saves the scan for nearly every real one.
    if bound > _INT64_MAX and (max(xs) > _INT64_MAX or min(xs) < _INT64_MIN):
        raise ChunkError("chunk integer stream leaves int64 range")
    return np.array(xs, dtype=np.int64) if as_array else xs


def _unpack_np(raw: bytes, n: int, w: int) -> np.ndarray:
    """Byte planes (low byte first) of n little-endian w-byte ints -> int64."""
    if w == 0:
        return np.zeros(n, dtype=np.int64)
    planes = np.frombuffer(raw, dtype=np.uint8)
    if w > 1:
        planes = planes.reshape(w, n).T.copy()
    return planes.view(_LE_TYPE[w]).reshape(n).astype(np.int64)


# ------------------------------------------------------------ float streams

_POW10 = [10.0**k for k in range(MAX_DECIMALS + 1)]  # all exact (10**22 is the last exact one)


def _bits(xs: list[float]) -> bytes:
    return array("d", xs).tobytes()


def _decimal_ints(xs: list[float], k: int) -> tuple[list[int], list[tuple[int, float]]]:
    """n_i with n_i / 10**k == x_i bit-exact, and the exceptions (index, x) that have none."""
    f = _POW10[k]
    try:  # the common case, in C loops: every value fits
        ns = list(map(round, map(f.__mul__, xs)))
        if max(ns) < 2**62 and min(ns) > -(2**62) and _bits(list(map(f.__rtruediv__, ns))) == _bits(xs):
            return ns, []
    except (OverflowError, ValueError):
        pass
    ns: list[int] = []
    exc: list[tuple[int, float]] = []
    prev = 0
    for i, x in enumerate(xs):
        try:
            n = round(x * f)
        except (OverflowError, ValueError):  # inf, NaN
            n = None
        if n is not None and -(2**62) < n < 2**62:
            y = n / f
            if y == x and (y != 0.0 or math.copysign(1.0, x) == 1.0):
                ns.append(n)
                prev = n
                continue
        exc.append((i, x))
        ns.append(prev)  # a filler that keeps deltas small; the exception overwrites it
    return ns, exc


def _min_decimals(x: float) -> int | None:
    if x != x or x in (math.inf, -math.inf):
        return None
    for k, f in enumerate(_POW10):
        xf = x * f
        if not -(2.0**62) < xf < 2.0**62:
            return None
        y = round(xf) / f
        if y == x and (y != 0.0 or math.copysign(1.0, x) == 1.0):
            return k
    return None


def _choose_decimals(xs: list[float]) -> int | None:
    """ALP's first level: the column's decimal scale, from a sample."""
    step = max(1, len(xs) // 32)
    ks = [_min_decimals(x) for x in xs[::step]]
    good = [k for k in ks if k is not None]
    if len(good) * 2 < len(ks) or not good:
        return None
    return max(good)


def _float_ints(xs: list[float]) -> tuple[int, list[int], list[tuple[int, float]]]:
    """(rep, ints, exceptions) for a float column: decimal-scaled if that is exact enough."""
    k = _choose_decimals(xs)
    if k is not None:
        ns, exc = _decimal_ints(xs, k)
        if len(exc) * 8 <= len(xs):  # more than 1 in 8 exceptions: the raw bits do better
            return k, ns, exc
    arr = array("q")
    arr.frombytes(_bits(xs))
    return _REP_BITS, arr.tolist(), []


# --------------------------------------------- float streams, vectorised

_POW10_NP = np.array(_POW10)
_TWO62 = 2.0**62


def _float_ints_2d(f: np.ndarray) -> list[tuple[int, np.ndarray, list[tuple[int, float]]]]:
    """_float_ints of each row of a float64 matrix (columns of one length): ALP's
    scale detection for every row and every scale of the sample at once."""
    rows, n = f.shape
    s = f[:, :: max(1, n // 32)]
    scales = _POW10_NP[:, None, None]
    with np.errstate(all="ignore"):
        xf = scales * s  # [k, row, i]: x * 10**k
        inside = np.abs(xf) < _TWO62  # False for NaN and inf
        y = np.rint(xf) / scales + 0.0  # + 0.0: round() gives an int, so its zero is never -0.0
        # y == x bit for bit: -0.0 never matches (round loses the sign), 0.0 and the rest as ==
        match = inside & (y.view(np.int64) == s.view(np.int64))
    stop = match | ~inside  # _min_decimals returns at the first of these, a k or None
    first = stop.argmax(axis=0)
    good = match.reshape(len(_POW10), -1)[first.ravel(), np.arange(first.size)].reshape(first.shape)
    ngood = good.sum(axis=1).tolist()
    kmax = np.where(good, first, -1).max(axis=1).tolist()
    ks = [k if g and g * 2 >= s.shape[1] else None for k, g in zip(kmax, ngood)]
    out: list = [None] * rows
    dec = [i for i, k in enumerate(ks) if k is not None]
    if dec:
        fk = _POW10_NP[[ks[i] for i in dec]][:, None]
        fd = f[dec]
        with np.errstate(all="ignore"):
            r = np.rint(fd * fk)
            inside = np.abs(r) < _TWO62
            ns = np.where(inside, r, 0.0).astype(np.int64)
            y = ns.astype(np.float64) / fk  # from an int: never -0.0
            ok = inside & (y.view(np.int64) == fd.view(np.int64))  # bit for bit, as _decimal_ints checks
        for j, (i, clean) in enumerate(zip(dec, ok.all(axis=1).tolist())):
            if clean:
                out[i] = (ks[i], ns[j], [])
                continue
            exc, filled = _exceptions(f[i], ns[j], ok[j])
            if len(exc) * 8 <= n:  # more than 1 in 8 exceptions: the raw bits do better
                out[i] = (ks[i], filled, exc)
    for i in range(rows):
        if out[i] is None:
            out[i] = (_REP_BITS, np.ascontiguousarray(f[i]).view(np.int64), [])
    return out


def _exceptions(xs: np.ndarray, ns: np.ndarray, ok: np.ndarray) -> tuple[list[tuple[int, float]], np.ndarray]:
    """_decimal_ints' exceptions (index, x) and integers: an exception repeats the last good value."""
    bad = np.flatnonzero(~ok)
    exc = list(zip(bad.tolist(), xs[bad].tolist()))
    last_good = np.where(ok, np.arange(len(xs)), -1)
    np.maximum.accumulate(last_good, out=last_good)
    return exc, np.where(last_good >= 0, ns[last_good], 0)


def _float_ints_np(xs: np.ndarray) -> tuple[int, np.ndarray, list[tuple[int, float]]]:
    return _float_ints_2d(xs[None, :])[0]


def _ints_to_floats(rep: int, ints: list[int]) -> list[float]:
    if rep == _REP_BITS:
        arr = array("q", ints)
        out = array("d")
        out.frombytes(arr.tobytes())
        return out.tolist()
    if rep > MAX_DECIMALS:
        raise ChunkError(f"chunk float representation {rep}")
    f = _POW10[rep]
    if rep == 0:
        return list(map(float, ints))
    return list(map(f.__rtruediv__, ints))


def _encode_exceptions(out: bytearray, exc: list[tuple[int, float]]) -> None:
    _uvarint(out, len(exc))
    last = 0
    for i, x in exc:
        _uvarint(out, i - last)
        last = i
        out += struct.pack("<d", x)


def _decode_exceptions(r: _Reader, count: int) -> list[tuple[int, float]]:
    n = r.uvarint()
    if n > count:
        raise ChunkError("chunk has more exceptions than values")
    out = []
    i = 0
    for _ in range(n):
        i += r.uvarint()
        if i >= count:
            raise ChunkError("chunk exception index out of range")
        out.append((i, struct.unpack("<d", r.take(8))[0]))
    return out


# ----------------------------------------------------------------- bitmaps


def _bitmap(flags: list[bool]) -> bytes:
    out = bytearray((len(flags) + 7) // 8)
    for i, f in enumerate(flags):
        if f:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


_BYTE_BITS = [tuple(bool(b >> j & 1) for j in range(8)) for b in range(256)]


def _unbitmap(raw: bytes, n: int) -> list[bool]:
    bits: list[bool] = []
    for b in raw:
        bits.extend(_BYTE_BITS[b])
    if any(bits[n:]):
        raise ChunkError("chunk bitmap has bits past its end")
    return bits[:n]


# ----------------------------------------------------------------- columns

_TYPES = {int, float, type(None)}


def _check_column(name: str, col: list, rows: int) -> set:
    """Refuse what cannot be stored; returns the set of the column's value types."""
    if len(col) != rows:
        raise ValueError(f"column {name} has {len(col)} values for {rows} rows")
    types = set(map(type, col))
    if not types <= _TYPES:
        bad = (types - _TYPES).pop()
        raise TypeError(f"column {name}: {bad.__name__} is not int, float or None")
    if int in types:
        ints = [v for v in col if type(v) is int]
        if min(ints) < _INT64_MIN or max(ints) > _INT64_MAX:
            raise ValueError(f"column {name}: an int is out of int64 range")
    return types


class _Encoded:
    """What the encoder keeps of a float column so another can be stored relative to it."""

    __slots__ = ("rep", "ints")

    def __init__(self, rep: int | None = None, ints: np.ndarray | None = None) -> None:
        self.rep = rep
        self.ints = ints


_FLOAT_ONLY = {float}
_INT_ONLY = {int}


class _Col:
    """A column as the encoder takes it: which rows have a value, and the int and float values apart."""

    __slots__ = ("rows", "present", "isint", "ints", "floats")

    def __init__(self, rows: int, present, isint, ints, floats) -> None:
        # Lists under SMALL_ROWS rows, numpy arrays (bool, int64, float64) from there on.
        self.rows = rows
        self.present = present  # bool per row, or None when every row has a value
        self.isint = isint  # bool per value (True: an int), or None when the values are of one type
        self.ints = ints  # the int values in row order
        self.floats = floats  # the float values in row order


_NO_INTS = np.zeros(0, dtype=np.int64)
_NO_FLOATS = np.zeros(0, dtype=np.float64)


# Under this many rows (a minute block has ~17) a column stays a list and
# takes the list functions: numpy's per-call cost is more than the loops.
SMALL_ROWS = 64


def _col_from_list(col: list, types: set) -> _Col:
    rows = len(col)
    if rows >= SMALL_ROWS:
        return _col_array(col, types)
    if types == _FLOAT_ONLY:
        return _Col(rows, None, None, [], col)
    if types == _INT_ONLY:
        return _Col(rows, None, None, col, [])
    present = [v for v in col if v is not None]
    ints = [v for v in present if type(v) is int]
    floats = [v for v in present if type(v) is float]
    return _Col(
        rows,
        [v is not None for v in col] if len(present) != rows else None,
        [type(v) is int for v in present] if ints and floats else None,
        ints,
        floats,
    )


def _col_array(col: list, types: set) -> _Col:
    """A column as arrays (from SMALL_ROWS rows on, and in encode_many)."""
    rows = len(col)
    if types == _FLOAT_ONLY:
        return _Col(rows, None, None, _NO_INTS, np.array(col, dtype=np.float64))
    if types == _INT_ONLY:
        return _Col(rows, None, None, np.array(col, dtype=np.int64), _NO_FLOATS)
    present = [v for v in col if v is not None]
    ints = [v for v in present if type(v) is int]
    floats = [v for v in present if type(v) is float]
    return _Col(
        rows,
        np.array([v is not None for v in col], dtype=bool) if len(present) != rows else None,
        np.array([type(v) is int for v in present], dtype=bool) if ints and floats else None,
        np.array(ints, dtype=np.int64),
        np.array(floats, dtype=np.float64),
    )


def _col_from_floats(values: np.ndarray) -> _Col:
    """A float64 column where NaN means no value (a head's metric column)."""
    present = values == values
    if present.all():
        return _Col(len(values), None, None, _NO_INTS, values)
    return _Col(len(values), present, None, _NO_INTS, values[present])


def _bitmap_any(flags) -> bytes:
    if isinstance(flags, list):
        return _bitmap(flags)
    return np.packbits(flags, bitorder="little").tobytes()


def _amax(a: np.ndarray) -> int:
    return max(int(a.max()), -int(a.min())) if len(a) else 0


def _relative_np(fints, base, m: int):
    """fints - base * m exactly, or None when a difference leaves int64."""
    if isinstance(fints, list):
        diff = list(map(sub, fints, map(mul, base, repeat(m)) if m != 1 else base))
        return diff if _width(diff) is not None else None
    if _amax(fints) < 2**62 and _amax(base) * m < 2**62:
        return fints - base * m if m != 1 else fints - base
    exact = list(map(sub, fints.tolist(), [b * m for b in base.tolist()]))
    return np.array(exact, dtype=np.int64) if _width(exact) is not None else None


def _float_ints_any(xs) -> tuple:
    return _float_ints(xs) if isinstance(xs, list) else _float_ints_np(xs)


def _choose_stream_any(xs, fast: bool) -> tuple:
    return _choose_stream(xs, fast) if isinstance(xs, list) else _choose_stream_np(xs, fast)


def _prepare(cols: list[_Col], pairs: list[tuple[int, int]], fast: bool) -> list[dict]:
    """What _encode_column computes for each column of arrays with a value in every row,
    computed for all of them together (all of one length): (rep, ints, exceptions) of the
    float columns in one pass, then every integer stream's choice in one pass, the
    (ts, received) pairs' relative streams included."""
    pre: list[dict] = [{} for _ in cols]
    plain = [
        i
        for i, c in enumerate(cols)
        if c.present is None and isinstance(c.floats, np.ndarray) and len(c.floats) and not len(c.ints)
    ]
    if plain:
        for i, fl in zip(plain, _float_ints_2d(np.stack([cols[i].floats for i in plain]))):
            pre[i]["float"] = fl
    rows, keys = [], []
    for i, c in enumerate(cols):
        if c.present is None and isinstance(c.ints, np.ndarray) and len(c.ints) and not len(c.floats):
            rows.append(c.ints)
            keys.append((i, "ints"))
        if "float" in pre[i]:
            rows.append(pre[i]["float"][1])
            keys.append((i, "floats"))
    for base, i in pairs:  # received stored relative to ts when that is smaller
        if "float" in pre[base] and "float" in pre[i]:
            m = _rescale(pre[base]["float"][0], pre[i]["float"][0])
            diff = _relative_np(pre[i]["float"][1], pre[base]["float"][1], m) if m is not None else None
            pre[i]["relative"] = None
            if diff is not None:
                rows.append(diff)
                keys.append((i, "relative"))
    if rows:
        for (i, key), choice in zip(keys, _choose_streams(rows, fast)):
            pre[i][key] = choice
    return pre


def _encode_column(
    out: bytearray, col: _Col, base: _Encoded | None, fast: bool, pre: dict | None = None, chosen: list | None = None
) -> _Encoded:
    pre = pre or {}
    nints, nfloats = len(col.ints), len(col.floats)
    has_nulls = col.present is not None
    if not nints + nfloats:
        kind = _KIND_EMPTY
    elif not nfloats:
        kind = _KIND_INT
    elif not nints:
        kind = _KIND_FLOAT
    else:
        kind = _KIND_MIXED
    rep = 0
    relative = False
    if nfloats:
        rep, fints, exc = pre["float"] if "float" in pre else _float_ints_any(col.floats)
        choice = pre["floats"] if "floats" in pre else _choose_stream_any(fints, fast)
        if "relative" in pre:
            other = pre["relative"]
        else:
            other = None
            m = _rescale(base.rep, rep) if base is not None and base.ints is not None else None
            if m is not None and len(base.ints) == nfloats:
                diff = _relative_np(fints, base.ints, m)
                if diff is not None:
                    other = _choose_stream_any(diff, fast)
        if other is not None and other[0] < choice[0]:
            relative = True
            choice = other
    flags = (_HAS_NULLS if has_nulls else 0) | (kind << _KIND_SHIFT) | (_RELATIVE if relative else 0)
    out.append(flags)
    if col.present is not None:
        out += _bitmap_any(col.present)
    if kind == _KIND_MIXED:
        out += _bitmap_any(col.isint)
    if nints:
        ichoice = pre["ints"] if "ints" in pre else _choose_stream_any(col.ints, fast)
        _write_stream(out, ichoice)
    if nfloats:
        out.append(rep)
        _encode_exceptions(out, exc)
        _write_stream(out, choice)
    if chosen is not None:  # what encode_reusing may try on the next chunk: one kind, every row, no exception
        if has_nulls or kind not in (_KIND_INT, _KIND_FLOAT) or (nfloats and exc):
            chosen.append(None)
        elif kind == _KIND_INT:
            chosen.append((None, ichoice[1], ichoice[4], False))
        else:
            chosen.append((rep, choice[1], choice[4], relative))
    return _Encoded(rep, fints) if nfloats and not has_nulls and not nints else _Encoded()


def _rescale(base_rep: int | None, rep: int) -> int | None:
    """The factor that brings the base column's integers to this column's scale, if any does."""
    if base_rep is None:
        return None
    if base_rep == rep == _REP_BITS:
        return 1
    if _REP_BITS in (base_rep, rep) or rep < base_rep:
        return None
    return 10 ** (rep - base_rep)


def _decode_column(r: _Reader, rows: int, base: tuple | None) -> tuple[list, tuple | None]:
    flags = r.byte()
    if flags & ~(_HAS_NULLS | (3 << _KIND_SHIFT) | _RELATIVE):
        raise ChunkError(f"chunk column flags {flags:#x}")
    kind = (flags >> _KIND_SHIFT) & 3
    if flags & _HAS_NULLS:
        mask = _unbitmap(r.take((rows + 7) // 8), rows)
        count = sum(mask)
    else:
        mask = None
        count = rows
    if kind == _KIND_EMPTY:
        if count:
            raise ChunkError("chunk column declared empty has values")
        return [None] * rows, None
    if kind == _KIND_MIXED:
        isint = _unbitmap(r.take((count + 7) // 8), count)
        nints = sum(isint)
    else:
        isint = None
        nints = count if kind == _KIND_INT else 0
    nfloats = count - nints
    as_array = count >= SMALL_ROWS  # numpy from here on; a list's loops are cheaper below
    ints = _decode_int_stream(r, nints, as_array) if nints else []
    floats: list = []
    fints = None
    if nfloats:
        rep = r.byte()
        if rep > MAX_DECIMALS and rep != _REP_BITS:
            raise ChunkError(f"chunk float representation {rep}")
        exc = _decode_exceptions(r, nfloats)
        fints = _decode_int_stream(r, nfloats, as_array)
        if flags & _RELATIVE:
            m = _rescale(base[0], rep) if base is not None else None
            if m is None or len(base[1]) != nfloats:
                raise ChunkError("chunk relative column has no matching base")
            fints = _add_relative(fints, base[1], m)
        floats = _ints_to_floats_np(rep, fints) if as_array else _ints_to_floats(rep, fints)
        for i, x in exc:
            floats[i] = x
    elif flags & _RELATIVE:
        raise ChunkError("chunk relative column without floats")
    if as_array:
        ints = ints.tolist() if nints else []
        floats = floats.tolist() if nfloats else []
    if kind == _KIND_INT:
        values = ints
    elif kind == _KIND_FLOAT:
        values = floats
    else:
        if nints == 0 or nfloats == 0:
            raise ChunkError("chunk mixed column is not mixed")
        it_i, it_f = iter(ints), iter(floats)
        values = [next(it_i) if t else next(it_f) for t in isint]
    if mask is not None:
        it = iter(values)
        values = [next(it) if m else None for m in mask]
    usable_base = (rep, fints) if kind == _KIND_FLOAT and mask is None and nfloats else None
    return values, usable_base


def _add_relative(fints, base, m: int):
    """fints + base * m, refused when a value leaves int64 (lists or int64 arrays, as fints is)."""
    if isinstance(fints, np.ndarray):
        base = np.asarray(base, dtype=np.int64)
        if _amax(fints) + _amax(base) * m <= _INT64_MAX:
            return fints + base * m if m != 1 else fints + base
        exact = list(map(add, fints.tolist(), [b * m for b in base.tolist()]))
    else:
        if isinstance(base, np.ndarray):
            base = base.tolist()
        exact = list(map(add, fints, map(mul, base, repeat(m)) if m != 1 else base))
    if max(exact) > _INT64_MAX or min(exact) < _INT64_MIN:
        raise ChunkError("chunk relative column leaves int64 range")
    return np.array(exact, dtype=np.int64) if isinstance(fints, np.ndarray) else exact


def _ints_to_floats_np(rep: int, ints: np.ndarray) -> np.ndarray:
    """_ints_to_floats of an int64 array (a new array: exceptions are written into it)."""
    if rep == _REP_BITS:
        return ints.view(np.float64).copy()
    if rep > MAX_DECIMALS:
        raise ChunkError(f"chunk float representation {rep}")
    if rep == 0:
        return ints.astype(np.float64)
    return ints.astype(np.float64) / _POW10[rep]


def _skip_int_stream(r: _Reader, count: int) -> None:
    """Past an integer stream without decoding it (the checks of _decode_int_stream on its frame)."""
    transform, wcode, nheads = _stream_frame(r, count)
    for _ in range(nheads):
        r.svarint()
    r.take((count - _SKIP[transform]) * _WIDTHS[wcode])


def _skip_column(r: _Reader, rows: int) -> None:
    """Past a column without building its values: its frame is read as _decode_column reads it."""
    flags = r.byte()
    if flags & ~(_HAS_NULLS | (3 << _KIND_SHIFT) | _RELATIVE):
        raise ChunkError(f"chunk column flags {flags:#x}")
    kind = (flags >> _KIND_SHIFT) & 3
    count = sum(_unbitmap(r.take((rows + 7) // 8), rows)) if flags & _HAS_NULLS else rows
    if kind == _KIND_EMPTY:
        if count:
            raise ChunkError("chunk column declared empty has values")
        return
    if kind == _KIND_MIXED:
        nints = sum(_unbitmap(r.take((count + 7) // 8), count))
    else:
        nints = count if kind == _KIND_INT else 0
    nfloats = count - nints
    if nints:
        _skip_int_stream(r, nints)
    if nfloats:
        rep = r.byte()
        if rep > MAX_DECIMALS and rep != _REP_BITS:
            raise ChunkError(f"chunk float representation {rep}")
        _decode_exceptions(r, nfloats)
        _skip_int_stream(r, nfloats)
    elif flags & _RELATIVE:
        raise ChunkError("chunk relative column without floats")


# -------------------------------------------------------------- the chunk


class _Body(bytearray):
    """The body being built, with the offsets where a new deflate block should start."""

    marks: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.marks = []


# A new deflate block (its own Huffman tables) at every byte plane and
# column: planes differ (a high byte is nearly constant, a low byte nearly
# random), and one table for all cost 25 % (bench/disk.py, 1.32 -> 1.06 B
# per reading).  Blocks under MIN_BLOCK bytes are not worth a table.
MIN_BLOCK = 64


def _deflate(body: _Body, fast: bool) -> bytes:
    """Raw deflate of the body: Z_RLE wins on byte planes; the default strategy is tried too unless fast."""
    strategies = (zlib.Z_RLE,) if fast else (zlib.Z_RLE, zlib.Z_DEFAULT_STRATEGY)
    return min((_deflate_with(body, strategy) for strategy in strategies), key=len)


def _deflate_with(body: _Body, strategy: int) -> bytes:
    c = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, -15, 9, strategy)
    parts = []
    last = 0
    for m in sorted(set(body.marks)):
        if m - last >= MIN_BLOCK:
            parts.append(c.compress(body[last:m]))
            parts.append(c.flush(zlib.Z_BLOCK))
            last = m
    parts.append(c.compress(body[last:]))
    parts.append(c.flush())
    return b"".join(parts)


def encode_chunk(
    seqs: list[int],
    ts: list[float],
    received: list[float],
    metrics: dict[str, list[Number | None]],
    *,
    fast: bool = False,
) -> bytes:
    """One chunk's columns -> bytes (decode_chunk is the exact inverse).

    Every column has one value per datagram (row); a metric's value is None
    where that datagram did not carry it.  Values are int (int64 range) or
    float (any float64, NaN and inf included); seqs, ts and received too
    (None is allowed there as well, and round-trips).  Raises ValueError or
    TypeError on input it cannot represent (the caller's bug, never the
    peer's: wire.py admits nothing else).

    fast=True picks each column's transform from the bits its values need
    instead of deflating every candidate: several times cheaper, a few per
    cent larger (bench/disk.py prints both).  Either decodes the same way.
    """
    rows = len(seqs)
    _check_shape(rows, len(metrics))
    seq_types = _check_column("seqs", seqs, rows)
    ts_types = _check_column("ts", ts, rows)
    received_types = _check_column("received", received, rows)
    cols = {name: _col_from_list(col, _check_column(name, col, rows)) for name, col in _named(metrics).items()}
    return _encode_cols(
        _col_from_list(seqs, seq_types),
        _col_from_list(ts, ts_types),
        _col_from_list(received, received_types),
        cols,
        fast,
    )


def encode_row(seq: int, metrics: dict[str, Number], *, fast: bool = False) -> bytes:
    """encode_chunk([seq], [None], [None], {name: [v]}, fast=fast), the same bytes, cheaper:
    a chunk of one row with no times, each value an int or a float (a head's minute block
    when its datagrams fall in one minute, nearly every block at ingest rates).  With one
    value a stream is always stored raw (fast) and a float's scale is the value's own, so
    the candidate search of the general encoder has nothing to choose."""
    if not fast or type(seq) is not int or not _ONE_LOW < seq < _ONE_HIGH:
        return encode_chunk([seq], [None], [None], {k: [v] for k, v in metrics.items()}, fast=fast)
    _check_shape(1, len(metrics))
    body = bytearray(b"\x01")
    _uvarint(body, len(metrics))
    for name in _named(metrics):
        raw = name.encode("utf-8")
        _uvarint(body, len(raw))
        body += raw
    body.append(_KIND_INT << _KIND_SHIFT)
    body += _raw_one(seq)
    body += _NULL_ROW * 2  # ts and received: no value
    for v in metrics.values():
        if type(v) is float:
            rep, n = _float_one(v)
            body += bytes((_KIND_FLOAT << _KIND_SHIFT, rep, 0))  # flags, representation, no exceptions
            body += _raw_one(n)
        elif type(v) is int and _ONE_LOW < v < _ONE_HIGH:
            body.append(_KIND_INT << _KIND_SHIFT)
            body += _raw_one(v)
        else:  # an int too large for this shortcut, or not a number (encode_chunk says so)
            return encode_chunk([seq], [None], [None], {k: [v] for k, v in metrics.items()}, fast=fast)
    if len(body) >= MIN_BLOCK:  # deflate blocks would start at the streams' byte planes
        return encode_chunk([seq], [None], [None], {k: [v] for k, v in metrics.items()}, fast=fast)
    # _deflate's one block.  Z_RLE looks one byte back: no hash table, so memLevel 1 (128 KB
    # less to allocate and clear) gives the same stream while the body is under its 127-symbol
    # buffer (zlib's deflate_rle; the level does not enter either).
    c = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, -15, 1, zlib.Z_RLE)
    blob = bytes((VERSION,)) + c.compress(body) + c.flush()
    return blob + struct.pack("<I", zlib.crc32(blob))


_ONE_LOW, _ONE_HIGH = -(2**62), 2**62  # encode_row's values (a float's bits may not be: _raw_one)
_NULL_ROW = bytes((_HAS_NULLS | (_KIND_EMPTY << _KIND_SHIFT), 0))  # flags, bitmap of one absent row


def _raw_one(x: int) -> bytes:
    """An integer stream of one value as _choose_stream([x], fast=True) writes it: raw in
    x's width (its cost, 0, is below a delta's head)."""
    if x == 0:
        return b"\x00"  # raw, width 0
    for code, w in ((1, 1), (2, 2), (3, 4)):
        if -_LIMIT[w] <= x < _LIMIT[w]:
            return bytes((code,)) + x.to_bytes(w, "little", signed=True)
    return b"\x04" + x.to_bytes(8, "little", signed=True)


def _float_one(x: float) -> tuple[int, int]:
    """_float_ints([x]) for one value: (rep, int); one value never makes an exception
    (it would be 1 in 1, so the raw bits)."""
    k = _min_decimals(x)
    if k is not None:  # round(x * 10**k) / 10**k == x, and not -0.0: bit-exact
        n = round(x * _POW10[k])
        if -(2**62) < n < 2**62:
            return k, n
    return _REP_BITS, struct.unpack("<q", struct.pack("<d", x))[0]


def encode_arrays(
    seqs: np.ndarray,
    ts: np.ndarray,
    received: np.ndarray,
    metrics: dict[str, np.ndarray],
    *,
    fast: bool = False,
    _chosen: list | None = None,
) -> bytes:
    """encode_chunk for a head's arrays: the same bytes, without lists.

    seqs int64, ts and received float64 (every row has them), each metric a
    float64 array where NaN means the datagram did not carry it: exactly
    encode_chunk(seqs.tolist(), ts.tolist(), received.tolist(),
    {name: [None if v != v else v for v in col]}).
    """
    rows = len(seqs)
    if rows < SMALL_ROWS:
        nulled = {name: [None if v != v else v for v in np.asarray(col).tolist()] for name, col in metrics.items()}
        return encode_chunk(
            np.asarray(seqs).tolist(), np.asarray(ts).tolist(), np.asarray(received).tolist(), nulled, fast=fast
        )
    _check_shape(rows, len(metrics))
    for name, col in (("ts", ts), ("received", received), *_named(metrics).items()):
        if len(col) != rows:
            raise ValueError(f"column {name} has {len(col)} values for {rows} rows")
    return _encode_cols(
        _Col(rows, None, None, np.asarray(seqs, dtype=np.int64), _NO_FLOATS),
        _Col(rows, None, None, _NO_INTS, np.asarray(ts, dtype=np.float64)),
        _Col(rows, None, None, _NO_INTS, np.asarray(received, dtype=np.float64)),
        {name: _col_from_floats(np.asarray(col, dtype=np.float64)) for name, col in metrics.items()},
        fast,
        None,
        _chosen,
    )


# ------------------------------------------------- reusing the last choices
#
# At ingest rates a sensor's chunks look alike: the same decimal scale per
# column, the same transform, the same width.  encode_reusing tries the
# choices of the sensor's previous chunk first and checks that they still
# hold exactly (every value decimal-exact at that scale, no absent value);
# then it computes one candidate per column instead of ALP's scale search
# and four transforms with their costs.  A column whose stream came out
# wider than before has its transform searched again (_choose_streams, that
# column alone).  When a check fails, or the choices are unknown, it is
# encode_arrays(fast=True) and its choices are returned to be tried next
# time.  Either way the blob is a valid chunk that decode_chunk reads back
# bit-exact: a choice changes the bytes, never the values (docs/SCHEMA.md
# lets an encoder pick any).

Choices = tuple  # (metric names, per column (rep or None, transform, width, relative) or None)


def encode_reusing(
    seqs: np.ndarray, ts: np.ndarray, received: np.ndarray, metrics: dict[str, np.ndarray], last: Choices | None
) -> tuple[bytes, Choices | None, bool]:
    """(blob, the choices to try next time, whether `last` was used) for a head's arrays as
    encode_arrays takes them, fast=True: `last`'s choices when they still hold exactly, else
    encode_arrays(fast=True)'s blob (the same bytes) and choices."""
    if last is not None and len(seqs) >= SMALL_ROWS:
        reused = _encode_reused(seqs, ts, received, metrics, last)
        if reused is not None:
            return reused[0], reused[1], True
    chosen: list = []
    blob = encode_arrays(seqs, ts, received, metrics, fast=True, _chosen=chosen)
    names = tuple(metrics)
    return blob, ((names, tuple(chosen)) if len(chosen) == 3 + len(names) else None), False


def _encode_reused(seqs, ts, received, metrics: dict, last: Choices) -> tuple[bytes, Choices] | None:
    names, choices = last
    if tuple(metrics) != names or None in choices or choices[0][0] is not None:
        return None
    rows = len(seqs)
    _check_shape(rows, len(metrics))
    for col in (ts, received, *metrics.values()):
        if len(col) != rows:
            return None  # encode_arrays says what is wrong
    floats = np.stack([ts, received, *metrics.values()]).astype(np.float64, copy=False)
    reps = [c[0] for c in choices[1:]]
    if None in reps:
        return None
    ints = np.empty((len(choices), rows), dtype=np.int64)
    ints[0] = seqs
    dec = [i for i, k in enumerate(reps) if k != _REP_BITS]
    if len(dec) < len(reps):
        raw = [i for i, k in enumerate(reps) if k == _REP_BITS]
        fr = floats[raw]
        if not (fr == fr).all():  # a NaN is an absent value: a bitmap the full encoder writes
            return None
        ints[[i + 1 for i in raw]] = fr.view(np.int64)
    if dec:
        fd = floats[dec] if len(dec) < len(reps) else floats
        fk = _POW10_NP[[reps[i] for i in dec]][:, None]
        with np.errstate(all="ignore"):
            r = np.rint(fd * fk)
            if not (np.abs(r) < _TWO62).all():  # NaN (absent) and inf fail here too
                return None
            ns = r.astype(np.int64)
            # bit for bit, as _float_ints_2d checks (-0.0 comes back 0.0: an exception, refused)
            if not ((ns.astype(np.float64) / fk).view(np.int64) == fd.view(np.int64)).all():
                return None
        ints[[i + 1 for i in dec]] = ns
    lows, highs = ints.min(axis=1).tolist(), ints.max(axis=1).tolist()
    if choices[2][3]:  # received stored relative to ts, at the same pair of scales as before
        m = _rescale(reps[0], reps[1])
        if m is None or max(abs(lows[1]), abs(highs[1])) * m >= _SAFE or max(abs(lows[2]), abs(highs[2])) >= _SAFE:
            return None
        own = ints[2].copy()  # received's own integers: the other choice, if it grows
        ints[2] -= ints[1] * m if m != 1 else ints[1]
        lows[2], highs[2] = int(ints[2].min()), int(ints[2].max())
    streams: list = [None] * len(choices)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(choices):
        if highs[i] >= _SAFE or lows[i] <= -_SAFE:  # a float's 64 bits: deltas could leave int64
            streams[i] = _choose_stream(ints[i].tolist(), True)  # the exact list search, as _choose_streams
        else:
            groups.setdefault(c[1], []).append(i)
    for transform, where in groups.items():
        x = ints[where] if len(where) < len(choices) else ints
        x0 = x[:, 0].tolist()
        if transform == _RAW:
            body, heads = x, [[]] * len(where)
        else:
            d = x[:, 1:] - x[:, :-1]
            if transform == _DELTA:
                body, heads = d, [[a] for a in x0]
            elif transform == _DOD:
                body, heads = d[:, 1:] - d[:, :-1], [[a, b] for a, b in zip(x0, d[:, 0].tolist())]
            else:
                half = (rows - 1) // 2
                steps = np.partition(d, half, axis=1)[:, half]  # sorted(d)[len(d) // 2], as _choose_2d
                step_list = steps.tolist()
                if max(map(abs, step_list)) * rows >= _SAFE:
                    return None
                body = (x[:, 1:] - x[:, :1]) - steps[:, None] * np.arange(1, rows, dtype=np.int64)
                heads = [[a, s] for a, s in zip(x0, step_list)]
        widths, _, _ = _widths_2d(body)
        for j, i, w, h in zip(range(len(where)), where, widths, heads):
            streams[i] = (0, transform, h, _pack_np(body[j], w), w) if w <= choices[i][2] else None
    grown = [i for i, stream in enumerate(streams) if stream is None]  # wider than before: choose again
    if grown:
        choices = list(choices)
        rows_again = [ints[i] for i in grown]
        if 2 in grown and choices[2][3]:  # received: relative to ts or not, as _encode_column picks
            rows_again.append(own)
        again = _choose_streams(rows_again, True)
        for i, stream in zip(grown, again):
            relative = choices[i][3]
            if i == 2 and relative and again[-1][0] <= stream[0]:  # relative only when smaller
                stream, relative = again[-1], False
            streams[i] = stream
            choices[i] = (choices[i][0], stream[1], stream[4], relative)
        choices = tuple(choices)
    body_out = _Body()
    _uvarint(body_out, rows)
    _uvarint(body_out, len(metrics))
    for name in metrics:
        raw_name = name.encode("utf-8")
        _uvarint(body_out, len(raw_name))
        body_out += raw_name
    body_out.append(_KIND_INT << _KIND_SHIFT)
    _write_stream(body_out, streams[0])
    for (rep, _, _, relative), stream in zip(choices[1:], streams[1:]):
        body_out.append((_KIND_FLOAT << _KIND_SHIFT) | (_RELATIVE if relative else 0))
        body_out.append(rep)
        body_out.append(0)  # no exceptions
        _write_stream(body_out, stream)
    blob = bytes((VERSION,)) + _deflate(body_out, True)
    return blob + struct.pack("<I", zlib.crc32(blob)), (names, choices)


def encode_many(chunks: list[tuple], *, fast: bool = False) -> list[bytes]:
    """[encode_chunk(*chunk, fast=fast) for chunk in chunks], the same bytes, faster for many
    small chunks of one length (a closing head's minute blocks, one per metric): their
    columns go through numpy together, so its cost per call is paid once, not per chunk."""
    rows = {len(c[0]) for c in chunks}
    if len(rows) != 1 or len(chunks) < 2:
        return [encode_chunk(*c, fast=fast) for c in chunks]
    parts = []
    for seqs, ts, received, metrics in chunks:
        n = len(seqs)
        _check_shape(n, len(metrics))
        parts.append(
            [
                _col_array(seqs, _check_column("seqs", seqs, n)),
                _col_array(ts, _check_column("ts", ts, n)),
                _col_array(received, _check_column("received", received, n)),
                *(_col_array(col, _check_column(name, col, n)) for name, col in _named(metrics).items()),
            ]
        )
    return _encode_parts(chunks, parts, fast, together=True)


def _encode_parts(chunks: list[tuple], parts: list[list[_Col]], fast: bool, together: bool) -> list[bytes]:
    """Each chunk's blob from its columns (seqs, ts, received, metrics...); `together`: the
    chunks have one length, so their columns are prepared in one numpy pass (_prepare)."""
    if together:
        cols = [c for part in parts for c in part]
        pairs, at = [], 0
        for part in parts:
            pairs.append((at + 1, at + 2))
            at += len(part)
        pre = _prepare(cols, pairs, fast)
    else:
        pre = [{} for part in parts for _ in part]
    out, at = [], 0
    for (_, _, _, metrics), part in zip(chunks, parts):
        p = pre[at : at + len(part)]
        at += len(part)
        out.append(_encode_cols(part[0], part[1], part[2], dict(zip(metrics, part[3:])), fast, p))
    return out


def encode_many_arrays(chunks: list[tuple], *, fast: bool = False) -> list[bytes]:
    """encode_many for columns given as arrays (a closing head's minute blocks): each chunk
    is (seqs, ts, received, {name: column}), a column an int64 array (ints), a float64
    array (floats; NaN = no value, as in encode_arrays) or None (no value in any row).
    The same bytes as encode_chunk of those columns as lists."""
    parts = []
    for seqs, ts, received, metrics in chunks:
        n = len(seqs)
        _check_shape(n, len(metrics))
        cols = [_col_typed(col, n) for col in (seqs, ts, received, *_named(metrics).values())]
        if any(c.rows != n for c in cols):
            raise ValueError(f"a column's length is not the chunk's {n} rows")
        parts.append(cols)
    rows = {len(c[0]) for c in chunks}
    return _encode_parts(chunks, parts, fast, together=len(rows) == 1 and rows.pop() >= 1)


def encode_arrays_many(chunks: list[tuple], *, fast: bool = False) -> list[bytes]:
    """[encode_arrays(*chunk, fast=fast) for chunk in chunks], the same bytes, cheaper for many
    heads closing at once: chunks of one length (from SMALL_ROWS rows on) are prepared in one
    numpy pass (_prepare), so numpy's cost per call is paid per length, not per chunk.  Each
    chunk is (seqs, ts, received, {name: column}) as encode_arrays takes it."""
    out: list[bytes | None] = [None] * len(chunks)
    by_rows: dict[int, list[int]] = {}
    for i, chunk in enumerate(chunks):
        by_rows.setdefault(len(chunk[0]), []).append(i)
    for rows, where in by_rows.items():
        if rows < SMALL_ROWS or len(where) == 1:
            for i in where:
                out[i] = encode_arrays(*chunks[i], fast=fast)
            continue
        parts = []
        for i in where:
            seqs, ts, received, metrics = chunks[i]
            _check_shape(rows, len(metrics))
            for name, col in (("ts", ts), ("received", received), *_named(metrics).items()):
                if len(col) != rows:
                    raise ValueError(f"column {name} has {len(col)} values for {rows} rows")
            parts.append(
                [
                    _Col(rows, None, None, np.asarray(seqs, dtype=np.int64), _NO_FLOATS),
                    _Col(rows, None, None, _NO_INTS, np.asarray(ts, dtype=np.float64)),
                    _Col(rows, None, None, _NO_INTS, np.asarray(received, dtype=np.float64)),
                    *(_col_from_floats(np.asarray(col, dtype=np.float64)) for col in metrics.values()),
                ]
            )
        for i, blob in zip(where, _encode_parts([chunks[i] for i in where], parts, fast, together=True)):
            out[i] = blob
    return out  # type: ignore[return-value]  # every slot filled above


def _col_typed(col, rows: int) -> _Col:
    if col is None:
        return _Col(rows, np.zeros(rows, dtype=bool) if rows else None, None, _NO_INTS, _NO_FLOATS)
    if col.dtype == np.int64:
        return _Col(len(col), None, None, col, _NO_FLOATS)
    if col.dtype == np.float64:
        return _col_from_floats(col)
    raise TypeError(f"a column of {col.dtype} is not int64 or float64")


def _check_shape(rows: int, nmetrics: int) -> None:
    if rows > MAX_ROWS:
        raise ValueError(f"{rows} rows in one chunk, more than {MAX_ROWS}")
    if nmetrics > MAX_METRICS:
        raise ValueError(f"{nmetrics} metrics in one chunk, more than {MAX_METRICS}")
    if rows * (3 + nmetrics) > MAX_CELLS:
        raise ValueError(f"{rows} rows x {3 + nmetrics} columns is more than {MAX_CELLS} cells")


def _named(metrics: dict) -> dict:
    """The metrics, their names checked (str, at most MAX_NAME_BYTES of UTF-8)."""
    for name in metrics:
        if type(name) is not str:
            raise TypeError(f"metric name {name!r} is not a str")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise ValueError(f"metric name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return metrics


def _encode_cols(
    seqs: _Col,
    ts: _Col,
    received: _Col,
    metrics: dict[str, _Col],
    fast: bool,
    pre: list[dict] | None = None,
    chosen: list | None = None,
) -> bytes:
    body = _Body()
    _uvarint(body, seqs.rows)
    _uvarint(body, len(metrics))
    for name in metrics:
        raw = name.encode("utf-8")
        _uvarint(body, len(raw))
        body += raw
    cols = [seqs, ts, received, *metrics.values()]
    if pre is None:
        pre = _prepare(cols, [(1, 2)], fast) if seqs.rows >= SMALL_ROWS else [{} for _ in cols]
    _encode_column(body, seqs, None, fast, pre[0], chosen)
    ts_enc = _encode_column(body, ts, None, fast, pre[1], chosen)
    _encode_column(body, received, ts_enc, fast, pre[2], chosen)
    for col, p in zip(cols[3:], pre[3:]):
        _encode_column(body, col, None, fast, p, chosen)
    blob = bytes((VERSION,)) + _deflate(body, fast)
    return blob + struct.pack("<I", zlib.crc32(blob))


def decode_chunk(
    blob: bytes, metrics: Collection[str] | None = None, received: bool = True
) -> tuple[list[int], list[float], list[float] | None, dict[str, list[Number | None]]]:
    """bytes -> (seqs, ts, received, metrics), or ChunkError; nothing else escapes.

    A reader that wants only some columns names them: `metrics` (the others
    are left out of the dict) and `received=False` (None in its place).  The
    columns not wanted are walked, not decoded (their structure is still
    checked, so a blob is refused the same way), which is what a query asking
    for one series of a five-metric chunk saves (bench/store_query.py).
    """
    try:
        return _decode(blob, metrics, received)
    except ChunkError:
        raise
    except (
        ValueError,
        TypeError,
        IndexError,
        OverflowError,
        MemoryError,
        StopIteration,
        struct.error,
        zlib.error,
    ) as exc:
        raise ChunkError(f"chunk is corrupt ({type(exc).__name__}: {exc})") from None


def _decode(blob: bytes, wanted: Collection[str] | None = None, want_received: bool = True) -> tuple:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ChunkError(f"a chunk is bytes, not {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < 6:
        raise ChunkError(f"chunk of {len(blob)} bytes is too short")
    if struct.unpack("<I", blob[-4:])[0] != zlib.crc32(blob[:-4]):
        raise ChunkError("chunk checksum mismatch (corrupt blob)")
    if blob[0] != VERSION:
        raise ChunkError(f"chunk version {blob[0]}, expected {VERSION}")
    d = zlib.decompressobj(wbits=-15)
    body = d.decompress(blob[1:-4], _MAX_BODY)
    if d.unconsumed_tail or (not d.eof and len(body) >= _MAX_BODY):
        raise ChunkError("chunk body is larger than any valid chunk")
    if not d.eof or d.unused_data:
        raise ChunkError("chunk body is truncated or has trailing bytes")
    r = _Reader(body)
    rows = r.uvarint()
    nmetrics = r.uvarint()
    if rows > MAX_ROWS or nmetrics > MAX_METRICS or rows * (3 + nmetrics) > MAX_CELLS:
        raise ChunkError(f"chunk declares {rows} rows x {nmetrics} metrics, over the limits")
    names = []
    for _ in range(nmetrics):
        n = r.uvarint()
        if n > MAX_NAME_BYTES:
            raise ChunkError("chunk metric name too long")
        names.append(r.take(n).decode("utf-8"))
    if len(set(names)) != len(names):
        raise ChunkError("chunk has a metric name twice")
    seqs, _ = _decode_column(r, rows, None)
    ts, ts_ints = _decode_column(r, rows, None)
    received = None
    if want_received:
        received, _ = _decode_column(r, rows, ts_ints)
    else:
        _skip_column(r, rows)
    metrics = {}
    for name in names:
        if wanted is None or name in wanted:
            metrics[name], _ = _decode_column(r, rows, None)
        else:
            _skip_column(r, rows)
    if r.pos != len(body):
        raise ChunkError("chunk body has trailing bytes")
    return seqs, ts, received, metrics


# --------------------------------------------------------------- statistics


def chunk_stats(ts: list[float], values: list[Number | None]) -> tuple:
    """(count, min, max, sum, first_ts, last_ts) of one metric column of a chunk.

    Over the rows where the value is present; first_ts/last_ts are the
    smallest and largest sensor time of those rows (a clock may go back, so
    not simply the first and last row).  sum is an exact int when every value
    is an int, else the float sum in row order, as SQLite's sum() adds.  A
    column with no value gives (0, None, None, None, None, None).
    """
    present = [(t, v) for t, v in zip(ts, values) if v is not None]
    if not present:
        return 0, None, None, None, None, None
    vs = [v for _, v in present]
    tss = [t for t, _ in present]
    return len(vs), min(vs), max(vs), sum(vs), min(tss), max(tss)
