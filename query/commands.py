"""The client commands of telemetry-query: connection settings, one session per command.

Connection options come from flags or TELEMETRY_SERVER, TELEMETRY_CA,
TELEMETRY_CERT, TELEMETRY_KEY, TELEMETRY_FORMAT, and may be given before
(on the group, query/cli.py) or after the command name.  Each command
asks the server through one `_Session` and renders with query/output.py.
Exit codes: 1 the server answered with an error, 2 usage, 3 cannot connect
or TLS failed; each failure is one line saying what to change.  This module
never imports the server.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from collector import config
from collector.config import SetupFailed

from . import export as exporting
from . import plot as plotting
from .client import ConnectError, QueryClient, ServerError
from .output import TIME_FIELDS, cell, flatten, iso_times, render
from .protocol import DEFAULT_PORT
from .times import human_time, parse_duration, parse_time

SETTINGS_KEY = "telemetry_query"  # ctx.meta key: the group's connection options
COMMANDS: list[click.Command] = []  # the client commands, in the order they are defined


class ServerSaidNo(click.ClickException):
    exit_code = 1


class CannotConnect(click.ClickException):
    exit_code = 3


_HINTS = {
    "dns": "check the host name in --server (TELEMETRY_SERVER), or give an IP address",
    "connect": "is `telemetry-query serve` running there? Set the address with --server or TELEMETRY_SERVER",
    "timeout": "is `telemetry-query serve` running there? Set the address with --server or TELEMETRY_SERVER",
    "verify": "pass the CA that signed the server's certificate with --ca or TELEMETRY_CA",
    "hostname": "use the name the server's certificate was issued for in --server (TELEMETRY_SERVER)",
    "client_cert": "pass a client certificate the server trusts with --cert and --key (TELEMETRY_CERT, TELEMETRY_KEY)",
    "closed": "if the server requires mutual TLS, pass --cert and --key (TELEMETRY_CERT, TELEMETRY_KEY)",
    "tls": "check that --server points at `telemetry-query serve` (TLS 1.2 or newer)",
    "protocol": "check that --server points at `telemetry-query serve`",
    "files": "check --ca, --cert and --key (TELEMETRY_CA, TELEMETRY_CERT, TELEMETRY_KEY)",
}


def connection_options(envvars: bool) -> Callable:
    """--server/--ca/--cert/--key/--format, on the group (with env) and on each command."""

    def env(name: str) -> str | None:
        return name if envvars else None

    def decorate(f: Callable) -> Callable:
        options = [
            click.option(
                "--server",
                envvar=env("TELEMETRY_SERVER"),
                metavar="HOST:PORT",
                help=f"Query server; its HOST is the name checked against its certificate. "
                f"[env TELEMETRY_SERVER; default localhost:{DEFAULT_PORT}]",
            ),
            click.option(
                "--ca",
                envvar=env("TELEMETRY_CA"),
                metavar="PEM",
                type=click.Path(dir_okay=False),
                help="CA certificate(s) to verify the server with [env TELEMETRY_CA; default: system CAs].",
            ),
            click.option(
                "--cert",
                envvar=env("TELEMETRY_CERT"),
                metavar="PEM",
                type=click.Path(dir_okay=False),
                help="Client certificate for mutual TLS [env TELEMETRY_CERT].",
            ),
            click.option(
                "--key",
                envvar=env("TELEMETRY_KEY"),
                metavar="PEM",
                type=click.Path(dir_okay=False),
                help="Private key of --cert [env TELEMETRY_KEY].",
            ),
            click.option(
                "--format",
                "fmt",
                envvar=env("TELEMETRY_FORMAT"),
                type=config.Choice(["table", "json", "csv"]),
                help="Output: aligned table (times in UTC), json or csv [env TELEMETRY_FORMAT; default table].",
            ),
            click.option(
                "--times",
                envvar=env("TELEMETRY_TIMES"),
                type=config.Choice(["unix", "iso"]),
                help="Times in csv and json: Unix seconds or ISO 8601 UTC [env TELEMETRY_TIMES; "
                "default unix; export: iso].",
            ),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _client_command(f: Callable) -> Callable:
    """Accept the connection options after the command too; pass the merged settings."""

    @connection_options(envvars=False)
    @click.pass_context
    @functools.wraps(f)
    def wrapper(ctx: click.Context, server, ca, cert, key, fmt, times, **kwargs):
        root = ctx.find_root()
        base = root.meta.get(SETTINGS_KEY, {})
        given = {"server": server, "ca": ca, "cert": cert, "key": key, "fmt": fmt, "times": times}
        settings = {k: given[k] if given[k] is not None else base.get(k) for k in given}
        from_env = server is None and root.get_parameter_source("server") is ParameterSource.ENVIRONMENT
        settings["server_hint"] = "TELEMETRY_SERVER in the environment" if from_env else "--server"
        return f(_Session(settings), **kwargs)

    return wrapper


class _Session:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.fmt = settings["fmt"] or "table"
        try:
            self.host, self.port = config.parse_host_port(settings["server"] or "localhost", DEFAULT_PORT)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=settings.get("server_hint", "--server")) from None
        if (settings["cert"] is None) != (settings["key"] is None):
            raise SetupFailed("--cert and --key go together: give both, or neither (TELEMETRY_CERT, TELEMETRY_KEY)")
        self.settings = settings
        self._client: QueryClient | None = None

    def client(self) -> QueryClient:
        if self._client is None:
            s = self.settings
            self._client = QueryClient(self.host, self.port, ca=s["ca"], cert=s["cert"], key=s["key"])
        return self._client

    def request(self, op: str, **params: Any) -> Any:
        try:
            return self.client().request(op, **params)
        except ServerError as exc:
            raise ServerSaidNo(f"server said {exc.code}: {exc.message}") from None
        except ConnectError as exc:
            raise _connect_failure(exc) from None
        except ValueError as exc:  # a request the protocol cannot carry (over-long arguments)
            raise click.UsageError(f"{exc}: shorten the arguments") from None

    def known_sensors(self) -> list[dict[str, Any]] | None:
        """Every sensor the server knows (with its metrics), or None when the list is over the server's cap."""
        try:
            return self.client().request("sensors")
        except ServerError:
            return None
        except ConnectError as exc:
            raise _connect_failure(exc) from None

    def check_names(self, sensors: list[str], metric: str | None) -> None:
        """Exit 1 naming the first sensor or metric the server does not know (called when a result is empty)."""
        known = self.known_sensors()
        if known is None:
            return
        metrics = {row["sensor"]: row.get("metrics") or [] for row in known}
        for sensor in sensors:
            if sensor not in metrics:
                raise ServerSaidNo(unknown_name("sensor", sensor, list(metrics)))
        if metric is None:
            return
        wanted = sensors or list(metrics)
        if not any(metric in metrics[name] for name in wanted):
            offered = sorted({m for name in wanted for m in metrics[name]})
            where = f" for sensor {sensors[0]}" if len(sensors) == 1 else ""
            raise ServerSaidNo(unknown_name("metric", metric, offered, where))

    def echo(self, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
        click.echo(render(rows, self.fmt, columns, iso=self.settings.get("times") == "iso"), nl=False)

    def echo_object(self, result: dict[str, Any]) -> None:
        """One object (ping, stats): as-is in JSON, key/value rows in table and CSV."""
        if self.fmt == "json" and self.settings.get("times") != "iso":
            click.echo(json.dumps(result, indent=1))
            return
        if self.fmt == "table" or self.settings.get("times") == "iso":
            result = {k: human_time(v) if k in TIME_FIELDS and v is not None else v for k, v in result.items()}
        if self.fmt == "json":
            click.echo(json.dumps(result, indent=1))
            return
        self.echo(flatten(result, human=self.fmt == "table"), ["key", "value"])

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _connect_failure(exc: ConnectError) -> click.ClickException:
    hint = _HINTS.get(exc.kind, "")
    message = f"{exc}: {hint}" if hint else str(exc)
    if exc.kind == "files":
        return SetupFailed(message)
    return CannotConnect(message)


CLIENT_ENV = (
    "TELEMETRY_SERVER",
    "TELEMETRY_CA",
    "TELEMETRY_CERT",
    "TELEMETRY_KEY",
    "TELEMETRY_FORMAT",
    "TELEMETRY_TIMES",
)
DAEMON_ENV_PREFIXES = ("TELEMETRY_QUERY_", "TELEMETRY_COLLECTOR_", "TELEMETRY_CONFIG")


def check_client_environment(environ: dict[str, str]) -> None:
    """A TELEMETRY_ variable that is a near miss of one the client reads (TELEMETRY_SEVRER) is
    exit 2 naming both; the daemons' variables, and names like no variable of ours, pass."""
    for name in sorted(environ):
        if not name.startswith("TELEMETRY_") or name in CLIENT_ENV or name.startswith(DAEMON_ENV_PREFIXES):
            continue
        near = difflib.get_close_matches(name, CLIENT_ENV, n=1, cutoff=0.8)
        if near:
            raise SetupFailed(f"unknown environment variable {name} (did you mean {near[0]}?)")


def unknown_name(kind: str, name: str, known: list[str], where: str = "") -> str:
    """'no sensor named X; did you mean A or B?' (or the names there are, when few and none is close)."""
    message = f"no {kind} named {name!r}{where}"
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if close:
        return f"{message}; did you mean {_either(sorted(close))}?"
    if not known:
        return f"{message}; the server knows no {kind}s yet"
    if len(known) <= 10:
        return f"{message}; the {kind}s are {', '.join(sorted(known))}"
    return f"{message}; `telemetry-query sensors` lists them"


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_range(since: float | None, until: float | None) -> None:
    if since is not None and until is not None and since >= until:
        raise click.UsageError(f"--since ({human_time(since)}) must be before --until ({human_time(until)})")


def _session_command(name: str, **kwargs: Any) -> Callable:
    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def run(session: _Session, **params: Any) -> None:
            try:
                f(session, **params)
            finally:
                session.close()

        command = click.command(name, **kwargs)(_client_command(run))
        COMMANDS.append(command)
        return command

    return decorate


class _TimeType(click.ParamType):
    name = "TIME"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return parse_time(value, time.time())  # the one clock read, at the edge
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _DurationType(click.ParamType):
    name = "DURATION"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return value
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


TIME = _TimeType()
DURATION = _DurationType()
_range_options = [
    click.option("--since", type=TIME, help="From this time (inclusive): Unix seconds, ISO 8601 or an age like 2h."),
    click.option("--until", type=TIME, help="Up to this time (exclusive), same forms as --since."),
]


def _ranges(f: Callable) -> Callable:
    """--since/--until, and a reversed or empty range refused before anything is asked."""

    @functools.wraps(f)
    def checked(session: _Session, **params: Any) -> None:
        check_range(params.get("since"), params.get("until"))
        f(session, **params)

    for option in reversed(_range_options):
        checked = option(checked)
    return checked


@_session_command("ping")
def ping(session: _Session) -> None:
    """Check that the server answers; prints its version.

    \b
    Example:
      telemetry-query --ca ca.pem ping
    """
    session.echo_object(session.request("ping"))


ACTIVITY_COLUMN = "last hour"
ACTIVITY_BUCKET_S = 300
ACTIVITY_BUCKETS = 12
ACTIVITY_MAX_SENSORS = 200
ACTIVITY_PIPELINE = 50  # requests written at once


@_session_command("sensors")
@click.argument("sensor", required=False)
@click.option(
    "--activity/--no-activity",
    default=True,
    help="Tables: a last-hour column, readings per 5 minutes as a sparkline (one request per sensor, "
    f"up to {ACTIVITY_MAX_SENSORS} sensors).",
)
@click.option(
    "--stale",
    is_flag=True,
    help="Only sensors silent for longer than the collector's stale rule "
    "(stale-factor x their own send interval, at least stale-floor).",
)
def sensors(session: _Session, sensor: str | None, activity: bool, stale: bool) -> None:
    """List sensors with their accounts and health.

    `interval` is the send interval the collector learned for each sensor;
    `stale` says it has been silent for longer than its stale rule allows;
    `clock_offset` is the sensor's clock minus the collector's in seconds,
    marked `!` beyond the collector's clock-threshold (readings are kept
    whatever the sensor's clock says).  Blank: not learned yet.

    In a table, `last hour` draws each sensor's readings of its first metric
    per 5 minutes over the last hour (by reading time, UTC), scaled to its
    own busiest 5 minutes: '·' is none at all, so a sensor that went quiet
    shows a tail of dots.

    \b
    Example:
      telemetry-query sensors
      telemetry-query sensors --stale
      telemetry-query --format csv sensors boiler-1
    """
    rows = session.request("sensors", sensor=sensor, stale=True if stale else None)
    if not rows and sensor is not None and not stale:
        session.check_names([sensor], None)
    columns = [
        "sensor",
        "first_seen",
        "last_seen",
        "datagrams",
        "readings",
        "lost",
        "duplicates",
        "reordered",
        "restarts",
        "interval",
        "stale",
        "clock_offset",
        "metrics",
    ]
    if session.fmt == "table":
        rows = [_health_cells(row) for row in rows]
    elif session.fmt == "csv":
        columns[-1:-1] = ["stale_after", "clock_skewed"]
    if activity and session.fmt == "table" and rows:
        if len(rows) <= ACTIVITY_MAX_SENSORS:
            for row, line in zip(rows, _activity(session, rows, time.time())):
                row[ACTIVITY_COLUMN] = line
            columns.append(ACTIVITY_COLUMN)
        else:
            click.echo(
                f"(no {ACTIVITY_COLUMN} column for more than {ACTIVITY_MAX_SENSORS} sensors: "
                "name one, or --no-activity)",
                err=True,
            )
    session.echo(rows, columns)


def _health_cells(row: dict[str, Any]) -> dict[str, Any]:
    """The health columns for a person: 'yes' for stale, an offset with its sign and a mark."""
    row = dict(row)
    row["stale"] = "yes" if row.get("stale") else ("no" if row.get("stale_after") is not None else "")
    offset = row.get("clock_offset")
    if offset is not None:
        row["clock_offset"] = f"{offset:+.3f}" + (" !" if row.get("clock_skewed") else "")
    interval = row.get("interval")
    if interval is not None:
        row["interval"] = float(format(interval, ".3g"))
    return row


def _activity(session: _Session, rows: list[dict[str, Any]], now: float) -> list[str]:
    """A sparkline per sensor row: readings of its first metric per ACTIVITY_BUCKET_S, the last hour."""
    end = math.floor(now / ACTIVITY_BUCKET_S) * ACTIVITY_BUCKET_S + ACTIVITY_BUCKET_S  # the current bucket's end
    start = end - ACTIVITY_BUCKETS * ACTIVITY_BUCKET_S
    requests = [
        {
            "op": "aggregate",
            "sensor": row["sensor"],
            "metric": row["metrics"][0],
            "bucket": ACTIVITY_BUCKET_S,
            "since": start,
            "until": end,
        }
        for row in rows
        if row.get("metrics")
    ]
    answers: list[dict[str, Any]] = []
    try:
        for i in range(0, len(requests), ACTIVITY_PIPELINE):
            answers += session.client().pipeline(requests[i : i + ACTIVITY_PIPELINE])
    except ConnectError as exc:
        raise _connect_failure(exc) from None
    lines, found = [], iter(answers)
    for row in rows:
        if not row.get("metrics"):
            lines.append("")
            continue
        answer = next(found)
        counts = [0] * ACTIVITY_BUCKETS
        for b in answer.get("result") or [] if answer.get("ok") else []:
            index = round((b["start"] - start) / ACTIVITY_BUCKET_S)
            if 0 <= index < ACTIVITY_BUCKETS:
                counts[index] = b["count"]
        lines.append(plotting.sparkline(counts) if answer.get("ok") else "?")
    return lines


@_session_command("latest")
@click.argument("sensor", required=False)
@click.option("--metric", help="Only this metric.")
def latest(session: _Session, sensor: str | None, metric: str | None) -> None:
    """The newest reading of every (sensor, metric), or of one sensor.

    \b
    Example:
      telemetry-query latest boiler-1 --metric temp
    """
    rows = session.request("latest", sensor=sensor, metric=metric)
    if not rows:
        session.check_names([sensor] if sensor is not None else [], metric)
    session.echo(rows, ["sensor", "metric", "ts", "value", "seq"])


@_session_command("readings")
@click.argument("sensor")
@click.option("--metric", help="Only this metric (default: all of the sensor's, metric by metric).")
@_ranges
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True, help="Rows per page.")
@click.option("--desc", is_flag=True, help="Newest first.")
@click.option("--all", "walk_all", is_flag=True, help="Follow the pages to the end of the range.")
@click.option("--cursor", help="Continue after a previous page (its 'next').")
def readings(
    session: _Session,
    sensor: str,
    metric: str | None,
    since: float | None,
    until: float | None,
    limit: int,
    desc: bool,
    walk_all: bool,
    cursor: str | None,
) -> None:
    """Readings of one sensor in a time range, a page at a time.

    \b
    Example:
      telemetry-query readings boiler-1 --metric temp --since 2h --all
      telemetry-query --format csv readings boiler-1 --since 2026-11-25T00:00:00Z --until 2026-11-26
    """
    rows: list[dict[str, Any]] = []
    params = {
        "sensor": sensor,
        "metric": metric,
        "since": since,
        "until": until,
        "limit": limit,
        "order": "desc" if desc else "asc",
    }
    while True:
        page = session.request("readings", **params, cursor=cursor)
        rows += page["rows"]
        cursor = page["next"]
        if cursor is None or not walk_all:
            break
    if not rows:
        session.check_names([sensor], metric)
    if session.fmt == "json":
        shown = iso_times(rows) if session.settings.get("times") == "iso" else rows
        click.echo(json.dumps({"rows": shown, "next": cursor}, indent=1))
    else:
        session.echo(rows, ["sensor", "metric", "ts", "value", "seq", "boot"])
    if cursor is not None:
        click.echo(f"more rows: repeat with --all, or with --cursor {cursor}", err=True)


