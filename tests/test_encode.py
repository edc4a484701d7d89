"""Payload encoders: escaping tables, a strict line-protocol parse-back, the JSON schema."""

from __future__ import annotations

import json
import math
import struct

import pytest

from gateway.encode import InfluxEncoder, JsonEncoder, escape_measurement, escape_name, escape_string
from gateway.reading import GOOD, UNCERTAIN, Reading

T = 1_760_000_000_123_456_789


# --------------------------------------------------------------------------- a strict parser
def _scan(text: str, pos: int, stops: str, specials: str) -> tuple[str, int]:
    """Read up to an unescaped char in ``stops``; ``\\x`` is x for x in specials, else literal."""
    out = []
    while pos < len(text) and text[pos] not in stops:
        ch = text[pos]
        if ch == "\n":
            raise ValueError(f"raw newline at {pos}")
        if ch == "\\" and pos + 1 < len(text) and text[pos + 1] in specials:
            out.append(text[pos + 1])
            pos += 2
            continue
        out.append(ch)
        pos += 1
    return "".join(out), pos


def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, object], int]:
    """Strict InfluxDB line protocol for one line (ending in \\n); raises ValueError when invalid."""
    if not line.endswith("\n") or "\n" in line[:-1]:
        raise ValueError("one line, ending in a newline")
    text = line[:-1]
    measurement, pos = _scan(text, 0, ", ", ", \\")
    if not measurement:
        raise ValueError("empty measurement")
    tags: dict[str, str] = {}
    while text[pos] == ",":
        key, pos = _scan(text, pos + 1, "=, ", ",= \\")
        if text[pos] != "=":
            raise ValueError(f"tag without '=' at {pos}")
        value, pos = _scan(text, pos + 1, "=, ", ",= \\")
        if not key or not value:
            raise ValueError("empty tag key or value")
        if text[pos] == "=":
            raise ValueError(f"unescaped '=' in tag value at {pos}")
        tags[key] = value
    if list(tags) != sorted(tags):
        raise ValueError("tags not sorted by key")
    if text[pos] != " ":
        raise ValueError(f"expected a space before the fields at {pos}")
    fields: dict[str, object] = {}
    sep = ","
    while sep == ",":
        key, pos = _scan(text, pos + 1, "=, ", ",= \\")
        if not key or text[pos] != "=":
            raise ValueError(f"bad field key at {pos}")
        pos += 1
        if text[pos] == '"':
            out = []
            pos += 1
            while text[pos] != '"':
                if text[pos] == "\\" and text[pos + 1] in '"\\':
                    pos += 1
                out.append(text[pos])
                pos += 1
            fields[key] = "".join(out)
            pos += 1
        else:
            raw, pos = _scan(text, pos, ", ", "")
            if raw in ("true", "false"):
                fields[key] = raw == "true"
            elif raw.endswith("i"):
                fields[key] = int(raw[:-1])
            else:
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError(f"non-finite float {raw}")
                fields[key] = value
        sep = text[pos]
    if sep != " ":
        raise ValueError(f"expected a space before the timestamp at {pos}")
    stamp = text[pos + 1:]
    if not stamp.isdigit():
        raise ValueError(f"bad timestamp {stamp!r}")
    return measurement, tags, fields, int(stamp)


# --------------------------------------------------------------------------- escaping tables
@pytest.mark.parametrize(("raw", "name", "measurement"), [
    ("plain", "plain", "plain"),
    ("a b", r"a\ b", r"a\ b"),
    ("a,b", r"a\,b", r"a\,b"),
    ("a=b", r"a\=b", "a=b"),
    ("C:\\temp", "C:\\temp", "C:\\temp"),  # a lone backslash passes unchanged
    ("end\\", "end\\\\", "end\\\\"),  # ... except where it would escape the separator
    ("a\\ b", "a\\\\\\ b", "a\\\\\\ b"),
    ("two\nlines", "two\\nlines", "two\\nlines"),
    ("cr\r", "cr\\r", "cr\\r"),
    ("温室一号", "温室一号", "温室一号"),
    ('q"uote', 'q"uote', 'q"uote'),
])
def test_name_escaping(raw: str, name: str, measurement: str) -> None:
    assert escape_name(raw) == name
    assert escape_measurement(raw) == measurement


