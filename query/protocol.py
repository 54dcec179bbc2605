"""Query protocol v1: JSON-lines framing, request validation, responses, cursors. No sockets.

The promise: any bytes fed to `LineBuffer` come out as whole lines or one
`LineTooLong`; any line given to `parse_request` gives a `Request` whose
parameters have exactly the documented types, or raises `RequestError` with
one code from `CODES` and a message naming the offending parameter.  Nothing
else escapes (json's RecursionError on deep nesting and its NaN/Infinity
extensions included).  Responses are encoded with allow_nan=False, so no
peer ever receives a non-standard JSON token.  docs/PROTOCOL.md ("Query protocol v1") is the contract.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
from dataclasses import dataclass, field
from typing import Any

import msgspec

PROTOCOL_VERSION = 1
DEFAULT_PORT = 4740  # TCP, TLS; the client's and the server's default
MAX_LINE_BYTES = 64 * 1024  # a request line longer than this (without "\n") is too_large
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
MAX_STRING_CHARS = 256  # sensor/metric names are <= 64 on the wire; this only bounds the work
MAX_ABS_TIME = 1e12  # Unix seconds; far beyond any real clock, well inside float and int64
MIN_BUCKET = 0.001  # seconds
MAX_ID_DEPTH = 32  # nesting of the echoed `id`

CODES = ("bad_json", "bad_request", "unknown_op", "too_large", "internal", "slow_consumer", "schema_changed")


class RequestError(Exception):
    """The peer sent something we answer with an error; `code` is one of CODES."""

    def __init__(self, code: str, message: str, request_id: Any = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class LineTooLong(Exception):
    """More than MAX_LINE_BYTES arrived without a newline."""


class LineBuffer:
    """Reassembles "\\n"-terminated lines from bytes arriving in any pieces."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes already searched for "\n" (feeding byte by byte stays linear)
        self._max = max_line

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def next_line(self) -> bytes | None:
        """The next complete line without its "\\n", or None; raises LineTooLong."""
        end = self._buf.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buf)
            if self._scanned > self._max:
                raise LineTooLong()
            return None
        if end > self._max:
            raise LineTooLong()
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        self._scanned = 0
        return line

    def finish(self) -> None:
        """At EOF: an unterminated last line becomes a line (complete ones stay as they are)."""
        if self._buf and not self._buf.endswith(b"\n"):
            self._buf += b"\n"


class BigInt(str):
    """An integer literal too long for Python's int() (over 4,300 digits), kept as its JSON text.

    PROTOCOL.md lets `id` be any JSON value and echoes it: such an id comes
    back digit for digit (its length is bounded by the request line).  As a
    parameter it is simply out of range.  Converting it instead would need
    sys.set_int_max_str_digits, a process-wide switch whose limit exists
    because str <-> int is quadratic.
    """


def _parse_int(text: str) -> int | BigInt:
    try:
        return int(text)
    except ValueError:  # longer than sys.get_int_max_str_digits()
        return BigInt(text)


@dataclass(frozen=True)
class Request:
    op: str
    id: Any = None
    params: dict[str, Any] = field(default_factory=dict)


# Parameter validators: (name, raw) -> value, or RequestError naming `name`.


def _bad(name: str, what: str) -> RequestError:
    return RequestError("bad_request", f"parameter {name!r} {what}")


def _string(name: str, raw: Any) -> str:
    if type(raw) is not str:
        raise _bad(name, f"must be a string, got {_json_type(raw)}")
    if not raw or len(raw) > MAX_STRING_CHARS:
        raise _bad(name, f"must be 1-{MAX_STRING_CHARS} characters")
    try:
        raw.encode("utf-8")  # a lone surrogate ("\ud800") is valid JSON but not text SQLite can bind
    except UnicodeEncodeError:
        raise _bad(name, "must be valid Unicode text (no lone surrogates)") from None
    return raw


def _out_of_range(name: str, raw: Any) -> None:
    if type(raw) is BigInt:
        raise _bad(name, f"is out of range (an integer of {len(raw.lstrip('-'))} digits)")


def _number(name: str, raw: Any) -> float:
    _out_of_range(name, raw)
    # bool is an int in Python but not a number in this protocol.
    if type(raw) not in (int, float):
        raise _bad(name, f"must be a number, got {_json_type(raw)}")
    if type(raw) is float and not math.isfinite(raw):
        raise _bad(name, "must be finite")
    return raw


def _time(name: str, raw: Any) -> float:
    value = _number(name, raw)
    if not -MAX_ABS_TIME <= value <= MAX_ABS_TIME:
        raise _bad(name, f"must be Unix seconds within +-{MAX_ABS_TIME:.0e}")
    return float(value)


