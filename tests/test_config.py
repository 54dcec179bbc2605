"""The settings layer: flags > environment > file > defaults, unknown keys refused."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from collector import config
from collector.errors import ConfigError

SETTINGS = [
    config.Setting("flush_interval", config.positive_float, 1.0),
    config.Setting("listen", config.host_port(4739), (("0.0.0.0", 4739),), multiple=True),
    config.Setting("db", config.string, "telemetry.db"),
]


@click.command()
@click.option("--config", "config_path")
@click.option("--flush-interval", type=float, envvar="T_FLUSH")
@click.option("--listen", multiple=True)
@click.option("--db")
@click.pass_context
def show(ctx, config_path, **_):
    try:
        values = config.merge(ctx, SETTINGS, config.read_table(config_path, "collector"), "[collector]")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(repr(values))


def run(args, env=None):
    return CliRunner().invoke(show, args, env=env or {}, catch_exceptions=False)


def test_defaults_apply_without_file_or_flags():
    result = run([])
    assert result.exit_code == 0
    assert eval(result.output) == {"flush_interval": 1.0, "listen": (("0.0.0.0", 4739),), "db": "telemetry.db"}


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[collector]\nflush-interval = 3\ndb = "/data/t.db"\nlisten = ["[::1]:9000", ":9001"]\n')
    from_file = eval(run(["--config", str(cfg)]).output)
    assert from_file == {"flush_interval": 3.0, "listen": (("::1", 9000), ("0.0.0.0", 9001)), "db": "/data/t.db"}
    from_env = eval(run(["--config", str(cfg)], env={"T_FLUSH": "4"}).output)
    assert from_env["flush_interval"] == 4.0
    from_flag = eval(run(["--config", str(cfg), "--flush-interval", "5"], env={"T_FLUSH": "4"}).output)
    assert from_flag["flush_interval"] == 5.0
    assert from_flag["db"] == "/data/t.db"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[collector]\nflush-intervall = 3\n")
    result = run(["--config", str(cfg)])
    assert result.exit_code == 1
    assert "unknown key 'flush-intervall' (did you mean 'flush-interval'?)" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "body, message",
    [
        ("[collector]\nflush-interval = -1\n", "bad value for 'flush-interval': must be > 0"),
        ('[collector]\nflush-interval = "soon"\n', "bad value for 'flush-interval'"),
        ('[collector]\nlisten = ["[::1:9000"]\n', "missing ']'"),
        ("[collector\n", "not valid TOML"),
        ("collector = 3\n", "[collector] must be a table"),
    ],
)
def test_bad_files_give_one_line(tmp_path, body, message):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(body)
    result = run(["--config", str(cfg)])
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_file_is_one_line(tmp_path):
    result = run(["--config", str(tmp_path / "nope.toml")])
    assert result.output.strip() == f"Error: config file {tmp_path / 'nope.toml'} does not exist"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        ("[::1]:5000", ("::1", 5000)),
        (":5000", ("0.0.0.0", 5000)),
        ("gateway.local", ("gateway.local", 4739)),
        ("[ff02::1]", ("ff02::1", 4739)),
    ],
)
def test_parse_host_port(text, expected):
    assert config.parse_host_port(text, 4739) == expected


@pytest.mark.parametrize("text", ["::1:5000", "host:http", "host:70000", "[::1]x"])
def test_parse_host_port_rejects(text):
    with pytest.raises(ValueError):
        config.parse_host_port(text, 4739)


# --- issue 13 item 5: decoded only after it is validated ---------------------------------


@pytest.mark.parametrize(
    "raw, offset, line",
    [
        (b'[collector]\ndb = "caf\xe9.db"\n', 21, 2),
        (b"\xff", 0, 1),
        (b"\xef\xbb", 0, 1),  # a truncated sequence
        (b"# \xc3\xa9 ok\n\n\x80", 9, 3),  # valid two-byte character before the bad byte
    ],
)
def test_a_file_that_is_not_utf8_names_the_byte_offset_and_line(tmp_path, raw, offset, line):
    cfg = tmp_path / "gateway.toml"
    cfg.write_bytes(raw)
    with pytest.raises(ConfigError) as info:
        config.read_table(str(cfg), "collector")
    assert str(info.value) == (
        f"config file {cfg}: not UTF-8 text: byte 0x{raw[offset]:02x} at offset {offset} (line {line})"
    )


def test_a_fifo_or_directory_as_config_file_is_refused_without_hanging(tmp_path):
    import os

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        with pytest.raises(ConfigError, match="not a regular file"):
            config.read_table(str(path), "collector")


def test_an_oversized_config_file_is_refused(tmp_path):
    cfg = tmp_path / "big.toml"
    cfg.write_bytes(b"#" * (config.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="over 1048576 bytes"):
        config.read_table(str(cfg), "collector")


def test_undecodable_offsets_count_bytes_not_characters():
    assert config.undecodable("plain") is None
    assert config.undecodable("é\udce9") == 2
    assert config.undecodable(b"caf\xe9".decode("utf-8", "surrogateescape")) == 3
