"""Framing of a serial sensor's byte stream: checksums of binary frames (CRC-16/MODBUS is
:func:`drivers.wire.crc16`, the one CRC) and the framers, bytes as they arrive -> complete frames
in a bounded buffer. Bad frames come out as :class:`FrameError` values, never raised."""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce
from typing import Final

from drivers.serial.profile import CHECKSUM_SIZE, ChecksumSpec, ProfileModel, parse_hex
from drivers.wire import crc16
from gateway.polling import format_duration


# =========================================================================== checksums
def _sum8(data: bytes) -> int:
    return sum(data) & 0xFF


def _sum16(data: bytes) -> int:
    return sum(data) & 0xFFFF


def xor8(data: bytes) -> int:
    return reduce(lambda a, b: a ^ b, data, 0)


def _ccitt_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CCITT_TABLE: Final = _ccitt_table()


def _crc16_ccitt(data: bytes, init: int) -> int:
    crc = init
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CCITT_TABLE[((crc >> 8) ^ b) & 0xFF]
    return crc


CHECKSUMS: Final[dict[str, Callable[[bytes], int]]] = {
    "sum8": _sum8, "sum16": _sum16, "xor": xor8, "crc16_modbus": crc16,
    "crc16_ccitt": lambda d: _crc16_ccitt(d, 0xFFFF),  # CRC-16/CCITT-FALSE: "123456789" -> 0x29B1
    "crc16_xmodem": lambda d: _crc16_ccitt(d, 0x0000),  # CRC-16/XMODEM: "123456789" -> 0x31C3
}


def checksum_bytes(spec: ChecksumSpec, covered: bytes) -> bytes:
    """The checksum of ``covered`` as it appears on the wire."""
    value = CHECKSUMS[spec.type](covered)
    if CHECKSUM_SIZE[spec.type] == 1:
        return bytes([value])
    order = spec.byte_order or ("DCBA" if spec.type == "crc16_modbus" else "ABCD")
    return value.to_bytes(2, "little" if order == "DCBA" else "big")


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
        self._csize = CHECKSUM_SIZE[profile.checksum.type] if profile.checksum else 0
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