@_session_command("aggregate")
@click.argument("sensor")
@click.option("--metric", required=True, help="The metric to aggregate.")
@click.option("--bucket", type=DURATION, required=True, help="Bucket width: seconds or e.g. 30s, 5m, 1h, 1d.")
@_ranges
def aggregate(
    session: _Session, sensor: str, metric: str, bucket: float, since: float | None, until: float | None
) -> None:
    """Count, min, max, avg and sum per time bucket (aligned to the epoch).

    A range wider than the data (--since 7d over an hour of readings) is
    narrowed to the readings in it when the server would refuse it for
    spanning too many buckets; the buckets are the same.

    \b
    Example:
      telemetry-query aggregate boiler-1 --metric temp --bucket 5m --since 24h
    """
    params = {"sensor": sensor, "metric": metric, "bucket": bucket, "since": since, "until": until}
    try:
        result = session.client().request("aggregate", **params)
    except ServerError as exc:
        if exc.code != "bad_request" or "too small for the range" not in exc.message:
            raise ServerSaidNo(f"server said {exc.code}: {exc.message}") from None
        result = _aggregate_over_the_data(session, params, exc)
    except ConnectError as exc:
        raise _connect_failure(exc) from None
    if not result:
        session.check_names([sensor], metric)
    session.echo(result, ["start", "count", "min", "max", "avg", "sum"])


