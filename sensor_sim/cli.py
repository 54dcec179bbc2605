"""sensor-sim command line: flags -> SimConfig/ReplayConfig, signals -> a clean stop, errors -> one line.

Exit codes: 0 done; 2 a bad flag or replay file (one line, no traceback);
1 the network refused something (one line); 130 stopped by SIGINT (Ctrl-C)
and 143 by SIGTERM, in both cases after sending what fault injection still
held back and writing the report of what was actually sent.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from collector import PACKAGE
from collector.auth import load_keys, parse_key
from collector.errors import ConfigError, SetupError

from .faults import FaultRates
from .net import parse_target
from .replay import ReplayConfig, load, run_replay
from .signals import DEFAULT_METRICS, MODELS, parse_metrics
from .sim import SENSOR_PLACEHOLDER, Progress, Signing, SimConfig, check_sensor_id, run


class TargetType(click.ParamType):
    name = "HOST:PORT"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return parse_target(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class RateType(click.ParamType):
    name = "HZ|max"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None or isinstance(value, float):
            return value
        if str(value).strip().lower() == "max":
            return None
        try:
            rate = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number of Hz or 'max'", param, ctx)
        if not 0 < rate < float("inf"):
            self.fail(f"{value!r}: the rate must be > 0 Hz (or 'max')", param, ctx)
        return rate


class MetricsType(click.ParamType):
    name = "LIST"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_metrics(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


PROBABILITY = click.FloatRange(0.0, 1.0)
U32 = click.IntRange(0, 2**32 - 1)

# Flags that describe generated sensors and make no sense with --replay.
_GENERATOR_FLAGS = ("sensors", "id_prefix", "rate", "count", "duration", "metrics")


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)


class _Stop:
    """Set by SIGINT/SIGTERM; remembers which, for the exit code."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self.event.is_set()

    def handle(self, signum: int, frame: Any) -> None:
        if self.event.is_set():  # a second Ctrl-C: stop now, without a report
            os.write(2, b"sensor-sim: interrupted twice; stopped without a report\n")
            os._exit(128 + signum)
        self.signum = signum
        self.event.set()


def _check_report_dir(path: str) -> None:
    """Exit 2 now if the report cannot be written later: a long run's report is not lost at its end."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise click.BadParameter(f"{parent} is not a directory", param_hint="--report")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise click.BadParameter(f"directory {parent} is not writable", param_hint="--report")


def _write_report(path: str, report: dict[str, Any]) -> None:
    # Write then rename, so a reader never sees half a report.
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise click.ClickException(f"cannot write report {path}: {exc.strerror}") from None


def _progress_printer(enabled: bool):
    if not enabled:
        return None

    def show(p: Progress) -> None:
        rate = p.sent / p.elapsed if p.elapsed > 0 else 0.0
        failed = f", {p.failed} failed" if p.failed else ""
        click.echo(f"sensor-sim: {p.elapsed:.0f} s, {p.sent} sent ({rate:.0f}/s){failed}", err=True)

    return show


def _unreached(report: dict[str, Any]) -> str:
    """The targets that took no datagram although sends were made and failed ('' if none)."""
    if not report["send_failures"]:
        return ""
    return ", ".join(label for label, n in report["targets"].items() if n == 0)


def _errors(report: dict[str, Any]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in report["send_errors"].items())


def _summary(report: dict[str, Any], asked: float | None = None) -> str:
    sensors = report["sensors"].values()
    generated = sum(s["generated"] for s in sensors)
    dropped = sum(len(s["dropped"]) for s in sensors)
    duplicated = sum(len(s["duplicated"]) for s in sensors)
    reordered = sum(s["reordered"] for s in sensors)
    elapsed = report["elapsed_s"]
    targets = len(report["targets"])
    parts = [f"sensor-sim: {report['datagrams_sent']} datagrams sent to {targets} target(s) in {elapsed:.2f} s"]
    # The pace is the schedule's: slots (generated datagrams, the ones injected loss dropped
    # included) per second between the first and the last, so loss does not read as a slow
    # sender; one slot has no pace.
    if generated > 1 and elapsed > 0:
        pace = (generated - 1) / elapsed * targets
        parts.append(f" (paced at {pace:.0f}/s{f' of {asked:.0f}/s asked' if asked else ''})")
    parts.append(f"; {len(report['sensors'])} sensors generated {generated}")
    if dropped or duplicated or reordered:
        parts.append(f"; injected: {dropped} dropped, {duplicated} duplicated, {reordered} reordered")
    if report["send_failures"]:
        errors = ", ".join(f"{k} x{v}" for k, v in report["send_errors"].items())
        parts.append(f"; {report['send_failures']} sendto failed ({errors})")
    refused = report["send_errors"].get("ECONNREFUSED")
    if refused:
        parts.append(
            f"; REFUSED {refused} time(s): nothing listened at {', '.join(report['targets'])} for part or"
            " all of the run (ICMP port unreachable), and datagrams sent just before a refusal went nowhere"
            " either"
        )
    parts.append(f"; seed {report['seed']}")
    if report["interrupted"]:
        parts.append("; interrupted")
    return "".join(parts)


HELP = f"""Simulate sensors sending wire-format-v1 datagrams over UDP.

