"""Each query op over storage v3: read-only, parameterized SQL plus chunk decoding.

`Ops.run(request)` takes a validated protocol.Request and returns the
JSON-ready result, or raises protocol.RequestError (bad_request) when the
request is well-formed but asks for too much (more rows than the server's cap,
more aggregate buckets than allowed, longer than the query time budget).  The
connection comes from collector.schema.open_reader (mode=ro), so no statement
here can change data.

Readings live in immutable chunks (found through `chunk_series`, clustered by
(series, min_ts)) and, for the newest ones, in the open heads the collector
keeps in memory; a reader rebuilds those from the `ingest_log` rows after each
(sensor, boot)'s last chunk (`HeadCache`, read incrementally by id).  Each
request runs in one read transaction, so chunks and heads come from the same
snapshot: no reading is counted twice or missed while a head closes.
Per-request notes (a corrupt chunk skipped, raw data gone and rollups used)
and the aggregate's resolution are in `Ops.meta`, which the server adds to the
response envelope.
"""

from __future__ import annotations

import math
import sqlite3
import time
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import islice
from operator import le
from typing import Any

import collector
from collector.chunkstore import ChunkError, decode_chunk, decode_minutes
from collector.health import is_stale
from collector.schema import NO_BOOT, REJECT_REASONS

from . import tuning
from .heads import HeadCache, Window
from .protocol import (
    DEFAULT_LIMIT,
    PROTOCOL_VERSION,
    Position,
    Request,
    RequestError,
    decode_cursor,
    encode_cursor,
)


@dataclass(frozen=True)
class Limits:
    max_rows: int = tuning.MAX_ROWS
    max_buckets: int = tuning.MAX_BUCKETS
    query_seconds: float = tuning.QUERY_TIMEOUT_S


_PROGRESS_STEPS = 20_000  # VM instructions between budget checks (~1 ms of work)
# Decoded series of chunks kept per connection (immutable, so never stale), as
# compact sorted columns (~24 bytes a reading, one metric of one chunk each):
# enough for a client paging through a series (a page of up to 1,024 rows
# spans at most two chunks), small enough that what a worker holds does not
# grow with the ranges clients ask for (tests/test_query_export.py measures it).
CHUNK_CACHE = 2
CANDIDATES_FIRST = 8  # a page's candidate chunks fetched at first (then all the rest)
FAR = 1e300  # an open end of a range, bound as a plain REAL
ROLLUPS = ((3600, "rollup_1h", "1h"), (60, "rollup_1m_blocks", "1m"))  # coarsest first


def _boot(value: int) -> int | None:
    return None if value == NO_BOOT else value


