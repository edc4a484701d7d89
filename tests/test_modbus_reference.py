"""Our driver against pymodbus's server serving a register image written by hand in hex.

The image is literal words copied from the manuals' encoding rules — not produced by our
encoder — and served by an independent Modbus implementation, so a byte-order or framing bug
in our codec or client cannot cancel out against the same bug in our own simulator.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from servers import pymodbus_server

from drivers.modbus.client import ModbusTcpClient
from drivers.modbus.errors import ModbusExceptionResponse
from drivers.modbus.tcp import make_pollers
from gateway.config import load_config
from gateway.reading import GOOD, UNCERTAIN

HOLDING = {
    0: [0x3FC0, 0x0000],                   # f_abcd   float32 ABCD 1.5
    2: [0x0000, 0x3FC0],                   # f_cdab   float32 CDAB 1.5
    4: [0x20C0, 0x0000],                   # f_badc   float32 BADC -2.5 (0xC0200000)
    6: [0x0000, 0x20C0],                   # f_dcba   float32 DCBA -2.5
    8: [0xFF85],                           # i16      int16 -123
    9: [0xFFFF],                           # u16      uint16 65535
    10: [0xFFFF, 0xFFFE],                  # i32      int32 ABCD -2
    12: [0x86A0, 0x0001],                  # u32_cdab uint32 CDAB 100000
    14: [0x8000, 0x0000, 0x0000, 0x0000],  # i64_min  int64 -2**63
    18: [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF],  # u64_max  uint64 2**64-1
    22: [0x0708, 0x0506, 0x0304, 0x0102],  # i64_cdab int64 CDAB 0x0102030405060708
    26: [0xBFB9, 0x9999, 0x9999, 0x999A],  # d_abcd   float64 -0.1
    30: [0x0000, 0x0000, 0x0000, 0x3FF8],  # d_cdab   float64 CDAB 1.5
    34: [0x5344, 0x4D36, 0x3330, 0x0000],  # model    string "SDM630" + NULs
    38: [0xFF85],                          # temp     int16 x0.1 -12.3
    39: [0x8009],                          # bits 0, 3 and 15 set
    40: [0x7FC0, 0x0000],                  # nan      float32 NaN: left out
    42: [650],                             # offset   uint16 x0.1 -40 = 25.0
    100: [0x7856, 0x3412],                 # i32_dcba int32 DCBA 0x12345678 (own request)
}
INPUT = {0: [0x1234], 1: [0x4366, 0x4CCD]}  # 0x1234; float32 230.3
COILS = [True, False, True, True, False, False, False, False, True, False]
DISCRETE = [False, True]

PROFILE = """\
protocol: modbus
max_gap: 8
points:
  - {name: f_abcd, kind: holding, address: 0, type: float32}
  - {name: f_cdab, kind: holding, address: 2, type: float32, byte_order: CDAB}
  - {name: f_badc, kind: holding, address: 4, type: float32, byte_order: BADC}
  - {name: f_dcba, kind: holding, address: 6, type: float32, byte_order: DCBA}
  - {name: i16, register: 40009, type: int16}
  - {name: u16, kind: holding, address: 9, type: uint16}
  - {name: i32, kind: holding, address: 10, type: int32}
  - {name: u32_cdab, kind: holding, address: 12, type: uint32, byte_order: CDAB}
  - {name: i64_min, kind: holding, address: 14, type: int64}
  - {name: u64_max, kind: holding, address: 18, type: uint64}
  - {name: i64_cdab, kind: holding, address: 22, type: int64, byte_order: CDAB}
  - {name: d_abcd, kind: holding, address: 26, type: float64}
  - {name: d_cdab, kind: holding, address: 30, type: float64, byte_order: CDAB}
  - {name: model, kind: holding, address: 34, type: string, length: 4}
  - {name: temp, kind: holding, address: 38, type: int16, scale: 0.1, unit: °C}
  - {name: bit0, kind: holding, address: 39, bit: 0}
  - {name: bit1, kind: holding, address: 39, bit: 1}
  - {name: bit3, kind: holding, address: 39, bit: 3}
  - {name: bit15, kind: holding, address: 39, bit: 15}
  - {name: nan, kind: holding, address: 40, type: float32}
  - {name: offset, kind: holding, address: 42, type: uint16, scale: 0.1, offset: -40}
  - {name: i32_dcba, kind: holding, address: 100, type: int32, byte_order: DCBA}
  - {name: in_u16, register: 30001, type: uint16}
  - {name: in_f32, kind: input, address: 1, type: float32}
  - {name: c0, register: "00001"}
  - {name: c2, kind: coil, address: 2}
  - {name: c3, kind: coil, address: 3}
  - {name: c8, kind: coil, address: 8}
  - {name: c9, kind: coil, address: 9}
  - {name: d0, kind: discrete, address: 0}
  - {name: d1, register: 10002}
