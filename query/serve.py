"""`telemetry-query serve`: the query server's edge (settings -> a bound QueryServer).

Settings come from flags > TELEMETRY_QUERY_* > the [query] table of the TOML
file > defaults (collector.config merges them); `--check` validates them and
loads the TLS material without binding.  The server module is imported only
when a server is built, so the client commands never load it.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from collector import config, tuning
from collector.config import SetupFailed
from collector.errors import ConfigError, SetupError
from collector.sdnotify import Notifier

from .protocol import DEFAULT_PORT

SERVE_ENV = "TELEMETRY_QUERY_"


_listen = config.host_port(DEFAULT_PORT)


SERVE_SETTINGS = [
    config.Setting("db", config.string, tuning.DEFAULT_DB_PATH),
    config.Setting("listen", _listen, ("0.0.0.0", DEFAULT_PORT)),
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


@click.command("serve")
@_serve_option("--db", "PATH", f"SQLite database of the collector, opened read-only. [default: {tuning.DEFAULT_DB_PATH}]")
@_serve_option("--listen", "HOST:PORT", f"Address to listen on; [::]:PORT for IPv6 and IPv4. [default: 0.0.0.0:{DEFAULT_PORT}]",
               _listen)
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
        values = config.merge(ctx, SERVE_SETTINGS, config.read_table(config_path, "query"), f"{config_path} [query]",
                              env_prefix=SERVE_ENV)
        if check:
            # What a start would refuse, --check refuses: TLS material and the database.
            tls_context(values)
            check_database(values["db"])
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


def check_database(db: str) -> None:
    """Open the database as each worker will (read-only, schema checked): fail with the reason."""
    from collector.schema import open_reader

    open_reader(db).close()


def build_server(values: dict[str, Any], notify: Callable[[str], None] = notify_noop):
    """Settings (as merged by collector.config) -> a bound QueryServer.  Raises ConfigError/SetupError."""
    from collector.schema import open_reader

    from .ops import Limits, Ops
    from .server import QueryServer, ServerLimits, Service

    context = tls_context(values)
    db = values["db"]
    check_database(db)  # fail now, with the reason, rather than in each worker
    ops_limits = Limits(max_rows=values["max_rows"], max_buckets=values["max_buckets"],
                        query_seconds=values["query_timeout"])
    limits = ServerLimits(max_connections=values["max_connections"], idle_timeout=values["idle_timeout"],
                          handshake_timeout=values["handshake_timeout"], line_timeout=values["line_timeout"],
                          max_output=values["max_output"])
    service = Service(lambda: Ops(open_reader(db), ops_limits), workers=values["workers"])
    return QueryServer(context, values["listen"], service, limits, notify=notify)
