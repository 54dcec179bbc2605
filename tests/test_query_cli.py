"""telemetry-query: every command against a live TLS server, formats, exit codes, help, serve."""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import threading

import click
import pytest
from click.testing import CliRunner

from collector.schema import REJECT_REASONS
from query.cli import build_server, main
from query.client import QueryClient

import query_fixtures as fx
from processes import QueryServerProcess
from query_fixtures import GAPS, SENSORS, T0, expected_rows


@pytest.fixture(scope="module")
def live(known_db, tls):
    """One mutual-TLS server for the module; yields the client environment."""
    with fx.live_server(known_db, tls) as live:
        yield live


cli = fx.run_cli


def one_line_error(result, *words):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def test_ping_in_every_format(live):
    env = live["env"]
    assert cli(["ping"], env).stdout.splitlines() == ["key       value", "version   0.1.0", "protocol  1"]
    assert json.loads(cli(["--format", "json", "ping"], env).stdout) == {"version": "0.1.0", "protocol": 1}
    assert cli(["ping", "--format", "csv"], env).stdout == "key,value\nversion,0.1.0\nprotocol,1\n"
    assert cli(["ping"], {**env, "TELEMETRY_FORMAT": "csv"}).stdout.startswith("key,value\n")
    # An option after the command wins over the environment and the group option.
    assert cli(["--format", "table", "ping", "--format", "csv"], {**env, "TELEMETRY_FORMAT": "json"}).stdout.startswith(
        "key,value\n"
    )


def test_sensors(live):
    env = live["env"]
    rows = list(csv.DictReader(io.StringIO(cli(["--format", "csv", "sensors"], env).stdout)))
    assert [(r["sensor"], int(r["datagrams"]), int(r["lost"]), float(r["first_seen"])) for r in rows] == [
        (s[0], s[3], s[5], s[1]) for s in sorted(SENSORS)
    ]
    assert rows[0]["metrics"] == "hum,temp"
    assert (
        rows[0]["interval"],
        rows[0]["stale"],
        rows[0]["stale_after"],
        rows[0]["clock_offset"],
        rows[0]["clock_skewed"],
    ) == ("10.0", "True", "30.0", "0.25", "False")
    table = cli(["sensors", "s1"], env).stdout.splitlines()
    assert table[0].split() == [
        "sensor",
        "first_seen",
        "last_seen",
        "datagrams",
        "readings",
        "lost",
        "duplicates",
        "reordered",
        "restarts",
        "interval",
        "stale",
        "clock_offset",
        "metrics",
        "last",
        "hour",
    ]
    # Its readings are from 2023: nothing in the last hour's twelve 5-minute buckets.
    assert table[1].split() == [
        "s1",
        "2023-11-14T22:13:15Z",
        "2023-11-14T23:03:20.250Z",
        "320",
        "350",
        "7",
        "2",
        "1",
        "1",
        "10",
        "yes",
        "+0.250",
        "hum,temp",
        "············",
    ]
    assert cli(["sensors", "s1", "--no-activity"], env).stdout.splitlines()[0].split()[-1] == "metrics"
    # --stale lists the sensors past their rule (both learned ones are, long ago); s2's clock is flagged.
    stale = cli(["sensors", "--stale", "--no-activity"], env).stdout.splitlines()
    assert [line.split()[0] for line in stale[1:]] == ["s1", "s2"]
    assert "-5.500 !" in stale[2]
    one_line_error(cli(["--format", "json", "sensors", "nope"], env, code=1), "no sensor named 'nope'")


def test_latest(live):
    env = live["env"]
    result = json.loads(cli(["--format", "json", "latest", "s1", "--metric", "temp"], env).stdout)
    assert result == [
        {"sensor": "s1", "metric": "temp", "ts": T0 + 990.0, "value": ((299 * 37) % 101) / 4 - 10, "seq": 299}
    ]
    table = cli(["latest"], env).stdout.splitlines()
    assert len(table) == 5
    # Aligned: every row starts its columns where the header does.
    starts = [m.start() for m in re.finditer(r"\S+", table[0])]
    assert table[2][: starts[2]].split() == ["s1", "temp"]
    assert table[2][starts[2] :].split()[0] == "2023-11-14T22:29:50Z"


