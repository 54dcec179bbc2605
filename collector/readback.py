"""Every stored reading of a v3 database as rows, for exports and checks. No sockets.

`all_readings(conn)` yields (series, ts, boot, seq, value, received) for each
reading in the closed chunks and in the open heads (the ingest_log rows after
each (sensor, boot)'s last chunk), in one read transaction so that a head
closing meanwhile is neither missed nor counted twice.  Corrupt chunks are
skipped (and listed in `skipped`).
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Iterator

from . import ingestlog
from .chunkstore import ChunkError, decode_chunk
from .schema import NO_BOOT


def all_readings(conn: sqlite3.Connection, skipped: list[int] | None = None) -> list[tuple]:
    started = not conn.in_transaction
    if started:
        conn.execute("BEGIN")
    try:
        return list(_rows(conn, skipped))
    finally:
        if started:
            conn.execute("COMMIT")


def _rows(conn: sqlite3.Connection, skipped: list[int] | None) -> Iterator[tuple]:
    series = {(sensor, metric): sid for sid, sensor, metric in conn.execute("SELECT id, sensor, metric FROM series")}
    closed: dict[tuple[str, int], int] = {}
    for chunk_id, sensor, boot, log_id, crc, blob in conn.execute(
        "SELECT id, sensor, boot, log_id, crc, blob FROM chunks ORDER BY id"
    ):
        closed[(sensor, boot)] = max(closed.get((sensor, boot), 0), log_id)
        try:
            if zlib.crc32(blob) != crc:
                raise ChunkError("checksum mismatch")
            seqs, ts, received, metrics = decode_chunk(blob)
        except ChunkError:
            if skipped is not None:
                skipped.append(chunk_id)
            continue
        for name, values in metrics.items():
            sid = series[(sensor, name)]
            for i, v in enumerate(values):
                if v is not None:
                    yield (sid, ts[i], boot, seqs[i], float(v), received[i])
    after = 0
    while True:
        entries = list(ingestlog.read_after(conn, after, 200))
        if not entries:
            return
        for entry in entries:
            for g in entry.groups:
                boot = NO_BOOT if g.boot is None else g.boot
                if closed.get((g.sensor, boot), 0) >= entry.id:
                    continue
                for name, values in g.metrics.items():
                    sid = series[(g.sensor, name)]
                    for i, v in enumerate(values):
                        if v is not None:
                            yield (sid, g.ts[i], boot, g.seqs[i], float(v), g.received[i])
        after = entries[-1].id
