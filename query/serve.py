"""`telemetry-query serve`: the query server's edge (settings -> a bound QueryServer).

Settings come from flags > TELEMETRY_QUERY_* > the [query] table of the TOML
file > defaults (collector.config merges them); `--check` validates them and
loads the TLS material without binding.  The server module is imported only
when a server is built, so the client commands never load it.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Any

import click

from collector import config, tuning
from collector.config import SetupFailed
from collector.errors import ConfigError, SetupError
from collector.sdnotify import Notifier

from . import tuning as qt
from .protocol import DEFAULT_PORT

SERVE_ENV = "TELEMETRY_QUERY_"


_listen = config.host_port(DEFAULT_PORT)


# Each setting once: flag, TELEMETRY_QUERY_* variable, [query] key, default
# (query/tuning.py) and help; deploy/gateway.toml documents the same keys.
SERVE_SETTINGS = [
    config.Setting(
        "db",
        config.string,
        tuning.DEFAULT_DB_PATH,
        metavar="PATH",
        help="SQLite database of the collector, opened read-only.",
    ),
    config.Setting(
        "listen",
        _listen,
        ("0.0.0.0", DEFAULT_PORT),
        metavar="HOST:PORT",
        help="Address to listen on; [::]:PORT for IPv6 and IPv4.",
    ),
    config.Setting(
        "cert",
        config.string,
        None,
        metavar="PEM",
        help="Server certificate chain (required: there is no plaintext mode).",
    ),
    config.Setting(
        "key",
        config.string,
        None,
        metavar="PEM",
        help="Private key of --cert (unencrypted, readable only by this service).",
    ),
    config.Setting(
        "client_ca",
        config.string,
        None,
        metavar="PEM",
        help="Require client certificates signed by this CA (mutual TLS).",
    ),
    config.Setting(
        "max_connections",
        config.positive_int,
        qt.MAX_CONNECTIONS,
        metavar="N",
        help="Open connections at most; more are closed at once.",
    ),
    config.Setting(
        "idle_timeout",
        config.positive_float,
        qt.IDLE_TIMEOUT_S,
        metavar="SECONDS",
        help="Close a connection idle this long.",
    ),
    config.Setting(
        "handshake_timeout",
        config.positive_float,
        qt.HANDSHAKE_TIMEOUT_S,
        metavar="SECONDS",
        help="Close a connection whose TLS handshake takes longer.",
    ),
    config.Setting(
        "line_timeout",
        config.positive_float,
        qt.LINE_TIMEOUT_S,
        metavar="SECONDS",
        help="Close a connection whose request line takes longer to arrive.",
    ),
    config.Setting("max_rows", config.positive_int, qt.MAX_ROWS, metavar="N", help="Rows in one response at most."),
    config.Setting(
        "max_buckets", config.positive_int, qt.MAX_BUCKETS, metavar="N", help="Buckets one aggregate may span."
    ),
    config.Setting(
        "query_timeout",
        config.positive_float,
        qt.QUERY_TIMEOUT_S,
        metavar="SECONDS",
        help="SQL time budget of one request.",
    ),
    config.Setting(
        "max_output",
        config.positive_int,
        qt.MAX_OUTPUT_BYTES,
        metavar="BYTES",
        default_text=f"{qt.MAX_OUTPUT_BYTES} (4 MiB)",
        help="Queued response bytes per client before it is no longer read.",
    ),
    config.Setting(
        "workers",
        config.positive_int,
        qt.WORKERS,
        metavar="N",
        help="Threads running SQL, each with its own read-only connection.",
    ),
    config.Setting(
        "metrics",
        config.metrics_address,
        None,
        metavar="HOST:PORT",
        default_text="off",
        help="Serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (e.g. 127.0.0.1:9740); "
        "no authentication: bind loopback or a management network.",
    ),
]


def notify_noop(state: str) -> None:
    """The default notify hook of build_server: outside systemd nothing listens."""


@click.command("serve")
@config.options(SERVE_SETTINGS, SERVE_ENV)
@config.daemon_options(
    "query", "Validate the settings and load the certificates, print the effective [query] table, exit."
)
@click.pass_context
def serve(ctx: click.Context, config_path: str | None, check: bool, verbose: int, quiet: int, **_: Any) -> None:
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
          --cert server.pem --key server.key --client-ca ca.pem --metrics 127.0.0.1:9740
    """
    config.setup_logging(verbose, quiet)
    try:
        values = config.merge(
            ctx, SERVE_SETTINGS, config.read_table(config_path, "query"), f"{config_path} [query]", env_prefix=SERVE_ENV
        )
        if check:
            # What a start would refuse, --check refuses: TLS material and the database.
            tls_context(values)
            check_database(values["db"])
            click.echo(config.render("query", SERVE_SETTINGS, values), nl=False)
            return
        notify = Notifier()
        server = build_server(values, notify=notify)
        exporter = None
        if values["metrics"] is not None:
            try:
                exporter = start_metrics(server, values["metrics"])
            except BaseException:
                server.close()
                raise
    except (ConfigError, SetupError) as exc:
        raise SetupFailed(str(exc)) from None
    log = logging.getLogger("telemetry.query")
    if exporter is not None:
        from collector.metrics import describe

        log.info("%s", describe(exporter))
    previous = {sig: signal.signal(sig, lambda *_: server.shutdown()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("%s (mutual TLS: %s)", server.describe(), "on" if values["client_ca"] else "off")
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()
    notify.close()
    log.info("stopped")


def start_metrics(server, address: tuple[str, int]):
    """The Prometheus exporter of a QueryServer (query/metrics.py); returns the HTTP server."""
    from collector.metrics import serve_metrics

    from .metrics import QueryMetrics

    return serve_metrics(address, QueryMetrics(server, server.service.stats))


def tls_context(values: dict[str, Any]):
    """The server's TLS context from the settings; also what --check verifies (without binding)."""
    from .server import server_context

    if not values["cert"] or not values["key"]:
        raise ConfigError(
            "--cert and --key are required (TELEMETRY_QUERY_CERT/KEY or [query] cert/key): "
            "the query service only speaks TLS"
        )
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
    ops_limits = Limits(
        max_rows=values["max_rows"], max_buckets=values["max_buckets"], query_seconds=values["query_timeout"]
    )
    limits = ServerLimits(
        max_connections=values["max_connections"],
        idle_timeout=values["idle_timeout"],
        handshake_timeout=values["handshake_timeout"],
        line_timeout=values["line_timeout"],
        max_output=values["max_output"],
    )
    service = Service(lambda: Ops(open_reader(db), ops_limits), workers=values["workers"])
    return QueryServer(context, values["listen"], service, limits, notify=notify)
