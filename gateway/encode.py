"""Payload encoders: a batch of Readings -> InfluxDB line protocol (the default) or compact JSON.

Both encoders work in two steps so that the forwarder can split a batch by size without
encoding twice: :meth:`Encoder.item` turns one reading into bytes (``b""`` when the reading
has nothing to write), :meth:`Encoder.message` joins items into one payload whose size is
exactly ``encoder.size(items_total_bytes, n_items)``. Encoders keep small caches (per-device
prefixes, escaped keys); one encoder per forwarder, not shared between threads.

Line protocol (``format: influx``), one line per reading, each ending in ``\\n``::

    <measurement>,<tags sorted by key> <field>=<value>,... <time_ns>

Telegraf's ``mqtt_consumer`` with ``data_format = "influx"`` and InfluxDB ``/write`` accept it
unchanged. Rules applied:

* measurement: ``,`` and space are escaped with a backslash; tag keys, tag values and field
  keys: ``,``, ``=`` and space.
* A backslash in those names is escaped (``\\\\``) only where it would otherwise change the
  parse: at the end of the name or before a space, a comma or a backslash. Elsewhere it passes
  unchanged (``C:\\temp`` stays ``C:\\temp``; ``a\\=b`` is written ``a\\\\=b``), because
  InfluxDB 1.x reads ``\\\\`` as two backslashes where VictoriaMetrics and Telegraf read one.
  Measured against influxd 1.6 and VictoriaMetrics 1.79 (``tests/test_technician.py``): every
  tag key and value is stored exactly by both except one ending in a backslash (influxd refuses
  the line), and one with a backslash before a space, a comma or another backslash (the two
  read it differently), or, in a tag key, before an equals sign. :func:`tag_problem` names those; ``sluice check`` refuses them in a
  device's ``tags:``.
* Line protocol cannot carry a newline in names or values. A newline (or carriage return) is
  written as the two characters ``\\n`` (``\\r``): the value arrives readable, on one line,
  with a visible backslash-n instead of a line break.
* String field values are quoted; ``"`` and ``\\`` inside them are escaped.
* Integers get the ``i`` suffix (outside the int64 range they are written as floats); floats
  are written in Python's shortest round-trip form (``repr``); NaN and infinities cannot be
  represented and the field is left out; booleans are ``true``/``false``.
* Empty tag values (and empty tag or field keys) are left out: InfluxDB rejects them.
* The reading's quality becomes a string field ``quality`` only when it is not ``good``: its
  flags in canonical form (sorted, comma-joined: ``"clock_unsynced,uncertain"``; see
  :func:`gateway.reading.quality`).
* A good reading left with no field at all (every value NaN) is not written: line protocol
  needs a field, and there is nothing to store. One that is not good keeps its ``quality``.
* Non-ASCII text (``温室一号``) is written as UTF-8.

JSON (``format: json``), one object per message, compact, UTF-8::

    {"gateway": "<id>", "site": "<site>", "readings": [
        {"device": "...", "measurement": "...", "tags": {...}, "time_ns": <int>,
         "quality": "good|<flag>[,<flag>]", "fields": {"<name>": <number|bool|string|null>}}
    ]}

``time_ns`` is nanoseconds since the Unix epoch (UTC) as an integer: JavaScript consumers must
parse it as a BigInt. NaN and infinities are written as ``null``. ``tags`` is written as the
reading carries it; ``quality`` is always present: ``good`` or the set of flags (``uncertain``,
``clock_unsynced``) sorted and joined with commas.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol, cast

from gateway.reading import GOOD, FieldValue, Reading

__all__ = ["Encoder", "InfluxEncoder", "JsonEncoder", "make_encoder", "tag_problem"]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_CACHE_LIMIT = 4096  # distinct devices (or keys) remembered; beyond it the cache starts afresh


class Encoder(Protocol):
    """Turns readings into one message payload. See the module docstring for the formats."""

    content_type: str

    def item(self, reading: Reading) -> bytes:
        """One reading's bytes within a message; ``b""`` when it has nothing to write."""
        ...

    def message(self, items: Sequence[bytes]) -> bytes:
        """The payload of a message made of ``items`` (non-empty ones)."""
        ...

    def size(self, items_bytes: int, n_items: int) -> int:
        """Exact length of :meth:`message` for ``n_items`` items totalling ``items_bytes``."""
        ...


# --------------------------------------------------------------------------- line protocol
_LP_NAME_BACKSLASH = re.compile(r"\\(?=[ ,\\]|$)")
_LP_MEAS_BACKSLASH = re.compile(r"\\(?=[ ,\\]|$)")


def _lp_controls(text: str) -> str:
    return text.replace("\n", "\\n").replace("\r", "\\r")


