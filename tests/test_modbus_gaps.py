"""A request the planner merged across registers the device does not have: the device answers
exception 2; the poller splits it, reads the parts, keeps the working plan and says so once.
Against our simulator (a sparse register map) and pymodbus's server as the reference."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from drivers.modbus.profile import ProfileModel
from drivers.modbus.tcp import make_pollers
from gateway.config import load_config
from gateway.reading import GOOD
from simulators.modbus_device import SimDevice
from simulators.modbus_tcp import ModbusTcpServer
from pymodbus.server import ModbusTcpServer as ReferenceServer
from pymodbus.simulator import DataType, SimData
from pymodbus.simulator import SimDevice as ReferenceDevice
from drivers.modbus.codec import encode
from drivers.modbus.profile import points_of

# 13 float32 at holding 0..25 and 5 uint16 at 30..34: 18 points, merged by max_gap 8 into holding 0+35
POINTS = [{"name": f"f{a}", "kind": "holding", "address": a, "type": "float32",
           "sim": {"signal": "constant", "value": a + 0.5}} for a in range(0, 26, 2)]
POINTS += [{"name": f"u{a}", "kind": "holding", "address": a, "type": "uint16",
            "sim": {"signal": "constant", "value": a}} for a in range(30, 35)]
PROFILE = {"protocol": "modbus", "points": POINTS}
EXPECTED = {**{f"f{a}": a + 0.5 for a in range(0, 26, 2)}, **{f"u{a}": a for a in range(30, 35)}}


def write_config(root: Path, port: int) -> Path:
    for sub in ("profiles", "devices"):
        (root / sub).mkdir()
    (root / "gateway.yaml").write_text("gateway: {id: gw, site: s}\n")
    (root / "profiles" / "gappy.yaml").write_text(yaml.safe_dump(PROFILE))
    (root / "devices" / "gappy.yaml").write_text(
        f"id: gappy\nprotocol: modbus_tcp\nprofile: gappy\nhost: 127.0.0.1\nport: {port}\ntimeout: 2s\nretries: 0\n")
    return root


@contextlib.asynccontextmanager
async def our_simulator() -> AsyncIterator[int]:
    profile = ProfileModel.model_validate(PROFILE)
    async with ModbusTcpServer([SimDevice(profile, 1, sparse=True)]) as server:
        yield server.port


@contextlib.asynccontextmanager
async def pymodbus_server() -> AsyncIterator[int]:
    words: dict[int, int] = {}
    for point in points_of(ProfileModel.model_validate(PROFILE)):
        for i, word in enumerate(encode(point, EXPECTED[point.name])):
            words[point.address + i] = int(word)
    blocks = [SimData(0, values=[words[a] for a in range(26)], datatype=DataType.REGISTERS),
              SimData(30, values=[words[a] for a in range(30, 35)], datatype=DataType.REGISTERS)]
    bits = [SimData(0, values=[False], datatype=DataType.BITS)]  # pymodbus needs every table
    one = [SimData(0, values=[0], datatype=DataType.REGISTERS)]
    server = ReferenceServer(ReferenceDevice(id=1, simdata=(bits, bits, blocks, one)), address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    try:
        yield server.transport.sockets[0].getsockname()[1]
    finally:
        await server.shutdown()


@pytest.mark.parametrize("server", [our_simulator, pymodbus_server], ids=["simulator", "pymodbus"])
async def test_a_merged_request_refused_with_exception_2_is_split_and_the_plan_kept(
        server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="drivers.modbus")
    async with server() as port:
        config = load_config(write_config(tmp_path, port))
        (poller,) = make_pollers(config.devices)
        assert [str(r) for r in poller.plans["gappy"]] == ["holding 0+35"]
        async with poller:
            readings = [await poller.poll_once() for _ in range(3)]
    for (reading,) in readings:
        assert reading.fields == EXPECTED and reading.quality == GOOD
    assert [str(r) for r in poller.plans["gappy"]] == ["holding 0+26", "holding 30+5"]
    assert poller.status["gappy"].errors == {}
    said = [m for m in caplog.messages if "exception 2" in m]
    assert len(said) == 1, said
    assert said[0].startswith("gappy: ") and "holding 0+35" in said[0] and "holding 0+26, holding 30+5" in said[0]
    assert "max_gap: 3" in said[0]
