"""Strict checking of incoming payloads for ``sluice ingest``: InfluxDB line protocol as
gateway/encode.py writes it, and the gateway's JSON messages turned into the same line protocol.

Contract: :func:`to_lines` takes one MQTT payload and returns a :class:`Points` (the line-protocol
bytes to write, each line ending in ``\\n``, the number of points and the newest timestamp), or
raises :class:`Malformed` with a reason a person can act on (``line 3: field 'temp': value 'abc'
is not ...``). Nothing here touches the network: a payload is judged before it is written, so a
bad message never costs a database round trip and never poisons a batch of good ones.

The grammar accepted is InfluxDB's, minus what a Sluice gateway never sends and what would make
a redelivered message unsafe:

* every line has a timestamp (integer nanoseconds): without one the database stamps the point
  with its own clock, and a message delivered twice would be stored twice;
* no comments, no ``\\r``, no unsigned (``u``) integers (InfluxDB 1.x refuses them), no raw
  newline inside a string; integers must fit int64 and floats must be finite;
* the payload must be valid UTF-8.

JSON payloads follow the schema in gateway/encode.py's docstring; every reading becomes the line
the gateway's own InfluxEncoder would have written for it, so both formats store the same points.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from gateway.encode import InfluxEncoder
from gateway.reading import Reading
from gateway.reading import quality as canonical_quality  # `quality` is a local name below

__all__ = ["Malformed", "Points", "json_to_lines", "parse_lines", "to_lines"]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class Malformed(ValueError):
    """A payload that cannot be written; ``kind`` groups reasons for counting and rate-limited logs."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Points:
    data: bytes  # line protocol, every line ending in "\n"; b"" when there is nothing to write
    count: int
    newest_ns: int  # 0 when count is 0


# --------------------------------------------------------------------------- grammar
# Written as "unrolled loops" (run of plain characters, then escape + run ...): Python's
# backtracking engine is ~10x slower with a per-character alternation.
_MEAS = rb"(?=[^ ,\n\r#])[^\\ ,\n\r]*(?:\\[^\n\r][^\\ ,\n\r]*)*"
_KEY = rb"(?=[^ ,=\n\r])[^\\ ,=\n\r]*(?:\\[^\n\r][^\\ ,=\n\r]*)*"
# Integers of at most 19 digits and exponents up to 308 keep int64 and finite floats cheaply; the
# few values this still lets through (9999999999999999999i, 9e308) the database refuses as data.
_EXP = rb"(?:[eE](?:-\d{1,3}|\+?(?:[0-2]?\d{1,2}|30[0-8])))"
_NUMBER = rb"[-+]?(?:\d{1,19}i|\d+(?:\.\d*)?" + _EXP + rb"?|\.\d+" + _EXP + rb"?)"  # int (…i) or float
_BOOL = rb"(?:true|True|TRUE|t|T|false|False|FALSE|f|F)"
_STR = rb'"[^"\\\n\r]*(?:\\[^\n\r][^"\\\n\r]*)*"'
_VALUE = rb"(?:" + _NUMBER + rb"|" + _STR + rb"|" + _BOOL + rb")"
_FIELD = _KEY + rb"=" + _VALUE
_LINE = _MEAS + rb"(?:," + _KEY + rb"=" + _KEY + rb")* " + _FIELD + rb"(?:," + _FIELD + rb")* -?\d{1,19}"

_PAYLOAD = re.compile(rb"(?:" + _LINE + rb"\n)*" + _LINE + rb"\n?")
_TIMESTAMPS = re.compile(rb" (-?\d+)$", re.MULTILINE)
# Pieces for explaining what is wrong with one line.
_RE_MEAS = re.compile(_MEAS)
_RE_TAG = re.compile(rb"," + _KEY + rb"=" + _KEY)
_RE_KEY = re.compile(_KEY + rb"=")
# Lenient about digits and exponents, so that the reason can name an out-of-range value.
_ANY_NUMBER = rb"[-+]?\d+i|[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_RE_VALUE = re.compile(rb"(" + _ANY_NUMBER + rb"|" + _BOOL + rb"|" + _STR + rb")(?=[, ]|$)")
_RE_TIME = re.compile(rb" (-?\d+)$")


