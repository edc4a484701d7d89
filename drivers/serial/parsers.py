"""Parsers of serial sensor frames (one frame -> fields; they raise :class:`FrameError` and
nothing else, whatever the bytes) and the decoder, framer + parser for one profile."""

from __future__ import annotations

import codecs
import math
import re
import struct
from collections.abc import Callable
from typing import Final

from drivers.serial.framing import BinaryFramer, FrameError, TextFramer, xor8
from drivers.serial.profile import BIN_TYPES, FieldSpec, ProfileModel, parse_hex
from drivers.wire import to_big_endian
from gateway.reading import FieldValue

_TRUE: Final = frozenset({"1", "true", "on", "yes", "y", "t"})
_FALSE: Final = frozenset({"0", "false", "off", "no", "n", "f"})

DEFAULT_SCALE_PATTERN: Final = r"^(?P<status>[A-Z]{2}),(?P<mode>[A-Z]{2}),(?P<weight>[+-]?\s*[0-9.]+)\s*(?P<unit>[A-Za-z]*)\s*$"
"""The widespread ``ST,GS,+0012.345kg`` continuous output (A&D, many OEM indicators):
status (``ST`` stable, ``US`` unstable, ``OL`` overload), mode (``GS`` gross, ``NT`` net),
signed weight, unit."""


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
    return f"{xor8(body.encode('ascii', 'replace')):02X}"


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
        code, width = BIN_TYPES[spec.type or "uint8"]
        start = spec.byte or 0
        raw = frame[start:start + width]
        if len(raw) < width:
            raise FrameError("truncated", f"{name}: frame of {len(frame)} bytes ends before byte {start + width - 1}")
        number: int | float = struct.unpack(">" + code, to_big_endian(raw, spec.byte_order))[0]
        value: FieldValue
        if spec.bit is not None:
            value = bool((int(number) >> spec.bit) & 1)
        else:
            value = _scaled(number, spec)
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