def escape_name(text: str) -> str:
    """A tag key, tag value or field key for line protocol."""
    if "\\" in text:
        text = _LP_NAME_BACKSLASH.sub(r"\\\\", text)
    return _lp_controls(text.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ "))


def tag_problem(text: str, *, key: bool = False) -> str | None:
    """Why ``text`` cannot be a tag value (``key``: a tag key) that InfluxDB and VictoriaMetrics
    both store exactly (see the module docstring), or None when it can."""
    if text.endswith("\\"):
        return "ends in a backslash, which InfluxDB refuses (invalid tag format) for every reading"
    followers = (("\\", "another backslash"), (",", "a comma"), (" ", "a space"), ("=", "an equals sign"))
    for follower, name in followers[:4 if key else 3]:
        if "\\" + follower in text:
            return (f"has a backslash before {name}, which InfluxDB 1.x and VictoriaMetrics/Telegraf store "
                    "differently")
    return None


def escape_measurement(text: str) -> str:
    """A measurement name for line protocol."""
    if "\\" in text:
        text = _LP_MEAS_BACKSLASH.sub(r"\\\\", text)
    return _lp_controls(text.replace(",", "\\,").replace(" ", "\\ "))


def escape_string(text: str) -> str:
    """A string field value for line protocol, without the surrounding quotes."""
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if '"' in text:
        text = text.replace('"', '\\"')
    if "\n" in text or "\r" in text:
        text = text.replace("\n", "\\\\n").replace("\r", "\\\\r")
    return text


class _Series:
    """What stays the same across readings of one device: tags, prefix, and a line template."""

    __slots__ = ("keys", "prefix", "qtemplates", "tags", "template", "types")

    def __init__(self, tags: dict[str, str], prefix: str) -> None:
        self.tags = tags
        self.prefix = prefix
        self.keys: tuple[str, ...] = ()
        self.types: tuple[type, ...] = ()
        self.template = ""
        self.qtemplates: dict[str, str] = {}  # the template with a `quality` field, per quality

    def with_quality(self, quality: str) -> str:
        template = self.qtemplates.get(quality)
        if template is None:
            extra = f',quality="{escape_string(quality)}"'.replace("%", "%%")
            template = self.qtemplates[quality] = self.template[: -len(" %d\n")] + extra + " %d\n"
        return template


_TEMPLATE_TYPES = {float: "%r", int: "%di"}


class InfluxEncoder:
    """InfluxDB line protocol, one line per reading.

    Speed: repr() of the floats is most of the cost. A device's readings usually have the same
    field names and types every time, so each device gets a ``%``-template of its whole line,
    filled in one call; anything else (strings, booleans, NaN, a changed field set, a quality
    other than good) takes the general path, which gives the same bytes.
    """

    content_type = "text/plain; charset=utf-8"

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], _Series] = {}
        self._keys: dict[str, str] = {}  # field key -> escaped key followed by "="

    def _series_of(self, reading: Reading) -> _Series:
        key = (reading.device, reading.measurement)
        series = self._series.get(key)
        if series is not None and series.tags == reading.tags:
            return series
        tags = sorted((escape_name(k), escape_name(v)) for k, v in reading.tags.items() if k and v)
        prefix = escape_measurement(reading.measurement) + "".join(f",{k}={v}" for k, v in tags)
        if len(self._series) >= _CACHE_LIMIT:
            self._series.clear()
        series = self._series[key] = _Series(dict(reading.tags), prefix)
        return series

    def _key(self, name: str) -> str:
        escaped = escape_name(name) + "=" if name else ""
        if len(self._keys) >= _CACHE_LIMIT:
            self._keys.clear()
        self._keys[name] = escaped
        return escaped

    def line(self, reading: Reading) -> str:
        """The reading as one line (with its ``\\n``), or ``""`` when it has no field to write."""
        series = self._series_of(reading)
        fields = reading.fields
        if fields:
            keys = tuple(fields)
            values = tuple(fields.values())
            types = tuple(map(type, values))
            if keys != series.keys or types != series.types:
                self._retemplate(series, keys, types)
            if series.template:
                # A template exists only when every value is a float or an int (_TEMPLATE_TYPES).
                numbers = cast(tuple[float, ...], values)
                total = sum(numbers)  # finite iff every value is (or it overflowed: general path)
                if total - total == 0 and (int not in types or (
                        _INT64_MIN <= min(numbers) and max(numbers) <= _INT64_MAX)):
                    quality = reading.quality
                    template = series.template if quality == GOOD else series.with_quality(quality)
                    return template % (*numbers, reading.time_ns)
        return self._general(series.prefix, reading)

    def _retemplate(self, series: _Series, keys: tuple[str, ...], types: tuple[type, ...]) -> None:
        series.keys, series.types = keys, types
        series.qtemplates.clear()
        if not keys or any(t not in _TEMPLATE_TYPES for t in types):
            series.template = ""
            return
        parts = [self._keys.get(k) or self._key(k) for k in keys]
        if not all(parts):  # an empty field key: left out, general path
            series.template = ""
            return
        series.template = (series.prefix.replace("%", "%%") + " "
                           + ",".join(p.replace("%", "%%") + _TEMPLATE_TYPES[t] for p, t in zip(parts, types))
                           + " %d\n")

    def _general(self, prefix: str, reading: Reading) -> str:
        keys = self._keys
        parts = []
        for name, value in reading.fields.items():
            key = keys.get(name)
            if key is None:
                key = self._key(name)
            if not key:
                continue
            kind = type(value)
            if kind is float:
                text = repr(value)
                if text[-1] in "nf":  # nan, inf, -inf: not representable
                    continue
                parts.append(key + text)
            elif kind is bool:
                parts.append(key + ("true" if value else "false"))
            # The exact type, not isinstance (bool is an int); mypy does not narrow through type(), hence the casts.
            elif kind is int:
                integer = cast(int, value)
                if _INT64_MIN <= integer <= _INT64_MAX:
                    parts.append(f"{key}{integer}i")
                else:
                    parts.append(key + repr(float(integer)))
            elif kind is str:
                parts.append(f'{key}"{escape_string(cast(str, value))}"')
            else:
                parts.extend(self._other(key, value))
        if reading.quality != GOOD:
            parts.append(f'quality="{escape_string(reading.quality)}"')
        if not parts:
            return ""
        return f"{prefix} {','.join(parts)} {reading.time_ns}\n"

    @staticmethod
    def _other(key: str, value: object) -> list[str]:
        # Subclasses (IntEnum, numpy scalars): classify by the nearest builtin type.
        if isinstance(value, bool):
            return [key + ("true" if value else "false")]
        if isinstance(value, int):
            return [f"{key}{int(value)}i"] if _INT64_MIN <= value <= _INT64_MAX else [key + repr(float(value))]
        if isinstance(value, float):
            text = repr(float(value))
            return [] if text[-1] in "nf" else [key + text]
        if isinstance(value, str):
            return [f'{key}"{escape_string(str(value))}"']
        return []

    def item(self, reading: Reading) -> bytes:
        return self.line(reading).encode()

    def message(self, items: Sequence[bytes]) -> bytes:
        return b"".join(items)

    def size(self, items_bytes: int, n_items: int) -> int:
        return items_bytes

    def encode(self, readings: Iterable[Reading]) -> bytes:
        """All readings as one payload (no size limit)."""
        return "".join([self.line(r) for r in readings]).encode()