def parse_lines(payload: bytes) -> Points:
    """Check a line-protocol payload (see the module docstring); raise :class:`Malformed`."""
    if not payload.strip():
        raise Malformed("empty", "empty payload")
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Malformed("encoding", f"not UTF-8 text (byte {exc.start})") from None
    if _PAYLOAD.fullmatch(payload) is None:
        _explain(payload)  # raises with the reason
    stamps = _TIMESTAMPS.findall(payload)
    newest = max(map(int, stamps))
    oldest = min(map(int, stamps)) if len(stamps) > 1 else newest
    if newest > _INT64_MAX - 1 or oldest < _INT64_MIN + 2:  # InfluxDB reserves the two extremes
        raise Malformed("timestamp", "timestamp out of InfluxDB's range (int64 nanoseconds)")
    data = payload if payload.endswith(b"\n") else payload + b"\n"
    return Points(data, len(stamps), newest)


def _explain(payload: bytes) -> None:
    lines = payload.split(b"\n")
    if payload.endswith(b"\n"):
        lines.pop()  # the final newline ends the last line
    for number, raw in enumerate(lines, 1):
        problem = _line_problem(raw)
        if problem is not None:
            raise Malformed("line_protocol", f"line {number}: {problem}")


def _show(text: bytes, limit: int = 40) -> str:
    shown = text.decode("utf-8", "replace")
    return repr(shown if len(shown) <= limit else shown[:limit] + "…")


def _line_problem(line: bytes) -> str | None:
    if not line:
        return "empty line"
    if b"\r" in line:
        return "carriage return in the line (line protocol lines end with \\n only)"
    if line.startswith(b"#"):
        return "comment lines are not accepted"
    meas = _RE_MEAS.match(line)
    if meas is None:
        return f"no measurement at the start of {_show(line)}"
    pos = meas.end()
    while (tag := _RE_TAG.match(line, pos)) is not None:
        pos = tag.end()
    if line[pos:pos + 1] == b",":
        return f"bad tag at {_show(line[pos + 1:])} (a tag is key=value; escape ',', '=' and spaces with '\\')"
    if line[pos:pos + 1] != b" ":
        return f"unexpected text after the measurement: {_show(line[pos:])}"
    pos += 1
    fields = 0
    while True:
        key = _RE_KEY.match(line, pos)
        if key is None:
            if fields == 0:
                return f"expected a field key=value at {_show(line[pos:])}"
            return f"bad field after ',' at {_show(line[pos:])}"
        name = line[key.start():key.end() - 1].decode("utf-8", "replace")
        value = _RE_VALUE.match(line, key.end())
        if value is None:
            rest = line[key.end():]
            if rest[:1] == b'"':
                return f"field '{name}': string value without a closing quote"
            token = rest.split(b",", 1)[0].split(b" ", 1)[0]
            if re.fullmatch(rb"[-+]?\d+u", token):
                return f"field '{name}': unsigned integer {_show(token)} (not accepted by InfluxDB 1.x; write it with 'i')"
            return f"field '{name}': value {_show(token)} is not a number, an integer (…i), a boolean or a \"string\""
        problem = _value_problem(name, value.group(1))
        if problem is not None:
            return problem
        fields += 1
        pos = value.end()
        if line[pos:pos + 1] != b",":
            break
        pos += 1
    rest = line[pos:]
    if not rest:
        return "no timestamp (every line needs one: a redelivered message would otherwise be stored twice)"
    stamp = _RE_TIME.fullmatch(rest)
    if stamp is None:
        return f"bad timestamp {_show(rest.strip())} (integer nanoseconds since the epoch)"
    ns = int(stamp.group(1))
    if not _INT64_MIN + 2 <= ns <= _INT64_MAX - 1:
        return f"timestamp {ns} out of InfluxDB's range (int64 nanoseconds)"
    return None


