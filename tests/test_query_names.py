"""A name the server does not know is exit 1 with a suggestion, not an empty table; a reversed range is refused."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from query.cli import main
from query.commands import unknown_name

import query_fixtures as fx


@pytest.fixture(scope="module")
def env(known_db, tls):
    with fx.live_server(known_db, tls, mtls=False) as live:
        yield live["env"]


def run(args, env, code):
    """The error line; exit 1 is that one line, exit 2 is click's usage text ending with it."""
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert (len(lines) == 1 or code == 2) and "Traceback" not in result.output, result.stderr
    return lines[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["latest", "s3"], "no sensor named 's3'; did you mean s1, s2 or s9?"),
        (["readings", "boiler"], "no sensor named 'boiler'; the sensors are s1, s2, s9, x'; DROP TABLE readings;--"),
        (["gaps", "S1"], "no sensor named 'S1'; did you mean s1?"),
        (["sensors", "s22"], "no sensor named 's22'; did you mean s2?"),
        (
            ["aggregate", "s1", "--metric", "humidity", "--bucket", "1m"],
            "no metric named 'humidity' for sensor s1; did you mean hum?",
        ),
        (["readings", "s2", "--metric", "hum"], "no metric named 'hum' for sensor s2; the metrics are temp"),
        (["latest", "--metric", "volts"], "no metric named 'volts'; the metrics are hum, m, temp"),
    ],
)
def test_unknown_names_are_exit_1_with_what_there_is(env, args, message):
    assert run(args, env, 1) == f"Error: {message}"


def test_known_names_with_nothing_in_range_are_still_an_empty_answer(env):
    # s9 is known but sent no readings; s1 temp has none before 1970: empty, exit 0.
    for args in (
        ["latest", "s9"],
        ["readings", "s9"],
        ["gaps", "s2", "--since", "1000"],
        ["aggregate", "s1", "--metric", "temp", "--bucket", "1m", "--since", "0", "--until", "60"],
    ):
        result = CliRunner().invoke(main, ["--format", "json", *args], env=env)
        assert (result.exit_code, result.stdout.strip()) in ((0, "[]"), (0, '{\n "rows": [],\n "next": null\n}')), (
            args,
            result.stdout,
            result.stderr,
        )


@pytest.mark.parametrize(
    "command", [["readings", "s1"], ["gaps"], ["aggregate", "s1", "--metric", "temp", "--bucket", "1m"], ["export"]]
)
def test_a_reversed_or_empty_range_is_refused_before_asking(command):
    # No server at all: the refusal comes first (exit 2, not 3).
    env = {"TELEMETRY_SERVER": "localhost:9"}
    line = run([*command, "--since", "2026-11-25T12:00:00Z", "--until", "2026-11-25T11:00:00Z"], env, 2)
    assert "--since (2026-11-25T12:00:00Z) must be before --until (2026-11-25T11:00:00Z)" in line
    line = run([*command, "--since", "1700000000", "--until", "1700000000"], env, 2)
    assert "must be before --until" in line


def test_unknown_name_message():
    assert unknown_name("sensor", "x", []) == "no sensor named 'x'; the server knows no sensors yet"
    many = [f"node-{i:03d}" for i in range(40)]
    assert unknown_name("sensor", "zzz", many) == "no sensor named 'zzz'; `telemetry-query sensors` lists them"
    assert unknown_name("sensor", "node-0070", many).startswith("no sensor named 'node-0070'; did you mean ")