def _aggregate_over_the_data(session: _Session, params: dict[str, Any], refused: ServerError) -> list[dict[str, Any]]:
    """The aggregate again over [first, last] reading in the range; when even that spans too many
    buckets, say which bucket would do."""
    query = {k: params[k] for k in ("sensor", "metric", "since", "until")}
    first = session.request("readings", **query, limit=1)["rows"]
    if not first:
        return []
    last = session.request("readings", **query, limit=1, order="desc")["rows"][0]
    lo, hi = first[0]["ts"], last["ts"]
    try:
        return session.client().request("aggregate", **{**params, "since": lo, "until": math.nextafter(hi, math.inf)})
    except ServerError as exc:
        cap = re.search(r"at most (\d+)", exc.message)
        wider = f"; --bucket {_seconds(_bucket_for(hi - lo, int(cap.group(1))))} or wider would do" if cap else ""
        raise ServerSaidNo(
            f"server said {exc.code}: {exc.message}; the readings in that range run from "
            f"{human_time(lo)} to {human_time(hi)}{wider}"
        ) from None


def _bucket_for(span: float, max_buckets: int) -> float:
    """A round bucket width (rounded up) whose epoch-aligned buckets over `span` stay within max_buckets."""
    needed = span / max(max_buckets - 2, 1)  # +2: the partial buckets at both ends
    if needed >= 1:
        return float(math.ceil(needed))
    digits = 1 - math.floor(math.log10(needed))
    return math.ceil(needed * 10**digits) / 10**digits