def _value_problem(name: str, value: bytes) -> str | None:
    if value.endswith(b"i"):
        number = int(value[:-1])
        if not _INT64_MIN <= number <= _INT64_MAX:
            return f"field '{name}': integer {number} does not fit in 64 bits"
    elif value[:1] not in (b'"', b"t", b"T", b"f", b"F"):
        if not math.isfinite(float(value)):
            return f"field '{name}': float {_show(value)} overflows (not finite)"
    return None


# --------------------------------------------------------------------------- JSON
_FIELD_TYPES = (int, float, bool, str, type(None))


def json_to_lines(payload: bytes, encoder: InfluxEncoder) -> Points:
    """The gateway's JSON message (schema in gateway/encode.py) as line protocol; raise :class:`Malformed`.

    ``encoder`` keeps per-device caches: one per caller, not shared between threads."""
    try:
        doc = json.loads(payload)
    except UnicodeDecodeError as exc:
        raise Malformed("encoding", f"not UTF-8 text (byte {exc.start})") from None
    except ValueError as exc:
        raise Malformed("json", f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("readings"), list):
        raise Malformed("json", 'not a Sluice message: expected {"gateway": ..., "site": ..., "readings": [...]}')
    lines: list[str] = []
    newest = 0
    for index, item in enumerate(doc["readings"]):
        reading = _reading(item, index)
        line = encoder.line(reading)
        if line:
            lines.append(line)
            newest = max(newest, reading.time_ns)
    return Points("".join(lines).encode(), len(lines), newest)


def _reading(item: Any, index: int) -> Reading:
    where = f"readings[{index}]"
    if not isinstance(item, dict):
        raise Malformed("json", f"{where} is not an object")
    device = item.get("device", "")
    measurement = item.get("measurement")
    tags = item.get("tags", {})
    time_ns = item.get("time_ns")
    quality = item.get("quality", "good")
    fields = item.get("fields")
    if not isinstance(measurement, str) or not measurement:
        raise Malformed("json", f"{where}: 'measurement' must be a non-empty string")
    if not isinstance(device, str):
        raise Malformed("json", f"{where}: 'device' must be a string")
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise Malformed("json", f"{where}: 'tags' must be an object of strings")
    if type(time_ns) is not int:
        raise Malformed("json", f"{where}: 'time_ns' must be an integer (nanoseconds since the epoch)")
    if not _INT64_MIN + 2 <= time_ns <= _INT64_MAX - 1:
        raise Malformed("timestamp", f"{where}: time_ns {time_ns} out of InfluxDB's range")
    if not isinstance(quality, str):
        raise Malformed("json", f"{where}: 'quality' must be a string")
    try:
        quality = canonical_quality(quality)  # a set of flags: any order in, the canonical string out
    except ValueError as exc:
        raise Malformed("json", f"{where}: 'quality' {quality!r}: {exc}") from None
    if not isinstance(fields, dict) or not all(isinstance(v, _FIELD_TYPES) for v in fields.values()):
        raise Malformed("json", f"{where}: 'fields' must be an object of numbers, booleans, strings or null")
    # null is how the gateway writes NaN/infinity: left out, as the line-protocol encoder does.
    values = {k: v for k, v in fields.items() if v is not None}
    return Reading(device, time_ns, values, tags, quality, measurement)


def to_lines(payload: bytes, encoder: InfluxEncoder, fmt: str = "auto") -> Points:
    """A payload in either format (``auto``: a JSON object starts with ``{``) as line protocol."""
    if fmt == "json" or (fmt == "auto" and payload.lstrip()[:1] == b"{"):
        return json_to_lines(payload, encoder)
    return parse_lines(payload)
