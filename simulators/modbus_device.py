"""The simulated Modbus device, independent of any transport: a request PDU in, a response PDU out.

Layout:

* :class:`SimDevice` — one unit id: a profile's points, each driven by a signal generator
  (``sim:`` in the profile, or a default), held as a register image computed when a request is
  answered; every answered read that covers a point is one read of its signal (a ``counter``
  advances by one step). The values are encoded here, from the profile model and the shared
  byte orders of :mod:`drivers.wire`, not with the driver's codec: two independent
  implementations of one profile keep each other honest.
* :func:`answer` — the response PDU of a device to a request PDU: function codes 1-4 served,
  writes (5, 6, 15, 16) refused with exception 01 unless the device is ``writable``.
* :class:`Faults` — what a unit does wrong (silence, slowness, an exception, a dropped
  connection, noise on an RTU line); mutable while a server runs.
* :class:`Units` — the units behind one transport (a TCP port, an RTU bus, a DTU): what to do
  with each request (answer now, later, never, or drop the connection) and the statistics.
  The transports (:mod:`simulators.modbus_tcp`, :mod:`simulators.modbus_rtu`,
  :mod:`simulators.modbus_dtu`) own only their framing and their bytes.

pymodbus is deliberately not used: the gateway's client is our own, and the tests check it
against pymodbus separately; a second, independent implementation here keeps both honest.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections import Counter
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import TypeAdapter

from drivers.modbus.profile import MAX_BITS, MAX_REGISTERS, Point, ProfileModel, points_of
from drivers.signals import Signal, SignalSpec, default_spec, make_signal
from drivers.wire import to_big_endian

__all__ = [
    "GATEWAY_NO_RESPONSE",
    "ILLEGAL_ADDRESS",
    "ILLEGAL_FUNCTION",
    "ILLEGAL_VALUE",
    "WRITE_FUNCTIONS",
    "Faults",
    "Later",
    "ServerStats",
    "ServesUnits",
    "SimDevice",
    "Units",
    "UnknownUnit",
    "Verdict",
    "answer",
]

log = logging.getLogger("sluice.sim")

ILLEGAL_FUNCTION = 0x01
ILLEGAL_ADDRESS = 0x02
ILLEGAL_VALUE = 0x03
GATEWAY_NO_RESPONSE = 0x0B
"""Gateway target device failed to respond: what a TCP gateway answers for an absent unit."""

WRITE_FUNCTIONS = frozenset({5, 6, 15, 16})
_TABLE_OF_FUNCTION = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}
_STRUCT_CODE = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q", "uint64": "Q",
                "float32": "f", "float64": "d"}
_INT_RANGES = {"int16": (-(1 << 15), 1 << 16), "uint16": (0, 1 << 16), "int32": (-(1 << 31), 1 << 32),
               "uint32": (0, 1 << 32), "int64": (-(1 << 63), 1 << 64), "uint64": (0, 1 << 64)}
_MAX_WRITE_BITS = 1968  # write multiple coils (15): the spec's limit
_MAX_WRITE_REGISTERS = 123  # write multiple registers (16)


# =========================================================================== faults
@dataclass(slots=True)
class Faults:
    """What a unit does wrong. Mutable: tests change it while a server runs.

    Checked in this order when a request for the unit arrives: ``disconnect`` (close the client's
    TCP connection, answer nothing; it has no meaning on a serial line and is ignored there),
    ``no_answer`` (silence), ``delay`` (seconds before answering, other units are not held up),
    ``exception`` (answer with this code instead of data). On an RTU line (a bus, a serial device
    server, a DTU), ``crc``, ``garbage`` and ``truncate`` are the share (0..1) of replies sent
    with a wrong CRC, preceded by noise or cut short; ``True`` means every reply.
    """

    no_answer: bool = False
    delay: float = 0.0
    exception: int | None = None
    disconnect: bool = False
    crc: float = 0.0
    garbage: float = 0.0
    truncate: float = 0.0


class _Reject(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


# =========================================================================== the register image
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


def _wire_bytes(point: Point, value: Any) -> bytes:
    """The bytes of a register value as they go on the wire, in the point's byte order.
    Raises ValueError (or OverflowError) for a value its type cannot hold."""
    if point.type == "string":
        size = 2 * point.width
        return to_big_endian(str(value).encode("latin-1", "replace")[:size].ljust(size, b"\x00"), point.byte_order)
    number: int | float
    if point.type in _INT_RANGES:
        if isinstance(value, int) and point.scale == 1 and point.offset == 0:
            number = value  # exact: 64-bit integers do not survive a float
        else:
            scaled = (float(value) - point.offset) / point.scale
            if not math.isfinite(scaled):
                raise ValueError(f"{value!r} is not a number a {point.type} can hold")
            number = round(scaled)
    else:
        number = (float(value) - point.offset) / point.scale
    try:
        big = struct.pack(">" + _STRUCT_CODE[point.type], number)
    except struct.error as exc:
        raise ValueError(f"{value!r} does not fit in {point.type} ({exc})") from None
    return to_big_endian(big, point.byte_order)


def _store(image: dict[int, Any], point: Point, value: Any) -> None:
    """Write a value into a register (or bit) image keyed by address; a ``bit`` point keeps the
    other bits of its register (in a byte-swapped register the bit sits in the other byte)."""
    if point.kind in ("coil", "discrete"):
        image[point.address] = bool(value)
    elif point.type == "bool":
        mask = 1 << (point.bit or 0)
        if point.byte_order in ("BADC", "DCBA"):
            mask = ((mask & 0xFF) << 8) | (mask >> 8)
        word = image.get(point.address, 0)
        image[point.address] = (word | mask) if value else (word & ~mask & 0xFFFF)
    else:
        data = _wire_bytes(point, value)
        for i, word in enumerate(struct.unpack(f">{len(data) // 2}H", data)):
            image[point.address + i] = word


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
        image: dict[int, Any] = {}
        for point in self._by_table.get(kind, ()):
            if point.address < stop and point.end > address:
                self._encode(image, point, self._signals[point.name].value(now))
        image.update(self._written.get(kind, {}))
        if bits:
            return [bool(image.get(a, False)) for a in range(address, stop)]
        return [image.get(a, 0) & 0xFFFF for a in range(address, stop)]

    def _encode(self, image: dict[int, Any], point: Point, value: Any) -> None:
        value = _coerce(point, value)
        try:
            _store(image, point, value)
            return
        except (ValueError, OverflowError, TypeError) as exc:
            if point.type in _INT_RANGES and isinstance(value, (int, float)) and math.isfinite(value):
                _store(image, point, _wrapped(point, value))
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
def _pack_bits(bits: Sequence[int]) -> bytes:  # coils and inputs: bools (ints), set when true
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def _unpack_bits(data: bytes, count: int) -> list[bool]:
    return [bool(data[i // 8] >> (i % 8) & 1) for i in range(count)]


def _serve(device: SimDevice, pdu: bytes, now: float | None) -> bytes:
    function = pdu[0]
    if function in (1, 2, 3, 4):
        if len(pdu) != 5:
            raise _Reject(ILLEGAL_VALUE)
        address, count = struct.unpack_from(">HH", pdu, 1)
        found = device.read(function, address, count, now)
        if function in (1, 2):
            data = _pack_bits(found)
        else:
            data = struct.pack(f">{len(found)}H", *found)
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
    if (not 1 <= count <= (_MAX_WRITE_BITS if bits else _MAX_WRITE_REGISTERS) or len(data) != nbytes
            or nbytes != ((count + 7) // 8 if bits else 2 * count)):
        raise _Reject(ILLEGAL_VALUE)
    values: Any = _unpack_bits(data, count) if bits else list(struct.unpack(f">{count}H", data))
    device.write(function, address, values)
    return pdu[:5]


def answer(device: SimDevice, pdu: bytes, now: float | None = None) -> bytes:
    """The response PDU of ``device`` to a request PDU (an exception PDU for a refused request)."""
    try:
        return _serve(device, pdu, now)
    except _Reject as rej:
        return bytes((pdu[0] | 0x80, rej.code))


# =========================================================================== the units behind a transport
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


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a transport does with one request: ``reply`` now, with :meth:`Units.reply` of
    :attr:`device` (or, for a unit nobody simulates, with the exception :attr:`pdu`); ``later``,
    the same after :attr:`delay` seconds; stay ``silent``; or ``close`` the connection (TCP).
    The reply is made when it is sent: a read is one read of the signals, at that time."""

    action: Literal["reply", "later", "silent", "close"]
    pdu: bytes = b""
    device: SimDevice | None = None
    delay: float = 0.0


