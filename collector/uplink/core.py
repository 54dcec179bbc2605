"""The uplink's pure core: no sockets, no files, no clock of its own.

- subject tokens: sensor ids may contain '.', ':' and '/', and '.' separates
  NATS subject tokens, so every character outside [A-Za-z0-9_-] is written
  as %XX (its UTF-8 bytes, upper-case hex), reversibly (`sensor_token`,
  `token_sensor`);
- the payload codec (docs/PROTOCOL.md "Uplink"): version 1, a readings
  message is one sensor's datagrams of one boot; version 2, a columns message
  is a run of the gateway's ingest_log rows forwarded as committed (their
  zlib(msgpack) bodies, many sensors each, not re-encoded: the fast path);
  an accounts message is one sensor's account snapshot; all are msgpack
  arrays that start with the version and a kind letter;
- message ids from the content's identity (gateway, sensor, boot, seq range,
  count and a digest of the payload), so a retry of the same batch carries
  the same Nats-Msg-Id and JetStream drops it inside its duplicate window;
- batching: the groups of a run of ingest_log entries, merged per (sensor,
  boot) in order of first appearance and cut into messages of at most
  `max_datagrams` datagrams;
- the backoff policy (bounded, jittered) and the cursor file's format.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from typing import Annotated, Any

import msgpack
import msgspec

from .. import ingestlog
from ..ingestlog import Entry, Group
from ..wire import MAX_TS
from . import ranges

# Version 1: readings ("R", one sensor per message) and accounts ("A").
# Version 2: columns ("C", ingest_log bodies as committed) and snapshots ("S", many sensors'
# accounts a message); it decodes accounts ("A", as in v1) too.
# Version 3: columns and snapshots of version 2 that name where they come from: the gateway
# database's identity, each block's ingest_log id and datagram offset (the central side keeps
# merged ranges of those, ranges.py, instead of every datagram's identity), the rows the
# gateway lost before sending them, and the gateway's own drop counters.
PAYLOAD_VERSION = 3
VERSIONS = (1, 2, 3)
KIND_READINGS = "R"
KIND_ACCOUNTS = "A"
KIND_COLUMNS = "C"
KIND_SNAPSHOTS = "S"
# Gap rows carried by one accounts snapshot at most (the newest ones); the
# `lost` count is exact whatever the cap, `gaps_total` says how many exist.
MAX_GAPS_PER_SNAPSHOT = 1000
# Messages the uplink sends stay below this (bytes), well under the broker's
# default max_payload of 1 MiB.
MAX_MESSAGE_BYTES = 512 * 1024
# A payload larger than this is refused by the decoder (the broker's default
# max_payload is 1 MiB; our messages stay far below it).
MAX_PAYLOAD_BYTES = 1 << 20
# A columns message inflates to at most this many bytes of msgpack (the decoder
# refuses more before it builds a value: a zlib bomb cannot make it hold more);
# the uplink cuts its messages to stay below it, and below MAX_MESSAGE_READINGS.
MAX_INFLATED_BYTES = 16 << 20
MAX_MESSAGE_READINGS = 200_000
# Datagrams per message at most, by default, per payload version.
DEFAULT_MAX_DATAGRAMS = {1: 1000, 2: 50_000, 3: 50_000}
ORIGIN_RE = re.compile(r"[0-9a-f]{1,64}")
# The gateway counters a version-3 snapshots message carries (docs/PROTOCOL.md).
GATEWAY_COUNTERS = ("uplink_dropped", "budget_dropped")

GATEWAY_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
PREFIX_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPE_RE = re.compile(r"%([0-9A-F]{2})")


class PayloadError(ValueError):
    """A message body that is not a valid uplink payload. `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # raised in a worker process (prepared.py), pickled back to the writer
        return (PayloadError, (self.reason, self.detail))


REASONS = ("not_msgpack", "bad_version", "bad_kind", "bad_shape", "too_large", "bad_block")


# ---------------------------------------------------------------- subjects


def sensor_token(sensor: str) -> str:
    """A sensor id as one NATS subject token: %XX for every byte outside [A-Za-z0-9_-]."""
    out = []
    for ch in sensor:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode())
    return "".join(out)


def token_sensor(token: str) -> str:
    """The inverse of sensor_token; ValueError for a token it could not have made."""
    raw = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "%":
            m = _ESCAPE_RE.match(token, i)
            if not m:
                raise ValueError(f"bad escape in subject token {token!r}")
            raw.append(int(m.group(1), 16))
            i += 3
        elif ch in _SAFE:
            raw.append(ord(ch))
            i += 1
        else:
            raise ValueError(f"character {ch!r} cannot appear in a sensor token")
    text = raw.decode()
    if sensor_token(text) != token:
        raise ValueError(f"subject token {token!r} is not in canonical form")
    return text


def subject(prefix: str, gateway: str, sensor: str, kind: str) -> str:
    """<prefix>.<gateway>.<sensor token>.readings | .accounts"""
    leaf = "readings" if kind == KIND_READINGS else "accounts"
    return f"{prefix}.{gateway}.{sensor_token(sensor)}.{leaf}"


def snapshots_subject(prefix: str, gateway: str) -> str:
    """<prefix>.<gateway>.accounts: a snapshots message holds many sensors' accounts."""
    return f"{prefix}.{gateway}.accounts"


def columns_subject(prefix: str, gateway: str) -> str:
    """<prefix>.<gateway>.columns: a columns message holds many sensors (no sensor token)."""
    return f"{prefix}.{gateway}.columns"


def check_gateway(name: str) -> str:
    if not GATEWAY_RE.fullmatch(name):
        raise ValueError(
            f"{name!r}: a gateway name is 1-32 of A-Z a-z 0-9 _ - (it becomes a subject token "
            "and the prefix of its sensors' ids centrally)"
        )
    return name


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"{prefix!r}: a subject prefix is dot-separated tokens of A-Z a-z 0-9 _ - (e.g. telemetry)")
    return prefix


def central_sensor(gateway: str, sensor: str) -> str:
    """The sensor's id in the central database: site-7:sim-0001."""
    return f"{gateway}:{sensor}"


# ---------------------------------------------------------------- payloads


@dataclass(frozen=True)
class Readings:
    """One sensor's datagrams of one boot (a slice of ingest_log groups)."""

    gateway: str
    sensor: str
    boot: int | None
    seqs: list[int]
    ts: list[float]
    received: list[float]
    metrics: dict[str, list[Any]]

    @property
    def datagrams(self) -> int:
        return len(self.seqs)

    @property
    def readings(self) -> int:
        return sum(len(values) - values.count(None) for values in self.metrics.values())


@dataclass(frozen=True)
class Gap:
    stream: int
    boot: int
    first_seq: int
    last_seq: int
    missing: int
    detected_at: float


@dataclass(frozen=True)
class Accounts:
    """One sensor's accounts at the gateway as of ingest_log id `as_of` (the newest wins)."""

    gateway: str
    sensor: str
    as_of: int
    first_seen: float
    last_seen: float
    datagrams: int
    readings: int
    lost: int
    duplicates: int
    reordered: int
    restarts: int
    gaps: tuple[Gap, ...] = ()
    gaps_total: int = 0

    def counts(self) -> tuple:
        """What must match between gateway and central."""
        return (
            self.first_seen,
            self.last_seen,
            self.datagrams,
            self.readings,
            self.lost,
            self.duplicates,
            self.reordered,
            self.restarts,
        )


@dataclass(frozen=True)
class Columns:
    """A version-2 readings message, decoded: the groups of a run of the gateway's ingest_log
    rows (many sensors) merged into one Readings per (sensor, boot), in order of first
    appearance, each sensor's datagrams in commit order."""

    gateway: str
    items: tuple[Readings, ...]

    @property
    def datagrams(self) -> int:
        return sum(r.datagrams for r in self.items)

    @property
    def readings(self) -> int:
        return sum(r.readings for r in self.items)


@dataclass(frozen=True)
class Snapshots:
    """A version-2 or -3 accounts message, decoded: many sensors' snapshots of one gateway;
    version 3 adds the gateway database's identity and its counters (GATEWAY_COUNTERS) as of
    ingest_log id `as_of`."""

    gateway: str
    items: tuple[Accounts, ...]
    origin: str | None = None
    as_of: int = 0
    counters: dict[str, int] | None = None


@dataclass(frozen=True)
class LogBlock:
    """One block of a version-3 columns message: datagrams `offset`.. of the gateway's
    ingest_log row `id` (to the row's end if `last`), its groups checked but not merged:
    [sensor, boot, seqs, ts, received, metrics] lists as the log body holds them."""

    id: int
    offset: int
    last: bool
    groups: list[list]
    datagrams: int
    readings: int
    body: bytes = b""  # the log body as it came (zlib): what the central log row keeps (prepared.py)

    @property
    def range(self) -> tuple[int, int]:
        return ranges.block_range(self.id, self.offset, self.datagrams, self.last)


@dataclass(frozen=True)
class Blocks:
    """A version-3 columns message, decoded: blocks named by their place in the log of the
    gateway database `origin`, and the log rows it lost before sending them (`gone`)."""

    gateway: str
    origin: str
    blocks: tuple[LogBlock, ...]
    gone: tuple[tuple[int, int], ...] = ()

    @property
    def datagrams(self) -> int:
        return sum(b.datagrams for b in self.blocks)

    @property
    def readings(self) -> int:
        return sum(b.readings for b in self.blocks)


def _snapshot_body(item: Accounts) -> list:
    gaps = [[g.stream, g.boot, g.first_seq, g.last_seq, g.missing, g.detected_at] for g in item.gaps]
    return [
        item.sensor,
        item.as_of,
        item.first_seen,
        item.last_seen,
        item.datagrams,
        item.readings,
        item.lost,
        item.duplicates,
        item.reordered,
        item.restarts,
        gaps,
        item.gaps_total,
    ]


def encode(item: Readings | Accounts, version: int = PAYLOAD_VERSION) -> bytes:
    """A readings item is always version 1; an accounts item has the same layout in 1 and 2."""
    if isinstance(item, Readings):
        body = [
            1,
            KIND_READINGS,
            item.gateway,
            item.sensor,
            item.boot,
            item.seqs,
            item.ts,
            item.received,
            item.metrics,
        ]
    else:
        if version not in VERSIONS:
            raise ValueError(f"payload version {version!r}")
        body = [version, KIND_ACCOUNTS, item.gateway, *_snapshot_body(item)]
    return msgpack.packb(body, use_bin_type=True)


def encode_columns(gateway: str, blocks: Sequence[bytes]) -> bytes:
    """Version 2 columns: [2, "C", gateway, [block, ...]]; a block is an ingest_log body
    (zlib(msgpack([1, [group, ...]])), collector/ingestlog.py) as committed."""
    return msgpack.packb([2, KIND_COLUMNS, gateway, list(blocks)], use_bin_type=True)


def encode_columns3(gateway: str, origin: str, blocks: Sequence[Block], gone: Sequence[tuple[int, int]] = ()) -> bytes:
    """Version 3 columns: [3, "C", gateway, origin, gone, [[id, offset, last, body], ...]];
    `gone` is [[first id, last id], ...], log rows deleted before they were sent."""
    return msgpack.packb(
        [3, KIND_COLUMNS, gateway, origin, [list(g) for g in gone], [[b.id, b.offset, b.last, b.body] for b in blocks]],
        use_bin_type=True,
    )


# What the central database holds (docs/PROTOCOL.md "What the consumer refuses"): SQLite's
# integers are int64 (msgpack carries up to 2**64 - 1); a NaN REAL is NULL (NOT NULL fails); a
# time is Unix seconds in [0, 2**32), the wire's ts range (a chunk's minute buckets are int64s of
# it: 1e300 is not one).  The wire admits no other reading, seq or ts at the gateway.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TIME = MAX_TS


def _int(v: Any) -> bool:
    """An integer SQLite holds (int64)."""
    return type(v) is int and INT64_MIN <= v <= INT64_MAX


def _time(v: Any) -> bool:
    """Unix seconds in [0, 2**32) (false for NaN), an int or a float."""
    return type(v) in _NUM and 0 <= v < MAX_TIME


def _times(v: Any) -> bool:
    """A list of times (_time), checked at C speed."""
    return _nums(v) and all(map(MAX_TIME.__gt__, v)) and all(map((0.0).__le__, v))


# Type checks over whole columns run at C speed (map/set), not one Python step per value:
# the consumer decodes every reading it stores.
_INT = frozenset((int,))
_NUM = frozenset((int, float))
_VALUE = frozenset((int, float, type(None)))


def _ints(v: Any) -> bool:
    """A list of int64s."""
    return isinstance(v, list) and set(map(type, v)) <= _INT and (not v or INT64_MIN <= min(v) and max(v) <= INT64_MAX)


def _nums(v: Any) -> bool:
    return isinstance(v, list) and set(map(type, v)) <= _NUM


def _finite_values(values: list, types: set) -> bool:
    """A metric column's values (of `types`: int, float, None) finite, its ints int64: what a
    reading can be (the wire admits no other), and what a chunk's statistics can hold (a NaN
    min or sum is NULL; +inf and -inf in one minute sum to NaN)."""
    present = [v for v in values if v is not None] if type(None) in types else values
    if not all(map(math.isfinite, present)):
        return False
    if int not in types:
        return True
    ints = [v for v in present if type(v) is int]
    return INT64_MIN <= min(ints) and max(ints) <= INT64_MAX


def _shape(ok: bool, what: str) -> None:
    if not ok:
        raise PayloadError("bad_shape", what)


def _readings(gateway: Any, sensor: Any, boot: Any, seqs: Any, ts: Any, received: Any, metrics: Any) -> Readings:
    """One sensor's columns checked (PayloadError bad_shape), as a Readings."""
    _shape(isinstance(gateway, str) and GATEWAY_RE.fullmatch(gateway) is not None, "gateway")
    _shape(isinstance(sensor, str) and 0 < len(sensor) <= 256, "sensor")
    _shape(boot is None or _int(boot), "boot")
    _shape(_ints(seqs) and _nums(ts) and _nums(received), "seqs/ts/received")
    n = len(seqs)
    _shape(n > 0 and len(ts) == n and len(received) == n, "seqs/ts/received lengths")
    _shape(_times(ts) and _times(received), "a time not in [0, 2**32)")
    _shape(isinstance(metrics, dict), "metrics")
    for name, values in metrics.items():
        _shape(isinstance(name, str) and 0 < len(name) <= 256, "metric name")
        _shape(isinstance(values, list) and len(values) == n, f"metric {name!r} length")
        types = set(map(type, values))
        _shape(types <= _VALUE and _finite_values(values, types), f"metric {name!r} values")
    return Readings(gateway, sensor, boot, seqs, list(map(float, ts)), list(map(float, received)), metrics)


def inflate(block: bytes, limit: int) -> bytes:
    """A zlib block inflated to at most `limit` bytes (PayloadError too_large beyond, bad_block
    for anything that is not one whole zlib stream)."""
    d = zlib.decompressobj()
    try:
        raw = d.decompress(block, limit + 1)  # never 0: that would mean no limit
    except zlib.error as exc:
        raise PayloadError("bad_block", f"zlib: {exc}") from None
    if len(raw) > limit:
        raise PayloadError("too_large", f"a block inflates to more than {limit} bytes")
    if not d.eof or d.unused_data:
        raise PayloadError("bad_block", "not one whole zlib stream")
    return raw


def _log_groups(body: bytes, budget: int) -> tuple[Any, int]:
    """An ingest_log body (collector/ingestlog.py) inflated within `budget` bytes and unpacked:
    its groups (a list, not yet checked) and the bytes inflated."""
    raw = inflate(body, budget)
    try:
        version, groups = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise PayloadError("bad_block", f"not a log body ({type(exc).__name__})") from None
    if version != ingestlog.BODY_VERSION or type(version) is not int or not isinstance(groups, list):
        raise PayloadError("bad_block", f"log body version {version!r}, expected {ingestlog.BODY_VERSION}")
    return groups, len(raw)


def _group(g: Any) -> tuple[Any, Any, list, list, list, dict, int]:
    """One group's shape: [sensor, boot, seqs, ts, received, metrics] with seqs, ts and
    received of one length n > 0 (returned last); the columns' values are checked by the caller."""
    if type(g) is not list or len(g) != 6:
        raise PayloadError("bad_shape", "group: 6 items expected")
    sensor, boot, seqs, ts, received, metrics = g
    n = len(seqs) if type(seqs) is list else 0
    if not (
        type(sensor) is str
        and 0 < len(sensor) <= 256
        and (boot is None or type(boot) is int)
        and n > 0
        and type(ts) is list
        and len(ts) == n
        and type(received) is list
        and len(received) == n
        and type(metrics) is dict
    ):
        raise PayloadError("bad_shape", f"group of {sensor!r}: sensor, boot, seqs/ts/received or metrics")
    return sensor, boot, seqs, ts, received, metrics, n


def _columns(gateway: Any, blocks: Any) -> Columns:
    """Every group's shape checked as it comes, the groups merged per (sensor, boot) in order
    of first appearance (commit order kept within each), then each merged sensor's columns
    type-checked at C speed: one Python step per sensor of the message, not per group."""
    _shape(isinstance(gateway, str) and GATEWAY_RE.fullmatch(gateway) is not None, "gateway")
    _shape(isinstance(blocks, list) and len(blocks) > 0 and all(type(b) is bytes for b in blocks), "blocks")
    budget = MAX_INFLATED_BYTES
    merged: dict[tuple[Any, Any], _Pending] = {}
    for block in blocks:
        groups, inflated = _log_groups(block, budget)
        budget -= inflated
        for g in groups:
            sensor, boot, seqs, ts, received, metrics, n = _group(g)  # the same checks as _readings
            key = (sensor, boot)
            p = merged.get(key)
            if p is None:
                p = merged[key] = _Pending()
            before = len(p.seqs)
            p.seqs += seqs
            p.ts += ts
            p.received += received
            columns = p.metrics
            for name, values in metrics.items():
                if type(name) is not str or not 0 < len(name) <= 256 or type(values) is not list or len(values) != n:
                    raise PayloadError("bad_shape", f"metric {name!r} of {sensor!r}")
                column = columns.get(name)
                if column is None:
                    column = columns[name] = [None] * before
                elif len(column) < before:
                    column += [None] * (before - len(column))
                column += values
    items = []
    for (sensor, boot), p in merged.items():
        n = len(p.seqs)
        for column in p.metrics.values():
            if len(column) < n:
                column += [None] * (n - len(column))
        items.append(_readings(gateway, sensor, boot, p.seqs, p.ts, p.received, p.metrics))
    return Columns(gateway, tuple(items))


_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_I64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
_FINITE = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]  # NaN fails both
_TIME = Annotated[float, msgspec.Meta(ge=0.0, lt=MAX_TIME)]
# A log body as payload 3 takes it: every value's type and range checked while it is decoded (in
# C): ints int64, readings finite, times in [0, 2**32) (what the central database holds); ints are
# taken where floats are expected for ts/received, as float() would.
_LOG_BODY = msgspec.msgpack.Decoder(
    tuple[
        int,
        list[
            tuple[
                _Name,
                _I64 | None,
                list[_I64],
                list[_TIME],
                list[_TIME],
                dict[_Name, list[_I64 | _FINITE | None]],
            ]
        ],
    ]
)


def block_entry(entry: Any, budget: int) -> tuple[int, int, bool, bytes, bytes]:
    """One [id, offset, last, body] of a version-3 columns message, its header checked and its
    body inflated within `budget` bytes: (id, offset, last, body, the inflated msgpack)."""
    _shape(type(entry) is list and len(entry) == 4, "block: [id, offset, last, body] expected")
    row_id, offset, last, body = entry
    _shape(_int(row_id) and _int(offset) and type(last) is bool and type(body) is bytes, "block header")
    return row_id, offset, last, body, inflate(body, budget)


def _log_block(entry: Any, budget: int) -> tuple[LogBlock, int]:
    """One [id, offset, last, body] of a version-3 columns message: the body inflated (within
    `budget` bytes), every group's shape and every value's type checked, the groups kept as
    they are (tuples; the central side merges the ones it takes).  Returns the block and the
    bytes inflated.  Unlike payload 2's _log_groups and _group, types are checked by a typed
    decoder as it builds the values (msgspec, in C: 0.328 -> 0.274 s per 600,000 readings),
    so what is left in Python is one step per group and metric."""
    row_id, offset, last, body, raw = block_entry(entry, budget)
    try:
        version, groups = _LOG_BODY.decode(raw)
    except msgspec.ValidationError as exc:  # a group's shape or a value's type
        where = str(exc).rpartition("`$")[2]
        raise PayloadError("bad_shape" if where.startswith("[1][") else "bad_block", f"log body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise PayloadError("bad_block", f"not a log body ({exc})") from None
    if version != ingestlog.BODY_VERSION:
        raise PayloadError("bad_block", f"log body version {version!r}, expected {ingestlog.BODY_VERSION}")
    if not groups:
        raise PayloadError("bad_block", "a log body without groups")
    datagrams, readings = _block_counts(groups)
    try:
        ranges.block_range(row_id, offset, datagrams, last)
    except ValueError as exc:
        raise PayloadError("bad_shape", str(exc)) from None
    return LogBlock(row_id, offset, last, groups, datagrams, readings, body), len(raw)


_SEQS, _TS, _RECEIVED, _METRICS = (itemgetter(i) for i in range(2, 6))


def _block_counts(groups: list) -> tuple[int, int]:
    """(datagrams, readings) of a decoded log body's groups, their column lengths checked
    (seqs, ts and received of one length n > 0 in each group, every metric column n long):
    one pass over the groups at C speed; the Python loop only to name what is wrong."""
    ns = list(map(len, map(_SEQS, groups)))
    maps = list(map(_METRICS, groups))
    columns = list(chain.from_iterable(map(dict.values, maps)))
    if (
        0 in ns
        or ns != list(map(len, map(_TS, groups)))
        or ns != list(map(len, map(_RECEIVED, groups)))
        or list(map(len, columns)) != list(chain.from_iterable(map(repeat, ns, map(len, maps))))
    ):
        for sensor, _boot, seqs, ts, received, metrics in groups:
            n = len(seqs)
            if not (n > 0 and len(ts) == n and len(received) == n):
                raise PayloadError("bad_shape", f"group of {sensor!r}: seqs/ts/received lengths")
            for name, column in metrics.items():
                if len(column) != n:
                    raise PayloadError("bad_shape", f"metric {name!r} of {sensor!r}")
        raise AssertionError("unreachable: the lengths differ")  # pragma: no cover
    return sum(ns), sum(map(len, columns)) - sum(map(list.count, columns, repeat(None)))


def _blocks(gateway: Any, origin: Any, gone: Any, entries: Any) -> Blocks:
    _shape(isinstance(gateway, str) and GATEWAY_RE.fullmatch(gateway) is not None, "gateway")
    _shape(isinstance(origin, str) and ORIGIN_RE.fullmatch(origin) is not None, "origin")
    _shape(isinstance(gone, list) and len(gone) <= 64, "gone")
    spans = []
    for g in gone:
        _shape(isinstance(g, list) and len(g) == 2 and _int(g[0]) and _int(g[1]), "gone: [first id, last id]")
        try:
            ranges.rows_range(g[0], g[1])
        except ValueError as exc:
            raise PayloadError("bad_shape", f"gone: {exc}") from None
        spans.append((g[0], g[1]))
    _shape(isinstance(entries, list) and (len(entries) > 0 or len(spans) > 0), "blocks")
    budget = MAX_INFLATED_BYTES
    out = []
    for entry in entries:
        block, used = _log_block(entry, budget)
        budget -= used
        out.append(block)
    return Blocks(gateway, origin, tuple(out), tuple(spans))


def _accounts(gateway: Any, fields: list) -> Accounts:
    """sensor, as_of, first_seen, last_seen, datagrams, readings, lost, duplicates, reordered,
    restarts, gaps, gaps_total checked (PayloadError bad_shape), as an Accounts."""
    (
        sensor,
        as_of,
        first_seen,
        last_seen,
        datagrams,
        readings,
        lost,
        duplicates,
        reordered,
        restarts,
        gaps,
        gaps_total,
    ) = fields
    _shape(isinstance(gateway, str) and GATEWAY_RE.fullmatch(gateway) is not None, "gateway")
    _shape(isinstance(sensor, str) and 0 < len(sensor) <= 256, "sensor")
    _shape(
        all(_int(v) for v in (as_of, datagrams, readings, lost, duplicates, reordered, restarts, gaps_total)),
        "counts",
    )
    _shape(_time(first_seen) and _time(last_seen), "first_seen/last_seen")
    _shape(isinstance(gaps, list) and len(gaps) <= MAX_GAPS_PER_SNAPSHOT, "gaps")
    out = []
    for g in gaps:
        _shape(isinstance(g, list) and len(g) == 6 and all(_int(v) for v in g[:5]) and _time(g[5]), "gap")
        out.append(Gap(g[0], g[1], g[2], g[3], g[4], float(g[5])))
    return Accounts(
        gateway,
        sensor,
        as_of,
        float(first_seen),
        float(last_seen),
        datagrams,
        readings,
        lost,
        duplicates,
        reordered,
        restarts,
        tuple(out),
        gaps_total,
    )


def decode(data: bytes) -> Readings | Accounts | Columns | Snapshots | Blocks:
    """Any bytes give a Readings, an Accounts, a Columns, a Snapshots, a Blocks or a
    PayloadError, nothing else."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadError("too_large", f"{len(data)} bytes")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise PayloadError("not_msgpack", type(exc).__name__) from None
    if not isinstance(body, list) or len(body) < 2:
        raise PayloadError("bad_shape", "not an array of at least 2 items")
    version = body[0]
    if type(version) is not int or version not in VERSIONS:
        raise PayloadError("bad_version", f"version {version!r}, expected one of {VERSIONS}")
    kind = body[1]
    if kind == KIND_READINGS and version == 1:
        _shape(len(body) == 9, "readings: 9 items expected")
        return _readings(*body[2:])
    if kind == KIND_COLUMNS and version == 2:
        _shape(len(body) == 4, "columns: 4 items expected")
        return _columns(body[2], body[3])
    if kind == KIND_COLUMNS and version == 3:
        _shape(len(body) == 6, "columns: 6 items expected")
        return _blocks(*body[2:])
    if kind == KIND_ACCOUNTS:
        _shape(len(body) == 15, "accounts: 15 items expected")
        return _accounts(body[2], body[3:])
    if kind == KIND_SNAPSHOTS and version in (2, 3):
        if version == 2:
            _shape(len(body) == 4, "snapshots: 4 items expected")
            gateway, entries = body[2], body[3]
            origin, as_of, counters = None, 0, None
        else:
            _shape(len(body) == 7, "snapshots: 7 items expected")
            gateway, origin, as_of, counters, entries = body[2:]
            _shape(isinstance(origin, str) and ORIGIN_RE.fullmatch(origin) is not None, "origin")
            _shape(_int(as_of) and as_of >= 0, "as_of")
            _shape(
                isinstance(counters, dict)
                and len(counters) <= 16
                and all(isinstance(k, str) and 0 < len(k) <= 64 and _int(v) and v >= 0 for k, v in counters.items()),
                "gateway counters",
            )
        _shape(isinstance(gateway, str) and GATEWAY_RE.fullmatch(gateway) is not None, "gateway")
        _shape(isinstance(entries, list) and (len(entries) > 0 or version == 3), "snapshots")
        out = []
        for e in entries:
            _shape(isinstance(e, list) and len(e) == 12, "snapshot: 12 items expected")
            out.append(_accounts(gateway, [e[0], *e[1:]]))
        return Snapshots(gateway, tuple(out), origin, as_of, counters)
    raise PayloadError("bad_kind", f"kind {kind!r} in version {version}")


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    subject: str
    msg_id: str
    payload: bytes
    datagrams: int = 0
    readings: int = 0


def _digest(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=8).hexdigest()


def readings_message(prefix: str, item: Readings) -> Message:
    """The Nats-Msg-Id names the content: gateway, sensor, boot, seq range, count, digest.

    The digest makes ids of two different batches differ even where the
    identity fields meet (a sensor without a boot field that restarted its
    seqs), and keeps a retry's id the same (the payload is a pure function of
    the batch)."""
    payload = encode(item)
    boot = "-" if item.boot is None else str(item.boot)
    msg_id = (
        f"{item.gateway}.{sensor_token(item.sensor)}.{boot}.{min(item.seqs)}-{max(item.seqs)}"
        f".{item.datagrams}.{_digest(payload)}"
    )
    return Message(
        subject(prefix, item.gateway, item.sensor, KIND_READINGS), msg_id, payload, item.datagrams, item.readings
    )


def readings_messages(prefix: str, item: Readings, max_bytes: int = MAX_MESSAGE_BYTES) -> list[Message]:
    """The item as one message, or halved until each piece fits `max_bytes` (the broker
    refuses a payload over its max_payload, 1 MiB by default, and a refused batch would be
    retried for ever).  A single datagram always fits: it came in one UDP datagram."""
    m = readings_message(prefix, item)
    if len(m.payload) <= max_bytes or item.datagrams == 1:
        return [m]
    half = item.datagrams // 2
    out = []
    for part in (slice(0, half), slice(half, None)):
        metrics = {}
        for name, column in item.metrics.items():
            piece = column[part]
            if piece.count(None) != len(piece):
                metrics[name] = piece
        out += readings_messages(
            prefix,
            Readings(
                item.gateway, item.sensor, item.boot, item.seqs[part], item.ts[part], item.received[part], metrics
            ),
            max_bytes,
        )
    return out


def accounts_message(prefix: str, item: Accounts, version: int = PAYLOAD_VERSION) -> Message:
    payload = encode(item, version)
    msg_id = f"{item.gateway}.{sensor_token(item.sensor)}.accounts.{item.as_of}.{_digest(payload)}"
    return Message(subject(prefix, item.gateway, item.sensor, KIND_ACCOUNTS), msg_id, payload)


def snapshots_messages(
    prefix: str,
    gateway: str,
    items: Sequence[Accounts],
    max_bytes: int = MAX_MESSAGE_BYTES,
    origin: str | None = None,
    as_of: int = 0,
    counters: dict[str, int] | None = None,
) -> list[Message]:
    """Version 2: the accounts that changed in a round, many sensors a message (at most
    max_bytes each; one snapshot, at most 1,000 gaps, always fits).  The id names the
    content: gateway, as_of, how many, digest.  With `origin`, version 3: every message also
    carries the gateway database's identity and its `counters` as of ingest_log id `as_of`
    (one message of no snapshots when only the counters are new)."""
    out: list[Message] = []
    run: list[list] = []
    base = _COLUMNS_OVERHEAD + (0 if origin is None else _V3_OVERHEAD + 40 * len(counters or {}))
    size = base

    def flush() -> None:
        if origin is None:
            payload = msgpack.packb([2, KIND_SNAPSHOTS, gateway, run], use_bin_type=True)
        else:
            body = [3, KIND_SNAPSHOTS, gateway, origin, as_of, dict(counters or {}), run]
            payload = msgpack.packb(body, use_bin_type=True)
        newest = max((e[1] for e in run), default=as_of)
        msg_id = f"{gateway}.accounts.{newest}.{len(run)}.{_digest(payload)}"
        out.append(Message(snapshots_subject(prefix, gateway), msg_id, payload))

    for item in items:
        body = _snapshot_body(item)
        n = len(msgpack.packb(body, use_bin_type=True))
        if run and size + n > max_bytes:
            flush()
            run, size = [], base
        run.append(body)
        size += n
    if run or (origin is not None and counters is not None and not out):
        flush()
    return out


@dataclass(frozen=True)
class Block:
    """One ingest_log row as committed: its id, counts, body and inflated size (the uplink
    checks every body inflates before it forwards it)."""

    id: int
    datagrams: int
    readings: int
    body: bytes
    inflated: int
    offset: int = 0  # the datagram of the row it starts at (a row cut in pieces: split_block)
    last: bool = True  # it runs to the row's end


# Bytes of a columns payload around its blocks: array, version, kind, gateway (<= 32
# characters), the blocks' array header, and each block's bin header.
_COLUMNS_OVERHEAD = 48
_BLOCK_OVERHEAD = 5
# Version 3 adds the origin (<= 64 characters) and the gone ranges' array to the payload, and
# to each block an array of id, offset, last (<= 16 bytes).
_V3_OVERHEAD = 72
_V3_BLOCK_OVERHEAD = 5 + 16


def columns_message(
    prefix: str,
    gateway: str,
    blocks: Sequence[Block],
    origin: str | None = None,
    gone: Sequence[tuple[int, int]] = (),
) -> Message:
    """The Nats-Msg-Id names the content: gateway, the ingest_log ids it covers, datagrams,
    digest.  The bodies are the log rows as committed, so a retry of the same rows after a
    crash or a timeout carries the same payload and the same id.  With `origin` (the gateway
    database's identity) the payload is version 3: each block named by (id, offset, last),
    and `gone`, the ranges of log ids deleted before they were sent."""
    if origin is None:
        payload = encode_columns(gateway, [b.body for b in blocks])
    else:
        payload = encode_columns3(gateway, origin, blocks, gone)
    datagrams = sum(b.datagrams for b in blocks)
    first, last = (blocks[0].id, blocks[-1].id) if blocks else (gone[0][0], gone[-1][1])
    msg_id = f"{gateway}.log.{first}-{last}.{datagrams}.{_digest(payload)}"
    return Message(columns_subject(prefix, gateway), msg_id, payload, datagrams, sum(b.readings for b in blocks))


def columns_messages(
    prefix: str,
    gateway: str,
    blocks: Iterable[Block],
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_datagrams: int = DEFAULT_MAX_DATAGRAMS[2],
    max_readings: int = MAX_MESSAGE_READINGS,
    origin: str | None = None,
    gone: Sequence[tuple[int, int]] = (),
) -> list[Message]:
    """Consecutive rows packed into messages of at most max_bytes of payload, max_datagrams
    datagrams, max_readings readings and MAX_INFLATED_BYTES inflated, in commit order.  A row
    over any limit alone is decoded and cut (`split_block`): the only re-encoding.  With
    `origin`, version 3 (`gone` rides in the first message; a message of no blocks carries it
    when there are none)."""
    if max_datagrams < 1:
        raise ValueError("max_datagrams must be >= 1")
    if origin is not None:  # version 3: the origin, gone ranges and block headers
        max_bytes -= _V3_OVERHEAD + 24 * len(gone)
    block_overhead = _BLOCK_OVERHEAD if origin is None else _V3_BLOCK_OVERHEAD
    out: list[Message] = []

    def message(run: Sequence[Block]) -> Message:
        return columns_message(prefix, gateway, run, origin, () if out else gone)

    run: list[Block] = []
    size = datagrams = readings = inflated = 0
    for b in blocks:
        fits_alone = (
            _COLUMNS_OVERHEAD + block_overhead + len(b.body) <= max_bytes
            and b.datagrams <= max_datagrams
            and b.readings <= max_readings
            and b.inflated <= MAX_INFLATED_BYTES
        )
        if run and (
            not fits_alone
            or size + block_overhead + len(b.body) > max_bytes
            or datagrams + b.datagrams > max_datagrams
            or readings + b.readings > max_readings
            or inflated + b.inflated > MAX_INFLATED_BYTES
        ):
            out.append(message(run))
            run, size, datagrams, readings, inflated = [], 0, 0, 0, 0
        if not fits_alone:
            out += [
                message([piece])
                for piece in split_block(b, max_bytes - _COLUMNS_OVERHEAD - block_overhead, max_datagrams, max_readings)
            ]
            continue
        run.append(b)
        size = size or _COLUMNS_OVERHEAD
        size += block_overhead + len(b.body)
        datagrams += b.datagrams
        readings += b.readings
        inflated += b.inflated
    if run:
        out.append(message(run))
    if origin is not None and gone and not out:
        out.append(message(()))
    return out


def _slice(g: Group, part: slice) -> Group:
    metrics = {}
    for name, column in g.metrics.items():
        piece = column[part]
        if piece.count(None) != len(piece):
            metrics[name] = piece
    return Group(g.sensor, g.boot, g.seqs[part], g.ts[part], g.received[part], metrics)


def split_block(b: Block, max_bytes: int, max_datagrams: int, max_readings: int) -> list[Block]:
    """A row too large for one message, cut into rows of the same id that each fit: its
    groups decoded (ingestlog.LogFormatError for a damaged body), cut at max_datagrams
    datagrams, halved until every piece fits max_bytes, max_readings and MAX_INFLATED_BYTES.
    A single datagram always fits the byte limits: it came in one UDP datagram."""
    pieces: list[list[Group]] = [[]]
    room = max_datagrams
    for g in ingestlog.decode_body(b.body):
        start = 0
        while start < len(g.seqs):
            if room == 0:
                pieces.append([])
                room = max_datagrams
            take = min(room, len(g.seqs) - start)
            pieces[-1].append(g if take == len(g.seqs) else _slice(g, slice(start, start + take)))
            start += take
            room -= take
    out: list[Block] = []
    at = b.offset

    def emit(groups: list[Group]) -> None:
        nonlocal at
        body = ingestlog.encode_body(groups)
        datagrams, readings = ingestlog.counts(groups)
        inflated = len(zlib.decompress(body))
        if datagrams > 1 and (len(body) > max_bytes or readings > max_readings or inflated > MAX_INFLATED_BYTES):
            half = datagrams // 2
            first: list[Group] = []
            second: list[Group] = []
            seen = 0
            for g in groups:
                n = len(g.seqs)
                if seen + n <= half:
                    first.append(g)
                elif seen >= half:
                    second.append(g)
                else:
                    first.append(_slice(g, slice(0, half - seen)))
                    second.append(_slice(g, slice(half - seen, None)))
                seen += n
            emit(first)
            emit(second)
            return
        out.append(Block(b.id, datagrams, readings, body, inflated, at, False))
        at += datagrams

    for groups in pieces:
        if groups:
            emit(groups)
    if out:
        out[-1] = Block(
            *[getattr(out[-1], f) for f in ("id", "datagrams", "readings", "body", "inflated", "offset")], b.last
        )
    return out


@dataclass
class _Pending:
    seqs: list[int] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    received: list[float] = field(default_factory=list)
    metrics: dict[str, list[Any]] = field(default_factory=dict)

    def extend(self, g: Group) -> None:
        before = len(self.seqs)
        n = len(g.seqs)
        self.seqs.extend(g.seqs)
        self.ts.extend(g.ts)
        self.received.extend(g.received)
        for name, values in g.metrics.items():
            column = self.metrics.get(name)
            if column is None:
                column = self.metrics[name] = [None] * before
            column.extend(values)
        for column in self.metrics.values():
            if len(column) < before + n:
                column.extend([None] * (before + n - len(column)))


def batch(gateway: str, entries: Iterable[Entry], max_datagrams: int) -> list[Readings]:
    """The entries' groups merged per (sensor, boot), in order of first appearance,
    cut into pieces of at most max_datagrams datagrams; datagrams keep their
    commit order within a piece.  Metrics a piece never carries are left out."""
    if max_datagrams < 1:
        raise ValueError("max_datagrams must be >= 1")
    merged: dict[tuple[str, int | None], _Pending] = {}
    for entry in entries:
        for g in entry.groups:
            merged.setdefault((g.sensor, g.boot), _Pending()).extend(g)
    out = []
    for (sensor, boot), p in merged.items():
        for start in range(0, len(p.seqs), max_datagrams):
            stop = start + max_datagrams
            metrics = {}
            for name, column in p.metrics.items():
                part = column[start:stop]
                if part.count(None) != len(part):
                    metrics[name] = part
            out.append(
                Readings(gateway, sensor, boot, p.seqs[start:stop], p.ts[start:stop], p.received[start:stop], metrics)
            )
    return out


# ---------------------------------------------------------------- backoff


class Backoff:
    """Exponential backoff with "equal jitter": delay n is uniform in
    [d/2, d] with d = min(cap, base * 2**n), so retries of many gateways
    spread out and never exceed `cap`.  `reset()` after a success."""

    def __init__(self, base: float = 0.1, cap: float = 30.0, rng: random.Random | None = None) -> None:
        if not 0 < base <= cap:
            raise ValueError("need 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        d = min(self.cap, self.base * 2 ** min(self.attempt, 60))
        self.attempt += 1
        return d / 2 + self._rng.random() * d / 2

    def reset(self) -> None:
        self.attempt = 0


# ---------------------------------------------------------------- cursor


def format_cursor(acked_id: int) -> bytes:
    """The `<db>-uplink` file: the last acked ingest_log id, decimal, newline."""
    if type(acked_id) is not int or acked_id < 0:
        raise ValueError(f"cursor must be a non-negative integer, got {acked_id!r}")
    return f"{acked_id}\n".encode()


def parse_cursor(data: bytes) -> int:
    text = data.decode("ascii", "replace")
    if not re.fullmatch(r"[0-9]{1,19}\n?", text):
        raise ValueError(f"not a decimal id and a newline: {text[:40]!r}")
    return int(text)


def accounts_changed(previous: dict[str, tuple], rows: Sequence[tuple]) -> list[tuple]:
    """Rows (sensor, *counts) whose counts differ from what was last published."""
    return [row for row in rows if previous.get(row[0]) != tuple(row[1:])]
