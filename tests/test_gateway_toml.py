"""deploy/gateway.toml: every key it documents works, and every key the daemons know is in it.

Both daemons run for real (`--check` validates and prints the effective
table), so the example an operator copies cannot drift from the code.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from collector import cli as collector_cli
from collector.schema import open_writer
from collector.uplink import cli as uplink_cli
from query import certs
from query import cli as query_cli

from helpers import clean_env, run

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "gateway.toml"


def normalised(table: dict) -> dict:
    """Numbers as floats, so `60` in the file equals `60.0` printed back."""
    return {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in table.items()}


@pytest.fixture
def example(tmp_path) -> Path:
    """The example with its TLS paths pointed at real certificates made here."""
    tls = tmp_path / "tls"
    certs.make_ca(tls)
    certs.issue(tls, "server", "localhost", server=True, dns=("localhost",), days=1)
    keys = tmp_path / "keys"
    keys.write_text("# no signing sensor yet\n")
    keys.chmod(0o600)
    db = tmp_path / "telemetry.db"
    open_writer(str(db)).conn.close()  # serve --check opens the database, as a start does
    text = EXAMPLE.read_text().replace("/etc/gateway-telemetry/tls", str(tls))
    text = text.replace("/etc/gateway-telemetry/keys", str(keys))
    text = text.replace("/var/lib/gateway-telemetry/telemetry.db", str(db))
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


@pytest.fixture
def commands(bin_path):
    return {
        "collector": [bin_path("telemetry-collector")],
        "query": [bin_path("telemetry-query"), "serve"],
    }


@pytest.mark.parametrize(
    "table, settings", [("collector", collector_cli.SETTINGS), ("query", query_cli.SERVE_SETTINGS)]
)
def test_the_example_documents_every_key_the_daemon_knows(table, settings):
    documented = set(tomllib.loads(EXAMPLE.read_text())[table])
    assert documented == {s.key for s in settings}


@pytest.mark.parametrize("table", ["collector", "query"])
def test_every_documented_value_is_taken_as_written(table, example, commands):
    result = run([*commands[table], "--config", str(example), "--check"])
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)[table]
    assert normalised(effective) == normalised(tomllib.loads(example.read_text())[table])


def test_environment_beats_the_file_and_flags_beat_both(example, commands):
    env = {"TELEMETRY_COLLECTOR_FLUSH_INTERVAL": "3", "TELEMETRY_COLLECTOR_DB": "/tmp/from-env.db"}
    result = run([*commands["collector"], "--config", str(example), "--check", "--db", "/tmp/from-flag.db"], **env)
    effective = tomllib.loads(result.stdout)["collector"]
    assert effective["flush-interval"] == 3.0
    assert effective["db"] == "/tmp/from-flag.db"
    assert effective["batch-size"] == 20000  # from the file


def test_config_file_named_by_environment(example, commands):
    result = run([*commands["query"], "--check"], TELEMETRY_CONFIG=str(example))
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["query"]["listen"] == "[::]:4740"


@pytest.mark.parametrize("table", ["collector", "query"])
def test_an_unknown_key_is_one_line_naming_it(table, example, commands):
    text = example.read_text().replace(f"[{table}]\n", f"[{table}]\nflush-intervall = 2\n", 1)
    example.write_text(text)
    result = run([*commands[table], "--config", str(example), "--check"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"[{table}]: unknown key 'flush-intervall'" in result.stderr


def test_a_bad_value_is_one_line_naming_key_and_file(example, commands):
    example.write_text(example.read_text().replace("batch-size = 20000", 'batch-size = "lots"'))
    result = run([*commands["collector"], "--config", str(example), "--check"])
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"Error: {example} [collector]: bad value for 'batch-size': expected an integer, got 'lots'"
    )


def test_query_check_refuses_missing_certificates(tmp_path, commands):
    text = EXAMPLE.read_text().replace("/etc/gateway-telemetry/tls", str(tmp_path / "nowhere"))
    (tmp_path / "g.toml").write_text(text)
    result = run([*commands["query"], "--config", str(tmp_path / "g.toml"), "--check"])
    assert result.returncode == 2
    assert "no such file (check --cert/--key)" in result.stderr and result.stderr.count("\n") == 1


def test_collector_check_refuses_a_world_readable_key_file(example, commands):
    keys = example.parent / "keys"
    keys.chmod(0o644)
    result = run([*commands["collector"], "--config", str(example), "--check"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert str(keys) in result.stderr and "chmod" in result.stderr


@pytest.mark.parametrize(
    "command, settings, prefix",
    [
        (collector_cli.main, collector_cli.SETTINGS, "TELEMETRY_COLLECTOR_"),
        (query_cli.main.commands["serve"], query_cli.SERVE_SETTINGS, "TELEMETRY_QUERY_"),
        (uplink_cli.main.commands["run"], uplink_cli.UPLINK_SETTINGS, "TELEMETRY_UPLINK_"),
        (uplink_cli.main.commands["consume"], uplink_cli.CENTRAL_SETTINGS, "TELEMETRY_CENTRAL_"),
    ],
    ids=["collector", "serve", "uplink", "central"],
)
def test_flags_env_and_help_come_from_the_one_settings_table(command, settings, prefix):
    """Each setting is declared once: its flag, variable and help default cannot drift apart."""
    params = {p.name: p for p in command.params}
    for setting in settings:
        param = params[setting.name]
        assert param.opts[0] == f"--{setting.key}"
        assert param.envvar == prefix + setting.name.upper()
        assert param.help.startswith(setting.help) and setting.help
        shown = setting.shown_default()
        if shown is not None:
            assert param.help.endswith(f"[default: {shown}]")
    ours = {p.name for p in command.params} - {"config_path", "check", "verbose", "quiet", "version", "help"}
    assert ours == {s.name for s in settings}


# --- issue 13 item 5: not UTF-8 is one line naming the file (or variable) and the byte offset


@pytest.mark.parametrize("table", ["collector", "query"])
def test_a_config_file_that_is_not_utf8_is_one_line_exit_2(table, example, commands):
    raw = example.read_bytes()
    at = raw.index(b"# ")  # inside the first comment
    example.write_bytes(raw[:at] + b"\xe9" + raw[at:])
    line = raw.count(b"\n", 0, at) + 1
    result = run([*commands[table], "--config", str(example), "--check"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"Error: config file {example}: not UTF-8 text: byte 0xe9 at offset {at} (line {line})\n"


def test_an_environment_value_that_is_not_utf8_is_one_line_exit_2(tmp_path, commands):
    for table, name in (("collector", "TELEMETRY_COLLECTOR_DB"), ("query", "TELEMETRY_QUERY_DB")):
        env = clean_env(**{name: "/tmp/caf" + b"\xe9".decode("utf-8", "surrogateescape") + ".db"})
        result = subprocess.run(
            [*commands[table], "--check"], capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr == f"Error: environment variable {name}: not UTF-8 text: byte 0xe9 at offset 8\n"


def test_a_flag_value_that_is_not_utf8_is_one_line_exit_2(tmp_path, commands):
    result = subprocess.run(
        [*commands["collector"], "--db", b"t\xff.db".decode("utf-8", "surrogateescape"), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == "Error: option --db: not UTF-8 text: byte 0xff at offset 1\n"
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_key_file_that_is_not_utf8_names_the_offset(example, commands):
    keys = example.parent / "keys"
    keys.write_bytes(b"# sensors\ns1 = 00\xff\n")
    result = run([*commands["collector"], "--config", str(example), "--check"])
    assert result.returncode == 2
    assert result.stderr == f"Error: key file {keys}: not UTF-8 text: byte 0xff at offset 17 (line 2)\n"
