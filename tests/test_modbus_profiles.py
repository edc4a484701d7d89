"""Modbus profiles and devices through gateway.config: the shipped profiles validate, and every
mistake comes out as file:line:col with what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from drivers.modbus.codec import encode
from drivers.modbus.profile import ProfileModel, points_of
from drivers.modbus.tcp import make_pollers
from gateway.config import ConfigErrors, load_config

PROFILES = Path(__file__).resolve().parent.parent / "config" / "profiles"
SHIPPED = sorted(PROFILES.glob("*.yaml"))


def write_config(root: Path, profiles: dict[str, str], devices: dict[str, str] | None = None) -> Path:
    (root / "profiles").mkdir()
    (root / "devices").mkdir()
    (root / "gateway.yaml").write_text("gateway: {id: gw, site: s}\n")
    for name, text in profiles.items():
        (root / "profiles" / f"{name}.yaml").write_text(text)
    for name, text in (devices or {}).items():
        (root / "devices" / f"{name}.yaml").write_text(text)
    return root


def test_every_shipped_profile_validates(tmp_path: Path) -> None:
    assert {p.stem for p in SHIPPED} >= {"eastron-sdm630", "greenhouse-th", "coldroom-controller"}
    (tmp_path / "profiles").mkdir()
    for path in SHIPPED:
        shutil.copy(path, tmp_path / "profiles" / path.name)
    (tmp_path / "devices").mkdir()
    (tmp_path / "gateway.yaml").write_text("gateway: {id: gw, site: s}\n")
    config = load_config(tmp_path)
    assert set(config.profiles) == {p.stem for p in SHIPPED}
    for name, profile in config.profiles.items():
        if profile.protocol != "modbus":
            continue  # other protocols' profiles are checked by their drivers' tests
        assert isinstance(profile, ProfileModel)
        for model, point in zip(profile.points, points_of(profile)):
            assert model.sim is not None, f"{name}: {point.name} has no sim: signal"
            sim = model.sim
            for value in [getattr(sim, k) for k in ("min", "max", "value", "start") if getattr(sim, k, None) is not None] \
                    + list(getattr(sim, "values", [])):
                encode(point, value)  # the simulated range fits the register type
                if model.valid is not None and not isinstance(value, (bool, str)):
                    assert (model.valid.min is None or value >= model.valid.min) and \
                        (model.valid.max is None or value <= model.valid.max), f"{name}: {point.name} sim outside valid"


def test_repository_configuration_loads_and_plans(caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(PROFILES.parent)
    modbus = [d for d in config.devices if d.config.protocol == "modbus_tcp"]
    caplog.set_level("INFO", logger="drivers.modbus")
    pollers = make_pollers(modbus)
    assert len(pollers) == len({(d.config.host, d.config.port) for d in modbus})
    lines = [r.getMessage() for r in caplog.records if r.name == "drivers.modbus.tcp"]
    assert "workshop-meter: 1 request (input 0+76) for 14 points" in lines
    assert len(lines) == len(modbus)


HEAD = """\
protocol: modbus
points:
  - name: ok
    kind: holding
    address: 0
    type: uint16
