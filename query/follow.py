"""Live follow: what the collector commits, read from its ingest log and pushed to subscribers.

Two halves.  `rows_of` and `encode_event` are pure: an ingest log entry
(collector/ingestlog.py) becomes one pre-encoded JSON row per reading, and a
subscriber's filtered rows become one event line.  `FollowSource` is the
server's one reader thread with its own read-only connection: on its own
timer (FOLLOW_POLL_SECONDS; no client polls) it checks `PRAGMA data_version`
and, when something was committed, reads the log rows after the lowest
subscriber position, decodes them and hands them to the selectors loop,
which owns the subscribers and their positions.  The thread then waits until
the loop has taken the batch, so at most one batch (FOLLOW_BATCH_ENTRIES
log rows, FOLLOW_BATCH_READINGS readings: ~2 MB of encoded rows) is held
however many subscribers there are, and a reader that
falls behind is caught up in batches without re-reading.

Positions are ingest_log ids (AUTOINCREMENT: never reused, so a client that
resumes with `after` continues exactly where it stopped, across query
server and collector restarts).  Rows deleted before a subscriber read them
show up as a jump in ids, which the loop reports as a `lost` event.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from collector import ingestlog

from .protocol import dump_json

log = logging.getLogger("telemetry.query")

FOLLOW_POLL_SECONDS = 0.1  # how often the database is checked for new commits (one cheap PRAGMA)
FOLLOW_BATCH_ENTRIES = 64  # log rows (flushes) read and held at a time ...
FOLLOW_BATCH_READINGS = 20_000  # ... and readings: past this the batch ends (a full flush is 20,000)


class Row(NamedTuple):
    sensor: str
    metric: str
    json: str  # the reading as the JSON object `readings` returns


class Entry(NamedTuple):
    id: int
    rows: list[Row]


def rows_of(groups: list[ingestlog.Group]) -> list[Row]:
    """One Row per reading, in commit order: group by group, datagram by datagram, metrics by name."""
    out = []
    for g in groups:
        names = sorted(g.metrics)
        for i, seq in enumerate(g.seqs):
            for name in names:
                values = g.metrics[name]
                value = values[i] if i < len(values) else None
                if value is None:
                    continue
                obj = {"sensor": g.sensor, "metric": name, "ts": g.ts[i], "value": value, "seq": seq, "boot": g.boot}
                out.append(Row(g.sensor, name, dump_json(obj)))
    return out


def matching(rows: list[Row], sensor: str | None, metric: str | None) -> list[str]:
    return [r.json for r in rows if (sensor is None or r.sensor == sensor) and (metric is None or r.metric == metric)]


def encode_event(id_json: str, event: str, position: int, rows: list[str] | None = None, **extra: Any) -> bytes:
    """{"id":ID,"ok":true,"event":EVENT,"position":P[,"rows":[...]][,extra]} as one line."""
    parts = ['{"id":', id_json, ',"ok":true,"event":', json.dumps(event), ',"position":', str(position)]
    for key, value in extra.items():
        parts += [",", json.dumps(key), ":", dump_json(value)]
    if rows is not None:
        parts += [',"rows":[', ",".join(rows), "]"]
    parts.append("}\n")
    return "".join(parts).encode("ascii")


class FollowSource:
    """The reader thread.  The loop calls `floor` (lowest position wanted, None: nobody follows),
    `take()` for a finished batch and `head` for where "from now" starts."""

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], wake: Callable[[], None], poll: float = FOLLOW_POLL_SECONDS
    ) -> None:
        self._connect = connect
        self._wake = wake
        self._poll = poll
        self.floor: int | None = None  # set by the loop
        self.head: int | None = None  # newest id ever given; None: this database has no ingest log
        self._batch: list[Entry] | None = None
        self._taken = threading.Event()
        self._taken.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="query-follow", daemon=True)
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5)  # head known before the first subscriber asks for it

    def close(self) -> None:
        self._stop.set()
        self._taken.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def take(self) -> list[Entry] | None:
        """The batch read since the last call (the loop's side), or None."""
        with self._lock:
            batch, self._batch = self._batch, None
        if batch is not None:
            self._taken.set()
        return batch

    def _run(self) -> None:
        try:
            conn = self._connect()
        except Exception:  # the database went away: follow answers that it cannot
            log.exception("follow: cannot open the database")
            self._ready.set()
            return
        try:
            last_version = None
            full = False
            while not self._stop.is_set():
                try:
                    version = conn.execute("PRAGMA data_version").fetchone()[0]
                    if version != last_version or self.head is None:
                        self.head = self._head(conn)
                    self._ready.set()
                    floor = self.floor
                    if (
                        floor is not None
                        and self.head is not None
                        and (full or version != last_version or floor < self.head)
                    ):
                        entries, full = self._read(conn, floor)
                        if entries:
                            self._post(entries)
                            if full:
                                continue  # catching up: read on without waiting for the timer
                    last_version = version
                except sqlite3.Error as exc:  # the collector restarting, a locked moment: try again
                    log.warning("follow: reading the ingest log failed: %s; retrying", exc)
                    self.head = None if "no such table" in str(exc) else self.head
                except ingestlog.LogFormatError as exc:
                    log.error("follow: %s; that row is skipped", exc)
                self._stop.wait(self._poll)
        finally:
            self._ready.set()
            conn.close()

    @staticmethod
    def _head(conn: sqlite3.Connection) -> int | None:
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ingest_log'").fetchone()
        return ingestlog.last_id(conn) if found else None

    def _read(self, conn: sqlite3.Connection, after: int) -> tuple[list[Entry], bool]:
        """Log rows after `after`, up to the batch bounds; and whether a bound cut the batch short."""
        entries = []
        readings = 0
        cursor = conn.execute(
            "SELECT id, readings, body FROM ingest_log WHERE id > ? ORDER BY id LIMIT ?", (after, FOLLOW_BATCH_ENTRIES)
        )
        for row_id, count, body in cursor:
            if entries and readings + count > FOLLOW_BATCH_READINGS:
                cursor.close()  # a half-read cursor would hold its read snapshot (and stall checkpoints)
                return entries, True
            readings += count
            try:
                rows = rows_of(ingestlog.decode_body(body))
            except ingestlog.LogFormatError as exc:
                log.error("follow: ingest_log row %d: %s; skipped", row_id, exc)
                rows = []
            entries.append(Entry(row_id, rows))
        return entries, len(entries) == FOLLOW_BATCH_ENTRIES

    def _post(self, entries: list[Entry]) -> None:
        self._taken.clear()
        with self._lock:
            self._batch = entries
        self._wake()
        while not self._taken.wait(1.0):  # the loop takes it at its next turn
            if self._stop.is_set():
                return
