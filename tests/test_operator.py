"""What a technician meets with the `sluice` command on site (issue 12): `sluice init` and its
examples, `check` with no configuration, operator commands that need none of the service's secrets,
and flags that mean the same on every command. The installed wheel itself is
tested by scripts/smoke.sh (scripts/test.sh, offline by scripts/offline-test.sh)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from e2e_support import write_config
from gateway.cli.commands import build_parser, command_paths, main
from gateway.cli.loading import default_config_dir
from gateway.outbox import prepare
from gateway.config import load_config
from gateway.cli.examples import EXAMPLES, shipped_config
from gateway.secretref import SecretRef, SecretUnavailable
from servers import free_port

CANARY = "canary-Zq8-secret-value"


@pytest.fixture
def no_service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLUICE_CONFIG", "CONFIGURATION_DIRECTORY", "CREDENTIALS_DIRECTORY", "SLUICE_TEST_ONLY_IN_UNIT"):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------- sluice init
@pytest.mark.parametrize("example", EXAMPLES)
def test_init_writes_a_commented_configuration_that_passes_check(example: str, tmp_path: Path, capsys,
                                                                 no_service_env) -> None:
    target = tmp_path / "site"
    assert main(["init", str(target), "--example", example]) == 0, capsys.readouterr().err
    assert (target / "gateway.yaml").read_text().startswith("#")
    devices = sorted((target / "devices").glob("*.yaml"))
    assert devices and all(d.read_text().startswith("#") for d in devices)
    assert sorted(p.name for p in (target / "profiles").glob("*.yaml")) == \
        sorted(p.name for p in (shipped_config() / "profiles").glob("*.yaml"))
    assert (target / "examples" / "trace.yaml").exists()
    capsys.readouterr()
    assert main(["check", "-c", str(target)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"{len(devices)} devices" in out


def test_init_never_overwrites(tmp_path: Path, capsys) -> None:
    target = tmp_path / "site"
    target.mkdir()
    (target / "gateway.yaml").write_text("gateway: {id: mine, site: here}\n")
    assert main(["init", str(target)]) == 2
    assert "is not empty — nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == ["gateway.yaml"]
    assert (target / "gateway.yaml").read_text() == "gateway: {id: mine, site: here}\n"


# --------------------------------------------------------------------------- check with no configuration
def test_check_with_no_configuration_says_where_it_looked(tmp_path: Path, monkeypatch, capsys, no_service_env) -> None:
    assert not Path("/etc/sluice/gateway.yaml").exists(), "this test needs a machine without /etc/sluice"
    monkeypatch.chdir(tmp_path)
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    for where in ("-c (not given)", "$SLUICE_CONFIG (not set)", "/etc/sluice", "./config", "sluice init DIR"):
        assert where in err, err
    assert "cannot read file" not in err and ":1:1:" not in err

    monkeypatch.setenv("SLUICE_CONFIG", str(tmp_path / "nowhere"))
    assert main(["status"]) == 2
    assert f"$SLUICE_CONFIG ('{tmp_path / 'nowhere'}': no gateway.yaml there)" in capsys.readouterr().err

    assert main(["check", "-c", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err
    assert f"no gateway.yaml in {tmp_path / 'typo'} (given with -c)" in err and "sluice init" in err


# --------------------------------------------------------------------------- secrets only where used
def _secret_config(tmp_path: Path) -> Path:
    cfg = write_config(tmp_path / "cfg", devices={"meter": (free_port(), 1)}, broker_port=1883,
                       sink_extra={"username": "gw", "password": "${cred:mqtt_password}"})
    data = yaml.safe_load((cfg / "gateway.yaml").read_text())
    data["sinks"]["influx"] = {"type": "influxdb", "url": "http://127.0.0.1:8086", "bucket": "b",
                               "token": "${SLUICE_TEST_ONLY_IN_UNIT}"}
    data["health"] = {"listen": f"127.0.0.1:{free_port()}"}
    (cfg / "gateway.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (cfg / "gateway.yaml").chmod(0o640)
    return cfg


def test_operator_commands_need_none_of_the_services_secrets(tmp_path: Path, capsys, no_service_env) -> None:
    cfg = _secret_config(tmp_path)
    assert main(["check", "-c", str(cfg)]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "OK — gateway gw-test" in captured.out
    assert "${cred:mqtt_password} not read" in captured.err and "${SLUICE_TEST_ONLY_IN_UNIT} not read" in captured.err
    assert "cannot resolve" not in captured.err

    # The service's own view: --secrets reads them, and says where each one is.
    assert main(["check", "-c", str(cfg), "--secrets"]) == 2
    err = capsys.readouterr().err
    assert "cannot resolve ${cred:mqtt_password}: systemd credentials are not available" in err
    assert "cannot resolve ${SLUICE_TEST_ONLY_IN_UNIT}: environment variable" in err
    assert "gateway.yaml:" in err

    # status and deadletter: their own problems only (nothing listens; the outbox), no secret.
    assert main(["status", "-c", str(cfg)]) == 3
    assert "cannot reach the gateway's health endpoint" in capsys.readouterr().err
    prepare(cfg / "outbox.db", check=True)
    assert main(["deadletter", "list", "-c", str(cfg)]) == 0
    assert "no dead letters" in capsys.readouterr().out
    assert main(["deadletter", "resend", "--all", "-c", str(cfg)]) == 0
    capsys.readouterr()


def test_a_secret_not_read_at_load_is_read_when_used(tmp_path: Path, monkeypatch, no_service_env) -> None:
    config = load_config(_secret_config(tmp_path), secrets=False)
    password = config.gateway.sinks["broker"].password  # type: ignore[union-attr]
    assert isinstance(password, SecretRef)
    assert CANARY not in repr(password) and "cred" not in str(password)
    with pytest.raises(SecretUnavailable, match=r"cannot resolve \$\{cred:mqtt_password\}"):
        password.get_secret_value()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text(CANARY + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert password.get_secret_value() == CANARY
    # `run` reads every secret at start, as before.
    monkeypatch.setenv("SLUICE_TEST_ONLY_IN_UNIT", "token-value")
    config = load_config(_secret_config(tmp_path / "again"))
    assert config.gateway.sinks["broker"].password.get_secret_value() == CANARY  # type: ignore[union-attr]
    assert not isinstance(config.gateway.sinks["broker"].password, SecretRef)  # type: ignore[union-attr]


def test_a_malformed_reference_is_an_error_even_unread(tmp_path: Path, capsys, no_service_env) -> None:
    cfg = write_config(tmp_path / "cfg", devices={"meter": (free_port(), 1)}, broker_port=1883,
                       sink_extra={"password": "${cred:}"})
    assert main(["check", "-c", str(cfg)]) == 2
    assert "${cred:} is not a credential name — write it like ${cred:mqtt_password}" in capsys.readouterr().err


def test_check_warns_about_a_secret_other_users_can_read(tmp_path: Path, capsys, no_service_env) -> None:
    cfg = write_config(tmp_path / "cfg", devices={"meter": (free_port(), 1)}, broker_port=1883,
                       sink_extra={"username": "gw", "password": "plain-text-in-the-file"})
    (cfg / "gateway.yaml").chmod(0o644)
    assert main(["check", "-c", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "holds a secret and is readable by every user" in err
    assert "plain-text-in-the-file" not in err
    (cfg / "gateway.yaml").chmod(0o640)
    assert main(["check", "-c", str(cfg)]) == 0
    assert "readable by every user" not in capsys.readouterr().err


# --------------------------------------------------------------------------- flags
def _help(words: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_every_command_has_help_and_the_same_flags(capsys) -> None:
    paths = command_paths()
    assert ["init"] in paths and ["sim", "rtu"] in paths and ["deadletter", "list"] in paths
    for words in paths:
        text = _help(words, capsys)
        if "--log-level" in text:
            assert "what is logged" in text, f"sluice {' '.join(words)}: --log-level without help"
        if "--config" in text:
            assert "-c CONFIG, --config CONFIG" in text, f"sluice {' '.join(words)}: --config without -c"
    assert "-c CONFIG, --config CONFIG" in _help(["demo"], capsys)


def test_durations_take_units_everywhere(capsys) -> None:
    assert build_parser().parse_args(["demo", "--duration", "5s"]).duration == 5.0
    assert build_parser().parse_args(["demo", "--duration", "1m30s"]).duration == 90.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--duration", "5"])
    assert "'5' is not a duration — write a number and a unit" in capsys.readouterr().err


def test_read_refuses_a_conflicting_kind_and_explains_a_reference_given_as_address(capsys) -> None:
    assert main(["read", "/dev/ttyUSB9", "--ref", "30001", "--kind", "holding"]) == 2
    assert "--ref 30001 is a input reference but --kind says holding — give one of them" in capsys.readouterr().err
    assert main(["read", "/dev/ttyUSB9", "--ref", "40010", "--address", "3"]) == 2
    assert "--ref 40010 is holding address 9 but --address says 3" in capsys.readouterr().err
    assert main(["read", "/dev/ttyUSB9", "--address", "40001"]) == 2
    err = capsys.readouterr().err
    assert "--address 40001 looks like the manual's 4xxxx reference, not a 0-based address" in err
    assert "give --ref 40001 (= holding address 0), or --kind holding --address 0" in err
    assert main(["read", "/dev/ttyUSB9", "--kind", "input", "--address", "30005"]) == 2
    assert "--ref 30005 (= input address 4)" in capsys.readouterr().err
    assert main(["read", "/dev/ttyUSB9", "--address", "30005"]) == 2  # holding by default, but a 3xxxx form
    assert "--ref 30005 (= input address 4), or --kind input --address 4" in capsys.readouterr().err


def test_default_config_dir_is_unchanged_for_the_service(monkeypatch, no_service_env) -> None:
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", "/etc/sluice")
    assert default_config_dir() == Path("/etc/sluice")
    assert os.environ["CONFIGURATION_DIRECTORY"] == "/etc/sluice"


def test_ingest_check_reads_no_secret_unless_asked(tmp_path: Path, capsys, no_service_env) -> None:
    ingest = tmp_path / "ingest.yaml"
    ingest.write_text("mqtt:\n  host: 127.0.0.1\n  username: ingest\n  password: ${cred:mqtt_password}\n"
                      "  topics: ['sluice/#']\ninfluxdb:\n  url: http://127.0.0.1:8086\n  bucket: b\n"
                      f"  token: ${{file:{tmp_path / 'token-only-the-service-reads'}}}\n")
    assert main(["ingest", "check", "-c", str(ingest)]) == 0, capsys.readouterr().err
    assert main(["ingest", "check", "-c", str(ingest), "--secrets"]) == 2
    err = capsys.readouterr().err
    assert "cannot resolve ${cred:mqtt_password}" in err and "token-only-the-service-reads}: No such file" in err
