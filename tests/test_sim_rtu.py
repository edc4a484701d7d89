"""``sluice sim`` serving Modbus RTU: buses from a sim.yaml (on pseudo-terminals, or on a serial
port — here one end of a socat pty pair) and the RTU side of a gateway configuration directory
(serial buses at their line settings, serial device servers for RTU over TCP), each polled with
the gateway's own RTU drivers; located errors for a bad ``buses:`` block."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from drivers.modbus.errors import ModbusExceptionResponse
from drivers.modbus.rtu import SerialLink
from drivers.modbus.rtu_client import ModbusRtuClient
from gateway.yamlpos import ConfigErrors
from servers import _need, free_port, sluice_process
from simulators.modbus_rtu import RtuBus, RtuTcpServer
from simulators.simulation import SimServer, load_simulation, run_simulator
from support import DEADLINE, STOP, wait_for
from gateway.cli.commands import main

REPO = Path(__file__).resolve().parent.parent
PROFILE_YAML = """\
protocol: modbus
points:
  - {name: a, kind: holding, address: 0, type: uint16, sim: {signal: constant, value: 1234}}
  - {name: b, kind: holding, address: 1, type: uint16, sim: {signal: constant, value: 42}}
"""


def write_files(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def write_sim(tmp_path: Path, text: str) -> Path:
    return write_files(tmp_path, {"profiles/pair.yaml": PROFILE_YAML, "sim.yaml": text}) / "sim.yaml"


def write_gateway_config(directory: Path, devices: dict[str, str]) -> Path:
    return write_files(directory, {"gateway.yaml": "gateway:\n  id: gw1\n  site: farm\n",
                                   "profiles/pair.yaml": PROFILE_YAML,
                                   **{f"devices/{d}.yaml": f"id: {d}\nprofile: pair\n{text}\n" for d, text in devices.items()}})


async def read_registers(port: str, *units: int, baudrate: int = 9600, parity: str = "N") -> list[bytes | Exception]:
    """Holding registers 0-1 of each unit, through the gateway's RTU client (one open of the port:
    this kernel refuses to set parity on a pty a second time)."""
    client = ModbusRtuClient(SerialLink(port, baudrate, parity))
    results: list[bytes | Exception] = []
    async with client:
        await client.connect(1.0)
        for unit in units:
            try:
                results.append(await client.read(unit, 3, 0, 2, 1.0))
            except ModbusExceptionResponse as exc:
                results.append(exc)
    return results


@contextlib.asynccontextmanager
async def simulating(path: Path) -> AsyncIterator[list[SimServer]]:
    started: asyncio.Future[list[SimServer]] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(run_simulator(path, ready=started.set_result, stop=stop), name="sim")
    try:
        yield await asyncio.wait_for(started, DEADLINE)
    finally:
        stop.set()
        await task


async def test_sim_yaml_buses_are_served_on_ptys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sim(tmp_path, """\
buses:
  - link: rtu0                 # relative to this file
    baudrate: 19200
    parity: O                  # (this kernel's ptys refuse even parity: EINVAL)
    devices:
      - {profile: pair, unit_id: 3}
      - {profile: pair, unit_id: 9, faults: {exception: 4}}
  - devices: [{profile: pair, unit_id: 1}]
""")
    async with simulating(path) as servers:
        first, second = servers
        assert isinstance(first, RtuBus) and isinstance(second, RtuBus)
        assert (first.baudrate, first.parity, sorted(first.devices)) == (19200, "O", [3, 9])
        three, nine = await read_registers(str(tmp_path / "rtu0"), 3, 9, baudrate=19200, parity="O")
        assert three == bytes.fromhex("04d2002a")
        assert isinstance(nine, ModbusExceptionResponse) and nine.code == 4
        assert await read_registers(second.path, 1) == [bytes.fromhex("04d2002a")]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"RTU bus on {tmp_path / 'rtu0'} at 19200 8O1: 2 units") and out[1] == f"port: {tmp_path / 'rtu0'}"
    assert out[3] == f"port: {second.path}" and second.path.startswith("/dev/pts/")
    assert not (tmp_path / "rtu0").exists()  # the link goes with the simulator


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as exc:
        load_simulation(path)
    return [str(e).replace(str(path), "sim.yaml") for e in exc.value.errors]


def test_sim_yaml_bus_errors_are_located(tmp_path: Path) -> None:
    path = write_sim(tmp_path, """\
buses:
  - baudrate: 9600
    devices:
      - {profile: pair, unit_id: 1}
      - {profile: pari, unit_id: 2}
      - {profile: pair, unit_id: 1}
      - {profile: pair, unit_id: 4, faults: {crc: 2}}
