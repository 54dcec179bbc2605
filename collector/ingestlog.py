"""The ingest log: what each flush committed, in commit order. No sockets, no files.

Storage v3 (docs/SCHEMA.md) writes one `ingest_log` row per flush, in the same
transaction as the accounts: the datagrams that flush stored, grouped by
sensor, as one compressed blob.  Rows are appended with increasing ids, so a
flush touches a few consecutive pages (sequential, bounded writes) instead of
a page per series.  Everything that must follow what was committed reads this
table by id (AUTOINCREMENT: an id is never reused, even after the log has
been emptied, so a reader's position stays valid): the collector itself when it rebuilds its open chunk heads after a
restart, the query server's live `follow`, and the uplink.  A reader keeps the
last id it has handled; rows are deleted from the oldest end only.

This module is the format's one definition: `encode_body` and `decode_body`
are pure and round-trip every value bit-exact (float64 as msgpack float64, so
-0.0 and NaN payloads survive; integers as msgpack integers, so values beyond
2**53 survive), and `read_after` is the one query readers run.

Body, version 1: zlib(msgpack([1, [group, ...]])) where a group is
  [sensor, boot, seqs, ts, received, metrics]
  sensor   str
  boot     int, or None when the sensor sends no boot field
  seqs     [int, ...]          one per datagram, in arrival order
  ts       [float, ...]        sensor time (receive time when it sent none)
  received [float, ...]        receive time
  metrics  {name: [value or None, ...]}  aligned with seqs; None where that
           datagram did not carry the metric
A sensor that changed boot within one flush has one group per boot.  The
central database of `telemetry-uplink consume` may hold several groups of one
(sensor, boot) in a row (one per message or block it took): readers take them
in order.

Body, version 2 (the central database only): zlib(msgpack([2, [[prefix, body],
...]])) where each body is a version-1 body as a gateway committed it (bytes,
zlib; the consumer keeps the blocks of a payload-3 message as they came instead
of packing and compressing their groups again) and prefix the string its
groups' sensors take (`site-7:`; "" when they are named already); the row's
groups are each part's in turn.  The outer zlib stream is level 0 (stored):
its parts are compressed already.
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgpack
import msgspec

BODY_VERSION = 1
# The central database's rows of payload-3 messages (telemetry-uplink consume): the gateways'
# version-1 bodies as they came, with the prefix their sensors take (encode_refs).
REFS_VERSION = 2
# zlib level 1: the log is transient (deleted once its data is in closed
# chunks and, when an uplink runs, sent), so it is compressed for write
# volume, not for size at rest.
ZLIB_LEVEL = 1

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS ingest_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    committed REAL NOT NULL,
    datagrams INTEGER NOT NULL,
    readings INTEGER NOT NULL,
    body BLOB NOT NULL
)"""


class Group(NamedTuple):
    """One sensor's datagrams stored by one flush (one boot)."""

    sensor: str
    boot: int | None
    seqs: list[int]
    ts: list[float]
    received: list[float]
    metrics: dict[str, list[Any]]


class Entry(NamedTuple):
    """One ingest_log row, decoded."""

    id: int
    committed: float
    groups: list[Group]


class LogFormatError(ValueError):
    """A body that is not a valid version-1 ingest log body."""


# msgspec writes the same bytes as msgpack.packb(use_bin_type=True) for these
# types (a Group is a NamedTuple: an array; floats as float64, ints in their
# smallest width; tests/test_ingestlog.py compares them), about 10x faster on a
# flush's batch (bench/ingest_core.py).
_pack = msgspec.msgpack.Encoder().encode


def encode_body(groups: list[Group]) -> bytes:
    return zlib.compress(_pack([BODY_VERSION, groups]), ZLIB_LEVEL)


def pack_groups(groups: list[Group]) -> bytes:
    """Groups as msgpack, as they appear inside a body, one after the other (body_of_packed
    joins such runs): packed as one array, its header cut off."""
    return _pack(groups)[len(_array_header(len(groups))) :]


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def body_of_packed(parts: list[bytes], count: int) -> bytes:
    """The body of `count` groups packed apart (pack_group; one part may hold several, joined):
    the same bytes as encode_body of those groups, without packing them again (msgpack's
    array is its header followed by its items)."""
    return zlib.compress(b"".join([b"\x92\x01", _array_header(count), *parts]), ZLIB_LEVEL)