def _seconds(value: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{value // size:g}{unit}"
    return f"{value:g}s"


@_session_command("gaps")
@click.argument("sensor", required=False)
@_ranges
def gaps(session: _Session, sensor: str | None, since: float | None, until: float | None) -> None:
    """Runs of sequence numbers still missing (since/until filter on detection time).

    \b
    Example:
      telemetry-query gaps boiler-1 --since 7d
    """
    rows = session.request("gaps", sensor=sensor, since=since, until=until)
    if not rows and sensor is not None:
        session.check_names([sensor], None)
    session.echo(rows, ["sensor", "boot", "first_seq", "last_seq", "missing", "detected_at"])


@_session_command("export")
@click.argument("sensor", nargs=-1)
@click.option("--metric", help="Only this metric (default: every metric of each sensor).")
@_ranges
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    metavar="FILE",
    help="Write to FILE (via FILE.part, renamed when complete) instead of standard output.",
)
@click.option(
    "--page",
    "page_rows",
    type=click.IntRange(1, 10_000),
    default=exporting.DEFAULT_PAGE_ROWS,
    show_default=True,
    help="Rows asked per request (memory is one page).",
)
def export(
    session: _Session,
    sensor: tuple[str, ...],
    metric: str | None,
    since: float | None,
    until: float | None,
    output: str | None,
    page_rows: int,
) -> None:
    """Export readings as CSV (default) or JSON lines (--format json), streamed.

    Every sensor, or the SENSORs named, in sensor order; within a sensor
    metric by metric, each in time order.  Columns: sensor, metric, ts, value,
    seq, boot (empty when the sensor sends none).  Values are written in the
    shortest form that reads back as the same number.  Pages through the
    `readings` op, writing each page before asking for the next, so a year
    of data never sits in memory.

    \b
    Example:
      telemetry-query export --since 2026-11-01 --until 2026-12-01 -o november.csv
      telemetry-query --format json export boiler-1 --metric temp --since 7d --times unix
    """
    fmt = session.settings["fmt"] or "csv"
    if fmt == "table":
        raise click.UsageError("export writes csv or json (JSON lines): pass --format csv or --format json")
    known = session.known_sensors()
    names = list(sensor)
    if known is None and not names:
        raise ServerSaidNo("the server has more sensors than one answer may list: name the sensors to export")
    if known is not None:
        session.check_names(names, metric)  # exits 1 on a name the server does not know
        names = names or [row["sensor"] for row in known]
    partial = output + ".part" if output else None
    try:
        out = open(partial, "w", encoding="utf-8", newline="") if partial else sys.stdout
    except OSError as exc:
        raise SetupFailed(f"cannot write {partial}: {exc.strerror}") from None
    iso = (session.settings["times"] or "iso") == "iso"  # ts to the microsecond; unix: the exact float
    writer = exporting.Writer(out, "json" if fmt == "json" else "csv", iso=iso)
    try:
        for page in exporting.pages(
            session.request, dict.fromkeys(names), metric=metric, since=since, until=until, page_rows=page_rows
        ):
            writer.write_page(page)
            out.flush()
    except BaseException as exc:
        if partial:
            out.close()
            os.unlink(partial)
        stopped = f"export stopped after {writer.rows} readings" + (f"; {output} not written" if output else "")
        if isinstance(exc, click.ClickException):
            exc.message = f"{exc.message} ({stopped})"
        else:
            click.echo(stopped, err=True)
        raise
    if partial:
        out.close()
        os.replace(partial, output)
    where = f" to {output}" if output else ""
    click.echo(f"exported {writer.rows} readings of {len(names)} sensor(s){where}", err=True)


@_session_command("plot")
@click.argument("sensor")
@click.option("--metric", help="The metric to draw (default: the sensor's only metric).")
@click.option(
    "--since",
    "since_text",
    default="1h",
    show_default=True,
    metavar="TIME",
    help="From this time: Unix seconds, ISO 8601 or an age like 6h (with --watch, an age slides along).",
)
@click.option("--until", "until_text", metavar="TIME", help="Up to this time (exclusive; default: the newest reading).")
@click.option(
    "--watch",
    type=DURATION,
    is_flag=False,
    flag_value=5.0,
    default=None,
    metavar="[SECONDS]",
    help="Redraw every SECONDS (default 5) until Ctrl-C.",
)
@click.option("--width", type=click.IntRange(40, 2000), help="Columns to fill [default: the terminal's].")
@click.option("--height", type=click.IntRange(12, 500), help="Lines to fill [default: the terminal's].")
def plot(
    session: _Session,
    sensor: str,
    metric: str | None,
    since_text: str,
    until_text: str | None,
    watch: float | None,
    width: int | None,
    height: int | None,
) -> None:
    """Draw a series in the terminal: the readings as a line, or when there are
    more readings than dots across, each dot column's average with a min/max band.

    The x axis runs from the first to the last reading in the range (a range
    far longer than the data draws the data); times are UTC.

    \b
    Example:
      telemetry-query plot boiler-1 --metric temp --since 6h
      telemetry-query plot boiler-1 --metric temp --since 15m --watch 2
    """
    for text, flag in ((since_text, "--since"), (until_text, "--until")):
        if text is not None:
            _parse_time_option(text, flag, time.time())  # a typo is exit 2 before anything is asked
    if metric is None:
        metric = _only_metric(session, sensor)
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ

    def frame() -> str:
        size = shutil.get_terminal_size((100, 30))
        columns, lines = width or size.columns, height or size.lines
        if watch is not None:
            lines -= 1  # the footer
        return _plot_frame(session, sensor, metric, since_text, until_text, columns, lines, color, watch is not None)

    if watch is None:
        click.echo(frame(), nl=False)
        return
    try:
        click.echo("\x1b[2J", nl=False)
        while True:
            text = frame() + f"every {watch:g} s, drawn {human_time(time.time())}; Ctrl-C to stop"
            # Home, each line over the last frame's (erasing its rest), then erase below: one
            # write per frame and no blank screen in between, so no flicker.
            click.echo("\x1b[H" + "\x1b[K\n".join(text.split("\n")) + "\x1b[K\x1b[J", nl=False)
            sys.stdout.flush()
            time.sleep(watch)
    except KeyboardInterrupt:
        click.echo("")


def _parse_time_option(text: str, flag: str, now: float) -> float:
    try:
        return parse_time(text, now)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from None


def _only_metric(session: _Session, sensor: str) -> str:
    rows = session.request("sensors", sensor=sensor)
    if not rows:
        session.check_names([sensor], None)
    metrics = rows[0].get("metrics") or [] if rows else []
    if len(metrics) != 1:
        listed = ", ".join(metrics) or "none yet"
        raise click.UsageError(f"sensor {sensor} has metrics {listed}: pick one with --metric")
    return metrics[0]


def _plot_frame(
    session: _Session,
    sensor: str,
    metric: str,
    since_text: str,
    until_text: str | None,
    columns: int,
    lines: int,
    color: bool,
    watching: bool,
) -> str:
    """One picture: where the data is in the range, then buckets sized to the canvas (or the raw points)."""
    now = time.time()
    since = _parse_time_option(since_text, "--since", now)
    until = _parse_time_option(until_text, "--until", now) if until_text is not None else None
    check_range(since, until)
    query = {"sensor": sensor, "metric": metric, "since": since, "until": until, "limit": 1}
    first = session.request("readings", **query)["rows"]
    if not first:
        session.check_names([sensor], metric)
        message = (
            f"no readings of {sensor} {metric} from {human_time(since)}"
            + (f" to {human_time(until)}" if until is not None else "")
            + ": widen --since"
        )
        if watching:
            return message + "\n"
        raise ServerSaidNo(message)
    last = session.request("readings", **query, order="desc")["rows"][0]
    lo, hi = first[0]["ts"], last["ts"]
    width, height = plotting.canvas_size(columns, lines)
    dots = 2 * width  # braille: two dot columns per character
    bucket = plotting.bucket_for(lo, hi, dots)
    buckets = session.request(
        "aggregate", sensor=sensor, metric=metric, bucket=bucket, since=lo, until=math.nextafter(hi, math.inf)
    )
    if sum(b["count"] for b in buckets) <= dots:
        rows = session.request("readings", **{**query, "limit": dots, "until": math.nextafter(hi, math.inf)})["rows"]
        return plotting.render(
            sensor,
            metric,
            lo,
            hi,
            width=width,
            height=height,
            color=color,
            points=[(r["ts"], r["value"]) for r in rows],
        )
    return plotting.render(
        sensor, metric, lo, hi, width=width, height=height, color=color, buckets=buckets, bucket=bucket
    )


@_session_command("stats")
def stats(session: _Session) -> None:
    """The collector's counters: received, stored, rejected by reason, lost, drops.

    \b
    Example:
      telemetry-query --format json stats
    """
    session.echo_object(session.request("stats"))


@_session_command("raw")
@click.argument("request")
def raw(session: _Session, request: str) -> None:
    """Send one request object as-is and print the whole response as JSON.

    \b
    Example:
      telemetry-query raw '{"op": "readings", "sensor": "boiler-1", "limit": 5}'
    """
    try:
        doc = json.loads(request)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="REQUEST") from None
    if not isinstance(doc, dict):
        raise click.BadParameter('a request is a JSON object, e.g. \'{"op": "ping"}\'', param_hint="REQUEST")
    try:
        response = session.client().call(doc)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="REQUEST") from None
    except ConnectError as exc:
        raise _connect_failure(exc) from None
    click.echo(json.dumps(response))
    if not response.get("ok"):
        error = response.get("error") or {}
        raise ServerSaidNo(f"server said {error.get('code')}: {error.get('message')}")


