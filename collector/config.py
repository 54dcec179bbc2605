"""Settings from flags, environment, a TOML file and defaults, in that order.

Both daemons read one file (`gateway.toml`, tables `[collector]` and `[query]`).
Precedence is flags > environment > file > defaults, as operators expect from
collectd or Telegraf.  Click already resolves flags and environment variables
(and tells us which one a value came from), so this module only adds the file
layer underneath and validates it: an unknown key, or a value of the wrong
type, is a ConfigError naming the file, the table and the key.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import click
from click.core import ParameterSource

from .errors import ConfigError

# A config file is a page of settings; a bigger one is a wrong path (a
# database, a log), and reading it whole would only cost memory.
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class Setting:
    """One key of a config table, declared once: its flag, environment
    variable, TOML key, default, parser and help all come from here.

    `parse` turns a file value into the internal value or raises
    ValueError/TypeError with a message; `flag_parse` (default: `parse`) does
    the same for the text of a flag or an environment variable.  A setting
    whose parser is `boolean` becomes an on/off flag pair.
    """

    name: str
    parse: Callable[[Any], Any]
    default: Any = None
    multiple: bool = False  # a list in the file, a repeatable flag
    help: str = ""
    metavar: str | None = None
    flag_parse: Callable[[Any], Any] | None = None
    default_text: str | None = None  # how --help shows the default, when the value alone says too little

    @property
    def key(self) -> str:
        """The TOML key: the parameter name with dashes (flush-interval)."""
        return self.name.replace("_", "-")

    def envvar(self, prefix: str) -> str:
        return prefix + self.name.upper()

    def shown_default(self) -> str | None:
        if self.default_text is not None:
            return self.default_text
        if self.default is None or self.default == ():
            return None
        if self.default is False or self.default is True:
            return "on" if self.default else "off"
        if self.multiple:
            return ", ".join(_toml_value(v).strip('"') for v in self.default)
        text = _toml_value(self.default)
        return text[1:-1] if text.startswith('"') else text

    def option(self, env_prefix: str) -> Callable:
        """The click option for this setting (no default of its own: merge() fills it in)."""
        shown = self.shown_default()
        help_text = self.help + (f"  [default: {shown}]" if shown else "")
        if self.parse is boolean:
            return click.option(
                f"--{self.key}/--no-{self.key}", self.name, default=None, envvar=self.envvar(env_prefix), help=help_text
            )
        metavar = self.metavar or self.key.upper()
        return click.option(
            f"--{self.key}",
            self.name,
            multiple=self.multiple,
            envvar=self.envvar(env_prefix),
            metavar=metavar,
            type=ParsedParam(metavar, self.flag_parse or self.parse),
            help=help_text,
        )


def daemon_options(table: str, check_help: str) -> Callable:
    """The options every daemon takes besides its settings: --config, --check, -v and -q."""

    def decorate(func: Callable) -> Callable:
        func = click.option("-q", "--quiet", count=True, help="Less log output: warnings and errors only.")(func)
        func = click.option("-v", "--verbose", count=True, help="More log output (repeatable).")(func)
        func = click.option("--check", is_flag=True, help=check_help)(func)
        return click.option(
            "--config",
            "config_path",
            envvar="TELEMETRY_CONFIG",
            metavar="FILE.toml",
            type=click.Path(dir_okay=False),
            help=f"TOML file whose [{table}] table holds the same names (flags and env win).",
        )(func)

    return decorate


def setup_logging(verbose: int, quiet: int) -> None:
    """stderr (the journal under systemd), INFO by default, one step per -v / -q."""
    level = logging.INFO + 10 * (quiet - verbose)
    logging.basicConfig(
        level=max(logging.DEBUG, min(level, logging.ERROR)),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
    )


def options(settings: Sequence[Setting], env_prefix: str) -> Callable:
    """Decorate a click command with one option per setting, in table order."""

    def decorate(func: Callable) -> Callable:
        for setting in reversed(settings):
            func = setting.option(env_prefix)(func)
        return func

    return decorate


def decode_utf8(raw: bytes, what: str) -> str:
    """`raw` as UTF-8 text, or a ConfigError naming `what`, the byte offset and its line.

    Validated before anything parses it (a UnicodeDecodeError traceback
    helped no operator, issue 13 item 5).
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{what}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line})"
        ) from None


