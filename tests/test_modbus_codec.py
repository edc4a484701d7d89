"""Codec tables: hand-written register words -> values for every type and byte order, and back."""

from __future__ import annotations

import math
import struct

import pytest

from drivers.modbus.codec import RequestDecoder, encode, encode_into, mbap_request, mbap_split, read_reply_data
from drivers.modbus.errors import ModbusExceptionResponse, ModbusProtocolError
from drivers.modbus.planner import plan
from drivers.modbus.profile import Point
import random
from gateway.reading import shortest_float32

OMITTED = object()  # the point is left out of the reading (NaN, ±inf, outside valid range)

WIDTH = {"bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2,
         "int64": 4, "uint64": 4, "float64": 4}


def point(type_: str, order: str = "ABCD", *, kind: str = "holding", address: int = 0, width: int | None = None,
          **kw: object) -> Point:
    return Point("v", kind, address, width or WIDTH.get(type_, 1), type_, order, **kw)  # type: ignore[arg-type]


def decode(p: Point, words: list[int]) -> object:
    (request,) = plan([p])
    out: dict[str, object] = {}
    invalid = RequestDecoder(request).decode(struct.pack(f">{len(words)}H", *words), out)  # type: ignore[arg-type]
    if invalid:
        assert "v" not in out and invalid == ["v"]
        return OMITTED
    return out["v"]


# (type, byte order, words on the wire, value). Words are written out by hand from the manuals'
# tables, never produced by our encoder, so an encoder/decoder pair cannot agree on a wrong order.
TABLE = [
    # 16-bit: ABCD/CDAB read AB, BADC/DCBA read BA
    ("int16", "ABCD", [0xFFFF], -1),
    ("int16", "ABCD", [0x8000], -32768),
    ("int16", "ABCD", [0x7FFF], 32767),
    ("int16", "CDAB", [0xFF85], -123),
    ("int16", "BADC", [0x0080], -32768),
    ("int16", "DCBA", [0x85FF], -123),
    ("uint16", "ABCD", [0xFFFF], 65535),
    ("uint16", "BADC", [0x3412], 0x1234),
    ("uint16", "CDAB", [0x1234], 0x1234),
    # 32-bit integers
    ("int32", "ABCD", [0x1234, 0x5678], 0x12345678),
    ("int32", "CDAB", [0x5678, 0x1234], 0x12345678),
    ("int32", "BADC", [0x3412, 0x7856], 0x12345678),
    ("int32", "DCBA", [0x7856, 0x3412], 0x12345678),
    ("int32", "ABCD", [0xFFFF, 0xFFFE], -2),
    ("int32", "CDAB", [0xFFFE, 0xFFFF], -2),
    ("int32", "BADC", [0xFFFF, 0xFEFF], -2),
    ("int32", "DCBA", [0xFEFF, 0xFFFF], -2),
    ("int32", "ABCD", [0x8000, 0x0000], -(2**31)),
    ("uint32", "ABCD", [0xFFFF, 0xFFFF], 2**32 - 1),
    ("uint32", "CDAB", [0x0001, 0x0000], 1),
    ("uint32", "CDAB", [0x86A0, 0x0001], 100_000),
    # float32: 1.5 = 0x3FC00000, -2.5 = 0xC0200000
    ("float32", "ABCD", [0x3FC0, 0x0000], 1.5),
    ("float32", "CDAB", [0x0000, 0x3FC0], 1.5),
    ("float32", "BADC", [0xC03F, 0x0000], 1.5),
    ("float32", "DCBA", [0x0000, 0xC03F], 1.5),
    ("float32", "ABCD", [0xC020, 0x0000], -2.5),
    ("float32", "CDAB", [0x0000, 0xC020], -2.5),
    ("float32", "ABCD", [0x4366, 0x4CCD], 230.3),  # the shortest decimal that is this float32
    ("float32", "ABCD", [0x7FC0, 0x0000], OMITTED),  # NaN
    ("float32", "CDAB", [0x0000, 0x7FC0], OMITTED),
    ("float32", "ABCD", [0x7F80, 0x0000], OMITTED),  # +inf: no line protocol or JSON can carry it
    ("float32", "ABCD", [0xFF80, 0x0000], OMITTED),  # -inf
    ("float32", "ABCD", [0x0000, 0x0000], 0.0),
    # 64-bit: ABCDEFGH, HGFEDCBA, BADCFEHG, GHEFCDAB
    ("int64", "ABCD", [0x0102, 0x0304, 0x0506, 0x0708], 0x0102030405060708),
    ("int64", "DCBA", [0x0807, 0x0605, 0x0403, 0x0201], 0x0102030405060708),
    ("int64", "BADC", [0x0201, 0x0403, 0x0605, 0x0807], 0x0102030405060708),
    ("int64", "CDAB", [0x0708, 0x0506, 0x0304, 0x0102], 0x0102030405060708),
    ("int64", "ABCD", [0x8000, 0x0000, 0x0000, 0x0000], -(2**63)),
    ("int64", "ABCD", [0x7FFF, 0xFFFF, 0xFFFF, 0xFFFF], 2**63 - 1),
    ("int64", "CDAB", [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF], -1),
    ("int64", "CDAB", [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF], -2),
    ("uint64", "ABCD", [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF], 2**64 - 1),
    ("uint64", "CDAB", [0x0000, 0x0000, 0x0000, 0x8000], 2**63),
    ("uint64", "DCBA", [0x0100, 0x0000, 0x0000, 0x0000], 1),
    # float64: 1.5 = 0x3FF8000000000000, -0.1 = 0xBFB999999999999A
    ("float64", "ABCD", [0x3FF8, 0x0000, 0x0000, 0x0000], 1.5),
    ("float64", "CDAB", [0x0000, 0x0000, 0x0000, 0x3FF8], 1.5),
    ("float64", "BADC", [0xF83F, 0x0000, 0x0000, 0x0000], 1.5),
    ("float64", "DCBA", [0x0000, 0x0000, 0x0000, 0xF83F], 1.5),
    ("float64", "ABCD", [0xBFB9, 0x9999, 0x9999, 0x999A], -0.1),
    ("float64", "CDAB", [0x999A, 0x9999, 0x9999, 0xBFB9], -0.1),
    ("float64", "ABCD", [0x7FF8, 0x0000, 0x0000, 0x0000], OMITTED),  # NaN
    ("float64", "ABCD", [0x7FF0, 0x0000, 0x0000, 0x0000], OMITTED),  # +inf
    ("float64", "ABCD", [0x7FEF, 0xFFFF, 0xFFFF, 0xFFFF], 1.7976931348623157e308),
]