def test_readings_pages_all_and_formats(live):
    env = live["env"]
    one_page = cli(["--format", "csv", "readings", "s1", "--metric", "temp", "--limit", "100"], env)
    assert len(one_page.stdout.splitlines()) == 101
    assert "--all" in one_page.stderr and "--cursor" in one_page.stderr
    cursor = one_page.stderr.split("--cursor ")[1].strip()
    rest = cli(["--format", "json", "readings", "s1", "--metric", "temp", "--limit", "1000", "--cursor", cursor], env)
    assert json.loads(rest.stdout) == {"rows": expected_rows("s1", "temp")[100:], "next": None}

    walked = cli(["--format", "json", "readings", "s1", "--limit", "7", "--all"], env)
    assert json.loads(walked.stdout)["rows"] == expected_rows("s1", "hum") + expected_rows("s1", "temp")
    assert walked.stderr == ""

    desc = cli(
        [
            "--format",
            "csv",
            "readings",
            "s1",
            "--metric",
            "hum",
            "--desc",
            "--since",
            str(T0 + 600),
            "--until",
            "2023-11-14T22:33:20Z",
        ],
        env,
    )
    seqs = [int(r["seq"]) for r in csv.DictReader(io.StringIO(desc.stdout))]
    assert seqs == list(range(19, 9, -1))  # ts T0+600.5 .. T0+1140.5, newest first

    table = cli(["readings", "s1", "--metric", "hum", "--limit", "2"], env).stdout.splitlines()
    assert table[1].split() == ["s1", "hum", "2023-11-14T22:13:20.500Z", "0", "0", "3"]  # a whole number, no .0


def test_aggregate_gaps_stats(live):
    env = live["env"]
    agg = json.loads(cli(["--format", "json", "aggregate", "s2", "--metric", "temp", "--bucket", "20s"], env).stdout)
    assert [(a["start"], a["count"], a["sum"]) for a in agg] == [
        (-40, 1, 0.0),
        (-20, 2, 3.0),
        (0, 2, 7.0),
        (20, 2, 11.0),
        (40, 2, 15.0),
        (60, 1, 9.0),
    ]
    table = cli(["aggregate", "s2", "--metric", "temp", "--bucket", "1m"], env).stdout.splitlines()
    assert table[0].split() == ["start", "count", "min", "max", "avg", "sum"]
    assert table[1].split() == ["1969-12-31T23:59:00Z", "3", "0", "2", "1", "3"]  # whole numbers without .0

    gaps = list(csv.DictReader(io.StringIO(cli(["--format", "csv", "gaps", "s1"], env).stdout)))
    assert [(g["first_seq"], g["boot"], g["missing"]) for g in gaps] == [("10", "", "3"), ("200", "7", "4")]
    assert len(json.loads(cli(["--format", "json", "gaps"], env).stdout)) == len(GAPS)

    stats = cli(["stats"], env).stdout
    assert re.search(r"^last_flush\s+2023-11-14T23:03:20\.500Z$", stats, re.M)
    assert re.search(r"^rejected\.bad_id\s+2$", stats, re.M)
    # issue 11 item 6: the cardinality guards and bugs are in the table too.
    assert re.findall(r"^(internal_errors|refused_sensors|refused_readings)\s+(\d+)$", stats, re.M) == [
        ("internal_errors", "3"),
        ("refused_sensors", "8"),
        ("refused_readings", "13"),
    ]
    # A person sees the total and the reasons that happened; CSV keeps every reason.
    rejected_rows = re.findall(r"^(rejected\S*)\s+(\d+)$", stats, re.M)
    assert rejected_rows == [
        ("rejected", "9"),
        ("rejected.not_msgpack", "6"),
        ("rejected.bad_id", "2"),
        ("rejected.something_new", "1"),
    ]
    csv_keys = [row["key"] for row in csv.DictReader(io.StringIO(cli(["--format", "csv", "stats"], env).stdout))]
    assert {k for k in csv_keys if k.startswith("rejected.")} == {
        f"rejected.{r}" for r in (*REJECT_REASONS, "something_new")
    }
    assert json.loads(cli(["--format", "json", "stats"], env).stdout)["rejected"]["not_msgpack"] == 6


