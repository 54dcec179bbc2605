"""What a new user hit (issue 11), each fixed: bare ports, IPv6 without brackets, env var typos and
values, DNS failures, serve --check without a database, certs that would be overwritten, CSV times."""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector import config
from collector.wire import encode
from query import certs

import query_fixtures as fx
from helpers import clean_env, run
from processes import CollectorProcess, QueryServerProcess

# -- 2. a bare port, and IPv6 without brackets ------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4740", ("0.0.0.0", 4740)),
        (":4740", ("0.0.0.0", 4740)),
        ("0", ("0.0.0.0", 0)),
        ("127.0.0.1:4740", ("127.0.0.1", 4740)),
        ("[::]:4740", ("::", 4740)),
        ("gw1", ("gw1", 4739)),
    ],
)
def test_a_listening_address_may_be_a_bare_port(text, expected):
    assert config.host_port(4739)(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("4740", "'4740' is a port alone: give the host too, e.g. localhost:4740"),
        ("::1:4740", "'::1:4740': an IPv6 address needs brackets: write [::1]:4740 (port 4740) or [::1:4740]:4740"),
        ("::1", "'::1': an IPv6 address needs brackets: write [::1]:4740"),
        ("2001:db8::1:80", "write [2001:db8::1]:80 (port 80) or [2001:db8::1:80]:4740"),
        ("fe80::x:1", "write an IPv6 address in brackets, e.g. [::1]:4740"),
        ("99999", "'99999' is a port alone"),
    ],
)
def test_an_address_to_reach_says_what_to_write(text, message):
    with pytest.raises(ValueError) as caught:
        config.parse_host_port(text, 4740)
    assert message in str(caught.value)


def test_collector_listen_bare_port_binds_every_address_and_check_says_so(bin_path, db_path, tmp_path):
    check = run([bin_path("telemetry-collector"), "--db", db_path, "--listen", "0", "--check"])
    assert check.returncode == 0, check.stderr
    assert tomllib.loads(check.stdout)["collector"]["listen"] == ["0.0.0.0:0"]
    with CollectorProcess(
        bin_path("telemetry-collector"), db_path, tmp_path / "c.log", "--listen", "0", env=clean_env()
    ) as collector:
        assert collector.ports[0].startswith("0.0.0.0:")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # any address: loopback reaches it
            udp.sendto(encode("bare-port", 1, {"t": 1.5}), ("127.0.0.1", collector.port()))
        collector.wait_received(1)
        assert collector.stop() == 0


def test_serve_listen_bare_port_binds_every_address_and_check_says_so(bin_path, known_db, tls, tmp_path):
    args = ["--db", known_db, "--cert", tls.server_cert, "--key", tls.server_key, "--listen", "0"]
    check = run([bin_path("telemetry-query"), "serve", *args, "--check"])
    assert check.returncode == 0, check.stderr
    assert tomllib.loads(check.stdout)["query"]["listen"] == "0.0.0.0:0"
    with QueryServerProcess(bin_path("telemetry-query"), tmp_path / "q.log", *args, env=clean_env()) as server:
        assert server.ready.group(1) == "0.0.0.0"
        result = fx.run_cli(["ping"], {"TELEMETRY_SERVER": f"localhost:{server.port}", "TELEMETRY_CA": tls.ca_pem})
        assert "protocol" in result.stdout
        assert server.stop() == 0


def test_unbracketed_ipv6_in_env_or_flag_is_one_line_exit_2(bin_path, db_path):
    result = run([bin_path("telemetry-collector"), "--db", db_path, "--check"], TELEMETRY_COLLECTOR_LISTEN="::1:4739")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for TELEMETRY_COLLECTOR_LISTEN in the environment: '::1:4739': an IPv6 address needs"
        " brackets: write [::1]:4739 (port 4739) or [::1:4739]:4739"
    )


# -- 10. the environment: typos, bad values, DNS ----------------------------------------------------------