@pytest.mark.parametrize(("type_", "order", "words", "value"), TABLE,
                         ids=[f"{t}-{o}-{'-'.join(f'{w:04x}' for w in ws)}" for t, o, ws, _v in TABLE])
def test_decode(type_: str, order: str, words: list[int], value: object) -> None:
    got = decode(point(type_, order), words)
    assert got == value if value is not OMITTED else got is OMITTED
    if value is not OMITTED:
        assert type(got) is type(value)  # ints stay ints, floats are floats


@pytest.mark.parametrize(("type_", "order", "words", "value"), [row for row in TABLE if row[3] is not OMITTED],
                         ids=[f"{t}-{o}-{v}" for t, o, _w, v in TABLE if v is not OMITTED])
def test_encode_is_the_inverse(type_: str, order: str, words: list[int], value: object) -> None:
    assert encode(point(type_, order), value) == words  # type: ignore[arg-type]


@pytest.mark.parametrize(("words", "order", "length", "value"), [
    ([0x5344, 0x4D36, 0x3330, 0x0000], "ABCD", 4, "SDM630"),          # trailing NULs stripped
    ([0x4142, 0x2020, 0x2020], "ABCD", 3, "AB"),                       # trailing spaces stripped
    ([0x4142, 0x4300, 0x2000], "ABCD", 3, "ABC"),                      # NUL then space
    ([0x4142, 0x0043, 0x4400], "ABCD", 3, "AB"),                       # ends at the first NUL
    ([0x4453, 0x364D, 0x3033], "BADC", 3, "SDM630"),                   # low byte first
    ([0x2041, 0x4200], "ABCD", 2, " AB"),                              # leading space kept
    ([0x0000, 0x0000], "ABCD", 2, ""),
])
def test_strings(words: list[int], order: str, length: int, value: str) -> None:
    p = point("string", order, width=length)
    assert decode(p, words) == value
    assert decode(p, encode(p, value)) == value  # type: ignore[arg-type]
    assert type(decode(p, words)) is str


