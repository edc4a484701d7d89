"""Modbus RTU over TCP, dial-in (drivers.modbus.dtu) against the simulated DTU
(simulators.modbus_dtu) on real loopback sockets: registration, heartbeats mixed into the reply
stream, drops and re-dials, a DTU replaced by a new connection, unknown and silent DTUs refused
and logged once, two DTUs on one listener, the packet matcher, and ``sluice sim dtu``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import support
from support import until

from drivers.modbus.profile import ProfileModel
from drivers.modbus.dtu import DeviceModel, DtuListenerPoller, make_pollers
from drivers.modbus.dtu_link import Packet, PacketModel
from gateway.driver import Device
from gateway.reading import Reading
from simulators.modbus_device import Faults, SimDevice
from simulators.modbus_dtu import DtuSim
from gateway.cli.commands import main
from servers import sluice_process

PROFILE = ProfileModel.model_validate({
    "protocol": "modbus",
    "points": [{"name": f"r{i}", "kind": "holding", "address": i, "type": "uint16",
                "sim": {"signal": "constant", "value": 100 + i}} for i in range(4)],
})
EXPECTED = {f"r{i}": 100 + i for i in range(4)}
REPO = Path(__file__).resolve().parent.parent


def units(ids: Sequence[int]) -> list[SimDevice]:
    return [SimDevice(PROFILE, u, name=f"sim{u}", faults=Faults()) for u in ids]


def device(dev_id: str, unit: int, dtu: dict[str, Any], listen: str = "127.0.0.1:0", **settings: Any) -> Device:
    return support.device(DeviceModel, PROFILE, {
        "id": dev_id, "protocol": "modbus_rtu_dtu", "profile": "p", "listen": listen, "unit_id": unit, "dtu": dtu,
        "interval": "100ms", "timeout": "200ms", "retries": 0, "backoff_max": "300ms"}, **settings)


BARN = {"id": "barn", "registration": {"text": "BARN-0001"}, "heartbeat": {"hex": "fe fe 48 42"}}
SHED = {"id": "shed", "registration": {"regex": "^SN[0-9]{6}"}, "registration_timeout": "300ms"}


@contextlib.asynccontextmanager
async def running(poller: DtuListenerPoller) -> AsyncIterator[tuple[int, list[Reading]]]:
    async with support.running(poller) as readings:
        yield await asyncio.wait_for(poller.wait_listening(), support.DEADLINE), readings


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def since(readings: list[Reading], t: int) -> set[str]:
    return {r.device for r in readings if r.time_ns > t}


# --------------------------------------------------------------------------- packets
@pytest.mark.parametrize(("packet", "data", "taken"), [
    ({"text": "BARN"}, b"BARN\x01\x03", 4),
    ({"text": "BARN"}, b"BA", 0),  # could still match
    ({"text": "BARN"}, b"BX", -1),
    ({"hex": "fe 01"}, b"\xfe\x01rest", 2),
    ({"hex": "FE:01"}, b"\xfe\x02", -1),
    ({"regex": "^SN[0-9]{6}"}, b"SN123456\x01", 8),
    ({"regex": "SN[0-9]{6}"}, b"xSN123456", 0),  # anchored at the first byte
    ({"regex": "IMEI=\\d{15}\\r\\n"}, b"IMEI=861234567890123\r\n\x01", 22),
])
def test_packet_matches_at_the_start(packet: dict[str, str], data: bytes, taken: int) -> None:
    assert Packet(PacketModel.model_validate(packet)).match(data) == taken


@pytest.mark.parametrize(("packet", "message"), [
    ({}, "exactly one of text:, hex: or regex: (got none)"),
    ({"text": "A", "hex": "41"}, "got text, hex"),
    ({"hex": "fe 0"}, "not hex bytes"),
    ({"regex": "("}, "not a regular expression"),
    ({"regex": "x*"}, "matches no bytes at all"),
])
def test_bad_packets_are_refused_with_a_reason(packet: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PacketModel.model_validate(packet)


# --------------------------------------------------------------------------- the listener
async def test_registration_and_heartbeats_mixed_with_replies_are_filtered() -> None:
    (poller,) = make_pollers([device("a", 1, BARN), device("b", 2, BARN)])
    (dtu,) = poller.pollers
    async with running(poller) as (port, readings):
        async with DtuSim(units([1, 2]), host="127.0.0.1", port=port, registration=b"BARN-0001",
                          heartbeat=bytes.fromhex("fefe4842"), heartbeat_interval=0.03,
                          heartbeat_before_reply=True) as sim:
            await until(lambda: sum(r.device == "a" for r in readings) >= 4
                        and sum(r.device == "b" for r in readings) >= 4 and dtu.link.heartbeats >= 10)
        assert sim.stats.writes == 0
    assert {r.device for r in readings} == {"a", "b"}
    assert all(r.fields == EXPECTED for r in readings)
    # offline until the simulator dialled in; no garbage, CRC or truncation from the heartbeats
    assert set(poller.status["a"].errors) <= {"offline"} and set(poller.status["b"].errors) <= {"offline"}
    assert dtu.link.registrations == 1


async def test_registration_and_heartbeats_split_across_tcp_segments_are_recognised() -> None:
    (poller,) = make_pollers([device("a", 1, BARN)])
    (dtu,) = poller.pollers
    async with running(poller) as (port, readings):
        # Each packet in 3 writes 20 ms apart (separate TCP segments), so pieces land between and
        # during transactions.
        async with DtuSim(units([1]), host="127.0.0.1", port=port, registration=b"BARN-0001",
                          heartbeat=bytes.fromhex("fefe4842"), heartbeat_interval=0.03, segments=3,
                          segment_pause=0.02) as sim:
            await until(lambda: len(readings) >= 5 and sim.heartbeats >= 10)
            sent = sim.heartbeats
        await until(lambda: dtu.link.heartbeats >= sent)
    assert dtu.link.registrations == 1
    assert all(r.fields == EXPECTED for r in readings)
    assert set(poller.status["a"].errors) <= {"offline"}
    assert dtu.client.discarded == 0  # no piece of a heartbeat reached the Modbus stream


async def test_a_dtu_that_stays_connected_but_goes_silent_is_hung_up_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    spec = {**BARN, "heartbeat_timeout": "400ms"}
    (poller,) = make_pollers([device("a", 1, spec), device("b", 2, spec)])
    (dtu,) = poller.pollers
    async with running(poller) as (port, readings):
        async with DtuSim(units([1, 2]), host="127.0.0.1", port=port, registration=b"BARN-0001",
                          heartbeat=bytes.fromhex("fefe4842"), heartbeat_interval=0.05, reconnect_delay=0.05) as sim:
            await until(lambda: {"a", "b"} <= since(readings, 0))
            # Heartbeats every 50 ms keep it alive through a whole heartbeat timeout and more: time
            # must pass to show that nothing happens (1.5 heartbeat timeouts; more on a slow machine is fine).
            await asyncio.sleep(0.6)
            assert dtu.link.silent == 0 and sim.connections == 1
            sim.hung = True  # modem hung: no heartbeat, no reply, the TCP connection stays up
            await until(lambda: dtu.link.silent == 1)
            sim.hung = False  # it notices the hang-up and dials in again
            await until(lambda: sim.connections == 2)
            back = time.time_ns()
            await until(lambda: {"a", "b"} <= since(readings, back))
        assert sim.connections == 2
    (silent,) = warnings_about(caplog, "nothing from")
    assert "DTU barn: nothing from 127.0.0.1:" in silent and "for 400ms (no heartbeat, no reply): hanging up" in silent
    # The devices went down with the connection: one line for both, before the first dial-in and
    # after the hang-up (once per state change), and back with it.
    assert len(warnings_about(caplog, "connection DTU barn: DTU barn has not dialled in")) == 2
    assert all("(devices a, b)" in w for w in warnings_about(caplog, "has not dialled in"))
    assert any("connection DTU barn: reconnected" in r.getMessage() for r in caplog.records)
    assert all(r.fields == EXPECTED for r in readings)


def test_heartbeat_timeout_default_follows_the_heartbeat() -> None:
    assert device("a", 1, BARN).config.dtu.silence_limit == 180.0
    assert device("s", 1, SHED).config.dtu.silence_limit is None
    assert device("s", 1, {**SHED, "heartbeat_timeout": "2m"}).config.dtu.silence_limit == 120.0


async def test_a_dtu_that_drops_and_dials_in_again_resumes_its_bus(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    (poller,) = make_pollers([device("a", 1, BARN)])
    (dtu,) = poller.pollers
    async with running(poller) as (port, readings):
        async with DtuSim(units([1]), host="127.0.0.1", port=port, registration=b"BARN-0001",
                          reconnect_delay=0.05) as sim:
            await until(lambda: len(readings) >= 2)
            for n in (2, 3):
                sim.drop()
                dropped = time.time_ns()
                await until(lambda t=dropped: "a" in since(readings, t))
                assert sim.connections == n
            # A second connection registering as the same DTU replaces the first one (which must
            # not dial in again at once, or the two would take turns).
            sim.reconnect_delay = 60
            async with DtuSim(units([1]), host="127.0.0.1", port=port, registration=b"BARN-0001",
                              reconnect_delay=60) as newer:
                await until(lambda: newer.connections == 1 and dtu.link.registrations == 4)
                replaced = time.time_ns()
                await until(lambda: "a" in since(readings, replaced) and newer.stats.count(unit=1) > 0)
                await until(lambda: not sim.connected.is_set())  # the gateway hung up on the old one
    assert all(r.fields == EXPECTED for r in readings)
    assert any("DTU barn dialled in again" in r.getMessage() for r in caplog.records)
    assert any("connection DTU barn: reconnected" in r.getMessage() for r in caplog.records)


async def test_unknown_dtu_is_refused_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    (poller,) = make_pollers([device("a", 1, BARN)])
    async with running(poller) as (port, _readings):
        async with DtuSim(units([1]), host="127.0.0.1", port=port, registration=b"STRANGER",
                          reconnect_delay=0.02) as sim:
            await until(lambda: poller.listener.refused >= 3)
        assert sim.stats.count() == 0  # never asked anything
    (warning,) = warnings_about(caplog, "refused a connection")
    assert "registered as 'STRANGER'" in warning and "barn (text 'BARN-0001')" in warning
    assert poller.status["a"].polls == 0


async def test_a_dtu_silent_before_registering_is_closed_after_the_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    # Only regex registrations on this listener: nothing can be ruled out early; the timeout decides.
    (poller,) = make_pollers([device("s", 1, SHED)])
    assert poller.listener.registration_timeout == pytest.approx(0.3)
    async with running(poller) as (port, _readings):
        async with DtuSim(units([1]), host="127.0.0.1", port=port, registration=None, reconnect_delay=60) as sim:
            await until(lambda: sim.connections == 1)
            await until(lambda: poller.listener.refused == 1 and not sim.connected.is_set())
    (warning,) = warnings_about(caplog, "refused a connection")
    assert "sent nothing within 300ms" in warning


async def test_two_dtus_on_one_listener_are_polled_independently() -> None:
    (poller,) = make_pollers([device("a1", 1, BARN), device("a2", 2, BARN), device("s1", 1, SHED, interval="50ms")])
    barn, shed = poller.pollers
    assert (barn.link.spec.id, shed.link.spec.id) == ("barn", "shed")
    async with running(poller) as (port, readings):
        async with (DtuSim(units([1, 2]), host="127.0.0.1", port=port, registration=b"BARN-0001",
                           reconnect_delay=60) as sim_barn,
                    DtuSim(units([1]), host="127.0.0.1", port=port, registration=b"SN424242",
                           reconnect_delay=0.05) as sim_shed):
            sim_barn.set_faults(2, no_answer=True)
            await until(lambda: {"a1", "s1"} <= since(readings, 0) and poller.status["a2"].errors)
            sim_shed.drop()  # the shed's DTU goes away for a moment; the barn's bus does not notice
            dropped = time.time_ns()
            await until(lambda: {"a1", "s1"} <= since(readings, dropped))
        assert sim_barn.connections == 1 and sim_shed.connections == 2
        assert sim_barn.stats.count(unit=1) > 0 and sim_shed.stats.count(unit=1) > 0
    assert "a2" not in {r.device for r in readings}
    assert set(poller.status["a1"].errors) <= {"offline"}  # only before the barn dialled in
    assert all(r.fields == EXPECTED for r in readings)


# --------------------------------------------------------------------------- sluice sim dtu + sluice once
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sluice_sim_dtu_dials_in_to_sluice_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_port()
    with sluice_process("sim", "dtu", "--connect", f"127.0.0.1:{port}", "--registration-hex", "4241524e",
                        "--heartbeat", "HB", "--heartbeat-interval", "50ms", "--reconnect-delay", "100ms",
                        "--segments", "2", "--segment-pause", "20ms",
                        "--profiles", str(REPO / "config" / "profiles"), "--unit", "1=eastron-sdm630",
                        "--unit", "7=eastron-sdm630", "--fault", "7:no_answer") as sim:
        assert sim.stdout is not None
        line = sim.stdout.readline()
        assert line.startswith(f"DTU dialling in to 127.0.0.1:{port}, registering as b'BARN': 2 units"), line
        (tmp_path / "gateway.yaml").write_text("gateway:\n  id: gw1\n  site: farm\n")
        (tmp_path / "profiles").mkdir()
        (tmp_path / "profiles" / "eastron-sdm630.yaml").write_text(
            (REPO / "config" / "profiles" / "eastron-sdm630.yaml").read_text())
        (tmp_path / "devices").mkdir()
        for dev_id, unit in (("meter", 1), ("gone", 7)):
            (tmp_path / "devices" / f"{dev_id}.yaml").write_text(
                f"id: {dev_id}\nprotocol: modbus_rtu_dtu\nprofile: eastron-sdm630\nunit_id: {unit}\n"
                f"listen: 127.0.0.1:{port}\ntimeout: 300ms\n"
                "dtu:\n  id: barn\n  registration: {text: BARN}\n  heartbeat: {text: HB}\n"
                "  registration_timeout: 5s\n")
        assert main(["once", "-c", str(tmp_path)]) == 1
        out, err = capsys.readouterr()
        assert out.startswith("meter (good)") and "gone: no answer" in err