"""

EXPECTED = {
    "f_abcd": 1.5, "f_cdab": 1.5, "f_badc": -2.5, "f_dcba": -2.5, "i16": -123, "u16": 65535, "i32": -2,
    "u32_cdab": 100_000, "i64_min": -(2**63), "u64_max": 2**64 - 1, "i64_cdab": 0x0102030405060708,
    "d_abcd": -0.1, "d_cdab": 1.5, "model": "SDM630", "temp": -12.3, "bit0": True, "bit1": False,
    "bit3": True, "bit15": True, "offset": 25.0, "i32_dcba": 0x12345678, "in_u16": 0x1234,
    "in_f32": 230.3, "c0": True, "c2": True, "c3": True, "c8": True, "c9": False,
    "d0": False, "d1": True,
}


@contextlib.asynccontextmanager
async def reference_server(holding: dict[int, list[int]], unit: int = 1) -> AsyncIterator[int]:
    """pymodbus 3.16's TCP server on a free loopback port serving HOLDING-like words; yields the port."""
    async with pymodbus_server(unit, coils=COILS, discrete=DISCRETE, holding=holding, inputs=INPUT) as port:
        yield port


def write_config(root: Path, port: int, profile: str = PROFILE) -> Path:
    for sub in ("profiles", "devices"):
        (root / sub).mkdir()
    (root / "gateway.yaml").write_text("gateway: {id: gw, site: s}\n")
    (root / "profiles" / "ref.yaml").write_text(profile)
    (root / "devices" / "ref.yaml").write_text(
        f"id: ref\nprotocol: modbus_tcp\nprofile: ref\nhost: 127.0.0.1\nport: {port}\nunit_id: 1\n"
        "timeout: 1s\nretries: 0\ntags: {line: A}\n")
    return root


async def test_every_type_and_byte_order_decodes_exactly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="drivers.modbus")
    async with reference_server(HOLDING) as port:
        config = load_config(write_config(tmp_path, port))
        (poller,) = make_pollers(config.devices)
        async with poller:
            (reading,) = await poller.poll_once()
    assert "ref: 5 requests (coil 0+10, discrete 0+2, holding 0+43, holding 100+2, input 0+3) for 31 points" \
        in caplog.messages
    assert reading.fields == EXPECTED
    for name, value in EXPECTED.items():
        assert type(reading.fields[name]) is type(value), name
    assert reading.quality == UNCERTAIN  # the NaN point is left out
    assert reading.device == "ref" and reading.measurement == "ref"
    assert reading.tags == {"site": "s", "gateway": "gw", "device": "ref", "profile": "ref", "line": "A"}
    assert poller.status["ref"].up and poller.status["ref"].errors == {"invalid": 1}


async def test_exception_from_the_reference_server_leaves_out_one_request(tmp_path: Path) -> None:
    profile = PROFILE.replace("  - {name: nan, kind: holding, address: 40, type: float32}\n",
                              "  - {name: missing, kind: holding, address: 300, type: uint16}\n")
    async with reference_server(HOLDING) as port:
        config = load_config(write_config(tmp_path, port, profile))
        (poller,) = make_pollers(config.devices)
        async with poller:
            (reading,) = await poller.poll_once()
            (again,) = await poller.poll_once()
    assert reading.fields == EXPECTED == again.fields
    assert reading.quality == UNCERTAIN
    assert poller.status["ref"].errors == {"exception": 2}
    assert "illegal data address" in (poller.status["ref"].last_error or "")


async def test_client_at_the_protocol_limits() -> None:
    image = {0: [(0x0101 * i) & 0xFFFF for i in range(125)]}
    async with reference_server(image) as port:
        client = ModbusTcpClient("127.0.0.1", port)
        await client.connect(1.0)
        try:
            data = await client.read(1, 3, 0, 125, 1.0)
            assert data == b"".join(w.to_bytes(2, "big") for w in image[0])
            assert await client.read(1, 1, 0, 10, 1.0) == bytes([0b0000_1101, 0b0000_0001])
            assert await client.read(1, 2, 0, 2, 1.0) == bytes([0b10])
            with pytest.raises(ModbusExceptionResponse) as caught:
                await client.read(1, 3, 125, 1, 1.0)
            assert caught.value.code == 2
            with pytest.raises(ValueError, match="only reads"):
                await client.read(1, 6, 0, 1, 1.0)  # write single register: refused before sending
        finally:
            await client.close()


async def test_all_good_is_good(tmp_path: Path) -> None:
    profile = PROFILE.replace("  - {name: nan, kind: holding, address: 40, type: float32}\n", "")
    async with reference_server(HOLDING) as port:
        config = load_config(write_config(tmp_path, port, profile))
        (poller,) = make_pollers(config.devices)
        async with poller:
            (reading,) = await poller.poll_once()
    assert reading.quality == GOOD and reading.fields == EXPECTED
