"""Modbus RTU on a serial port (``protocol: modbus_rtu``): the serial link and the driver entry
points — :class:`DeviceModel`, :func:`check` (one bus, one line setting), :func:`make_pollers`
(one poller, hence one task, per port). The RTU master is :mod:`drivers.modbus.rtu_client`'s.

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
from collections.abc import Sequence
from typing import Any, Final, Literal

from pydantic import Field, field_validator

from drivers.modbus.errors import ModbusConnectionError
from drivers.modbus.planner import plan_summary
from drivers.modbus.poller import ModbusPoller
from drivers.modbus.profile import ProfileModel  # one register map, every transport
from drivers.modbus.rtu_client import LineSettings, ModbusRtuClient, OnData, OnLost, Parity, pauses_of
from drivers.wire import char_time, inter_frame_silence
from gateway.driver import Claim, Device, Problem, parity_letter, serial_claim, slow_timeout

__all__ = ["PROFILE_KIND", "PROTOCOLS", "DeviceModel", "ProfileModel", "SerialLink", "bus_key", "check", "claims",
           "make_pollers"]

PROTOCOLS: Final = frozenset({"modbus_rtu"})
PROFILE_KIND: Final = "modbus"

log = logging.getLogger(__name__)

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
        import termios  # noqa: PLC0415 - only when a port is opened (POSIX serial line settings)

        import serial  # noqa: PLC0415 - pyserial only when a port is opened: config checks never need it

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


class DeviceModel(LineSettings):
    """A Modbus RTU device on a serial port (``devices/<id>.yaml``, ``protocol: modbus_rtu``)."""

    protocol: Literal["modbus_rtu"] = Field(description="modbus_rtu: on a serial port (RS485 adapter)")
    port: str = Field(min_length=1, description="serial device, e.g. /dev/ttyUSB0 or /dev/serial/by-id/...")
    baudrate: int = Field(default=9600, ge=300, le=4_000_000, description="bits per second")
    parity: Parity = Field(default="N", description="N (none), E (even) or O (odd)")
    stopbits: Literal[1, 2] = Field(default=1, description="stop bits: 1, or 2 (some devices without parity)")
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


RtuDevice = Device[DeviceModel, ProfileModel]


# =========================================================================== driver entry points
def bus_key(port: str) -> str:
    """The bus a port path names: symlinks (/dev/serial/by-id/...) resolved when present."""
    return os.path.realpath(port)


_LINE_KEYS: Final = ("baudrate", "parity", "stopbits", "bytesize")


def claims(device: RtuDevice) -> list[Claim]:
    """The serial port (shared by every unit on the bus)."""
    return [serial_claim(device.config.port)]


def check(devices: Sequence[RtuDevice]) -> list[Problem]:
    """One serial bus has one line setting; one unit is not polled twice with the same profile."""
    problems: list[Problem] = []
    first: dict[str, RtuDevice] = {}
    seen: dict[tuple[str, int, str], RtuDevice] = {}
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


def make_pollers(devices: Sequence[RtuDevice]) -> list[ModbusPoller]:
    """One poller (one task, one transaction at a time) per serial port."""
    buses: dict[str, list[RtuDevice]] = {}
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

