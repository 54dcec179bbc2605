"""telemetry-query: the query client's commands, and `serve`, the query server's edge.

One click group.  Connection options come from flags or TELEMETRY_SERVER,
TELEMETRY_CA, TELEMETRY_CERT, TELEMETRY_KEY, TELEMETRY_FORMAT, and may be
given before or after the command name.  Exit codes: 0 ok, 1 the server
answered with an error, 2 usage (bad flag, bad config, unreadable files),
3 cannot connect or TLS failed; each failure is one line saying what to
change.  `parse_time` and `parse_duration` are pure (the caller passes `now`).
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import json
import logging
import math
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from collector import config, tuning
from collector.config import SetupFailed
from collector.errors import ConfigError, SetupError
from collector.sdnotify import Notifier

from . import __version__
from .client import ConnectError, QueryClient, ServerError
from .server import DEFAULT_PORT

# --- pure parsers -------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """'300', '90s', '5m', '1h30m', '2d' -> seconds (> 0).  Raises ValueError."""
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        pos, value = 0, 0.0
        for match in _DURATION_RE.finditer(s):
            if match.start() != pos:
                break
            value += float(match.group(1)) * _UNITS[match.group(2).lower()]
            pos = match.end()
        if pos != len(s) or not s:
            raise ValueError(f"{text!r} is not a duration: use seconds or e.g. 30s, 5m, 2h, 7d") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r}: a duration must be > 0")
    return int(value) if value == int(value) else value


def parse_time(text: str, now: float) -> float:
    """A point in time as Unix seconds.

    Accepts Unix seconds ('1700000000', '1700000000.5'), ISO 8601
    ('2026-11-25T20:00:00Z', '2026-11-25 20:00', '2026-11-25'; no offset
    means UTC), 'now', and a duration ago ('15m', '2h', '7d', '15m ago').
    """
    s = text.strip()
    if s.lower() == "now":
        return float(now)
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a time")
        return value
    relative = s[:-4].rstrip() if s.lower().endswith(" ago") else s
    try:
        return float(now) - parse_duration(relative)
    except ValueError:
        pass
    iso = s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s
    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use Unix seconds, ISO 8601 (2026-11-25T20:00:00Z) or an age (15m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def human_time(value: float | None) -> str:
    """Unix seconds -> ISO 8601 UTC, milliseconds only when there are any."""
    if value is None:
        return ""
    try:
        when = dt.datetime.fromtimestamp(value, dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return repr(value)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += f".{when.microsecond // 1000:03d}"
    return text + "Z"


# --- output ---------------------------------------------------------------

TIME_FIELDS = {"ts", "first_seen", "last_seen", "start", "detected_at", "last_flush"}


def _flatten(result: dict[str, Any], human: bool = False) -> list[dict[str, Any]]:
    """A single object (ping, stats) as key/value rows; nested objects as key.sub.

    For a person (`human`), counts by reason (stats' `rejected`) become their
    total and the reasons that happened; CSV keeps every key for scripts.
    """
    rows = []
    for key, value in result.items():
        if isinstance(value, dict):
            if human and all(type(v) in (int, float) for v in value.values()):
                rows.append({"key": key, "value": sum(value.values())})
                value = {k: v for k, v in value.items() if v}
            rows += [{"key": f"{key}.{k}", "value": v} for k, v in value.items()]
        else:
            rows.append({"key": key, "value": value})
    return rows


def _cell(key: str, value: Any, human: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if human and (key in TIME_FIELDS) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return human_time(value)
    if isinstance(value, float) and human:
        # 12 significant digits: 16.8275, not the 16.827499999999997 of an average.
        # CSV keeps repr: 12 digits would cut a Unix ts to 10 ms.
        return repr(float(format(value, ".12g")))
    return repr(value) if isinstance(value, float) else str(value)


def render(rows: list[dict[str, Any]], fmt: str, columns: list[str] | None = None) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    columns = columns or (list(rows[0]) if rows else [])
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(c, row.get(c), False) for c in columns])
        return out.getvalue()
    cells = [[_cell(c, row.get(c), True) for c in columns] for row in rows]
    numeric = [all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
                   and c not in TIME_FIELDS for row in rows) and rows for c in columns]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns)] + [line(r) for r in cells]) + "\n"


# --- the client side ------------------------------------------------------

SETTINGS_KEY = "telemetry_query"


class ServerSaidNo(click.ClickException):
    exit_code = 1


class CannotConnect(click.ClickException):
    exit_code = 3


_HINTS = {
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


def _connection_options(envvars: bool) -> Callable:
    """--server/--ca/--cert/--key/--format, on the group (with env) and on each command."""

    def env(name: str) -> str | None:
        return name if envvars else None

    def decorate(f: Callable) -> Callable:
        options = [
            click.option("--server", envvar=env("TELEMETRY_SERVER"), metavar="HOST:PORT",
                         help=f"Query server; its HOST is the name checked against its certificate. "
                              f"[env TELEMETRY_SERVER; default localhost:{DEFAULT_PORT}]"),
            click.option("--ca", envvar=env("TELEMETRY_CA"), metavar="PEM", type=click.Path(dir_okay=False),
                         help="CA certificate(s) to verify the server with [env TELEMETRY_CA; default: system CAs]."),
            click.option("--cert", envvar=env("TELEMETRY_CERT"), metavar="PEM", type=click.Path(dir_okay=False),
                         help="Client certificate for mutual TLS [env TELEMETRY_CERT]."),
            click.option("--key", envvar=env("TELEMETRY_KEY"), metavar="PEM", type=click.Path(dir_okay=False),
                         help="Private key of --cert [env TELEMETRY_KEY]."),
            click.option("--format", "fmt", envvar=env("TELEMETRY_FORMAT"),
                         type=click.Choice(["table", "json", "csv"]),
                         help="Output: aligned table (times in UTC), json or csv [env TELEMETRY_FORMAT; default table]."),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _client_command(f: Callable) -> Callable:
    """Accept the connection options after the command too; pass the merged settings."""

    @_connection_options(envvars=False)
    @click.pass_context
    @functools.wraps(f)
    def wrapper(ctx: click.Context, server, ca, cert, key, fmt, **kwargs):
        base = ctx.find_root().meta.get(SETTINGS_KEY, {})
        given = {"server": server, "ca": ca, "cert": cert, "key": key, "fmt": fmt}
        settings = {k: given[k] if given[k] is not None else base.get(k) for k in given}
        return f(_Session(settings), **kwargs)

    return wrapper


class _Session:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.fmt = settings["fmt"] or "table"
        try:
            self.host, self.port = config.parse_host_port(settings["server"] or "localhost", DEFAULT_PORT)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--server") from None
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

    def echo(self, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
        click.echo(render(rows, self.fmt, columns), nl=False)

    def echo_object(self, result: dict[str, Any]) -> None:
        """One object (ping, stats): as-is in JSON, key/value rows in table and CSV."""
        if self.fmt == "json":
            click.echo(json.dumps(result, indent=1))
            return
        if self.fmt == "table":
            result = {k: human_time(v) if k in TIME_FIELDS and v is not None else v for k, v in result.items()}
        self.echo(_flatten(result, human=self.fmt == "table"), ["key", "value"])

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _connect_failure(exc: ConnectError) -> click.ClickException:
    hint = _HINTS.get(exc.kind, "")
    message = f"{exc}: {hint}" if hint else str(exc)
    if exc.kind == "files":
        return SetupFailed(message)
    return CannotConnect(message)


def _session_command(name: str, **kwargs: Any) -> Callable:
    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def run(session: _Session, **params: Any) -> None:
            try:
                f(session, **params)
            finally:
                session.close()

        return main.command(name, **kwargs)(_client_command(run))

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
    for option in reversed(_range_options):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@_connection_options(envvars=True)
@click.version_option(__version__, "--version", prog_name="telemetry-query")
@click.pass_context
def main(ctx: click.Context, server, ca, cert, key, fmt) -> None:
    """Query a gateway's telemetry over TLS (and `serve` runs the query server).

    Exit codes: 0 ok, 1 the server answered with an error, 2 usage,
    3 cannot connect or TLS failed.

    \b
    Example:
      telemetry-query --server gw1.example.org:4740 --ca ca.pem latest
    """
    ctx.meta[SETTINGS_KEY] = {"server": server, "ca": ca, "cert": cert, "key": key, "fmt": fmt}


@_session_command("ping")
def ping(session: _Session) -> None:
    """Check that the server answers; prints its version.

    \b
    Example:
      telemetry-query --ca ca.pem ping
    """
    session.echo_object(session.request("ping"))


@_session_command("sensors")
@click.argument("sensor", required=False)
def sensors(session: _Session, sensor: str | None) -> None:
    """List sensors with their datagram, reading and loss accounts.

    \b
    Example:
      telemetry-query sensors
      telemetry-query --format csv sensors boiler-1
    """
    session.echo(session.request("sensors", sensor=sensor), [
        "sensor", "first_seen", "last_seen", "datagrams", "readings", "lost", "duplicates", "reordered",
        "restarts", "metrics"])


@_session_command("latest")
@click.argument("sensor", required=False)
@click.option("--metric", help="Only this metric.")
def latest(session: _Session, sensor: str | None, metric: str | None) -> None:
    """The newest reading of every (sensor, metric), or of one sensor.

    \b
    Example:
      telemetry-query latest boiler-1 --metric temp
    """
    session.echo(session.request("latest", sensor=sensor, metric=metric), ["sensor", "metric", "ts", "value", "seq"])


@_session_command("readings")
@click.argument("sensor")
@click.option("--metric", help="Only this metric (default: all of the sensor's, metric by metric).")
@_ranges
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True, help="Rows per page.")
@click.option("--desc", is_flag=True, help="Newest first.")
@click.option("--all", "walk_all", is_flag=True, help="Follow the pages to the end of the range.")
@click.option("--cursor", help="Continue after a previous page (its 'next').")
def readings(session: _Session, sensor: str, metric: str | None, since: float | None, until: float | None,
             limit: int, desc: bool, walk_all: bool, cursor: str | None) -> None:
    """Readings of one sensor in a time range, a page at a time.

    \b
    Example:
      telemetry-query readings boiler-1 --metric temp --since 2h --all
      telemetry-query --format csv readings boiler-1 --since 2026-11-25T00:00:00Z --until 2026-11-26
    """
    rows: list[dict[str, Any]] = []
    params = {"sensor": sensor, "metric": metric, "since": since, "until": until, "limit": limit,
              "order": "desc" if desc else "asc"}
    while True:
        page = session.request("readings", **params, cursor=cursor)
        rows += page["rows"]
        cursor = page["next"]
        if cursor is None or not walk_all:
            break
    if session.fmt == "json":
        click.echo(json.dumps({"rows": rows, "next": cursor}, indent=1))
    else:
        session.echo(rows, ["sensor", "metric", "ts", "value", "seq", "boot"])
    if cursor is not None:
        click.echo(f"more rows: repeat with --all, or with --cursor {cursor}", err=True)


@_session_command("aggregate")
@click.argument("sensor")
@click.option("--metric", required=True, help="The metric to aggregate.")
@click.option("--bucket", type=DURATION, required=True, help="Bucket width: seconds or e.g. 30s, 5m, 1h, 1d.")
@_ranges
def aggregate(session: _Session, sensor: str, metric: str, bucket: float, since: float | None,
              until: float | None) -> None:
    """Count, min, max, avg and sum per time bucket (aligned to the epoch).

    \b
    Example:
      telemetry-query aggregate boiler-1 --metric temp --bucket 5m --since 24h
    """
    result = session.request("aggregate", sensor=sensor, metric=metric, bucket=bucket, since=since, until=until)
    session.echo(result, ["start", "count", "min", "max", "avg", "sum"])


@_session_command("gaps")
@click.argument("sensor", required=False)
@_ranges
def gaps(session: _Session, sensor: str | None, since: float | None, until: float | None) -> None:
    """Runs of sequence numbers still missing (since/until filter on detection time).

    \b
    Example:
      telemetry-query gaps boiler-1 --since 7d
    """
    session.echo(session.request("gaps", sensor=sensor, since=since, until=until),
                 ["sensor", "boot", "first_seq", "last_seq", "missing", "detected_at"])


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
        raise click.BadParameter("a request is a JSON object, e.g. '{\"op\": \"ping\"}'", param_hint="REQUEST")
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


# --- serve -----------------------------------------------------------------

SERVE_ENV = "TELEMETRY_QUERY_"


def _host_port(value: Any) -> tuple[str, int]:
    return config.parse_host_port(config.string(value), DEFAULT_PORT)


SERVE_SETTINGS = [
    config.Setting("db", config.string, tuning.DEFAULT_DB_PATH),
    config.Setting("listen", _host_port, ("0.0.0.0", DEFAULT_PORT)),
    config.Setting("cert", config.string, None),
    config.Setting("key", config.string, None),
    config.Setting("client_ca", config.string, None),
    config.Setting("max_connections", config.positive_int, 1000),
    config.Setting("idle_timeout", config.positive_float, 300.0),
    config.Setting("handshake_timeout", config.positive_float, 10.0),
    config.Setting("line_timeout", config.positive_float, 30.0),
    config.Setting("max_rows", config.positive_int, 10_000),
    config.Setting("max_buckets", config.positive_int, 10_000),
    config.Setting("query_timeout", config.positive_float, 2.0),
    config.Setting("max_output", config.positive_int, 4 * 1024 * 1024),
    config.Setting("workers", config.positive_int, 2),
]


def _serve_option(flag: str, metavar: str, help: str, parse: Callable[[Any], Any] | None = None) -> Callable:
    name = flag.lstrip("-").replace("-", "_").upper()
    kind = config.ParsedParam(metavar, parse) if parse else None
    return click.option(flag, envvar=SERVE_ENV + name, metavar=metavar, type=kind, help=help)


def notify_noop(state: str) -> None:
    """The default notify hook of build_server: outside systemd nothing listens."""


@main.command("serve")
@_serve_option("--db", "PATH", f"SQLite database of the collector, opened read-only. [default: {tuning.DEFAULT_DB_PATH}]")
@_serve_option("--listen", "HOST:PORT", f"Address to listen on; [::]:PORT for IPv6 and IPv4. [default: 0.0.0.0:{DEFAULT_PORT}]",
               _host_port)
@_serve_option("--cert", "PEM", "Server certificate chain (required: there is no plaintext mode).")
@_serve_option("--key", "PEM", "Private key of --cert (unencrypted, readable only by this service).")
@_serve_option("--client-ca", "PEM", "Require client certificates signed by this CA (mutual TLS).")
@_serve_option("--max-connections", "N", "Open connections at most; more are closed at once. [default: 1000]",
               config.positive_int)
@_serve_option("--idle-timeout", "SECONDS", "Close a connection idle this long. [default: 300]", config.positive_float)
@_serve_option("--handshake-timeout", "SECONDS", "Close a connection whose TLS handshake takes longer. [default: 10]",
               config.positive_float)
@_serve_option("--line-timeout", "SECONDS", "Close a connection whose request line takes longer to arrive. [default: 30]",
               config.positive_float)
@_serve_option("--max-rows", "N", "Rows in one response at most. [default: 10000]", config.positive_int)
@_serve_option("--max-buckets", "N", "Buckets one aggregate may span. [default: 10000]", config.positive_int)
@_serve_option("--query-timeout", "SECONDS", "SQL time budget of one request. [default: 2]", config.positive_float)
@_serve_option("--max-output", "BYTES", "Queued response bytes per client before it is no longer read. [default: 4 MiB]",
               config.positive_int)
@_serve_option("--workers", "N", "Threads running SQL, each with its own read-only connection. [default: 2]",
               config.positive_int)
@click.option("--config", "config_path", envvar="TELEMETRY_CONFIG", metavar="FILE.toml", type=click.Path(dir_okay=False),
              help="TOML file whose [query] table holds the same names (flags and env win).")
@click.option("--check", is_flag=True,
              help="Validate the settings and load the certificates, print the effective [query] table, exit.")
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.pass_context
def serve(ctx: click.Context, config_path: str | None, check: bool, verbose: int, **_: Any) -> None:
    """Run the query server: JSON lines over TLS (1.2+), database read-only.

    Every option can also come from the environment (TELEMETRY_QUERY_DB,
    TELEMETRY_QUERY_LISTEN, TELEMETRY_QUERY_CLIENT_CA, ... the option name in
    capitals) or from the [query] table of a TOML file (--config or
    TELEMETRY_CONFIG).  Flags win over the environment, which wins over the
    file.  Logs `listening tls HOST:PORT` once ready; SIGTERM or Ctrl-C stops
    it (exit 0).

    \b
    Example:
      telemetry-query serve --db /var/lib/gateway-telemetry/telemetry.db --listen [::]:4740 \\
          --cert server.pem --key server.key --client-ca ca.pem
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        values = config.merge(ctx, SERVE_SETTINGS, config.read_table(config_path, "query"), f"{config_path} [query]")
        if check:
            tls_context(values)  # the database may not exist yet: only TLS material is loaded
            click.echo(config.render("query", SERVE_SETTINGS, values), nl=False)
            return
        notify = Notifier()
        server = build_server(values, notify=notify)
    except (ConfigError, SetupError) as exc:
        raise SetupFailed(str(exc)) from None
    log = logging.getLogger("telemetry.query")
    previous = {sig: signal.signal(sig, lambda *_: server.shutdown()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("%s (mutual TLS: %s)", server.describe(), "on" if values["client_ca"] else "off")
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    notify.close()
    log.info("stopped")


def tls_context(values: dict[str, Any]):
    """The server's TLS context from the settings; also what --check verifies (without binding)."""
    from .server import server_context

    if not values["cert"] or not values["key"]:
        raise ConfigError("--cert and --key are required (TELEMETRY_QUERY_CERT/KEY or [query] cert/key): "
                          "the query service only speaks TLS")
    return server_context(values["cert"], values["key"], values["client_ca"])


def build_server(values: dict[str, Any], notify: Callable[[str], None] = notify_noop):
    """Settings (as merged by collector.config) -> a bound QueryServer.  Raises ConfigError/SetupError."""
    from collector.schema import open_reader

    from .ops import Limits, Ops
    from .server import QueryServer, ServerLimits, Service

    context = tls_context(values)
    db = values["db"]
    open_reader(db).close()  # fail now, with the reason, rather than in each worker
    ops_limits = Limits(max_rows=values["max_rows"], max_buckets=values["max_buckets"],
                        query_seconds=values["query_timeout"])
    limits = ServerLimits(max_connections=values["max_connections"], idle_timeout=values["idle_timeout"],
                          handshake_timeout=values["handshake_timeout"], line_timeout=values["line_timeout"],
                          max_output=values["max_output"])
    service = Service(lambda: Ops(open_reader(db), ops_limits), workers=values["workers"])
    return QueryServer(context, values["listen"], service, limits, notify=notify)