def _where(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """'WHERE a = ? AND b >= ?' and its parameters, for the conditions whose value is given.

    The SQL fragments are constants of this module; only values travel as
    parameters, so nothing a client sends ever becomes SQL text.
    """
    used = [(sql, value) for sql, value in conditions if value is not None]
    if not used:
        return "", []
    return "WHERE " + " AND ".join(sql for sql, _ in used), [value for _, value in used]


def _count(value: Any) -> int | None:
    """A stored count as an int; None for a value that is not a number (a damaged row)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return None


def ping() -> dict[str, Any]:
    return {"version": collector.__version__, "protocol": PROTOCOL_VERSION}


class Ops:
    """The ops over one connection; one Ops per thread (a connection is not shared)."""

    def __init__(
        self, conn: sqlite3.Connection, limits: Limits = Limits(), clock: Callable[[], float] = time.time
    ) -> None:
        self.conn = conn
        self.limits = limits
        self.clock = clock  # wall clock, against the collector's receive times (staleness)
        self._deadline = math.inf
        self.heads = HeadCache()
        self._chunks: OrderedDict[tuple[int, str], tuple | str | None] = OrderedDict()
        self.meta: dict[str, Any] = {}
        # The schema version the file had when opened (schema.open_reader checked it).  A collector
        # that upgrades the file while this runs may change what the caches above mean (version 6:
        # chunk ids a version 5 file handed out again), so every request checks it: _schema.
        self.schema = self._schema()
        conn.set_progress_handler(self._over_budget, _PROGRESS_STEPS)

    def close(self) -> None:
        self.conn.close()

    def _over_budget(self) -> int:
        return 1 if time.monotonic() > self._deadline else 0

    def run(self, request: Request) -> Any:
        handler = getattr(self, "op_" + request.op)
        self._deadline = time.monotonic() + self.limits.query_seconds
        self.meta = {}
        conn = self.conn
        try:
            # One snapshot for the whole request: chunks and heads agree.
            conn.execute("BEGIN")
            found = self._schema()
            if found != self.schema:
                raise RequestError(
                    "schema_changed",
                    f"the database was upgraded to schema version {found} while this server ran "
                    f"(it opened version {self.schema}): restart telemetry-query serve",
                )
            self.heads.refresh(conn, self._deadline)
            return handler(**request.params)
        except sqlite3.OperationalError as exc:
            if "interrupted" not in str(exc):
                raise
            raise RequestError(
                "bad_request",
                f"query took longer than {self.limits.query_seconds:g} s: narrow 'since'/'until' or name a 'metric'",
            ) from None
        finally:
            self._deadline = math.inf
            if conn.in_transaction:
                conn.execute("COMMIT")

    def _schema(self) -> str | None:
        """meta.schema_version as stored (one primary-key read)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return None if row is None else str(row[0])

    def _note(self, text: str) -> None:
        notes = self.meta.setdefault("notes", [])
        if text not in notes:
            notes.append(text)

    def _all(self, sql: str, params: Any = ()) -> list[tuple]:
        # fetchall: a half-read cursor would hold a read snapshot open and stall WAL checkpoints.
        return self.conn.execute(sql, params).fetchall()

    def _capped(self, sql: str, params: list[Any], what: str, narrow: str) -> list[tuple]:
        rows = self._all(sql + " LIMIT ?", [*params, self.limits.max_rows + 1])
        if len(rows) > self.limits.max_rows:
            raise RequestError("bad_request", f"more than {self.limits.max_rows} {what} match: {narrow}")
        return rows

    # -- chunks ------------------------------------------------------------

    def _chunk(self, chunk_id: int, metric: str) -> tuple | None:
        """One series' rows in a chunk as columns (boot, ts, seqs, values) in key order;
        None if the chunk is corrupt or does not hold the metric."""
        cache = self._chunks
        key = (chunk_id, metric)
        if key in cache:
            cache.move_to_end(key)
            decoded = cache[key]
        else:
            decoded = self._decode(chunk_id, metric)
            cache[key] = decoded
            if len(cache) > CHUNK_CACHE:
                cache.popitem(last=False)
        if isinstance(decoded, str):
            self._note(decoded)
            return None
        return decoded

    def _decode(self, chunk_id: int, metric: str) -> tuple | str | None:
        if time.monotonic() > self._deadline:  # Python work is on the same budget as SQL
            raise sqlite3.OperationalError("interrupted")
        row = self.conn.execute("SELECT sensor, boot, crc, blob FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
        if row is None:
            return None
        sensor, boot, crc, blob = row
        try:
            if zlib.crc32(blob) != crc:
                raise ChunkError("its checksum does not match")
            # Only the series asked: the other metrics and the receive times are skipped, not decoded.
            seqs, ts, _, metrics = decode_chunk(blob, metrics=(metric,), received=False)
        except ChunkError as exc:
            return f"chunk {chunk_id} of sensor {sensor} is corrupt ({exc}): its readings are skipped"
        values = metrics.get(metric)
        if values is None:
            return None
        keys = list(zip(ts, seqs))
        if all(map(le, keys, islice(keys, 1, None))) and None not in values:
            # In key order with every value present (the usual chunk): columns at C speed.
            return boot, array("d", ts), array("q", seqs), array("d", values)
        idx = [i for i in range(len(ts)) if values[i] is not None]
        idx.sort(key=keys.__getitem__)  # late data: key order (stable, as arrival breaks ties)
        return (
            boot,
            array("d", [ts[i] for i in idx]),
            array("q", [seqs[i] for i in idx]),
            array("d", [values[i] for i in idx]),
        )

    def _minutes(self, sid: int, lo: float, hi: float) -> list[tuple]:
        """(bucket, count, min, max, sum) of a series' 1-minute rollups with lo <= bucket < hi.

        From the minute blocks (one per closed chunk); a minute two blocks
        hold comes twice, and the caller adds them up.  A corrupt block is
        skipped with a note.
        """
        out = []
        for first, chunk, blob in self._all(
            "SELECT first_bucket, chunk, blob FROM rollup_1m_blocks WHERE series = ? AND last_bucket >= ?"
            " AND first_bucket < ?",
            [sid, lo, hi],
        ):
            if time.monotonic() > self._deadline:  # Python work is on the same budget as SQL
                raise sqlite3.OperationalError("interrupted")
            try:
                out += [r for r in decode_minutes(blob) if lo <= r[0] < hi]
            except ChunkError as exc:
                self._note(
                    f"1-minute rollups of series {sid} from {first} (chunk {chunk}) are corrupt ({exc}): skipped"
                )
        return out

    def _chunk_rows(
        self, chunk_id: int, metric: str, lower: float | None = None, upper: float | None = None
    ) -> list[tuple]:
        """(ts, boot, seq, value) of one series in a chunk, in key order, lower <= ts < upper."""
        found = self._chunk_span(chunk_id, metric, lower, upper)
        if found is None:
            return []
        (boot, ts, seqs, values), lo, hi = found
        return [(ts[i], boot, seqs[i], values[i]) for i in range(lo, hi)]

    def _chunk_span(self, chunk_id: int, metric: str, lower: float | None, upper: float | None):
        """One series of a chunk decoded, (boot, ts, seqs, values), and the index range
        lo:hi of its rows with lower <= ts < upper (ts is in key order); None if absent."""
        decoded = self._chunk(chunk_id, metric)
        if decoded is None:
            return None
        ts = decoded[1]
        return (
            decoded,
            0 if lower is None else bisect_left(ts, lower),
            len(ts) if upper is None else bisect_left(ts, upper),
        )

    def _chunk_page(
        self,
        chunk_id: int,
        metric: str,
        lower: float | None,
        upper: float | None,
        keep,
        desc: bool,
        wanted: int,
        at_most: float | None = None,
    ) -> list[tuple]:
        """At most `wanted` kept rows of one series in a chunk, from the start (the end if
        `desc`) of lower <= ts < upper: a page never materialises a whole chunk."""
        found = self._chunk_span(chunk_id, metric, lower, upper)
        if found is None:
            return []
        (boot, ts, seqs, values), lo, hi = found
        if at_most is not None:  # a desc cursor: nothing above its ts
            hi = min(hi, bisect_right(ts, at_most))
        out: list[tuple] = []
        step = wanted + 16
        while lo < hi and len(out) < wanted:
            if desc:
                part = range(hi - 1, max(lo, hi - step) - 1, -1)
                hi = max(lo, hi - step)
            else:
                part = range(lo, min(hi, lo + step))
                lo = min(hi, lo + step)
            out += [r for r in ((ts[i], boot, seqs[i], values[i]) for i in part) if keep(r)]
        return out

    def _candidates(self, sql: str, params: list[Any], desc: bool):
        """(chunk, bound) rows of a page's candidate chunks in order, fetched a few at a
        time (a page nearly always needs one to three; a series of 30 days has ~2,500):
        `sql` has a {} for the continuation after the last row fetched and ends in LIMIT ?."""
        rows = self._all(sql.format(""), [*params, CANDIDATES_FIRST])
        yield from rows
        while len(rows) == CANDIDATES_FIRST:
            chunk, bound = rows[-1]
            more = "AND (max_ts, chunk) < (?, ?)" if desc else "AND (min_ts, chunk) > (?, ?)"
            rows = self._all(sql.format(more), [*params, bound, chunk, -1])
            yield from rows

    def _raw_horizon(self) -> float | None:
        """The newest ts of raw readings deleted by retention or the disk budget (None: nothing deleted)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'raw_deleted_until'").fetchone()
        return None if row is None else float(row[0])

    def _series_id(self, sensor: str, metric: str) -> int | None:
        row = self.conn.execute("SELECT id FROM series WHERE sensor = ? AND metric = ?", [sensor, metric]).fetchone()
        return None if row is None else row[0]

    # -- ops ---------------------------------------------------------------

    def op_ping(self) -> dict[str, Any]:
        return ping()

    def op_sensors(self, sensor: str | None = None, stale: bool | None = None) -> list[dict[str, Any]]:
        # Staleness is the collector's rule (collector/health.py is_stale): silent
        # longer than the stale_after it stored, which holds its stale-factor and floor.
        now = self.clock()
        where, args = _where(
            ("sensor = ?", sensor), ("stale_after IS NOT NULL AND ? - last_seen > stale_after", now if stale else None)
        )
        rows = self._capped(
            "SELECT sensor, first_seen, last_seen, datagrams, readings, lost, duplicates, reordered, restarts,"
            " interval, stale_after, clock_offset, clock_skewed"
            f" FROM sensors {where} ORDER BY sensor",
            args,
            "sensors",
            "name a 'sensor'",
        )
        where, args = _where(("sensor = ?", sensor))
        metrics: dict[str, list[str]] = {}
        for name, metric in self._all(f"SELECT sensor, metric FROM series {where} ORDER BY sensor, metric", args):
            metrics.setdefault(name, []).append(metric)
        return [
            {
                "sensor": r[0],
                "first_seen": r[1],
                "last_seen": r[2],
                "datagrams": _count(r[3]),
                "readings": _count(r[4]),
                "lost": _count(r[5]),
                "duplicates": _count(r[6]),
                "reordered": _count(r[7]),
                "restarts": _count(r[8]),
                "metrics": metrics.get(r[0], []),
                "interval": r[9],
                "stale": is_stale(r[2], r[10], now),
                "stale_after": r[10],
                "clock_offset": r[11],
                "clock_skewed": None if r[12] is None else bool(r[12]),
            }
            for r in rows
        ]

    def op_latest(self, sensor: str | None = None, metric: str | None = None) -> list[dict[str, Any]]:
        where, args = _where(("s.sensor = ?", sensor), ("s.metric = ?", metric))
        # Each series' newest reading by key (ts, then boot, then seq: the
        # last row of a `readings desc` page) from the statistics of its
        # chunks with the highest max_ts (no blob is decoded), and its open head.
        # One statement for every series; each series' chunks with its highest
        # max_ts (several only when they tie) are sought on (series, max_ts):
        # the primary key would walk all of a series' chunks (0.19 ms a series
        # of 30 days; bench/store_query.py).
        rows = self._all(
            "SELECT s.id, s.sensor, s.metric, c.max_ts, c.last_boot, c.last_seq, c.last_value, c.chunk"
            " FROM series s LEFT JOIN chunk_series c INDEXED BY chunk_series_max ON c.series = s.id"
            " AND c.max_ts = (SELECT max(max_ts) FROM chunk_series WHERE series = s.id)"
            f" {where} ORDER BY s.sensor, s.metric",
            args,
        )
        out = []
        for i, (sid, name, met, ts, boot, seq, value, chunk_id) in enumerate(rows):
            if i == 0 or rows[i - 1][0] != sid:  # the first row of a series
                best = None if ts is None else (ts, boot, seq, value)
                best_chunk = chunk_id
            elif (ts, boot, seq) > best[:3]:
                best, best_chunk = (ts, boot, seq, value), chunk_id
            if i + 1 < len(rows) and rows[i + 1][0] == sid:
                continue  # a tie: the series' next chunk with the same max_ts
            if best is not None and (best[0] == 0.0 or best[3] == 0.0):
                # The statistics are SQL REAL, which stores -0.0 as +0.0: a zero is taken
                # bit-exact from the chunk itself (PROTOCOL.md: -0.0 comes back as -0.0).
                for row in self._chunk_rows(best_chunk, met):
                    if row[1:3] == best[1:3]:
                        best = row
            row = self.heads.latest(name, met)
            if row is not None and (best is None or row[:3] > best[:3]):
                best = row
            if best is not None:
                out.append({"sensor": name, "metric": met, "ts": best[0], "value": best[3], "seq": best[2]})
                if len(out) > self.limits.max_rows:
                    raise RequestError(
                        "bad_request", f"more than {self.limits.max_rows} readings match: name a 'sensor'"
                    )
        return out

    def _series_page(self, sid: int, sensor: str, metric: str, window: Window, wanted: int) -> list[tuple]:
        """Up to `wanted` (ts, boot, seq, value) of one series in the window, in its key order."""
        lower, upper, after, desc = window.lower, window.upper, window.after, window.desc
        keep = window.test()

        # The open heads hold a series' newest readings: a desc page reads them first, an
        # asc page last, bounded by what the chunks already gave (a page past the heads'
        # range builds none of their rows).
        found: list[tuple] = []
        if desc:
            found = [r for r in self.heads.page(sensor, metric, window, wanted) if keep(r)]
        lo = -FAR if lower is None else lower
        hi = FAR if upper is None else upper
        if desc:
            cap = FAR if after is None else after[0]
            sql = (
                "SELECT chunk, max_ts FROM chunk_series WHERE series = ? AND max_ts >= ?"
                " AND min_ts < ? AND min_ts <= ? {} ORDER BY max_ts DESC, chunk DESC LIMIT ?"
            )
            params: list[Any] = [sid, lo, hi, cap]
        else:
            if after is not None:
                lo = max(lo, after[0])
            sql = (
                "SELECT chunk, min_ts FROM chunk_series WHERE series = ? AND max_ts >= ?"
                " AND min_ts < ? {} ORDER BY min_ts, chunk LIMIT ?"
            )
            params = [sid, lo, hi]
        for chunk_id, bound in self._candidates(sql, params, desc):
            if len(found) >= wanted:
                found.sort(reverse=desc)
                del found[wanted:]
                # Rows of this chunk and those after it start at its min_ts (max_ts for desc).
                if found[-1][0] > bound if desc else found[-1][0] < bound:
                    break
            found += self._chunk_page(
                chunk_id,
                metric,
                lo if lo > -FAR else None,
                upper,
                keep,
                desc,
                wanted,
                after[0] if desc and after is not None else None,
            )
        if not desc:
            head_upper = upper
            if len(found) >= wanted:
                found.sort()
                del found[wanted:]
                past = math.nextafter(found[-1][0], math.inf)  # ts up to the last row's, ties included
                head_upper = past if upper is None else min(upper, past)
            head_window = replace(window, upper=head_upper)
            found += [r for r in self.heads.page(sensor, metric, head_window, wanted) if keep(r)]
        found.sort(reverse=desc)
        return found[:wanted]

    def op_readings(
        self,
        sensor: str,
        metric: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = DEFAULT_LIMIT,
        order: str = "asc",
        cursor: str | None = None,
    ) -> dict[str, Any]:
        if limit > self.limits.max_rows:
            raise RequestError("bad_request", f"parameter 'limit' must be 1-{self.limits.max_rows} on this server")
        binding = {"sensor": sensor, "metric": metric, "order": order, "since": since, "until": until}
        desc = order == "desc"
        # Without a metric, the sensor's series are walked one after another in
        # metric-name order (reversed for desc).
        if metric is None:
            series = self._all("SELECT id, metric FROM series WHERE sensor = ? ORDER BY metric", [sensor])
        else:
            series = self._all("SELECT id, metric FROM series WHERE sensor = ? AND metric = ?", [sensor, metric])
        if desc:
            series.reverse()
        start = 0
        after: Position | None = None
        if cursor is not None:
            after = decode_cursor(cursor, binding)
            ids = [sid for sid, _ in series]
            if after.series not in ids:
                raise RequestError(
                    "bad_request", "parameter 'cursor' is not a cursor this server issued for this query"
                )
            start = ids.index(after.series)
        horizon = self._raw_horizon()
        if horizon is not None and (since is None or since <= horizon):
            self._note(
                f"raw readings up to ts {horizon!r} were removed (--retain or --max-disk, counted in "
                "retention_dropped/budget_dropped); their count/min/max/sum remain in the rollups: "
                "use aggregate for that range"
            )
        wanted = limit + 1  # one more than asked tells whether a next page exists
        found: list[tuple] = []
        for index in range(start, len(series)):
            sid, met = series[index]
            key = (after.ts, after.boot, after.seq) if after is not None and index == start else None
            rows = self._series_page(sid, sensor, met, Window(since, until, key, desc), wanted - len(found))
            found += [(sid, met, *row) for row in rows]
            if len(found) >= wanted:
                break
        more = len(found) > limit
        found = found[:limit]
        next_cursor = None
        if more:
            sid, _, ts, boot, seq, _ = found[-1]
            next_cursor = encode_cursor(Position(sid, ts, boot, seq), binding)
        return {
            "rows": [
                {"sensor": sensor, "metric": met, "ts": ts, "value": value, "seq": seq, "boot": _boot(boot)}
                for _, met, ts, boot, seq, value in found
            ],
            "next": next_cursor,
        }

    def op_aggregate(
        self,
        sensor: str,
        metric: str,
        bucket: int | float,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        sid = self._series_id(sensor, metric)
        if sid is None:
            return []
        span = self.heads.span(sensor, metric)  # (first, last) ts of its open readings
        # Bound the work before scanning: the buckets the range can touch,
        # with open ends closed by the series' first/last ts.
        lo, hi = since, until
        horizon = self._raw_horizon()
        if lo is None:
            firsts = ([] if span is None else [span[0]]) + [
                v for (v,) in self._all("SELECT min(min_ts) FROM chunk_series WHERE series = ?", [sid]) if v is not None
            ]
            if horizon is not None:  # raw readings were deleted: the rollups reach further back
                firsts += [
                    v
                    for (v,) in self._all("SELECT min(first_bucket) FROM rollup_1m_blocks WHERE series = ?", [sid])
                    if v is not None
                ]
            lo = min(firsts, default=None)
        if hi is None and horizon is not None:
            hi = max(
                ([] if span is None else [span[1]])
                + [
                    v
                    for (v,) in self._all(
                        "SELECT max(max_ts) FROM chunk_series WHERE series = ? UNION ALL"
                        " SELECT max(last_bucket) FROM rollup_1m_blocks WHERE series = ?",
                        [sid, sid],
                    )
                    if v is not None
                ],
                default=None,
            )
        if hi is None:
            hi = max(
                ([] if span is None else [span[1]])
                + [
                    v
                    for (v,) in self._all("SELECT max(max_ts) FROM chunk_series WHERE series = ?", [sid])
                    if v is not None
                ],
                default=None,
            )
        if lo is None or hi is None or lo >= hi and since is not None and until is not None:
            return []
        spans = math.floor(hi / bucket) - math.floor(lo / bucket) + 1
        if spans > self.limits.max_buckets:
            raise RequestError(
                "bad_request",
                f"parameter 'bucket' too small for the range: {spans} buckets, at most {self.limits.max_buckets}"
                " (widen 'bucket' or narrow 'since'/'until')",
            )
        acc: dict[int, list] = {}

        def add(k: int, n: int, vmin: float, vmax: float, total: float) -> None:
            a = acc.get(k)
            if a is None:
                acc[k] = [n, vmin, vmax, total]
            else:
                a[0] += n
                if vmin < a[1]:
                    a[1] = vmin
                if vmax > a[2]:
                    a[2] = vmax
                a[3] += total

        # Raw readings before `cut` may be gone: take that part from the 1-minute rollups.
        cut = None if horizon is None or since is not None and since > horizon else (math.floor(horizon / 60) + 1) * 60

        def add_rows(rows) -> None:
            for r in rows:
                ts = r[0]
                if since is not None and ts < since or until is not None and ts >= until:
                    continue
                if cut is not None and ts < cut:
                    continue
                v = r[3]
                add(math.floor(ts / bucket), 1, v, v, v)

        add_rows(self.heads.rows(sensor, metric, since, until))
        q_lo = -FAR if since is None else since
        q_hi = FAR if until is None else until
        for width, table, name in ROLLUPS:
            # The coarsest rollup whose buckets tile the asked ones exactly.
            if bucket % width == 0 and (since is None or since % width == 0) and (until is None or until % width == 0):
                self.meta["resolution"] = name
                if width == 60:
                    rows = self._minutes(sid, q_lo, q_hi)
                else:
                    rows = self._all(
                        f"SELECT bucket, count, min, max, sum FROM {table} WHERE series = ? AND bucket >= ?"
                        " AND bucket < ? ORDER BY bucket",
                        [sid, q_lo, q_hi],
                    )
                for start, n, vmin, vmax, total in rows:
                    add(math.floor(start / bucket), n, vmin, vmax, total)
                break
        else:
            self.meta["resolution"] = "raw"
            if cut is not None:
                self.meta["resolution"] = "1m+raw"
                self._note(
                    f"raw readings up to ts {horizon!r} were removed (--retain or --max-disk): buckets before "
                    f"{cut} are computed from the 1-minute rollups (to the minute)"
                )
                for start, n, vmin, vmax, total in self._minutes(
                    sid, -FAR if since is None else math.floor(since / 60) * 60, min(cut, q_hi)
                ):
                    add(math.floor(start / bucket), n, vmin, vmax, total)
            for chunk_id, cmin, cmax, n, vmin, vmax, total in self._all(
                "SELECT chunk, min_ts, max_ts, count, min, max, sum FROM chunk_series WHERE series = ?"
                " AND max_ts >= ? AND min_ts < ?",
                [sid, q_lo, q_hi],
            ):
                k = math.floor(cmin / bucket)
                if cmin >= q_lo and cmax < q_hi and k == math.floor(cmax / bucket) and (cut is None or cmin >= cut):
                    add(k, n, vmin, vmax, total)  # the whole chunk is in one bucket: its statistics
                else:
                    add_rows(self._chunk_rows(chunk_id, metric, since, until))
        return [
            {"start": k * bucket, "count": n, "min": vmin, "max": vmax, "avg": total / n, "sum": total}
            for k, (n, vmin, vmax, total) in sorted(acc.items())
        ]

    def op_gaps(
        self, sensor: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        where, args = _where(("sensor = ?", sensor), ("detected_at >= ?", since), ("detected_at < ?", until))
        rows = self._capped(
            f"SELECT sensor, boot, first_seq, last_seq, missing, detected_at FROM gaps {where}"
            " ORDER BY detected_at, sensor, stream, first_seq",
            args,
            "gaps",
            "name a 'sensor' or narrow 'since'/'until'",
        )
        return [
            {"sensor": s, "boot": _boot(b), "first_seq": f, "last_seq": last, "missing": m, "detected_at": d}
            for s, b, f, last, m, d in rows
        ]

    def op_stats(self) -> dict[str, Any]:
        counters = dict(self._all("SELECT name, value FROM counters"))
        for name, value in counters.items():
            if name != "last_flush" and _count(value) is None:
                # A damaged row (issue 13 item 7) is answered, not a traceback: shown as
                # null, and the note says what is wrong and what to do.
                self._note(
                    f"counter {name!r} in the database holds {value!r}, not a number (shown as null; "
                    "check the database with 'PRAGMA integrity_check'; the collector rewrites the "
                    "row at its next flush)"
                )
        lost, duplicates = self.conn.execute("SELECT total(lost), total(duplicates) FROM sensors").fetchone()
        # Every reason the collector counts (wire, signed datagrams, replays),
        # zero or not; an unknown one found in the table is listed too.
        rejected = {reason: 0 for reason in REJECT_REASONS}
        for name, value in counters.items():
            if name.startswith("rejected:"):
                rejected[name[len("rejected:") :]] = _count(value)
        result = {
            "received": _count(counters.get("received")),
            "stored": _count(counters.get("stored")),
            "stored_readings": _count(counters.get("stored_readings")),
            "rejected": rejected,
            "duplicates": _count(duplicates),
            "lost": _count(lost),
            "kernel_drops": _count(counters.get("kernel_drops")),
            "truncated": _count(counters.get("truncated")),
            "storage_dropped": _count(counters.get("storage_dropped")),
            "internal_errors": _count(counters.get("internal_errors")),
            "refused_sensors": _count(counters.get("refused_sensors")),
            "refused_readings": _count(counters.get("refused_readings")),
            # Storage v3: readings deleted on purpose (never network loss), and
            # chunks found corrupt (their readings are skipped by queries).
            "retention_dropped": _count(counters.get("retention_dropped")),
            "budget_dropped": _count(counters.get("budget_dropped")),
            "uplink_dropped": _count(counters.get("uplink_dropped")),
            "corrupt_chunks": self._all("SELECT count(*) FROM chunk_faults")[0][0],
            "last_flush": counters.get("last_flush"),
        }
        if "uplink_messages" in counters:  # a central database (telemetry-uplink consume)
            result.update(_central_stats(counters))
        return result


def _central_stats(counters: dict[str, Any]) -> dict[str, Any]:
    """A central database's stats: what the consumer took and dropped, and per gateway the
    readings its disk budget deleted (`budget_dropped`) and the unsent log rows' readings it
    deleted before its uplink sent them (`uplink_dropped`), as the gateway last reported."""
    out: dict[str, Any] = {
        name: _count(counters.get(name))
        for name in (
            "uplink_readings",
            "uplink_replayed_readings",
            "uplink_gone_rows",
            "uplink_stale_accounts",
            "uplink_quarantined",
            "uplink_expired_readings",
        )
    }
    for kind in ("uplink_dropped", "budget_dropped"):
        prefix = f"gateway_{kind}:"
        out[f"gateway_{kind}"] = {
            name[len(prefix) :]: _count(value) for name, value in sorted(counters.items()) if name.startswith(prefix)
        }
    return out
