"""The Modbus RTU master shared by every RTU transport: RTU framing with CRC16, the bus discipline
of one master on RS485, and the line settings every RTU device has. The poll loop, planner and
codec are the Modbus package's (:class:`~drivers.modbus.poller.ModbusPoller` with this client).

Layout, top to bottom:

* **Framing**: :func:`rtu_frame` (:func:`~drivers.wire.crc16` is shared with the serial
  driver and the simulators), :func:`char_time`, :func:`inter_frame_silence`.
* **Links** (:class:`RtuLink`): a byte pipe the client talks through. :class:`~drivers.modbus.rtu.SerialLink`
  is a serial port; :mod:`drivers.modbus.rtu_tcp` adds a TCP socket to a serial device server,
  :mod:`drivers.modbus.dtu_link` a DTU that dialled in.
  plus the larger of the configured ``pause`` of the unit that spoke last and of the unit about
  to be asked; input that arrived in between (a late reply, noise) is discarded. The reply is
  found in the byte stream by unit id, function code, length and CRC, so garbage before it is
  skipped (resync). A frame that stops short, fails its CRC or is no frame at all fails the
  request as soon as the line has been quiet for :data:`FRAME_GAP` — not after the whole
  timeout — with kind ``truncated``, ``crc`` or ``garbage``. Only function codes 1–4 can be
  sent: the gateway never writes to a device.
* **Configuration**: :class:`LineSettings` (unit id, pause, max_gap), :func:`pauses_of`.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, Protocol

from pydantic import Field, field_validator

from drivers.modbus.codec import read_reply_data
from drivers.modbus.errors import ModbusConnectionError, ModbusFrameError, ModbusTimeout
from drivers.modbus.profile import READ_FUNCTIONS, ProfileModel, UnitConfig
from drivers.wire import PreciseSleep, crc16, rtu_frame
from gateway.driver import Device
from gateway.polling import format_duration
from gateway.units import Duration

log = logging.getLogger(__name__)

FRAME_GAP: Final = 0.05
"""Quiet time after which a started but incomplete reply is given up. Modbus allows 1.5
character times inside a frame, but USB serial adapters deliver bytes in bursts (an FTDI chip
holds them up to 16 ms), so the gateway waits longer before calling a frame truncated."""


# =========================================================================== framing
def find_reply(buf: bytes | bytearray, unit: int, function: int, nbytes: int) -> tuple[int, int] | None:
    """Where the reply to a read of ``nbytes`` data bytes from ``unit`` with ``function`` lies in
    ``buf`` (``start, end``): the first span that starts with the unit id and the function code
    (or its exception code 0x80 | function), has the reply's length (byte count ``nbytes``, or
    5 bytes for an exception) and whose CRC checks. None if there is none (yet). Never raises."""
    size = len(buf)
    view = memoryview(buf)
    i = buf.find(unit)
    while 0 <= i < size - 1:
        fc = buf[i + 1]
        need = 0
        if fc == function:
            need = 5 + nbytes
            if i + 2 < size and buf[i + 2] != nbytes:
                need = 0
        elif fc == function | 0x80:
            need = 5
        if need and i + need <= size and crc16(view[i:i + need]) == 0:
            return i, i + need
        i = buf.find(unit, i + 1)
    return None


def replies_in(buf: bytes | bytearray) -> list[tuple[int, int, int]]:
    """Every complete, CRC-valid read reply in ``buf`` from any unit, as ``(unit, start, end)``,
    left to right and not overlapping: a reply to a read (function 1..4 with its byte count) or
    an exception reply to one. What tells a late answer from another unit apart from noise."""
    found: list[tuple[int, int, int]] = []
    view = memoryview(buf)
    i, size = 0, len(buf)
    while i < size - 4:
        unit, fc = buf[i], buf[i + 1]
        need = 5 if fc in (0x81, 0x82, 0x83, 0x84) else 5 + buf[i + 2] if fc in (1, 2, 3, 4) else 0
        if 1 <= unit <= 247 and need and i + need <= size and crc16(view[i:i + need]) == 0:
            found.append((unit, i, i + need))
            i += need
        else:
            i += 1
    return found


def damage_kind(buf: bytes | bytearray, unit: int, function: int, nbytes: int) -> Literal["crc", "truncated", "garbage"]:
    """What bytes without a valid reply (:func:`find_reply` found none) were: ``crc`` if a reply
    of full length starts in them, ``truncated`` if one starts but stops short, else ``garbage``."""
    for i in range(len(buf) - 1):
        if buf[i] != unit or buf[i + 1] not in (function, function | 0x80):
            continue
        need = 5 if buf[i + 1] & 0x80 else 5 + nbytes
        return "crc" if len(buf) - i >= need else "truncated"
    return "garbage"


# =========================================================================== links
OnData = Callable[[bytes], None]
OnLost = Callable[[Exception | None], None]


class RtuLink(Protocol):
    """A byte pipe to an RTU bus. ``open`` raises :class:`ModbusConnectionError`; afterwards
    ``on_data`` gets every received chunk and ``on_lost`` is called once if the link dies by
    itself (not after ``close``). ``write`` raises :class:`ModbusConnectionError` if it cannot."""

    name: str

    async def open(self, on_data: OnData, on_lost: OnLost, timeout: float) -> None: ...
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


# =========================================================================== client
RTU_HINTS: Final[Mapping[str, str]] = {
    "timeout": "check the unit id, that the device is powered, the RS485 wiring (A/B swapped?, "
               "termination) and that baud rate, parity and stop bits match the device's settings",
    "crc": "the reply was damaged on the line — check the RS485 wiring (twisted pair, shield, A/B), "
           "termination resistors at both ends only, and that every device on the bus uses the same "
           "baud rate and parity",
    "truncated": "the reply stopped short — check the wiring and termination, and that no other master "
                 "talks on this bus",
    "garbage": "bytes that are no Modbus RTU frame — check baud rate, parity and stop bits against the "
               "device, and that no other master or device chatters on the bus",
    "absent": "check the USB cable or adapter; /dev/serial/by-id/ names stay the same after re-plugging",
    "permission": "add the gateway's user to the dialout group (or give it access to the port)",
    "settings": "the adapter (or its driver) does not support these line settings — check baud rate, parity "
                "and stop bits against what the adapter can do",
    "busy": "another program holds the port — a second gateway, `sluice read`/`scan`, or ModemManager",
    "disconnected": "the serial port went away — check the USB cable or adapter",
    "bad_response": "the answer did not fit the request — check the unit id and the profile",
}


class ModbusRtuClient:
    """A Modbus RTU master on one bus (a :class:`RtuLink`) that can only read.

    One transaction at a time (callers serialise; the poller does). ``pauses`` maps a unit id to
    the extra silence that unit needs around its transactions. ``char`` is one character time
    (:func:`char_time`) and ``silence`` the inter-frame silence; for a link whose far end does
    the serial timing (a device server) both may be 0. Counters: ``discarded`` bytes that arrived
    between transactions or before a reply.
    """

    def __init__(self, link: RtuLink, *, char: float = 0.0, silence: float = 0.0,
                 pauses: Mapping[int, float] | None = None, hints: Mapping[str, str] = RTU_HINTS,
                 frame_gap: float = FRAME_GAP) -> None:
        self.link = link
        self.name = link.name
        self.hints = hints
        self.char = char
        self.silence = silence
        self.pauses = dict(pauses or {})
        self.frame_gap = max(frame_gap, silence)
        self.discarded = 0
        self.stray = b""  # the bytes last discarded between transactions (`sluice scan` reads them)
        self._open = False
        self._was_open = False
        self._buf = bytearray()
        self._quiet_since = 0.0  # monotonic: when the line last carried a byte (either way)
        self._last_pause = 0.0
        self._waiter: asyncio.Future[bytes] | None = None
        self._expect = (0, 0, 0)  # unit, function, data bytes
        self._gap_timer: asyncio.TimerHandle | None = None
        self._sleep = PreciseSleep()

    @property
    def connected(self) -> bool:
        return self._open

    @property
    def lost(self) -> bool:
        return self._was_open and not self._open

    async def connect(self, timeout: float) -> None:
        await self.close()
        self._buf.clear()
        await self.link.open(self._on_data, self._on_lost, timeout)
        self._open = self._was_open = True
        self._quiet_since = time.monotonic()

    def take_stray(self) -> bytes:
        """What arrived since the last transaction ended (and was not yet discarded), and what
        the last request discarded; both are then forgotten."""
        data, self.stray = self.stray + bytes(self._buf), b""
        self.discarded += len(self._buf)
        self._buf.clear()
        return data

    async def close(self) -> None:
        self._open = self._was_open = False
        self.link.close()
        self._sleep.close()
        self._fail(ModbusConnectionError("disconnected", f"{self.name} closed"))

    async def __aenter__(self) -> ModbusRtuClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ link callbacks
    def _on_lost(self, exc: Exception | None) -> None:
        self._open = False
        why = f": {exc.strerror or exc}" if isinstance(exc, OSError) else (f": {exc}" if exc else "")
        self._fail(ModbusConnectionError("disconnected", f"{self.name} went away{why}"))

    def _on_data(self, data: bytes) -> None:
        self._quiet_since = time.monotonic()
        self._buf += data
        if self._waiter is not None and not self._waiter.done():
            self._scan()

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def _scan(self) -> None:
        """Look for the awaited reply anywhere in the buffer; if it is not there yet, (re)arm
        the frame-gap timer that gives up on what has arrived."""
        buf = self._buf
        found = find_reply(buf, *self._expect)
        if found is not None:
            start, end = found
            frame = bytes(buf[start + 1:end - 2])  # function code onward, without the CRC
            self.discarded += len(buf) - (end - start)
            buf.clear()
            self._cancel_gap()
            assert self._waiter is not None
            self._waiter.set_result(frame)
            return
        self._cancel_gap()
        self._gap_timer = asyncio.get_running_loop().call_later(self.frame_gap, self._gap_expired)

    def _cancel_gap(self) -> None:
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None

    def _gap_expired(self) -> None:
        """The line went quiet without a valid reply: say what the bytes were."""
        self._gap_timer = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._damaged())

    def _expired(self, timeout: float) -> None:
        """The request's timeout: a damaged reply if bytes came, else no answer at all."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._damaged() if self._buf else
                                       ModbusTimeout(f"no answer within {format_duration(timeout)}"))

    def _damaged(self) -> ModbusFrameError:
        buf = self._buf
        kind = damage_kind(buf, *self._expect)
        shown = bytes(buf[:24]).hex(" ") + (" …" if len(buf) > 24 else "")
        what = {"crc": "a reply that failed its CRC check", "truncated": "a reply that stopped short",
                "garbage": "bytes that are no reply"}[kind]
        return ModbusFrameError(kind, f"{what} ({len(buf)} bytes: {shown})", bytes(buf))

    # ------------------------------------------------------------------ the transaction
    async def read(self, unit: int, function: int, address: int, count: int, timeout: float) -> bytes:
        """Read ``count`` registers or bits from ``unit``; returns the reply's data bytes.

        Raises :class:`ModbusTimeout`, :class:`ModbusFrameError` (``crc``, ``truncated``,
        ``garbage``), :class:`ModbusExceptionResponse` or :class:`ModbusConnectionError`.
        """
        if function not in READ_FUNCTIONS:
            raise ValueError(f"function code {function} is not a read: this client only reads (1, 2, 3, 4)")
        if not 1 <= unit <= 247:
            raise ValueError(f"unit id {unit} cannot answer: RTU unit ids are 1..247 (0 is broadcast)")
        if not self._open:
            raise ModbusConnectionError("disconnected", f"{self.name} is not open")
        pause = self.pauses.get(unit, 0.0)
        wait = self._quiet_since + self.silence + max(pause, self._last_pause) - time.monotonic()
        if wait > 0:
            await self._sleep.sleep(wait)
            if not self._open:
                raise ModbusConnectionError("disconnected", f"{self.name} went away")
        if self._buf:  # a late reply or noise between transactions: never part of this answer
            self.discarded += len(self._buf)
            self.stray = bytes(self._buf)
            self._buf.clear()
        loop = asyncio.get_running_loop()
        request = rtu_frame(unit, struct.pack(">BHH", function, address, count))
        self.link.write(request)  # no await until the waiter exists: no byte can slip past it
        self._quiet_since = time.monotonic() + len(request) * self.char
        nbytes = (count + 7) // 8 if function <= 2 else 2 * count
        self._expect = (unit, function, nbytes)
        waiter: asyncio.Future[bytes] = loop.create_future()
        self._waiter = waiter
        handle = loop.call_later(timeout, self._expired, timeout)
        try:
            frame = await waiter
        finally:
            handle.cancel()
            self._cancel_gap()
            self._waiter = None
            self._last_pause = pause
        return read_reply_data(frame, function, count)  # find_reply checked unit, length and CRC


# =========================================================================== configuration
Parity = Literal["N", "E", "O"]


class LineSettings(UnitConfig):
    """What every device on one serial line must agree on, and the RTU unit settings."""

    unit_id: int = Field(default=1, ge=1, le=247, description="Modbus unit (slave) id, 1..247")

    @field_validator("unit_id", mode="before")
    @classmethod
    def _not_broadcast(cls, value: Any) -> Any:
        if value == 0 and not isinstance(value, bool):
            raise ValueError("0 is the broadcast address on a serial bus: every device listens and none answers "
                             "— set the device's own unit id (1..247; see its display or manual)")
        return value
    pause: Duration = Field(default=0.0, ge=0, le=10,
                            description="extra silence before and after this unit's transactions")


def pauses_of(devices: Sequence[Device[LineSettings, ProfileModel]]) -> dict[int, float]:
    pauses: dict[int, float] = {}
    for dev in devices:
        pauses[dev.config.unit_id] = max(pauses.get(dev.config.unit_id, 0.0), dev.config.pause)
    return pauses