def _limit(name: str, raw: Any) -> int:
    _out_of_range(name, raw)
    if type(raw) is not int:
        raise _bad(name, f"must be an integer, got {_json_type(raw)}")
    if not 1 <= raw <= MAX_LIMIT:
        raise _bad(name, f"must be 1-{MAX_LIMIT}, got {raw}")
    return raw


def _bucket(name: str, raw: Any) -> int | float:
    value = _number(name, raw)
    if not MIN_BUCKET <= value <= MAX_ABS_TIME:
        raise _bad(name, f"must be seconds in {MIN_BUCKET}-{MAX_ABS_TIME:.0e}, got {raw}")
    return value


def _order(name: str, raw: Any) -> str:
    if raw not in ("asc", "desc") or type(raw) is not str:
        raise _bad(name, 'must be "asc" or "desc"')
    return raw


def _flag(name: str, raw: Any) -> bool:
    if type(raw) is not bool:
        raise _bad(name, f"must be true or false, got {_json_type(raw)}")
    return raw


def _position(name: str, raw: Any) -> int:
    _out_of_range(name, raw)
    if type(raw) is not int or not 0 <= raw < 2**63:
        raise _bad(name, f"must be a follow position (an integer >= 0 from a previous event), got {raw!r:.40}")
    return raw


def _cursor(name: str, raw: Any) -> str:
    if type(raw) is not str:
        raise _bad(name, f"must be a string from a previous 'next', got {_json_type(raw)}")
    if len(raw) > 512:
        raise _bad(name, "is not a cursor this server issued")
    return raw


# op -> {param: (validator, required)}.  Optional parameters may also be null.
OPS: dict[str, dict[str, tuple[Any, bool]]] = {
    "ping": {},
    "sensors": {"sensor": (_string, False), "stale": (_flag, False)},
    "latest": {"sensor": (_string, False), "metric": (_string, False)},
    "readings": {
        "sensor": (_string, True),
        "metric": (_string, False),
        "since": (_time, False),
        "until": (_time, False),
        "limit": (_limit, False),
        "order": (_order, False),
        "cursor": (_cursor, False),
    },
    "aggregate": {
        "sensor": (_string, True),
        "metric": (_string, True),
        "bucket": (_bucket, True),
        "since": (_time, False),
        "until": (_time, False),
    },
    "gaps": {"sensor": (_string, False), "since": (_time, False), "until": (_time, False)},
    "stats": {},
}
# Ops the server's loop answers itself, no SQL: the follow stream, whose events
# come after the answer until `cancel` (docs/PROTOCOL.md, "follow").
STREAM_OPS: dict[str, dict[str, tuple[Any, bool]]] = {
    "follow": {"sensor": (_string, False), "metric": (_string, False), "after": (_position, False)},
    "cancel": {},
}


