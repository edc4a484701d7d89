"""Modbus register-map profiles (``protocol: modbus``): the models a technician writes and the
points they resolve to (kind, 0-based address, width). Shared by every Modbus transport."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import Field, model_validator

from drivers.signals import SignalSpec
from gateway.driver import (
    Device,
    DeviceConfig,
    FieldInfo,
    ProfileConfig,
    StrictModel,
    ValidRange,
    fail_at,
)

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
REGISTER_TYPES: Final[dict[str, tuple[str, int]]] = {
    "int16": ("h", 1), "uint16": ("H", 1), "int32": ("i", 2), "uint32": ("I", 2),
    "int64": ("q", 4), "uint64": ("Q", 4), "float32": ("f", 2), "float64": ("d", 4),
}
INT_TYPES: Final = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})
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
    type: PointType | None = Field(default=None, description="the manual's data format; bool for coils and "
                                   "discrete inputs (the default there)")
    byte_order: ByteOrder = Field(default="ABCD", description="order of the bytes on the wire, A the most "
                                  "significant: ABCD big endian, CDAB words swapped, BADC bytes swapped, DCBA "
                                  "little endian")
    length: int | None = Field(default=None, ge=1, le=MAX_REGISTERS, description="registers, strings only")
    bit: int | None = Field(default=None, ge=0, le=15, description="bool from one bit of a register")
    scale: float = Field(default=1.0, description="value = raw × scale + offset, e.g. 0.1 for tenths",
                         examples=[0.1, 0.01])
    offset: float = Field(default=0.0, description="added after scale")
    unit: str | None = Field(default=None, description="unit of the scaled value, as the manual prints it",
                             examples=["V", "A", "kWh", "°C", "%RH", "ppm"])
    valid: ValidRange | None = Field(default=None, description="plausible values; outside them the value is left "
                                     "out and the reading marked uncertain")
    sim: SignalSpec | None = Field(default=None, description="how `sluice sim` plays this point (ignored by the gateway)")
    verified: bool | None = Field(default=None, description="false: the published sources did not settle this "
                                  "point (address, scale, sign or meaning); the comment above it says what to check")

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
        return REGISTER_TYPES[ptype][1]


class ProfileModel(ProfileConfig):
    """A Modbus device model's register map (``profiles/<name>.yaml``, ``protocol: modbus``)."""

    protocol: Literal["modbus"] = Field(description="modbus: a register map, for every Modbus transport")
    max_registers: int = Field(default=MAX_REGISTERS, ge=1, le=MAX_REGISTERS,
                               description="registers per request this model accepts")
    max_gap: int = Field(default=8, ge=0, le=MAX_REGISTERS - 1,
                         description="unused registers read to merge two requests into one")
    points: list[PointModel] = Field(min_length=1, description="the values to read, one per register (or pair, or bit)")

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


class UnitConfig(DeviceConfig):
    """What every Modbus device has, whatever its transport: its unit id on the connection and
    the planner's ``max_gap`` override. Each transport's ``DeviceModel`` derives from it."""

    unit_id: int = Field(default=1, ge=0, le=255, description="Modbus unit (slave) id, 0..255")
    max_gap: int | None = Field(default=None, ge=0, le=MAX_REGISTERS - 1,
                                description="overrides the profile's max_gap")


ModbusDevice = Device[UnitConfig, ProfileModel]
"""A Modbus device on any transport, as the poller sees it."""


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

