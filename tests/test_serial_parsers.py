"""Serial-sensor framers and parsers: table tests per format, checksum reference vectors, the
faults that must not poison the next frame, and hypothesis fuzzing of every format (no exception
but FrameError escapes a parser; a decoder's feed never raises)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.serial.framing import CHECKSUMS, FrameError, TextFramer
from drivers.serial.parsers import make_decoder, parse_binary, parse_codes, parse_lines, parse_nmea, parse_scale
from drivers.serial.profile import ProfileModel
from gateway.yamlpos import load_yaml
from simulators.serial_sensor import render_frame
from drivers.serial.parsers import nmea_checksum

PROFILES = Path(__file__).resolve().parent.parent / "config" / "profiles"
SERIAL_PROFILES = ["serial-th-stream", "serial-co2-request", "gps-nmea", "scale-continuous", "pms5003",
                   "barcode-reader", "rfid-em4100"]
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def profile(name: str, **changes: Any) -> ProfileModel:
    doc, errors = load_yaml(PROFILES / f"{name}.yaml")
    assert doc is not None and not errors
    return ProfileModel.model_validate({**doc.data, **changes})


def good(items: list[Any]) -> list[dict[str, Any]]:
    return [i[0] for i in items if not isinstance(i, FrameError)]


def kinds(items: list[Any]) -> list[str]:
    return [i.kind for i in items if isinstance(i, FrameError)]


# --------------------------------------------------------------------------- checksums
@pytest.mark.parametrize(("kind", "value"), [
    ("crc16_modbus", 0x4B37), ("crc16_ccitt", 0x29B1), ("crc16_xmodem", 0x31C3),
    ("sum8", sum(b"123456789") & 0xFF), ("sum16", sum(b"123456789")), ("xor", 0x31),
])
def test_checksum_reference_values(kind: str, value: int) -> None:
    assert CHECKSUMS[kind](b"123456789") == value


# --------------------------------------------------------------------------- nmea
GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
RMC = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"


def test_nmea_gga_and_rmc_reference_sentences() -> None:
    p = profile("gps-nmea", speed_unit="both")
    fields, _ = parse_nmea(p, GGA)
    assert fields == {"fix_quality": 1, "satellites": 8, "latitude": pytest.approx(48.1173),
                      "longitude": pytest.approx(11.5166667), "hdop": 0.9, "altitude": 545.4}
    fields, _ = parse_nmea(p, RMC)
    assert fields["speed_knots"] == 22.4 and fields["speed_kmh"] == pytest.approx(41.485, abs=1e-3)
    assert fields["course"] == 84.4 and fields["latitude"] == pytest.approx(48.1173)


@pytest.mark.parametrize(("sentence", "expected"), [
    (b"$GNGGA,000000,3351.000,S,15112.000,W,2,12,0.7,10.0,M,,M,,", {"latitude": -33.85, "longitude": -151.2}),
    (b"$GPGGA,000000,,,,,0,00,,,M,,M,,", {"fix_quality": 0, "satellites": 0}),
    (b"$GPRMC,000000,V,,,,,,,010100,,,N", {}),
    (b"$GPGSV,3,1,11,03,03,111,00", {}),
])
def test_nmea_sign_no_fix_and_other_sentences(sentence: bytes, expected: dict[str, Any]) -> None:
    body = sentence[1:].decode()

    fields, _ = parse_nmea(profile("gps-nmea"), sentence + f"*{nmea_checksum(body)}".encode())
    assert {k: fields[k] for k in expected} == expected if expected else fields == {}


@pytest.mark.parametrize("bad", [GGA[:-2] + b"48", GGA.replace(b"545.4", b"545.5"), GGA[:-3]])
def test_nmea_checksum_failures_are_rejected(bad: bytes) -> None:
    with pytest.raises(FrameError) as exc:
        parse_nmea(profile("gps-nmea"), bad)
    assert exc.value.kind == "checksum"


# --------------------------------------------------------------------------- lines, scale, codes
def test_lines_types_scale_and_valid_range() -> None:
    p = profile("serial-th-stream")
    rx = re.compile(p.pattern or "")
    assert parse_lines(p, rx, b"T=-3.5C RH=81.0%") == ({"temperature": -3.5, "humidity": 81.0}, [])
    assert parse_lines(p, rx, b"T=99.0C RH=81.0%") == ({"humidity": 81.0}, ["temperature"])
    with pytest.raises(FrameError):
        parse_lines(p, rx, b"T=3.5C RH=8")


@pytest.mark.parametrize(("line", "expected"), [
    (b"ST,GS,+0012.345kg", {"weight": 12.345, "stable": True, "net": False, "unit": "kg", "overload": False}),
    (b"US,NT,-0001.500 kg", {"weight": -1.5, "stable": False, "net": True, "unit": "kg", "overload": False}),
    (b"OL,GS,+9999.999kg", {"overload": True, "stable": False}),
])
def test_scale_lines(line: bytes, expected: dict[str, Any]) -> None:
    p = profile("scale-continuous")
    assert parse_scale(p, re.compile(p.pattern or ""), line)[0] == expected


def test_scale_only_stable_drops_moving_weights() -> None:
    p = profile("scale-continuous", only_stable=True)
    assert parse_scale(p, re.compile(p.pattern or ""), b"US,GS,+0012.345kg") == ({}, [])


def test_codes_strip_and_pattern() -> None:
    p = profile("rfid-em4100")
    assert parse_codes(p, re.compile(p.pattern or ""), b"\x020F00A1B2C3D4") == ({"code": "0F00A1B2C3D4"}, [])
    with pytest.raises(FrameError):
        parse_codes(p, re.compile(p.pattern or ""), b"\x02zz")


# --------------------------------------------------------------------------- binary
def test_binary_frame_fields_and_checksum() -> None:
    p = profile("pms5003")
    frame = render_frame(p, {"pm1_0": 3, "pm2_5": 12, "pm10": 20, "particles_0_3um": 1500})
    assert good(make_decoder(p).feed(frame, 0)) == [{"pm1_0": 3, "pm2_5": 12, "pm10": 20, "particles_0_3um": 1500}]
    bad = render_frame(p, {"pm2_5": 99}, bad_checksum=True)
    out = make_decoder(p).feed(bad + frame, 0)
    assert kinds(out) == ["checksum"] and good(out)[0]["pm2_5"] == 12


@pytest.mark.parametrize(("ctype", "order"), [("sum8", None), ("xor", None), ("crc16_modbus", None),
                                              ("crc16_ccitt", None), ("crc16_modbus", "ABCD")])
def test_binary_every_checksum_and_byte_order(ctype: str, order: str | None) -> None:
    size = 13 + (1 if ctype in ("sum8", "xor") else 2)
    p = ProfileModel.model_validate({
        "protocol": "serial", "format": "binary", "header": "AA 55", "frame_length": size,
        "checksum": {"type": ctype, "start": 2, **({"byte_order": order} if order else {})},
        "fields": {"a": {"byte": 2, "type": "int16", "byte_order": "DCBA"},
                   "b": {"byte": 4, "type": "float32", "byte_order": "CDAB", "scale": 2},
                   "c": {"byte": 8, "type": "uint32", "byte_order": "BADC"},
                   "flag": {"byte": 12, "type": "uint8", "bit": 3}}})
    frame = render_frame(p, {"a": -2, "b": 5.0, "c": 0x01020304, "flag": True})
    assert len(frame) == size
    assert good(make_decoder(p).feed(frame, 0)) == [{"a": -2, "b": 5.0, "c": 0x01020304, "flag": True}]
    corrupt = bytearray(frame)
    corrupt[3] ^= 0x01
    assert kinds(make_decoder(p).feed(bytes(corrupt), 0)) == ["checksum"]


def test_binary_truncated_frame_costs_only_itself() -> None:
    p = profile("pms5003")
    frame = render_frame(p, {"pm2_5": 7})
    dec = make_decoder(p)
    out = dec.feed(frame[:9] + frame, 0) + dec.feed(b"", 5.0)  # nothing more comes: resolve the buffer
    assert [f["pm2_5"] for f in good(out)] == [7]
    assert "checksum" in kinds(out) or "truncated" in kinds(out)


# --------------------------------------------------------------------------- framing faults
def test_text_framer_garbage_partial_overlong_do_not_poison() -> None:
    framer = TextFramer(b"\n", 32, 0.5)
    assert framer.feed(b"T=1", 0.0) == []
    out = framer.feed(b"x" * 40, 0.1)  # an overlong line in the making: reported once
    assert [o.kind for o in out if isinstance(o, FrameError)] == ["overlong"]
    assert framer.feed(b"y" * 40, 0.2) == []
    assert framer.feed(b"\nT=2\n", 0.3) == [b"T=2"]  # the skip ends at the delimiter
    assert framer.feed(b"T=3 part", 0.4) == []
    out = framer.feed(b"T=4\r\n", 2.0)  # the partial line was truncated long ago
    assert [o.kind if isinstance(o, FrameError) else o for o in out] == ["truncated", b"T=4"]
    assert framer.pending == 0


@pytest.mark.parametrize("name", SERIAL_PROFILES)
@FUZZ
@given(junk=st.binary(max_size=600))
def test_fuzz_junk_then_a_good_frame(name: str, junk: bytes) -> None:
    """Whatever came before, the next good frame after a delimiter (text) or a pause (binary)
    is read; feed never raises."""
    p = profile(name)
    values = {"temperature": 4.5, "humidity": 80.0, "co2": 420, "weight": 7.25, "stable": True, "net": False,
              "unit": "kg", "code": "0F00A1B2C3D4" if name == "rfid-em4100" else "4006381333931",
              "latitude": 52.1, "longitude": -5.25, "altitude": 3.0, "speed_knots": 1.0, "course": 90.0,
              "fix_quality": 1, "satellites": 7, "hdop": 1.1, "pm1_0": 1, "pm2_5": 2, "pm10": 3, "particles_0_3um": 4}
    frame = render_frame(p, values, now=0)
    expected = good(make_decoder(p).feed(frame, 0))[-1]
    dec = make_decoder(p)
    if p.format == "binary":
        out = dec.feed(junk, 0) + dec.feed(b"", 1.0) + dec.feed(frame, 1.0) + dec.feed(b"", 9.0)
    else:
        delim = b"\n" if p.format == "nmea" else p.delimiter.encode("latin-1")
        out = dec.feed(junk, 0) + dec.feed(delim, 0) + dec.feed(frame, 0)
    assert good(out)[-1] == expected


@pytest.mark.parametrize("name", SERIAL_PROFILES)
@FUZZ
@given(chunks=st.lists(st.binary(max_size=80), max_size=12), gap=st.floats(0, 1))
def test_fuzz_decoder_feed_never_raises(name: str, chunks: list[bytes], gap: float) -> None:
    dec = make_decoder(profile(name))
    now = 0.0
    for chunk in chunks:
        now += gap
        for item in dec.feed(chunk, now):
            assert isinstance(item, FrameError) or isinstance(item[0], dict)
    assert dec.framer.pending <= profile(name).max_frame + 80


@FUZZ
@given(data=st.binary(max_size=200), text=st.text(max_size=120))
def test_fuzz_parsers_raise_only_frame_error(data: bytes, text: str) -> None:
    lines, scale, codes = profile("serial-th-stream"), profile("scale-continuous"), profile("barcode-reader")
    nmea, binary = profile("gps-nmea"), profile("pms5003")
    calls = [lambda f: parse_lines(lines, re.compile(lines.pattern or ""), f),
             lambda f: parse_scale(scale, re.compile(scale.pattern or ""), f),
             lambda f: parse_codes(codes, re.compile(codes.pattern or ""), f),
             lambda f: parse_nmea(nmea, f), lambda f: parse_binary(binary, f)]
    for frame in (data, text.encode("utf-8", "replace"), b"$GPGGA," + data, b"$GPRMC,123519,A," + data):
        for call in calls:
            try:
                call(frame)
            except FrameError:
                pass