@pytest.mark.parametrize(("word", "bit", "order", "value"), [
    (0x0008, 3, "ABCD", True),
    (0x0008, 2, "ABCD", False),
    (0x8000, 15, "ABCD", True),
    (0x0001, 0, "ABCD", True),
    (0xFFFE, 0, "ABCD", False),
    (0x0800, 3, "BADC", True),  # bit 3 in the low byte, which the device sends first
])
def test_register_bits(word: int, bit: int, order: str, value: bool) -> None:
    p = point("bool", order, bit=bit)
    got = decode(p, [word])
    assert got is value
    table: dict[int, int] = {0: 0x5AA5 & ~(1 << bit) if order == "ABCD" else 0}
    encode_into(table, p, value)
    assert decode(p, [table[0]]) is value


def test_register_bits_keep_the_others() -> None:
    table: dict[int, int] = {}
    for bit in (0, 3, 15):
        encode_into(table, point("bool", bit=bit), True)
    assert table == {0: 0x8009}
    encode_into(table, point("bool", bit=3), False)
    assert table == {0: 0x8001}


@pytest.mark.parametrize(("type_", "words", "scale", "offset", "value"), [
    ("int16", [0xFF85], 0.1, 0.0, -12.3),        # exactly -12.3, not -12.300000000000001
    ("uint16", [2351], 0.1, 0.0, 235.1),
    ("uint16", [3], 0.1, 0.0, 0.3),               # 3 * 0.1 would be 0.30000000000000004
    ("uint16", [650], 0.1, -40.0, 25.0),
    ("int16", [12345], 0.01, 0.0, 123.45),
    ("uint16", [7], 2.0, 0.0, 14.0),              # scaled ints become floats
    ("int32", [0xFFFF, 0xFFFE], 0.5, 1.0, 0.0),
    ("float32", [0x3FC0, 0x0000], 1000.0, 0.0, 1500.0),
    ("float32", [0x3FC0, 0x0000], 1.0, -1.0, 0.5),
    ("uint16", [1234], 1.0, 0.0, 1234),           # scale 1 offset 0: stays an int
])
def test_scale_and_offset(type_: str, words: list[int], scale: float, offset: float, value: float) -> None:
    p = point(type_, scale=scale, offset=offset)
    got = decode(p, words)
    assert got == value and type(got) is type(value)
    if type_ != "float32":
        assert encode(p, value) == words


@pytest.mark.parametrize(("words", "lo", "hi", "value"), [
    ([2351], 0.0, 500.0, 235.1),
    ([5001], 0.0, 500.0, OMITTED),
    ([0xFFFF], 0.0, None, OMITTED),   # -0.1 below min
    ([0xFFFF], None, 0.0, -0.1),
    ([0], 0.0, 0.0, 0.0),             # bounds are inclusive
])
def test_valid_range(words: list[int], lo: float | None, hi: float | None, value: object) -> None:
    got = decode(point("int16", scale=0.1, min=lo, max=hi), words)
    assert got == value if value is not OMITTED else got is OMITTED


def test_coils_and_discrete_bits() -> None:
    points = [Point(f"c{i}", "coil", a, 1, "bool") for i, a in enumerate((0, 1, 2, 9, 15, 16))]
    (request,) = plan(points)
    assert (request.address, request.count) == (0, 17)
    out: dict[str, object] = {}
    # coil 0 is the lowest bit of the first byte: 0b0000_0101, 0b1000_0010, 0b0000_0001
    assert RequestDecoder(request).decode(bytes([0x05, 0x82, 0x01]), out) == []
    assert out == {"c0": True, "c1": False, "c2": True, "c3": True, "c4": True, "c5": True}
    assert encode(points[0], True) == [True]


