"""The systemd units: `systemd-analyze security --offline=true` exposure <= 1.5, `systemd-analyze verify`,
and the settings the service depends on (notify, watchdog, start without the uplink)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import unavailable

REPO = Path(__file__).resolve().parent.parent
UNITS = ["sluice.service", "sluice-ingest.service"]
INSTALLED_EXEC = "/opt/sluice/venv/bin/sluice"
MAX_EXPOSURE = 1.5


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        unavailable("systemd-analyze is not installed — sudo apt-get install systemd")
    return found


def _settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for line in (REPO / "systemd" / unit).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _sep, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_is_at_most_1_5(unit: str) -> None:
    result = subprocess.run([_analyze(), "security", "--offline=true", "--no-pager", str(REPO / "systemd" / unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure level in the output:\n{result.stdout}\n{result.stderr}"
    score = float(match.group(1))
    failing = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert score <= MAX_EXPOSURE, f"{unit} exposure {score} > {MAX_EXPOSURE}; open items:\n" + "\n".join(failing)


@pytest.mark.parametrize("unit", UNITS)
def test_verify(unit: str, tmp_path: Path) -> None:
    # verify checks that ExecStart exists and is executable. /opt/sluice is not installed on a
    # build machine, so a copy of the unit points at this checkout's own `sluice` entry point;
    # the installed path itself is asserted below.
    here = Path(sys.executable).parent / "sluice"
    if not here.exists():
        unavailable(f"{here} is not installed (pip install -e .)")
    text = (REPO / "systemd" / unit).read_text()
    assert f"ExecStart={INSTALLED_EXEC} " in text
    (tmp_path / unit).write_text(text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={here} "))
    result = subprocess.run([_analyze(), "verify", str(tmp_path / unit)], capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if unit in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_unit_settings(unit: str) -> None:
    s = _settings(unit)
    assert s["Service.Type"] == ["notify"]
    assert s["Service.NotifyAccess"] == ["main"]
    assert s["Service.WatchdogSec"] and s["Service.Restart"] == ["always"]
    assert s["Service.User"] == ["sluice"] and s["Service.Group"] == ["sluice"]
    assert s["Unit.After"] == ["network.target"]  # starts and buffers with the uplink down
    assert "Unit.Wants" not in s and "Unit.Requires" not in s
    assert s["Service.ConfigurationDirectory"] == ["sluice"]
    assert s["Service.ProtectSystem"] == ["strict"] and s["Service.NoNewPrivileges"] == ["yes"]
    assert s["Install.WantedBy"] == ["multi-user.target"]
    if unit == "sluice.service":
        assert s["Service.StateDirectory"] == ["sluice"]
        assert s["Service.SupplementaryGroups"] == ["dialout"]
        assert s["Service.DevicePolicy"] == ["closed"]
        assert {v.split()[0] for v in s["Service.DeviceAllow"]} == {"char-ttyS", "char-ttyUSB", "char-ttyACM", "char-ttyAMA"}
        assert s["Service.SocketBindAllow"] == ["tcp:9108"]  # the default health.listen port
    # configparser reads it too (no duplicate-section or syntax surprises for other tools)
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string((REPO / "systemd" / unit).read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]