def test_an_env_var_no_option_reads_is_an_error_like_a_toml_typo(bin_path, db_path):
    result = run([bin_path("telemetry-collector"), "--db", db_path, "--check"], TELEMETRY_COLLECTOR_FLUSH_INTERVALL="2")
    assert (result.returncode, result.stderr) == (
        2,
        "Error: unknown environment variable "
        "TELEMETRY_COLLECTOR_FLUSH_INTERVALL (did you mean "
        "TELEMETRY_COLLECTOR_FLUSH_INTERVAL?)\n",
    )
    result = run([bin_path("telemetry-query"), "ping"], TELEMETRY_SEVRER="localhost:4740")
    assert (result.returncode, result.stderr) == (
        2,
        "Error: unknown environment variable TELEMETRY_SEVRER (did you mean TELEMETRY_SERVER?)\n",
    )


def test_a_bad_format_from_the_environment_blames_the_variable():
    result = CliRunner().invoke(fx_main(), ["ping"], env={"TELEMETRY_FORMAT": "xml"})
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: Invalid value for TELEMETRY_FORMAT in the environment: 'xml' is not one of 'table', 'json', 'csv'."
    )
    result = CliRunner().invoke(fx_main(), ["--format", "xml", "ping"])
    assert "Invalid value for '--format'" in result.stderr
    result = CliRunner().invoke(fx_main(), ["ping"], env={"TELEMETRY_SERVER": "::1:4740"})
    assert result.exit_code == 2
    assert (
        "Invalid value for TELEMETRY_SERVER in the environment: '::1:4740': an IPv6 address needs brackets"
        in result.stderr
    )


def fx_main():
    from query.cli import main

    return main


@pytest.mark.parametrize("server", ["nosuchhost.invalid:4740", "a..b:4740"])
def test_a_name_that_does_not_resolve_says_dns_not_is_serve_running(bin_path, server):
    # RFC 2606 reserves .invalid; RES_OPTIONS bounds the wait on a resolver that does not answer.
    result = run([bin_path("telemetry-query"), "--server", server, "ping"], RES_OPTIONS="timeout:1 attempts:1")
    assert result.returncode == 3
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "check the host name in --server (TELEMETRY_SERVER), or give an IP address" in line
    assert "is `telemetry-query serve` running" not in line


# -- 11. serve --check opens the database ------------------------------------------------------------


def test_serve_check_fails_when_the_database_does_not_exist(bin_path, tls, tmp_path):
    missing = tmp_path / "not-yet.db"
    result = run(
        [
            bin_path("telemetry-query"),
            "serve",
            "--db",
            str(missing),
            "--cert",
            tls.server_cert,
            "--key",
            tls.server_key,
            "--check",
        ]
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"Error: cannot open database {missing} read-only: unable to open database file"
        " (has the collector created it yet?)\n"
    )
    assert not missing.exists()  # a read-only check creates nothing


# -- 8. telemetry-certs ---------------------------------------------------------------------------------


def test_certs_client_refuses_to_overwrite_a_key_unless_forced(tmp_path):
    tls_dir = tmp_path / "tls"
    runner = CliRunner()
    assert runner.invoke(certs.main, ["init", str(tls_dir), "--dns", "localhost"]).exit_code == 0
    assert runner.invoke(certs.main, ["client", str(tls_dir), "alice"]).exit_code == 0
    key = (tls_dir / "alice.key").read_bytes()
    again = runner.invoke(certs.main, ["client", str(tls_dir), "alice"])
    assert again.exit_code == 1
    assert again.stderr == f"Error: {tls_dir / 'alice.key'} exists: pick another NAME, or use --force to replace it\n"
    assert (tls_dir / "alice.key").read_bytes() == key
    assert runner.invoke(certs.main, ["client", str(tls_dir), "alice", "--force"]).exit_code == 0
    assert (tls_dir / "alice.key").read_bytes() != key


