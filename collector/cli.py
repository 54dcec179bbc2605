"""telemetry-collector: the command line edge of the collector.

Flags, TELEMETRY_COLLECTOR_* environment variables and the `[collector]`
table of a TOML file become one `server.Settings` (flags > env > file >
defaults, collector.config); every ConfigError or SetupError raised inside
becomes one readable line and exit code 2 here, and nowhere else.
"""

from __future__ import annotations

import logging
import sys

import click

from . import PACKAGE, config, health, net, tuning
from .errors import ConfigError, SetupError

ENV = "TELEMETRY_COLLECTOR_"


def _group(value) -> tuple[str, int | None]:
    return net.parse_group(config.string(value))


_listen = config.host_port(tuning.DEFAULT_UDP_PORT)


def _db_path(value) -> str:
    path = config.string(value)
    if path.strip() in ("", ":memory:"):
        # SQLite would open a temporary database that vanishes at exit.
        raise ValueError(f"{path!r}: the database must be a file (a path such as telemetry.db)")
    return path


MAX_RCVBUF_BYTES = 2**31 - 1  # setsockopt(SO_RCVBUF) takes a C int


def _rcvbuf(value) -> int:
    number = config.positive_int(value)
    if number > MAX_RCVBUF_BYTES:
        raise ValueError(f"must be at most {MAX_RCVBUF_BYTES} (the kernel takes a C int), got {value!r}")
    return number


def _positive(kind, check=None):
    """Flag parser: a number > 0, with the same messages as the file layer."""
    check = check or (config.positive_int if kind is int else config.positive_float)

    def parse(value):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
        if kind is int and not number.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        return check(int(number) if kind is int else value)

    return parse


def _count(value) -> int:
    """An integer >= 0 (0 switches a feature off)."""
    if not isinstance(value, bool) and isinstance(value, (int, str)) and str(value).strip() == "0":
        return 0
    try:
        return config.positive_int(value)
    except ValueError as exc:
        raise ValueError(str(exc).replace("must be > 0", "must be >= 0")) from None


class Duration(str):
    """A duration as written ("90d", "12h", "30m", "45s", seconds; "0" or "forever": no limit)."""

    seconds: float

    def __float__(self) -> float:
        return self.seconds


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def _duration(value) -> Duration:
    text = str(value).strip().lower() if not isinstance(value, bool) else ""
    if text in ("forever", "0", "0.0"):
        seconds = 0.0
    else:
        unit = text[-1:] if text[-1:] in _UNITS else "s"
        number = text[:-1] if text[-1:] in _UNITS else text
        try:
            seconds = float(number) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"{value!r} is not a duration such as 90d, 12h, 30m or 'forever'") from None
        if not seconds > 0 or seconds == float("inf"):
            raise ValueError(f"{value!r}: a duration must be > 0 (or 'forever')")
    out = Duration(str(value))
    out.seconds = seconds
    return out


class Size(str):
    """A size as written ("500M", "2G", "1.5GiB", bytes)."""

    bytes: int

    def __int__(self) -> int:
        return self.bytes


_SIZES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _size(value) -> Size:
    text = str(value).strip().lower().removesuffix("ib").removesuffix("b") if not isinstance(value, bool) else ""
    unit = text[-1:] if text[-1:] in "kmgt" and text else ""
    try:
        number = float(text[:-1] if unit else text)
    except ValueError:
        raise ValueError(f"{value!r} is not a size such as 500M or 2G") from None
    size = int(number * _SIZES[unit])
    if size < MIN_DISK_BYTES:
        raise ValueError(
            f"{value!r}: at least {MIN_DISK_BYTES // 1024**2} MiB (the schema, the heads' log and the WAL need room)"
        )
    out = Size(str(value))
    out.bytes = size
    return out


MIN_DISK_BYTES = 1024**2


