"""The device profile library (config/profiles/): every profile of a real device names the
published register map it was written from, loads through the loader `sluice check` uses, is
played by the simulator and read back — one read of every point — through the real Modbus TCP
driver with each value inside its valid range; and the worked examples printed in the manuals,
served as literal words by pymodbus's server, decode to the values the manuals print."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from servers import pymodbus_server

from drivers.modbus.profile import ProfileModel, points_of
from drivers.modbus.rtu import make_pollers as make_rtu_pollers
from drivers.modbus.tcp import make_pollers
from gateway.config import Config, load_config
from gateway.reading import GOOD, Reading
from gateway.validation import validate_doc
from gateway.yamlpos import ConfigError, load_yaml
from simulators.modbus_rtu import RtuBus
from simulators.modbus_device import SimDevice
from simulators.modbus_tcp import ModbusTcpServer

PROFILES = Path(__file__).resolve().parent.parent / "config" / "profiles"

EXAMPLES = frozenset({
    # Configuration examples of the README and `sluice init`, not models of one product: no source.
    "barcode-reader", "coldroom-controller", "gps-nmea", "greenhouse-th", "pms5003", "rfid-em4100",
    "scale-continuous", "serial-co2-request", "serial-th-stream",
})
LIBRARY = sorted(p.stem for p in PROFILES.glob("*.yaml") if p.stem not in EXAMPLES)

SOURCE_KEYS = ("title", "version", "url", "verified")


def source_of(path: Path) -> dict[str, str]:
    """The profile's ``source:`` block as key -> text, read through the profile model `sluice check`
    uses (gateway.driver.ProfileSource). Empty if the profile has none."""
    errors: list[ConfigError] = []
    doc, errs = load_yaml(path, path)
    assert doc is not None and not errs, errs
    profile = validate_doc(doc, ProfileModel, errors)
    assert profile is not None, [str(e) for e in errors]
    return {} if profile.source is None else {k: v for k, v in profile.source.model_dump().items() if v is not None}


def write_config(root: Path, names: list[str], devices: dict[str, str] | None = None) -> Path:
    for sub in ("profiles", "devices"):
        (root / sub).mkdir(exist_ok=True)
    (root / "gateway.yaml").write_text("gateway: {id: gw, site: s}\n")
    for name in names:
        shutil.copy(PROFILES / f"{name}.yaml", root / "profiles" / f"{name}.yaml")
    for dev_id, text in (devices or {}).items():
        (root / "devices" / f"{dev_id}.yaml").write_text(text)
    return root


def device_yaml(profile: str, port: int, unit: int) -> str:
    return (f"id: lib\nprotocol: modbus_tcp\nprofile: {profile}\nhost: 127.0.0.1\nport: {port}\n"
            f"unit_id: {unit}\ntimeout: 5s\nretries: 1\n")


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Every shipped profile loaded together, as `sluice check -c` loads a configuration."""
    return load_config(write_config(tmp_path_factory.mktemp("library"), [p.stem for p in PROFILES.glob("*.yaml")]))


# --------------------------------------------------------------------------- the library
def test_the_library_holds_at_least_30_real_devices(library: Config) -> None:
    assert len(LIBRARY) >= 30, LIBRARY
    assert EXAMPLES <= set(library.profiles), "an example profile was renamed: update EXAMPLES"
    assert set(LIBRARY) <= set(library.profiles)
    for name in ("eastron-sdm630", "eastron-sdm120", "chint-dtsu666", "chint-ddsu666", "abb-b23", "schneider-iem3250",
                 "delta-ms300", "invt-gd20", "schneider-atv320", "renke-rs-ws-n01-8", "dfrobot-sen0605"):
        assert name in LIBRARY, name


@pytest.mark.parametrize("name", LIBRARY)
def test_every_library_profile_names_its_source(name: str) -> None:
    source = source_of(PROFILES / f"{name}.yaml")
    missing = [key for key in SOURCE_KEYS if not source.get(key)]
    assert not missing, f"{name}.yaml: the '# source:' header block lacks {missing}"
    assert source["url"].startswith(("http://", "https://")), f"{name}.yaml: source url {source['url']!r}"
    if source["verified"].startswith(("false", "partial")):
        # Whatever is doubtful says so where it is, or the header explains which part is partial.
        text = (PROFILES / f"{name}.yaml").read_text(encoding="utf-8")
        assert "UNVERIFIED" in text or "not yet checked" in source["verified"], name


@pytest.mark.parametrize("name", LIBRARY)
def test_every_point_declares_a_range_and_a_signal(library: Config, name: str) -> None:
    profile = library.profiles[name]
    assert isinstance(profile, ProfileModel)
    assert profile.manufacturer and profile.model and profile.description
    for model in profile.points:
        assert model.sim is not None, f"{name}: {model.name} has no sim: signal"
        if model.point_type not in ("bool", "string"):
            assert model.valid is not None and model.valid.min is not None and model.valid.max is not None, \
                f"{name}: {model.name} needs valid: {{min, max}} — the range the manual gives"