FOLLOW_COLUMNS = ["sensor", "metric", "ts", "value", "seq", "boot"]
FOLLOW_WIDTHS = (16, 12, 24, 14, 10, 10)  # a stream cannot size columns to its rows
FOLLOW_RETRIES = 5  # reconnections in a row after a lost connection ...
FOLLOW_BACKOFF_S = 0.5  # ... waiting this long first, doubling: 0.5 s to 8 s, 15.5 s in all
FOLLOW_READ_TIMEOUT = 75.0  # seconds without a line = lost (the server sends a heartbeat every 30 s)


@_session_command("follow")
@click.argument("sensor", required=False)
@click.option("--metric", help="Only this metric.")
@click.option("--after", type=click.IntRange(0), help="Resume after this position (printed on stderr at Ctrl-C).")
def follow(session: _Session, sensor: str | None, metric: str | None, after: int | None) -> None:
    """Print new readings as the collector commits them, until Ctrl-C.

    The server pushes them as each batch is stored (nothing polls).  A lost
    connection is retried 5 times over ~15 s and resumed exactly where it
    stopped (no reading missed or printed twice), then exit 3.  Ctrl-C
    exits 0.  --format json prints one JSON object per line.

    \b
    Example:
      telemetry-query follow boiler-1 --metric temp
      telemetry-query --format csv follow > live.csv
    """
    stream = _FollowStream(session, sensor, metric, after)
    failures = 0
    try:
        while True:
            try:
                stream.run()
            except ConnectError as exc:
                session.close()
                session._client = None
                if stream.progressed:  # this connection delivered: a fresh count of retries
                    failures = 0
                if failures >= FOLLOW_RETRIES:
                    raise _connect_failure(exc) from None
                delay = FOLLOW_BACKOFF_S * 2**failures
                failures += 1
                click.echo(
                    f"connection lost ({exc}); reconnecting in {delay:g}s (attempt {failures} of {FOLLOW_RETRIES})",
                    err=True,
                )
                time.sleep(delay)
    except KeyboardInterrupt:
        if stream.position is not None:
            click.echo(f"stopped at position {stream.position} (resume with --after {stream.position})", err=True)


