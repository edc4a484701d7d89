"""Simulated Modbus RTU: the RTU framing of the simulated units (:class:`RtuLine`: CRC-checked
request frames in, CRC-framed replies out, RTU noise faults, optional wire timing) and two of its
transports: a bus on a pseudo-terminal pair or a serial port (:class:`RtuBus`) and a serial device
server reached over TCP (:class:`RtuTcpServer`); ``sluice sim rtu``. The DTU that dials in
(:mod:`simulators.modbus_dtu`) is the third transport of the same line.

* :class:`RtuBus` — one bus: ``os.openpty()``, the simulator holds the master side, the gateway
  opens :attr:`RtuBus.path` (the slave, or a symlink to it at a path you choose, which stays the
  same when the "port" is unplugged and plugged in again: :meth:`RtuBus.vanish`,
  :meth:`RtuBus.reappear`). One task per bus answers one request at a time, like a real bus.
* Faults are the device's (:class:`~simulators.modbus_device.Faults`): ``no_answer``, ``delay``,
  ``exception``, and on this line the share of replies sent with a wrong CRC (``crc``), preceded
  by noise (``garbage``) or cut short (``truncate``). Mutable while the bus runs.
* Wire timing (``wire_timing=True``): each frame takes its transmission time at ``baudrate``
  (request and reply), so a gateway cannot go faster than a real bus; and a unit does not
  answer a port opened at another baud rate, as on a real bus.

A request with a write function code is counted (``stats.writes``) and refused with exception 01,
unless the unit is ``writable``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import termios
import time
import tty
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import serial

from drivers.modbus.profile import ProfileModel
from drivers.wire import PreciseSleep, char_time, crc16, inter_frame_silence, rtu_frame
from gateway.config import load_profiles
from gateway.logs import add_log_level, setup_logging
from gateway.yamlpos import ConfigError
from simulators.modbus_device import Faults, Later, ServesUnits, SimDevice, Units

__all__ = ["RtuBus", "RtuLine", "RtuOverTcp", "RtuTcpServer", "main_sim_rtu", "parse_fault_arg", "parse_unit_arg",
           "sim_units_from_args"]

log = logging.getLogger("sluice.sim")


# =========================================================================== the RTU line
class RtuLine:
    """RTU framing for the units behind one byte stream; the transport owns the bytes.

    The transport hands in what arrives (:meth:`feed`) and gives ``write`` for what
    leaves; one task (``async with``) takes CRC-valid request frames from the stream one at a
    time, as a bus does, and answers them through the units. ``line_matches`` says whether the
    far end's port is at this line's settings (wire timing only: a unit hears only noise at
    another baud rate).
    """

    def __init__(self, units: Units, write: Callable[[bytes], None], *, name: str, baudrate: int = 9600,
                 parity: str = "N", stopbits: int = 1, wire_timing: bool = False, seed: int = 0,
                 line_matches: Callable[[], bool] = lambda: True) -> None:
        self.units = units
        self.name = name
        self.wire_timing = wire_timing
        self.char = char_time(baudrate, 8, parity, stopbits)
        self.silence = inter_frame_silence(baudrate, 8, parity, stopbits)
        self.bad_requests = 0  # request frames with a wrong CRC or an unknown function code
        self.wrong_line = 0  # requests ignored because the port was set to other line settings
        self._write = write
        self._line_matches = line_matches
        self._rng = random.Random(seed)
        self._buf = bytearray()
        self._arrived = 0.0  # loop time the last bytes came in
        self._data = asyncio.Event()
        self._sleep = PreciseSleep()  # wire timing to the microsecond, not epoll's millisecond
        self._late = Later()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RtuLine:
        self._task = asyncio.create_task(self._serve(), name=self.name)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._late.cancel()
        self._sleep.close()

    def feed(self, data: bytes) -> None:
        """Bytes that arrived from the far end."""
        self._buf += data
        self._arrived = asyncio.get_running_loop().time()
        self._data.set()

    def clear(self) -> None:
        """Forget a partly received request (the port or connection went)."""
        self._buf.clear()

    async def _serve(self) -> None:
        while True:
            await self._data.wait()
            self._data.clear()
            while (request := self._next_request()) is not None:
                await self._handle(request)

    def _next_request(self) -> bytes | None:
        """The next complete, CRC-valid request in the buffer; skips what cannot be one."""
        buf = self._buf
        while len(buf) >= 4:
            fc = buf[1]
            if 1 <= fc <= 6:
                need = 8
            elif fc in (15, 16):
                if len(buf) < 7:
                    return None
                need = 9 + buf[6]
            else:
                need = 0
            if need and len(buf) < need:
                return None
            if need and crc16(memoryview(buf)[:need]) == 0:
                request = bytes(buf[:need])
                del buf[:need]
                return request
            self.bad_requests += 1
            del buf[0]
        return None

    async def _handle(self, request: bytes) -> None:
        unit, pdu = request[0], request[1:-2]
        verdict = self.units.request(unit, pdu)
        heard = None
        if self.wire_timing:
            # The request is still on the wire when it arrives here, and a unit knows it has ended
            # only after 3.5 characters of silence: from then on its reply takes its own
            # transmission time (_send). One deadline from the arrival, so that this
            # simulator's own work and timer rounding are not added to the wire time.
            heard = self._arrived + len(request) * self.char + self.silence
            if not self._line_matches():
                self.wrong_line += 1
                return  # a device at another baud rate or parity hears only noise
        if unit == 0 or verdict.device is None:
            return  # broadcast, nobody with this address on the bus, or a silent unit
        if verdict.action == "later":
            # A slow unit answers late while the others go on hearing requests: its reply may
            # land in a later transaction, as on a real bus.
            self._late.start(self._answer_later(verdict.device, pdu, verdict.delay), name=f"{self.name}:late[{unit}]")
            return
        await self._send(verdict.device, self.units.reply(verdict.device, pdu), heard)

    async def _answer_later(self, device: SimDevice, pdu: bytes, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._send(device, self.units.reply(device, pdu), None)

    async def _send(self, device: SimDevice, reply_pdu: bytes, heard: float | None) -> None:
        reply = rtu_frame(device.unit_id, reply_pdu)
        faults, rng = device.faults, self._rng
        if faults.truncate and rng.random() < faults.truncate:
            reply = reply[: max(2, len(reply) // 2)]
        if faults.crc and rng.random() < faults.crc:
            reply = reply[:-1] + bytes((reply[-1] ^ 0x5A,))
        if faults.garbage and rng.random() < faults.garbage:
            reply = bytes(rng.randrange(256) for _ in range(rng.randint(3, 9))) + reply
        if self.wire_timing:
            loop = asyncio.get_running_loop()
            wait = (heard if heard is not None else loop.time()) + len(reply) * self.char - loop.time()
            if wait > 0:
                await self._sleep.sleep(wait)
        self._write(reply)


# =========================================================================== transports
def _baud_constant(baudrate: int) -> int | None:
    return getattr(termios, f"B{baudrate}", None)


class RtuBus(ServesUnits):
    """A simulated RS485 bus on a pty pair (or a serial port); ``async with`` opens it, leaving
    closes it."""

    def __init__(self, devices: Iterable[SimDevice], *, link: Path | str | None = None, baudrate: int = 9600,
                 parity: str = "N", stopbits: int = 1, wire_timing: bool = False, seed: int = 0,
                 serial_port: str | None = None) -> None:
        self.units = Units(devices, where="one bus")
        self.link = Path(link) if link is not None else None
        self.serial_port = serial_port
        self.baudrate, self.parity, self.stopbits = baudrate, parity, stopbits
        self.line = RtuLine(self.units, self._write, name="sim-rtu", baudrate=baudrate, parity=parity,
                            stopbits=stopbits, wire_timing=wire_timing, seed=seed, line_matches=self._line_matches)
        self._serial: Any = None
        self._master = self._slave = -1
        self._tty = ""

    @property
    def path(self) -> str:
        """What the gateway opens: the symlink if one was asked for, else the pty's slave."""
        return str(self.link) if self.link is not None else self._tty

    @property
    def present(self) -> bool:
        return self._master >= 0

    @property
    def wire_timing(self) -> bool:
        return self.line.wire_timing

    @property
    def wrong_line(self) -> int:
        """Requests ignored because the gateway's port was set to another baud rate."""
        return self.line.wrong_line

    @property
    def bad_requests(self) -> int:
        """Request frames with a wrong CRC or an unknown function code."""
        return self.line.bad_requests

    async def __aenter__(self) -> RtuBus:
        self.reappear()
        self.line.name = f"sim-rtu[{self.path}]"
        await self.line.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.line.__aexit__(*exc)
        self.vanish()

    def vanish(self) -> None:
        """Unplug: close the pty (the gateway's reads fail) and remove the symlink."""
        if self._master >= 0:
            asyncio.get_running_loop().remove_reader(self._master)
            if self._serial is not None:
                self._serial.close()
                self._serial = None
            else:
                os.close(self._master)
                os.close(self._slave)
            self._master = self._slave = -1
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
        self.line.clear()

    def reappear(self) -> None:
        """Plug in (again): a new pty; the symlink, if any, points at it."""
        if self._master >= 0:
            return
        if self.serial_port is not None:
            self._open_serial(self.serial_port)
            return
        master, slave = os.openpty()
        # Raw on both sides until the gateway configures its end: no echo, no CR/LF translation.
        tty.setraw(master)
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave, self._tty = master, slave, os.ttyname(slave)
        if self.link is not None:
            tmp = self.link.with_name(f".{self.link.name}.{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(self._tty)
            tmp.replace(self.link)
        asyncio.get_running_loop().add_reader(master, self._readable)

    def _open_serial(self, port: str) -> None:
        """Serve on a real serial port (the master side is the port; there is no slave)."""
        ser = serial.Serial(port, self.baudrate, parity=self.parity, stopbits=self.stopbits, timeout=0,
                            exclusive=True)
        self._serial, self._master, self._slave, self._tty = ser, ser.fileno(), -1, port
        asyncio.get_running_loop().add_reader(self._master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # EIO: nobody has the slave open; nothing to read
        if data:
            self.line.feed(data)

    def _line_matches(self) -> bool:
        """Whether the gateway's end of the pty is set to this bus's baud rate. (Linux ptys keep
        the baud rate but clear the parity bit of the settings, so parity cannot be checked.) On a
        real serial port the hardware decides."""
        if self._slave < 0:
            return True
        try:
            ospeed = termios.tcgetattr(self._slave)[5]
        except termios.error:
            return True
        want = _baud_constant(self.baudrate)
        return want is None or ospeed == want

    def _write(self, data: bytes) -> None:
        if self._master >= 0:
            try:
                os.write(self._master, data)
            except OSError:
                pass  # the gateway closed its end

    def describe(self) -> str:
        timing = ", wire-timed" if self.wire_timing else ""
        return (f"RTU bus on {self.path} at {self.baudrate} 8{self.parity}{self.stopbits}{timing}: "
                f"{len(self.devices)} units — {self.units.describe()}")


class RtuOverTcp:
    """An RTU line carried over one TCP connection at a time (a serial device server's client, a
    DTU's dial-in): bytes from any other connection are ignored, and dropping the connection
    forgets a partly received request. ``write`` (default :meth:`send`) is where the line's
    framed replies go; :meth:`protocol` makes the asyncio protocol of a new connection."""

    def __init__(self, units: Units, *, name: str, seed: int = 0,
                 write: Callable[[bytes], None] | None = None) -> None:
        self.line = RtuLine(units, write or self.send, name=name, seed=seed)
        self.transport: asyncio.BaseTransport | None = None

    def protocol(self, lost: asyncio.Future[None] | None = None) -> asyncio.Protocol:
        """The protocol of a new connection; ``lost`` is resolved when it closes."""
        return _Stream(self, lost)

    def attach(self, transport: asyncio.BaseTransport) -> None:
        """A new connection: it replaces the one before."""
        self.drop()
        self.transport = transport

    def drop(self) -> None:
        """Close the connection now (an abort, not a goodbye)."""
        transport, self.transport = self.transport, None
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        self.line.clear()

    def received(self, transport: asyncio.BaseTransport, data: bytes) -> None:
        if transport is self.transport:
            self.line.feed(data)

    def send(self, data: bytes) -> None:
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(data)


class _Stream(asyncio.Protocol):
    def __init__(self, carrier: RtuOverTcp, lost: asyncio.Future[None] | None) -> None:
        self.carrier = carrier
        self.lost = lost
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.carrier.attach(transport)

    def data_received(self, data: bytes) -> None:
        if self.transport is not None:
            self.carrier.received(self.transport, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)


class RtuTcpServer(ServesUnits):
    """A serial device server in raw mode: a simulated RTU line reached over TCP (RTU frames
    with CRC, no MBAP header). One client at a time, as most converters allow; a new client
    replaces the old one. :meth:`break_stream` sends half a frame and drops the connection."""

    def __init__(self, devices: Iterable[SimDevice], *, host: str = "127.0.0.1", port: int = 0,
                 seed: int = 0) -> None:
        self.units = Units(devices, where=f"{host}:{port}")
        self.host, self.port = host, port
        self.connections = 0
        self.carrier = RtuOverTcp(self.units, name="sim-rtu-tcp", seed=seed)
        self._server: asyncio.Server | None = None

    @property
    def path(self) -> str:
        return f"{self.host}:{self.port}"

    async def __aenter__(self) -> RtuTcpServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.carrier.line.name = f"sim-rtu-tcp[{self.path}]"
        await self.carrier.line.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        await self.carrier.line.__aexit__(*exc)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _accept(self) -> asyncio.Protocol:
        self.connections += 1
        return self.carrier.protocol()

    def drop(self) -> None:
        """Drop the client's connection."""
        self.carrier.drop()

    def break_stream(self) -> None:
        """Half a reply frame, then the connection drops: what a flaky 4G link or converter does."""
        self.carrier.send(bytes.fromhex("010308"))
        self.drop()

    def describe(self) -> str:
        return f"RTU over TCP on {self.path}: {len(self.devices)} units — {self.units.describe()}"


# =========================================================================== sluice sim rtu
def parse_unit_arg(text: str) -> tuple[int, str]:
    unit, sep, profile = text.partition("=")
    if not sep or not unit.strip().isdigit() or not 1 <= int(unit) <= 247 or not profile.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write UNIT=PROFILE, e.g. 3=energy-meter (unit ids 1..247)")
    return int(unit), profile.strip()


def parse_fault_arg(text: str) -> tuple[int, str, float]:
    unit, sep, rest = text.partition(":")
    name, _, value = rest.partition("=")
    fields = {"no_answer", "delay", "exception", "crc", "garbage", "truncate"}
    if not sep or not unit.isdigit() or name not in fields:
        raise argparse.ArgumentTypeError(f"{text!r}: write UNIT:FAULT[=VALUE], FAULT one of "
                                         + ", ".join(sorted(fields)) + " (e.g. 2:crc=0.1, 3:no_answer)")
    try:
        number = float(value) if value else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from None
    return int(unit), name, number


def sim_units_from_args(profiles_dir: Path, units: Sequence[tuple[int, str]],
                        faults: Sequence[tuple[int, str, float]]) -> dict[int, SimDevice] | None:
    """``--unit UNIT=PROFILE`` and ``--fault UNIT:FAULT[=VALUE]`` -> the units of a simulated bus
    (``sluice sim rtu``, ``sluice sim dtu``); None after printing what is wrong."""
    errors: list[ConfigError] = []
    profiles = load_profiles(profiles_dir, errors)
    for err in errors:
        print(err, file=sys.stderr)
    origin = time.time()
    devices: dict[int, SimDevice] = {}
    for unit, name in units:
        profile = profiles.get(name)
        if not isinstance(profile, ProfileModel):
            print(f"unknown Modbus profile '{name}' in {profiles_dir} — available: "
                  + (", ".join(sorted(p for p, m in profiles.items() if isinstance(m, ProfileModel))) or "none"),
                  file=sys.stderr)
            return None
        if unit in devices:
            print(f"unit id {unit} is given twice — one unit id per device on a bus", file=sys.stderr)
            return None
        devices[unit] = SimDevice(profile, unit, name=f"{name}/{unit}", seed=zlib.crc32(f"{name}/{unit}".encode()),
                                  origin=origin, faults=Faults())
    for unit, fault, value in faults:
        if unit not in devices:
            print(f"--fault {unit}:{fault}: no unit {unit} on this bus", file=sys.stderr)
            return None
        setattr(devices[unit].faults, fault,
                int(value) if fault == "exception" else (value != 0 if fault == "no_answer" else value))
    return devices


def main_sim_rtu(argv: Sequence[str] | None = None) -> int:
    """``sluice sim rtu``: serve units on a pty until SIGINT/SIGTERM; 2 for bad arguments."""
    parser = argparse.ArgumentParser(
        prog="sluice sim rtu",
        description="Simulate a Modbus RTU bus on a pseudo-terminal; prints the port the gateway should open.")
    parser.add_argument("--unit", dest="units", action="append", type=parse_unit_arg, required=True,
                        metavar="UNIT=PROFILE", help="a unit id and the profile it serves (repeat for more units)")
    parser.add_argument("--profiles", type=Path, default=Path("config/profiles"), help="profile directory")
    parser.add_argument("--link", type=Path, default=None,
                        help="also make this path a symlink to the port (stays valid across --flap)")
    parser.add_argument("--baudrate", type=int, default=9600)
    parser.add_argument("--parity", choices=["N", "E", "O"], default="N")
    parser.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    parser.add_argument("--wire-timing", action="store_true",
                        help="each frame takes its transmission time; units ignore other baud rates")
    parser.add_argument("--fault", dest="faults", action="append", type=parse_fault_arg, default=[],
                        metavar="UNIT:FAULT[=VALUE]", help="e.g. 2:crc=0.1, 3:no_answer, 4:delay=0.5")
    add_log_level(parser, "info")
    args = parser.parse_args(argv)

    setup_logging(args.log_level)
    devices = sim_units_from_args(args.profiles, args.units, args.faults)
    if devices is None:
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with RtuBus(devices.values(), link=args.link, baudrate=args.baudrate, parity=args.parity,
                          stopbits=args.stopbits, wire_timing=args.wire_timing) as bus:
            print(bus.describe(), flush=True)
            print(f"port: {bus.path}", flush=True)
            await stop.wait()

    asyncio.run(main())
    return 0