Sensors are named PREFIX-0001, PREFIX-0002, ...  Each sends its metrics
(--metrics, a comma list of {", ".join(MODELS)}, or all; default
{",".join(DEFAULT_METRICS)}) at --rate Hz until --count datagrams each,
--duration seconds, or Ctrl-C.  With several --target, every target gets
every datagram and datagrams_sent counts each successful sendto.

Faults (--loss, --duplicate, --reorder) are drawn from --seed; --report FILE
writes the ground truth of what was actually sent.  Ctrl-C stops, writes the
report and exits 130.  With --key (or --keys) every datagram is signed
(HMAC-SHA-256-128, docs/PROTOCOL.md): in the example below, the second run
signs with one key for all sensors, the third with each sensor's own key from
a key file.  See docs/SIMULATOR.md.

Example:

\b
  sensor-sim --target 127.0.0.1:4739 --sensors 100 --rate 2 --duration 60 --loss 0.05 --report truth.json
  SENSOR_SIM_KEY=$(cat sim.key) sensor-sim --target 127.0.0.1:4739 --sensors 3 --count 10
  sensor-sim --target 127.0.0.1:4739 --sensors 3 --keys /etc/gateway-telemetry/keys --key-id '{{sensor}}@2026'
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name=PACKAGE, prog_name="sensor-sim")
@click.option(
    "--target",
    "targets",
    type=TargetType(),
    multiple=True,
    required=True,
    help="Where to send: HOST:PORT, [V6ADDR]:PORT or a multicast GROUP:PORT. Repeatable.",
)
@click.option(
    "--sensors", type=click.IntRange(1, 1_000_000), default=10, show_default=True, help="Number of simulated sensors."
)
@click.option("--id-prefix", default="sim", show_default=True, help="Sensor ids are PREFIX-0001...")
@click.option(
    "--rate",
    type=RateType(),
    default="1",
    show_default=True,
    help="Datagrams per second per sensor, or 'max' for as fast as possible.",
)
@click.option("--count", type=click.IntRange(1), help="Datagrams per sensor, then stop.")
@click.option("--duration", type=click.FloatRange(0, min_open=True), help="Seconds to run, then stop.")
@click.option("--seed", type=int, help="Seed for signals, faults and boot values (default: random, reported).")
@click.option(
    "--metrics",
    type=MetricsType(),
    default=",".join(DEFAULT_METRICS),
    show_default=True,
    help=f"Comma list of {', '.join(MODELS)}, or all.",
)
@click.option(
    "--boot/--no-boot",
    default=True,
    show_default=True,
    help="Send a boot value (from --seed if given, else the start time).",
)
@click.option("--boot-value", type=U32, help="Send this boot value instead of a derived one.")
@click.option(
    "--start-seq",
    type=U32,
    default=0,
    show_default=True,
    help="First seq of every sensor (e.g. 4294967290 to exercise wraparound).",
)
@click.option(
    "--multicast-interface",
    metavar="ADDR",
    help="Outgoing multicast interface: an IPv4 address, or for IPv6 a name or index.",
)
@click.option("--ttl", type=click.IntRange(0, 255), default=1, show_default=True, help="Multicast TTL / hop limit.")
@click.option("--loss", type=PROBABILITY, default=0.0, help="Probability a datagram is dropped.")
@click.option("--duplicate", type=PROBABILITY, default=0.0, help="Probability a datagram is sent twice.")
@click.option(
    "--reorder", type=PROBABILITY, default=0.0, help="Probability a datagram is held back behind 1-3 later ones."
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the ground-truth report (JSON) here.",
)
@click.option(
    "--replay",
    type=click.Path(dir_okay=False, exists=True),
    help="Send recorded readings (CSV or JSON lines: sensor, ts, metric, value).",
)
@click.option(
    "--speed",
    type=click.FloatRange(0, min_open=True),
    default=1.0,
    show_default=True,
    help="Replay time factor (10 = ten times faster).",
)
@click.option(
    "--key",
    "key_hex",
    envvar="SENSOR_SIM_KEY",
    metavar="HEX",
    help="Sign every datagram with this key (16-64 bytes in hex; also $SENSOR_SIM_KEY, "
    "which keeps it out of the process list).",
)
@click.option(
    "--keys",
    "keys_path",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Sign each sensor with its own key from this key file (the collector's format).",
)
@click.option(
    "--key-id",
    metavar="ID",
    help=f"Key id to sign with; {SENSOR_PLACEHOLDER} becomes each sensor's id.  [default: {SENSOR_PLACEHOLDER}]",
)
@click.option("-v", "--verbose", is_flag=True, help="Print a progress line every few seconds.")
@click.pass_context
def command(
    ctx: click.Context,
    targets,
    sensors,
    id_prefix,
    rate,
    count,
    duration,
    seed,
    metrics,
    boot,
    boot_value,
    start_seq,
    multicast_interface,
    ttl,
    loss,
    duplicate,
    reorder,
    report_path,
    replay,
    speed,
    key_hex,
    keys_path,
    key_id,
    verbose,
) -> None:
    if count is not None and duration is not None:
        raise click.UsageError("give --count or --duration, not both")
    signing = _signing(key_hex, keys_path, key_id)
    if replay is not None:
        clash = [f"--{n.replace('_', '-')}" for n in _GENERATOR_FLAGS if _given(ctx, n)]
        if clash:
            raise click.UsageError(f"--replay sends recorded readings; drop {', '.join(clash)}")
    else:
        if _given(ctx, "speed"):
            raise click.UsageError("--speed only applies to --replay")
        try:
            check_sensor_id(f"{id_prefix}-{sensors:04d}")  # the longest id
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--id-prefix") from None
    if report_path:
        _check_report_dir(report_path)
    faults = FaultRates(loss, duplicate, reorder)
    common = dict(
        targets=list(targets),
        seed=seed,
        boot=boot,
        boot_value=boot_value,
        start_seq=start_seq,
        ttl=ttl,
        multicast_interface=multicast_interface,
        faults=faults,
        signing=signing,
    )
    if replay is not None:
        try:
            groups = load(replay)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--replay") from None
    stop = _Stop()
    progress = _progress_printer(verbose or sys.stderr.isatty())
    previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if replay is not None:
            report = run_replay(ReplayConfig(groups=groups, speed=speed, **common), stop=stop, progress=progress)
        else:
            report = run(
                SimConfig(
                    sensors=sensors,
                    id_prefix=id_prefix,
                    rate=rate,
                    count=count,
                    duration=duration,
                    metrics=metrics,
                    **common,
                ),
                stop=stop,
                progress=progress,
            )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    except SetupError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if report_path:
        _write_report(report_path, report)
    asked = sensors * rate * len(targets) if rate and replay is None else None
    click.echo(_summary(report, asked), err=True)
    if stop.signum is not None:
        ctx.exit(128 + stop.signum)
    unreached = _unreached(report)
    if unreached:
        # Every sendto to these targets failed: a run that reached nothing must
        # not end like one that did (issue 13 item 11: ENETUNREACH, exit 0).
        raise click.ClickException(
            f"nothing reached {unreached}: every sendto failed ({_errors(report)}); check the route to the target"
        )


def _signing(key_hex: str | None, keys_path: str | None, key_id: str | None) -> Signing | None:
    """--key / --keys / --key-id -> Signing; errors name the flag, never the key."""
    if key_hex is not None and keys_path is not None:
        raise click.UsageError("give --key or --keys, not both")
    if key_hex is None and keys_path is None:
        if key_id is not None:
            raise click.UsageError("--key-id needs --key or --keys")
        return None
    try:
        if keys_path is not None:
            keys = load_keys(keys_path)
            return Signing(key_id or SENSOR_PLACEHOLDER, keys=keys)
        return Signing(key_id or SENSOR_PLACEHOLDER, key=parse_key(key_hex))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--keys" if keys_path else "--key") from None


def main() -> None:
    """Run the command; a usage error is one line (`Error: ...`, exit 2), as
    docs/SIMULATOR.md promises, without click's `Usage:` and `Try` lines."""
    try:
        code = command.main(prog_name="sensor-sim", standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
