"""telemetry-uplink: the command line edge (run on the gateway, consume centrally, status).

Flags > environment (TELEMETRY_UPLINK_<KEY> for run and status,
TELEMETRY_CENTRAL_<KEY> for consume) > the [uplink] / [central] table of the
TOML file > defaults, as for the other daemons (collector/config.py).  Every
ConfigError or SetupError becomes one line and exit code 2 here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

import click

from .. import PACKAGE, config
from ..errors import ConfigError, SetupError
from . import core, priority, source

if TYPE_CHECKING:
    from . import broker

UPLINK_ENV = "TELEMETRY_UPLINK_"
CENTRAL_ENV = "TELEMETRY_CENTRAL_"


def _db_path(value) -> str:
    path = config.string(value)
    if path.strip() in ("", ":memory:"):
        raise ValueError(f"{path!r}: the database must be a file (a path such as telemetry.db)")
    return path


class _Forever(str):
    seconds = 0.0


def _retain(value):
    """The collector's `retain` format (90d, 12h, 30m or 'forever'); its parser (collector.cli,
    ~65 ms of imports) loaded only for a value other than the default."""
    if not isinstance(value, bool) and str(value).strip().lower() in ("forever", "0", "0.0"):
        return _Forever(str(value))
    from ..cli import _duration

    return _duration(value)


def _gateway(value) -> str:
    return core.check_gateway(config.string(value))


def _prefix(value) -> str:
    return core.check_prefix(config.string(value))


def _server(value) -> str:
    url = config.string(value)
    if not url.startswith(("nats://", "tls://")):
        raise ValueError(f"{url!r}: write nats://HOST:PORT or tls://HOST:PORT")
    return url


def _stream(value) -> str:
    name = config.string(value)
    if not name or any(c in name for c in " .*>/\\") or len(name) > 64:
        raise ValueError(f"{name!r}: a stream name is 1-64 characters without spaces, '.', '*', '>', '/'")
    return name


def _replicas(value) -> int:
    n = config.positive_int(value)
    if n > 5:
        raise ValueError(f"JetStream keeps 1 to 5 replicas, got {value!r}")
    return n


def _payload_version(value) -> int:
    n = config.positive_int(value)
    if n not in core.VERSIONS:
        raise ValueError(f"payload version {value!r}: 1, 2 or 3")
    return n


def _close_workers(value) -> int:
    if type(value) is not bool and value in (0, "0"):
        return 0
    try:
        n = config.positive_int(value)
    except ValueError as exc:
        raise ValueError(str(exc).replace("must be > 0", "must be 0 or more")) from None
    if n > 64:
        raise ValueError(f"at most 64 close workers, got {value!r}")
    return n


def _default_gateway() -> str | None:
    name = socket.gethostname().split(".")[0]
    return name if core.GATEWAY_RE.fullmatch(name) else None


S = config.Setting

BROKER = [
    S(
        "servers",
        _server,
        ("nats://127.0.0.1:4222",),
        multiple=True,
        metavar="URL",
        help="NATS server, nats://HOST:PORT or tls://HOST:PORT; repeat for a cluster.",
    ),
    S("stream", _stream, "TELEMETRY", metavar="NAME", help="JetStream stream."),
    S(
        "subject_prefix",
        _prefix,
        "telemetry",
        metavar="PREFIX",
        help="Subjects are PREFIX.<gateway>.columns and .accounts (payload 2), "
        "PREFIX.<gateway>.<sensor>.readings and .accounts (payload 1).",
    ),
    S("create_stream", config.boolean, True, help="Create the stream (subjects PREFIX.>) when it is missing."),
    S("replicas", _replicas, 1, metavar="N", help="Replicas of a stream this creates (3 on a cluster)."),
    S(
        "duplicate_window",
        config.positive_float,
        120.0,
        metavar="SECONDS",
        help="Duplicate window (Nats-Msg-Id) of a stream this creates.",
    ),
    S(
        "ca",
        config.string,
        None,
        metavar="FILE",
        help="CA certificates that verify the broker (TLS).",
        default_text="the system's",
    ),
    S("cert", config.string, None, metavar="FILE", help="Client certificate for TLS (with --key)."),
    S("key", config.string, None, metavar="FILE", help="Private key of --cert (not readable by others)."),
    S("user", config.string, None, metavar="NAME", help="NATS user name (password from --password-file)."),
    S(
        "password_file",
        config.string,
        None,
        metavar="FILE",
        help="File holding the NATS password (one line, not readable by others).",
    ),
    S("token_file", config.string, None, metavar="FILE", help="File holding a NATS token."),
    S("creds_file", config.string, None, metavar="FILE", help="NATS credentials file (JWT and NKey seed)."),
    S("nkey_seed_file", config.string, None, metavar="FILE", help="File holding an NKey seed (SU...)."),
]

UPLINK_SETTINGS = [
    S("db", _db_path, "telemetry.db", metavar="PATH", help="The collector's database, opened read-only."),
    S(
        "gateway",
        _gateway,
        None,
        metavar="NAME",
        default_text="the host name",
        help="This gateway's name: 1-32 of A-Z a-z 0-9 _ -; its sensors are NAME:<id> centrally.",
    ),
    *BROKER,
    S(
        "payload_version",
        _payload_version,
        core.PAYLOAD_VERSION,
        metavar="1|2|3",
        help="3: the ingest log's rows as committed, many sensors a message on PREFIX.<gateway>.columns "
        "and .accounts, named by row and database so the central side drops a replay by range (fast); "
        "2: the same without those names (central consumers before payload 3); 1: one sensor a message on PREFIX.<gateway>.<sensor>.readings and .accounts "
        "(filter by sensor at the broker).",
    ),
    S(
        "max_datagrams",
        config.positive_int,
        None,
        metavar="N",
        default_text="1000 with payload 1, 50000 with payload 2",
        help="Datagrams per message at most.",
    ),
    S("window", config.positive_int, 512, metavar="N", help="Publishes awaiting their ack at most."),
    S("poll_interval", config.positive_float, 0.5, metavar="SECONDS", help="Look for new data this often when idle."),
    S(
        "position_interval",
        config.positive_float,
        5.0,
        metavar="SECONDS",
        help="Write (and fsync) the acked position to <db>-uplink at most this often, and on stop; "
        "a kill -9 or power cut sends at most this much again (JetStream and the central side drop it).",
    ),
    S(
        "ack_timeout",
        config.positive_float,
        10.0,
        metavar="SECONDS",
        help="Retry a batch after this long without its acks.",
    ),
    S(
        "backoff_max",
        config.positive_float,
        30.0,
        metavar="SECONDS",
        help="Longest wait between reconnect attempts (jittered).",
    ),
    S("status_interval", config.positive_float, 60.0, metavar="SECONDS", help="Log a status line this often."),
    S(
        "scheduling",
        priority.parse,
        "batch",
        metavar="|".join(priority.POLICIES),
        help="CPU scheduling policy, taken at start: batch (SCHED_BATCH) never preempts the collector when it "
        "wakes yet keeps its share of a busy core; idle runs only on an otherwise idle core (may fall behind on "
        "a saturated gateway); other is the kernel's default.  The systemd unit sets it (CPUSchedulingPolicy=).",
    ),
]

CENTRAL_SETTINGS = [
    S("db", _db_path, "central.db", metavar="PATH", help="The central database, created if missing."),
    *BROKER,
    S("durable", _stream, "telemetry-central", metavar="NAME", help="Durable consumer name."),
    S(
        "batch",
        config.positive_int,
        50,
        metavar="N",
        help="Messages per fetch and per transaction (memory: up to N x 1 MiB of payload).",
    ),
    S(
        "ack_wait",
        config.positive_float,
        30.0,
        metavar="SECONDS",
        help="JetStream redelivers an unacked message after this.",
    ),
    S(
        "backoff_max",
        config.positive_float,
        30.0,
        metavar="SECONDS",
        help="Longest wait between reconnect attempts, and between tries of a write the database refused "
        "(at most half of ack-wait).",
    ),
    S("status_interval", config.positive_float, 60.0, metavar="SECONDS", help="Log a status line this often."),
    S(
        "close_workers",
        _close_workers,
        None,
        metavar="N",
        default_text="one per core beyond the writer's, at most 4",
        help="Processes that encode closing heads into chunks while the one writer goes on, and decode "
        "messages too (payload 3: merged per sensor into arrays; one worker every third message, from 2 on all "
        "of them); 0: the writer does all itself.",
    ),
    S(
        "head_budget",
        config.positive_float,
        96.0,  # consumer.HEAD_BUDGET_BYTES (twice the collector's: bigger chunks, fewer closes)
        metavar="MIB",
        help="Memory of the open heads (datagrams not yet in chunks) of all gateways' sensors at most: the "
        "largest close early past it, as in the collector (whose default is 48: a central host closes fewer, "
        "bigger chunks for its CPU).",
    ),
    S(
        "max_heads",
        config.positive_int,
        10_000,  # collector.store.MAX_OPEN_HEADS (not imported here: numpy would load for `run` too)
        metavar="N",
        help="Open heads (one per sensor and boot of every gateway) at most: past it the least recently written "
        "close into chunks until 3/4 of N are open, so the gateways' number of sensors does not set the memory "
        "held (~1 KB a head beyond the data head-budget counts).",
    ),
    S(
        "retain",
        _retain,
        _retain("forever"),
        metavar="DURATION",
        help="Keep raw readings this long (by receive time at the gateway), then only their rollups; readings "
        "that arrive older than this are not stored (counted in uplink_expired_readings), as a TSDB drops "
        "samples older than its retention.  'forever' (the default): nothing is deleted.",
    ),
]


_CHECK_HELP = "Validate the settings and credential files, print the effective table and exit (connects to nothing)."


def _logging(verbose: int, quiet: int) -> None:
    config.setup_logging(verbose, quiet)
    logging.getLogger("nats").setLevel(logging.CRITICAL)  # its errors reach us as exceptions, said once


def _broker(values: dict) -> broker.BrokerSettings:
    from . import broker

    return broker.BrokerSettings(
        servers=tuple(values["servers"]),
        stream=values["stream"],
        subject_prefix=values["subject_prefix"],
        create_stream=values["create_stream"],
        replicas=values["replicas"],
        duplicate_window=values["duplicate_window"],
        ca=values["ca"],
        cert=values["cert"],
        key=values["key"],
        user=values["user"],
        password_file=values["password_file"],
        token_file=values["token_file"],
        creds_file=values["creds_file"],
        nkey_seed_file=values["nkey_seed_file"],
    )


def _serve(daemon) -> None:
    import asyncio

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop.set)
        await daemon.run()

    asyncio.run(main())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name=PACKAGE)
def main() -> None:
    """Forward what the collector stored to NATS JetStream, and gather many gateways centrally.

    \b
    telemetry-uplink run       on each gateway: read the collector's database, publish
    telemetry-uplink consume   centrally: the stream into one gateway-telemetry database
    telemetry-uplink status    on a gateway: position, pending, lag, last ack;
                               --central: what was written, rejected, set aside

    Nothing is lost or doubled: a batch counts as sent only after JetStream's ack,
    the position survives kill -9, retries carry the same Nats-Msg-Id, and the
    central side drops what it already has.  See docs/OPERATIONS.md "Uplink".

    \b
    Example:
      telemetry-uplink run --db /var/lib/gateway-telemetry/telemetry.db \\
          --gateway site-7 --servers tls://nats.example.net:4222 --ca /etc/gateway-telemetry/nats-ca.pem
    """


@main.command("run")
@config.options(UPLINK_SETTINGS, UPLINK_ENV)
@config.daemon_options("uplink", _CHECK_HELP)
@click.pass_context
def run_cmd(ctx: click.Context, config_path, check, verbose, quiet, **_) -> None:
    """Publish the collector's committed readings and accounts to JetStream (the daemon).

    Opens the database read-only; keeps its acked position in <db>-uplink (the
    collector's retention keeps what is not yet sent) and its status in
    <db>-uplink.status.json.  While the broker is unreachable it retries with
    jittered backoff up to --backoff-max and loses nothing: the database is the
    outbox.  SIGTERM or Ctrl-C stops it (exit 0); exit 2 is a bad flag, config
    value or credentials file (one line says which).

    \b
    Example:
      telemetry-uplink run --db telemetry.db --gateway site-7 \\
          --servers nats://10.0.0.5:4222 --user site-7 --password-file /etc/gateway-telemetry/nats-password
    """
    _logging(verbose, quiet)
    # Here, not at the top: nats and asyncio (~0.15 s of CPU) are for `run` and `consume` only.
    from . import broker
    from .publisher import Uplink, UplinkSettings

    try:
        values = config.merge(
            ctx,
            UPLINK_SETTINGS,
            config.read_table(config_path, "uplink"),
            f"{config_path} [uplink]",
            env_prefix=UPLINK_ENV,
        )
        if values["gateway"] is None:
            values["gateway"] = _default_gateway()
            if values["gateway"] is None:
                raise ConfigError(f"the host name {socket.gethostname()!r} is not a gateway name: give --gateway NAME")
        bs = _broker(values)
        settings = UplinkSettings(
            db=values["db"],
            gateway=values["gateway"],
            broker=bs,
            max_datagrams=values["max_datagrams"],
            payload_version=values["payload_version"],
            window=values["window"],
            poll_interval=values["poll_interval"],
            position_interval=values["position_interval"],
            ack_timeout=values["ack_timeout"],
            backoff_max=values["backoff_max"],
            status_interval=values["status_interval"],
        )
        source.refuse_central(settings.db)
        if check:
            broker.connect_options(bs)
            source.read_cursor(settings.db)
            click.echo(config.render("uplink", UPLINK_SETTINGS, values), nl=False)
            return
        from ..sdnotify import Notifier

        changed = priority.apply(values["scheduling"])
        logging.getLogger(__name__).info(
            "scheduling policy %s, nice %d%s",
            priority.current(),
            os.getpriority(os.PRIO_PROCESS, 0),
            " (set here)" if changed else "",
        )
        daemon = Uplink(settings, notify=Notifier())
        _serve(daemon)
    except (ConfigError, SetupError) as exc:
        raise config.SetupFailed(str(exc)) from None


@main.command("consume")
@config.options(CENTRAL_SETTINGS, CENTRAL_ENV)
@config.daemon_options("central", _CHECK_HELP)
@click.pass_context
def consume_cmd(ctx: click.Context, config_path, check, verbose, quiet, **_) -> None:
    """Take every gateway's stream into one central database (the central daemon).

    A durable pull consumer with explicit acks; writes are idempotent, so a
    redelivery or a replay after the duplicate window changes nothing.  Sensor
    ids are prefixed by their gateway (site-7:sim-0001), each with its gateway's
    accounts; point `telemetry-query serve --db` at the same file to query the
    fleet.  Reads the [central] table of the config file.

    \b
    Example:
      telemetry-uplink consume --db /var/lib/gateway-telemetry/central.db \\
          --servers nats://127.0.0.1:4222 --replicas 3
    """
    _logging(verbose, quiet)
    from . import broker
    from .consumer import Consumer, ConsumeSettings

    try:
        values = config.merge(
            ctx,
            CENTRAL_SETTINGS,
            config.read_table(config_path, "central"),
            f"{config_path} [central]",
            env_prefix=CENTRAL_ENV,
        )
        bs = _broker(values)
        settings = ConsumeSettings(
            db=values["db"],
            broker=bs,
            durable=values["durable"],
            batch=values["batch"],
            ack_wait=values["ack_wait"],
            backoff_max=values["backoff_max"],
            status_interval=values["status_interval"],
            close_workers=values["close_workers"],
            head_budget=int(values["head_budget"] * 1024 * 1024),
            max_heads=values["max_heads"],
            retain=values["retain"].seconds,
        )
        if check:
            broker.connect_options(bs)
            click.echo(config.render("central", CENTRAL_SETTINGS, values), nl=False)
            return
        from ..sdnotify import Notifier

        daemon = Consumer(settings, notify=Notifier())
        _serve(daemon)
    except (ConfigError, SetupError) as exc:
        raise config.SetupFailed(str(exc)) from None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return (
        f"{seconds:.1f} s"
        if seconds < 120
        else f"{seconds / 60:.1f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def _central_status(db, config_path, fmt) -> None:
    import shlex

    from . import central

    try:
        if db is None:
            table = config.read_table(config_path, "central")
            db = _db_path(table.get("db", "central.db"))
        out = central.summary(db)
    except (ConfigError, SetupError, ValueError) as exc:
        raise config.SetupFailed(str(exc)) from None
    counters = out["counters"]
    quarantined = counters["uplink_quarantined"]
    last = out["last_write"]
    out = dict(db=db, **out, last_write_age_seconds=None if last is None else max(0.0, time.time() - last))
    if fmt == "json":
        click.echo(json.dumps(out, indent=1))
    else:
        rejected = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("uplink_rejected:") and v}
        stamp = "-" if not last else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last))
        lines = [
            ("central", db),
            (
                "written",
                f"{counters['uplink_messages']} messages, {counters['uplink_readings']} readings "
                f"({counters['uplink_replayed_readings']} replayed readings dropped"
                + (
                    f", {counters['uplink_expired_readings']} older than the retention"
                    if counters["uplink_expired_readings"]
                    else ""
                )
                + "), "
                f"{counters['uplink_accounts']} account snapshots ({counters['uplink_stale_accounts']} stale)",
            ),
            (
                "rejected",
                f"{sum(rejected.values())} messages"
                + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) + ")" if rejected else ""),
            ),
            ("last write", f"{stamp} ({_age(out['last_write_age_seconds'])} ago)" if last else "never"),
            ("set aside", f"{quarantined} messages that cannot be written" if quarantined else "0"),
        ]
        for row in out["set_aside"]:
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["at"]))
            lines.append(
                (
                    "",
                    f"id {row['id']} {at}: gateway {row['gateway']}, stream sequence {row['stream_seq']}: {row['error']}",
                )
            )
        for k, v in lines:
            click.echo(f"{k:<11} {v}")
        if quarantined:
            click.echo(
                f"ATTENTION: {quarantined} messages are set aside in uplink_quarantine (payload kept; "
                f'docs/OPERATIONS.md "A write that fails"):\n'
                f"  sqlite3 -readonly {shlex.quote(db)} {shlex.quote(central.QUARANTINE_QUERY)}"
            )
    if quarantined:
        sys.exit(1)


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


@main.command("status")
@click.option(
    "--db",
    envvar=UPLINK_ENV + "DB",
    metavar="PATH",
    type=config.ParsedParam("PATH", _db_path),
    help="The collector's database (the uplink's position is <db>-uplink).  [default: from --config, else telemetry.db]",
)
@click.option(
    "--config",
    "config_path",
    envvar="TELEMETRY_CONFIG",
    metavar="FILE.toml",
    type=click.Path(dir_okay=False),
    help="Take db from this file's [uplink] table ([central] with --central).",
)
@click.option(
    "--central",
    is_flag=True,
    help="Show the central database instead (telemetry-uplink consume's): what was written, rejected, and "
    "set aside because it cannot be written.",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def status_cmd(db, config_path, central, fmt) -> None:
    """Show the uplink's position, what is pending, the lag and the last ack.

    Exit 0 when the uplink runs and is connected, 1 when it is not running or
    not connected (the reason is shown), 2 for a bad flag or an unreadable database.
    With --central: the consumer's counters and the messages set aside
    (uplink_quarantine); exit 1 when any is set aside (it needs attention).

    \b
    Example:
      telemetry-uplink status --config /etc/gateway-telemetry/gateway.toml
      telemetry-uplink status --central --db /var/lib/gateway-telemetry/central.db
    """
    if central:
        _central_status(db, config_path, fmt)
        return
    try:
        if db is None:
            table = config.read_table(config_path, "uplink")
            db = _db_path(table.get("db", "telemetry.db"))
        written = position = source.read_cursor(db)
        daemon = {}
        try:
            with open(source.cursor_path(db) + ".status.json", encoding="utf-8") as f:
                daemon = json.load(f)
        except (OSError, ValueError):
            pass
        running = bool(daemon) and _pid_alive(daemon.get("pid"))
        # A running uplink writes <db>-uplink every few seconds (position-interval); its
        # status file (each second) has the position acked since.
        live = daemon.get("position") if running else None
        if type(live) is int and live > position:
            position = live
        src = source.Source(db, source.STATUS)
        try:
            entries, readings, oldest = src.pending(position)
        finally:
            src.close()
    except (ConfigError, SetupError, ValueError) as exc:
        raise config.SetupFailed(str(exc)) from None
    now = time.time()
    try:
        acked_at = os.stat(source.cursor_path(db)).st_mtime
    except OSError:
        acked_at = None
    last_ack = daemon.get("last_ack") or acked_at
    out = dict(
        db=db,
        position=position,
        position_written=written,
        pending_entries=entries,
        pending_readings=readings,
        lag_seconds=None if oldest is None else max(0.0, now - oldest),
        last_ack=last_ack,
        last_ack_age_seconds=None if last_ack is None else max(0.0, now - last_ack),
        running=running,
        pid=daemon.get("pid") if running else None,
        connected=daemon.get("connected") if running else None,
        sent=daemon.get("sent"),
        acked=daemon.get("acked"),
        reconnects=daemon.get("reconnects"),
        skipped_entries=daemon.get("skipped_entries"),
        last_error=daemon.get("last_error"),
    )
    if fmt == "json":
        click.echo(json.dumps(out, indent=1))
    else:
        stamp = "-" if last_ack is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last_ack))
        lines = [
            (
                "position",
                f"{position} (last ingest_log id acked by JetStream"
                + (f"; {written} in {source.cursor_path(db)})" if written != position else ")"),
            ),
            ("pending", f"{readings} readings in {entries} entries"),
            ("lag", f"{_age(out['lag_seconds'])} (oldest unsent entry)" if entries else "0 (nothing unsent)"),
            ("last ack", f"{stamp} ({_age(out['last_ack_age_seconds'])} ago)" if last_ack else "never"),
            (
                "uplink",
                (
                    f"running (pid {out['pid']}), "
                    + (f"connected to {out['connected']}" if out["connected"] else "NOT connected")
                    + f"; sent {out['sent']}, acked {out['acked']}, "
                    f"reconnects {out['reconnects']}"
                )
                if running
                else "NOT running",
            ),
        ]
        if out["last_error"]:
            lines.append(("last error", out["last_error"]))
        if out["skipped_entries"]:
            lines.append(("LOST", f"{out['skipped_entries']} ingest_log entries deleted before they were sent"))
        for k, v in lines:
            click.echo(f"{k:<11} {v}")
    if not (running and out["connected"]):
        sys.exit(1)