def test_one_request_decodes_mixed_orders_and_overlaps() -> None:
    pts = [
        Point("f_abcd", "holding", 0, 2, "float32"),
        Point("f_cdab", "holding", 2, 2, "float32", "CDAB"),
        Point("i_badc", "holding", 4, 2, "int32", "BADC"),
        Point("i_dcba", "holding", 6, 2, "int32", "DCBA"),
        Point("hi_word", "holding", 0, 1, "uint16"),          # overlaps f_abcd
        Point("flag", "holding", 8, 1, "bool", bit=1),
        Point("flag_again", "holding", 8, 1, "bool", bit=1),  # same slot, two names
        Point("raw", "holding", 8, 1, "int16"),
        Point("name", "holding", 10, 2, "string"),
    ]
    (request,) = plan(pts, max_gap=1)
    words = [0x3FC0, 0x0000, 0x0000, 0xC020, 0xFFFF, 0xFEFF, 0xFEFF, 0xFFFF, 0x0002, 0x0000, 0x4F4B, 0x0000]
    out: dict[str, object] = {}
    assert RequestDecoder(request).decode(struct.pack(">12H", *words), out) == []
    assert out == {"f_abcd": 1.5, "f_cdab": -2.5, "i_badc": -2, "i_dcba": -2, "hi_word": 0x3FC0,
                   "flag": True, "flag_again": True, "raw": 2, "name": "OK"}


@pytest.mark.parametrize(("type_", "value"), [("int16", 40000), ("uint16", -1), ("int64", 2**63),
                                              ("uint32", 2**32), ("int32", math.nan)])
def test_encode_refuses_values_that_do_not_fit(type_: str, value: float) -> None:
    with pytest.raises(ValueError, match="v:"):
        encode(point(type_), value)


def test_shortest_float32_is_the_same_float32_and_never_longer() -> None:
    rng = random.Random(7)
    for _ in range(20_000):
        bits = rng.getrandbits(32)
        raw = struct.unpack("<f", struct.pack("<I", bits))[0]
        if raw != raw or raw in (float("inf"), float("-inf")):
            continue
        short = shortest_float32(raw)
        assert struct.pack("<f", short) == struct.pack("<f", raw), (hex(bits), raw, short)
        assert len(repr(short)) <= len(repr(raw))
    assert shortest_float32(struct.unpack(">f", bytes.fromhex("43664ccd"))[0]) == 230.3


# ---------------------------------------------------------------- one read transaction's frames
def test_mbap_request_and_split() -> None:
    assert mbap_request(7, 1, 3, 0x6B, 3) == bytes.fromhex("0007 0000 0006 01 03 006B 0003")
    reply = bytes.fromhex("0007 0000 0007 01 03 04 0001 0002")
    buf = bytearray(reply[:8])
    assert mbap_split(buf) is None  # header there, PDU not yet
    buf += reply[8:] + b"\x00\x08"  # and the start of the next frame
    assert mbap_split(buf) == (7, len(reply))
    assert mbap_split(b"\x00\x07\x00") is None
    with pytest.raises(ModbusProtocolError, match="invalid MBAP header 0007000100070103"):
        mbap_split(bytes.fromhex("0007 0001 0007 01 03 04"))  # protocol id 1
    with pytest.raises(ModbusProtocolError, match="invalid MBAP header"):
        mbap_split(bytes.fromhex("0007 0000 0100 01 03 04"))  # longer than any PDU


@pytest.mark.parametrize(("pdu", "function", "count", "result"), [
    ("03 04 0001 0002", 3, 2, bytes.fromhex("0001 0002")),
    ("01 02 05 01", 1, 10, bytes.fromhex("05 01")),
    ("83 02", 3, 2, ModbusExceptionResponse),
    ("03 02 0001", 3, 2, r"reply carries 2 data bytes \(byte count 2\), expected 4"),
    ("03 05 0001 0002", 3, 2, r"reply carries 4 data bytes \(byte count 5\), expected 4"),
    ("04 04 0001 0002", 3, 2, "reply has function code 4, expected 3"),
    ("83", 3, 2, "reply has function code 131, expected 3"),
    ("03", 3, 2, "reply stops after its function code, expected 4 data bytes"),
])
def test_read_reply_data(pdu: str, function: int, count: int, result: object) -> None:
    data = bytes.fromhex(pdu)
    if isinstance(result, bytes):
        assert read_reply_data(data, function, count) == result
    elif result is ModbusExceptionResponse:
        with pytest.raises(ModbusExceptionResponse) as caught:
            read_reply_data(data, function, count)
        assert caught.value.code == 2
    else:
        with pytest.raises(ModbusProtocolError, match=str(result)):
            read_reply_data(data, function, count)