_SILENT = Verdict("silent")
_CLOSE = Verdict("close")


class Units:
    """The simulated units behind one transport, by unit id, with their faults and statistics.

    ``where`` names the transport in messages. ``unknown_unit``: a request for a unit id no device
    has gets exception 0x0B ("exception", like a TCP gateway whose serial device does not answer)
    or nothing ("silent", as on a serial bus, where a broadcast to unit 0 is never answered
    either). ``disconnects``: whether the transport has a connection to drop (TCP), or ignores
    the ``disconnect`` fault (a serial line).
    """

    def __init__(self, devices: Iterable[SimDevice], *, where: str, unknown_unit: UnknownUnit = "silent",
                 disconnects: bool = False) -> None:
        self.devices: dict[int, SimDevice] = {}
        for dev in devices:
            if dev.unit_id in self.devices:
                raise ValueError(f"unit id {dev.unit_id} is used twice on {where} "
                                 f"({self.devices[dev.unit_id].name}, {dev.name})")
            self.devices[dev.unit_id] = dev
        self.unknown_unit = unknown_unit
        self.disconnects = disconnects
        self.stats = ServerStats()

    def faults(self, unit_id: int) -> Faults:
        """The (mutable) faults of a unit: ``server.faults(1).delay = 0.5``."""
        return self.devices[unit_id].faults

    def set_faults(self, unit_id: int, **faults: Any) -> None:
        """Replace a unit's faults: ``set_faults(1, no_answer=True)``; no arguments clears them."""
        self.devices[unit_id].faults = Faults(**faults)

    def request(self, unit: int, pdu: bytes) -> Verdict:
        """Count one request and say what to do with it (the faults checked in their order)."""
        self.stats.requests[(unit, pdu[0])] += 1
        device = self.devices.get(unit)
        if device is None:
            if self.unknown_unit == "exception":
                return Verdict("reply", self._refused(unit, pdu[0], GATEWAY_NO_RESPONSE))
            return _SILENT
        faults = device.faults
        if faults.disconnect and self.disconnects:
            return _CLOSE
        if faults.no_answer:
            return _SILENT
        if faults.delay > 0:
            return Verdict("later", device=device, delay=faults.delay)
        return Verdict("reply", device=device)

    def reply(self, device: SimDevice, pdu: bytes) -> bytes:
        """The response PDU of ``device`` now: its ``exception`` fault, or :func:`answer`."""
        code = device.faults.exception
        if code is not None:
            return self._refused(device.unit_id, pdu[0], code)
        reply = answer(device, pdu)
        if reply[0] & 0x80:
            self.stats.exceptions[(device.unit_id, reply[1])] += 1
        return reply

    def _refused(self, unit: int, function: int, code: int) -> bytes:
        self.stats.exceptions[(unit, code)] += 1
        return bytes((function | 0x80, code))

    def describe(self) -> str:
        """``1 (meter), 2 (pump)``: the unit ids and names."""
        return ", ".join(f"{u} ({d.name})" for u, d in sorted(self.devices.items()))


class ServesUnits:
    """What every simulated transport shows of the units it carries (its :attr:`units`): the
    devices by unit id, the statistics, and the faults to change while it runs."""

    units: Units

    @property
    def devices(self) -> dict[int, SimDevice]:
        return self.units.devices

    @property
    def stats(self) -> ServerStats:
        return self.units.stats

    def faults(self, unit_id: int) -> Faults:
        """The (mutable) faults of a unit: ``server.faults(1).delay = 0.5``."""
        return self.units.faults(unit_id)

    def set_faults(self, unit_id: int, **faults: Any) -> None:
        """Replace a unit's faults: ``set_faults(1, no_answer=True)``; no arguments clears them."""
        self.units.set_faults(unit_id, **faults)


class Later:
    """Replies of slow units being held back: tasks cancelled together when their connection or
    bus goes (a slow unit answers late while the others go on being served)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, reply: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(reply, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
