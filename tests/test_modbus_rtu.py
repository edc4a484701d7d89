"""Modbus RTU on real pseudo-terminal pairs (simulators.modbus_rtu): CRC and timing tables, a bus
with a dead unit, every injected fault, a port that vanishes and returns, and no write ever sent;
RTU over TCP (dial-out) against the simulated serial device server, including a broken stream."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import support
from support import until

from drivers.modbus.poller import ModbusPoller
from drivers.modbus.profile import ProfileModel
from drivers.modbus.rtu import DeviceModel, SerialLink, make_pollers
from drivers.modbus.rtu_client import ModbusRtuClient
from drivers.wire import PreciseSleep, char_time, inter_frame_silence, rtu_frame
from drivers.modbus.rtu_tcp import DeviceModel as RtuTcpDeviceModel
from drivers.modbus.rtu_tcp import make_pollers as make_tcp_pollers
from drivers.wire import crc16
from gateway.driver import Device
from gateway.reading import GOOD, Reading
from simulators.modbus_device import Faults, SimDevice
from simulators.modbus_rtu import RtuBus, RtuTcpServer
from drivers.modbus.rtu import check
from gateway.cli.commands import main
from servers import sluice_process

PROFILE = ProfileModel.model_validate({
    "protocol": "modbus",
    "points": [{"name": f"r{i}", "kind": "holding", "address": i, "type": "uint16",
                "sim": {"signal": "constant", "value": 100 + i}} for i in range(4)],
})
EXPECTED = {f"r{i}": 100 + i for i in range(4)}
REPO = Path(__file__).resolve().parent.parent


def sim_units(units: Sequence[int]) -> list[SimDevice]:
    return [SimDevice(PROFILE, u, name=f"sim{u}", faults=Faults()) for u in units]


def device(dev_id: str, port: str, unit: int, **settings: Any) -> Device:
    return support.device(DeviceModel, PROFILE, {
        "id": dev_id, "protocol": "modbus_rtu", "profile": "p", "port": port, "unit_id": unit,
        "baudrate": 19200, "interval": "100ms", "timeout": "50ms", "retries": 0, "backoff_max": "200ms"}, **settings)


def running(poller: ModbusPoller) -> contextlib.AbstractAsyncContextManager[list[Reading]]:
    return support.running(poller)


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# --------------------------------------------------------------------------- framing tables
def _crc_bitwise(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


@pytest.mark.parametrize(("body", "frame"), [
    ("01030000000a", "01030000000ac5cd"),  # the spec's read of 10 holding registers
    ("1103006b0003", "1103006b00037687"),  # Modbus over serial line, 6.3 example
    ("0103020001", "0103020001 7984"),
    ("018302", "018302c0f1"),  # exception 02
])
def test_crc16_known_frames(body: str, frame: str) -> None:
    body_b = bytes.fromhex(body)
    assert rtu_frame(body_b[0], body_b[1:]) == bytes.fromhex(frame)
    assert crc16(bytes.fromhex(frame)) == 0


def test_crc16_table_matches_the_bitwise_definition() -> None:
    rng = random.Random(3)
    for n in (0, 1, 2, 7, 64, 256):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert crc16(data) == _crc_bitwise(data)
    assert crc16(b"123456789") == 0x4B37  # CRC-16/MODBUS check value


@pytest.mark.parametrize(("line", "char_us", "silence_us"), [
    ((9600, 8, "N", 1), 1041.7, 3645.8),
    ((9600, 8, "E", 1), 1145.8, 4010.4),
    ((19200, 8, "N", 2), 572.9, 2005.2),
    ((38400, 8, "N", 1), 260.4, 1750.0),  # above 19200 baud: fixed 1.75 ms
    ((115200, 8, "E", 1), 95.5, 1750.0),
])
def test_character_time_and_inter_frame_silence(line: tuple[int, int, str, int], char_us: float,
                                                silence_us: float) -> None:
    assert char_time(*line) * 1e6 == pytest.approx(char_us, abs=0.1)
    assert inter_frame_silence(*line) * 1e6 == pytest.approx(silence_us, abs=0.1)


async def test_the_client_cannot_send_a_write() -> None:
    async with RtuBus(sim_units([1])) as bus:
        client = ModbusRtuClient(SerialLink(bus.path))
        async with client:
            await client.connect(1.0)
            for fc in (5, 6, 15, 16):
                with pytest.raises(ValueError, match="not a read"):
                    await client.read(1, fc, 0, 1, 0.1)
            assert await client.read(1, 3, 0, 2, 0.5) == bytes.fromhex("00640065")
        assert bus.stats.writes == 0


# --------------------------------------------------------------------------- the bus
async def test_live_units_keep_their_rate_beside_a_dead_one(caplog: pytest.LogCaptureFixture) -> None:
    async with RtuBus(sim_units([1, 2, 3, 4, 5]), baudrate=19200) as bus:
        bus.set_faults(3, no_answer=True)
        (poller,) = make_pollers([device(f"u{u}", bus.path, u) for u in (1, 2, 3, 4, 5)])
        start = time.monotonic()
        async with running(poller) as readings:
            await until(lambda: all(sum(r.device == f"u{u}" for r in readings) >= 10 for u in (1, 2, 4, 5))
                        and poller.status["u3"].errors.get("timeout", 0) == bus.stats.count(unit=3),
                        what="10 readings of each live unit, no probe of the dead one in flight")
            span = time.monotonic() - start
        assert bus.stats.writes == 0
    for u in (1, 2, 4, 5):
        times = [r.time_ns / 1e9 for r in readings if r.device == f"u{u}"]
        assert len(times) >= 10, (u, times)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) < 0.1 + 0.05 + 0.06, (u, gaps)  # interval + the dead unit's timeout + slack
    assert all(r.fields == EXPECTED and r.quality == GOOD for r in readings)
    probes = bus.stats.count(unit=3)
    assert 3 <= probes <= 3 + span / 0.2 + 1, (probes, span)  # backoff 100, 200, 200, ... ms: not every 100 ms
    (dead,) = warnings_about(caplog, "u3:")
    assert f"{bus.path} unit 3" in dead and "(address 0)" in dead and "no answer within 50ms" in dead


# Each fault: it is counted under its kind, logged once, other units are untouched, and once the
# fault is gone the next good frame is read.
FAULTS = [
    ("crc", {"crc": 1.0}, "crc", "failed its CRC check"),
    ("truncated", {"truncate": 1.0}, "truncated", "stopped short"),
    ("silence", {"no_answer": True}, "timeout", "no answer within 50ms"),
    ("slow", {"delay": 0.3}, "timeout", "no answer within 50ms"),
    ("exception", {"exception": 4}, "exception", "exception 4 (device failure)"),
]


@pytest.mark.parametrize(("fault", "kind", "text"), [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
async def test_fault_is_counted_logged_once_and_recovered_from(
        caplog: pytest.LogCaptureFixture, fault: dict[str, Any], kind: str, text: str) -> None:
    caplog.set_level(logging.INFO)
    async with RtuBus(sim_units([1, 2])) as bus:
        (poller,) = make_pollers([device("bad", bus.path, 1, retries=1), device("good", bus.path, 2)])
        client = poller.client
        assert isinstance(client, ModbusRtuClient)
        async with running(poller) as readings:
            await until(lambda: any(r.device == "bad" for r in readings))
            bus.set_faults(1, **fault)
            await until(lambda: poller.status["bad"].errors.get(kind, 0) >= 3)
            bus.set_faults(1)
            cleared = time.time_ns()
            await until(lambda: any(r.device == "bad" and r.time_ns > cleared for r in readings))
            good_before = sum(r.device == "good" for r in readings)
            await until(lambda: sum(r.device == "good" for r in readings) > good_before, what="the good unit read on")
        assert bus.stats.writes == 0
    assert set(poller.status["bad"].errors) == {kind}
    assert poller.status["good"].errors == {}
    assert sum(r.device == "good" for r in readings) > good_before
    assert all(r.fields == EXPECTED for r in readings)
    warnings = warnings_about(caplog, "bad:")
    # A late reply can be taken for the answer to a later request of the same unit (RTU carries
    # no transaction id), so a slow unit may flap; every other fault logs exactly once.
    assert len(warnings) == 1 or (fault.get("delay") and warnings), warnings
    warning = warnings[0]
    assert f"{bus.path} unit 1" in warning and "(address 0)" in warning and text in warning
    assert "(2 attempts)" in warning or kind == "exception"
    assert any(r.getMessage().startswith("bad: answering again") or
               r.getMessage().startswith("bad: reading every point again") for r in caplog.records)


async def test_garbage_before_a_reply_is_skipped() -> None:
    async with RtuBus(sim_units([1])) as bus:
        bus.set_faults(1, garbage=1.0)
        (poller,) = make_pollers([device("noisy", bus.path, 1)])
        client = poller.client
        assert isinstance(client, ModbusRtuClient)
        async with running(poller) as readings:
            await until(lambda: len(readings) >= 5)
        assert client.discarded >= 15  # 3..9 bytes of noise before each reply
    assert poller.status["noisy"].errors == {}
    assert all(r.fields == EXPECTED for r in readings)


async def test_port_that_vanishes_is_reopened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    link = tmp_path / "ttyRTU0"
    async with RtuBus(sim_units([1, 2]), link=link) as bus:
        (poller,) = make_pollers([device("a", str(link), 1), device("b", str(link), 2)])
        async with running(poller) as readings:
            await until(lambda: len(readings) >= 4)
            bus.vanish()  # USB unplugged
            await until(lambda: poller.status["a"].errors.get("absent", 0) >= 2)
            bus.reappear()
            back = time.time_ns()
            await until(lambda: {r.device for r in readings if r.time_ns > back} == {"a", "b"})
    assert len(warnings_about(caplog, "went away")) == 1
    (absent,) = warnings_about(caplog, "is not there")
    assert str(link) in absent and "USB" in absent and "(devices a, b)" in absent
    assert any(f"connection {link}: reconnected" in r.getMessage() for r in caplog.records)


async def test_a_unit_does_not_answer_a_port_at_another_baud_rate() -> None:
    async with RtuBus(sim_units([1]), baudrate=9600, parity="E", wire_timing=True) as bus:
        wrong = ModbusPoller(bus.path, ModbusRtuClient(SerialLink(bus.path, 19200, "E")),
                             [device("x", bus.path, 1, timeout="100ms")])
        async with wrong:
            assert await wrong.poll_once() == []
        right = ModbusPoller(bus.path, ModbusRtuClient(SerialLink(bus.path, 9600, "E")),
                             [device("x", bus.path, 1, timeout="200ms")])
        async with right:
            (reading,) = await right.poll_once()
        assert bus.wrong_line == 1
    assert reading.fields == EXPECTED


def test_bus_line_settings_conflict_is_a_config_error() -> None:
    a = device("a", "/dev/ttyUSB9", 1, parity="E")
    b = device("b", "/dev/ttyUSB9", 2, parity="E", stopbits=2)
    c = device("c", "/dev/ttyUSB8", 1, baudrate=9600)
    d = device("d", "/dev/ttyUSB9", 1, parity="E")
    problems = check([a, b, c, d])
    assert [(p.device.id, p.loc) for p in problems] == [("b", ("stopbits",)), ("d", ("unit_id",))]
    assert "runs at 19200 8E1 for 'a'" in problems[0].message and "8E2" in problems[0].message


# --------------------------------------------------------------------------- RTU over TCP (dial-out)
def tcp_device(dev_id: str, server: RtuTcpServer, unit: int, **settings: Any) -> Device:
    cfg = RtuTcpDeviceModel.model_validate({
        "id": dev_id, "protocol": "modbus_rtu_tcp", "profile": "p", "host": server.host, "port": server.port,
        "unit_id": unit, "interval": "100ms", "timeout": "50ms", "retries": 0, "backoff_max": "200ms",
        **settings})
    return Device(cfg, PROFILE, "p", {"device": dev_id}, "m", Path(f"{dev_id}.yaml"))


async def test_rtu_over_tcp_reads_units_and_checks_crc(caplog: pytest.LogCaptureFixture) -> None:
    async with RtuTcpServer(sim_units([1, 2, 3])) as server:
        server.set_faults(2, crc=1.0)
        server.set_faults(3, garbage=1.0)
        # A generous timeout: under load a 50 ms connect can time out, and the reconnect would
        # be counted below as a second connection.
        (poller,) = make_tcp_pollers([tcp_device(f"u{u}", server, u, timeout="1s") for u in (1, 2, 3)])
        assert poller.name == f"{server.path} (RTU over TCP)"
        async with running(poller) as readings:
            await until(lambda: sum(r.device == "u3" for r in readings) >= 3
                        and poller.status["u2"].errors.get("crc", 0) >= 2)
        assert server.stats.writes == 0 and server.connections == 1
    assert {r.device for r in readings} == {"u1", "u3"}
    assert all(r.fields == EXPECTED for r in readings)
    assert poller.status["u1"].errors == {} and poller.status["u3"].errors == {}
    (crc,) = warnings_about(caplog, "u2:")
    assert f"{server.path} (RTU over TCP) unit 2" in crc and "failed its CRC check" in crc


async def test_rtu_over_tcp_resyncs_after_a_broken_stream() -> None:
    async with RtuTcpServer(sim_units([1, 2])) as server:
        (poller,) = make_tcp_pollers([tcp_device("a", server, 1), tcp_device("b", server, 2)])
        async with running(poller) as readings:
            await until(lambda: len(readings) >= 4)
            for _ in range(3):
                server.break_stream()  # half a frame, then the connection drops
                broken = time.time_ns()
                await until(lambda t=broken: {r.device for r in readings if r.time_ns > t} == {"a", "b"})
        assert server.connections == 4 and server.stats.writes == 0
    assert all(r.fields == EXPECTED for r in readings)
    assert set(poller.status["a"].errors) <= {"disconnected", "truncated"}


# --------------------------------------------------------------------------- sluice sim rtu + sluice once
def test_sluice_sim_rtu_serves_the_gateway(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    link = tmp_path / "ttyRTU"
    with sluice_process("sim", "rtu", "--profiles", str(REPO / "config" / "profiles"), "--unit", "1=eastron-sdm630",
                        "--unit", "7=eastron-sdm630", "--fault", "7:no_answer", "--link", str(link),
                        "--baudrate", "19200") as sim:
        assert sim.stdout is not None
        lines = [sim.stdout.readline() for _ in range(2)]
        assert lines[0].startswith(f"RTU bus on {link} at 19200 8N1: 2 units"), lines
        assert lines[1].strip() == f"port: {link}"
        (tmp_path / "gateway.yaml").write_text("gateway:\n  id: gw1\n  site: farm\n")
        (tmp_path / "profiles").mkdir()
        (tmp_path / "profiles" / "eastron-sdm630.yaml").write_text(
            (REPO / "config" / "profiles" / "eastron-sdm630.yaml").read_text())
        (tmp_path / "devices").mkdir()
        for dev_id, unit in (("meter", 1), ("gone", 7)):
            (tmp_path / "devices" / f"{dev_id}.yaml").write_text(
                f"id: {dev_id}\nprotocol: modbus_rtu\nprofile: eastron-sdm630\nport: {link}\nbaudrate: 19200\n"
                f"unit_id: {unit}\ntimeout: 100ms\n")
        assert main(["once", "-c", str(tmp_path)]) == 1
        out, err = capsys.readouterr()
        assert out.startswith("meter (good)") and "gone: no answer" in err
    assert not link.exists()


async def test_precise_sleep_never_ends_early_and_releases_its_descriptor() -> None:
    """The inter-frame silence is a minimum: a sleep may end late (the scheduler), never early."""
    sleep = PreciseSleep()
    loop = asyncio.get_running_loop()
    for seconds in (0.0003, 0.00175, 0.004):
        start = loop.time()
        await sleep.sleep(seconds)
        assert loop.time() - start >= seconds
    fd = sleep._fd  # noqa: SLF001 - the timerfd it holds is what this test checks is released
    assert fd >= 0 and os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[timerfd]"
    sleep.close()
    assert sleep._fd == -1 and not os.path.exists(f"/proc/self/fd/{fd}")  # noqa: SLF001 - closed: no descriptor held