def test_raw(live):
    env = live["env"]
    out = json.loads(cli(["raw", '{"op": "latest", "sensor": "s2", "id": "r"}'], env).stdout)
    assert out == {
        "id": "r",
        "ok": True,
        "result": [{"sensor": "s2", "metric": "temp", "ts": 65.0, "value": 9.0, "seq": 109}],
    }
    result = cli(["raw", '{"op": "drop_tables"}'], env, code=1)
    assert json.loads(result.stdout)["error"]["code"] == "unknown_op"
    one_line_error(result, "server said unknown_op")


def test_exit_1_when_the_server_says_no(live):
    result = cli(["aggregate", "s1", "--metric", "temp", "--bucket", "0.001"], live["env"], code=1)
    one_line_error(result, "server said bad_request", "'bucket'")


@pytest.mark.parametrize(
    "args, words",
    [
        (["readings", "s1", "--since", "bogus"], ["--since", "not a time"]),
        (["readings"], ["SENSOR"]),
        (["aggregate", "s1", "--bucket", "5m"], ["--metric"]),
        (["aggregate", "s1", "--metric", "t", "--bucket", "5q"], ["--bucket"]),
        (["raw", "{nope"], ["REQUEST", "not JSON"]),
        (["raw", "[1]"], ["REQUEST", "JSON object"]),
        (["--format", "xml", "ping"], ["--format"]),
        (["--server", "host:notaport", "ping"], ["--server"]),
        (["frobnicate"], ["frobnicate"]),
        (["sensors", "x" * 70_000], ["request longer than 65536 bytes"]),
        (["raw", '{"op": "ping", "id": "%s"}' % ("x" * 70_000)], ["REQUEST", "request longer than 65536 bytes"]),
    ],
)
def test_exit_2_on_usage_errors(live, args, words):
    result = cli(args, live["env"], code=2)
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.output


def test_exit_2_on_half_a_client_identity_or_missing_files(live):
    env = {**live["env"]}
    del env["TELEMETRY_KEY"]
    one_line_error(cli(["ping"], env, code=2), "--cert and --key")
    one_line_error(cli(["--ca", "/nonexistent/ca.pem", "ping"], live["env"], code=2), "--ca", "/nonexistent/ca.pem")


def test_exit_3_when_tls_fails_names_the_option_to_fix(live):
    env, certs = live["env"], live["tls"]
    wrong_ca = one_line_error(cli(["ping"], {**env, "TELEMETRY_CA": certs.client_cert}, code=3))
    assert "--ca" in wrong_ca and "TELEMETRY_CA" in wrong_ca and "does not verify" in wrong_ca
    no_cert = {k: v for k, v in env.items() if k not in ("TELEMETRY_CERT", "TELEMETRY_KEY")}
    one_line_error(cli(["ping"], no_cert, code=3), "--cert")
    one_line_error(cli(["--server", "127.0.0.1", "ping"], {**env, "TELEMETRY_SERVER": ""}, code=3), "--server")
    refused = one_line_error(cli(["--server", f"127.0.0.1:{free_port()}", "ping"], env, code=3), "--server")
    assert "cannot connect" in refused
    wrong_name = one_line_error(cli(["--server", f"127.0.0.3:{live['port']}", "ping"], env, code=3))
    assert "cannot connect" in wrong_name  # nothing listens on 127.0.0.3 (bound to 127.0.0.1)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_commands() -> list[tuple[str, ...]]:
    return [()] + [(name,) for name in main.commands]


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "main")
def test_every_command_has_help_with_an_example(path):
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(main, [*path, flag])
        assert result.exit_code == 0, result.output
        assert "Example:" in result.output, f"{' '.join(path) or 'main'} --help has no Example:"
        assert "telemetry-query" in result.output.split("Example:")[1]
    command = main if not path else main.commands[path[0]]
    assert command.help and "Example:" in command.help
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in ("help", "version"):
            assert param.help, f"{' '.join(path)} {param.opts[0]} has no help"