""")
    assert errors_of(path) == ["sim.yaml:7:51: crc: 2 is out of range (input should be less than or equal to 1) — "
                     "choose a value in range"]
    (tmp_path / "sim.yaml").write_text(path.read_text().replace("crc: 2", "crc: 0.5"))
    assert errors_of(path) == [
        "sim.yaml:5:19: unknown profile 'pari' — did you mean 'pair'?",
        "sim.yaml:6:34: unit id 1 is already on this bus (pair/1) — give each device on one bus its own unit_id",
    ]
    (tmp_path / "sim.yaml").write_text("buses:\n  - link: a\n    serial_port: /dev/ttyS9\n    devices: [{profile: pair, unit_id: 1}]\n")
    assert errors_of(path) == ["sim.yaml:2:5: give link: (a pty, linked there) or serial_port: (a real port), not both"]
    (tmp_path / "sim.yaml").write_text("host: 127.0.0.1\n")
    assert errors_of(path) == [
        "sim.yaml:1:1: nothing to simulate — add `devices:` (Modbus TCP) or `buses:` (Modbus RTU)"]


@pytest.fixture
def socat_pair(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two linked pseudo-terminals, as a null-modem cable between two serial ports."""
    binary = _need("/usr/bin/socat", "socat")
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    proc = subprocess.Popen([binary, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: a.exists() and b.exists(), what="socat's two ptys")
        yield a, b
    finally:
        proc.terminate()
        proc.wait(timeout=STOP)


async def test_sim_yaml_bus_on_a_serial_port(tmp_path: Path, socat_pair: tuple[Path, Path]) -> None:
    simulator_end, gateway_end = socat_pair
    path = write_sim(tmp_path, f"buses:\n  - serial_port: {simulator_end}\n    devices: [{{profile: pair, unit_id: 5}}]\n")
    async with simulating(path) as (bus,):
        assert bus.path == str(simulator_end)
        assert await read_registers(str(gateway_end), 5) == [bytes.fromhex("04d2002a")]
        assert bus.stats.count(unit=5) == 1


def test_sluice_sim_serves_a_gateway_configs_rtu_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`sluice sim -c DIR` serves the serial buses, RTU-over-TCP converters and DTUs of a gateway
    configuration as written; `sluice once -c DIR` then reads every device."""
    bus, tcp_port, dtu_port = tmp_path / "ttyRS485", free_port(), free_port()
    dtu = f"protocol: modbus_rtu_dtu\nlisten: 127.0.0.1:{dtu_port}\ndtu: {{id: barn, registration: {{text: BARN}}}}"
    write_gateway_config(tmp_path, {
        "m1": f"protocol: modbus_rtu\nport: {bus}\nbaudrate: 38400\nparity: O\nunit_id: 1\ntimeout: 500ms",
        "m2": f"protocol: modbus_rtu\nport: {bus}\nbaudrate: 38400\nparity: O\nunit_id: 2\ntimeout: 500ms",
        "c7": f"protocol: modbus_rtu_tcp\nhost: 127.0.0.1\nport: {tcp_port}\nunit_id: 7\ntimeout: 500ms",
        "d3": f"{dtu}\nunit_id: 3\ntimeout: 500ms"})
    with sluice_process("sim", "-c", str(tmp_path)) as sim:
        assert sim.stdout is not None
        lines = [sim.stdout.readline().strip() for _ in range(4)]
        assert lines == [f"RTU bus on {bus} at 38400 8O1: 2 units — 1 (m1), 2 (m2)", f"port: {bus}",
                         f"RTU over TCP on 127.0.0.1:{tcp_port}: 1 units — 7 (c7)",
                         f"DTU dialling in to 127.0.0.1:{dtu_port}, registering as b'BARN': 1 units — 3 (d3)"], lines
        assert main(["once", "-c", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        for dev_id in ("m1", "m2", "c7", "d3"):
            assert f"{dev_id} (good)" in out, out
    assert not bus.exists()


def test_gateway_config_rtu_on_a_real_device_path_gets_a_fresh_pty(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    write_gateway_config(tmp_path, {"m": "protocol: modbus_rtu\nport: /dev/ttyUSB9"})
    (bus,) = load_simulation(tmp_path)
    assert isinstance(bus, RtuBus) and not isinstance(bus, RtuTcpServer) and bus.link is None
    assert any("devices m use /dev/ttyUSB9, which the simulator cannot take over" in r.getMessage()
               for r in caplog.records)