@pytest.mark.parametrize(("raw", "escaped"), [
    ("plain", "plain"),
    ('say "hi"', 'say \\"hi\\"'),
    ("back\\slash", "back\\\\slash"),
    ("ends\\", "ends\\\\"),
    ("two\nlines", "two\\\\nlines"),
    ("a b,c=d", "a b,c=d"),
    ("温度", "温度"),
])
def test_string_value_escaping(raw: str, escaped: str) -> None:
    assert escape_string(raw) == escaped


@pytest.mark.parametrize(("value", "text"), [
    (1.5, "1.5"),
    (0.1, "0.1"),
    (1.0, "1.0"),
    (-0.0, "-0.0"),
    (1e20, "1e+20"),
    (2.5e-8, "2.5e-08"),
    (struct.unpack(">f", struct.pack(">f", 23.1))[0], "23.100000381469727"),
    (7, "7i"),
    (-(2**63), f"{-(2**63)}i"),
    (2**64 - 1, "1.8446744073709552e+19"),  # outside int64: written as a float
    (True, "true"),
    (False, "false"),
    ("x", '"x"'),
])
def test_field_values(value: object, text: str) -> None:
    line = InfluxEncoder().line(Reading("d", T, {"v": value}, {}, measurement="m"))  # type: ignore[dict-item]
    assert line == f"m v={text} {T}\n"


def test_tags_sorted_empty_omitted_quality_only_when_not_good() -> None:
    enc = InfluxEncoder()
    tags = {"site": "s", "device": "d1", "empty": "", "": "x", "b": "2"}
    good = Reading("d1", T, {"t": 1.5}, tags, measurement="m")
    assert enc.line(good) == f"m,b=2,device=d1,site=s t=1.5 {T}\n"
    bad = Reading("d1", T, {"t": 1.5}, tags, quality=UNCERTAIN, measurement="m")
    assert enc.line(bad) == f'm,b=2,device=d1,site=s t=1.5,quality="uncertain" {T}\n'


def test_non_finite_dropped_and_empty_reading_skipped() -> None:
    enc = InfluxEncoder()
    r = Reading("d", T, {"a": math.nan, "b": 2.0, "c": -math.inf, "d": math.inf}, {}, measurement="m")
    assert enc.line(r) == f"m b=2.0 {T}\n"
    assert enc.line(Reading("d", T, {"a": math.nan}, {}, measurement="m")) == ""
    assert enc.item(Reading("d", T, {}, {}, measurement="m")) == b""
    # not good and nothing else: the quality alone is still worth a point
    assert enc.line(Reading("d", T, {}, {}, quality=UNCERTAIN, measurement="m")) == f'm quality="uncertain" {T}\n'


def test_fast_path_and_general_path_agree() -> None:
    """The per-device template must give the same bytes as the general path, whatever changes."""
    enc = InfluxEncoder()
    readings = [
        Reading("d", T, {"a": 1.5, "b": 2}, {"x": "1"}, measurement="m%s"),
        Reading("d", T + 1, {"a": 2.5, "b": 3}, {"x": "1"}, measurement="m%s"),
        Reading("d", T + 2, {"a": math.nan, "b": 3}, {"x": "1"}, measurement="m%s"),
        Reading("d", T + 3, {"a": 2.5, "b": 2**63}, {"x": "1"}, measurement="m%s"),
        Reading("d", T + 4, {"b": 1, "a": 0.5}, {"x": "1"}, measurement="m%s"),
        Reading("d", T + 5, {"a": 1.0, "b": True}, {"x": "2"}, measurement="m%s"),
        Reading("d", T + 6, {"%d": 1.0}, {"x": "2"}, measurement="m%s"),
    ]
    # The template (fast) path against the general one: two internals of one encoder, compared.
    for r in readings:
        prefix = enc._series_of(r).prefix  # noqa: SLF001 - see above
        assert enc.line(r) == enc._general(prefix, r)  # noqa: SLF001 - see above
    assert enc.line(readings[1]) == f"m%s,x=1 a=2.5,b=3i {T + 1}\n"
    assert enc.line(readings[3]) == f"m%s,x=1 a=2.5,b=9.223372036854776e+18 {T + 3}\n"


