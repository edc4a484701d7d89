"""Modbus TCP: register-map profiles, the request planner, the value codec, a small asyncio
client (read function codes only) and the poller that shares one connection per host:port.

Layout, top to bottom — each part only uses the ones above it:

* **Profile and device models** (``ProfileModel``, ``DeviceModel``): what a technician writes.
* **Points**: a profile point resolved to kind, 0-based address and width.
* **Codec**: registers/bits -> values (:class:`RequestDecoder`, the hot path) and values ->
  registers/bits (:func:`encode`, for simulators).
* **Planner** (:func:`plan`): a device's points -> the fewest read requests.
* **Client** (:class:`ModbusTcpClient`): MBAP framing, one transaction at a time, a timeout per
  request, stale replies discarded. It can only send function codes 1, 2, 3 and 4: the gateway
  never writes to a device.
* **Poller** (:class:`ModbusTcpPoller`): one per host:port, every unit id behind it.

Byte order (``byte_order:``) names the order in which the bytes of a value arrive on the wire,
``A`` being the most significant byte, exactly as manuals print it:

====== ================ ===================== =========================================
order  16-bit (AB)      32-bit (ABCD)         64-bit (ABCDEFGH)
====== ================ ===================== =========================================
ABCD   AB               ABCD  big endian      ABCDEFGH  big endian (the default)
DCBA   BA               DCBA  little endian   HGFEDCBA  little endian
BADC   BA               BADC  bytes swapped   BADCFEHG  bytes swapped in every register
CDAB   AB               CDAB  words swapped   GHEFCDAB  register order reversed
====== ================ ===================== =========================================

The rule behind the table: ``BADC`` swaps the two bytes inside every register; ``CDAB``
reverses the order of the registers (for 64-bit values all four, the "word swap" of most
manuals); ``DCBA`` does both. Strings are ``ABCD`` (first character in the high byte) or
``BADC`` (first character in the low byte).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import logging
import math
import re
import struct
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar

from pydantic import Field, model_validator

from gateway.driver import (Claim, Device, DeviceConfig, DeviceStatus, Emit, FieldInfo, Problem, ProfileConfig,
                            StrictModel, ValidRange, fail_at, slow_timeout, tcp_claim)
from gateway.polling import Backoff, Health, Schedule, format_duration
from gateway.reading import GOOD, UNCERTAIN, FieldValue, Reading, shortest_float32
from simulators.signals import SignalSpec

__all__ = [
    "PROFILE_KIND",
    "PROTOCOLS",
    "DeviceModel",
    "ModbusClient",
    "ModbusConnectionError",
    "ModbusError",
    "ModbusExceptionResponse",
    "ModbusFrameError",
    "ModbusPoller",
    "ModbusProtocolError",
    "ModbusTcpClient",
    "ModbusTcpPoller",
    "ModbusTimeout",
    "Point",
    "PointModel",
    "ProfileModel",
    "Request",
    "RequestDecoder",
    "check",
    "claims",
    "encode",
    "encode_into",
    "make_pollers",
    "plan",
    "plan_summary",
    "points_of",
]

PROTOCOLS: Final = frozenset({"modbus_tcp"})
PROFILE_KIND: Final = "modbus"

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

log = logging.getLogger(__name__)

MAX_REGISTERS: Final = 125
"""Protocol limit of registers per read (function codes 3 and 4)."""
MAX_BITS: Final = 2000
"""Protocol limit of coils or discrete inputs per read (function codes 1 and 2)."""

Kind = Literal["coil", "discrete", "holding", "input"]
FUNCTION: Final[dict[str, int]] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
READ_FUNCTIONS: Final = frozenset(FUNCTION.values())
BIT_KINDS: Final = frozenset({"coil", "discrete"})

PointType = Literal["bool", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                    "float32", "float64", "string"]
# struct code and width in registers of each register type (string: 's', width from `length`)
_TYPES: Final[dict[str, tuple[str, int]]] = {
    "int16": ("h", 1), "uint16": ("H", 1), "int32": ("i", 2), "uint32": ("I", 2),
    "int64": ("q", 4), "uint64": ("Q", 4), "float32": ("f", 2), "float64": ("d", 4),
}
_INT_TYPES: Final = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})
ByteOrder = Literal["ABCD", "DCBA", "BADC", "CDAB"]

# Manual references: 0xxxx coil, 1xxxx discrete input, 3xxxx input, 4xxxx holding register.
_REF_KIND: Final = {0: "coil", 1: "discrete", 3: "input", 4: "holding"}
_KIND_DIGIT: Final = {v: k for k, v in _REF_KIND.items()}
RESERVED_NAMES: Final = frozenset({"quality", "time"})
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


# =========================================================================== configuration
_fail = fail_at


def parse_register_reference(ref: int | str) -> tuple[str, int]:
    """The manual's 1-based reference (``40001``, ``"00001"``, ``300001``) -> (kind, address).

    Raises ValueError with a message for people.
    """
    text = str(ref).strip()
    if isinstance(ref, int) and ref < 10000:
        raise ValueError(f"{ref} has no register-type digit — write references as in the manual: "
                         "0xxxx coil (in quotes, e.g. \"00001\": YAML reads leading zeros as octal), "
                         "1xxxx discrete input, 3xxxx input, 4xxxx holding register; "
                         "or give kind: and the 0-based address:")
    if not text.isdigit() or len(text) not in (5, 6):
        raise ValueError(f"{ref!r} is not a register reference — write 5 digits (40001) or 6 digits "
                         "(400001) as in the manual, or give kind: and the 0-based address:")
    digit, number = int(text[0]), int(text[1:])
    if digit not in _REF_KIND:
        raise ValueError(f"{ref!r} starts with {digit}, which is no register type — use 0xxxx coil, "
                         "1xxxx discrete input, 3xxxx input or 4xxxx holding register")
    if number < 1 or number > 65536:
        raise ValueError(f"{ref!r} is outside {digit}0001..{digit}65536 — references count from 1; "
                         "check the manual")
    return _REF_KIND[digit], number - 1


def looks_like_reference(kind: str, address: int) -> int | None:
    """The 0-based address meant when ``address`` of ``kind`` looks like the manual's 1-based
    reference of that kind (holding 40001 -> 0), else None. Profiles (``check``) and ``sluice read``
    give the same hint."""
    first, last = {"discrete": (10001, 19999), "input": (30001, 39999), "holding": (40001, 49999)}.get(kind, (0, -1))
    return address - first if first <= address <= last else None


class PointModel(StrictModel):
    """One value of a device's register map."""

    name: str = Field(description="field name in the reading; unique in the profile")
    kind: Kind | None = Field(default=None, description="coil | discrete | holding | input")
    address: int | None = Field(default=None, ge=0, le=65535, description="0-based protocol address")
    # `register` would shadow ABCMeta.register on the model class, hence the alias.
    reference: int | str | None = Field(default=None, alias="register",
                                        description="the manual's 1-based reference, e.g. 30001")
    type: PointType | None = None
    byte_order: ByteOrder = "ABCD"
    length: int | None = Field(default=None, ge=1, le=MAX_REGISTERS, description="registers, strings only")
    bit: int | None = Field(default=None, ge=0, le=15, description="bool from one bit of a register")
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    valid: ValidRange | None = None
    sim: SignalSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _reference(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("register") is None:
            return data
        if "kind" in data or "address" in data:
            raise _fail(("register",), "given together with kind:/address: — use one: the manual's reference "
                        "(register: 40001) or the 0-based kind: + address:", data["register"])
        try:
            kind, address = parse_register_reference(data["register"])
        except ValueError as exc:
            raise _fail(("register",), str(exc), data["register"]) from None
        return {**data, "kind": kind, "address": address}

    @model_validator(mode="after")
    def _consistent(self) -> PointModel:
        if not _NAME.match(self.name):
            raise _fail(("name",), f"{self.name!r} is not a field name — use letters, digits and '_', "
                        "starting with a letter (at most 64)", self.name)
        if self.name in RESERVED_NAMES:
            raise _fail(("name",), f"'{self.name}' is reserved (the reading carries its own) — rename "
                        f"the point, e.g. '{self.name}_value'", self.name)
        if self.kind is None:
            raise _fail((), "kind: is missing — add kind: coil | discrete | holding | input with address:, "
                        "or give the manual's reference as register: 40001")
        if self.address is None:
            raise _fail(("kind",), "address: is missing — add the 0-based address:, or give the manual's "
                        "reference as register: 40001 instead of kind:")
        meant = looks_like_reference(self.kind, self.address)
        if self.reference is None and meant is not None:
            digit = _KIND_DIGIT[self.kind]
            raise _fail(("address",), f"{self.address} looks like the manual's {digit}xxxx reference, not a "
                        f"0-based address — write register: {self.address} (= {self.kind} address "
                        f"{meant}), or address: {meant}; for a device that really "
                        f"uses addresses this high (SunSpec), write register: {digit}{self.address + 1:05d}",
                        self.address)
        for other in ("input", "holding"):
            other_meant = looks_like_reference(other, self.address)
            if self.reference is None and self.kind not in (other, *BIT_KINDS) and other_meant is not None:
                digit = _KIND_DIGIT[other]
                raise _fail(("address",), f"{self.address} looks like the manual's {digit}xxxx reference, which means "
                            f"{'an' if other == 'input' else 'a'} {other} register ({other} address {other_meant}), "
                            f"not {'an' if self.kind == 'input' else 'a'} {self.kind} register "
                            f"— write register: {self.address} (and no kind:) if the manual says {self.address}; for a "
                            f"device that really has {self.kind} registers this high, write register: "
                            f"{_KIND_DIGIT[self.kind]}{self.address + 1:05d}", self.address)
        kind_is_bits = self.kind in BIT_KINDS
        ptype = self.type or ("bool" if kind_is_bits or self.bit is not None else None)
        if ptype is None:
            raise _fail((), "type: is missing — add type: int16, uint16, int32, uint32, int64, uint64, "
                        "float32, float64 or string (see the manual's data format)")
        if ptype == "bool" and not kind_is_bits and self.bit is None:
            raise _fail(("type",), f"bool on a {self.kind} register needs bit: — add bit: 0..15 for the "
                        "bit that holds the flag, or use kind: coil / discrete", ptype)
        if ptype != "bool" and kind_is_bits:
            raise _fail(("type",), f"{ptype} on a {self.kind}, which holds a single bit — use type: bool (or "
                        "leave type out), or kind: holding / input for a register value", ptype)
        if self.bit is not None and (kind_is_bits or ptype != "bool"):
            raise _fail(("bit",), "only applies to a bool on a holding/input register — remove it, or use "
                        "type: bool with kind: holding / input", self.bit)
        if ptype == "string" and self.length is None:
            raise _fail(("type",), "string needs length: — add length: N (registers; 2 characters each)")
        if ptype != "string" and self.length is not None:
            raise _fail(("length",), "only for type: string — remove it", self.length)
        if ptype == "string" and self.byte_order not in ("ABCD", "BADC"):
            raise _fail(("byte_order",), f"{self.byte_order} does not apply to strings — use ABCD (first "
                        "character in the high byte) or BADC (in the low byte)", self.byte_order)
        if ptype in ("bool", "string") and (self.scale != 1.0 or self.offset != 0.0):
            raise _fail(("scale" if self.scale != 1.0 else "offset",),
                        f"scale/offset apply to numbers, not {ptype} — remove them")
        if self.scale == 0 or not math.isfinite(self.scale) or not math.isfinite(self.offset):
            raise _fail(("scale",), "scale must be a finite, non-zero number — e.g. 0.1 for tenths")
        width = self.width
        if self.address + width - 1 > 65535:
            raise _fail(("address",), f"{self.kind} address {self.address} + {width} registers runs past "
                        "65535 — check the address", self.address)
        return self

    @property
    def point_type(self) -> str:
        return self.type or "bool"

    @property
    def width(self) -> int:
        """Registers (or bits, for coils and discrete inputs) this point occupies."""
        ptype = self.point_type
        if ptype == "bool":
            return 1
        if ptype == "string":
            return self.length or 1
        return _TYPES[ptype][1]


class ProfileModel(ProfileConfig):
    """A Modbus device model's register map (``profiles/<name>.yaml``, ``protocol: modbus``)."""

    protocol: Literal["modbus"]
    max_registers: int = Field(default=MAX_REGISTERS, ge=1, le=MAX_REGISTERS,
                               description="registers per request this model accepts")
    max_gap: int = Field(default=8, ge=0, le=MAX_REGISTERS - 1,
                         description="unused registers read to merge two requests into one")
    points: list[PointModel] = Field(min_length=1)

    def field_info(self) -> dict[str, FieldInfo]:
        return {p.name: FieldInfo(p.unit, p.point_type == "float32") for p in self.points}

    @model_validator(mode="after")
    def _unique(self) -> ProfileModel:
        seen: dict[str, int] = {}
        for i, point in enumerate(self.points):
            if point.name in seen:
                raise _fail(("points", i, "name"), f"'{point.name}' is already the name of point "
                            f"{seen[point.name] + 1} — give every point its own name", point.name)
            seen[point.name] = i
            if point.kind not in BIT_KINDS and point.width > self.max_registers:
                raise _fail(("points", i, "length"), f"{point.width} registers do not fit in one request "
                            f"(max_registers: {self.max_registers}) — split the string into shorter points")
        return self


class DeviceModel(DeviceConfig):
    """A Modbus TCP device (``devices/<id>.yaml``, ``protocol: modbus_tcp``)."""

    protocol: Literal["modbus_tcp"]
    host: str = Field(min_length=1, description="IP address or name of the device or TCP gateway")
    port: int = Field(default=502, ge=1, le=65535)
    unit_id: int = Field(default=1, ge=0, le=255, description="Modbus unit (slave) id, 0..255")
    max_gap: int | None = Field(default=None, ge=0, le=MAX_REGISTERS - 1,
                                description="overrides the profile's max_gap")


# =========================================================================== points
@dataclass(frozen=True, slots=True)
class Point:
    """A profile point resolved for planning and decoding."""

    name: str
    kind: str
    address: int
    width: int  # registers, or 1 bit
    type: str
    byte_order: str = "ABCD"
    bit: int | None = None
    scale: float = 1.0
    offset: float = 0.0
    min: float | None = None
    max: float | None = None

    @property
    def end(self) -> int:
        return self.address + self.width


def points_of(profile: ProfileModel) -> list[Point]:
    return [Point(p.name, p.kind or "", p.address or 0, p.width, p.point_type, p.byte_order, p.bit,
                  p.scale, p.offset, p.valid.min if p.valid else None, p.valid.max if p.valid else None)
            for p in profile.points]


# =========================================================================== codec
_SWAPPED_ORDERS: Final = frozenset({"BADC", "CDAB"})  # read from the buffer with bytes swapped per register
_LITTLE_ORDERS: Final = frozenset({"DCBA", "CDAB"})  # then unpacked little endian


def _code(point: Point) -> str:
    if point.type == "string":
        return f"{2 * point.width}s"
    if point.type == "bool":
        return "H"  # a bit of a register
    return _TYPES[point.type][0]


def _endian(point: Point) -> str:
    if point.type in ("string", "bool") or point.width == 1:
        return ">"  # 16-bit values: BA is handled by the swapped buffer
    return "<" if point.byte_order in _LITTLE_ORDERS else ">"


def _swapped(point: Point) -> bool:
    if point.width == 1 and point.type != "string":
        return point.byte_order in ("BADC", "DCBA")  # AB or BA
    return point.byte_order in _SWAPPED_ORDERS


def _swap_words(data: bytes) -> bytes:
    words = array.array("H", data)
    words.byteswap()
    return words.tobytes()


# What to do with one unpacked raw value (tuple per point, fastest to dispatch on in a loop).
_RAW, _DIV, _MUL, _BIT, _STRING, _COIL = range(6)


@dataclass(frozen=True, slots=True)
class Request:
    """One read request: ``count`` registers (or bits) of ``kind`` from ``address``, for ``points``."""

    kind: str
    address: int
    count: int
    points: tuple[Point, ...]

    @property
    def function(self) -> int:
        return FUNCTION[self.kind]

    def __str__(self) -> str:
        return f"{self.kind} {self.address}+{self.count}"


class RequestDecoder:
    """Decodes the data bytes of one request's reply into point values, with one ``struct``
    call per byte-order group and one small loop for scale, offset and valid ranges.

    Build once per request at start-up; :meth:`decode` is the hot path.
    """

    __slots__ = ("_any_swapped", "_bits", "_groups", "_steps", "nbytes", "request")

    def __init__(self, request: Request) -> None:
        self.request = request
        bits = request.kind in BIT_KINDS
        self._bits = bits
        self.nbytes = (request.count + 7) // 8 if bits else 2 * request.count
        if bits:
            self._steps: list[tuple[Any, ...]] = [(p.name, _COIL, p.address - request.address)
                                                   for p in request.points]
            self._groups: list[tuple[bool, struct.Struct]] = []
            self._any_swapped = False
            return
        # Each distinct (buffer, endianness, offset, code) is one slot of one struct layer; points
        # reading the same value share a slot; overlapping values go to another layer.
        layers: list[tuple[bool, str, list[tuple[int, str]]]] = []
        slots: dict[tuple[bool, str, int, str], tuple[int, int]] = {}
        pending: list[tuple[Point, tuple[int, int]]] = []
        for point in request.points:
            key = (_swapped(point), _endian(point), (point.address - request.address) * 2, _code(point))
            if key not in slots:
                slots[key] = self._place(layers, key)
            pending.append((point, slots[key]))
        starts = [0]
        for _sw, _en, fields in layers:
            starts.append(starts[-1] + len(fields))
        self._groups = [(sw, struct.Struct(self._format(en, fields))) for sw, en, fields in layers]
        self._any_swapped = any(sw for sw, _ in self._groups)
        self._steps = []
        for p, (layer, idx) in pending:
            op, a, b = self._step(p)
            self._steps.append((p.name, op, starts[layer] + idx, a, b, p.min, p.max, p.type == "float32"))

    @staticmethod
    def _place(layers: list[tuple[bool, str, list[tuple[int, str]]]],
               key: tuple[bool, str, int, str]) -> tuple[int, int]:
        swapped, endian, offset, code = key
        for n, (l_swapped, l_endian, fields) in enumerate(layers):
            if l_swapped == swapped and l_endian == endian:
                last_offset, last_code = fields[-1]
                if offset >= last_offset + struct.calcsize(last_code):
                    fields.append((offset, code))
                    return n, len(fields) - 1
        layers.append((swapped, endian, [(offset, code)]))
        return len(layers) - 1, 0

    @staticmethod
    def _format(endian: str, fields: list[tuple[int, str]]) -> str:
        parts, pos = [endian], 0
        for offset, code in fields:
            if offset > pos:
                parts.append(f"{offset - pos}x")
            parts.append(code)
            pos = offset + struct.calcsize(code)
        return "".join(parts)

    @staticmethod
    def _step(point: Point) -> tuple[int, float, float]:
        if point.type == "bool":
            return _BIT, float(point.bit or 0), 0.0
        if point.type == "string":
            return _STRING, 0.0, 0.0
        if point.scale == 1.0 and point.offset == 0.0:
            return _RAW, 0.0, 0.0  # integers stay integers
        # Dividing by 10 is exact where multiplying by 0.1 is not (3 * 0.1 = 0.30000000000000004).
        inverse = 1.0 / point.scale
        if abs(inverse) > 1 and abs(inverse - round(inverse)) < 1e-9:
            return _DIV, float(round(inverse)), point.offset
        return _MUL, point.scale, point.offset

    def decode(self, data: bytes, out: dict[str, FieldValue]) -> list[str]:
        """Put every point's value in ``out``; returns the names of values that were invalid
        (NaN, or outside the point's valid range) and therefore left out."""
        if self._bits:
            word = int.from_bytes(data, "little")
            for name, _op, rel in self._steps:
                out[name] = bool((word >> rel) & 1)
            return []
        swapped = _swap_words(data) if self._any_swapped else data
        if len(self._groups) == 1:
            sw, st = self._groups[0]
            raw = st.unpack_from(swapped if sw else data)
        else:
            raw = ()
            for sw, st in self._groups:
                raw += st.unpack_from(swapped if sw else data)
        invalid: list[str] = []
        for name, op, idx, a, b, lo, hi, short in self._steps:
            value: Any = raw[idx]
            if short:
                value = shortest_float32(value)
            if op == _RAW:
                pass
            elif op == _DIV:
                value = value / a + b
            elif op == _MUL:
                value = value * a + b
            elif op == _BIT:
                out[name] = bool((value >> int(a)) & 1)
                continue
            else:  # _STRING: up to the first NUL, trailing spaces stripped
                out[name] = value.split(b"\x00", 1)[0].rstrip(b" ").decode("latin-1")
                continue
            if value - value != 0:  # NaN or ±inf (x - x is NaN for both; 0 for every number)
                invalid.append(name)
                continue
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                invalid.append(name)
                continue
            out[name] = value
        return invalid


def _pack(point: Point, raw: Any) -> bytes:
    """Wire bytes of one raw value (the inverse of the decoder's byte-order handling)."""
    code = _code(point)
    data = struct.pack(">" + code, raw)
    if _endian(point) == "<":
        data = data[::-1]  # little endian words and bytes
        if _swapped(point):
            data = _swap_words(data)
    elif _swapped(point):
        data = _swap_words(data)
    return data


def encode(point: Point, value: FieldValue) -> list[int] | list[bool]:
    """A value -> the registers (or one bit) that hold it on the wire, for simulators.

    Applies the inverse of scale and offset; integers are rounded. Raises ValueError if the value
    does not fit the type. A ``bit`` point returns the register with only that bit set (use
    :func:`encode_into` to keep the register's other bits).
    """
    if point.kind in BIT_KINDS:
        return [bool(value)]
    if point.type == "bool":
        return [(1 << (point.bit or 0)) if value else 0]
    if point.type == "string":
        text = str(value).encode("latin-1", "replace")[: 2 * point.width]
        raw: Any = text.ljust(2 * point.width, b"\x00")
    elif isinstance(value, int) and point.type in _INT_TYPES and point.scale == 1 and point.offset == 0:
        raw = int(value)  # exact: 64-bit integers do not survive a float
    else:
        number = (float(value) - point.offset) / point.scale
        if point.type in _INT_TYPES:
            if not math.isfinite(number):
                raise ValueError(f"{point.name}: {value!r} is not a number a {point.type} can hold")
            raw = round(number)
        else:
            raw = number
    try:
        data = _pack(point, raw)
    except struct.error as exc:
        raise ValueError(f"{point.name}: {value!r} does not fit in {point.type} ({exc})") from None
    return list(struct.unpack(f">{len(data) // 2}H", data))


def encode_into(table: MutableMapping[int, Any], point: Point, value: FieldValue) -> None:
    """Write a value into a register (or bit) table keyed by address, keeping the other bits
    of a register that a ``bit`` point shares."""
    if point.kind not in BIT_KINDS and point.type == "bool":
        word = table.get(point.address, 0)
        mask = 1 << (point.bit or 0)
        if point.byte_order in ("BADC", "DCBA"):
            mask = ((mask & 0xFF) << 8) | (mask >> 8)
        table[point.address] = (word | mask) if value else (word & ~mask & 0xFFFF)
        return
    for i, word in enumerate(encode(point, value)):
        table[point.address + i] = word


# =========================================================================== planner
def plan(points: Sequence[Point], max_gap: int = 8, max_registers: int = MAX_REGISTERS) -> list[Request]:
    """Group points into the fewest read requests.

    Points are grouped per kind (one unit id per device, so per unit id too), sorted by address
    and merged while the unused registers between two neighbours are at most ``max_gap`` and
    the request stays within ``max_registers`` (at most 125). For coils and discrete inputs the
    gap is ``max_gap * 16`` bits — sixteen bits travel in the space of one register — and the
    limit is 2000 bits. A point is never split across requests; overlapping points share one.
    Requests come out by kind (coil, discrete, holding, input), then address.
    """
    requests: list[Request] = []
    for kind in ("coil", "discrete", "holding", "input"):
        group = sorted((p for p in points if p.kind == kind), key=lambda p: (p.address, p.end))
        if not group:
            continue
        bits = kind in BIT_KINDS
        limit = MAX_BITS if bits else min(max_registers, MAX_REGISTERS)
        gap = max_gap * 16 if bits else max_gap
        start, end, members = group[0].address, group[0].end, [group[0]]
        for point in group[1:]:
            if point.address - end <= gap and max(end, point.end) - start <= limit:
                end = max(end, point.end)
                members.append(point)
                continue
            requests.append(Request(kind, start, end - start, tuple(members)))
            start, end, members = point.address, point.end, [point]
        requests.append(Request(kind, start, end - start, tuple(members)))
    return requests


def plan_summary(device_id: str, requests: Sequence[Request]) -> str:
    """`workshop-meter: 3 requests (input 0+76, holding 256+4, coil 0+8) for 42 points`."""
    npoints = sum(len(r.points) for r in requests)
    noun = "request" if len(requests) == 1 else "requests"
    return f"{device_id}: {len(requests)} {noun} ({', '.join(map(str, requests))}) for {npoints} points"


# =========================================================================== client
class ModbusError(Exception):
    """A failed read; ``kind`` names the class of failure for counting and logging."""

    kind = "error"


class ModbusTimeout(ModbusError):
    kind = "timeout"


class ModbusProtocolError(ModbusError):
    """The reply was not a valid answer to the request (wrong function, length, framing)."""

    kind = "bad_response"


class ModbusFrameError(ModbusError):
    """A serial (RTU) reply that arrived damaged: ``kind`` is ``crc`` (checksum wrong),
    ``truncated`` (the frame stopped short) or ``garbage`` (bytes that are no frame). The link
    stays usable, so the request is worth another attempt. ``data``: the bytes that came."""

    def __init__(self, kind: str, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.kind = kind
        self.data = data


class ModbusConnectionError(ModbusError):
    """Connecting failed or the connection was lost: ``kind`` is ``refused``, ``unreachable``
    or ``disconnected``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


ILLEGAL_ADDRESS: Final = 2
"""The exception a device answers for a read that touches a register it does not have."""

EXCEPTION_CODES: Final[dict[int, tuple[str, str]]] = {
    1: ("illegal function", "the device does not serve this register type — check kind: in the profile"),
    2: ("illegal data address", "the device has no register at some address of this request — check the "
        "profile's addresses against the manual"),
    3: ("illegal data value", "the device refuses this many registers at once — lower max_registers in "
        "the profile"),
    4: ("device failure", "the device reports an internal fault — check it on site"),
    5: ("acknowledge", "the device is busy with a long operation — it should answer later"),
    6: ("device busy", "the device is busy — poll less often if this persists"),
    10: ("gateway path unavailable", "the TCP gateway has no route to this unit id — check the "
         "converter's configuration and the unit id"),
    11: ("gateway target failed to respond", "the device behind the TCP gateway does not answer — check "
         "its unit id, RS485 wiring (A/B, termination), baud rate and power"),
}


class ModbusExceptionResponse(ModbusError):
    """The device answered with a Modbus exception ``code``."""

    kind = "exception"

    def __init__(self, code: int) -> None:
        self.code = code
        name, self.hint = EXCEPTION_CODES.get(code, (f"exception {code}", "see the device's manual"))
        super().__init__(f"exception {code} ({name})")


_DOWN_HINT: Final = {
    "timeout": "check the unit id, that the device is powered, and its RS485 wiring (A/B, termination) "
               "and baud rate if it sits behind a TCP converter",
    "refused": "nothing accepts Modbus connections there — check the port and that the device's "
               "Modbus TCP server is enabled",
    "unreachable": "check the IP address, the network cable and that the device is powered",
    "disconnected": "many devices allow only one or two clients: check that no other master (SCADA, "
                    "a second gateway) holds it, and that the device accepts this unit id and request",
    "bad_response": "the answer was not valid Modbus TCP — check that host:port is a Modbus TCP "
                    "server (not RTU over TCP) and the unit id",
}


_MBAP = struct.Struct(">HHH")
_REQUEST = struct.Struct(">HHHBBHH")
_MAX_PDU = 253


class _Connection(asyncio.Protocol):
    """One TCP connection: reassembles MBAP frames and hands the awaited one to its waiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiting_tid = -1
        self.waiter: asyncio.Future[bytes] | None = None
        self.stale = 0  # replies to requests that had already timed out
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while len(buf) >= 8:
            tid, proto, length = _MBAP.unpack_from(buf)
            if proto != 0 or not 2 <= length <= _MAX_PDU + 1:
                self._lost_framing(f"invalid MBAP header {bytes(buf[:8]).hex()}")
                return
            end = 6 + length
            if len(buf) < end:
                return
            if tid == self.waiting_tid and self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(bytes(buf[6:end]))  # unit id + PDU
            else:
                self.stale += 1
            del buf[:end]

    def _lost_framing(self, why: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ModbusProtocolError(f"{why}; reconnecting"))
        self.buffer.clear()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            reason = f": {exc}" if exc else ""
            self.waiter.set_exception(ModbusConnectionError("disconnected", f"connection closed by the device{reason}"))
        if not self.closed.done():
            self.closed.set_result(None)


def _expire(future: asyncio.Future[bytes], timeout: float) -> None:
    if not future.done():
        future.set_exception(ModbusTimeout(f"no answer within {format_duration(timeout)}"))


async def open_tcp(factory: Callable[[], _P], host: str, port: int, timeout: float, name: str = "") -> _P:
    """A TCP connection whose failures are the :class:`ModbusConnectionError` kinds the poller
    tells apart: ``refused`` (nothing listens) and ``unreachable`` (no answer, no route)."""
    where = name or f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            _transport, protocol = await asyncio.get_running_loop().create_connection(factory, host, port)
    except ConnectionRefusedError:
        raise ModbusConnectionError("refused", f"connection to {where} refused") from None
    except TimeoutError:
        raise ModbusConnectionError("unreachable", f"no answer connecting to {where} within "
                                    f"{format_duration(timeout)}") from None
    except OSError as exc:
        raise ModbusConnectionError("unreachable", f"cannot connect to {where}: {exc.strerror or exc}") from None
    return protocol


class ModbusTcpClient:
    """A Modbus TCP client for one host:port that can only read.

    One transaction at a time (callers serialise; the poller does). Each request has its own
    timeout; a reply that arrives after its request timed out carries an older transaction id
    and is discarded, never mistaken for the answer to the next request. Not an async context
    manager by itself: the poller that owns it opens and closes it.
    """

    hints: Mapping[str, str] = _DOWN_HINT

    def __init__(self, host: str, port: int = 502) -> None:
        self.host = host
        self.port = port
        self._conn: _Connection | None = None
        self._tid = 0

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and conn.transport is not None and not conn.transport.is_closing()

    @property
    def lost(self) -> bool:
        """The connection closed (by the device, or after a framing error) since it was opened;
        cleared by :meth:`connect` and :meth:`close`."""
        return self._conn is not None and not self.connected

    @property
    def stale_replies(self) -> int:
        return self._conn.stale if self._conn is not None else 0

    async def connect(self, timeout: float) -> None:
        """Open the connection; raises :class:`ModbusConnectionError` (``refused``/``unreachable``)."""
        await self.close()
        self._conn = await open_tcp(_Connection, self.host, self.port, timeout)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.transport is None:
            return
        conn.transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await conn.closed

    async def read(self, unit: int, function: int, address: int, count: int, timeout: float) -> bytes:
        """Read ``count`` registers or bits; returns the reply's data bytes (registers big endian
        as sent; bits packed least significant first).

        Raises :class:`ModbusTimeout`, :class:`ModbusExceptionResponse`,
        :class:`ModbusProtocolError` or :class:`ModbusConnectionError`.
        """
        if function not in READ_FUNCTIONS:
            raise ValueError(f"function code {function} is not a read: this client only reads (1, 2, 3, 4)")
        conn = self._conn
        if conn is None or conn.transport is None:
            raise ModbusConnectionError("disconnected", "not connected")
        if conn.transport.is_closing():
            raise ModbusConnectionError("disconnected", "connection closed by the device")
        self._tid = tid = self._tid % 0xFFFF + 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        conn.waiting_tid, conn.waiter = tid, future
        conn.transport.write(_REQUEST.pack(tid, 0, 6, unit, function, address, count))
        handle = loop.call_later(timeout, _expire, future, timeout)
        try:
            frame = await future
        finally:
            handle.cancel()
            conn.waiter, conn.waiting_tid = None, -1
        # frame: unit id, function, then byte count + data or an exception code. The unit id of
        # the answer is not checked: the transaction id already pairs it with the request.
        fc = frame[1]
        if fc == function:
            expected = (count + 7) // 8 if function <= 2 else 2 * count
            if len(frame) != 3 + expected or frame[2] != expected:
                raise ModbusProtocolError(f"reply carries {len(frame) - 3} data bytes, expected {expected}")
            return frame[3:]
        if fc == function | 0x80 and len(frame) >= 3:
            raise ModbusExceptionResponse(frame[2])
        raise ModbusProtocolError(f"reply has function code {fc}, expected {function}")


# =========================================================================== poller


class ModbusClient(Protocol):
    """What :class:`ModbusPoller` needs from a transport (Modbus TCP, RTU on a serial port,
    RTU over TCP): one transaction at a time, a timeout per request, read function codes only.

    ``hints`` maps an error kind to what a technician should check; ``connected`` is False
    before :meth:`connect` and after the link was lost; ``lost`` is True when it was open and
    went away by itself (cleared by ``connect``/``close``).
    """

    hints: Mapping[str, str]

    @property
    def connected(self) -> bool: ...
    @property
    def lost(self) -> bool: ...
    async def connect(self, timeout: float) -> None: ...
    async def close(self) -> None: ...
    async def read(self, unit: int, function: int, address: int, count: int, timeout: float) -> bytes: ...


@dataclass(slots=True)
class _Unit:
    """One device on a poller's connection, with what start-up prepared for it."""

    device: Device
    unit_id: int
    timeout: float
    retries: int
    requests: list[Request]
    decoders: list[RequestDecoder]
    health: Health
    where: str


class ModbusPoller:
    """Polls every device (unit id) on one connection — a host:port, a serial bus, an RTU-over-TCP
    link — one transaction at a time (see :class:`gateway.driver.Poller` for the lifecycle).
    The transport is the ``client`` (:class:`ModbusClient`); the loop is the same for all.

    Each device keeps its own interval (aligned to the wall clock), timeout and retries. A
    device that does not answer is marked down and probed with capped exponential backoff, one
    attempt of one request per probe, so it costs the other devices at most its timeout per
    probe. A refused or lost connection is reopened with capped backoff; that concerns only
    this poller's devices. Timeouts and damaged frames (:class:`ModbusFrameError`) are retried
    up to the device's ``retries``.
    """

    def __init__(self, name: str, client: ModbusClient, devices: Sequence[Device]) -> None:
        if not devices:
            raise ValueError("a poller needs at least one device")
        self.name = name
        self.status: dict[str, DeviceStatus] = {}
        self._client = client
        self._units: list[_Unit] = []
        for dev in sorted(devices, key=lambda d: (d.config.unit_id, d.id)):
            cfg = dev.config
            requests = plan(points_of(dev.profile),
                            cfg.max_gap if cfg.max_gap is not None else dev.profile.max_gap,
                            dev.profile.max_registers)
            status = self.status[dev.id] = DeviceStatus()
            where = f"{self.name} unit {cfg.unit_id}"
            self._units.append(_Unit(dev, cfg.unit_id, cfg.timeout, cfg.retries, requests,
                                     [RequestDecoder(r) for r in requests],
                                     Health(dev.id, status, log), where))
        cfgs = [u.device.config for u in self._units]
        self._connect_timeout = max(c.timeout for c in cfgs)
        self._reconnect = Backoff(min(min(c.interval for c in cfgs), 1.0), min(c.backoff_max for c in cfgs))
        self._link = Health(f"connection {self.name}", None, log, words=("connected", "reconnected"))

    @property
    def plans(self) -> dict[str, list[Request]]:
        return {u.device.id: u.requests for u in self._units}

    @property
    def client(self) -> ModbusClient:
        return self._client

    async def __aenter__(self) -> ModbusPoller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    # ------------------------------------------------------------------ connection
    async def _ensure_connected(self) -> bool:
        """Connect if needed. Connection failures are this poller's one shared state: logged once
        for the connection and counted for every device on it (their own lines stay quiet)."""
        if self._client.connected:
            return True
        if self._client.lost:
            # Many devices close a client that has been idle for a while: not a fault.
            log.debug("%s: connection closed by the device while idle; reconnecting", self.name)
        try:
            await self._client.connect(self._connect_timeout)
        except ModbusConnectionError as exc:
            hint = self._client.hints.get(exc.kind, "")
            self._link.down(exc.kind, f"{exc} (devices {self._device_list()}) — {hint}")
            for unit in self._units:
                unit.health.count(exc.kind, str(exc))
                unit.health.down(exc.kind, "", quiet=True)
            return False
        self._link.ok(detail=f"devices {self._device_list()}")
        self._reconnect.reset()
        return True

    def _device_list(self) -> str:
        return ", ".join(u.device.id for u in self._units)

    # ------------------------------------------------------------------ polling
    async def run(self, emit: Emit) -> None:
        schedule: Schedule[int] = Schedule()
        for n, unit in enumerate(self._units):
            cfg = unit.device.config
            schedule.add(n, cfg.interval, cfg.backoff_max)
        while True:
            n, when = schedule.first()
            delay = when - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not await self._ensure_connected():
                await asyncio.sleep(self._reconnect.next())
                continue  # due devices are polled as soon as the connection is back
            unit = self._units[n]
            reading = await self._poll(unit, probing=unit.health.is_down)
            if reading is None:
                schedule.failed(n)
            else:
                schedule.succeeded(n)
                emit(reading)

    async def poll_once(self) -> list[Reading]:
        readings: list[Reading] = []
        for unit in self._units:
            if not await self._ensure_connected():
                break
            reading = await self._poll(unit, probing=False)
            if reading is not None:
                readings.append(reading)
        return readings

    async def _poll(self, unit: _Unit, *, probing: bool) -> Reading | None:
        """Read every request of one device; None if it answered none of them.

        While the device is down only its first request is tried, once (a probe). A request that
        times out after its retries ends the poll of a device that has not answered anything yet.
        A connection lost during a request is this device's failure (kind ``disconnected``):
        the connection is closed and reopened before the next poll.
        """
        unit.health.status.polls += 1
        attempts = 1 if probing else 1 + unit.retries
        read = self._client.read
        fields: dict[str, FieldValue] = {}
        time_ns: int | None = None
        problem: tuple[str, str] | None = None
        invalid: list[str] = []
        pending = list(zip(unit.requests, unit.decoders))
        while pending:
            request, decoder = pending.pop(0)
            error: ModbusError | None = None
            for _attempt in range(attempts):
                try:
                    data = await read(unit.unit_id, request.function, request.address, request.count, unit.timeout)
                except (ModbusTimeout, ModbusFrameError) as exc:
                    error = exc
                    continue
                except ModbusExceptionResponse as exc:
                    error = exc
                    if exc.code in (5, 6):
                        continue  # busy: worth another attempt
                    if exc.code == ILLEGAL_ADDRESS and (parts := self._split(unit, request)):
                        pending[:0] = parts  # read its parts now; the next polls read them as planned
                        error = None
                    break
                except (ModbusConnectionError, ModbusProtocolError) as exc:
                    error = exc
                    break
                error = None
                if time_ns is None:
                    time_ns = time.time_ns()
                invalid += decoder.decode(data, fields)
                break
            if error is None:
                continue
            message = self._describe(unit, request, error)
            unit.health.count(error.kind, message)
            if problem is None:
                problem = (error.kind, message)
            if not self._client.connected:
                await self._client.close()
                break
            if time_ns is None and (probing or isinstance(error, ModbusTimeout)):
                break  # not answering: do not spend another timeout on each remaining request
        if time_ns is None:
            assert problem is not None
            unit.health.down(problem[0], problem[1])
            return None
        if problem is not None:
            unit.health.degraded(problem[0], problem[1], time_ns)
        elif invalid:
            unit.health.count("invalid", f"invalid values: {', '.join(invalid)}")
            unit.health.degraded("invalid", f"{unit.where}: {', '.join(invalid)} not a number or outside the "
                                 "valid range; left out of the reading — check the sensor, and the profile's "
                                 "scale, byte_order and valid:", time_ns)
        else:
            unit.health.ok(time_ns, unit.where)
        dev = unit.device
        return Reading(dev.id, time_ns, fields, dict(dev.tags),
                       UNCERTAIN if problem is not None or invalid else GOOD, dev.measurement)

    def _split(self, unit: _Unit, request: Request) -> list[tuple[Request, RequestDecoder]]:
        """A request the planner merged across unused registers that the device refused with
        exception 2 (it has no registers there): its parts, which replace it in the device's plan
        from now on (logged once, here). Empty when the request was not merged."""
        parts = plan(request.points, 0, unit.device.profile.max_registers)
        if len(parts) < 2:
            return []
        at = unit.requests.index(request)
        decoders = [RequestDecoder(p) for p in parts]
        unit.requests[at:at + 1] = parts
        unit.decoders[at:at + 1] = decoders
        gap = min(b.address - (a.address + a.count) for a, b in itertools.pairwise(parts))
        log.warning("%s: %s refused %s with exception 2 (illegal data address): it has no registers in the gaps "
                    "between its points; reading %s separately from now on — set max_gap: %d in the profile (or "
                    "the device) to plan it so from the start", unit.device.id, unit.where, request,
                    ", ".join(map(str, parts)), gap - 1)
        return list(zip(parts, decoders))

    def _describe(self, unit: _Unit, request: Request, error: ModbusError) -> str:
        what = f"{unit.where}, {request} (address {request.address})"
        hints = self._client.hints
        if isinstance(error, ModbusExceptionResponse):
            return f"{what}: the device answered {error} — {error.hint}"
        if isinstance(error, (ModbusTimeout, ModbusFrameError)):
            tries = "" if unit.retries == 0 else f" ({1 + unit.retries} attempts)"
            return f"{what}: {error}{tries} — {hints.get(error.kind, '')}"
        return f"{what}: {error} — {hints.get(error.kind, '')}"


class ModbusTcpPoller(ModbusPoller):
    """A :class:`ModbusPoller` over Modbus TCP: every unit id behind one host:port."""

    def __init__(self, host: str, port: int, devices: Sequence[Device]) -> None:
        self.host, self.port = host, port
        super().__init__(f"{host}:{port}", ModbusTcpClient(host, port), devices)


# =========================================================================== driver entry points
def make_pollers(devices: Sequence[Device]) -> list[ModbusTcpPoller]:
    """One poller per host:port, shared by every unit id behind it. Logs each device's plan."""
    by_connection: dict[tuple[str, int], list[Device]] = {}
    for dev in devices:
        by_connection.setdefault((dev.config.host, dev.config.port), []).append(dev)
    pollers = [ModbusTcpPoller(host, port, group) for (host, port), group in by_connection.items()]
    for poller in pollers:
        for device_id, requests in poller.plans.items():
            log.info("%s", plan_summary(device_id, requests))
    return pollers


def claims(device: Device) -> list[Claim]:
    """The host:port the device is reached at (shared by every unit id behind it)."""
    return [tcp_claim(device.config.host, device.config.port)]


def check(devices: Sequence[Device]) -> list[Problem]:
    """Cross-device checks: the same unit polled twice with the same profile (a copied file)."""
    problems: list[Problem] = []
    seen: dict[tuple[str, int, int, str], Device] = {}
    problems += filter(None, map(slow_timeout, devices))
    for dev in devices:
        cfg = dev.config
        key = (cfg.host.lower(), cfg.port, cfg.unit_id, dev.profile_name)
        other = seen.get(key)
        if other is not None:
            problems.append(Problem(
                dev, ("unit_id",),
                f"{cfg.host}:{cfg.port} unit {cfg.unit_id} is already polled as '{other.id}' "
                f"({other.source}) with the same profile",
                "a copied file? give this device its own unit_id (or host), or remove one of them"))
        else:
            seen[key] = dev
    return problems

