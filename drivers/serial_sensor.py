"""Serial sensors that are not Modbus — ASCII lines, NMEA 0183 GPS, weighing scales, binary
frames and code readers — described by profiles, and the poller that owns one serial port.

Layout, top to bottom — each part only uses the ones above it:

* **Profile and device models** (``ProfileModel``, ``DeviceModel``): what a technician writes.
  A profile has ``protocol: serial`` and a ``format:`` (``lines``, ``nmea``, ``scale``,
  ``binary``, ``codes``); keys that do not apply to its format are errors at that key.
* **Checksums** (:data:`CHECKSUMS`) and byte orders for binary frames.
* **Framers** (:class:`TextFramer`, :class:`BinaryFramer`): bytes as they arrive -> complete
  frames, in a bounded buffer. Garbage, overlong lines, truncated frames (a partial frame older
  than ``frame_gap`` when new bytes arrive) and bad binary checksums come out as
  :class:`FrameError` values, never raised, and never merge into the next frame.
* **Parsers** (:func:`parse_lines`, :func:`parse_nmea`, :func:`parse_scale`,
  :func:`parse_binary`, :func:`parse_codes`): one frame -> fields. They raise
  :class:`FrameError` and nothing else, whatever the bytes.
* **Decoder** (:func:`make_decoder`): framer + parser for a profile; ``feed(bytes, now)``
  never raises.
* **Poller** (:class:`SerialSensorPoller`): one per port; the port is opened with pyserial in
  non-blocking mode and its file descriptor is watched by the event loop (``add_reader``): no
  threads.

How often a streaming device produces a reading (the rate rule)
    A streaming sensor (no ``request:``) sends at its own pace. At every multiple of the
    device's ``interval`` (aligned to the wall clock) the poller emits **one** reading holding,
    for each field, the **latest value received during that interval**, stamped with the time
    the last good frame of the interval arrived. For most sensors that is simply the latest
    complete frame; for NMEA, GGA and RMC sentences merge (position and altitude from GGA,
    speed from RMC). An interval without a good frame emits nothing. **Code readers** are the
    exception: every scan is emitted at once as its own reading (field ``code``), never merged
    or dropped. Request/response devices (``request:`` set) are polled every ``interval``.

When a device is down
    A streaming device that sent no good frame for its ``timeout`` (set it above the sensor's
    own output period) is *down* (``silent``, or the kind of the bad frames it sent instead);
    a polled device is down when a request gets no good reply after its retries. A code reader
    is never down for being quiet: nobody may be scanning. Health is judged once per interval
    and logged once per state change (:class:`gateway.polling.Health`).

A noisy line
    Bad frames of every kind (garbage, checksum, truncated, overlong) are counted per kind in the
    device's status (``sluice_device_errors_total`` in /metrics), never logged one by one. Bad
    frames between good ones — or, for a polled sensor that has answered, a poll whose replies
    were all spoilt — put the sensor in one state, ``degraded:bad_frames``, logged once with the
    counts; it counts as clean again only after ``NOISE_SETTLE`` (60 s, at least ten intervals)
    without a bad frame, and that line carries the counts of the noisy spell.

A scale's frame is its whole state: the latest frame of an interval replaces the earlier ones
(an overload line has no weight, and the weight before it is not kept).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import math
import os
import re
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Final, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from gateway.driver import (Claim, Device, DeviceConfig, DeviceStatus, Emit, FieldInfo, Problem, ProfileConfig,
                            StrictModel, ValidRange, fail_at, parity_letter, serial_claim, slow_timeout)
from gateway.polling import Backoff, Health, Schedule, format_duration, next_aligned
from gateway.reading import GOOD, UNCERTAIN, FieldValue, Reading
from gateway.units import Duration
from simulators.signals import SignalSpec

__all__ = [
    "CHECKSUMS",
    "PROFILE_KIND",
    "PROTOCOLS",
    "BinaryFramer",
    "DeviceModel",
    "FrameError",
    "ProfileModel",
    "SerialSensorPoller",
    "TextFramer",
    "check",
    "claims",
    "make_decoder",
    "make_pollers",
    "parse_binary",
    "parse_codes",
    "parse_lines",
    "parse_nmea",
    "parse_scale",
]

PROTOCOLS: Final = frozenset({"serial"})
PROFILE_KIND: Final = "serial"

log = logging.getLogger(__name__)

Format = Literal["lines", "nmea", "scale", "binary", "codes"]
TextType = Literal["float", "int", "string", "bool"]
BinType = Literal["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
ByteOrder = Literal["ABCD", "DCBA", "BADC", "CDAB"]
ChecksumType = Literal["sum8", "sum16", "xor", "crc16_modbus", "crc16_ccitt", "crc16_xmodem"]

_BIN: Final[dict[str, tuple[str, int]]] = {
    "int8": ("b", 1), "uint8": ("B", 1), "int16": ("h", 2), "uint16": ("H", 2), "int32": ("i", 4),
    "uint32": ("I", 4), "int64": ("q", 8), "uint64": ("Q", 8), "float32": ("f", 4), "float64": ("d", 8),
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
RESERVED_NAMES: Final = frozenset({"quality", "time"})
_TRUE: Final = frozenset({"1", "true", "on", "yes", "y", "t"})
_FALSE: Final = frozenset({"0", "false", "off", "no", "n", "f"})

DEFAULT_SCALE_PATTERN: Final = r"^(?P<status>[A-Z]{2}),(?P<mode>[A-Z]{2}),(?P<weight>[+-]?\s*[0-9.]+)\s*(?P<unit>[A-Za-z]*)\s*$"
"""The widespread ``ST,GS,+0012.345kg`` continuous output (A&D, many OEM indicators):
status (``ST`` stable, ``US`` unstable, ``OL`` overload), mode (``GS`` gross, ``NT`` net),
signed weight, unit."""


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
    byte_order: ByteOrder = "ABCD"
    bit: int | None = Field(default=None, ge=0, le=63, description="binary: a bool from one bit of an integer")
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    valid: ValidRange | None = None
    sim: SignalSpec | None = None

    @model_validator(mode="after")
    def _numbers(self) -> FieldSpec:
        if self.scale == 0 or not math.isfinite(self.scale) or not math.isfinite(self.offset):
            raise _fail(("scale",), "scale must be a finite, non-zero number — e.g. 0.1 for tenths")
        return self


class LengthSpec(StrictModel):
    """Where a binary frame says how long it is."""

    byte: int = Field(ge=0, le=1024, description="position of the length field, 0 = first header byte")
    type: Literal["uint8", "uint16"] = "uint8"
    byte_order: Literal["ABCD", "DCBA"] = "ABCD"
    counts: Literal["rest", "frame", "payload"] = Field(
        default="rest", description="rest: bytes after the length field incl. checksum; frame: the whole "
        "frame; payload: bytes after the length field, without the checksum")


class ChecksumSpec(StrictModel):
    """A checksum at the end of a binary frame over bytes ``start`` .. the byte before it."""

    type: ChecksumType
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

    protocol: Literal["serial"]
    format: Format
    # text formats
    delimiter: str = Field(default="\n", min_length=1, description="end of a line; a \\r before \\n is dropped")
    encoding: str = "ascii"
    pattern: str | None = Field(default=None, description="regular expression with named groups")
    request: str | None = Field(default=None, description="sent every interval (text, or hex for binary); "
                                "without it the sensor streams")
    fields: dict[str, FieldSpec] = Field(default_factory=dict)
    # nmea
    sentences: list[Literal["GGA", "RMC"]] = Field(default=["GGA", "RMC"], min_length=1)
    speed_unit: Literal["kmh", "knots", "both"] = "kmh"
    require_checksum: bool = True
    # scale
    stable: list[str] = Field(default=["ST"], description="status values meaning a stable weight")
    overload: list[str] = Field(default=["OL"], description="status values meaning over/under load")
    net: list[str] = Field(default=["NT"], description="mode values meaning a net (tared) weight")
    only_stable: bool = Field(default=False, description="report stable weights only")
    # binary
    header: str | None = Field(default=None, description="the bytes every frame starts with, in hex")
    length: LengthSpec | None = None
    frame_length: int | None = Field(default=None, ge=1, le=65536, description="bytes per frame, for fixed-size frames")
    checksum: ChecksumSpec | None = None
    # codes
    strip_prefix: str = ""
    strip_suffix: str = ""
    # all
    max_frame: int = Field(default=512, ge=8, le=65536, description="longest frame accepted, in bytes")
    frame_gap: Duration = Field(default=0.5, gt=0, le=60,
                                description="a partial frame older than this when new bytes arrive was truncated")
    sim: SimSettings = SimSettings()

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
        csize = _CHECKSUM_SIZE[self.checksum.type] if self.checksum else 0
        for name, spec in self.fields.items():
            if spec.byte is None:
                raise _fail(("fields", name), "byte: is missing — the position of the value, 0 = first header byte")
            if spec.type is None or spec.type not in _BIN:
                raise _fail(("fields", name, "type"), "use int8, uint8, int16, uint16, int32, uint32, int64, uint64, "
                            "float32 or float64", spec.type)
            end = spec.byte + _BIN[spec.type][1]
            if spec.bit is not None and (spec.type.startswith("float") or spec.bit >= 8 * _BIN[spec.type][1]):
                raise _fail(("fields", name, "bit"), f"bit {spec.bit} is not in a {spec.type}", spec.bit)
            if self.frame_length is not None and end > self.frame_length - csize:
                raise _fail(("fields", name, "byte"), f"bytes {spec.byte}..{end - 1} run past the frame "
                            f"({self.frame_length} bytes, checksum included) — check byte: and type:", spec.byte)
            if spec.byte < len(header):
                raise _fail(("fields", name, "byte"), f"byte {spec.byte} is inside the header", spec.byte)


class DeviceModel(DeviceConfig):
    """A serial sensor on its own port (``devices/<id>.yaml``, ``protocol: serial``).

    ``timeout``: for a polled sensor, how long to wait for the reply; for a streaming sensor,
    how long it may stay quiet before it is reported down (set it above its output period).
    """

    protocol: Literal["serial"]
    port: str = Field(min_length=1, description="/dev/ttyUSB0, /dev/serial/by-id/..., /dev/ttyAMA0")
    baudrate: int = Field(default=9600, ge=50, le=4_000_000)
    parity: Literal["N", "E", "O", "M", "S"] = Field(default="N", description="N (none), E (even), O (odd), M, S")
    stopbits: Literal[1, 1.5, 2] = 1
    bytesize: Literal[5, 6, 7, 8] = 8

    @field_validator("parity", mode="before")
    @classmethod
    def _parity(cls, value: Any) -> Any:
        return parity_letter(value, "NEOMS")


# =========================================================================== checksums
def _sum8(data: bytes) -> int:
    return sum(data) & 0xFF


def _sum16(data: bytes) -> int:
    return sum(data) & 0xFFFF


def _xor(data: bytes) -> int:
    return reduce(lambda a, b: a ^ b, data, 0)


def _crc_table(poly: int, reflected: bool) -> list[int]:
    table = []
    for n in range(256):
        crc = n if reflected else n << 8
        for _ in range(8):
            if reflected:
                crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
            else:
                crc = ((crc << 1) ^ poly) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_MODBUS_TABLE: Final = _crc_table(0xA001, True)
_CCITT_TABLE: Final = _crc_table(0x1021, False)


def crc16_modbus(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _MODBUS_TABLE[(crc ^ b) & 0xFF]
    return crc


def _crc16_ccitt(data: bytes, init: int) -> int:
    crc = init
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CCITT_TABLE[((crc >> 8) ^ b) & 0xFF]
    return crc


CHECKSUMS: Final[dict[str, Callable[[bytes], int]]] = {
    "sum8": _sum8, "sum16": _sum16, "xor": _xor, "crc16_modbus": crc16_modbus,
    "crc16_ccitt": lambda d: _crc16_ccitt(d, 0xFFFF),  # CRC-16/CCITT-FALSE: "123456789" -> 0x29B1
    "crc16_xmodem": lambda d: _crc16_ccitt(d, 0x0000),  # CRC-16/XMODEM: "123456789" -> 0x31C3
}
_CHECKSUM_SIZE: Final = {"sum8": 1, "xor": 1, "sum16": 2, "crc16_modbus": 2, "crc16_ccitt": 2, "crc16_xmodem": 2}


def checksum_bytes(spec: ChecksumSpec, covered: bytes) -> bytes:
    """The checksum of ``covered`` as it appears on the wire."""
    value = CHECKSUMS[spec.type](covered)
    if _CHECKSUM_SIZE[spec.type] == 1:
        return bytes([value])
    order = spec.byte_order or ("DCBA" if spec.type == "crc16_modbus" else "ABCD")
    return value.to_bytes(2, "little" if order == "DCBA" else "big")


def to_big_endian(raw: bytes, order: str) -> bytes:
    """Wire bytes in ``order`` (``A`` = most significant, as manuals print it) -> big endian.
    Every order is its own inverse, so this also turns big endian into wire order."""
    if order == "ABCD" or len(raw) == 1:
        return raw
    if order == "DCBA":
        return raw[::-1]
    if order == "BADC":
        return b"".join(raw[i + 1:i + 2] + raw[i:i + 1] for i in range(0, len(raw), 2))
    return b"".join(raw[i:i + 2] for i in range(len(raw) - 2, -1, -2))  # CDAB: word order reversed


# =========================================================================== framers
class FrameError(Exception):
    """A frame that could not be used. ``kind``: ``garbage``, ``checksum``, ``overlong``,
    ``truncated`` (counted per device under that name). The only exception parsers raise."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class TextFramer:
    """Splits a byte stream at ``delimiter`` into lines of at most ``max_frame`` bytes.

    The buffer never holds more than ``max_frame`` + one read: an overlong line is reported once
    and skipped up to the next delimiter. A partial line older than ``gap`` when more bytes
    arrive is reported as truncated and dropped, so it cannot glue itself to the next line.
    """

    def __init__(self, delimiter: bytes, max_frame: int, gap: float) -> None:
        self._delim = delimiter
        self._max = max_frame
        self._gap = gap
        self._buf = bytearray()
        self._last = 0.0
        self._skipping = False

    @property
    def pending(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()
        self._skipping = False

    def feed(self, data: bytes, now: float) -> list[bytes | FrameError]:
        out: list[bytes | FrameError] = []
        if self._buf and now - self._last > self._gap:
            if not self._skipping and self._buf.strip():
                out.append(FrameError("truncated", f"a partial line ({len(self._buf)} bytes) and then "
                                      f"nothing for {format_duration(now - self._last)}"))
            self.reset()
        self._last = now
        buf = self._buf
        buf += data
        dlen = len(self._delim)
        start = 0
        while True:
            end = buf.find(self._delim, start)
            if end < 0:
                break
            line = bytes(buf[start:end])
            start = end + dlen
            if self._skipping:
                self._skipping = False
                continue
            if self._delim == b"\n" and line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self._max:
                out.append(FrameError("overlong", f"a line of {len(line)} bytes, longer than max_frame "
                                      f"({self._max})"))
                continue
            if line.strip():
                out.append(line)
        del buf[:start]
        if len(buf) > self._max:
            if not self._skipping:
                out.append(FrameError("overlong", f"more than {self._max} bytes without a delimiter"))
            self._skipping = True
            keep = dlen - 1  # a delimiter may be split between two reads
            del buf[:len(buf) - keep]
        return out


class BinaryFramer:
    """Finds frames in a byte stream by header, length (or fixed size) and checksum.

    After a bad checksum or an impossible length the search restarts one byte after the
    rejected header, so a truncated frame costs itself only: the next frame is still found.
    """

    def __init__(self, profile: ProfileModel) -> None:
        self._header = parse_hex(profile.header or "")
        self._length = profile.length
        self._fixed = profile.frame_length
        self._checksum = profile.checksum
        self._csize = _CHECKSUM_SIZE[profile.checksum.type] if profile.checksum else 0
        self._max = profile.max_frame
        self._gap = profile.frame_gap
        self._buf = bytearray()
        self._last = 0.0
        if self._length is not None:
            self._len_end = self._length.byte + (1 if self._length.type == "uint8" else 2)
        else:
            self._len_end = 0
        self._min = max(len(self._header), self._len_end) + self._csize

    @property
    def pending(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()

    def _total(self, buf: bytearray) -> int:
        if self._fixed is not None:
            return self._fixed
        spec = self._length
        assert spec is not None
        raw = bytes(buf[spec.byte:self._len_end])
        value = int.from_bytes(raw, "little" if spec.byte_order == "DCBA" else "big")
        if spec.counts == "frame":
            return value
        if spec.counts == "rest":
            return self._len_end + value
        return self._len_end + value + self._csize

    def feed(self, data: bytes, now: float) -> list[bytes | FrameError]:
        out: list[bytes | FrameError] = []
        if self._buf and now - self._last > self._gap:
            # Nothing more is coming for what is buffered: keep any complete frame in it and
            # drop the rest (a frame cut short, or a false header that claimed more bytes).
            before = len(self._buf)
            taken = self._scan(out, final=True)
            if before - taken > 0:
                out.append(FrameError("truncated", f"{before - taken} bytes of an incomplete frame, then nothing for "
                                      f"{format_duration(now - self._last)}"))
            self._buf.clear()
        self._last = now
        self._buf += data
        self._scan(out, final=False)
        return out

    def _scan(self, out: list[bytes | FrameError], *, final: bool) -> int:
        """Take frames from the buffer into ``out``; returns the bytes taken as frames. When
        ``final``, an incomplete frame is skipped (one byte) instead of waited for."""
        buf = self._buf
        head = self._header
        taken = 0
        rejected = final  # bytes skipped after a rejected frame belong to it: not counted again
        while buf:
            at = buf.find(head)
            if at < 0:
                junk = len(buf) if final else len(buf) - (len(head) - 1)
                if junk > 0 and not rejected and bytes(buf[:junk]).strip(b"\x00"):
                    out.append(FrameError("garbage", f"{junk} bytes without a frame header"))
                if junk > 0:
                    del buf[:junk]
                break
            if at > 0:
                if not rejected:
                    out.append(FrameError("garbage", f"{at} bytes before a frame header"))
                del buf[:at]
            if len(buf) < max(self._len_end, len(head)):
                if final:
                    del buf[:1]
                    continue
                break
            total = self._total(buf)
            if total < self._min or total > self._max:
                out.append(FrameError("garbage", f"a frame claiming {total} bytes (expected "
                                      f"{self._min}..{self._max}) — check length: in the profile"))
                rejected = True
                del buf[:1]
                continue
            if len(buf) < total:
                if final:
                    del buf[:1]
                    continue
                break
            frame = bytes(buf[:total])
            if self._checksum is not None:
                spec = self._checksum
                want = checksum_bytes(spec, frame[spec.start:total - self._csize])
                got = frame[total - self._csize:]
                if got != want:
                    out.append(FrameError("checksum", f"{spec.type} is {got.hex(' ')}, computed {want.hex(' ')}"))
                    rejected = True
                    del buf[:1]
                    continue
            rejected = final
            out.append(frame)
            taken += total
            del buf[:total]
        return taken


# =========================================================================== parsers
def _number(text: str, name: str, kind: str) -> float | int:
    try:
        if kind == "int":
            return int(text.replace(" ", ""), 10)
        value = float(text.replace(" ", ""))
    except ValueError:
        raise FrameError("garbage", f"{name}: {text[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise FrameError("garbage", f"{name}: {text[:40]!r} is not a finite number")
    return value


def _scaled(value: float | int, spec: FieldSpec | None) -> float | int:
    if spec is None or (spec.scale == 1.0 and spec.offset == 0.0):
        return value
    return value * spec.scale + spec.offset


def _in_range(value: FieldValue, spec: FieldSpec | None) -> bool:
    if spec is None or spec.valid is None or isinstance(value, (str, bool)):
        return True
    if isinstance(value, float) and not math.isfinite(value):
        return False
    v = spec.valid
    return (v.min is None or value >= v.min) and (v.max is None or value <= v.max)


Parsed = tuple[dict[str, FieldValue], list[str]]
"""Fields of one good frame, and the names of fields left out for being outside ``valid:``."""


def _decode_text(frame: bytes, encoding: str) -> str:
    try:
        return frame.decode(encoding)
    except UnicodeDecodeError:
        raise FrameError("garbage", f"bytes that are not {encoding}: {frame[:40]!r}") from None


def parse_lines(profile: ProfileModel, rx: re.Pattern[str], frame: bytes) -> Parsed:
    """One line -> its named groups as fields (per ``fields:`` type, scale, offset, valid)."""
    text = _decode_text(frame, profile.encoding)
    match = rx.search(text)
    if match is None:
        raise FrameError("garbage", f"a line that does not match the pattern: {text[:80]!r}")
    fields: dict[str, FieldValue] = {}
    invalid: list[str] = []
    for name, raw in match.groupdict().items():
        if raw is None:
            continue  # an optional group that did not take part
        spec = profile.fields.get(name)
        kind = spec.type if spec is not None and spec.type is not None else "float"
        value: FieldValue
        if kind == "string":
            value = raw
        elif kind == "bool":
            low = raw.strip().lower()
            if low not in _TRUE and low not in _FALSE:
                raise FrameError("garbage", f"{name}: {raw[:40]!r} is neither true nor false")
            value = low in _TRUE
        else:
            value = _scaled(_number(raw, name, kind), spec)
        if _in_range(value, spec):
            fields[name] = value
        else:
            invalid.append(name)
    return fields, invalid


def _nmea_coord(value: str, hemi: str, degree_digits: int, name: str) -> float:
    if len(value) < degree_digits + 2 or hemi not in ("N", "S", "E", "W"):
        raise FrameError("garbage", f"{name}: {value!r} {hemi!r} is not an NMEA coordinate")
    degrees = _number(value[:degree_digits], name, "int")
    minutes = _number(value[degree_digits:], name, "float")
    limit = 90 if degree_digits == 2 else 180
    if not (0 <= minutes < 60) or not (0 <= degrees <= limit) or degrees + minutes / 60 > limit:
        raise FrameError("garbage", f"{name}: {value!r} is out of range")
    result = degrees + minutes / 60
    return round(-result if hemi in ("S", "W") else result, 7)


def nmea_checksum(body: str) -> str:
    """The two hex digits of an NMEA sentence's checksum (XOR of the characters between $ and *)."""
    return f"{_xor(body.encode('ascii', 'replace')):02X}"


def parse_nmea(profile: ProfileModel, frame: bytes) -> Parsed:
    """An NMEA 0183 sentence -> fields. GGA: latitude, longitude (signed decimal degrees),
    altitude (m), fix_quality, satellites, hdop; RMC: position, speed (speed_kmh and/or
    speed_knots), course. Sentences not configured, and sentences without a fix, give no fields."""
    text = _decode_text(frame, "ascii").strip()
    if not text.startswith(("$", "!")):
        raise FrameError("garbage", f"not an NMEA sentence: {text[:80]!r}")
    body, star, given = text[1:].partition("*")
    if star:
        if nmea_checksum(body) != given.strip().upper():
            raise FrameError("checksum", f"NMEA checksum {given[:4]!r}, computed {nmea_checksum(body)} in "
                             f"{text[:82]!r}")
    elif profile.require_checksum:
        raise FrameError("checksum", f"NMEA sentence without a checksum: {text[:82]!r}")
    parts = body.split(",")
    kind = parts[0][-3:] if len(parts[0]) >= 5 else ""
    if kind not in profile.sentences:
        return {}, []
    fields: dict[str, FieldValue] = {}
    if kind == "GGA":
        if len(parts) < 10:
            raise FrameError("garbage", f"a GGA sentence with {len(parts)} parts: {text[:82]!r}")
        quality = _number(parts[6] or "0", "fix_quality", "int")
        fields["fix_quality"] = quality
        if parts[7]:
            fields["satellites"] = _number(parts[7], "satellites", "int")
        if quality and parts[2]:
            fields["latitude"] = _nmea_coord(parts[2], parts[3], 2, "latitude")
            fields["longitude"] = _nmea_coord(parts[4], parts[5], 3, "longitude")
            if parts[8]:
                fields["hdop"] = _number(parts[8], "hdop", "float")
            if parts[9]:
                fields["altitude"] = _number(parts[9], "altitude", "float")
    else:  # RMC
        if len(parts) < 9:
            raise FrameError("garbage", f"an RMC sentence with {len(parts)} parts: {text[:82]!r}")
        if parts[2] != "A":
            return {}, []  # V: the receiver has no valid fix
        fields["latitude"] = _nmea_coord(parts[3], parts[4], 2, "latitude")
        fields["longitude"] = _nmea_coord(parts[5], parts[6], 3, "longitude")
        if parts[7]:
            knots = _number(parts[7], "speed", "float")
            if profile.speed_unit in ("knots", "both"):
                fields["speed_knots"] = knots
            if profile.speed_unit in ("kmh", "both"):
                fields["speed_kmh"] = round(knots * 1.852, 3)
        if parts[8]:
            fields["course"] = _number(parts[8], "course", "float")
    return fields, []


def parse_scale(profile: ProfileModel, rx: re.Pattern[str], frame: bytes) -> Parsed:
    """A weighing-scale line -> weight, unit, stable, net (and overload: true with no weight)."""
    text = _decode_text(frame, profile.encoding)
    match = rx.search(text)
    if match is None:
        raise FrameError("garbage", f"a line that is not a weight: {text[:80]!r}")
    groups = match.groupdict()
    status = (groups.get("status") or "").strip()
    if status and status in profile.overload:
        return {"overload": True, "stable": False}, []
    stable = not status or status in profile.stable
    if profile.only_stable and not stable:
        return {}, []
    fields: dict[str, FieldValue] = {"weight": _number(groups["weight"], "weight", "float"),
                                     "stable": stable, "overload": False}
    mode = (groups.get("mode") or "").strip()
    if mode:
        fields["net"] = mode in profile.net
    unit = (groups.get("unit") or "").strip()
    if unit:
        fields["unit"] = unit
    return fields, []


def parse_binary(profile: ProfileModel, frame: bytes) -> Parsed:
    """A checked binary frame -> fields per ``fields:`` (byte, type, byte_order, bit, scale)."""
    fields: dict[str, FieldValue] = {}
    invalid: list[str] = []
    for name, spec in profile.fields.items():
        code, width = _BIN[spec.type or "uint8"]
        start = spec.byte or 0
        raw = frame[start:start + width]
        if len(raw) < width:
            raise FrameError("truncated", f"{name}: frame of {len(frame)} bytes ends before byte {start + width - 1}")
        value: FieldValue = struct.unpack(">" + code, to_big_endian(raw, spec.byte_order))[0]
        if spec.bit is not None:
            value = bool((int(value) >> spec.bit) & 1)
        else:
            value = _scaled(value, spec)
        if _in_range(value, spec):
            fields[name] = value
        else:
            invalid.append(name)
    return fields, invalid


def parse_codes(profile: ProfileModel, rx: re.Pattern[str] | None, frame: bytes) -> Parsed:
    """One scan -> ``{"code": ...}`` with strip_prefix/strip_suffix removed; an empty scan gives nothing."""
    text = _decode_text(frame, profile.encoding).strip()
    if profile.strip_prefix and text.startswith(profile.strip_prefix):
        text = text[len(profile.strip_prefix):]
    if profile.strip_suffix and text.endswith(profile.strip_suffix):
        text = text[:-len(profile.strip_suffix)]
    text = text.strip()
    if not text:
        return {}, []
    if not text.isprintable():
        raise FrameError("garbage", f"a scan with control characters: {text[:80]!r}")
    if rx is not None and rx.fullmatch(text) is None:
        raise FrameError("garbage", f"a scan that does not match the pattern: {text[:80]!r}")
    return {"code": text}, []


# =========================================================================== decoder
def _unescape(text: str) -> bytes:
    """Delimiters and requests as written in YAML: double-quoted escapes already applied; also
    accept the literal two characters ``\\r`` / ``\\n`` written in single quotes."""
    return text.replace("\\r", "\r").replace("\\n", "\n").replace("\\t", "\t").encode("latin-1", "replace")


class Decoder:
    """Framer + parser for one profile. :meth:`feed` never raises: it returns parsed frames and
    :class:`FrameError` values in arrival order."""

    def __init__(self, profile: ProfileModel) -> None:
        self.profile = profile
        fmt = profile.format
        self.framer: TextFramer | BinaryFramer
        if fmt == "binary":
            self.framer = BinaryFramer(profile)
        else:
            delim = b"\n" if fmt == "nmea" else _unescape(profile.delimiter)
            self.framer = TextFramer(delim, profile.max_frame, profile.frame_gap)
        pattern = profile.pattern or (DEFAULT_SCALE_PATTERN if fmt == "scale" else None)
        rx = re.compile(pattern) if pattern is not None else None
        self.parse: Callable[[bytes], Parsed]
        if fmt == "lines":
            assert rx is not None
            self.parse = lambda f: parse_lines(profile, rx, f)
        elif fmt == "scale":
            assert rx is not None
            self.parse = lambda f: parse_scale(profile, rx, f)
        elif fmt == "codes":
            self.parse = lambda f: parse_codes(profile, rx, f)
        elif fmt == "nmea":
            self.parse = lambda f: parse_nmea(profile, f)
        else:
            self.parse = lambda f: parse_binary(profile, f)

    def feed(self, data: bytes, now: float) -> list[Parsed | FrameError]:
        out: list[Parsed | FrameError] = []
        for item in self.framer.feed(data, now):
            if isinstance(item, FrameError):
                out.append(item)
                continue
            try:
                out.append(self.parse(item))
            except FrameError as exc:
                out.extend(self._recover(item, exc))
        return out

    def _recover(self, frame: bytes, error: FrameError) -> list[Parsed | FrameError]:
        """Noise glued to the front of a good line (line noise, an RS485 turnaround) is cut off:
        the line after the last noise byte (or, for NMEA, from the last ``$``) is tried once."""
        if self.profile.format == "binary":
            return [error]
        if self.profile.format == "nmea":
            start = frame.rfind(b"$")
        else:
            ascii_only = codecs.lookup(self.profile.encoding).name == "ascii"
            start = -1
            for i in range(len(frame) - 1, -1, -1):
                b = frame[i]
                if (b < 0x20 and b != 0x09) or b == 0x7F or (ascii_only and b > 0x7F):
                    start = i + 1
                    break
        if start <= 0 or start >= len(frame):
            return [error]
        try:
            parsed = self.parse(frame[start:])
        except FrameError:
            return [error]
        return [FrameError("garbage", f"{start} bytes of noise before a line: {frame[:start][:40]!r}"), parsed]

    def reset(self) -> None:
        self.framer.reset()


def make_decoder(profile: ProfileModel) -> Decoder:
    return Decoder(profile)


def request_bytes(profile: ProfileModel) -> bytes | None:
    if profile.request is None:
        return None
    return parse_hex(profile.request) if profile.format == "binary" else _unescape(profile.request)


# =========================================================================== poller
_HINT: Final = {
    "port": "check that the adapter is plugged in, the port path (ls /dev/serial/by-id/), and that no other "
            "program holds the port",
    "silent": "check the cable (TX/RX crossed?), that the sensor is powered and set to send continuously, "
              "and the baud rate",
    "timeout": "check the cable, that the sensor is powered, the baud rate and the profile's request:",
    "garbage": "check the baud rate, parity and data bits against the sensor's manual, and the profile's pattern",
    "checksum": "noise on the line or wrong line settings: check the cable, shielding, baud rate and parity, "
                "and the profile's checksum:",
    "overlong": "check the baud rate and the profile's delimiter",
    "truncated": "bytes are lost: check the cable and the baud rate",
}


NOISE: Final = "bad_frames"
"""The state of a sensor whose line brings bad frames (of any kind): one state, so that garbage
and checksum errors taking turns do not log a line each."""
NOISE_SETTLE: Final = 60.0
"""Seconds without a bad frame (at least ten intervals) before a noisy line counts as clean again."""


@dataclass(slots=True)
class _Noise:
    """Bad and good frames since the sensor's line was last clean (the counts its log lines carry)."""

    bad: Counter[str] = field(default_factory=Counter)
    good: int = 0
    last_bad: float = -math.inf  # monotonic time of the last bad frame

    def text(self) -> str:
        kinds = ", ".join(f"{kind} {n}" for kind, n in self.bad.most_common())
        return f"{sum(self.bad.values())} bad: {kinds}; {self.good} good"

    def example(self, error: FrameError | None) -> str:
        return error.message if error is not None else "none in the last interval"

    def hint(self) -> str:
        return _HINT.get(self.bad.most_common(1)[0][0], "") if self.bad else ""


@dataclass(slots=True)
class _Window:
    """What arrived since the last interval tick (streaming) or the last request (polled)."""

    fields: dict[str, FieldValue] = field(default_factory=dict)
    invalid: set[str] = field(default_factory=set)
    good: int = 0
    time_ns: int = 0
    error: FrameError | None = None
    errors: int = 0


class SerialSensorPoller:
    """Owns one serial port and the one sensor on it (see :class:`gateway.driver.Poller`).

    The port is opened in ``run`` (and reopened with capped backoff when it goes away: a USB
    adapter unplugged and plugged back). Bytes are read by an event-loop reader callback into
    the decoder's bounded buffer; parsed frames go to the current window. Nothing here blocks
    and no fault of the device raises out of ``run`` or ``poll_once``.
    """

    def __init__(self, device: Device) -> None:
        self.device = device
        cfg = device.config
        self.port = cfg.port
        self.name = f"serial[{cfg.port}]"
        self.status: dict[str, DeviceStatus] = {device.id: DeviceStatus()}
        self._health = Health(device.id, self.status[device.id], log)
        self._link = Health(f"port {cfg.port}", None, log, words=("opened", "reopened"))
        self._decoder = make_decoder(device.profile)
        self._request = request_bytes(device.profile)
        self._codes = device.profile.format == "codes"
        self._reopen = Backoff(min(cfg.interval, 1.0), cfg.backoff_max)
        self._serial: Any = None
        self._fd = -1
        self._lost = asyncio.Event()
        self._arrived = asyncio.Event()
        self._window = _Window()
        self._noise = _Noise()
        self._whole_frames = device.profile.format == "scale"  # each frame is the whole state: replaces
        self._last_good = time.monotonic()
        self._emit: Emit | None = None
        self._where = f"{cfg.port} ({device.profile_name})"

    async def __aenter__(self) -> SerialSensorPoller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    # ------------------------------------------------------------------ port
    def _open(self) -> bool:
        import serial  # pyserial; imported here so that loading a configuration needs no port

        cfg = self.device.config
        try:
            port = serial.Serial(port=None, baudrate=cfg.baudrate, bytesize=cfg.bytesize,
                                 parity=cfg.parity, stopbits=cfg.stopbits, timeout=0, exclusive=True)
            port.port = cfg.port
            port.open()
        except (OSError, ValueError, serial.SerialException) as exc:
            message = f"cannot open {cfg.port}: {exc}"
            self._link.down("port", f"{message} (device {self.device.id}) — {_HINT['port']}")
            self._health.count("port", message)
            self._health.down("port", "", quiet=True)
            return False
        self._serial = port
        self._fd = port.fileno()
        os.set_blocking(self._fd, False)
        with contextlib.suppress(OSError):
            port.reset_input_buffer()  # what queued while nobody listened is stale
        self._decoder.reset()
        self._lost.clear()
        self._last_good = time.monotonic()
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
        self._link.ok(detail=f"{cfg.baudrate} baud {cfg.bytesize}{cfg.parity}{cfg.stopbits:g}, "
                      f"device {self.device.id}")
        self._reopen.reset()
        return True

    def _close(self) -> None:
        port, self._serial = self._serial, None
        if port is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._fd)
        self._fd = -1
        with contextlib.suppress(Exception):
            port.close()

    def _port_lost(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._fd)
        message = f"{self.port} went away ({reason})"
        self._link.down("lost", f"{message}, device {self.device.id}; reopening — {_HINT['port']}")
        self._health.count("port", message)
        self._health.down("port", "", quiet=True)
        self._lost.set()
        self._arrived.set()

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._port_lost(exc.strerror or str(exc))
            return
        if not data:
            self._port_lost("end of file")
            return
        now_ns = time.time_ns()
        for item in self._decoder.feed(data, time.monotonic()):
            self._take(item, now_ns)
        self._arrived.set()

    def _take(self, item: Parsed | FrameError, now_ns: int) -> None:
        w = self._window
        if isinstance(item, FrameError):
            w.errors += 1
            w.error = item
            self._noise.bad[item.kind] += 1
            self._noise.last_bad = time.monotonic()
            self._health.count(item.kind, f"{self._where}: {item.message}")
            return
        fields, invalid = item
        w.good += 1
        self._noise.good += 1
        self._last_good = time.monotonic()
        if invalid:
            self._health.count("invalid", f"invalid values: {', '.join(invalid)}")
        if self._codes and fields and self._emit is not None:
            if not self._settling():
                self._clean(now_ns)
            self._emit(self._reading(fields, now_ns, invalid=()))
            return
        if fields and self._whole_frames:
            w.fields = dict(fields)  # a scale's overload line has no weight: the last one must not stay
            w.time_ns = now_ns
        elif fields:
            w.fields.update(fields)
            w.time_ns = now_ns
        w.invalid.update(invalid)

    def _settling(self) -> bool:
        """The line is noisy and a bad frame arrived too recently for it to count as clean again."""
        settle = max(NOISE_SETTLE, 10 * self.device.config.interval)
        return self._health.state == f"degraded:{NOISE}" and time.monotonic() - self._noise.last_bad < settle

    def _noisy(self, example: str) -> str:
        return (f"{self._where}: bad frames between good ones ({self._noise.text()}), e.g. {example} — "
                f"{self._noise.hint()}; counted in /metrics, logged again when the line is clean")

    def _clean(self, time_ns: int | None) -> None:
        """Everything arrived well: ok (with the counts of the noise it leaves, if any)."""
        noise, self._noise = self._noise, _Noise(last_bad=self._noise.last_bad)
        self._health.ok(time_ns, self._where, summary=noise.text() if noise.bad else "")

    def _reading(self, fields: dict[str, FieldValue], time_ns: int, invalid: Any) -> Reading:
        dev = self.device
        return Reading(dev.id, time_ns, dict(fields), dict(dev.tags), UNCERTAIN if invalid else GOOD, dev.measurement)

    # ------------------------------------------------------------------ running
    async def run(self, emit: Emit) -> None:
        self._emit = emit
        while True:
            if self._serial is None and not self._open():
                await asyncio.sleep(self._reopen.next())
                continue
            if self._request is not None:
                await self._run_polled(emit)
            else:
                await self._run_streaming(emit)
            self._close()  # the port went away: reopen it
            await asyncio.sleep(self._reopen.next())

    async def _wait_lost(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the port goes away first; True if it did."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._lost.wait()
        return self._lost.is_set()

    async def _run_streaming(self, emit: Emit) -> None:
        interval = self.device.config.interval
        self._window = _Window()
        while not await self._wait_lost(next_aligned(interval, time.time()) - time.time()):
            self._judge(emit)

    def _judge(self, emit: Emit) -> None:
        """The end of one streaming interval: emit the window's fields, judge health."""
        w, self._window = self._window, _Window()
        status = self._health.status
        status.polls += 1
        if w.fields:
            emit(self._reading(w.fields, w.time_ns, w.invalid))
        if w.good:
            if w.error is not None or self._settling():
                self._health.degraded(NOISE, self._noisy(self._noise.example(w.error)), w.time_ns or None)
            elif w.invalid:
                self._health.degraded("invalid", f"{self._where}: {', '.join(sorted(w.invalid))} outside the valid "
                                      "range; left out of the reading — check the sensor and the profile's valid:",
                                      w.time_ns or None)
            elif not self._codes or w.fields:
                self._clean(w.time_ns or None)
            return
        quiet = time.monotonic() - self._last_good
        if w.error is not None and (self._codes or quiet >= self.device.config.timeout):
            message = (f"{self._where}: only bad frames for {format_duration(quiet)} ({self._noise.text()}), e.g. "
                       f"{w.error.message} — {self._noise.hint()}")
            if self._codes:
                self._health.degraded(NOISE, message)
            else:
                self._health.down(NOISE, message)
        elif not self._codes and quiet >= self.device.config.timeout:
            self._health.count("silent", "no frame")
            self._health.down("silent", f"{self._where}: no complete frame for {format_duration(quiet)} — "
                              f"{_HINT['silent']}")

    async def _run_polled(self, emit: Emit) -> None:
        cfg = self.device.config
        schedule: Schedule[int] = Schedule()
        schedule.add(0, cfg.interval, cfg.backoff_max)
        while True:
            _key, when = schedule.first()
            if await self._wait_lost(when - time.time()):
                return
            reading = await self._transact(probing=self._health.is_down)
            if self._lost.is_set():
                return
            if reading is None:
                schedule.failed(0)
            else:
                schedule.succeeded(0)
                emit(reading)

    async def _transact(self, *, probing: bool) -> Reading | None:
        """Send the request and read the reply; ``retries`` extra attempts (none while down)."""
        cfg = self.device.config
        self._health.status.polls += 1
        attempts = 1 if probing else 1 + cfg.retries
        problem: FrameError | None = None
        for _attempt in range(attempts):
            with contextlib.suppress(OSError):
                self._serial.reset_input_buffer()  # a late reply to the last request is not this one's
            self._decoder.reset()
            self._window = w = _Window()
            if not await self._write(self._request or b""):
                return None
            deadline = time.monotonic() + cfg.timeout
            while not w.good and w.error is None and not self._lost.is_set():
                self._arrived.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._arrived.wait()
            if self._lost.is_set():
                return None
            if w.good:
                if w.fields:
                    if w.invalid:
                        self._health.degraded("invalid", f"{self._where}: {', '.join(sorted(w.invalid))} outside "
                                              "the valid range; left out — check the sensor and valid:", w.time_ns)
                    elif self._settling():
                        self._health.degraded(NOISE, self._noisy("none in this reply"), w.time_ns)  # not logged again
                    else:
                        self._clean(w.time_ns)
                    return self._reading(w.fields, w.time_ns, w.invalid)
                problem = FrameError("garbage", "a reply without any value")
            elif w.error is not None:
                problem = w.error
            else:
                partial = self._decoder.framer.pending
                kind = "truncated" if partial else "timeout"
                what = (f"a partial reply ({partial} bytes)" if partial else "no reply") + \
                    f" within {format_duration(cfg.timeout)}"
                problem = FrameError(kind, what)
                self._health.count(kind, f"{self._where}: {what}")
                if partial:
                    self._noise.bad[kind] += 1
                    self._noise.last_bad = time.monotonic()
        assert problem is not None
        tries = "" if attempts == 1 else f" ({attempts} attempts)"
        if problem.kind != "timeout" and self._noise.bad and self._health.state in ("ok", f"degraded:{NOISE}"):
            # It answers, but the line spoils replies: a noisy line (one state), not a device going up and down.
            self._health.degraded(NOISE, self._noisy(f"{problem.message}{tries}"), self._health.status.last_success_ns)
            return None
        self._health.down(problem.kind, f"{self._where}: {problem.message}{tries} — {_HINT.get(problem.kind, '')}")
        return None

    async def _write(self, data: bytes) -> bool:
        view = memoryview(data)
        deadline = time.monotonic() + self.device.config.timeout
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._health.count("timeout", "output buffer full")
                    return False
                await asyncio.sleep(0.005)
                continue
            except OSError as exc:
                self._port_lost(exc.strerror or str(exc))
                return False
            view = view[n:]
        return True

    async def poll_once(self) -> list[Reading]:
        """Open the port if needed; one request/reply, or one interval of a streaming sensor
        (up to its timeout, at least its interval)."""
        if self._serial is None and not self._open():
            return []
        if self._request is not None:
            reading = await self._transact(probing=False)
            return [reading] if reading is not None else []
        out: list[Reading] = []
        self._emit = out.append
        self._window = _Window()
        cfg = self.device.config
        deadline = time.monotonic() + max(cfg.timeout, cfg.interval)
        while not (self._window.fields or out) and time.monotonic() < deadline:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self._arrived.wait()
            if self._lost.is_set():
                return out
        self._judge(out.append)
        return out


# =========================================================================== driver entry points
def make_pollers(devices: Sequence[Device]) -> list[SerialSensorPoller]:
    """One poller (one task) per port; :func:`check` makes sure no port has two sensors."""
    return [SerialSensorPoller(dev) for dev in devices]


def claims(device: Device) -> list[Claim]:
    """The serial port (a sensor owns it: :func:`check` refuses a second one on it)."""
    return [serial_claim(device.config.port)]


def check(devices: Sequence[Device]) -> list[Problem]:
    """A serial sensor owns its port: two devices on one port is a mistake."""
    problems: list[Problem] = []
    # A streaming sensor's timeout is how long it may stay quiet: longer than its interval is normal.
    problems += filter(None, (slow_timeout(d) for d in devices if d.profile.request is not None))
    seen: dict[str, Device] = {}
    for dev in devices:
        key = os.path.normpath(dev.config.port)
        other = seen.get(key)
        if other is not None:
            problems.append(Problem(dev, ("port",), f"{dev.config.port} is already used by '{other.id}' ({other.source})",
                                    "a serial sensor needs its own port: give this device its own port, or remove one"))
        else:
            seen[key] = dev
    return problems
