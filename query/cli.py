"""telemetry-query: one click group; the rooms it is built from.

  times.py     parse_time / parse_duration / human_time (pure)
  output.py    table, JSON and CSV rendering (pure)
  commands.py  the client commands and their connection settings
  serve.py     `serve`, the query server's edge

Exit codes: 0 ok, 1 the server answered with an error, 2 usage (bad flag,
bad config, unreadable files), 3 cannot connect or TLS failed.
"""

from __future__ import annotations

import os

import click

from collector import PACKAGE

from .commands import COMMANDS, SETTINGS_KEY, check_client_environment, connection_options
from .interrupt import interruptible
from .output import render
from .serve import SERVE_SETTINGS, build_server, serve, tls_context
from .times import human_time, parse_duration, parse_time

__all__ = [
    "main",
    "render",
    "build_server",
    "tls_context",
    "SERVE_SETTINGS",
    "human_time",
    "parse_duration",
    "parse_time",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@connection_options(envvars=True)
@click.version_option(package_name=PACKAGE, prog_name="telemetry-query")
@click.pass_context
def main(ctx: click.Context, server, ca, cert, key, fmt, times) -> None:
    """Query a gateway's telemetry over TLS (and `serve` runs the query server).

    Exit codes: 0 ok, 1 the server answered with an error, 2 usage,
    3 cannot connect or TLS failed.

    \b
    Example:
      telemetry-query --server gw1.example.org:4740 --ca ca.pem latest
    """
    interruptible()  # Ctrl-C stops follow, plot --watch and a slow answer, however we were started
    check_client_environment(dict(os.environ))
    ctx.meta[SETTINGS_KEY] = {"server": server, "ca": ca, "cert": cert, "key": key, "fmt": fmt, "times": times}


for _command in COMMANDS:
    main.add_command(_command)
main.add_command(serve)
