"""Hypothesis fuzzing of the Modbus RTU reply parser (drivers.modbus.rtu_client: :func:`find_reply`,
:func:`damage_kind`, and the client reading a pseudo-terminal the test writes to) and of the DTU
packet matching (drivers.modbus.dtu_link: :class:`Packet`, the listener's registration matcher and
the heartbeat filter). Properties: nothing raises but the documented errors, no frame with a bad
CRC is ever returned, and a valid reply or packet embedded in noise or split anywhere is found."""

from __future__ import annotations

import asyncio
import itertools
import os
import tty
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from drivers.modbus.errors import ModbusExceptionResponse, ModbusFrameError, ModbusTimeout
from drivers.modbus.rtu import SerialLink
from drivers.modbus.rtu_client import ModbusRtuClient, damage_kind, find_reply
from drivers.wire import rtu_frame
from drivers.wire import crc16
from drivers.modbus.dtu_link import DtuLink, DtuListener, DtuModel, Packet, PacketFilter, PacketModel
from drivers.modbus.rtu_client import replies_in

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FUZZ_PTY = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

units = st.integers(1, 247)
functions = st.sampled_from([1, 2, 3, 4])
noise = st.binary(max_size=64)


@st.composite
def replies(draw: Any) -> tuple[int, int, int, bytes]:
    """(unit, function, data bytes, reply frame): a normal reply or an exception reply."""
    unit, function = draw(units), draw(functions)
    nbytes = draw(st.integers(1, 40))
    if draw(st.booleans()):
        return unit, function, nbytes, rtu_frame(unit, bytes((function, nbytes)) + draw(st.binary(min_size=nbytes,
                                                                                              max_size=nbytes)))
    return unit, function, nbytes, rtu_frame(unit, bytes((function | 0x80, draw(st.integers(1, 255)))))


def assert_valid(buf: bytes, span: tuple[int, int] | None, unit: int, function: int, nbytes: int) -> None:
    """What find_reply returns is a reply to this request with a good CRC, or nothing."""
    if span is None:
        return
    start, end = span
    frame = buf[start:end]
    assert 0 <= start < end <= len(buf)
    assert crc16(frame) == 0
    assert frame[0] == unit
    if frame[1] == function:
        assert frame[2] == nbytes and len(frame) == 5 + nbytes
    else:
        assert frame[1] == function | 0x80 and len(frame) == 5


# --------------------------------------------------------------------------- the RTU parser
@FUZZ
@given(data=st.binary(max_size=300), unit=units, function=functions, nbytes=st.integers(1, 250))
def test_fuzz_arbitrary_bytes_never_yield_a_bad_frame(data: bytes, unit: int, function: int, nbytes: int) -> None:
    assert_valid(data, find_reply(data, unit, function, nbytes), unit, function, nbytes)
    assert damage_kind(data, unit, function, nbytes) in ("crc", "truncated", "garbage")


@FUZZ
@given(reply=replies(), before=noise, after=noise)
def test_fuzz_a_reply_in_noise_is_found(reply: tuple[int, int, int, bytes], before: bytes, after: bytes) -> None:
    unit, function, nbytes, frame = reply
    buf = before + frame + after
    span = find_reply(buf, unit, function, nbytes)
    assert span is not None
    assert_valid(buf, span, unit, function, nbytes)
    # The first valid reply in the stream: the embedded one, unless the noise before it (by
    # chance) holds a valid one of its own.
    assert span[0] <= len(before)
    if span[0] == len(before):
        assert buf[span[0]:span[1]] == frame


@FUZZ
@given(reply=replies(), data=st.data())
def test_fuzz_a_truncated_reply_is_not_taken(reply: tuple[int, int, int, bytes], data: st.DataObject) -> None:
    unit, function, nbytes, frame = reply
    cut = frame[:data.draw(st.integers(0, len(frame) - 1))]
    span = find_reply(cut, unit, function, nbytes)
    assert span != (0, len(frame))
    assert_valid(cut, span, unit, function, nbytes)
    if span is None and len(cut) >= 2:
        assert damage_kind(cut, unit, function, nbytes) == "truncated"


