"""Serial sensor profiles (``protocol: serial``, one ``format:`` each) and the device model:
what a technician writes. Keys that do not apply to a profile's format are errors at that key."""

from __future__ import annotations

import codecs
import logging
import math
import re
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from drivers.signals import SignalSpec
from gateway.driver import (
    Device,
    DeviceConfig,
    FieldInfo,
    ProfileConfig,
    StrictModel,
    ValidRange,
    fail_at,
    parity_letter,
)
from gateway.units import Duration

log = logging.getLogger(__name__)

Format = Literal["lines", "nmea", "scale", "binary", "codes"]
TextType = Literal["float", "int", "string", "bool"]
BinType = Literal["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
ByteOrder = Literal["ABCD", "DCBA", "BADC", "CDAB"]
ChecksumType = Literal["sum8", "sum16", "xor", "crc16_modbus", "crc16_ccitt", "crc16_xmodem"]

BIN_TYPES: Final[dict[str, tuple[str, int]]] = {
    "int8": ("b", 1), "uint8": ("B", 1), "int16": ("h", 2), "uint16": ("H", 2), "int32": ("i", 4),
    "uint32": ("I", 4), "int64": ("q", 8), "uint64": ("Q", 8), "float32": ("f", 4), "float64": ("d", 8),
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
RESERVED_NAMES: Final = frozenset({"quality", "time"})

# =========================================================================== configuration
_fail = fail_at


def parse_hex(text: str) -> bytes:
    """``"AA 55"``, ``"aa55"``, ``"0xAA 0x55"`` -> bytes. Raises ValueError for people."""
    cleaned = re.sub(r"0x", "", text, flags=re.IGNORECASE).replace(" ", "").replace(",", "").replace(":", "")
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise ValueError(f"{text!r} is not hex bytes — write them as the manual prints them, e.g. \"AA 55\"") from None


class FieldSpec(StrictModel):
    """One field of a ``lines`` or ``binary`` profile (keyed by its name under ``fields:``)."""

    type: TextType | BinType | None = Field(default=None, description="lines: float|int|string|bool; "
                                            "binary: int8..uint64, float32, float64")
    byte: int | None = Field(default=None, ge=0, le=65535, description="binary: position in the frame, 0 = first header byte")
    byte_order: ByteOrder = Field(default="ABCD", description="binary: order of the bytes, A the most significant")
    bit: int | None = Field(default=None, ge=0, le=63, description="binary: a bool from one bit of an integer")
    scale: float = Field(default=1.0, description="value = raw × scale + offset, e.g. 0.1 for tenths")
    offset: float = Field(default=0.0, description="added after scale")
    unit: str | None = Field(default=None, description="unit of the value, as the manual prints it",
                             examples=["°C", "%RH", "ppm", "kg"])
    valid: ValidRange | None = Field(default=None, description="plausible values; outside them the value is left "
                                     "out and the reading marked uncertain")
    sim: SignalSpec | None = Field(default=None, description="how `sluice sim serial` plays this field")
    verified: bool | None = Field(default=None, description="false: the published sources did not settle this "
                                  "field; the comment above it says what to check")

    @model_validator(mode="after")
    def _numbers(self) -> FieldSpec:
        if self.scale == 0 or not math.isfinite(self.scale) or not math.isfinite(self.offset):
            raise _fail(("scale",), "scale must be a finite, non-zero number — e.g. 0.1 for tenths")
        return self


class LengthSpec(StrictModel):
    """Where a binary frame says how long it is."""

    byte: int = Field(ge=0, le=1024, description="position of the length field, 0 = first header byte")
    type: Literal["uint8", "uint16"] = Field(default="uint8", description="width of the length field")
    byte_order: Literal["ABCD", "DCBA"] = Field(default="ABCD", description="of a uint16 length: ABCD high byte first")
    counts: Literal["rest", "frame", "payload"] = Field(
        default="rest", description="rest: bytes after the length field incl. checksum; frame: the whole "
        "frame; payload: bytes after the length field, without the checksum")


class ChecksumSpec(StrictModel):
    """A checksum at the end of a binary frame over bytes ``start`` .. the byte before it."""

    type: ChecksumType = Field(description="the algorithm, as the manual names it")
    start: int = Field(default=0, ge=0, le=1024, description="first byte covered, 0 = first header byte")
    byte_order: Literal["ABCD", "DCBA"] | None = Field(
        default=None, description="of 16-bit checksums; default DCBA (low byte first) for crc16_modbus, else ABCD")


class SimSettings(StrictModel):
    """How ``sluice sim serial`` plays this profile (ignored by the gateway)."""

    every: Duration = Field(default=1.0, gt=0, description="a streaming sensor's output period")
    template: str | None = Field(default=None, description="lines/scale: the line to send, with {field} placeholders")
    signals: dict[str, SignalSpec] = Field(default_factory=dict,
                                           description="nmea/scale/codes: signal per output field")


# Which keys each format takes; any other format-specific key is an error at that key.
_FORMAT_KEYS: Final[dict[str, frozenset[str]]] = {
    "lines": frozenset({"pattern", "fields", "request", "delimiter", "encoding"}),
    "nmea": frozenset({"sentences", "speed_unit", "require_checksum"}),
    "scale": frozenset({"pattern", "stable", "overload", "net", "only_stable", "delimiter", "encoding", "request"}),
    "binary": frozenset({"header", "length", "frame_length", "checksum", "fields", "request"}),
    "codes": frozenset({"pattern", "strip_prefix", "strip_suffix", "delimiter", "encoding"}),
}
_ALL_FORMAT_KEYS: Final = frozenset().union(*_FORMAT_KEYS.values())


class ProfileModel(ProfileConfig):
    """A serial sensor model (``profiles/<name>.yaml``, ``protocol: serial``)."""

    # Delimiters, requests and patterns are byte-exact: "\r", "\n" and spaces must survive.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    protocol: Literal["serial"] = Field(description="serial: a sensor that is not Modbus, on a serial port")
    format: Format = Field(description="lines: text lines; nmea: GPS; scale: weighing scales; binary: framed bytes; "
                           "codes: barcode/RFID readers")
    # text formats
    delimiter: str = Field(default="\n", min_length=1, description="end of a line; a \\r before \\n is dropped")
    encoding: str = Field(default="ascii", description="text encoding: ascii, latin-1 or utf-8")
    pattern: str | None = Field(default=None, description="regular expression with named groups")
    request: str | None = Field(default=None, description="sent every interval (text, or hex for binary); "
                                "without it the sensor streams")
    fields: dict[str, FieldSpec] = Field(default_factory=dict, description="lines/binary: the values, by field name")
    # nmea
    sentences: list[Literal["GGA", "RMC"]] = Field(default=["GGA", "RMC"], min_length=1,
                                                   description="nmea: the sentences to read")
    speed_unit: Literal["kmh", "knots", "both"] = Field(default="kmh", description="nmea: unit of the speed field")
    require_checksum: bool = Field(default=True, description="nmea: drop sentences without a valid checksum")
    # scale
    stable: list[str] = Field(default=["ST"], description="status values meaning a stable weight")
    overload: list[str] = Field(default=["OL"], description="status values meaning over/under load")
    net: list[str] = Field(default=["NT"], description="mode values meaning a net (tared) weight")
    only_stable: bool = Field(default=False, description="report stable weights only")
    # binary
    header: str | None = Field(default=None, description="the bytes every frame starts with, in hex")
    length: LengthSpec | None = Field(default=None, description="binary: where a frame says how long it is")
    frame_length: int | None = Field(default=None, ge=1, le=65536, description="bytes per frame, for fixed-size frames")
    checksum: ChecksumSpec | None = Field(default=None, description="binary: the checksum at the end of a frame")
    # codes
    strip_prefix: str = Field(default="", description="codes: text removed from the start of every code")
    strip_suffix: str = Field(default="", description="codes: text removed from the end of every code")
    # all
    max_frame: int = Field(default=512, ge=8, le=65536, description="longest frame accepted, in bytes")
    frame_gap: Duration = Field(default=0.5, gt=0, le=60,
                                description="a partial frame older than this when new bytes arrive was truncated")
    sim: SimSettings = Field(default=SimSettings(), description="how `sluice sim serial` plays this profile")

    def field_info(self) -> dict[str, FieldInfo]:
        return {name: FieldInfo(spec.unit, spec.type == "float32")
                for name, spec in self.fields.items()}

    @model_validator(mode="before")
    @classmethod
    def _applies(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("format") not in _FORMAT_KEYS:
            return data
        fmt = data["format"]
        for key in data:
            if key in _ALL_FORMAT_KEYS and key not in _FORMAT_KEYS[fmt]:
                users = ", ".join(f for f, keys in _FORMAT_KEYS.items() if key in keys)
                raise _fail((key,), f"'{key}' does not apply to format: {fmt} (it is for {users}) — remove it",
                            data[key])
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ProfileModel:
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise _fail(("encoding",), f"unknown encoding {self.encoding!r} — use ascii, latin-1 or utf-8",
                        self.encoding) from None
        for name in self.fields:
            if not _NAME.match(name) or name in RESERVED_NAMES:
                raise _fail(("fields", name), f"{name!r} is not a usable field name — use letters, digits and '_', "
                            "starting with a letter, and not 'time' or 'quality'", name)
        if self.format in ("lines", "scale", "codes"):
            self._check_pattern()
        if self.format == "lines":
            for name, spec in self.fields.items():
                if spec.type is not None and spec.type not in ("float", "int", "string", "bool"):
                    raise _fail(("fields", name, "type"), f"{spec.type} is a binary type — use float, int, string or bool")
                for key in ("byte", "bit"):
                    if getattr(spec, key) is not None:
                        raise _fail(("fields", name, key), f"'{key}' is for binary frames — remove it")
        if self.format == "binary":
            self._check_binary()
        return self

    def _check_pattern(self) -> None:
        if self.pattern is None:
            if self.format == "lines":
                raise _fail((), "pattern: is missing — add a regular expression with a named group per field, "
                            r"e.g. pattern: '^T=(?P<temperature>-?\d+\.\d+)$'")
            return
        try:
            rx = re.compile(self.pattern)
        except re.error as exc:
            raise _fail(("pattern",), f"not a valid regular expression: {exc.msg} at position {exc.pos} — "
                        "check brackets and escapes; in YAML write the pattern in single quotes", self.pattern) from None
        groups = set(rx.groupindex)
        if self.format == "lines":
            if not groups:
                raise _fail(("pattern",), "has no named group — name each value: (?P<temperature>...)", self.pattern)
            for name in self.fields:
                if name not in groups:
                    raise _fail(("fields", name), f"'{name}' is not a named group of pattern: (groups: "
                                f"{', '.join(sorted(groups))}) — rename the field or add (?P<{name}>...) to the pattern")
            for name in groups:
                if not _NAME.match(name) or name in RESERVED_NAMES:
                    raise _fail(("pattern",), f"group name {name!r} cannot be a field — rename the group", self.pattern)
        if self.format == "scale" and "weight" not in groups:
            raise _fail(("pattern",), "has no (?P<weight>...) group — the scale pattern needs weight, and may "
                        "have status, mode and unit", self.pattern)

    def _check_binary(self) -> None:
        try:
            header = parse_hex(self.header) if self.header is not None else b""
        except ValueError as exc:
            raise _fail(("header",), str(exc), self.header) from None
        if not header:
            raise _fail(("header",) if self.header is not None else (),
                        "header: is missing — give the bytes every frame starts with, e.g. header: \"AA 55\"")
        if (self.length is None) == (self.frame_length is None):
            raise _fail((), "give length: (where the frame says how long it is) or frame_length: (fixed size), "
                        "exactly one of them")
        if self.length is not None and self.length.byte < len(header):
            raise _fail(("length", "byte"), f"byte {self.length.byte} is inside the {len(header)}-byte header — "
                        "count bytes from 0 at the first header byte", self.length.byte)
        if self.request is not None:
            try:
                parse_hex(self.request)
            except ValueError as exc:
                raise _fail(("request",), str(exc), self.request) from None
        if not self.fields:
            raise _fail((), "fields: is missing — list the values with byte: and type:")
        csize = CHECKSUM_SIZE[self.checksum.type] if self.checksum else 0
        for name, spec in self.fields.items():
            if spec.byte is None:
                raise _fail(("fields", name), "byte: is missing — the position of the value, 0 = first header byte")
            if spec.type is None or spec.type not in BIN_TYPES:
                raise _fail(("fields", name, "type"), "use int8, uint8, int16, uint16, int32, uint32, int64, uint64, "
                            "float32 or float64", spec.type)
            end = spec.byte + BIN_TYPES[spec.type][1]
            if spec.bit is not None and (spec.type.startswith("float") or spec.bit >= 8 * BIN_TYPES[spec.type][1]):
                raise _fail(("fields", name, "bit"), f"bit {spec.bit} is not in a {spec.type}", spec.bit)
            if self.frame_length is not None and end > self.frame_length - csize:
                raise _fail(("fields", name, "byte"), f"bytes {spec.byte}..{end - 1} run past the frame "
                            f"({self.frame_length} bytes, checksum included) — check byte: and type:", spec.byte)
            if spec.byte < len(header):
                raise _fail(("fields", name, "byte"), f"byte {spec.byte} is inside the header", spec.byte)


if TYPE_CHECKING:
    StopBits = float  # a float is no valid Literal for type checkers; pydantic checks the literal below
else:
    StopBits = Literal[1, 1.5, 2]


class DeviceModel(DeviceConfig):
    """A serial sensor on its own port (``devices/<id>.yaml``, ``protocol: serial``).

    ``timeout``: for a polled sensor, how long to wait for the reply; for a streaming sensor,
    how long it may stay quiet before it is reported down (set it above its output period).
    """

    protocol: Literal["serial"] = Field(description="serial: a sensor that is not Modbus, on a serial port")
    port: str = Field(min_length=1, description="/dev/ttyUSB0, /dev/serial/by-id/..., /dev/ttyAMA0")
    baudrate: int = Field(default=9600, ge=50, le=4_000_000, description="bits per second")
    parity: Literal["N", "E", "O", "M", "S"] = Field(default="N", description="N (none), E (even), O (odd), M, S")
    stopbits: StopBits = Field(default=1, description="stop bits: 1, 1.5 or 2")
    bytesize: Literal[5, 6, 7, 8] = Field(default=8, description="data bits")

    @field_validator("parity", mode="before")
    @classmethod
    def _parity(cls, value: Any) -> Any:
        return parity_letter(value, "NEOMS")


CHECKSUM_SIZE: Final = {"sum8": 1, "xor": 1, "sum16": 2, "crc16_modbus": 2, "crc16_ccitt": 2, "crc16_xmodem": 2}


SerialDevice = Device[DeviceModel, ProfileModel]
"""A serial sensor with its profile resolved."""
