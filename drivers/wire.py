"""Wire-level helpers every driver, simulator and tool shares: CRC-16/MODBUS and byte orders.

Pure functions on bytes, no imports from the rest of Sluice, so drivers, ``gateway/cli/commission.py``
and the simulators can all use the one implementation (the simulators stay independent of the
drivers' clients: they share only these checks, which any Modbus peer computes identically).

Byte orders are named as manuals print them: the order in which the bytes of a value arrive on
the wire, ``A`` being the most significant byte. ``BADC`` swaps the two bytes inside every 16-bit
register; ``CDAB`` reverses the order of the registers; ``DCBA`` does both (plain little endian).
Every order is its own inverse.
"""

from __future__ import annotations

import array
from typing import Final

__all__ = ["BYTE_ORDERS", "crc16", "swap_register_bytes", "to_big_endian"]

BYTE_ORDERS: Final = ("ABCD", "CDAB", "BADC", "DCBA")


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/MODBUS (polynomial 0xA001 reflected, initial 0xFFFF, ``123456789`` -> 0x4B37). On
    the wire it follows the frame low byte first, so the CRC of a whole frame including its CRC
    is 0. On every RTU frame's hot path: a local table and one operation per byte."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def swap_register_bytes(data: bytes | bytearray) -> bytes:
    """The two bytes of every 16-bit register swapped (``AB`` -> ``BA``); ``data`` has an even length."""
    words = array.array("H", data)
    words.byteswap()
    return words.tobytes()


def to_big_endian(raw: bytes, order: str) -> bytes:
    """Wire bytes in ``order`` -> big endian (``ABCD``). Every order is its own inverse, so this
    also turns big endian into wire order. A single byte is returned as is; raises ValueError
    for an order not in :data:`BYTE_ORDERS`."""
    if order == "ABCD" or len(raw) == 1:
        return raw
    if order == "DCBA":
        return raw[::-1]
    if order == "BADC":
        if len(raw) % 2 == 0:
            return swap_register_bytes(raw)
        return b"".join(raw[i + 1:i + 2] + raw[i:i + 1] for i in range(0, len(raw), 2))
    if order == "CDAB":
        return b"".join(raw[i:i + 2] for i in range(len(raw) - 2, -1, -2))
    raise ValueError(f"unknown byte order {order!r}: use one of {', '.join(BYTE_ORDERS)}")