@FUZZ
@given(reply=replies(), data=st.data())
def test_fuzz_a_flipped_bit_is_never_accepted(reply: tuple[int, int, int, bytes], data: st.DataObject) -> None:
    unit, function, nbytes, frame = reply
    bit = data.draw(st.integers(0, 8 * len(frame) - 1))
    damaged = bytearray(frame)
    damaged[bit // 8] ^= 1 << (bit % 8)
    span = find_reply(damaged, unit, function, nbytes)
    assert span != (0, len(frame))  # CRC-16 catches every single-bit error
    assert_valid(bytes(damaged), span, unit, function, nbytes)
    if span is None and bit >= 16:  # unit and function intact: a reply that failed its CRC
        assert damage_kind(damaged, unit, function, nbytes) in ("crc", "truncated")


# --------------------------------------------------------------------------- the client on a pty
async def _exchange(chunks: list[bytes], unit: int, function: int, count: int) -> bytes | Exception:
    master, slave = os.openpty()
    tty.setraw(master)
    os.set_blocking(master, False)
    try:
        client = ModbusRtuClient(SerialLink(os.ttyname(slave), 19200), frame_gap=0.02)
        async with client:
            await client.connect(1.0)
            loop = asyncio.get_running_loop()

            def answer() -> None:  # the request arrived: the "bus" answers with the chunks
                loop.remove_reader(master)
                os.read(master, 64)
                for chunk in chunks:
                    if chunk:
                        os.write(master, chunk)

            loop.add_reader(master, answer)
            try:
                return await client.read(unit, function, 0, count, 0.15)
            except (ModbusTimeout, ModbusFrameError, ModbusExceptionResponse) as exc:
                return exc
            finally:
                loop.remove_reader(master)
    finally:
        os.close(master)
        os.close(slave)


@FUZZ_PTY
@given(reply=replies(), chunks=st.lists(noise, max_size=4), with_reply=st.booleans(), data=st.data())
def test_fuzz_the_client_returns_a_good_reply_or_a_documented_error(
        reply: tuple[int, int, int, bytes], chunks: list[bytes], with_reply: bool, data: st.DataObject) -> None:
    unit, function, nbytes, frame = reply
    count = nbytes * 8 if function <= 2 else nbytes // 2
    assume(1 <= count <= 125 or function <= 2)
    if with_reply:
        chunks.insert(data.draw(st.integers(0, len(chunks))), frame)
    stream = b"".join(chunks)
    outcome = asyncio.run(_exchange(chunks, unit, function, count))
    span = find_reply(stream, unit, function, (count + 7) // 8 if function <= 2 else 2 * count)
    if span is None:
        assert isinstance(outcome, (ModbusTimeout, ModbusFrameError)), outcome
        return
    found = stream[span[0]:span[1]]
    if found[1] & 0x80:
        assert isinstance(outcome, ModbusExceptionResponse) and outcome.code == found[2]
    else:
        assert outcome == found[3:-2]


# --------------------------------------------------------------------------- DTU packets
packets = st.one_of(
    st.builds(lambda b: {"hex": b.hex()}, st.binary(min_size=1, max_size=12)),
    st.builds(lambda t: {"text": t}, st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1,
                                             max_size=12)),
    st.sampled_from([{"regex": "^SN[0-9]{6}"}, {"regex": "IMEI=\\d{15}\\r\\n"}, {"regex": "\\xfe[\\x00-\\xff]"}]),
)


@FUZZ
@given(spec=packets, data=st.binary(max_size=80))
def test_fuzz_packet_match_is_bounded(spec: dict[str, str], data: bytes) -> None:
    packet = Packet(PacketModel.model_validate(spec))
    n = packet.match(data)
    assert -1 <= n <= len(data)
    if n > 0 and packet.literal is not None:
        assert data[:n] == packet.literal


def _dtu(dtu_id: str, registration: dict[str, str], heartbeat: dict[str, str] | None = None) -> DtuLink:
    return DtuLink(DtuModel.model_validate({"id": dtu_id, "registration": registration, "heartbeat": heartbeat}),
                   "127.0.0.1:0")


@FUZZ
@given(data=st.binary(max_size=80), sn=st.integers(0, 999_999), rest=noise, cut=st.integers(0, 30))
def test_fuzz_registration_is_identified_from_any_prefix(data: bytes, sn: int, rest: bytes, cut: int) -> None:
    barn, shed = _dtu("barn", {"text": "BARN-0001"}), _dtu("shed", {"regex": "^SN[0-9]{6}"})
    listener = DtuListener("127.0.0.1:0", [barn, shed])
    found = listener.identify(data)
    assert found is None or found is False or (found[0] in (barn, shed) and 0 < found[1] <= len(data))
    for packet, link in ((b"BARN-0001", barn), (f"SN{sn:06d}".encode(), shed)):
        stream = packet + rest
        assert listener.identify(stream) == (link, len(packet))
        assert listener.identify(stream[:min(cut, len(packet) - 1)]) is None  # a split: wait for more


@st.composite
def dtu_streams(draw: Any) -> tuple[bytes, list[bytes], bytes, int]:
    """(heartbeat, the segments the gateway receives, the Modbus bytes among them, the number of
    heartbeats). Heartbeats
    and replies come whole from the DTU; the network may cut a heartbeat into segments; a reply
    may share a segment with the heartbeat before it."""
    heartbeat = draw(st.sampled_from([bytes.fromhex("fefe4842"), b"HB", b"\xfe", b"heartbeat\r\n"]))
    segments: list[bytes] = []
    modbus = b""
    beats = 0
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            beats += 1
            cuts = sorted(draw(st.sets(st.integers(1, len(heartbeat) - 1), max_size=3))) if len(heartbeat) > 1 else []
            edges = [0, *cuts, len(heartbeat)]
            segments += [heartbeat[a:b] for a, b in itertools.pairwise(edges)]
        else:
            _unit, _function, _nbytes, frame = draw(replies())
            if draw(st.booleans()):
                beats += 1
                segments.append(heartbeat + frame)
            else:
                segments.append(frame)
            modbus += frame
    return heartbeat, segments, modbus, beats


@FUZZ
@given(stream=dtu_streams())
def test_fuzz_heartbeats_split_anywhere_are_dropped_and_replies_kept(
        stream: tuple[bytes, list[bytes], bytes, int]) -> None:
    heartbeat, segments, modbus, beats = stream
    packets = [Packet(PacketModel(hex=heartbeat.hex())), Packet(PacketModel(text="BARN-0001"))]
    flt = PacketFilter(packets)
    out = b"".join(flt.feed(segment) for segment in segments)
    assert out == modbus
    assert flt.dropped == beats and flt.held == b""


@FUZZ
@given(segments=st.lists(st.binary(max_size=40), max_size=10))
def test_fuzz_the_heartbeat_filter_never_raises_and_holds_little(segments: list[bytes]) -> None:
    flt = PacketFilter([Packet(PacketModel(hex="fefe4842")), Packet(PacketModel(regex="^SN[0-9]{6}"))])
    total_in = total_out = 0
    for segment in segments:
        total_in += len(segment)
        total_out += len(flt.feed(segment))
        assert len(flt.held) < 4  # at most a heartbeat's first bytes
    assert total_out + len(flt.held) + flt.dropped <= total_in  # every packet dropped is a byte or more


@FUZZ
@given(unit=units, function=functions, data=st.binary(min_size=0, max_size=20).map(lambda b: b[: len(b) // 2 * 2]),
       before=noise, after=noise)
def test_replies_in_finds_a_late_reply_in_noise_and_only_valid_ones(unit: int, function: int, data: bytes,
                                                                     before: bytes, after: bytes) -> None:
    frame = rtu_frame(unit, bytes((function, len(data))) + data)
    buf = before + frame + after
    found = replies_in(buf)
    for u, start, end in found:
        assert buf[start] == u and 1 <= u <= 247 and crc16(buf[start:end]) == 0
    assert all(b[1] <= a[1] or b[1] >= a[2] for a, b in itertools.pairwise(found))
    # The embedded reply is found unless noise before it happens to form a valid reply overlapping it.
    assert (unit, len(before), len(before) + len(frame)) in found or any(s < len(before) < e for _, s, e in found)
