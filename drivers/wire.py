"""Wire-level helpers every driver, simulator and tool shares: CRC-16/MODBUS, byte orders, RTU
framing and RTU wire timing.

No imports from the rest of Sluice, so drivers, ``gateway/cli/commission.py`` and the simulators can
all use the one implementation (the simulators stay independent of the drivers' clients: they
share only these, which any Modbus peer computes identically).

Byte orders are named as manuals print them: the order in which the bytes of a value arrive on
the wire, ``A`` being the most significant byte. ``BADC`` swaps the two bytes inside every 16-bit
register; ``CDAB`` reverses the order of the registers; ``DCBA`` does both (plain little endian).
Every order is its own inverse.

Wire timing: a character's time and the 3.5-character silence between RTU frames
(:func:`char_time`, :func:`inter_frame_silence`), and :class:`PreciseSleep` to wait them out to
the microsecond on the event loop.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import os
import struct
from collections.abc import Callable
from typing import Final

__all__ = ["BYTE_ORDERS", "PreciseSleep", "char_time", "crc16", "inter_frame_silence", "rtu_frame",
           "swap_register_bytes", "to_big_endian"]

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


def rtu_frame(unit: int, pdu: bytes) -> bytes:
    """Unit id + PDU + CRC (low byte first)."""
    body = bytes((unit,)) + pdu
    return body + struct.pack("<H", crc16(body))


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


# =========================================================================== RTU wire timing
def char_time(baudrate: int, bytesize: int = 8, parity: str = "N", stopbits: float = 1) -> float:
    """Seconds one character takes on the line: start bit, data bits, parity bit, stop bits."""
    return (1 + bytesize + (0 if parity == "N" else 1) + stopbits) / baudrate


def inter_frame_silence(baudrate: int, bytesize: int = 8, parity: str = "N", stopbits: float = 1) -> float:
    """The silence that separates two frames: 3.5 character times, fixed at 1.75 ms above
    19200 baud (Modbus over serial line, 2.5.1.1)."""
    if baudrate > 19200:
        return 0.00175
    return 3.5 * char_time(baudrate, bytesize, parity, stopbits)


# =========================================================================== precise waits
class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc_timerfd() -> tuple[Callable[..., int], Callable[..., int]] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None  # not Linux: asyncio's own timers


_TIMERFD: Final = _libc_timerfd()
_CLOCK_MONOTONIC: Final = 1
_TFD_FLAGS: Final = os.O_NONBLOCK | os.O_CLOEXEC  # TFD_NONBLOCK | TFD_CLOEXEC have the same values


class PreciseSleep:
    """Sleeps of a few milliseconds that end on time. asyncio's timers wake through epoll, whose
    timeout is whole milliseconds rounded up, so the 1.75 ms inter-frame silence became 2-3 ms —
    a third of a transaction at 115200 baud. A Linux timerfd on the event loop wakes it within
    microseconds, without a thread or a busy wait. Elsewhere (no timerfd), for a second or more,
    or while another sleep of the same object runs, it is ``asyncio.sleep``. ``close`` releases
    the descriptor."""

    def __init__(self) -> None:
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        if _TIMERFD is None or seconds <= 0 or seconds > 1.0 or self._waiter is not None:
            await asyncio.sleep(max(seconds, 0))
            return
        if self._loop is not loop:
            self.close()
            fd = _TIMERFD[0](_CLOCK_MONOTONIC, _TFD_FLAGS)
            if fd < 0:
                await asyncio.sleep(seconds)
                return
            self._fd, self._loop = fd, loop
            loop.add_reader(fd, self._expired)
        ns = max(int(seconds * 1e9), 1)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(ns // 1_000_000_000, ns % 1_000_000_000))
        if _TIMERFD[1](self._fd, 0, ctypes.byref(spec), None) != 0:
            await asyncio.sleep(seconds)  # cannot happen with a valid descriptor; never hang on it
            return
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _expired(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(fd)
            os.close(fd)
        self._loop = None