# --------------------------------------------------------------------------- JSON
def _finite(fields: dict[str, FieldValue]) -> dict[str, FieldValue | None]:
    return {k: (None if isinstance(v, float) and v - v != 0 else v) for k, v in fields.items()}


class JsonEncoder:
    """Compact JSON: ``{"gateway":..,"site":..,"readings":[...]}`` (schema in the module docstring)."""

    content_type = "application/json"

    def __init__(self, gateway: str, site: str) -> None:
        self._dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
        self._head = ('{"gateway":' + self._dumps(gateway) + ',"site":' + self._dumps(site)
                      + ',"readings":[').encode()
        self._tail = b"]}"
        self._prefixes: dict[tuple[str, str], tuple[dict[str, str], str]] = {}

    def _prefix(self, reading: Reading) -> str:
        key = (reading.device, reading.measurement)
        cached = self._prefixes.get(key)
        if cached is not None and cached[0] == reading.tags:
            return cached[1]
        dumps = self._dumps
        prefix = (f'{{"device":{dumps(reading.device)},"measurement":{dumps(reading.measurement)},'
                  f'"tags":{dumps(reading.tags)},"time_ns":')
        if len(self._prefixes) >= _CACHE_LIMIT:
            self._prefixes.clear()
        self._prefixes[key] = (dict(reading.tags), prefix)
        return prefix

    def item(self, reading: Reading) -> bytes:
        try:
            fields = self._dumps(reading.fields)
        except ValueError:  # NaN or infinity somewhere
            fields = self._dumps(_finite(reading.fields))
        quality = reading.quality
        quality_json = '"good"' if quality == GOOD else self._dumps(quality)
        return f'{self._prefix(reading)}{reading.time_ns},"quality":{quality_json},"fields":{fields}}}'.encode()

    def message(self, items: Sequence[bytes]) -> bytes:
        return self._head + b",".join(items) + self._tail

    def size(self, items_bytes: int, n_items: int) -> int:
        return len(self._head) + len(self._tail) + items_bytes + max(n_items - 1, 0)

    def encode(self, readings: Iterable[Reading]) -> bytes:
        """All readings as one payload (no size limit)."""
        return self.message([item for item in map(self.item, readings) if item])


def make_encoder(fmt: Literal["influx", "json"], gateway: str, site: str) -> InfluxEncoder | JsonEncoder:
    """The encoder for a sink's ``format`` setting."""
    if fmt == "influx":
        return InfluxEncoder()
    if fmt == "json":
        return JsonEncoder(gateway, site)
    raise ValueError(f"unknown payload format {fmt!r} — use influx or json")
