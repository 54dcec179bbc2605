"""deploy/: the systemd units carry the hardening we document, and systemd accepts them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file; repeated keys (SystemCallFilter=) keep every value."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_every_daemon_has_a_unit():
    assert [u.name for u in UNITS] == [
        "telemetry-central.service",
        "telemetry-collector.service",
        "telemetry-query.service",
        "telemetry-uplink.service",
    ]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_has_required_keys(unit):
    service = read_unit(unit)["Service"]
    required = {
        "Type": ["notify"],
        "User": ["telemetry"],
        "Restart": ["on-failure"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "PrivateTmp": ["yes"],
        "ReadWritePaths": ["/var/lib/gateway-telemetry"],
        "CapabilityBoundingSet": [""],
    }
    for key, value in required.items():
        assert service.get(key) == value, f"{unit.name}: {key}"
    assert "WatchdogSec" in service
    assert service["ExecStart"][0].startswith("/opt/gateway-telemetry/bin/telemetry-")
    assert "--config /etc/gateway-telemetry/gateway.toml" in service["ExecStart"][0]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify_is_clean(unit, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed: apt-get install systemd (.ci/run does)")
    # verify checks that ExecStart exists: point it at this venv's scripts.
    bindir = str(Path(sys.executable).parent) + "/"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/gateway-telemetry/bin/", bindir))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # verify also loads the units ours name (network-online.target ...) and
    # reports what the HOST's copies of those get wrong: only lines about our
    # unit count, so the verdict does not depend on the machine.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert ours == [], "\n".join(ours)


def test_sysctl_dropin_raises_rmem_max_above_twice_the_default_request():
    values = {}
    for line in (DEPLOY / "sysctl.d" / "60-gateway-telemetry.conf").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = int(value)
    from collector import tuning

    assert values["net.core.rmem_max"] >= 2 * tuning.DEFAULT_RCVBUF_BYTES


def test_sysusers_creates_the_unit_user():
    line = (DEPLOY / "sysusers.d" / "gateway-telemetry.conf").read_text().splitlines()[-1]
    assert line.split()[:2] == ["u", "telemetry"]
