"""Each query op as read-only, parameterized SQL over the collector's schema.

`Ops.run(request)` takes a validated protocol.Request and returns the
JSON-ready result, or raises protocol.RequestError (bad_request) when the
request is well-formed but asks for too much (more rows than the server's cap,
more aggregate buckets than allowed, longer than the query time budget).  The
connection comes from collector.schema.open_reader (mode=ro), so no statement
here can change data.  Every range query walks one series' rows off the
readings primary key (series, ts, boot, seq); docs/PROTOCOL.md lists the plans.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collector.health import is_stale
from collector.schema import NO_BOOT, REJECT_REASONS

from . import __version__
from . import tuning
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


def _count(value: Any) -> int:
    return int(value or 0)


def ping() -> dict[str, Any]:
    return {"version": __version__, "protocol": PROTOCOL_VERSION}


class Ops:
    """The ops over one connection; one Ops per thread (a connection is not shared)."""

    def __init__(self, conn: sqlite3.Connection, limits: Limits = Limits(),
                 clock: Callable[[], float] = time.time) -> None:
        self.conn = conn
        self.limits = limits
        self.clock = clock  # wall clock, against the collector's receive times (staleness)
        self._deadline = math.inf
        conn.set_progress_handler(self._over_budget, _PROGRESS_STEPS)

    def close(self) -> None:
        self.conn.close()

    def _over_budget(self) -> int:
        return 1 if time.monotonic() > self._deadline else 0

    def run(self, request: Request) -> Any:
        handler = getattr(self, "op_" + request.op)
        self._deadline = time.monotonic() + self.limits.query_seconds
        try:
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

    def _all(self, sql: str, params: Any = ()) -> list[tuple]:
        # fetchall: a half-read cursor would hold a read snapshot open and stall WAL checkpoints.
        return self.conn.execute(sql, params).fetchall()

    def _capped(self, sql: str, params: list[Any], what: str, narrow: str) -> list[tuple]:
        rows = self._all(sql + " LIMIT ?", [*params, self.limits.max_rows + 1])
        if len(rows) > self.limits.max_rows:
            raise RequestError("bad_request", f"more than {self.limits.max_rows} {what} match: {narrow}")
        return rows

    # -- ops ---------------------------------------------------------------

    def op_ping(self) -> dict[str, Any]:
        return ping()

    def op_sensors(self, sensor: str | None = None, stale: bool | None = None) -> list[dict[str, Any]]:
        # Staleness is the collector's rule (collector/health.py is_stale): silent
        # longer than the stale_after it stored, which holds its stale-factor and floor.
        now = self.clock()
        where, args = _where(("sensor = ?", sensor),
                             ("stale_after IS NOT NULL AND ? - last_seen > stale_after", now if stale else None))
        rows = self._capped(
            "SELECT sensor, first_seen, last_seen, datagrams, readings, lost, duplicates, reordered, restarts,"
            " interval, stale_after, clock_offset, clock_skewed"
            f" FROM sensors {where} ORDER BY sensor",
            args, "sensors", "name a 'sensor'",
        )
        where, args = _where(("sensor = ?", sensor))
        metrics: dict[str, list[str]] = {}
        for name, metric in self._all(f"SELECT sensor, metric FROM series {where} ORDER BY sensor, metric", args):
            metrics.setdefault(name, []).append(metric)
        return [
            {
                "sensor": r[0], "first_seen": r[1], "last_seen": r[2], "datagrams": _count(r[3]),
                "readings": _count(r[4]), "lost": _count(r[5]), "duplicates": _count(r[6]),
                "reordered": _count(r[7]), "restarts": _count(r[8]), "metrics": metrics.get(r[0], []),
                "interval": r[9], "stale": is_stale(r[2], r[10], now), "stale_after": r[10],
                "clock_offset": r[11], "clock_skewed": None if r[12] is None else bool(r[12]),
            }
            for r in rows
        ]

    def op_latest(self, sensor: str | None = None, metric: str | None = None) -> list[dict[str, Any]]:
        where, args = _where(("s.sensor = ?", sensor), ("s.metric = ?", metric))
        # The last key of each series is one B-tree descent (the subquery walks
        # the primary key backwards, LIMIT 1), then one point lookup.  Several
        # readings may share the newest ts: the last in key order (highest
        # boot, then seq) wins, as it would in a `readings desc` page.  Joining
        # on max(ts) alone would return every tied row: a sensor with a stuck
        # clock would make `latest` list its whole history.
        rows = self._capped(
            "SELECT s.sensor, s.metric, r.ts, r.value, r.seq FROM series s"
            " JOIN readings r ON r.series = s.id AND (r.ts, r.boot, r.seq) ="
            " (SELECT ts, boot, seq FROM readings WHERE series = s.id ORDER BY ts DESC, boot DESC, seq DESC LIMIT 1)"
            f" {where} ORDER BY s.sensor, s.metric",
            args, "readings", "name a 'sensor'",
        )
        return [{"sensor": name, "metric": met, "ts": ts, "value": value, "seq": seq}
                for name, met, ts, value, seq in rows]

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
        # metric-name order (reversed for desc): each page stays a few
        # primary-key range scans however long the range is.
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
                raise RequestError("bad_request", "parameter 'cursor' is not a cursor this server issued for this query")
            start = ids.index(after.series)

        direction = "DESC" if desc else "ASC"
        compare = "<" if desc else ">"
        wanted = limit + 1  # one more than asked tells whether a next page exists
        found: list[tuple] = []
        for index in range(start, len(series)):
            sid, met = series[index]
            lower, upper = since, until
            conds, args = ["series = ?"], [sid]
            resume = after is not None and index == start
            if resume and not desc and (lower is None or after.ts >= lower):
                lower = None
                conds.append("ts >= ?")
                args.append(after.ts)
            if resume and desc and (upper is None or after.ts < upper):
                upper = None
                conds.append("ts <= ?")
                args.append(after.ts)
            if lower is not None:
                conds.append("ts >= ?")
                args.append(lower)
            if upper is not None:
                conds.append("ts < ?")
                args.append(upper)
            if resume:
                # Strictly past the cursor's key.  One bound per side on ts
                # (merged above) so SQLite's range scan starts at the cursor,
                # not at 'since' (EXPLAIN: PRIMARY KEY (series=? AND ts>?)).
                conds.append(f"(ts {compare} ? OR boot {compare} ? OR (boot = ? AND seq {compare} ?))")
                args += [after.ts, after.boot, after.boot, after.seq]
            rows = self._all(
                f"SELECT ts, boot, seq, value FROM readings WHERE {' AND '.join(conds)}"
                f" ORDER BY ts {direction}, boot {direction}, seq {direction} LIMIT ?",
                [*args, wanted - len(found)],
            )
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
        row = self.conn.execute("SELECT id FROM series WHERE sensor = ? AND metric = ?", [sensor, metric]).fetchone()
        if row is None:
            return []
        sid = row[0]
        # Bound the work before scanning: the buckets the range can touch,
        # with open ends closed by the series' first/last ts (two key lookups).
        lo, hi = since, until
        if lo is None:
            lo = self.conn.execute("SELECT min(ts) FROM readings WHERE series = ?", [sid]).fetchone()[0]
        if hi is None:
            hi = self.conn.execute("SELECT max(ts) FROM readings WHERE series = ?", [sid]).fetchone()[0]
        if lo is None or hi is None or lo >= hi and since is not None and until is not None:
            return []
        spans = math.floor(hi / bucket) - math.floor(lo / bucket) + 1
        if spans > self.limits.max_buckets:
            raise RequestError(
                "bad_request",
                f"parameter 'bucket' too small for the range: {spans} buckets, at most {self.limits.max_buckets}"
                " (widen 'bucket' or narrow 'since'/'until')",
            )
        where, args = _where(("series = ?", sid), ("ts >= ?", since), ("ts < ?", until))
        # The bucket index is floor(ts / bucket), written without SQLite's
        # floor(): that exists only where SQLite was built with its math
        # functions, which a gateway's system SQLite may not be.  CAST truncates
        # toward zero, so a negative quotient that is not whole steps down one
        # (otherwise [-bucket, 0) would fold into bucket 0).
        rows = self._all(
            "SELECT CAST(ts / ? AS INTEGER) - (ts < 0 AND CAST(ts / ? AS INTEGER) * ? != ts) AS k,"
            " count(*), min(value), max(value), sum(value)"
            f" FROM readings {where} GROUP BY k ORDER BY k",
            [bucket, bucket, bucket, *args],
        )
        return [
            {"start": k * bucket, "count": n, "min": lo_v, "max": hi_v, "avg": total / n, "sum": total}
            for k, n, lo_v, hi_v, total in rows
        ]

    def op_gaps(
        self, sensor: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        where, args = _where(("sensor = ?", sensor), ("detected_at >= ?", since), ("detected_at < ?", until))
        rows = self._capped(
            f"SELECT sensor, boot, first_seq, last_seq, missing, detected_at FROM gaps {where}"
            " ORDER BY detected_at, sensor, stream, first_seq",
            args, "gaps", "name a 'sensor' or narrow 'since'/'until'",
        )
        return [
            {"sensor": s, "boot": _boot(b), "first_seq": f, "last_seq": last, "missing": m, "detected_at": d}
            for s, b, f, last, m, d in rows
        ]

    def op_stats(self) -> dict[str, Any]:
        counters = dict(self._all("SELECT name, value FROM counters"))
        lost, duplicates = self.conn.execute(
            "SELECT total(lost), total(duplicates) FROM sensors"
        ).fetchone()
        # Every reason the collector counts (wire, signed datagrams, replays),
        # zero or not; an unknown one found in the table is listed too.
        rejected = {reason: 0 for reason in REJECT_REASONS}
        for name, value in counters.items():
            if name.startswith("rejected:"):
                rejected[name[len("rejected:"):]] = _count(value)
        return {
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
            "last_flush": counters.get("last_flush"),
        }