def undecodable(value: str) -> int | None:
    """The byte offset of the first byte that was not UTF-8 in a value from
    argv or the environment (Python keeps such bytes as lone surrogates,
    PEP 383), or None when the value is clean."""
    for i, ch in enumerate(value):
        if "\udc80" <= ch <= "\udcff":
            return len(value[:i].encode("utf-8", "surrogateescape"))
    return None


def read_table(path: str | None, table: str) -> dict[str, Any]:
    """Return the `[table]` of a TOML file ({} when no file is given)."""
    if path is None:
        return {}
    try:
        # O_NONBLOCK: a FIFO in place of the file must not hang a start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"config file {path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: over {MAX_CONFIG_BYTES} bytes (is it the right file?)")
    try:
        doc = tomllib.loads(decode_utf8(raw, f"config file {path}"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    value = doc.get(table, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{table}] must be a table")
    return value


def _from_file(setting: Setting, raw: Any, where: str) -> Any:
    try:
        if setting.multiple:
            if not isinstance(raw, list):
                raw = [raw]
            return tuple(setting.parse(item) for item in raw)
        return setting.parse(raw)
    except (ValueError, TypeError, click.BadParameter) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        raise ConfigError(f"{where}: bad value for {setting.key!r}: {message}") from None


def merge(
    ctx: click.Context,
    settings: Sequence[Setting],
    file_values: dict[str, Any],
    where: str,
    env_prefix: str | None = None,
) -> dict[str, Any]:
    """Combine click's values (flags, env) with the file's and the defaults.

    Returns {setting.name: value}.  A key in the file that no setting knows is
    an error, so a typo never silently falls back to a default; so is an
    environment variable starting with `env_prefix` that no option reads.
    """
    if env_prefix is not None:
        check_environment(ctx, env_prefix)
    known = {s.key: s for s in settings}
    for key in file_values:
        if key not in known:
            near = _nearest(key, known)
            hint = f" (did you mean {near!r}?)" if near else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    result: dict[str, Any] = {}
    for setting in settings:
        source = ctx.get_parameter_source(setting.name)
        value = ctx.params.get(setting.name)
        given = source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
        if given:
            _check_utf8(ctx, setting, value, source)
        if setting.multiple and given and not value:
            given = False
        if given:
            result[setting.name] = value
        elif setting.key in file_values:
            result[setting.name] = _from_file(setting, file_values[setting.key], where)
        else:
            result[setting.name] = setting.default
    return result


def check_environment(ctx: click.Context, prefix: str, environ: dict[str, str] | None = None) -> None:
    """A variable named like ours (`prefix`...) that no option of this command reads is a
    ConfigError naming it and the nearest one, as an unknown TOML key is."""
    environ = os.environ if environ is None else environ
    known = {p.envvar for p in ctx.command.params if isinstance(p.envvar, str)}
    for name in sorted(environ):
        if name.startswith(prefix) and name not in known:
            near = _nearest(name, [k for k in known if k.startswith(prefix)])
            hint = f" (did you mean {near}?)" if near else f"; the variables are {prefix}<OPTION NAME IN CAPITALS>"
            raise ConfigError(f"unknown environment variable {name}{hint}")


def from_environment(ctx: click.Context | None, param: click.Parameter | None) -> str | None:
    """The environment variable a parameter's value came from, or None (a flag, a default)."""
    if ctx is None or param is None or param.name is None:
        return None
    if ctx.get_parameter_source(param.name) is not ParameterSource.ENVIRONMENT:
        return None
    envvar = param.envvar
    if isinstance(envvar, (list, tuple)):
        envvar = next((e for e in envvar if e in os.environ), envvar[0] if envvar else None)
    return envvar


def blame(message: str, param: click.Parameter | None, ctx: click.Context | None) -> click.BadParameter:
    """A bad value's error, naming the environment variable when that is where it came from."""
    envvar = from_environment(ctx, param)
    if envvar is None:
        return click.BadParameter(message, ctx=ctx, param=param)
    return click.BadParameter(message, ctx=ctx, param=param, param_hint=f"{envvar} in the environment")


class Choice(click.Choice):
    """click.Choice whose error names the environment variable when the value came from one."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as exc:
            raise blame(exc.message, param, ctx) from None


def _check_utf8(ctx: click.Context, setting: Setting, value: Any, source: ParameterSource) -> None:
    """A flag or environment value that is not UTF-8 is refused like a file that
    is not: the file layer cannot hold it, and the query server could not open
    a database path made of it."""
    for item in value if isinstance(value, (tuple, list)) else (value,):
        offset = undecodable(item) if isinstance(item, str) else None
        if offset is None:
            continue
        param = next((p for p in ctx.command.params if p.name == setting.name), None)
        if source is ParameterSource.ENVIRONMENT and param is not None and param.envvar:
            where = f"environment variable {param.envvar}"
        else:
            where = f"option --{setting.key}"
        raw = item.encode("utf-8", "surrogateescape")
        raise ConfigError(f"{where}: not UTF-8 text: byte 0x{raw[offset]:02x} at offset {offset}")


def _nearest(key: str, known: Iterable[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(key, list(known), n=1)
    return found[0] if found else None


class SetupFailed(click.ClickException):
    """An error an operator can act on: one line, exit code 2 (like a usage error)."""

    exit_code = 2


class ParsedParam(click.ParamType):
    """A click type around one of the parsers below, so flags and file values parse alike."""

    def __init__(self, name: str, parse: Callable[[Any], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except (ValueError, TypeError, ConfigError) as exc:
            raise blame(str(exc), param, ctx) from None


# Parsers shared by both daemons' settings.


def positive_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if not number > 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return number


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"expected an integer, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return number


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def host_port(default_port: int) -> Callable[[Any], tuple[str, int]]:
    """Parser of a listening address (both daemons' `listen`, flags and TOML alike): HOST:PORT,
    [V6ADDR]:PORT, :PORT, HOST (the default port) or a bare PORT (all IPv4 addresses)."""

    def parse(value: Any) -> tuple[str, int]:
        return parse_host_port(string(value), default_port, listen=True)

    return parse


def parse_host_port(text: str, default_port: int | None = None, *, listen: bool = False) -> tuple[str, int]:
    """Split 'host:port', '[v6]:port', ':port' or 'host' into (host, port).

    A bare number is a port: for an address to `listen` on it means every
    IPv4 address (as ':PORT' does); for an address to reach it is refused,
    since a host is needed.  Raises ValueError with a message a person can
    act on.
    """
    text = text.strip()
    if text.isdigit():
        if not listen:
            raise ValueError(f"{text!r} is a port alone: give the host too, e.g. localhost:{text}")
        text = ":" + text
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after an IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: {_bracket_hint(text, default_port)}")
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r}: a port is required (HOST:PORT)")
        port = default_port
    else:
        if not port_text.isdigit():
            raise ValueError(f"{text!r}: port {port_text!r} is not a number")
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} is out of range 0-65535")
    return host or "0.0.0.0", port


def _bracket_hint(text: str, default_port: int | None) -> str:
    """What to write instead of an IPv6 address without brackets ('::1:4740' is ambiguous)."""
    import ipaddress

    def address(value: str) -> bool:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return False
        return True

    head, _, tail = text.rpartition(":")
    split = address(head) and tail.isdigit()
    alone = f"[{text}]:{default_port or 'PORT'}"
    if split and address(text):
        return f"an IPv6 address needs brackets: write [{head}]:{tail} (port {tail}) or {alone}"
    if split:
        return f"an IPv6 address needs brackets: write [{head}]:{tail}"
    if address(text):
        return f"an IPv6 address needs brackets: write {alone}"
    return f"write an IPv6 address in brackets, e.g. [::1]:{default_port or 4739}"


def metrics_address(value: Any) -> tuple[str, int]:
    """--metrics HOST:PORT: both parts required (the Prometheus exporter has no
    authentication, so it binds only the address named)."""
    text = string(value).strip()
    if text.isdigit():
        raise ValueError(
            f"{text!r}: give the address too, e.g. 127.0.0.1:{text} (loopback) or "
            f"0.0.0.0:{text} (every address; the metrics have no authentication)"
        )
    return parse_host_port(text)


def format_host_port(host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port is None else f"{host}:{port}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and (value[1] is None or isinstance(value[1], int))
    ):
        return json.dumps(format_host_port(*value))  # an address or a multicast group
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def render(table: str, settings: Sequence[Setting], values: dict[str, Any]) -> str:
    """The effective settings as a TOML table (what --check prints): the file an
    operator would write to get exactly this configuration."""
    lines = [f"[{table}]"]
    for setting in settings:
        value = values[setting.name]
        if value is None:
            lines.append(f"# {setting.key} is not set")
        else:
            lines.append(f"{setting.key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
