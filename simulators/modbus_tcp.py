"""Simulated Modbus TCP devices: a plain asyncio server that serves any ``protocol: modbus``
profile, with per-unit fault injection, request statistics and the ``sluice sim`` entry point.

Layout:

* :class:`SimDevice` — one unit id: a profile's points, each driven by a signal generator
  (``sim:`` in the profile, or a default), encoded with the driver's codec
  (:func:`drivers.modbus.encode_into`), so a profile means the same thing on both sides.
  Registers are computed when a request is answered; every answered read that covers a point
  is one read of its signal (a ``counter`` advances by one step).
* :class:`ModbusTcpServer` — one listening port, one or many unit ids behind it; MBAP framing,
  function codes 1-4 served, writes (5, 6, 15, 16) refused with exception 01 unless the device
  is ``writable``; an async context manager, port 0 picks a free port.
* Configuration: ``sim.yaml`` (:class:`SimFile`) or a gateway configuration directory (every
  enabled ``modbus_tcp`` device on a loopback host), :func:`load_simulation`,
  :func:`run_simulator` and :func:`main_sim` (``sluice sim``).

pymodbus is deliberately not used: the gateway's client is our own, and the tests check it
against pymodbus separately; a second, independent implementation here keeps both honest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import logging
import math
import signal
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, model_validator

from drivers.modbus.codec import encode_into
from drivers.modbus.profile import MAX_BITS, MAX_REGISTERS, Point, ProfileModel, points_of
from drivers.signals import Signal, SignalSpec, default_spec, make_signal
from gateway.config import load_profiles, is_loopback, load_config
from gateway.driver import Device, StrictModel
from gateway.units import Duration, Identifier
from gateway.validation import validate_doc
from gateway.yamlpos import ConfigError, ConfigErrors, load_yaml

__all__ = [
    "GATEWAY_NO_RESPONSE",
    "ILLEGAL_ADDRESS",
    "ILLEGAL_FUNCTION",
    "ILLEGAL_VALUE",
    "Faults",
    "ModbusTcpServer",
    "ServerStats",
    "SimDevice",
    "SimFile",
    "load_simulation",
    "main_sim",
    "run_simulator",
]

log = logging.getLogger("sluice.sim")

ILLEGAL_FUNCTION = 0x01
ILLEGAL_ADDRESS = 0x02
ILLEGAL_VALUE = 0x03
GATEWAY_NO_RESPONSE = 0x0B
"""Gateway target device failed to respond: what a TCP gateway answers for an absent unit."""

WRITE_FUNCTIONS = frozenset({5, 6, 15, 16})
_TABLE_OF_FUNCTION = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}
_INT_RANGES = {"int16": (-(1 << 15), 1 << 16), "uint16": (0, 1 << 16), "int32": (-(1 << 31), 1 << 32),
               "uint32": (0, 1 << 32), "int64": (-(1 << 63), 1 << 64), "uint64": (0, 1 << 64)}


# =========================================================================== devices
@dataclass(slots=True)
class Faults:
    """What a unit does wrong. Mutable: tests change it while a server runs.

    Checked in this order when a request for the unit arrives: ``disconnect`` (close the client's
    connection, answer nothing), ``no_answer`` (silence), ``delay`` (seconds before answering,
    other units on the connection are not held up), ``exception`` (answer with this code instead
    of data).
    """

    no_answer: bool = False
    delay: float = 0.0
    exception: int | None = None
    disconnect: bool = False


class _Reject(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _coerce(point: Point, value: Any) -> Any:
    """A signal's value -> what the point's type holds (signals are written without types)."""
    if point.type == "bool" or point.kind in ("coil", "discrete"):
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "on", "yes")
        return bool(round(value)) if isinstance(value, float) else bool(value)
    if point.type == "string":
        return value if isinstance(value, str) else str(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return 0
    return value


def _wrapped(point: Point, value: Any) -> Any:
    """An integer value that overflows its register wraps like a device's counter does."""
    low, size = _INT_RANGES[point.type]
    raw = round((float(value) - point.offset) / point.scale)
    raw = (raw - low) % size + low
    return raw * point.scale + point.offset