# Each setting once: flag, TELEMETRY_COLLECTOR_* variable, [collector] key,
# default and help (deploy/gateway.toml documents the same keys; a test checks).
SETTINGS = [
    config.Setting(
        "db", _db_path, tuning.DEFAULT_DB_PATH, metavar="PATH", help="SQLite database file, created if missing."
    ),
    config.Setting(
        "listen",
        _listen,
        ((tuning.DEFAULT_LISTEN_HOST, tuning.DEFAULT_UDP_PORT),),
        multiple=True,
        metavar="HOST:PORT",
        help="Unicast address to receive on; repeat for more; IPv6 as [::1]:PORT.",
    ),
    config.Setting(
        "multicast",
        _group,
        (),
        multiple=True,
        metavar="GROUP[:PORT]",
        help="Multicast group to join (IPv4 or IPv6, [ff15::1]:PORT); repeat for more.  "
        "The port defaults to the first --listen port.",
    ),
    config.Setting(
        "multicast_interface",
        config.string,
        None,
        metavar="ADDR|IFNAME",
        default_text="the kernel's route",
        help="Interface to join groups on, by address or name.",
    ),
    config.Setting(
        "flush_interval",
        config.positive_float,
        tuning.DEFAULT_FLUSH_INTERVAL_S,
        metavar="SECONDS",
        flag_parse=_positive(float),
        help="Write a batch at least this often.",
    ),
    config.Setting(
        "batch_size",
        config.positive_int,
        tuning.DEFAULT_BATCH_ROWS,
        metavar="ROWS",
        flag_parse=_positive(int),
        help="Write a batch when this many readings wait.",
    ),
    config.Setting(
        "rcvbuf",
        _rcvbuf,
        tuning.DEFAULT_RCVBUF_BYTES,
        metavar="BYTES",
        flag_parse=_positive(int, _rcvbuf),
        help="Socket receive buffer to ask for.",
    ),
    config.Setting(
        "status_interval",
        config.positive_float,
        tuning.DEFAULT_STATUS_INTERVAL_S,
        metavar="SECONDS",
        flag_parse=_positive(float),
        help="Log a status line this often.",
    ),
    config.Setting(
        "keys",
        config.string,
        None,
        metavar="FILE",
        help="Key file for signed datagrams: one 'key_id = hex' per line, not readable by others; "
        "SIGHUP reloads it.  See docs/SECURITY.md.",
    ),
    config.Setting(
        "require_auth", config.boolean, False, help="Reject unsigned datagrams (not_signed).  Needs --keys."
    ),
    config.Setting(
        "metrics",
        config.metrics_address,
        None,
        metavar="HOST:PORT",
        default_text="off",
        help="Serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (e.g. 127.0.0.1:9739); "
        "no authentication: bind loopback or a management network.",
    ),
    config.Setting(
        "metrics_sensors",
        _count,
        0,
        metavar="N",
        help="Also export per-sensor metrics (label sensor) for the first N sensors by name; 0: none.",
    ),
    config.Setting(
        "stale_factor",
        config.positive_float,
        health.DEFAULT_STALE_FACTOR,
        metavar="X",
        flag_parse=_positive(float),
        help="A sensor is stale when silent for X times its own learned send interval...",
    ),
    config.Setting(
        "stale_floor",
        config.positive_float,
        health.DEFAULT_STALE_FLOOR_S,
        metavar="SECONDS",
        flag_parse=_positive(float),
        help="... and at least this long.",
    ),
    config.Setting(
        "clock_threshold",
        config.positive_float,
        health.DEFAULT_CLOCK_THRESHOLD_S,
        metavar="SECONDS",
        flag_parse=_positive(float),
        help="Flag a sensor whose clock is off by more than this (its readings are kept).",
    ),
    config.Setting(
        "retain",
        _duration,
        _duration("90d"),
        metavar="DURATION",
        help="Keep raw readings this long (by receive time), then only their rollups.",
    ),
    config.Setting(
        "retain_1m", _duration, _duration("365d"), metavar="DURATION", help="Keep the 1-minute rollups this long."
    ),
    config.Setting(
        "retain_1h",
        _duration,
        _duration("forever"),
        metavar="DURATION",
        help="Keep the 1-hour rollups this long ('forever': never delete).",
    ),
    config.Setting(
        "max_disk",
        _size,
        None,
        metavar="SIZE",
        default_text="no limit",
        help="Keep the database file and its WAL under this size (500M, 2G): the oldest raw readings "
        "go first, then the oldest 1-minute rollups; counted in budget_dropped.",
    ),
]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": None})
@config.options(SETTINGS, ENV)
@config.daemon_options(
    "collector",
    "Validate the settings and the key file, print the effective [collector] table and exit (binds nothing).",
)
@click.version_option(package_name=PACKAGE)
@click.pass_context
def main(ctx: click.Context, config_path: str | None, check: bool, verbose: int, quiet: int, **_: object) -> None:
    """Receive sensor datagrams over UDP and store them in SQLite with exact loss accounts.

    Every option can also come from the environment (TELEMETRY_COLLECTOR_DB,
    TELEMETRY_COLLECTOR_LISTEN, ... the option name in capitals; repeatable
    ones take space-separated values) or from the [collector] table of a TOML
    file given with --config or TELEMETRY_CONFIG.  Flags win over the
    environment, which wins over the file.  SIGHUP reloads the key file
    (--keys).  SIGTERM or Ctrl-C flushes and exits 0;
    exit code 2 is a bad flag, config value or set-up error (one line says
    which), 1 a final flush the database refused.  See docs/OPERATIONS.md.

    \b
    Example:
      telemetry-collector --db /var/lib/gateway-telemetry/telemetry.db \\
          --listen 0.0.0.0:4739 --listen [::]:4739 \\
          --multicast 239.12.0.1 --multicast-interface eth0 --metrics 127.0.0.1:9739
    """
    config.setup_logging(verbose, quiet)
    # Here, not at the top: `--help`, `--version` and a bad flag answer without
    # the receive path's imports (numpy, sqlite-utils: ~0.3 s of CPU).
    from .server import Collector, Settings

    try:
        values = config.merge(
            ctx, SETTINGS, config.read_table(config_path, "collector"), f"{config_path} [collector]", env_prefix=ENV
        )
        settings = Settings(
            **values,
            freeze_gc=True,
            gc_threshold=tuning.GC_THRESHOLD0,
            switch_interval=tuning.WRITER_SWITCH_INTERVAL_S,
        )
        if check:
            if settings.keys:
                from .auth import load_keys

                load_keys(settings.keys)  # readable, private, well-formed: as a start would insist
            click.echo(config.render("collector", SETTINGS, values), nl=False)
            return
        from .sdnotify import Notifier

        collector = Collector(settings, notify=Notifier())
    except (ConfigError, SetupError) as exc:
        raise config.SetupFailed(str(exc)) from None
    try:
        collector.install_signal_handlers()
        collector.log_start()
        if collector.metrics_server is not None:
            from .metrics import describe

            logging.getLogger("collector").info("%s", describe(collector.metrics_server))
        collector.serve_forever()
    finally:
        collector.server_close()
    if collector.final_flush_failed or collector.db_lost:
        sys.exit(1)  # the ERROR line before says what is not stored
    logging.getLogger("collector").log(*collector.stop_message())
