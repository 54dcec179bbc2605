"""telemetry-uplink's command line: the example config, --check, one-line errors, status."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from uplinkgw import GatewayDB

from collector.uplink import cli, source

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "gateway.toml"


def normalised(table: dict) -> dict:
    """Numbers as floats, so `60` in the file equals `60.0` printed back."""
    return {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in table.items()}


class Result:
    def __init__(self, r) -> None:
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


def uplink(args: list[str], **env: str) -> Result:
    """telemetry-uplink in-process (click's runner): the same code as the script, without a
    Python start-up per case; the environment holds no TELEMETRY_* but what is given."""
    import os

    from click.testing import CliRunner

    clean = {k: None for k in os.environ if k.startswith("TELEMETRY_")}
    clean.update(env)
    return Result(CliRunner().invoke(cli.main, args, env=clean))


def section(table: str) -> str:
    text = EXAMPLE.read_text()
    start = text.index(f"[{table}]\n")
    end = text.find("\n[", start + 1)
    return text[start:] if end < 0 else text[start:end]


@pytest.mark.parametrize("table, settings", [("uplink", cli.UPLINK_SETTINGS), ("central", cli.CENTRAL_SETTINGS)])
def test_the_example_documents_every_key(table, settings):
    keys = set(re.findall(r"^#? ?([a-z-]+) = ", section(table), re.M))
    assert keys == {s.key for s in settings}


@pytest.fixture
def example(tmp_path) -> Path:
    import trustme

    nats_dir = tmp_path / "nats"
    nats_dir.mkdir()
    trustme.CA().cert_pem.write_to_path(str(nats_dir / "ca.pem"))
    (nats_dir / "password").write_text("s3cret\n")
    (nats_dir / "password").chmod(0o600)
    path = tmp_path / "gateway.toml"
    path.write_text(
        EXAMPLE.read_text()
        .replace("/etc/gateway-telemetry/nats", str(nats_dir))
        .replace("/var/lib/gateway-telemetry", str(tmp_path))
    )
    return path


@pytest.mark.parametrize("command, table", [("run", "uplink"), ("consume", "central")])
def test_check_takes_every_documented_value_as_written(command, table, example):
    result = uplink([command, "--config", str(example), "--check"])
    assert result.returncode == 0, result.stderr
    effective = {k: v for k, v in tomllib.loads(result.stdout)[table].items()}
    assert normalised(effective) == normalised(tomllib.loads(example.read_text())[table])
    assert "s3cret" not in result.stdout + result.stderr


def test_environment_beats_the_file_and_flags_beat_both(example):
    result = uplink(
        ["run", "--config", str(example), "--check", "--window", "64"],
        TELEMETRY_UPLINK_GATEWAY="site-9",
        TELEMETRY_UPLINK_WINDOW="32",
    )
    effective = tomllib.loads(result.stdout)["uplink"]
    assert (effective["gateway"], effective["window"], effective["stream"]) == ("site-9", 64, "TELEMETRY")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gateway", "site.7"], "a gateway name is 1-32 of A-Z a-z 0-9 _ -"),
        (["--gateway", "g", "--servers", "http://x:1"], "write nats://HOST:PORT or tls://HOST:PORT"),
        (["--gateway", "g", "--replicas", "7"], "JetStream keeps 1 to 5 replicas"),
        (["--gateway", "g", "--password-file", "/nonexistent"], "password-file needs user"),
        (["--gateway", "g", "--user", "u", "--password-file", "/nonexistent/pw"], "password-file /nonexistent/pw"),
        (["--gateway", "g", "--token-file", "/x", "--user", "u"], "choose one way to authenticate"),
        (["--gateway", "g", "--cert", "/x.pem"], "cert and key go together"),
        (["--gateway", "g", "--scheduling", "fifo"], "'fifo': write one of other, batch, idle"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(args, message, bin_path, tmp_path):
    result = uplink(["run", "--db", str(tmp_path / "t.db"), "--check", *args])
    assert result.returncode == 2, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr


def test_a_password_file_others_can_read_is_refused(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o644)
    result = uplink(["run", "--gateway", "g", "--user", "u", "--password-file", str(pw), "--check"])
    assert result.returncode == 2 and f"chmod 0640 {pw}" in result.stderr and "s3cret" not in result.stderr


def test_an_unknown_key_in_uplink_is_named(example):
    example.write_text(example.read_text().replace("[uplink]\n", "[uplink]\nwindoww = 3\n", 1))
    result = uplink(["run", "--config", str(example), "--check"])
    assert result.returncode == 2
    assert "[uplink]: unknown key 'windoww' (did you mean 'window'?)" in result.stderr


@pytest.mark.parametrize("command", ["run", "consume", "status"])
def test_help_teaches_with_an_example(command):
    result = uplink([command, "--help"])
    assert result.returncode == 0 and "Example:" in result.stdout


def test_status_reports_position_pending_and_lag(tmp_path):
    gw = GatewayDB(str(tmp_path / "gw.db"))
    for _ in range(4):
        gw.flush()
    (tmp_path / "gw.db-uplink").write_text("1\n")
    result = uplink(["status", "--db", gw.path, "--format", "json"])
    assert result.returncode == 1  # no uplink runs
    out = json.loads(result.stdout)
    pending = gw.conn.execute("SELECT count(*), sum(readings) FROM ingest_log WHERE id > 1").fetchone()
    assert (out["position"], out["pending_entries"], out["pending_readings"]) == (1, 3, pending[1])
    assert out["running"] is False and out["lag_seconds"] is not None
    table = uplink(["status", "--db", gw.path])
    assert "NOT running" in table.stdout and f"{pending[1]} readings in 3 entries" in table.stdout


def test_status_refuses_a_damaged_position_in_one_line(tmp_path):
    gw = GatewayDB(str(tmp_path / "gw.db"))
    (tmp_path / "gw.db-uplink").write_text("garbage")
    result = uplink(["status", "--db", gw.path])
    assert result.returncode == 2 and "is damaged" in result.stderr and result.stderr.count("\n") == 1


def test_the_installed_script_runs(bin_path):
    import subprocess

    result = subprocess.run(
        [bin_path("telemetry-uplink"), "run", "--gateway", "g", "--check"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and 'gateway = "g"' in result.stdout


def test_an_unknown_environment_variable_is_named():
    result = uplink(["run", "--gateway", "g", "--check"], TELEMETRY_UPLINK_WINDOWW="3")
    assert result.returncode == 2
    assert (
        "unknown environment variable TELEMETRY_UPLINK_WINDOWW (did you mean TELEMETRY_UPLINK_WINDOW?)" in result.stderr
    )


def _flip(seed: str) -> str:
    """One base32 character changed in the middle: the CRC no longer matches."""
    i = len(seed) // 2
    return seed[:i] + ("A" if seed[i] != "A" else "B") + seed[i + 1 :]


@pytest.mark.parametrize(
    "flag, content, message",
    [
        ("--nkey-seed-file", lambda u, a: "not-a-seed\n", "not an NKey user seed"),
        ("--nkey-seed-file", lambda u, a: a.seed + "\n", "not an NKey user seed"),  # an account's, not a user's
        ("--nkey-seed-file", lambda u, a: _flip(u.seed) + "\n", "not an NKey user seed"),
        ("--creds-file", lambda u, a: u.seed + "\n", "no user JWT"),
        ("--creds-file", lambda u, a: "-----BEGIN NATS USER JWT-----\na.b.c\n---\n", "no NKey user seed"),
        (
            "--creds-file",
            lambda u, a: (
                f"-----BEGIN NATS USER JWT-----\na.b.c\n---\n-----BEGIN USER NKEY SEED-----\n{_flip(u.seed)}\n"
            ),
            "no NKey user seed",
        ),
    ],
)
@pytest.mark.parametrize("command", ["run", "consume"])
def test_a_malformed_nkey_seed_or_creds_file_is_one_line_and_exit_2(command, flag, content, message, tmp_path):
    """Checked at start and by --check: nats-py would otherwise fail (or loop) on every connect."""
    import nkeys
    from natsauth import identity

    user, account = identity(), identity(nkeys.PREFIX_BYTE_ACCOUNT)
    path = tmp_path / "secret"
    path.write_text(content(user, account))
    path.chmod(0o600)
    args = [command, "--db", str(tmp_path / "t.db"), flag, str(path), "--check"]
    result = uplink(args + (["--gateway", "g"] if command == "run" else []))
    assert result.returncode == 2, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"{flag[2:]} {path}: {message}" in errors[0], result.stderr
    assert user.seed not in result.stderr and account.seed not in result.stderr


@pytest.mark.parametrize("command", ["run", "consume"])
def test_a_good_nkey_seed_file_and_creds_file_pass_check(command, tmp_path):
    from natsauth import Operator

    creds, user = Operator.make().creds("site-1")
    for flag, text in (("--nkey-seed-file", user.seed + "\n"), ("--creds-file", creds)):
        path = tmp_path / flag[2:]
        path.write_text(text)
        path.chmod(0o600)
        args = [command, "--db", str(tmp_path / "t.db"), flag, str(path), "--check"]
        result = uplink(args + (["--gateway", "g"] if command == "run" else []))
        assert result.returncode == 0, result.stderr
        assert user.seed not in result.stdout + result.stderr


def test_central_status_of_a_database_with_nothing_set_aside_exits_0_and_of_a_gateway_2(tmp_path):
    """telemetry-uplink status --central (set-aside messages: tests/test_uplink_robust.py)."""
    from collector.uplink.central import Central

    path = str(tmp_path / "central.db")
    Central(path).close()
    result = uplink(["status", "--central", "--db", path])
    assert result.returncode == 0, result.stderr
    assert "set aside   0" in result.stdout.splitlines() and "ATTENTION" not in result.stdout
    out = json.loads(uplink(["status", "--central", "--db", path, "--format", "json"]).stdout)
    assert out["counters"]["uplink_quarantined"] == 0 and out["set_aside"] == [] and out["last_write"] is None
    gw = GatewayDB(str(tmp_path / "gw.db"))
    result = uplink(["status", "--central", "--db", gw.path])
    assert result.returncode == 2 and "not a central database" in result.stderr and result.stderr.count("\n") == 1


def test_a_central_database_is_not_uplinked_onward_one_line_exit_2(tmp_path, bin_path):
    """A central database (`consume` writes it) given to `run`: its log rows hold several
    gateways' blocks (body version 2), which no consumer takes as payload (bad_shape, every
    message of it refused at the higher tier while this uplink saw its acks), so `run` refuses
    it before it starts, in one line, and leaves no position file (that would make the central
    database keep its ingest log for an uplink that never acks)."""
    import subprocess

    from collector.uplink.central import Central

    path = str(tmp_path / "central.db")
    Central(path).close()
    result = uplink(["run", "--db", path, "--gateway", "hq", "--check"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0] == f"Error: {source.central_refusal(path)}"
    proc = subprocess.run(
        [bin_path("telemetry-uplink"), "run", "--db", path, "--gateway", "hq", "--servers", "nats://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"Error: {source.central_refusal(path)}"]
    assert not (tmp_path / "central.db-uplink").exists()
    gw = GatewayDB(str(tmp_path / "gw.db"))  # a gateway's database passes
    assert uplink(["run", "--db", gw.path, "--gateway", "hq", "--check"]).returncode == 0