class SimDevice:
    """One simulated unit: a profile's points driven by signals. No I/O.

    ``origin`` is the time the time-based signals start from (default: now); ``seed`` seeds the
    random walks (point ``i`` uses ``seed + i``). Addresses from 0 to the end of the highest
    point of a kind can be read (gaps read as 0); beyond that, exception 02. A ``sparse`` device
    has only the registers (and bits) its points occupy, like many real ones: a read that touches
    any other gets exception 02.
    """

    def __init__(self, profile: ProfileModel, unit_id: int = 1, *, name: str = "", seed: int = 0,
                 origin: float | None = None, writable: bool = False, faults: Faults | None = None,
                 sparse: bool = False) -> None:
        self.profile = profile
        self.unit_id = unit_id
        self.name = name or f"unit {unit_id}"
        self.writable = writable
        self.faults = faults or Faults()
        self._seed = seed
        self._origin = time.time() if origin is None else origin
        self._points = points_of(profile)
        self._signals: dict[str, Signal] = {}
        for i, (model, point) in enumerate(zip(profile.points, self._points, strict=True)):
            spec = model.sim or default_spec(point.name, point.type, point.min, point.max)
            self._signals[point.name] = make_signal(spec, origin=self._origin, seed=seed + i)
        self._by_table: dict[str, list[Point]] = {}
        for point in self._points:
            self._by_table.setdefault(point.kind, []).append(point)
        self._ends = {kind: max(p.end for p in pts) for kind, pts in self._by_table.items()}
        self._present: dict[str, set[int]] | None = None
        if sparse:
            self._present = {kind: {a for p in pts for a in range(p.address, p.end)}
                             for kind, pts in self._by_table.items()}
        self._written: dict[str, dict[int, Any]] = {"coil": {}, "holding": {}}
        self._bad_values: set[str] = set()

    def set_signal(self, point: str, spec: SignalSpec | dict[str, Any]) -> None:
        """Replace the signal of ``point`` (a SignalSpec or its dict form), e.g. in a test."""
        if point not in self._signals:
            raise KeyError(f"{self.name}: the profile has no point {point!r}")
        if isinstance(spec, dict):
            from pydantic import TypeAdapter

            spec = TypeAdapter(SignalSpec).validate_python(spec)
        index = next(i for i, p in enumerate(self._points) if p.name == point)
        self._signals[point] = make_signal(spec, origin=self._origin, seed=self._seed + index)

    def end(self, kind: str) -> int:
        """One past the highest address of ``kind`` this device answers for (0: none)."""
        return self._ends.get(kind, 0)

    def read(self, function: int, address: int, count: int, now: float | None = None) -> list[int] | list[bool]:
        """Registers (3, 4) or bits (1, 2) at ``address``; raises ``_Reject`` with an exception code."""
        kind = _TABLE_OF_FUNCTION[function]
        bits = function in (1, 2)
        if not 1 <= count <= (MAX_BITS if bits else MAX_REGISTERS):
            raise _Reject(ILLEGAL_VALUE)
        stop = address + count
        if stop > self.end(kind):
            raise _Reject(ILLEGAL_ADDRESS)
        if self._present is not None and not self._present[kind].issuperset(range(address, stop)):
            raise _Reject(ILLEGAL_ADDRESS)
        now = time.time() if now is None else now
        table: dict[int, Any] = {}
        for point in self._by_table.get(kind, ()):
            if point.address < stop and point.end > address:
                self._encode(table, point, self._signals[point.name].value(now))
        table.update(self._written.get(kind, {}))
        if bits:
            return [bool(table.get(a, False)) for a in range(address, stop)]
        return [table.get(a, 0) & 0xFFFF for a in range(address, stop)]

    def _encode(self, table: dict[int, Any], point: Point, value: Any) -> None:
        value = _coerce(point, value)
        try:
            encode_into(table, point, value)
            return
        except (ValueError, OverflowError, TypeError) as exc:
            if point.type in _INT_RANGES and isinstance(value, (int, float)) and math.isfinite(value):
                encode_into(table, point, _wrapped(point, value))
                return
            problem = str(exc)
        if point.name not in self._bad_values:  # once per point, not once per poll
            self._bad_values.add(point.name)
            log.warning("%s: the simulated value of %s cannot be encoded (%s); it reads as 0 — "
                        "check the point's sim: range against its type", self.name, point.name, problem)

    def write(self, function: int, address: int, values: Sequence[int] | Sequence[bool]) -> None:
        """Store written coils (5, 15) or holding registers (6, 16); they override the signals."""
        if not self.writable:
            raise _Reject(ILLEGAL_FUNCTION)
        kind = "coil" if function in (5, 15) else "holding"
        if address + len(values) > self.end(kind):
            raise _Reject(ILLEGAL_ADDRESS)
        for i, v in enumerate(values):
            self._written[kind][address + i] = v


