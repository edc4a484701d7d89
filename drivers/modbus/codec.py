"""The Modbus codec: registers/bits -> values (:class:`RequestDecoder`, the hot path), values ->
registers/bits (:func:`encode`, for simulators), and the PDU and MBAP coding of one read
transaction (:func:`mbap_request`, :func:`mbap_split`, :func:`read_reply_data`).

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

import math
import struct
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Final

from drivers.modbus.errors import ModbusExceptionResponse, ModbusProtocolError
from drivers.modbus.profile import BIT_KINDS, FUNCTION, INT_TYPES, REGISTER_TYPES, Point
from drivers.wire import swap_register_bytes
from gateway.reading import FieldValue, shortest_float32

# =========================================================================== codec
_SWAPPED_ORDERS: Final = frozenset({"BADC", "CDAB"})  # read from the buffer with bytes swapped per register
_LITTLE_ORDERS: Final = frozenset({"DCBA", "CDAB"})  # then unpacked little endian


def _code(point: Point) -> str:
    if point.type == "string":
        return f"{2 * point.width}s"
    if point.type == "bool":
        return "H"  # a bit of a register
    return REGISTER_TYPES[point.type][0]


def _endian(point: Point) -> str:
    if point.type in ("string", "bool") or point.width == 1:
        return ">"  # 16-bit values: BA is handled by the swapped buffer
    return "<" if point.byte_order in _LITTLE_ORDERS else ">"


def _swapped(point: Point) -> bool:
    if point.width == 1 and point.type != "string":
        return point.byte_order in ("BADC", "DCBA")  # AB or BA
    return point.byte_order in _SWAPPED_ORDERS


# What to do with one unpacked raw value (tuple per point, fastest to dispatch on in a loop).
_RAW, _DIV, _MUL, _BIT, _STRING = range(5)


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
            # Byte index and mask per point: O(1) each, where shifting one int of up to 2000
            # bits per point cost as much as pymodbus's whole list of bits (bench/modbus_codec.py).
            self._steps: list[tuple[Any, ...]] = [(p.name, (p.address - request.address) >> 3,
                                                   1 << ((p.address - request.address) & 7))
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
            for name, index, mask in self._steps:
                out[name] = bool(data[index] & mask)
            return []
        swapped = swap_register_bytes(data) if self._any_swapped else data
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
            data = swap_register_bytes(data)
    elif _swapped(point):
        data = swap_register_bytes(data)
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
    elif isinstance(value, int) and point.type in INT_TYPES and point.scale == 1 and point.offset == 0:
        raw = int(value)  # exact: 64-bit integers do not survive a float
    else:
        number = (float(value) - point.offset) / point.scale
        if point.type in INT_TYPES:
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


_MBAP = struct.Struct(">HHH")
_REQUEST = struct.Struct(">HHHBBHH")
_MAX_PDU = 253


# The codec of one read transaction as pure functions, used by the transports and measured
# against pymodbus's framer and PDU classes by ``bench/modbus_codec.py`` (ARCHITECTURE.md).
def mbap_request(tid: int, unit: int, function: int, address: int, count: int) -> bytes:
    """The Modbus TCP frame (MBAP header + PDU) of a read request."""
    return _REQUEST.pack(tid, 0, 6, unit, function, address, count)


def mbap_split(buf: bytearray | bytes) -> tuple[int, int] | None:
    """``(transaction id, end)`` of the complete MBAP frame at the start of ``buf`` (the frame
    is ``buf[:end]``; its unit id is ``buf[6]``, its PDU ``buf[7:end]``), or None until it is all
    there. Raises :class:`ModbusProtocolError` for a header no Modbus TCP server sends."""
    if len(buf) < 8:
        return None
    tid, proto, length = _MBAP.unpack_from(buf)
    if proto != 0 or not 2 <= length <= _MAX_PDU + 1:
        raise ModbusProtocolError(f"invalid MBAP header {bytes(buf[:8]).hex()}")
    end = 6 + length
    return (tid, end) if len(buf) >= end else None


def read_reply_data(pdu: bytes, function: int, count: int) -> bytes:
    """The data bytes of the reply ``pdu`` (function code onward) to a read of ``count``
    registers or bits with ``function``: registers big endian as sent, bits packed least
    significant first. Raises :class:`ModbusExceptionResponse` for an exception reply and
    :class:`ModbusProtocolError` for a reply that does not answer this read."""
    fc = pdu[0]
    if fc == function:
        expected = (count + 7) // 8 if function <= 2 else 2 * count
        if len(pdu) != 2 + expected or pdu[1] != expected:
            if len(pdu) < 2:
                raise ModbusProtocolError(f"reply stops after its function code, expected {expected} data bytes")
            raise ModbusProtocolError(f"reply carries {len(pdu) - 2} data bytes (byte count {pdu[1]}), expected {expected}")
        return pdu[2:]
    if fc == function | 0x80 and len(pdu) >= 2:
        raise ModbusExceptionResponse(pdu[1])
    raise ModbusProtocolError(f"reply has function code {fc}, expected {function}")

