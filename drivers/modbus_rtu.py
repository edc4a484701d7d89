"""Modbus RTU on a serial port (``protocol: modbus_rtu``): RTU framing with CRC16, the bus
discipline of one master on RS485, and the serial link; the poll loop, planner and codec are
:mod:`drivers.modbus`'s (:class:`~drivers.modbus.ModbusPoller` with this module's client).

Layout, top to bottom:

* **Framing**: :func:`rtu_frame` (:func:`~drivers.wire.crc16` is shared with the serial
  driver and the simulators), :func:`char_time`, :func:`inter_frame_silence`.
* **Links** (:class:`RtuLink`): a byte pipe the client talks through. :class:`SerialLink` is a
  serial port; :mod:`drivers.modbus_rtu_tcp` adds a TCP socket to a serial device server.
* **Client** (:class:`ModbusRtuClient`): one transaction at a time on one bus; before every
  request the line must have been silent for 3.5 character times (1.75 ms above 19200 baud)
  plus the larger of the configured ``pause`` of the unit that spoke last and of the unit about
  to be asked; input that arrived in between (a late reply, noise) is discarded. The reply is
  found in the byte stream by unit id, function code, length and CRC, so garbage before it is
  skipped (resync). A frame that stops short, fails its CRC or is no frame at all fails the
  request as soon as the line has been quiet for :data:`FRAME_GAP` — not after the whole
  timeout — with kind ``truncated``, ``crc`` or ``garbage``. Only function codes 1–4 can be
  sent: the gateway never writes to a device.
* **Driver entry points**: :class:`DeviceModel`, :func:`check` (one bus, one line setting),
  :func:`make_pollers` (one poller, hence one task, per port).

Serial I/O without threads: the port is opened with pyserial (it knows every platform's
termios/ioctl details for baud, parity, stop bits and an exclusive lock) in non-blocking mode,
and its file descriptor is registered with the event loop (``loop.add_reader``); bytes are then
read and written with ``os.read``/``os.write``. pyserial-asyncio-fast was considered: it does the
same (add_reader on pyserial's fd) behind an asyncio Transport, adds a dependency and a write
buffer we do not need (a request is 8 bytes), and hides the fd we need to notice a vanished
port. A read that fails (EIO) or returns nothing on a readable fd means the port went away (USB
unplugged, pty closed): the link closes and the poller reopens the same path with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, Protocol

from pydantic import Field, field_validator

from drivers.modbus import (
    MAX_REGISTERS,
    READ_FUNCTIONS,
    ModbusConnectionError,
    ModbusFrameError,
    ModbusPoller,
    ModbusTimeout,
    ProfileModel,  # the profiles are the Modbus TCP driver's: one register map, every transport
    plan_summary,
    read_reply_data,
)
from drivers.wire import PreciseSleep, char_time, crc16, inter_frame_silence, rtu_frame
from gateway.driver import Claim, Device, DeviceConfig, Problem, parity_letter, serial_claim, slow_timeout
from gateway.polling import format_duration
from gateway.units import Duration

__all__ = [
    "FRAME_GAP",
    "PROFILE_KIND",
    "PROTOCOLS",
    "RTU_HINTS",
    "DeviceModel",
    "LineSettings",
    "ModbusRtuClient",
    "PreciseSleep",
    "ProfileModel",
    "RtuLink",
    "SerialLink",
    "char_time",
    "check",
    "claims",
    "damage_kind",
    "find_reply",
    "inter_frame_silence",
    "make_pollers",
    "replies_in",
    "rtu_frame",
]

PROTOCOLS: Final = frozenset({"modbus_rtu"})
PROFILE_KIND: Final = "modbus"

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


_PARITY: Final = {"N": "N", "E": "E", "O": "O"}


class SerialLink:
    """A serial port, opened non-blocking and exclusively locked, read through the event loop."""

    def __init__(self, port: str, baudrate: int = 9600, parity: str = "N", stopbits: int = 1,
                 bytesize: int = 8) -> None:
        self.name = port
        self.port = port
        self.baudrate, self.parity, self.stopbits, self.bytesize = baudrate, parity, stopbits, bytesize
        self._serial: Any = None
        self._fd = -1
        self._on_data: OnData | None = None
        self._on_lost: OnLost | None = None

    async def open(self, on_data: OnData, on_lost: OnLost, timeout: float) -> None:
        import termios

        import serial  # pyserial: imported here so that config checks never need it

        self.close()
        ser = serial.Serial()
        ser.port = self.port
        ser.baudrate = self.baudrate
        ser.parity = _PARITY[self.parity]
        ser.stopbits = self.stopbits
        ser.bytesize = self.bytesize
        ser.timeout = 0
        ser.write_timeout = 0
        ser.exclusive = True  # flock: a second gateway or `sluice read` cannot share the bus
        try:
            ser.open()
        except termios.error as exc:  # the driver refused the line settings (not an OSError)
            reason = exc.args[1] if len(exc.args) > 1 else exc
            raise ModbusConnectionError("settings", f"serial port {self.port} refused {self.baudrate} "
                                        f"{self.bytesize}{self.parity}{self.stopbits}: {reason}") from None
        except (serial.SerialException, OSError, ValueError) as exc:
            raise _open_error(self.port, exc) from None
        # USB adapters (FTDI) hold received bytes up to their 16 ms latency timer unless the port is
        # in low-latency mode: at 115200 baud that is longer than a whole transaction. A port
        # without the setting (a pty, some drivers) keeps its default.
        with contextlib.suppress(ValueError, AttributeError):
            ser.set_low_latency_mode(True)
        self._serial, self._fd = ser, ser.fileno()
        self._on_data, self._on_lost = on_data, on_lost
        asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not data:  # readable but empty: the device is gone (pyserial says the same)
            self._lost(None)
            return
        assert self._on_data is not None
        self._on_data(data)

    def _lost(self, exc: Exception | None) -> None:
        on_lost = self._on_lost
        self.close()
        log.warning("serial port %s went away (%s); reopening it when it is back — check the USB cable "
                    "or adapter", self.port, exc.strerror if isinstance(exc, OSError) and exc.strerror
                    else "no data on a readable port")
        if on_lost is not None:
            on_lost(exc)

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            raise ModbusConnectionError("disconnected", f"serial port {self.port} is not open")
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._lost(exc)
            raise ModbusConnectionError("disconnected", f"writing to {self.port} failed: "
                                        f"{exc.strerror or exc}") from None
        if written != len(data):
            # A request is at most 8 bytes: a full output buffer means the adapter is stuck.
            raise ModbusConnectionError("disconnected", f"{self.port} accepted {written} of {len(data)} bytes")

    def close(self) -> None:
        ser, self._serial = self._serial, None
        if ser is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(self._fd)
        except RuntimeError:
            pass  # no running loop (closed from a finaliser): nothing registered to remove
        self._fd = -1
        self._on_data = self._on_lost = None
        try:
            ser.close()
        except OSError:
            pass  # the device is already gone


def _open_error(port: str, exc: BaseException) -> ModbusConnectionError:
    code = getattr(exc, "errno", None)
    if code is None and isinstance(exc.__context__, OSError):
        code = exc.__context__.errno
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return ModbusConnectionError("absent", f"serial port {port} is not there")
    if code in (errno.EACCES, errno.EPERM):
        return ModbusConnectionError("permission", f"no permission to open serial port {port}")
    if code in (errno.EAGAIN, errno.EBUSY):
        return ModbusConnectionError("busy", f"serial port {port} is held by another program")
    return ModbusConnectionError("absent", f"cannot open serial port {port}: {exc}")


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


class LineSettings(DeviceConfig):
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
    max_gap: int | None = Field(default=None, ge=0, le=MAX_REGISTERS - 1,
                                description="overrides the profile's max_gap")


class DeviceModel(LineSettings):
    """A Modbus RTU device on a serial port (``devices/<id>.yaml``, ``protocol: modbus_rtu``)."""

    protocol: Literal["modbus_rtu"]
    port: str = Field(min_length=1, description="serial device, e.g. /dev/ttyUSB0 or /dev/serial/by-id/...")
    baudrate: int = Field(default=9600, ge=300, le=4_000_000, description="bits per second")
    parity: Parity = Field(default="N", description="N (none), E (even) or O (odd)")
    stopbits: Literal[1, 2] = 1
    bytesize: int = Field(default=8, description="data bits; Modbus RTU uses 8")

    @field_validator("parity", mode="before")
    @classmethod
    def _parity(cls, value: Any) -> Any:
        return parity_letter(value, "NEO")

    @field_validator("bytesize")
    @classmethod
    def _eight_bits(cls, value: int) -> int:
        if value != 8:
            raise ValueError(f"{value} data bits cannot carry RTU frames — Modbus RTU uses 8 data bits "
                             "(7 is Modbus ASCII, which Sluice does not speak)")
        return value

    @property
    def line(self) -> str:
        """``9600 8N1``: the line settings as device manuals print them."""
        return f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"


# =========================================================================== driver entry points
def bus_key(port: str) -> str:
    """The bus a port path names: symlinks (/dev/serial/by-id/...) resolved when present."""
    return os.path.realpath(port)


_LINE_KEYS: Final = ("baudrate", "parity", "stopbits", "bytesize")


def claims(device: Device) -> list[Claim]:
    """The serial port (shared by every unit on the bus)."""
    return [serial_claim(device.config.port)]


def check(devices: Sequence[Device]) -> list[Problem]:
    """One serial bus has one line setting; one unit is not polled twice with the same profile."""
    problems: list[Problem] = []
    first: dict[str, Device] = {}
    seen: dict[tuple[str, int, str], Device] = {}
    problems += filter(None, map(slow_timeout, devices))
    for dev in devices:
        cfg = dev.config
        bus = bus_key(cfg.port)
        other = first.setdefault(bus, dev)
        if other is not dev:
            differ = [k for k in _LINE_KEYS if getattr(cfg, k) != getattr(other.config, k)]
            if differ:
                problems.append(Problem(
                    dev, (differ[0],),
                    f"{cfg.port} runs at {other.config.line} for '{other.id}' ({other.source}), but this "
                    f"device says {cfg.line}",
                    "every device on one serial bus must use the same baud rate, parity, stop bits and data "
                    "bits — set the devices (and these files) to one setting, or wire them to separate ports"))
                continue
        key = (bus, cfg.unit_id, dev.profile_name)
        if key in seen:
            problems.append(Problem(
                dev, ("unit_id",),
                f"{cfg.port} unit {cfg.unit_id} is already polled as '{seen[key].id}' ({seen[key].source}) "
                "with the same profile",
                "a copied file? give this device its own unit_id, or remove one of them"))
        else:
            seen[key] = dev
    return problems


def pauses_of(devices: Sequence[Device]) -> dict[int, float]:
    pauses: dict[int, float] = {}
    for dev in devices:
        pauses[dev.config.unit_id] = max(pauses.get(dev.config.unit_id, 0.0), dev.config.pause)
    return pauses


def make_pollers(devices: Sequence[Device]) -> list[ModbusPoller]:
    """One poller (one task, one transaction at a time) per serial port."""
    buses: dict[str, list[Device]] = {}
    for dev in devices:
        buses.setdefault(bus_key(dev.config.port), []).append(dev)
    pollers = []
    for group in buses.values():
        cfg = group[0].config
        link = SerialLink(cfg.port, cfg.baudrate, cfg.parity, cfg.stopbits, cfg.bytesize)
        line = (cfg.baudrate, cfg.bytesize, cfg.parity, cfg.stopbits)
        client = ModbusRtuClient(link, char=char_time(*line), silence=inter_frame_silence(*line),
                                 pauses=pauses_of(group))
        poller = ModbusPoller(cfg.port, client, group)
        for device_id, requests in poller.plans.items():
            log.info("%s", plan_summary(device_id, requests))
        pollers.append(poller)
    return pollers