NASTY = ["plain", "a b", "a,b", "a=b", "C:\\temp", "end\\", "x\\,y", "two\nlines", "温室 一号", 'q"', "\\"]


def test_parse_back_nasty_names_and_values() -> None:
    enc = InfluxEncoder()
    for i, text in enumerate(NASTY):
        tags = {text: text, "device": f"dev{i}"}
        fields: dict[str, object] = {text: 1.25, "s": text, "n": i, "ok": i % 2 == 0}
        r = Reading(f"dev{i}", T + i, fields, tags, measurement=text)  # type: ignore[arg-type]
        line = enc.line(r)
        measurement, got_tags, got_fields, stamp = parse_line(line)
        # newlines come back as the two characters backslash-n (documented in gateway.encode)
        shown = text.replace("\n", "\\n")
        assert measurement == shown
        assert got_tags == {shown: shown, "device": f"dev{i}"}
        assert got_fields == {shown: 1.25, "s": shown, "n": i, "ok": i % 2 == 0}
        assert stamp == T + i


def test_floats_round_trip_exactly() -> None:
    enc = InfluxEncoder()
    values = [0.1, 1 / 3, 5e-324, 1.7976931348623157e308, -123456.789e-10,
              struct.unpack(">f", b"\x41\xb8\xcc\xcd")[0]]
    payload = enc.encode(Reading("d", T + i, {"v": v}, {"device": "d"}, measurement="m") for i, v in enumerate(values))
    lines = payload.decode().splitlines(keepends=True)
    assert [parse_line(line)[2]["v"] for line in lines] == values


def test_utf8_payload() -> None:
    payload = InfluxEncoder().encode([Reading("温室", T, {"温度": 21.5}, {"device": "温室"}, measurement="环境")])
    assert payload == f"环境,device=温室 温度=21.5 {T}\n".encode()


# --------------------------------------------------------------------------- JSON
def test_json_schema() -> None:
    enc = JsonEncoder("gw-1", "farm")
    readings = [
        Reading("d1", T, {"t": 21.5, "on": True, "n": 3, "s": 'a"b', "bad": math.nan}, {"device": "d1"},
                measurement="env"),
        Reading("温室", T + 1, {"t": 1.0}, {"device": "温室"}, quality=UNCERTAIN, measurement="env"),
    ]
    payload = enc.encode(readings)
    assert "温室".encode() in payload  # UTF-8, not \\u escapes
    assert b" " not in payload  # compact
    doc = json.loads(payload)
    assert doc == {"gateway": "gw-1", "site": "farm", "readings": [
        {"device": "d1", "measurement": "env", "tags": {"device": "d1"}, "time_ns": T, "quality": GOOD,
         "fields": {"t": 21.5, "on": True, "n": 3, "s": 'a"b', "bad": None}},
        {"device": "温室", "measurement": "env", "tags": {"device": "温室"}, "time_ns": T + 1,
         "quality": UNCERTAIN, "fields": {"t": 1.0}},
    ]}


@pytest.mark.parametrize("encoder", [InfluxEncoder(), JsonEncoder("g", "s")], ids=["influx", "json"])
def test_size_is_exact(encoder: InfluxEncoder | JsonEncoder) -> None:
    items = [encoder.item(Reading(f"d{i}", T, {"v": float(i)}, {"device": f"d{i}"})) for i in range(5)]
    for n in range(1, 6):
        assert len(encoder.message(items[:n])) == encoder.size(sum(map(len, items[:n])), n)


def test_template_path_with_a_quality_matches_the_general_path() -> None:
    enc = InfluxEncoder()
    tags = {"device": "d 1", "site": "s"}
    for quality in ("uncertain", "clock_unsynced", "good", "clock_unsynced"):
        reading = Reading("d 1", 1_700_000_000_000_000_000, {"a": 1.5, "b": 7, "c%": 2.25}, tags, quality, "m")
        fast = enc.line(reading)
        assert fast == enc._general(enc._series_of(reading).prefix, reading)  # noqa: SLF001 - the fast path against the general one
        assert ('quality="' in fast) is (quality != "good")
