"""Simulated Modbus RTU buses on pseudo-terminal pairs: several units served from their profiles
(the TCP simulator's :class:`~simulators.modbus_tcp.SimDevice` and
:func:`~simulators.modbus_tcp.answer`), RTU faults, optional wire timing, and ``sluice sim rtu``.

* :class:`RtuBus` — one bus: ``os.openpty()``, the simulator holds the master side, the gateway
  opens :attr:`RtuBus.path` (the slave, or a symlink to it at a path you choose, which stays the
  same when the "port" is unplugged and plugged in again: :meth:`RtuBus.vanish`,
  :meth:`RtuBus.reappear`). One task per bus answers one request at a time, like a real bus.
* :class:`RtuFaults` — per unit: the TCP simulator's faults (``no_answer``, ``delay``,
  ``exception``) plus the share of replies sent with a wrong CRC (``crc``), preceded by noise
  (``garbage``) or cut short (``truncate``). Mutable while the bus runs.
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.modbus.dtu_link import parse_listen
from drivers.modbus.profile import ProfileModel
from drivers.modbus.rtu import bus_key
from drivers.modbus.rtu_client import PreciseSleep, char_time, inter_frame_silence, rtu_frame
from drivers.wire import crc16
from gateway.config import is_loopback
from gateway.driver import Device
from simulators.modbus_tcp import Faults, ServerStats, SimDevice, answer, sim_device_for

__all__ = ["RtuBus", "RtuFaults", "RtuTcpServer", "buses_for_config", "main_sim_rtu", "sim_units_from_args"]

log = logging.getLogger("sluice.sim")


@dataclass(slots=True)
class RtuFaults(Faults):
    """A unit's faults on a serial bus. ``crc``, ``garbage`` and ``truncate`` are the share
    (0..1) of replies affected; ``True`` means every reply. ``disconnect`` has no meaning on a
    bus (use :meth:`RtuBus.vanish` for an unplugged port) and is ignored."""

    crc: float = 0.0
    garbage: float = 0.0
    truncate: float = 0.0


def _baud_constant(baudrate: int) -> int | None:
    return getattr(termios, f"B{baudrate}", None)


class RtuBus:
    """A simulated RS485 bus on a pty pair; ``async with`` opens it, leaving closes it."""

    on_serial = True  # the gateway opens :attr:`path` as a serial port (not so for the subclasses)

    def __init__(self, devices: Iterable[SimDevice], *, link: Path | str | None = None, baudrate: int = 9600,
                 parity: str = "N", stopbits: int = 1, wire_timing: bool = False, seed: int = 0,
                 serial_port: str | None = None) -> None:
        self.devices: dict[int, SimDevice] = {}
        for dev in devices:
            if dev.unit_id in self.devices:
                raise ValueError(f"unit id {dev.unit_id} is used twice on one bus "
                                 f"({self.devices[dev.unit_id].name}, {dev.name})")
            if not isinstance(dev.faults, RtuFaults):
                f = dev.faults
                dev.faults = RtuFaults(f.no_answer, f.delay, f.exception, f.disconnect)
            self.devices[dev.unit_id] = dev
        self.link = Path(link) if link is not None else None
        self.serial_port = serial_port
        self._serial: Any = None
        self.baudrate, self.parity, self.stopbits = baudrate, parity, stopbits
        self.wire_timing = wire_timing
        self.char = char_time(baudrate, 8, parity, stopbits)
        self.silence = inter_frame_silence(baudrate, 8, parity, stopbits)
        self.stats = ServerStats()
        self.bad_requests = 0  # request frames with a wrong CRC or an unknown function code
        self.wrong_line = 0  # requests ignored because the port was set to other line settings
        self._rng = random.Random(seed)
        self._master = self._slave = -1
        self._tty = ""
        self._buf = bytearray()
        self._arrived = 0.0  # loop time the last bytes came in
        self._sleep = PreciseSleep()  # wire timing to the microsecond, not epoll's millisecond
        self._data = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._late: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ the port
    @property
    def path(self) -> str:
        """What the gateway opens: the symlink if one was asked for, else the pty's slave."""
        return str(self.link) if self.link is not None else self._tty

    @property
    def present(self) -> bool:
        return self._master >= 0

    def faults(self, unit_id: int) -> RtuFaults:
        """The (mutable) faults of a unit: ``bus.faults(3).crc = 1``."""
        faults = self.devices[unit_id].faults
        assert isinstance(faults, RtuFaults)
        return faults

    def set_faults(self, unit_id: int, **faults: Any) -> None:
        """Replace a unit's faults; no arguments clears them."""
        self.devices[unit_id].faults = RtuFaults(**faults)

    async def __aenter__(self) -> RtuBus:
        self.reappear()
        self._task = asyncio.create_task(self._serve(), name=f"sim-rtu[{self.path}]")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for late in list(self._late):
            late.cancel()
        await asyncio.gather(*self._late, return_exceptions=True)
        self._sleep.close()
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
        self._buf.clear()

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
        import serial

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
            self._buf += data
            self._arrived = asyncio.get_running_loop().time()
            self._data.set()

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

    # ------------------------------------------------------------------ serving
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
        self.stats.requests[(unit, pdu[0])] += 1
        heard = None
        if self.wire_timing:
            # The request is still on the wire when it arrives here, and a unit knows it has ended
            # only after 3.5 characters of silence: from then on its reply takes its own
            # transmission time (_reply). One deadline from the arrival, so that this
            # simulator's own work and timer rounding are not added to the wire time.
            heard = self._arrived + len(request) * self.char + self.silence
            if not self._line_matches():
                self.wrong_line += 1
                return  # a device at another baud rate or parity hears only noise
        device = self.devices.get(unit)
        if unit == 0 or device is None:
            return  # broadcast, or nobody with this address on the bus: silence
        faults = device.faults
        assert isinstance(faults, RtuFaults)
        if faults.no_answer:
            return
        if faults.delay > 0:
            # A slow unit answers late while the others go on hearing requests: its reply may
            # land in a later transaction, as on a real bus.
            late = asyncio.create_task(self._reply(device, pdu, faults.delay), name=f"sim-rtu-late[{unit}]")
            self._late.add(late)
            late.add_done_callback(self._late.discard)
            return
        await self._reply(device, pdu, heard=heard)

    async def _reply(self, device: SimDevice, pdu: bytes, delay: float = 0.0, heard: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        if delay:
            await asyncio.sleep(delay)
            heard = None
        unit, faults = device.unit_id, device.faults
        assert isinstance(faults, RtuFaults)
        if faults.exception is not None:
            reply_pdu = bytes((pdu[0] | 0x80, faults.exception))
        else:
            reply_pdu = answer(device, pdu)
        if reply_pdu[0] & 0x80:
            self.stats.exceptions[(unit, reply_pdu[1])] += 1
        reply = rtu_frame(unit, reply_pdu)
        rng = self._rng
        if faults.truncate and rng.random() < faults.truncate:
            reply = reply[: max(2, len(reply) // 2)]
        if faults.crc and rng.random() < faults.crc:
            reply = reply[:-1] + bytes((reply[-1] ^ 0x5A,))
        if faults.garbage and rng.random() < faults.garbage:
            reply = bytes(rng.randrange(256) for _ in range(rng.randint(3, 9))) + reply
        if self.wire_timing:
            wait = (heard if heard is not None else loop.time()) + len(reply) * self.char - loop.time()
            if wait > 0:
                await self._sleep.sleep(wait)
        self._write(reply)

    def _write(self, data: bytes) -> None:
        if self._master >= 0:
            try:
                os.write(self._master, data)
            except OSError:
                pass  # the gateway closed its end

    def describe(self) -> str:
        units = ", ".join(f"{u} ({d.name})" for u, d in sorted(self.devices.items()))
        timing = ", wire-timed" if self.wire_timing else ""
        return (f"RTU bus on {self.path} at {self.baudrate} 8{self.parity}{self.stopbits}{timing}: "
                f"{len(self.devices)} units — {units}")


class RtuTcpServer(RtuBus):
    """A serial device server in raw mode: the same simulated bus, reached over TCP (RTU frames
    with CRC, no MBAP header). One client at a time, as most converters allow; a new client
    replaces the old one. :meth:`break_stream` sends half a frame and drops the connection."""

    on_serial = False

    def __init__(self, devices: Iterable[SimDevice], *, host: str = "127.0.0.1", port: int = 0,
                 **options: Any) -> None:
        super().__init__(devices, **options)
        self.host, self.port = host, port
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._transport: asyncio.Transport | None = None

    @property
    def path(self) -> str:
        return f"{self.host}:{self.port}"

    async def __aenter__(self) -> RtuTcpServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _RawStream(self), self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._task = asyncio.create_task(self._serve(), name=f"sim-rtu-tcp[{self.path}]")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        await super().__aexit__(*exc)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def vanish(self) -> None:
        self.drop()

    def reappear(self) -> None:
        pass

    def drop(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()
        self._buf.clear()

    def break_stream(self) -> None:
        """Half a reply frame, then the connection drops: what a flaky 4G link or converter does."""
        self._write(bytes.fromhex("010308"))
        self.drop()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _line_matches(self) -> bool:
        return True

    def describe(self) -> str:
        units = ", ".join(f"{u} ({d.name})" for u, d in sorted(self.devices.items()))
        return f"RTU over TCP on {self.path}: {len(self.devices)} units — {units}"


class _RawStream(asyncio.Protocol):
    def __init__(self, server: RtuTcpServer) -> None:
        self.server = server
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server.drop()
        self.transport = transport
        self.server._transport = transport  # type: ignore[assignment]
        self.server.connections += 1

    def data_received(self, data: bytes) -> None:
        if self.transport is not None and self.server._transport is self.transport:
            self.server._buf += data
            self.server._data.set()

    def connection_lost(self, exc: Exception | None) -> None:
        pass


# =========================================================================== from a gateway configuration
def _link_for(port: str) -> Path | None:
    """The configured port path if the simulator may make it a symlink to its pty, so that the
    gateway configuration works as written: a free path (or an earlier simulator's dangling or
    /dev/pts link) in a writable directory outside /dev. Never a real device."""
    path = Path(port).absolute()
    if path.parts[1:2] == ("dev",) or not os.access(path.parent, os.W_OK):
        return None
    if path.is_symlink():
        return path if os.readlink(path).startswith("/dev/pts/") or not path.exists() else None
    return None if path.exists() else path


def buses_for_config(devices: Sequence[Device], origin: float) -> list[RtuBus]:
    """The RTU side of a gateway configuration: one bus per serial port (``modbus_rtu``) at its
    line settings, serving exactly its devices' units and profiles; one simulated serial device
    server per loopback ``host:port`` (``modbus_rtu_tcp``); one DTU per ``dtu.id``
    (``modbus_rtu_dtu``) that dials in to the listen address and registers with its literal
    registration packet. A bus is served on a new pty, linked at the configured port path when
    that is possible (:func:`_link_for`); else a warning says to point the devices at the pty
    path printed at start."""
    from simulators.modbus_dtu import DtuSim  # it builds on this module

    serial: dict[str, list[Device]] = {}
    tcp: dict[tuple[str, int], list[Device]] = {}
    dtus: dict[str, list[Device]] = {}
    for dev in devices:
        cfg = dev.config
        if cfg.protocol == "modbus_rtu_dtu":
            dtus.setdefault(cfg.dtu.id, []).append(dev)
        elif cfg.protocol == "modbus_rtu":
            serial.setdefault(bus_key(cfg.port), []).append(dev)
        elif cfg.protocol == "modbus_rtu_tcp":
            if is_loopback(cfg.host):
                tcp.setdefault(("127.0.0.1" if cfg.host == "localhost" else cfg.host, cfg.port), []).append(dev)
            else:
                log.warning("not simulating %s: its host %s is not this machine", dev.id, cfg.host)
    buses: list[RtuBus] = []
    for group in serial.values():
        cfg = group[0].config
        link = _link_for(cfg.port)
        if link is None:
            log.warning("devices %s use %s, which the simulator cannot take over (a real device, or a directory "
                        "it cannot write): serving them on a new pseudo-terminal — point their port: at the path "
                        "printed below", ", ".join(d.id for d in group), cfg.port)
        buses.append(RtuBus(_units(group, origin), link=link, baudrate=cfg.baudrate, parity=cfg.parity,
                            stopbits=cfg.stopbits))
    buses += [RtuTcpServer(_units(group, origin), host=host, port=port) for (host, port), group in tcp.items()]
    for dtu_id, group in dtus.items():
        cfg = group[0].config
        registration, heartbeat = _literal(cfg.dtu.registration), cfg.dtu.heartbeat
        if registration is None:
            log.warning("not simulating DTU %s: its registration is a regex — run `sluice sim dtu --registration "
                        "...` with a packet that matches it", dtu_id)
            continue
        host, port = parse_listen(cfg.listen)
        limit = cfg.dtu.silence_limit
        buses.append(DtuSim(_units(group, origin), host="127.0.0.1" if host in ("0.0.0.0", "::") else host, port=port,
                            registration=registration, heartbeat=None if heartbeat is None else _literal(heartbeat),
                            heartbeat_interval=min(30.0, limit / 3) if limit else 30.0))
    return buses


def _literal(packet: Any) -> bytes | None:
    """The bytes of a DTU packet given as text: or hex:; None for a regex."""
    if packet.hex is not None:
        return bytes.fromhex(packet.hex)
    return packet.text.encode("utf-8") if packet.text is not None else None


def _units(group: Sequence[Device], origin: float) -> list[SimDevice]:
    units: dict[int, SimDevice] = {}
    for dev in group:
        unit = dev.config.unit_id
        if unit in units:
            log.warning("not simulating %s: unit id %d is already simulated on its bus for %s", dev.id, unit,
                        units[unit].name)
            continue
        units[unit] = sim_device_for(dev, origin, RtuFaults())
    return list(units.values())


# =========================================================================== sluice sim rtu
def _parse_unit(text: str) -> tuple[int, str]:
    unit, sep, profile = text.partition("=")
    if not sep or not unit.strip().isdigit() or not 1 <= int(unit) <= 247 or not profile.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write UNIT=PROFILE, e.g. 3=energy-meter (unit ids 1..247)")
    return int(unit), profile.strip()


def _parse_fault(text: str) -> tuple[int, str, float]:
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
    from gateway.config import load_profiles
    from gateway.yamlpos import ConfigError

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
                                  origin=origin, faults=RtuFaults())
    for unit, fault, value in faults:
        if unit not in devices:
            print(f"--fault {unit}:{fault}: no unit {unit} on this bus", file=sys.stderr)
            return None
        setattr(devices[unit].faults, fault,
                int(value) if fault == "exception" else (value != 0 if fault == "no_answer" else value))
    return devices


def main_sim_rtu(argv: Sequence[str] | None = None) -> int:
    """``sluice sim rtu``: serve units on a pty until SIGINT/SIGTERM; 2 for bad arguments."""
    from gateway.logs import add_log_level, setup_logging

    parser = argparse.ArgumentParser(
        prog="sluice sim rtu",
        description="Simulate a Modbus RTU bus on a pseudo-terminal; prints the port the gateway should open.")
    parser.add_argument("--unit", dest="units", action="append", type=_parse_unit, required=True,
                        metavar="UNIT=PROFILE", help="a unit id and the profile it serves (repeat for more units)")
    parser.add_argument("--profiles", type=Path, default=Path("config/profiles"), help="profile directory")
    parser.add_argument("--link", type=Path, default=None,
                        help="also make this path a symlink to the port (stays valid across --flap)")
    parser.add_argument("--baudrate", type=int, default=9600)
    parser.add_argument("--parity", choices=["N", "E", "O"], default="N")
    parser.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    parser.add_argument("--wire-timing", action="store_true",
                        help="each frame takes its transmission time; units ignore other baud rates")
    parser.add_argument("--fault", dest="faults", action="append", type=_parse_fault, default=[],
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