def test_the_source_block_is_read_by_the_model_and_a_header_comment_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    point = "points: [{name: v, register: 30001, type: uint16}]\n"
    path.write_text("# Title\n#\n# source:\n#   title: not a field\nprotocol: modbus\nsource:\n  title: A manual\n"
                    "  version: V1\n  url: >-\n    https://x/y\n  verified: >-\n    partial — one\n    transcription\n"
                    + point)
    assert source_of(path) == {"title": "A manual", "version": "V1", "url": "https://x/y",
                               "verified": "partial — one transcription"}
    path.write_text("# no block\nprotocol: modbus\n" + point)
    assert source_of(path) == {}
    errors: list[ConfigError] = []
    path.write_text("protocol: modbus\nsource: {title: A manual, version: V1, url: ftp://x/y, verified: no}\n" + point)
    doc, _errs = load_yaml(path, Path("p.yaml"))
    assert doc is not None and validate_doc(doc, ProfileModel, errors) is None
    assert {(e.line, e.message.split(":")[0]) for e in errors} == {(2, "url"), (2, "verified")}, [str(e) for e in errors]


def test_unverified_points_are_marked_in_the_model() -> None:
    """Every point under a ``# UNVERIFIED`` comment carries ``verified: false`` (what `sluice profile
    show` prints), and a profile marked so says ``partial`` or ``false``, or names the doubt, in its source."""
    for name in LIBRARY:
        text = (PROFILES / f"{name}.yaml").read_text(encoding="utf-8")
        profile = source_profile(name)
        marked = [p.name for p in profile.points if p.verified is False]
        comments = text.count("# UNVERIFIED")
        assert bool(marked) == bool(comments), f"{name}: {comments} UNVERIFIED comments, points marked: {marked}"
        if marked:
            verified = source_of(PROFILES / f"{name}.yaml")["verified"]
            assert verified.startswith(("false", "partial")) or "UNVERIFIED" in verified or "UNVERIFIED" in text, name


def source_profile(name: str) -> ProfileModel:
    doc, _errs = load_yaml(PROFILES / f"{name}.yaml", Path(f"{name}.yaml"))
    assert doc is not None
    profile = validate_doc(doc, ProfileModel, [])
    assert isinstance(profile, ProfileModel)
    return profile


# --------------------------------------------------------------------------- simulator + driver
def within(value: Any, low: float | None, high: float | None) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    # a float32 value and a scaled integer carry a rounding step; a bound is met within it
    slack = 1e-6 * max(1.0, abs(low or 0.0), abs(high or 0.0))
    return (low is None or value >= low - slack) and (high is None or value <= high + slack)


def check_reading(name: str, profile: ProfileModel, reading: Reading) -> None:
    assert reading.quality == GOOD, f"{name}: {reading.quality} {reading.fields}"
    assert set(reading.fields) == {p.name for p in profile.points}
    for point in points_of(profile):
        value = reading.fields[point.name]
        if point.type == "bool":
            assert isinstance(value, bool), (name, point.name, value)
        else:
            assert within(value, point.min, point.max), f"{name}: {point.name} = {value!r} outside {point.min}..{point.max}"


async def read_once(root: Path, name: str, port: int, unit: int) -> list[Reading]:
    config = load_config(write_config(root, [name], {"lib": device_yaml(name, port, unit)}))
    (poller,) = make_pollers(config.devices)
    async with poller:
        return await poller.poll_once()


@pytest.mark.parametrize("name", LIBRARY)
async def test_the_simulator_plays_the_profile_and_one_read_of_every_point_is_valid(
        library: Config, tmp_path: Path, name: str) -> None:
    profile = library.profiles[name]
    async with ModbusTcpServer([SimDevice(profile, 7, name=name)]) as server:
        readings = await read_once(tmp_path, name, server.port, 7)
    assert len(readings) == 1, f"{name}: no reading — {readings}"
    check_reading(name, profile, readings[0])


async def test_the_whole_library_on_one_simulated_rs485_bus(library: Config, tmp_path: Path) -> None:
    """Where these devices live: every library profile as its own unit id on one RTU bus (a pty),
    read once through the Modbus RTU driver — serial framing, CRC and inter-frame timing included."""
    units = {name: unit for unit, name in enumerate(LIBRARY, start=1)}
    async with RtuBus([SimDevice(library.profiles[name], unit, name=name) for name, unit in units.items()]) as bus:
        devices = {f"u{unit}": (f"id: u{unit}\nprotocol: modbus_rtu\nprofile: {name}\nport: {bus.path}\n"
                                f"unit_id: {unit}\ntimeout: 5s\nretries: 1\n") for name, unit in units.items()}
        config = load_config(write_config(tmp_path, LIBRARY, devices))
        (poller,) = make_rtu_pollers(config.devices)
        async with poller:
            readings = await poller.poll_once()
    by_device = {r.device: r for r in readings}
    assert set(by_device) == set(devices), sorted(set(devices) - set(by_device))
    for name, unit in units.items():
        check_reading(name, library.profiles[name], by_device[f"u{unit}"])


