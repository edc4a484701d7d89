"""The shared wire helpers (drivers/wire.py): CRC-16/MODBUS against published vectors and
against pymodbus's own CRC as an independent implementation; byte orders against hand-written
tables; and that every driver, simulator and tool uses this one implementation."""

from __future__ import annotations

import random
import struct

import pytest
from pymodbus.framer import FramerRTU

import drivers.modbus.codec
import drivers.modbus.rtu_client
import drivers.serial.framing
import drivers.serial.parsers
import gateway.cli.commission
import simulators.modbus_rtu
import simulators.serial_sensor
from drivers import wire
from drivers.wire import crc16, swap_register_bytes, to_big_endian

# (bytes covered, CRC as it follows them on the wire: low byte first). Sources: the Modbus
# over Serial Line guide's read example (11 03 00 6B 00 03 -> 76 87), the CRC catalogue's check
# value of CRC-16/MODBUS ("123456789" -> 0x4B37, i.e. 37 4B on the wire), request/reply frames
# printed in device manuals (01 03 00 00 00 0A -> C5 CD, 01 04 02 FF FF -> B8 80), and the
# initial value for no bytes at all.
CRC_VECTORS = [
    ("01 03 00 00 00 0A", "C5 CD"),
    ("11 03 00 6B 00 03", "76 87"),
    ("01 04 02 FF FF", "B8 80"),
    ("31 32 33 34 35 36 37 38 39", "37 4B"),
    ("", "FF FF"),
]


@pytest.mark.parametrize(("body", "wire_crc"), CRC_VECTORS)
def test_crc16_known_vectors(body: str, wire_crc: str) -> None:
    data = bytes.fromhex(body)
    assert crc16(data).to_bytes(2, "little") == bytes.fromhex(wire_crc)
    # pymodbus returns the CRC already byte-swapped, so that its big-endian bytes are wire order
    assert FramerRTU.compute_CRC(data).to_bytes(2, "big") == bytes.fromhex(wire_crc)
    if data:
        assert crc16(data + bytes.fromhex(wire_crc)) == 0  # a whole frame checks to zero


def test_crc16_matches_pymodbus_on_random_frames() -> None:
    rng = random.Random(13)
    for _ in range(2000):
        data = rng.randbytes(rng.randint(1, 256))
        ours = crc16(data)
        assert ours.to_bytes(2, "little") == FramerRTU.compute_CRC(data).to_bytes(2, "big"), data.hex()
        assert crc16(bytearray(data)) == crc16(memoryview(data)) == ours


def test_one_crc_everywhere() -> None:
    """The RTU driver, the serial driver's crc16_modbus checksum and the RTU simulator use the
    shared function, not copies of it."""
    assert drivers.modbus.rtu_client.crc16 is wire.crc16
    assert drivers.serial.framing.CHECKSUMS["crc16_modbus"] is wire.crc16
    assert simulators.modbus_rtu.crc16 is wire.crc16


def test_one_byte_order_everywhere() -> None:
    assert drivers.serial.parsers.to_big_endian is wire.to_big_endian
    assert simulators.serial_sensor.to_big_endian is wire.to_big_endian
    assert gateway.cli.commission.to_big_endian is wire.to_big_endian
    assert drivers.modbus.codec.swap_register_bytes is wire.swap_register_bytes
    assert gateway.cli.commission.ORDERS == wire.BYTE_ORDERS


# (order, wire bytes, big endian) for 16, 32 and 64 bits, written out from the manuals' tables.
ORDER_TABLE = [
    ("ABCD", "12 34", "12 34"),
    ("DCBA", "34 12", "12 34"),
    ("BADC", "34 12", "12 34"),
    ("CDAB", "12 34", "12 34"),
    ("ABCD", "12 34 56 78", "12 34 56 78"),
    ("DCBA", "78 56 34 12", "12 34 56 78"),
    ("BADC", "34 12 78 56", "12 34 56 78"),
    ("CDAB", "56 78 12 34", "12 34 56 78"),
    ("ABCD", "01 02 03 04 05 06 07 08", "01 02 03 04 05 06 07 08"),
    ("DCBA", "08 07 06 05 04 03 02 01", "01 02 03 04 05 06 07 08"),
    ("BADC", "02 01 04 03 06 05 08 07", "01 02 03 04 05 06 07 08"),
    ("CDAB", "07 08 05 06 03 04 01 02", "01 02 03 04 05 06 07 08"),
    ("DCBA", "7F", "7F"),  # one byte has no order
    ("BADC", "7F", "7F"),
    ("BADC", "02 01 03", "01 02 03"),  # an odd length: the last byte stays where it is
]


@pytest.mark.parametrize(("order", "wire_bytes", "big"), ORDER_TABLE)
def test_to_big_endian(order: str, wire_bytes: str, big: str) -> None:
    raw = bytes.fromhex(wire_bytes)
    assert to_big_endian(raw, order) == bytes.fromhex(big)
    assert to_big_endian(to_big_endian(raw, order), order) == raw  # every order is its own inverse


def test_float32_in_every_order() -> None:
    """1.5 = 0x3FC00000: the four orders of one value as a device sends them."""
    for order, wire_bytes in (("ABCD", "3F C0 00 00"), ("CDAB", "00 00 3F C0"), ("BADC", "C0 3F 00 00"),
                              ("DCBA", "00 00 C0 3F")):
        assert struct.unpack(">f", to_big_endian(bytes.fromhex(wire_bytes), order)) == (1.5,)


def test_unknown_order_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown byte order 'ACBD'"):
        to_big_endian(b"\x01\x02", "ACBD")


def test_swap_register_bytes() -> None:
    assert swap_register_bytes(bytes.fromhex("01 02 03 04")) == bytes.fromhex("02 01 04 03")
    assert swap_register_bytes(bytearray(b"")) == b""
