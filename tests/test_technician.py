"""What a technician meets on site: `sluice once` output, a reader that stops early (`| head`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import yaml

from drivers.modbus.profile import ProfileModel
from simulators.modbus_device import SimDevice
from simulators.modbus_tcp import ModbusTcpServer
from gateway.cli.commands import main
from gateway.encode import InfluxEncoder
from gateway.reading import Reading
from gateway.encode import tag_problem
from gateway.config import ConfigErrors, load_config

SLUICE = [sys.executable, "-m", "gateway.cli"]

METER = """\
protocol: modbus
measurement: energy
points:
  - {name: energy, kind: holding, address: 0, type: float32, unit: kWh, sim: {signal: constant, value: 14785.4794921875}}
  - {name: power, kind: holding, address: 2, type: float32, unit: W, sim: {signal: constant, value: 4928.493}}
  - {name: tenths, kind: holding, address: 4, type: float32, scale: 0.1, unit: V, sim: {signal: constant, value: 230.3}}
  - {name: precise, kind: holding, address: 6, type: float64, sim: {signal: constant, value: 0.1}}
  - {name: count, kind: holding, address: 10, type: uint32, sim: {signal: constant, value: 70000}}
"""


def meter_config(directory: Path, port: int) -> Path:
    (directory / "profiles").mkdir(parents=True)
    (directory / "devices").mkdir()
    (directory / "profiles" / "meter.yaml").write_text(METER)
    (directory / "gateway.yaml").write_text(yaml.safe_dump({
        "gateway": {"id": "gw", "site": "lab"}, "buffer": {"path": str(directory / "outbox.db")},
        "health": {"enabled": False}}))
    (directory / "devices" / "meter.yaml").write_text(yaml.safe_dump({
        "id": "meter", "protocol": "modbus_tcp", "profile": "meter", "host": "127.0.0.1", "port": port,
        "interval": "5s", "timeout": "2s"}))
    return directory


def meter_server() -> ModbusTcpServer:
    return ModbusTcpServer([SimDevice(ProfileModel.model_validate(yaml.safe_load(METER)), 1)])


async def test_once_prints_units_and_each_value_at_its_types_precision(tmp_path: Path) -> None:
    async with meter_server() as server:
        config = meter_config(tmp_path, server.port)
        proc = await asyncio.create_subprocess_exec(*SLUICE, "once", "-c", str(config), stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    lines = [line.split() for line in out.decode().splitlines()[1:]]
    assert lines == [["energy", "14785.4795", "kWh"], ["power", "4928.493", "W"], ["tenths", "230.3", "V"],
                     ["precise", "0.1"], ["count", "70000"]], out.decode()


def _closed_early(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run ``args`` with stdout a pipe whose reader is gone before anything is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(args, stdout=write, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write)
    return proc


async def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    async with meter_server() as server:
        config = meter_config(tmp_path, server.port)
        runs = [await asyncio.to_thread(_closed_early, [*SLUICE, *args]) for args in (
            ["once", "-c", str(config)],
            ["read", f"127.0.0.1:{server.port}", "--kind", "holding", "--address", "0", "--count", "12"])]
    await asyncio.get_running_loop().shutdown_default_executor()
    for proc in runs:
        assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr, proc.stderr.decode()
        assert proc.stderr == b"", proc.stderr.decode()
        assert proc.returncode == 1


def test_a_warning_is_located_and_check_still_passes(tmp_path: Path, capsys) -> None:
    config = meter_config(tmp_path, 5020)
    device = tmp_path / "devices" / "meter.yaml"
    device.write_text(device.read_text().replace("timeout: 2s", "timeout: 9s"))
    assert main(["check", "-c", str(config)]) == 0
    err = capsys.readouterr().err
    assert f"{device}:" in err or "devices/meter.yaml:" in err
    assert ": warning: timeout 9s is longer than interval 5s" in err, err


# --------------------------------------------------------------------------- tag values stored exactly
STORABLE = ["plain", " cold room 1 ", "a b", "a,b", "a=b", "C:\\temp", "x\\y\\z", "温室 一号", "q\"uote",
            "=lead", ",lead", "trail=", "trail,"]
STORABLE_VALUES = ["a\\=b"]  # as a value only: a key with a backslash before '=' splits in VictoriaMetrics
REFUSED = ["ends\\", "a\\,b", "a\\ b", "a\\\\b", "\\\\"]


def _tagged_line(i: int, value: str, key: str) -> bytes:
    reading = Reading(f"d{i}", 1_700_000_000_000_000_000 + i, {"x": 1.0}, {"n": str(i), "v": value, key: "k"},
                      measurement="tagged")
    return InfluxEncoder().item(reading)


def test_tag_values_are_refused_exactly_when_influxdb_and_victoriametrics_would_differ() -> None:
    assert [v for v in STORABLE if tag_problem(v) or tag_problem(v, key=True)] == []
    assert [v for v in STORABLE_VALUES if tag_problem(v) or not tag_problem(v, key=True)] == []
    assert [v for v in REFUSED if tag_problem(v) is None or tag_problem(v, key=True) is None] == []


def test_every_storable_tag_is_stored_exactly_by_influxd_and_victoriametrics(influxd, victoria_metrics) -> None:
    cases = [(v, v) for v in STORABLE] + [(v, "key") for v in STORABLE_VALUES]
    lines = [_tagged_line(i, value, key) for i, (value, key) in enumerate(cases)]
    for line in lines:  # one request per line: a refused line names itself
        assert influxd.request("/write?db=sluice", line)[0] == 204, line
        assert victoria_metrics.request("/write", line)[0] == 204, line
    got_influx: dict[int, tuple[object, object]] = {}
    for series in influxd.query("SELECT * FROM tagged", db="sluice"):
        for row in series["values"]:
            r = dict(zip(series["columns"], row))
            got_influx[int(r["n"])] = (r["v"], next(k for k, v in r.items() if v == "k"))
    got_vm = {int(e["metric"]["n"]): (e["metric"]["v"], next(k for k, v in e["metric"].items() if v == "k"))
              for e in victoria_metrics.export('{__name__=~"tagged.*"}')}
    expected = dict(enumerate(cases))
    assert got_influx == expected
    assert got_vm == expected


def test_a_devices_tags_keep_their_spaces(tmp_path: Path) -> None:
    config = meter_config(tmp_path, 5020)
    device = tmp_path / "devices" / "meter.yaml"
    device.write_text(device.read_text() + "tags: {room: ' cold room 1 ', ' odd key': x}\n")
    tags = load_config(config).devices[0].tags
    assert tags["room"] == " cold room 1 " and tags[" odd key"] == "x"


def test_one_serial_port_under_two_names_is_claimed_twice(tmp_path: Path) -> None:
    """A /dev/serial/by-id/ link and the port it points at are one port: a Modbus RTU device on one
    and a serial sensor on the other are refused, at the second claim, naming the first."""

    config = meter_config(tmp_path, 5020)
    port = tmp_path / "ttyUSB0"
    port.write_text("")
    (tmp_path / "by-id").mkdir()
    (tmp_path / "by-id" / "usb-FTDI-port0").symlink_to(port)
    (tmp_path / "profiles" / "th.yaml").write_text(
        "protocol: serial\nformat: lines\npattern: '^T=(?P<t>[-0-9.]+)$'\nfields: {t: {type: float}}\n")
    (tmp_path / "devices" / "pump.yaml").write_text(
        f"id: pump\nprotocol: modbus_rtu\nprofile: meter\nport: {tmp_path / 'by-id' / 'usb-FTDI-port0'}\n")
    (tmp_path / "devices" / "th.yaml").write_text(f"id: th\nprotocol: serial\nprofile: th\nport: {port}\n")
    try:
        load_config(config)
    except ConfigErrors as exc:
        (error,) = exc.errors
    else:
        raise AssertionError("the port was claimed twice without an error")
    assert error.file.name == "th.yaml" and (error.line, error.col) == (4, 7)
    assert f"serial port {port} is already used by 'pump' (" in error.message
    assert "pump.yaml:4:7, modbus_rtu)" in error.message