@pytest.mark.parametrize("command", [[], ["init"], ["server"], ["client"]])
def test_certs_help_keeps_each_example_on_its_own_line(command):
    out = CliRunner().invoke(certs.main, [*command, "--help"]).stdout
    example = out.split("Example:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert example and all(line.startswith("    telemetry-certs ") for line in example), out
    if not command:
        assert len(example) == 3


# -- 7. CSV times and numbers --------------------------------------------------------------------------


def test_csv_and_json_times_as_iso_on_request_and_computed_floats_shortest(known_db, tls):
    with fx.live_server(known_db, tls, mtls=False) as live:
        env = live["env"]
        rows = list(
            csv.DictReader(
                io.StringIO(
                    fx.run_cli(
                        ["--format", "csv", "--times", "iso", "readings", "s1", "--metric", "hum", "--limit", "2"], env
                    ).stdout
                )
            )
        )
        assert [r["ts"] for r in rows] == ["2023-11-14T22:13:20.500Z", "2023-11-14T22:14:20.500Z"]
        unix = fx.run_cli(["--format", "csv", "readings", "s1", "--metric", "hum", "--limit", "1"], env).stdout
        assert unix.splitlines()[1].split(",")[2] == repr(fx.T0 + 0.5)
        stats = fx.run_cli(["--format", "json", "--times", "iso", "stats"], {**env, "TELEMETRY_TIMES": "unix"})
        assert '"last_flush": "2023-11-14T23:03:20.500Z"' in stats.stdout  # the flag beats the environment
        agg = list(
            csv.DictReader(
                io.StringIO(
                    fx.run_cli(
                        ["--format", "csv", "aggregate", "s1", "--metric", "temp", "--bucket", "30s"], env
                    ).stdout
                )
            )
        )
        for row in agg:
            assert len(row["avg"].replace("-", "").replace(".", "").lstrip("0")) <= 15, row
            assert float(row["avg"]) == pytest.approx(float(row["sum"]) / int(row["count"]), rel=1e-14)


# -- 4. an aggregate range wider than the data -------------------------------------------------------


def test_aggregate_over_a_week_of_seconds_of_data_is_sized_to_the_data(known_db, tls):
    with fx.live_server(known_db, tls, mtls=False) as live:
        env = live["env"]
        # s1 temp: 300 readings over 990 s; 7 days at 1 s buckets would be 604,800 buckets.
        week = fx.run_cli(
            [
                "--format",
                "json",
                "aggregate",
                "s1",
                "--metric",
                "temp",
                "--bucket",
                "1s",
                "--since",
                str(fx.T0 - 7 * 86400),
                "--until",
                str(fx.T0 + 86400),
            ],
            env,
        )
        exact = fx.run_cli(["--format", "json", "aggregate", "s1", "--metric", "temp", "--bucket", "1s"], env)
        assert week.stdout == exact.stdout
        assert len(json.loads(week.stdout)) == 100 and sum(b["count"] for b in json.loads(week.stdout)) == 300
        # Even the data's own span is too many buckets of 50 ms: say which bucket would do.
        refused = fx.run_cli(
            ["aggregate", "s1", "--metric", "temp", "--bucket", "0.05", "--since", str(fx.T0 - 7 * 86400)], env, code=1
        )
        assert refused.stderr.endswith(
            "; the readings in that range run from 2023-11-14T22:13:20Z to "
            "2023-11-14T22:29:50Z; --bucket 0.1s or wider would do\n"
        ), refused.stderr
        assert fx.run_cli(["aggregate", "s1", "--metric", "temp", "--bucket", "0.1s"], env).stdout.count("\n") == 101


# -- 12. how long 16 MiB of receive buffer lasts, said once ----------------------------------------------


def test_the_sysctl_comment_and_operations_agree_on_how_long_16_mib_lasts():
    root = Path(__file__).resolve().parent.parent
    sysctl = " ".join((root / "deploy/sysctl.d/60-gateway-telemetry.conf").read_text().replace("#", " ").split())
    operations = " ".join((root / "docs/OPERATIONS.md").read_text().split())
    for text in (sysctl, operations):
        assert "16 MiB" in text and "~20,000" in text and "200 ms at 100,000 datagrams/s" in text, text[:200]
        assert "(2 s at 10,000/s" in text and "bench/rcvbuf.py" in text
    assert "well over a second" not in sysctl


# -- 1. the README's quick start, run as written --------------------------------------------------------


def quick_start() -> list[str]:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Quick start, by hand", 1)[1].split("```console\n", 1)[1].split("```", 1)[0]
    return [line[2:] for line in block.splitlines() if line.startswith("$ ")]


def test_the_readme_quick_start_runs_as_written(bin_path, tmp_path):
    """Each line of the quick start, in order, in a fresh directory: the venv line is this test's venv,
    the fixed ports become free ones (read back from the daemons' ready lines), nothing else changes."""
    lines = quick_start()
    assert lines[0].startswith("python3 -m venv .venv") and lines[-1] == "kill %1 %2"
    env = clean_env()
    daemons = []
    udp_port = tcp_port = None
    try:
        for line in lines[1:-1]:
            argv = line.rstrip(" &").split()
            if argv[0] == "export":
                env.update(dict(item.split("=", 1) for item in argv[1:]))
                env["TELEMETRY_SERVER"] = env["TELEMETRY_SERVER"].replace(":4740", f":{tcp_port}")
                continue
            argv = [bin_path(argv[0]), *argv[1:]]
            if line.endswith(" &"):
                argv = [
                    a.replace("127.0.0.1:4739", "127.0.0.1:0").replace("127.0.0.1:4740", "127.0.0.1:0") for a in argv
                ]
                if "serve" in argv:
                    daemons.append(
                        QueryServerProcess(argv[0], tmp_path / "serve.log", *argv[2:], env=env, cwd=tmp_path)
                    )
                    tcp_port = daemons[-1].port
                else:
                    daemons.append(
                        CollectorProcess(
                            argv[0], "telemetry.db", tmp_path / "collector.log", *argv[3:], env=env, cwd=tmp_path
                        )
                    )
                    daemons[-1].db = str(tmp_path / "telemetry.db")  # where the test reads its counters
                    udp_port = daemons[-1].port()
                continue
            argv = [a.replace("127.0.0.1:4739", f"127.0.0.1:{udp_port}") for a in argv]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            if "sensor-sim" in argv[0]:
                daemons[0].wait_received(60)
            if argv[1:2] == ["sensors"]:
                rows = [r.split() for r in done.stdout.splitlines()[1:]]
                assert [(r[0], r[3]) for r in rows] == [("sim-0001", "20"), ("sim-0002", "20"), ("sim-0003", "20")]
            if argv[1:2] == ["plot"]:
                assert done.stdout.startswith("sim-0001 temp: 20 readings, ")
    finally:
        for daemon in daemons:
            assert daemon.stop() == 0, daemon.text()


# -- 9. sensor-sim: a port nobody listens on, and an honest pace ----------------------------------------


def closed_port() -> int:
    """A loopback UDP port with no socket on it (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("count", [1, 10])
def test_sensor_sim_to_a_port_nobody_listens_on_counts_and_says_it(bin_path, tmp_path, count):
    port = closed_port()
    report_path = tmp_path / "truth.json"
    result = run(
        [
            bin_path("sensor-sim"),
            "--target",
            f"127.0.0.1:{port}",
            "--sensors",
            "1",
            "--rate",
            "200",
            "--count",
            str(count),
            "--report",
            str(report_path),
        ]
    )
    # Exit 0: a collector that restarts during a run refuses some datagrams too; the counts say it.
    assert result.returncode == 0, result.stderr
    assert (
        f"time(s): nothing listened at 127.0.0.1:{port} for part or all of the run (ICMP port unreachable)"
        in result.stderr
    )
    report = json.loads(report_path.read_text())
    assert report["send_errors"]["ECONNREFUSED"] >= 1
    assert report["datagrams_sent"] + report["send_failures"] == count  # every slot accounted for


def test_sensor_sim_pace_counts_slots_not_what_loss_left(bin_path, tmp_path):
    report_path = tmp_path / "truth.json"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        result = run(
            [
                bin_path("sensor-sim"),
                "--target",
                f"127.0.0.1:{sink.getsockname()[1]}",
                "--sensors",
                "2",
                "--rate",
                "100",
                "--count",
                "20",
                "--loss",
                "0.5",
                "--seed",
                "7",
                "--report",
                str(report_path),
            ]
        )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    generated = sum(s["generated"] for s in report["sensors"].values())
    assert generated == 40 and report["datagrams_sent"] < 30  # half the slots dropped on purpose
    pace = round((generated - 1) / report["elapsed_s"])
    assert f"(paced at {pace}/s of 200/s asked)" in result.stderr, result.stderr
    one = run([bin_path("sensor-sim"), "--target", f"127.0.0.1:{closed_port()}", "--count", "1", "--sensors", "1"])
    assert "paced" not in one.stderr and "/s" not in one.stderr.split(";")[0]
