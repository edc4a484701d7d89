"""Serial profiles and devices through gateway.config: every shipped serial profile is valid, and
mistakes are reported at file:line:col with what to do."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import ConfigErrors, load_config

GOOD_LINES = """\
protocol: serial
format: lines
pattern: '^T=(?P<temperature>-?\\d+\\.\\d)$'
fields:
  temperature: {unit: °C}
"""


def write_config(tmp_path: Path, profile: str, device: str = "") -> Path:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "devices").mkdir()
    (tmp_path / "gateway.yaml").write_text("gateway: {id: gw1, site: farm}\n")
    (tmp_path / "profiles" / "sensor.yaml").write_text(textwrap.dedent(profile))
    (tmp_path / "devices" / "dev1.yaml").write_text(textwrap.dedent(device or """\
        id: dev1
        protocol: serial
        profile: sensor
        port: /dev/ttyUSB0
        """))
    return tmp_path


def errors_of(tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as exc:
        load_config(tmp_path)
    return [str(e) for e in exc.value.errors]


def test_a_good_serial_device_loads(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, GOOD_LINES, """\
        id: dev1
        protocol: serial
        profile: sensor
        port: /dev/ttyUSB0
        baudrate: 19200
        parity: E
        stopbits: 2
        bytesize: 7
        interval: 5s
        """))
    dev = cfg.devices[0]
    assert (dev.config.baudrate, dev.config.parity, dev.config.stopbits, dev.config.bytesize) == (19200, "E", 2, 7)
    assert dev.profile.format == "lines" and dev.profile.delimiter == "\n"


@pytest.mark.parametrize(("profile", "expected"), [
    (GOOD_LINES.replace("-?\\d+", "(-?\\d+"), "profiles/sensor.yaml:3:10: pattern: not a valid regular expression"),
    (GOOD_LINES.replace("temperature: {unit", "temprature: {unit"),
     "profiles/sensor.yaml:5:15: 'temprature' is not a named group of pattern"),
    ("protocol: serial\nformat: binary\nheader: '42 4D'\nframe_length: 8\n"
     "checksum: {type: crc16_modbis}\nfields:\n  a: {byte: 2, type: uint16}\n",
     "profiles/sensor.yaml:5:18: type: 'crc16_modbis' is not allowed"),
    (GOOD_LINES + "checksum: {type: sum8}\n",
     "profiles/sensor.yaml:6:11: 'checksum' does not apply to format: lines (it is for binary)"),
    ("protocol: serial\nformat: binary\nheader: '42 4G'\nframe_length: 8\nfields:\n  a: {byte: 2, type: uint16}\n",
     "profiles/sensor.yaml:3:9: header: '42 4G' is not hex bytes"),
    ("protocol: serial\nformat: binary\nheader: '42 4D'\nframe_length: 8\nchecksum: {type: sum16}\n"
     "fields:\n  a: {byte: 5, type: uint16}\n",
     "profiles/sensor.yaml:7:13: byte: bytes 5..6 run past the frame"),
    ("protocol: serial\nformat: lines\n", "profiles/sensor.yaml:1:1: pattern: is missing"),
    ("protocol: serial\nformat: scale\npattern: '^(?P<w>[0-9.]+)$'\n",
     "profiles/sensor.yaml:3:10: pattern: has no (?P<weight>...) group"),
    ("protocol: serial\nformat: gps\n", "profiles/sensor.yaml:2:9: format: 'gps' is not allowed"),
])
def test_profile_errors_are_located(tmp_path: Path, profile: str, expected: str) -> None:
    errors = errors_of(write_config(tmp_path, profile))
    assert any(e.startswith(expected) for e in errors), errors
    assert "Traceback" not in "".join(errors)


def test_two_sensors_on_one_port_is_an_error(tmp_path: Path) -> None:
    write_config(tmp_path, GOOD_LINES)
    (tmp_path / "devices" / "dev2.yaml").write_text("id: dev2\nprotocol: serial\nprofile: sensor\nport: /dev/ttyUSB0\n")
    errors = errors_of(tmp_path)
    assert any(e.startswith("devices/dev2.yaml:4:7: /dev/ttyUSB0 is already used by 'dev1'") for e in errors), errors


def test_device_line_settings_are_checked(tmp_path: Path) -> None:
    errors = errors_of(write_config(tmp_path, GOOD_LINES, "id: dev1\nprotocol: serial\nprofile: sensor\n"
                                    "port: /dev/ttyUSB0\nparity: evn\nbaudrate: fast\n"))
    assert any(e.startswith("devices/dev1.yaml:5:9: parity: 'evn' is not allowed") for e in errors), errors
    assert any(e.startswith("devices/dev1.yaml:6:11: baudrate:") for e in errors), errors


@pytest.fixture(autouse=True)
def _relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # messages name files relative to the working directory