# =========================================================================== PDUs
def _pack_bits(bits: Sequence[bool]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def _unpack_bits(data: bytes, count: int) -> list[bool]:
    return [bool(data[i // 8] >> (i % 8) & 1) for i in range(count)]


def answer(device: SimDevice, pdu: bytes, now: float | None = None) -> bytes:
    """The response PDU of ``device`` to a request PDU (an exception PDU for a refused request)."""
    function = pdu[0]
    try:
        if function in (1, 2, 3, 4):
            if len(pdu) != 5:
                raise _Reject(ILLEGAL_VALUE)
            address, count = struct.unpack_from(">HH", pdu, 1)
            values = device.read(function, address, count, now)
            if function in (1, 2):
                data = _pack_bits(values)  # type: ignore[arg-type]
            else:
                data = struct.pack(f">{len(values)}H", *values)
            return bytes((function, len(data))) + data
        if function not in WRITE_FUNCTIONS:
            raise _Reject(ILLEGAL_FUNCTION)
        if not device.writable:
            raise _Reject(ILLEGAL_FUNCTION)  # before parsing: a read-only device knows no writes
        if function in (5, 6):
            if len(pdu) != 5:
                raise _Reject(ILLEGAL_VALUE)
            address, value = struct.unpack_from(">HH", pdu, 1)
            if function == 5 and value not in (0x0000, 0xFF00):
                raise _Reject(ILLEGAL_VALUE)
            device.write(function, address, [value == 0xFF00] if function == 5 else [value])
            return pdu
        if len(pdu) < 6:
            raise _Reject(ILLEGAL_VALUE)
        address, count, nbytes = struct.unpack_from(">HHB", pdu, 1)
        data = pdu[6:]
        bits = function == 15
        if (not 1 <= count <= (1968 if bits else 123) or len(data) != nbytes
                or nbytes != ((count + 7) // 8 if bits else 2 * count)):
            raise _Reject(ILLEGAL_VALUE)
        values: Any = _unpack_bits(data, count) if bits else list(struct.unpack(f">{count}H", data))
        device.write(function, address, values)
        return pdu[:5]
    except _Reject as rej:
        return bytes((function | 0x80, rej.code))


# =========================================================================== server
@dataclass(slots=True)
class ServerStats:
    """What a server received: requests per (unit id, function code), including refused ones."""

    requests: Counter[tuple[int, int]] = field(default_factory=Counter)
    exceptions: Counter[tuple[int, int]] = field(default_factory=Counter)  # (unit id, exception code)
    connections: int = 0

    def count(self, unit: int | None = None, function: int | None = None) -> int:
        return sum(n for (u, f), n in self.requests.items()
                   if (unit is None or u == unit) and (function is None or f == function))

    @property
    def writes(self) -> int:
        """Requests with a write function code (5, 6, 15, 16): the gateway must never send one."""
        return sum(n for (_u, f), n in self.requests.items() if f in WRITE_FUNCTIONS)


UnknownUnit = Literal["exception", "silent"]


class ModbusTcpServer:
    """One listening port serving one or many simulated units. ``async with`` starts it.

    ``unknown_unit``: a request for a unit id no device has gets exception 0x0B ("exception",
    like a TCP gateway whose serial device does not answer) or nothing ("silent").
    """

    def __init__(self, devices: Iterable[SimDevice], *, host: str = "127.0.0.1", port: int = 0,
                 unknown_unit: UnknownUnit = "exception") -> None:
        self.devices: dict[int, SimDevice] = {}
        for dev in devices:
            if dev.unit_id in self.devices:
                raise ValueError(f"unit id {dev.unit_id} is used twice on {host}:{port} "
                                 f"({self.devices[dev.unit_id].name}, {dev.name})")
            self.devices[dev.unit_id] = dev
        self.host = host
        self.port = port
        self.unknown_unit = unknown_unit
        self.stats = ServerStats()
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.StreamWriter, set[asyncio.Task[None]]] = {}
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def name(self) -> str:
        return f"sim[{self.host}:{self.port}]"

    @property
    def listening(self) -> bool:
        return self._server is not None

    def faults(self, unit_id: int) -> Faults:
        """The (mutable) faults of a unit: ``server.faults(1).delay = 0.5``."""
        return self.devices[unit_id].faults

    def set_faults(self, unit_id: int, **faults: Any) -> None:
        """Replace a unit's faults: ``set_faults(1, no_answer=True)``; no arguments clears them."""
        self.devices[unit_id].faults = Faults(**faults)

    async def __aenter__(self) -> ModbusTcpServer:
        await self.resume()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.refuse()

    async def resume(self) -> None:
        """Listen (again) on the same port; the first call binds, port 0 picks a free one."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.debug("%s: listening", self.name)

    async def refuse(self) -> None:
        """Stop listening (new connections are refused) and close every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer, tasks in list(self._connections.items()):
            for task in tasks:
                task.cancel()
            writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers))
        if server is not None:
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        task.set_name(f"{self.name}<-{peer[0]}:{peer[1]}" if peer else self.name)
        self._handlers.add(task)
        pending: set[asyncio.Task[None]] = set()
        self._connections[writer] = pending
        self.stats.connections += 1
        try:
            while True:
                header = await reader.readexactly(7)
                tid, pid, length, unit = struct.unpack(">HHHB", header)
                if pid != 0 or not 2 <= length <= 254:
                    log.debug("%s: bad MBAP header %s, closing the connection", self.name, header.hex())
                    return
                pdu = await reader.readexactly(length - 1)
                if not await self._request(writer, pending, tid, unit, pdu):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
            del self._connections[writer]
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _request(self, writer: asyncio.StreamWriter, pending: set[asyncio.Task[None]],
                       tid: int, unit: int, pdu: bytes) -> bool:
        """Handle one request; returns False when the connection must be closed."""
        self.stats.requests[(unit, pdu[0])] += 1
        device = self.devices.get(unit)
        if device is None:
            if self.unknown_unit == "exception":
                self._send(writer, tid, unit, bytes((pdu[0] | 0x80, GATEWAY_NO_RESPONSE)))
            return True
        faults = device.faults
        if faults.disconnect:
            return False
        if faults.no_answer:
            return True
        if faults.delay > 0:
            late = asyncio.create_task(self._answer_later(writer, faults.delay, tid, device, pdu),
                                       name=f"{self.name}:delay[unit {unit}]")
            pending.add(late)
            late.add_done_callback(pending.discard)
            return True
        self._answer(writer, tid, device, pdu)
        await writer.drain()
        return True

    async def _answer_later(self, writer: asyncio.StreamWriter, delay: float, tid: int,
                            device: SimDevice, pdu: bytes) -> None:
        await asyncio.sleep(delay)
        if not writer.is_closing():
            self._answer(writer, tid, device, pdu)

    def _answer(self, writer: asyncio.StreamWriter, tid: int, device: SimDevice, pdu: bytes) -> None:
        code = device.faults.exception
        reply = bytes((pdu[0] | 0x80, code)) if code is not None else answer(device, pdu)
        self._send(writer, tid, device.unit_id, reply)

    def _send(self, writer: asyncio.StreamWriter, tid: int, unit: int, reply: bytes) -> None:
        if reply[0] & 0x80:
            self.stats.exceptions[(unit, reply[1])] += 1
        writer.write(struct.pack(">HHHB", tid, 0, len(reply) + 1, unit) + reply)

    def describe(self) -> str:
        units = ", ".join(str(u) for u in sorted(self.devices))
        return f"simulating {len(self.devices)} devices on {self.host}:{self.port} (unit ids {units})"


# =========================================================================== configuration
class FaultsModel(StrictModel):
    no_answer: bool = Field(default=False, description="never answer this unit")
    delay: Duration = Field(default=0.0, le=3600, description="wait this long before answering")
    exception: int | None = Field(default=None, ge=1, le=255, description="answer with this exception code")
    disconnect: bool = Field(default=False, description="close the connection on a request for this unit")


class SimDeviceModel(StrictModel):
    profile: str = Field(min_length=1, description="a file of profiles_dir, without .yaml")
    port: int = Field(ge=0, le=65535, description="devices on one port share a server; 0: a free port")
    unit_id: int = Field(default=1, ge=0, le=255)
    name: Identifier | None = Field(default=None, description="for messages; defaults to <profile>@<port>/<unit>")
    seed: int = Field(default=0, description="seeds the random walks")
    writable: bool = Field(default=False, description="accept writes (5, 6, 15, 16) instead of exception 01")
    faults: FaultsModel = FaultsModel()


class RtuFaultsModel(FaultsModel):
    crc: float = Field(default=0.0, ge=0, le=1, description="share of replies sent with a wrong CRC")
    garbage: float = Field(default=0.0, ge=0, le=1, description="share of replies preceded by noise")
    truncate: float = Field(default=0.0, ge=0, le=1, description="share of replies cut short")


class SimUnitModel(StrictModel):
    profile: str = Field(min_length=1, description="a file of profiles_dir, without .yaml")
    unit_id: int = Field(ge=1, le=247)
    name: Identifier | None = Field(default=None, description="for messages; defaults to <profile>/<unit>")
    seed: int = Field(default=0, description="seeds the random walks")
    writable: bool = Field(default=False, description="accept writes (5, 6, 15, 16) instead of exception 01")
    faults: RtuFaultsModel = RtuFaultsModel()


class SimBusModel(StrictModel):
    """An RTU bus: served on a new pseudo-terminal (its path is printed), or on a serial port."""

    link: Path | None = Field(default=None, description="also make this path a symlink to the pty; relative to "
                                                        "this file")
    serial_port: str | None = Field(default=None, min_length=1,
                                    description="serve on this serial port instead of a pty (a null-modem "
                                                "cable or a socat pty pair to the gateway's port)")
    baudrate: int = Field(default=9600, ge=300, le=4_000_000)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    wire_timing: bool = Field(default=False, description="each frame takes its transmission time at baudrate")
    devices: list[SimUnitModel] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_port(self) -> SimBusModel:
        if self.link is not None and self.serial_port is not None:
            raise ValueError("give link: (a pty, linked there) or serial_port: (a real port), not both")
        return self


class ServerOptions(StrictModel):
    unknown_unit: UnknownUnit = "exception"


class SimFile(StrictModel):
    """``sim.yaml``: which profiles to serve on which ports and unit ids."""

    profiles_dir: Path = Field(default=Path("profiles"), description="relative to this file")
    host: str = Field(default="127.0.0.1", min_length=1, description="address to listen on")
    unknown_unit: UnknownUnit = Field(default="exception",
                                      description="exception: answer 0x0B; silent: answer nothing")
    servers: dict[int, ServerOptions] = Field(default_factory=dict, description="per-port options")
    devices: list[SimDeviceModel] = Field(default_factory=list, description="Modbus TCP devices")
    buses: list[SimBusModel] = Field(default_factory=list, description="Modbus RTU buses")


def _display(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def _is_gateway_config(path: Path) -> bool:
    return path.is_dir() or path.name == "gateway.yaml"


class SimServer(Protocol):
    """What ``sluice sim`` runs: a TCP server or an RTU bus (``async with`` serves it)."""

    devices: dict[int, SimDevice]

    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: object) -> None: ...
    def describe(self) -> str: ...


def load_simulation(path: Path | str) -> list[SimServer]:
    """Servers and buses (not started) for a ``sim.yaml`` file or a gateway configuration directory.

    A gateway configuration (a directory, or its ``gateway.yaml``) is served as written: every
    enabled ``modbus_tcp`` device whose host is a loopback address, at its port and unit id; the
    Modbus RTU devices of every serial port on a bus of their own
    (:func:`simulators.modbus_rtu.buses_for_config`); every ``modbus_rtu_tcp`` device on a
    loopback host behind a simulated serial device server at its port; every DTU with a literal
    registration dialling in to its ``listen:`` address.
    Raises :class:`ConfigErrors` with every problem located as ``file:line:col``.
    """
    path = Path(path)
    if _is_gateway_config(path):
        return _from_gateway_config(path)
    errors: list[ConfigError] = []
    doc, errs = load_yaml(path, _display(path))
    if doc is None:
        raise ConfigErrors(errs)
    errors += errs
    sim = validate_doc(doc, SimFile, errors)
    if sim is None:
        raise ConfigErrors(errors)
    profiles = load_profiles(path.parent / sim.profiles_dir, errors)
    origin = time.time()
    groups: dict[int, list[SimDevice]] = {}
    free: list[SimDevice] = []
    seen: dict[tuple[int, int], int] = {}
    if not sim.devices and not sim.buses:
        errors.append(doc.error((), "nothing to simulate", "add `devices:` (Modbus TCP) or `buses:` (Modbus RTU)"))

    def modbus_profile(loc: tuple[str | int, ...], name: str) -> ProfileModel | None:
        profile = profiles.get(name)
        if isinstance(profile, ProfileModel):
            return profile
        if name in profiles:
            errors.append(doc.error(loc, f"profile '{name}' is not a Modbus profile",
                                    "choose a profile with `protocol: modbus`"))
        elif profiles or not errors:
            close = difflib.get_close_matches(name, list(profiles), n=1)
            errors.append(doc.error(loc, f"unknown profile '{name}'", f"did you mean '{close[0]}'?" if close else
                                    f"add {sim.profiles_dir}/{name}.yaml; available: "
                                    + (", ".join(sorted(profiles)) or "none")))
        return None

    for i, dev in enumerate(sim.devices):
        profile = modbus_profile(("devices", i, "profile"), dev.profile)
        if profile is None:
            continue
        if dev.port and (dev.port, dev.unit_id) in seen:
            errors.append(doc.error(("devices", i, "unit_id"), f"port {dev.port} unit id {dev.unit_id} is "
                                    f"already simulated by device {seen[(dev.port, dev.unit_id)] + 1}",
                                    "give each device on one port its own unit_id"))
            continue
        seen[(dev.port, dev.unit_id)] = i
        faults = Faults(**dev.faults.model_dump())
        device = SimDevice(profile, dev.unit_id, name=dev.name or f"{dev.profile}@{dev.port}/{dev.unit_id}",
                           seed=dev.seed, origin=origin, writable=dev.writable, faults=faults)
        (groups.setdefault(dev.port, []) if dev.port else free).append(device)
    for port in sim.servers:
        if port not in groups:
            errors.append(doc.error(("servers", port), f"no device is simulated on port {port}",
                                    "remove these options or fix the port number", key=True))
    from simulators.modbus_rtu import RtuBus, RtuFaults

    buses: list[SimServer] = []
    for b, bus in enumerate(sim.buses):
        units: dict[int, SimDevice] = {}
        for j, unit in enumerate(bus.devices):
            profile = modbus_profile(("buses", b, "devices", j, "profile"), unit.profile)
            if unit.unit_id in units:
                errors.append(doc.error(("buses", b, "devices", j, "unit_id"), f"unit id {unit.unit_id} is already "
                                        f"on this bus ({units[unit.unit_id].name})",
                                        "give each device on one bus its own unit_id"))
            elif profile is not None:
                units[unit.unit_id] = SimDevice(profile, unit.unit_id, name=unit.name or f"{unit.profile}/{unit.unit_id}",
                                                seed=unit.seed, origin=origin, writable=unit.writable,
                                                faults=RtuFaults(**unit.faults.model_dump()))
        link = path.parent / bus.link if bus.link is not None else None
        buses.append(RtuBus(units.values(), link=link, serial_port=bus.serial_port, baudrate=bus.baudrate,
                            parity=bus.parity, stopbits=bus.stopbits, wire_timing=bus.wire_timing))
    if errors:
        raise ConfigErrors(errors)
    options = {port: sim.servers.get(port, ServerOptions(unknown_unit=sim.unknown_unit)) for port in groups}
    servers: list[SimServer] = [ModbusTcpServer(devs, host=sim.host, port=port, unknown_unit=options[port].unknown_unit)
                                for port, devs in groups.items()]
    servers += [ModbusTcpServer([dev], host=sim.host, port=0, unknown_unit=sim.unknown_unit) for dev in free]
    return servers + buses


def sim_device_for(dev: Device, origin: float, faults: Faults | None = None) -> SimDevice:
    """A gateway device's unit, served from its profile; seeded by its id, so the same
    configuration gives the same random walks every run."""
    return SimDevice(dev.profile, dev.config.unit_id, name=dev.id, seed=zlib.crc32(dev.id.encode()), origin=origin,
                     faults=faults)


def _from_gateway_config(path: Path) -> list[SimServer]:
    from simulators.modbus_rtu import buses_for_config

    config = load_config(path, secrets=False)  # devices only: the sinks' secrets are not read
    origin = time.time()
    groups: dict[tuple[str, int], list[SimDevice]] = {}
    for dev in config.devices:
        cfg = dev.config
        if cfg.protocol != "modbus_tcp":
            continue
        if not is_loopback(cfg.host):
            log.warning("not simulating %s: its host %s is not this machine", dev.id, cfg.host)
            continue
        host = cfg.host if cfg.host[:1].isdigit() or ":" in cfg.host else "127.0.0.1"
        group = groups.setdefault((host, cfg.port), [])
        if any(d.unit_id == cfg.unit_id for d in group):
            log.warning("not simulating %s: unit id %d on %s:%d is already simulated for another device",
                        dev.id, cfg.unit_id, host, cfg.port)
            continue
        group.append(sim_device_for(dev, origin))
    servers: list[SimServer] = [ModbusTcpServer(devs, host=host, port=port) for (host, port), devs in groups.items()]
    return servers + buses_for_config(config.devices, origin)


async def run_simulator(config_path: Path | str, *, ready: Callable[[list[SimServer]], Any] | None = None,
                        stop: asyncio.Event | None = None) -> None:
    """Serve what ``config_path`` declares until ``stop`` is set (or the task is cancelled).

    ``config_path`` is a ``sim.yaml`` file or a gateway configuration directory (see
    :func:`load_simulation`). Prints one line per server (and for an
    RTU bus ``port: <path>``, the port the gateway opens), then calls ``ready(servers)``.
    Raises :class:`ConfigErrors` for a bad configuration and :class:`OSError` if a port is taken.
    """
    from simulators.modbus_rtu import RtuBus

    servers = load_simulation(config_path)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
            print(server.describe(), flush=True)
            if isinstance(server, RtuBus) and server.on_serial:
                print(f"port: {server.path}", flush=True)
        if not servers:
            print(f"nothing to simulate in {config_path}: no Modbus TCP or RTU-over-TCP device on a loopback "
                  "host, no Modbus RTU device", flush=True)
        if ready is not None:
            ready(servers)
        if stop is None:
            await asyncio.Future()  # until cancelled
        else:
            await stop.wait()


def main_sim(argv: Sequence[str] | None = None) -> int:
    """``sluice sim``: 0 after SIGINT/SIGTERM, 1 if a port is taken, 2 for configuration errors."""
    from gateway.logs import add_log_level, setup_logging

    parser = argparse.ArgumentParser(
        prog="sluice sim", description="Simulate Modbus TCP devices and Modbus RTU buses (on pseudo-terminals, whose "
                                       "paths are printed) from their profiles until Ctrl-C.")
    parser.add_argument("file", nargs="?", type=Path, help="a simulator file (see config/sim.yaml)")
    parser.add_argument("-c", "--config", type=Path, default=None,
                        help="a gateway configuration directory: simulate its Modbus TCP, RTU and RTU-over-TCP "
                             "devices on this machine "
                             "(default when no file is given: the same directory `sluice run` uses)")
    add_log_level(parser, "info")
    args = parser.parse_args(argv)
    if args.file is not None and args.config is not None:
        parser.error("give a simulator file or --config, not both")
    if args.file is not None:
        target = args.file
    elif args.config is not None:
        target = args.config
    else:
        from gateway.cli.loading import default_config_dir

        target = default_config_dir()

    setup_logging(args.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_simulator(target, stop=stop)

    try:
        asyncio.run(main())
    except ConfigErrors as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        print(f"{len(exc.errors)} error{'s' if len(exc.errors) != 1 else ''} in {target}; nothing was started",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot listen: {exc.strerror or exc} — is another simulator (or the real device) using "
              "the port? Stop it or change the port", file=sys.stderr)
        return 1
    return 0