# --------------------------------------------------------------------------- the manuals' examples
# (profile, kind, {address: word as printed in the source}, {field: value the source derives})
WORKED: list[tuple[str, str, dict[int, int], dict[str, float]]] = [
    # Renke RS-WS-N01-TR manual: reply 01 03 04 02 92 FF 9B
    ("renke-rs-ws-n01-tr", "holding", {0: 0x0292, 1: 0xFF9B}, {"moisture": 65.8, "temperature": -10.1}),
    # Renke-style soil three-in-one example: 01 EF / 01 44 / 00 04
    ("renke-rs-ecth-n01", "holding", {0: 0x01EF, 1: 0x0144, 2: 0x0004},
     {"moisture": 49.5, "temperature": 32.4, "conductivity": 4}),
    # Renke RS-FX-N01 manual 4.5: 00 02 00 5A = gear 2 (east), 90 °
    ("renke-rs-fx-n01", "holding", {0: 0x0002, 1: 0x005A}, {"wind_direction_gear": 2, "wind_direction": 90}),
    # XUNCHIP XM9505 page: 02 18 = 536 tips x 0.1 mm
    ("sonbest-xm9505", "holding", {0: 0x0218}, {"rainfall": 53.6}),
    # KLHA KM35B91 page: 839 read = 8390 lux
    ("klha-km35b91", "holding", {0: 839}, {"illuminance": 8390}),
    # SenseCAP soil guide 5.3: 0702H = 17.94 °C, 071DH = 18.21 %, 071DH = 1821 µS/cm
    ("seeed-s-soil-mtec-02", "holding", {0: 0x0702, 1: 0x071D, 2: 0x071D},
     {"temperature": 17.94, "moisture": 18.21, "conductivity": 1821}),
    # XY-MD02 manual: 0131H = 30.5 °C, 0222H = 54.6 %; FF33H = -20.5 °C
    ("xy-md02", "input", {1: 0x0131, 2: 0x0222}, {"temperature": 30.5, "humidity": 54.6}),
    ("xy-md02", "input", {1: 0xFF33, 2: 0x0222}, {"temperature": -20.5}),
    # Tasmota DDSU666 driver: 43 66 33 34 = 230.2 V
    ("chint-ddsu666", "input", {0x2000: 0x4366, 0x2001: 0x3334}, {"voltage": 230.2}),
    # lechacal PZEM-016 page: 09 BF = 249.5 V
    ("peacefair-pzem-016", "input", {0: 0x09BF}, {"voltage": 249.5}),
]


def _runs(words: dict[int, int]) -> dict[int, list[int]]:
    """{address: word} -> {start: words} of contiguous runs (short holes filled with 0, as a device's
    unused registers); one unused register far away when there is nothing (pymodbus wants a block)."""
    words = words or {0xFF00: 0}
    runs: dict[int, list[int]] = {}
    start = previous = -1
    for address in sorted(words):
        if start < 0 or address - previous > 32:
            start, previous = address, address - 1
            runs[start] = []
        runs[start].extend([0] * (address - previous - 1) + [words[address]])
        previous = address
    return runs


@pytest.mark.parametrize(("name", "kind", "words", "expected"), WORKED,
                         ids=[f"{w[0]}-{i}" for i, w in enumerate(WORKED)])
async def test_the_manuals_worked_examples_decode_to_the_manuals_values(
        library: Config, tmp_path: Path, name: str, kind: str, words: dict[int, int], expected: dict[str, float]) -> None:
    profile = library.profiles[name]
    image: dict[str, dict[int, int]] = {"holding": {}, "input": {}}
    for point in points_of(profile):  # every register the profile reads exists, 0 unless the example sets it
        image.setdefault(point.kind, {}).update({a: 0 for a in range(point.address, point.end)})
    image[kind].update(words)
    async with pymodbus_server(3, coils=[False], discrete=[False], holding=_runs(image["holding"]),
                               inputs=_runs(image["input"])) as port:
        (reading,) = await read_once(tmp_path, name, port, 3)
    for field, value in expected.items():
        assert reading.fields[field] == pytest.approx(value, rel=1e-6), (name, field, reading.fields)


def test_docs_list_every_profile_with_its_source() -> None:
    text = (PROFILES.parent.parent / "docs" / "profiles.md").read_text(encoding="utf-8")
    for name in LIBRARY:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"docs/profiles.md has no row for {name}"
        assert source_of(PROFILES / f"{name}.yaml")["url"] in row, f"docs/profiles.md: {name}'s source url"