def test_the_command_list_is_complete():
    assert set(main.commands) == {
        "ping",
        "sensors",
        "latest",
        "readings",
        "aggregate",
        "gaps",
        "stats",
        "raw",
        "serve",
        "export",
        "plot",
        "follow",
    }


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == "telemetry-query, version 0.1.0"


# -- serve ---------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_as_a_process_logs_its_port_answers_and_stops_on_a_signal(known_db, tls, bin_path, stop, tmp_path):
    with QueryServerProcess(
        bin_path("telemetry-query"),
        tmp_path / "serve.log",
        "--db",
        known_db,
        "--cert",
        tls.server_cert,
        "--key",
        tls.server_key,
        "--client-ca",
        tls.ca_pem,
    ) as serve:
        with QueryClient("localhost", serve.port, ca=tls.ca_pem, cert=tls.client_cert, key=tls.client_key) as c:
            assert c.request("latest", sensor="s2")[0]["value"] == 9.0
        assert serve.stop(stop) == 0
    log = serve.text()
    with open(tls.server_key) as f:
        key_body = f.read().splitlines()[1]
    assert key_body not in log and "PRIVATE KEY" not in log
    assert "mutual TLS: on" in log


def serve_error(args, env=None, config_text=None, tmp_path=None):
    if config_text is not None:
        path = tmp_path / "gateway.toml"
        path.write_text(config_text)
        args = [*args, "--config", str(path)]
    result = CliRunner().invoke(main, ["serve", *args], env=env or {}, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    return one_line_error(result)


def test_serve_refuses_to_run_without_tls(known_db):
    message = serve_error(["--db", known_db, "--listen", "127.0.0.1:0"])
    assert "--cert and --key are required" in message


def test_serve_settings_precedence_flag_env_file(tls, tmp_path):
    # The error for a database that does not exist names the path that won.
    base = ["--cert", tls.server_cert, "--key", tls.server_key, "--listen", "127.0.0.1:0"]
    cfg = '[query]\ndb = "/nonexistent/file.db"\nmax-rows = 50\n'
    assert "/nonexistent/file.db" in serve_error(base, {}, cfg, tmp_path)
    env = {"TELEMETRY_QUERY_DB": "/nonexistent/env.db"}
    assert "/nonexistent/env.db" in serve_error(base, env, cfg, tmp_path)
    assert "/nonexistent/flag.db" in serve_error([*base, "--db", "/nonexistent/flag.db"], env, cfg, tmp_path)
    assert "/nonexistent/file.db" in serve_error(base, {"TELEMETRY_CONFIG": str(tmp_path / "gateway.toml")})


@pytest.mark.parametrize(
    "config_text, env, words",
    [
        ("[query]\nmax-row = 5\n", {}, ["unknown key 'max-row'", "max-rows"]),
        ("[query]\nidle-timeout = -1\n", {}, ["idle-timeout", "> 0"]),
        ("[query]\nlisten = 5\n", {}, ["listen"]),
        # A bad value from the environment names the variable, not the flag nobody typed.
        ("", {"TELEMETRY_QUERY_MAX_CONNECTIONS": "lots"}, ["TELEMETRY_QUERY_MAX_CONNECTIONS in the environment"]),
        ("", {"TELEMETRY_QUERY_LISTEN": "[::1"}, ["TELEMETRY_QUERY_LISTEN in the environment"]),
        (
            "",
            {"TELEMETRY_QUERY_MAX_CONECTIONS": "5"},
            [
                "unknown environment variable TELEMETRY_QUERY_MAX_CONECTIONS (did you mean TELEMETRY_QUERY_MAX_CONNECTIONS?)"
            ],
        ),
    ],
)
def test_serve_bad_settings_are_one_line_exit_2(tls, tmp_path, config_text, env, words):
    base = ["--cert", tls.server_cert, "--key", tls.server_key]
    path = tmp_path / "gateway.toml"
    path.write_text(config_text)
    result = CliRunner().invoke(main, ["serve", *base, "--config", str(path)], env=env, catch_exceptions=False)
    assert result.exit_code == 2
    for word in words:
        assert word in result.stderr


def test_serve_setup_errors_are_one_line_exit_2(known_db, tls, tmp_path):
    assert "cannot read" in serve_error(["--db", known_db, "--cert", "/nonexistent.pem", "--key", tls.server_key])
    assert "cannot load" in serve_error(["--db", known_db, "--cert", tls.server_key, "--key", tls.server_key])
    # The missing file is named (ssl's FileNotFoundError carries no filename of its own).
    assert "cannot read /nonexistent.pem: no such file" in serve_error(
        ["--db", known_db, "--cert", "/nonexistent.pem", "--key", tls.server_key]
    )
    assert "cannot read /nonexistent.key: no such file" in serve_error(
        ["--db", known_db, "--cert", tls.server_cert, "--key", "/nonexistent.key"]
    )
    assert "read-only" in serve_error(
        [
            "--db",
            str(tmp_path / "none.db"),
            "--cert",
            tls.server_cert,
            "--key",
            tls.server_key,
            "--listen",
            "127.0.0.1:0",
        ]
    )
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        message = serve_error(
            [
                "--db",
                known_db,
                "--cert",
                tls.server_cert,
                "--key",
                tls.server_key,
                "--listen",
                f"127.0.0.1:{taken.getsockname()[1]}",
            ]
        )
    assert "cannot listen" in message and "--listen" in message


def test_notify_hook_sees_ready_and_stopping(known_db, tls):
    seen: list[str] = []
    values = {
        "db": known_db,
        "listen": ("127.0.0.1", 0),
        "cert": tls.server_cert,
        "key": tls.server_key,
        "client_ca": None,
        "max_connections": 10,
        "idle_timeout": 5.0,
        "handshake_timeout": 5.0,
        "line_timeout": 5.0,
        "max_rows": 100,
        "max_buckets": 100,
        "query_timeout": 1.0,
        "max_output": 65536,
        "workers": 1,
    }
    server = build_server(values, notify=seen.append)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        from helpers import wait_for

        wait_for(lambda: "READY=1" in seen, 5, what="READY=1")
        wait_for(lambda: "WATCHDOG=1" in seen, 5, what="a watchdog ping from the loop")
        with QueryClient("localhost", server.server_address[1], ca=tls.ca_pem) as c:
            assert c.request("ping")["protocol"] == 1
    finally:
        server.shutdown()
        thread.join(5)
    # WATCHDOG=1 comes from every sweep of the loop (the Notifier rate-limits it).
    assert [m for m in seen if m != "WATCHDOG=1"] == ["READY=1", "STOPPING=1"]


def test_csv_keeps_every_digit_the_table_rounds_for_people():
    from query.cli import render

    rows = [{"ts": 1795641958.7244017, "value": 16.827499999999997, "seq": 3}]
    parsed = next(csv.DictReader(io.StringIO(render(rows, "csv"))))
    assert float(parsed["ts"]) == rows[0]["ts"] and float(parsed["value"]) == rows[0]["value"]
    assert render(rows, "table").splitlines()[1].split() == ["2026-11-25T21:25:58.724Z", "16.8275", "3"]


def test_a_request_line_of_exactly_the_limit_is_sent_and_answered(live):
    from query.protocol import MAX_LINE_BYTES

    head = '{"op":"ping","id":"'
    request = {"op": "ping", "id": "x" * (MAX_LINE_BYTES - len(head) - 2)}
    assert len(json.dumps(request, separators=(",", ":"))) == MAX_LINE_BYTES
    with QueryClient(
        "localhost", live["port"], ca=live["tls"].ca_pem, cert=live["tls"].client_cert, key=live["tls"].client_key
    ) as client:
        assert client.call(request)["ok"] is True
        with pytest.raises(ValueError, match="longer than 65536"):
            client.call({**request, "id": request["id"] + "x"})