class _FollowStream:
    """One follow over one connection at a time; `position` survives reconnections."""

    def __init__(self, session: _Session, sensor: str | None, metric: str | None, after: int | None) -> None:
        self.session = session
        self.params = {"op": "follow", "id": "follow", "sensor": sensor, "metric": metric}
        self.position = after
        self.progressed = False
        self.header_done = False

    def run(self) -> None:
        """Follow until the connection fails (ConnectError); the server's refusal is ServerSaidNo."""
        self.progressed = False
        client = self.session.client()
        request = {k: v for k, v in {**self.params, "after": self.position}.items() if v is not None}
        response = client.call(request)
        if not response.get("ok"):
            error = response.get("error") or {}
            raise ServerSaidNo(f"server said {error.get('code')}: {error.get('message')}")
        self.position = response["result"]["position"]
        client.set_read_timeout(FOLLOW_READ_TIMEOUT)
        self.print_rows([])  # the header at once: a person sees the command is running
        while True:
            doc = client.read_response()
            if not doc.get("ok"):
                error = doc.get("error") or {}
                raise ConnectError(
                    "closed", f"the server ended the follow: {error.get('code')}: {error.get('message')}"
                )
            event = doc.get("event")
            if event == "readings":
                self.print_rows(doc["rows"])
                self.progressed = True
            elif event == "lost":
                click.echo(
                    f"warning: the ingest log was trimmed before positions {doc['after'] + 1}-"
                    f"{doc['position']} were read: their readings are not shown",
                    err=True,
                )
            if event is not None:
                self.position = doc["position"]

    def print_rows(self, rows: list[dict[str, Any]]) -> None:
        fmt = self.session.fmt
        if fmt == "json":
            text = "".join(json.dumps(r) + "\n" for r in rows)
        elif fmt == "csv":
            text = render(rows, "csv", FOLLOW_COLUMNS)
            if self.header_done:
                text = text.split("\n", 1)[1]
        else:
            lines = [] if self.header_done else [FOLLOW_COLUMNS]
            lines += [[cell(c, r.get(c), True) for c in FOLLOW_COLUMNS] for r in rows]
            text = "".join(
                "  ".join(
                    v.rjust(w) if i >= 3 else v.ljust(w) for i, (v, w) in enumerate(zip(values, FOLLOW_WIDTHS))
                ).rstrip()
                + "\n"
                for values in lines
            )
        self.header_done = True
        click.echo(text, nl=False)
