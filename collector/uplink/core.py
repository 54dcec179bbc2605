"""The uplink's pure core: no sockets, no files, no clock of its own.

- subject tokens: sensor ids may contain '.', ':' and '/', and '.' separates
  NATS subject tokens, so every character outside [A-Za-z0-9_-] is written
  as %XX (its UTF-8 bytes, upper-case hex), reversibly (`sensor_token`,
  `token_sensor`);
- the payload codec, version 1 (docs/PROTOCOL.md "Uplink"): a readings
  message is one sensor's datagrams of one boot, an accounts message is one
  sensor's account snapshot; both are msgpack arrays that start with the
  version and a kind letter;
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..ingestlog import Entry, Group

PAYLOAD_VERSION = 1
KIND_READINGS = "R"
KIND_ACCOUNTS = "A"
# Gap rows carried by one accounts snapshot at most (the newest ones); the
# `lost` count is exact whatever the cap, `gaps_total` says how many exist.
MAX_GAPS_PER_SNAPSHOT = 1000
# Messages the uplink sends stay below this (bytes), well under the broker's
# default max_payload of 1 MiB.
MAX_MESSAGE_BYTES = 512 * 1024
# A payload larger than this is refused by the decoder (the broker's default
# max_payload is 1 MiB; our messages stay far below it).
MAX_PAYLOAD_BYTES = 1 << 20

GATEWAY_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
PREFIX_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPE_RE = re.compile(r"%([0-9A-F]{2})")


class PayloadError(ValueError):
    """A message body that is not a valid version-1 uplink payload. `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


REASONS = ("not_msgpack", "bad_version", "bad_kind", "bad_shape", "too_large")


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


def encode(item: Readings | Accounts) -> bytes:
    if isinstance(item, Readings):
        body = [
            PAYLOAD_VERSION,
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
        gaps = [[g.stream, g.boot, g.first_seq, g.last_seq, g.missing, g.detected_at] for g in item.gaps]
        body = [
            PAYLOAD_VERSION,
            KIND_ACCOUNTS,
            item.gateway,
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
    return msgpack.packb(body, use_bin_type=True)


def _int(v: Any) -> bool:
    return type(v) is int


def _num(v: Any) -> bool:
    return type(v) in (int, float)


# Type checks over whole columns run at C speed (map/set), not one Python step per value:
# the consumer decodes every reading it stores.
_INT = frozenset((int,))
_NUM = frozenset((int, float))
_VALUE = frozenset((int, float, type(None)))


def _ints(v: Any) -> bool:
    return isinstance(v, list) and set(map(type, v)) <= _INT


def _nums(v: Any) -> bool:
    return isinstance(v, list) and set(map(type, v)) <= _NUM


def _shape(ok: bool, what: str) -> None:
    if not ok:
        raise PayloadError("bad_shape", what)


def decode(data: bytes) -> Readings | Accounts:
    """Any bytes give a Readings, an Accounts or a PayloadError, nothing else."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadError("too_large", f"{len(data)} bytes")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise PayloadError("not_msgpack", type(exc).__name__) from None
    if not isinstance(body, list) or len(body) < 2:
        raise PayloadError("bad_shape", "not an array of at least 2 items")
    if body[0] != PAYLOAD_VERSION or type(body[0]) is not int:
        raise PayloadError("bad_version", f"version {body[0]!r}, expected {PAYLOAD_VERSION}")
    kind = body[1]
    if kind == KIND_READINGS:
        _shape(len(body) == 9, "readings: 9 items expected")
        _, _, gateway, sensor, boot, seqs, ts, received, metrics = body
        _shape(isinstance(gateway, str) and GATEWAY_RE.fullmatch(gateway) is not None, "gateway")
        _shape(isinstance(sensor, str) and 0 < len(sensor) <= 256, "sensor")
        _shape(boot is None or _int(boot), "boot")
        _shape(_ints(seqs) and _nums(ts) and _nums(received), "seqs/ts/received")
        n = len(seqs)
        _shape(n > 0 and len(ts) == n and len(received) == n, "seqs/ts/received lengths")
        _shape(all(map(math.isfinite, ts)) and all(map(math.isfinite, received)), "non-finite time")
        _shape(isinstance(metrics, dict), "metrics")
        for name, values in metrics.items():
            _shape(isinstance(name, str) and 0 < len(name) <= 256, "metric name")
            _shape(isinstance(values, list) and len(values) == n, f"metric {name!r} length")
            _shape(set(map(type, values)) <= _VALUE, f"metric {name!r} values")
        return Readings(gateway, sensor, boot, seqs, list(map(float, ts)), list(map(float, received)), metrics)
    if kind == KIND_ACCOUNTS:
        _shape(len(body) == 15, "accounts: 15 items expected")
        (
            _,
            _,
            gateway,
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
        ) = body
        _shape(isinstance(gateway, str) and GATEWAY_RE.fullmatch(gateway) is not None, "gateway")
        _shape(isinstance(sensor, str) and 0 < len(sensor) <= 256, "sensor")
        _shape(
            all(_int(v) for v in (as_of, datagrams, readings, lost, duplicates, reordered, restarts, gaps_total)),
            "counts",
        )
        _shape(_num(first_seen) and _num(last_seen), "first_seen/last_seen")
        _shape(isinstance(gaps, list) and len(gaps) <= MAX_GAPS_PER_SNAPSHOT, "gaps")
        out = []
        for g in gaps:
            _shape(isinstance(g, list) and len(g) == 6 and all(_int(v) for v in g[:5]) and _num(g[5]), "gap")
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
    raise PayloadError("bad_kind", f"kind {kind!r}")


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


def accounts_message(prefix: str, item: Accounts) -> Message:
    payload = encode(item)
    msg_id = f"{item.gateway}.{sensor_token(item.sensor)}.accounts.{item.as_of}.{_digest(payload)}"
    return Message(subject(prefix, item.gateway, item.sensor, KIND_ACCOUNTS), msg_id, payload)


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