"""  # the point under test starts on line 7

BAD_POINTS = [
    # (point lines, expected line, message fragment)
    ("  - name: v\n    kind: holding\n    address: 40001\n    type: uint16\n", 9,
     "address: 40001 looks like the manual's 4xxxx reference, not a 0-based address — write register: 40001"),
    ("  - name: v\n    kind: input\n    address: 30010\n    type: float32\n", 9, "(= input address 9)"),
    ("  - name: v\n    kind: holding\n    address: 0\n    type: bool\n", 10, "needs bit:"),
    ("  - name: v\n    kind: coil\n    address: 0\n    type: float32\n", 10, "type: float32 on a coil, which holds a single bit"),
    ("  - name: v\n    kind: holding\n    address: 0\n    type: string\n", 10, "type: string needs length:"),
    ("  - name: v\n    kind: holding\n    address: 0\n    type: uint16\n    length: 4\n", 11,
     "length: only for type: string"),
    ("  - name: v\n    kind: holding\n    address: 65535\n    type: float32\n", 9, "runs past 65535"),
    ("  - name: ok\n    kind: holding\n    address: 1\n    type: uint16\n", 7, "'ok' is already the name of point 1"),
    ("  - name: quality\n    kind: holding\n    address: 1\n    type: uint16\n", 7, "'quality' is reserved"),
    ("  - name: v\n    register: 40001\n    kind: holding\n    type: uint16\n", 8, "register: given together with kind:/address:"),
    ("  - name: v\n    register: 8\n    type: uint16\n", 8, "no register-type digit"),
    ("  - name: v\n    register: 20001\n    type: uint16\n", 8, "starts with 2, which is no register type"),
    ("  - name: v\n    kind: coil\n    address: 0\n    bit: 3\n", 10, "bit: only applies to a bool"),
    ("  - name: v\n    kind: holding\n    address: 0\n    type: string\n    length: 2\n    byte_order: CDAB\n", 12,
     "CDAB does not apply to strings"),
    ("  - name: v\n    kind: holding\n    address: 0\n    type: uint16\n    scael: 0.1\n", 11,
     "unknown key 'scael' — did you mean 'scale'?"),
    ("  - name: v\n    kind: holding\n    address: 0\n    type: uint16\n    byte_order: CBAD\n", 11,
     "byte_order: 'CBAD' is not allowed"),
    ("  - name: v\n    kind: holding\n    address: 0\n", 7, "type: is missing"),
    ("  - name: v\n    kind: holding\n    address: 0\n    type: uint16\n    valid: {min: 10, max: 0}\n", 11,
     "min 10.0 is above max 0.0"),
    ("  - name: v\n    kind: holding\n    address: 0\n    type: string\n    length: 100\n", 11,
     "do not fit in one request (max_registers: 20)"),
]


@pytest.mark.parametrize(("lines", "line", "fragment"), BAD_POINTS, ids=[f[2][:40] for f in BAD_POINTS])
def test_profile_errors_are_located(tmp_path: Path, lines: str, line: int, fragment: str) -> None:
    text = HEAD + lines
    if "length: 100" in lines:
        text = "max_registers: 20\n" + text
        line += 1
    write_config(tmp_path, {"meter": text})
    with pytest.raises(ConfigErrors) as caught:
        load_config(tmp_path)
    (error,) = caught.value.errors
    assert error.file.name == "meter.yaml"
    assert fragment in str(error)
    assert error.line == line, str(error)
    assert str(error).startswith(f"{error.file}:{line}:{error.col}: ")
    assert error.col > 1 or line == 7


def test_register_references_resolve(tmp_path: Path) -> None:
    points = """\
protocol: modbus
points:
  - {name: c, register: "00001"}
  - {name: d, register: 10002}
  - {name: i, register: 30001, type: float32}
  - {name: h, register: 40010, type: uint16}
  - {name: sunspec, register: 440002, type: uint16}
"""
    write_config(tmp_path, {"p": points})
    profile = load_config(tmp_path).profiles["p"]
    assert [(p.name, p.kind, p.address) for p in points_of(profile)] == [
        ("c", "coil", 0), ("d", "discrete", 1), ("i", "input", 0), ("h", "holding", 9), ("sunspec", "holding", 40001)]


DEVICE = """\
id: {id}
protocol: modbus_tcp
profile: p
host: 10.0.0.5
unit_id: {unit}
"""
PROFILE = "protocol: modbus\npoints:\n  - {name: v, kind: holding, address: 0, type: uint16}\n"


def test_same_unit_and_profile_twice_is_flagged(tmp_path: Path) -> None:
    write_config(tmp_path, {"p": PROFILE}, {"a": DEVICE.format(id="a", unit=3), "b": DEVICE.format(id="b", unit=3),
                                            "c": DEVICE.format(id="c", unit=4)})
    with pytest.raises(ConfigErrors) as caught:
        load_config(tmp_path)
    (error,) = caught.value.errors
    assert (error.file.name, error.line) == ("b.yaml", 5)
    assert "10.0.0.5:502 unit 3 is already polled as 'a'" in str(error) and "a copied file?" in str(error)


@pytest.mark.parametrize(("extra", "line", "fragment"), [
    ("unit_id: 256\n", 5, "unit_id: 256 is out of range"),
    ("port: 0\n", 5, "port: 0 is out of range"),
    ("max_gap: 200\n", 5, "max_gap: 200 is out of range"),
    ("timeout: 500\n", 5, "has no unit"),
])
def test_device_errors_are_located(tmp_path: Path, extra: str, line: int, fragment: str) -> None:
    device = "id: a\nprotocol: modbus_tcp\nprofile: p\nhost: 10.0.0.5\n" + extra
    write_config(tmp_path, {"p": PROFILE}, {"a": device})
    with pytest.raises(ConfigErrors) as caught:
        load_config(tmp_path)
    (error,) = caught.value.errors
    assert error.line == line and fragment in str(error), str(error)