def encode_refs(parts: list[tuple[str, bytes]]) -> bytes:
    """A version-2 body (the central database's): version-1 bodies as they came, each with the
    prefix its groups' sensors take (a gateway's `site-7:`; "" for none), in order.  Stored
    zlib level 0: the parts are compressed already."""
    return zlib.compress(_pack([REFS_VERSION, parts]), 0)


def decode_body(body: bytes) -> list[Group]:
    """A body's groups, in order: version 1, or version 2's parts' groups in turn, their
    sensors prefixed."""
    version, groups = _unpacked(body)
    if version == REFS_VERSION:
        if not isinstance(groups, list):
            raise LogFormatError("ingest log body: version 2 holds a list of [prefix, body]")
        out = []
        for part in groups:
            if not (isinstance(part, list) and len(part) == 2 and type(part[0]) is str and type(part[1]) is bytes):
                raise LogFormatError("ingest log body: a version-2 part is not [prefix, body]")
            prefix, inner = part
            version, inner_groups = _unpacked(inner)
            if version != BODY_VERSION:
                raise LogFormatError(
                    f"ingest log body: a version-2 part of version {version!r}, expected {BODY_VERSION}"
                )
            if prefix:
                named = _groups(inner_groups)
                if not all(type(g.sensor) is str for g in named):
                    raise LogFormatError("ingest log body: a version-2 part's group without a sensor name")
                out += [g._replace(sensor=prefix + g.sensor) for g in named]
            else:
                out += _groups(inner_groups)
        return out
    if version != BODY_VERSION:
        raise LogFormatError(f"ingest log body version {version!r}, expected {BODY_VERSION} or {REFS_VERSION}")
    return _groups(groups)


def _unpacked(body: bytes) -> tuple[Any, Any]:
    try:
        version, groups = msgpack.unpackb(zlib.decompress(body), raw=False, strict_map_key=True)
    except (zlib.error, ValueError, TypeError, msgpack.UnpackException) as exc:
        raise LogFormatError(f"ingest log body: {exc}") from None
    return version, groups


def _groups(groups: Any) -> list[Group]:
    if not isinstance(groups, list):
        raise LogFormatError("ingest log body: groups are not a list")
    out = []
    for g in groups:
        if not isinstance(g, list) or len(g) != 6:
            raise LogFormatError("ingest log body: a group is not a 6-element list")
        out.append(Group(*g))
    return out


def counts(groups: list[Group]) -> tuple[int, int]:
    """(datagrams, readings) in these groups, for the row's columns."""
    datagrams = sum(len(g.seqs) for g in groups)
    readings = sum(len(values) - values.count(None) for g in groups for values in g.metrics.values())
    return datagrams, readings


def append(
    conn: sqlite3.Connection,
    committed: float,
    groups: list[Group],
    known: tuple[int, int] | None = None,
    body: bytes | None = None,
) -> int:
    """Append one row inside the caller's transaction; returns its id.

    `known`: (datagrams, readings) when the caller has counted them (the
    ingest core has), saving a pass over every value; `body`: the groups'
    body when the caller has encoded it (body_of_packed)."""
    datagrams, readings = counts(groups) if known is None else known
    cur = conn.execute(
        "INSERT INTO ingest_log (committed, datagrams, readings, body) VALUES (?, ?, ?, ?)",
        (committed, datagrams, readings, encode_body(groups) if body is None else body),
    )
    assert cur.lastrowid is not None  # an INSERT into a rowid table always sets it
    return cur.lastrowid


def read_after(conn: sqlite3.Connection, after_id: int, limit: int = 100) -> Iterator[Entry]:
    """Rows with id > after_id, oldest first, at most `limit` of them."""
    for row_id, committed, body in conn.execute(
        "SELECT id, committed, body FROM ingest_log WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
    ):
        yield Entry(row_id, committed, decode_body(body))


def last_id(conn: sqlite3.Connection) -> int:
    """The newest id ever given, even if its row is gone; 0 for a new log.

    A reader that wants only rows committed from now on starts here.
    """
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'ingest_log'").fetchone()
    return int(row[0]) if row else 0
