"""Configuration errors: every case folder under cases/config gives exactly its expected messages.

A case is a config directory plus ``expected.txt``: one line per expected error, each the start
of a reported line (``file:line:col: message``) with the file relative to the case folder, and
optionally ``args.txt``: more arguments for ``sluice check`` (e.g. ``--secrets``). A
user's bug report about a confusing message becomes a folder, not code.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli.commands import main
from gateway.config import ConfigErrors, load_config
from gateway.units import parse_duration, parse_size
from gateway.trace.config import load_trace_config

CASES = sorted(p for p in (Path(__file__).parent / "cases" / "config").iterdir() if p.is_dir())
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_config_case(case: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(case)
    expected = [line for line in (case / "expected.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    extra = (case / "args.txt").read_text(encoding="utf-8").split() if (case / "args.txt").exists() else []
    code = main(["check", "-c", ".", *extra])
    err = capsys.readouterr().err
    reported = [line for line in err.splitlines() if not line.endswith("nothing was started")]
    assert code == 2, err
    assert "Traceback" not in err
    for want in expected:
        assert any(line.startswith(want) for line in reported), f"missing {want!r} in:\n{err}"
    assert len(reported) == len(expected), f"unexpected extra errors:\n{err}"


def test_shipped_example_config_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(REPO / "config")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "OK" in out and "workshop-meter" in out


def test_shipped_trace_example_is_valid_for_the_shipped_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config"
    shutil.copytree(REPO / "config", config)
    shutil.copy(config / "examples" / "trace.yaml", config / "trace.yaml")
    assert main(["check", "-c", str(config)]) == 0, capsys.readouterr().err
    assert "3 locations, 2 lots, 1 trace sinks" in capsys.readouterr().out
    trace = load_trace_config(load_config(config))
    assert trace is not None
    assert [(p.device, p.field, p.type, p.uom) for p in trace.points["cold-room-1"]] == [
        ("coldroom-1", "room_temperature", "Temperature", "CEL")]
    assert {p.field for p in trace.points["greenhouse-1"]} == {"temperature", "humidity"}


def test_check_exits_non_zero_as_a_process() -> None:
    case = next(c for c in CASES if c.name == "typo-key")
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "check", "-c", str(case)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown key 'bufer'" in proc.stderr and "Traceback" not in proc.stderr


def test_secrets_from_env_file_and_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "devices").mkdir()
    (tmp_path / "profiles").mkdir()
    (tmp_path / "pw").write_text("from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "user").write_text("from-cred")
    monkeypatch.setenv("SLUICE_TEST_HOST", "127.0.0.1")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    (tmp_path / "gateway.yaml").write_text(
        "gateway: {id: gw1, site: farm}\n"
        "sinks:\n  b:\n    type: mqtt\n    host: ${SLUICE_TEST_HOST}\n"
        f"    password: ${{file:{tmp_path / 'pw'}}}\n    username: ${{cred:user}}\n")
    sink = load_config(tmp_path).gateway.sinks["b"]
    assert sink.host == "127.0.0.1"
    assert sink.username == "from-cred"
    assert sink.password is not None and sink.password.get_secret_value() == "from-file"
    assert "from-file" not in repr(sink) and "from-file" not in str(sink)


def test_errors_are_sorted_and_all_reported(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("gateway: {id: gw1, site: farm}\nextra1: 1\nextra2: 2\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(tmp_path)
    lines = [str(e) for e in info.value.errors]
    # both unknown keys, and the two missing directories, in one run
    assert sum("unknown key" in line for line in lines) == 2
    assert sum("directory" in line and "does not exist" in line for line in lines) == 2


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("10s", 10.0), ("1m30s", 90.0), ("2h", 7200.0), ("1d", 86400.0), ("0.25s", 0.25), (" 5 s ", 5.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["10", 10, 1.5, "ten seconds", "5x", "s", "", True, "10s garbage"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match=r"unit|duration"):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "size"), [
    ("64KiB", 65536), ("256MiB", 256 * 1024**2), ("1GB", 10**9), (4096, 4096), ("100", 100), ("1.5KiB", 1536),
])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size