def _json_type(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        type(None): "null",
        BigInt: "integer",
    }.get(type(value), type(value).__name__)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def parse_request(line: bytes) -> Request:
    """Validate one request line (without its newline)."""
    try:
        text = line.decode("utf-8")
        # parse_constant refuses NaN/Infinity/-Infinity, which json accepts by default.
        # parse_int: an integer beyond int()'s digit limit stays text (BigInt).
        doc = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except RecursionError:
        raise RequestError("bad_json", "nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, bad UTF-8
        raise RequestError("bad_json", f"not a JSON object: {_short(exc)}") from None
    if type(doc) is not dict:
        raise RequestError("bad_request", f"a request is a JSON object, got {_json_type(doc)}")
    request_id = doc.get("id")
    if _too_deep(request_id):
        # json.loads accepts ~990 levels, but echoing them back from a deeper
        # call stack could hit the recursion limit in json.dumps.
        raise RequestError("bad_request", f"parameter 'id' is nested deeper than {MAX_ID_DEPTH} levels")
    op = doc.get("op")
    if op is None:
        raise RequestError("bad_request", "parameter 'op' is missing", request_id)
    if type(op) is not str:
        raise RequestError("bad_request", f"parameter 'op' must be a string, got {_json_type(op)}", request_id)
    spec = OPS.get(op, STREAM_OPS.get(op))
    if spec is None:
        raise RequestError(
            "unknown_op", f"unknown op {op[:64]!r}; ops are {', '.join([*OPS, *STREAM_OPS])}", request_id
        )
    params: dict[str, Any] = {}
    for name, raw in doc.items():
        if name in ("op", "id"):
            continue
        if name not in spec:
            raise RequestError("bad_request", f"unknown parameter {name[:64]!r} for op {op!r}", request_id)
        validate, required = spec[name]
        if raw is None and not required:
            continue
        try:
            params[name] = validate(name, raw)
        except RequestError as exc:
            exc.request_id = request_id
            raise
    for name, (_, required) in spec.items():
        if required and name not in params:
            raise RequestError("bad_request", f"parameter {name!r} is missing", request_id)
    return Request(op, request_id, params)


def _too_deep(value: Any) -> bool:
    level = [value]
    for _ in range(MAX_ID_DEPTH):
        level = [c for v in level if isinstance(v, (list, dict)) for c in (v.values() if isinstance(v, dict) else v)]
        if not level:
            return False
    return True


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."


def _finite(value: Any) -> Any:
    """Replace non-finite floats by null, recursively (only used on the slow path)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


_fast_encode = msgspec.json.Encoder().encode


def dump_json(value: Any) -> str:
    # msgspec first: the same JSON values (floats as their shortest round-trip
    # text, non-finite ones as null as _finite makes them) ~10x faster than
    # json.dumps on a 1,000-row page (5 -> 0.5 ms; bench/query.py).  Anything it
    # refuses (an int beyond 64 bits) or that is not ASCII takes the json path.
    try:
        fast = _fast_encode(value)
        if fast.isascii():
            return fast.decode("ascii")
    except (TypeError, OverflowError, ValueError, msgspec.EncodeError):
        pass
    # ensure_ascii: a lone surrogate echoed back in `id` stays encodable.
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a non-finite float in the data: never emit NaN/Infinity
        return json.dumps(_finite(value), allow_nan=False, separators=(",", ":"))


def encode_id(value: Any) -> str:
    """The echoed id as JSON; a BigInt goes back as the digits it came as."""
    if type(value) is BigInt:
        return str.__str__(value)
    if isinstance(value, list):
        return "[" + ",".join(encode_id(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(dump_json(k) + ":" + encode_id(v) for k, v in value.items()) + "}"
    return dump_json(value)


def _dump(request_id: Any, rest: dict[str, Any]) -> bytes:
    """{"id":...,<rest>} as one line; the id is encoded apart so a BigInt in it echoes exactly."""
    body = dump_json(rest)
    return ('{"id":' + encode_id(request_id) + "," + body[1:]).encode("ascii") + b"\n"


def encode_result(request_id: Any, result: Any, meta: dict[str, Any] | None = None) -> bytes:
    """A success; `meta` adds fields beside `result` (an aggregate's `resolution`, `notes`)."""
    return _dump(request_id, {"ok": True, "result": result, **(meta or {})})


def encode_error(request_id: Any, code: str, message: str) -> bytes:
    assert code in CODES, code
    return _dump(request_id, {"ok": False, "error": {"code": code, "message": message}})


# Cursors for `readings`: the last key returned, bound to the request that
# produced it.  Opaque to clients; validated here so a forged or edited cursor,
# or one reused with a different sensor/metric/order/range, is bad_request
# instead of a silent jump.  The tag is a hash, not a secret MAC: a cursor only
# names a position inside the requester's own query, so there is nothing to
# protect beyond catching mistakes, and cursors stay valid across restarts.

_CURSOR_DOMAIN = b"telemetry-query cursor v1\0"


@dataclass(frozen=True)
class Position:
    series: int
    ts: float
    boot: int
    seq: int


def _binding(params: dict[str, Any]) -> bytes:
    keys = ("sensor", "metric", "order", "since", "until")
    return json.dumps([params.get(k) for k in keys], separators=(",", ":")).encode()


def _tag(payload: bytes, params: dict[str, Any]) -> bytes:
    return hashlib.sha256(_CURSOR_DOMAIN + _binding(params) + b"\0" + payload).digest()[:12]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_cursor(position: Position, params: dict[str, Any]) -> str:
    payload = json.dumps([position.series, position.ts, position.boot, position.seq], separators=(",", ":")).encode()
    return f"{_b64(payload)}.{_b64(_tag(payload, params))}"


def decode_cursor(cursor: str, params: dict[str, Any]) -> Position:
    forged = RequestError("bad_request", "parameter 'cursor' is not a cursor this server issued for this query")
    try:
        head, _, tail = cursor.partition(".")
        if not cursor.isascii() or not head or not tail:
            raise forged
        payload, tag = _unb64(head), _unb64(tail)
        if not hmac.compare_digest(tag, _tag(payload, params)):
            raise forged
        series, ts, boot, seq = json.loads(payload)
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise forged from None
    ints_ok = all(type(v) is int and -(2**63) <= v < 2**63 for v in (series, boot, seq))
    if not ints_ok or type(ts) not in (int, float) or not math.isfinite(ts):
        raise forged
    return Position(series, float(ts), boot, seq)
