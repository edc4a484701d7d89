"""The Modbus TCP poller over real loopback sockets: error kinds, logging once per state change,
isolation of dead units and dead connections, reconnects, stale replies, aligned schedules; and
the protocol-independent parts in gateway.polling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import statistics
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import support
from support import until

from drivers.modbus.profile import ProfileModel
from drivers.modbus.tcp import DeviceModel, ModbusTcpPoller, make_pollers
from gateway.reading import shortest_float32
from gateway.driver import Device
from gateway.polling import Backoff, Health, Schedule, next_aligned
from gateway.reading import GOOD, UNCERTAIN, Reading
import itertools

READS = {1, 2, 3, 4}


# --------------------------------------------------------------------------- a small test server
@dataclass
class Unit:
    """How one unit id behind the test server behaves."""

    mode: str = "ok"  # ok | dead (never answers) | exception | hangup (closes the connection)
    code: int = 2
    value: int = 42  # every register reads this
    delays: list[tuple[float, int]] = field(default_factory=list)  # per request: (delay, value) overrides


class ModbusTestServer:
    """A Modbus TCP server on a free loopback port, written against the MBAP spec, that records
    every request (time, unit, function code, address, count) and can misbehave per unit."""

    def __init__(self, units: dict[int, Unit], port: int = 0, *, listen: bool = True) -> None:
        self.units = units
        self._listen_now = listen
        self.requests: list[tuple[float, int, int, int, int]] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = port
        self.connections = 0

    async def __aenter__(self) -> ModbusTestServer:
        if self._listen_now:
            await self.listen()
        return self

    async def listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        if self._server is None:
            return
        self._server.close()
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        assert {fc for _t, _u, fc, _a, _c in self.requests} <= READS, "the gateway sent a write"

    def drop_connections(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    def requests_for(self, unit: int) -> list[float]:
        return [t for t, u, *_ in self.requests if u == unit]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        loop = asyncio.get_running_loop()
        try:
            while True:
                tid, proto, length, unit_id = struct.unpack(">HHHB", await reader.readexactly(7))
                pdu = await reader.readexactly(length - 1)
                fc, address, count = struct.unpack(">BHH", pdu[:5])
                self.requests.append((time.monotonic(), unit_id, fc, address, count))
                unit = self.units.get(unit_id)
                if unit is not None and unit.mode == "hangup":
                    break
                if unit is None or unit.mode == "dead" or proto != 0:
                    continue
                delay, value = unit.delays.pop(0) if unit.delays else (0.0, unit.value)
                if unit.mode == "exception":
                    reply = bytes([fc | 0x80, unit.code])
                elif fc in (1, 2):
                    nbytes = (count + 7) // 8
                    reply = bytes([fc, nbytes]) + (b"\x55" * nbytes)
                else:
                    reply = bytes([fc, 2 * count]) + struct.pack(f">{count}H", *([value] * count))
                frame = struct.pack(">HHHB", tid, 0, len(reply) + 1, unit_id) + reply
                if delay:
                    loop.call_later(delay, lambda f=frame: writer.is_closing() or writer.write(f))
                else:
                    writer.write(frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)


def free_port() -> int:
    """A loopback port nothing listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PROFILE = ProfileModel.model_validate({
    "protocol": "modbus",
    "points": [{"name": "value", "kind": "holding", "address": 0, "type": "uint16"}],
})


def device(dev_id: str, port: int, unit: int = 1, profile: ProfileModel = PROFILE, **settings: Any) -> Device:
    return support.device(DeviceModel, profile, {
        "id": dev_id, "protocol": "modbus_tcp", "profile": "p", "host": "127.0.0.1", "port": port,
        "unit_id": unit, "interval": "50ms", "timeout": "30ms", "retries": 0, "backoff_max": "100ms"}, **settings)


def running(pollers: list[ModbusTcpPoller]) -> contextlib.AbstractAsyncContextManager[list[Reading]]:
    """Run pollers as the gateway does (one task each); yields the list readings arrive in."""
    return support.running(*pollers)


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def by_device(readings: list[Reading], dev_id: str) -> list[float]:
    return [r.time_ns / 1e9 for r in readings if r.device == dev_id]


# --------------------------------------------------------------------------- the poller
async def test_error_kinds_are_distinct_and_logged_once_per_state_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    units = {1: Unit(), 2: Unit("dead"), 3: Unit("exception", code=2)}
    refused_port = free_port()
    async with ModbusTestServer(units) as server:
        # 200 ms, not 30: on a busy machine a 30 ms (re)connect can time out and count as 'unreachable'
        slow = {"timeout": "200ms"}
        pollers = make_pollers([device("alive", server.port, 1, **slow), device("dead", server.port, 2, **slow),
                                device("broken", server.port, 3, **slow), device("nobody", refused_port, **slow)])
        assert [p.name for p in pollers] == [f"127.0.0.1:{server.port}", f"127.0.0.1:{refused_port}"]
        status = {**pollers[0].status, **pollers[1].status}
        async with running(pollers) as readings:
            await until(lambda: status["dead"].errors.get("timeout", 0) >= 2 and status["broken"].errors.get("exception", 0) >= 2
                        and status["nobody"].errors.get("refused", 0) >= 2, what="two errors of each kind", state=lambda: status)
            units[2].mode = "ok"  # the dead unit comes back
            await until(lambda: status["dead"].up and any(r.device == "dead" for r in readings), what="the dead unit back")
    assert status["dead"].errors["timeout"] >= 2 and set(status["dead"].errors) == {"timeout"}
    assert status["broken"].errors["exception"] >= 2 and set(status["broken"].errors) == {"exception"}
    assert status["nobody"].errors["refused"] >= 2 and set(status["nobody"].errors) == {"refused"}
    assert status["alive"].errors == {} and status["alive"].up and status["dead"].up
    assert not status["broken"].up and not status["nobody"].up

    (dead,) = warnings_about(caplog, "dead:")
    assert f"127.0.0.1:{server.port} unit 2" in dead and "(address 0)" in dead and "no answer within 200ms" in dead
    assert "check the unit id" in dead
    (broken,) = warnings_about(caplog, "broken:")
    assert "unit 3" in broken and "exception 2 (illegal data address)" in broken and "check the profile" in broken
    (refused,) = warnings_about(caplog, "refused")
    assert f"connection 127.0.0.1:{refused_port}" in refused and "(devices nobody)" in refused
    assert "check the port" in refused
    assert not warnings_about(caplog, "alive")
    back = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dead: answering again")]
    assert len(back) == 1 and "(timeout)" in back[0]
    assert {r.device for r in readings} == {"alive", "dead"}
    assert all(r.quality == GOOD and r.fields == {"value": 42} for r in readings)


async def test_dead_unit_costs_its_timeout_only(caplog: pytest.LogCaptureFixture) -> None:
    units = {1: Unit(), 2: Unit("dead")}
    async with ModbusTestServer(units) as server:
        (poller,) = make_pollers([
            device("alive", server.port, 1, interval="100ms", timeout="50ms"),
            device("dead", server.port, 2, interval="100ms", timeout="50ms", retries=1, backoff_max="400ms")])
        async with running([poller]) as readings:
            # ...and no probe of the dead unit in flight (its timeout not yet counted)
            await until(lambda: len(by_device(readings, "alive")) >= 10
                        and poller.status["dead"].errors.get("timeout", 0) == len(server.requests_for(2)) - 1,
                        what="10 readings of the live unit, no probe in flight")
            span = time.monotonic() - server.requests[0][0]
    times = by_device(readings, "alive")
    assert len(times) >= 10, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < 0.1 + 0.1 + 0.06, gaps  # its interval + the dead unit's worst poll (2 × 50ms)
    probes = server.requests_for(2)
    # first poll: 1 + retries attempts; then single probes after 100, 200, 400, 400 ms (never sooner)
    assert 3 <= len(probes) <= 4 + span / 0.4 + 1, (probes, span)
    assert all(b - a >= 0.09 for a, b in itertools.pairwise(probes[1:])), probes
    assert poller.status["dead"].errors["timeout"] == len(probes) - 1  # the retry of the first poll is one error


async def test_dead_connection_does_not_delay_another_poller() -> None:
    async with ModbusTestServer({1: Unit()}) as live, ModbusTestServer({}) as blackhole:
        pollers = make_pollers([
            device("live", live.port, interval="50ms"),
            device("silent-1", blackhole.port, 1, timeout="400ms", interval="100ms"),
            device("silent-2", blackhole.port, 2, timeout="400ms", interval="100ms"),
            device("refused", free_port(), timeout="400ms")])
        assert len(pollers) == 3
        async with running(pollers) as readings:
            await until(lambda: len(by_device(readings, "live")) >= 12, what="12 readings of the live device")
    times = by_device(readings, "live")
    assert len(times) >= 12, times
    assert max(b - a for a, b in itertools.pairwise(times)) < 0.2  # the silent devices time out after 400ms
    assert {r.device for r in readings} == {"live"}


async def test_connection_closed_while_idle_is_reopened_quietly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with ModbusTestServer({1: Unit(), 2: Unit(value=7)}) as server:
        (poller,) = make_pollers([device("a", server.port, 1, interval="100ms", timeout="200ms"),
                                  device("b", server.port, 2, interval="100ms", timeout="200ms")])  # 30 ms reconnects time out when busy
        async with running([poller]) as readings:
            dropped = 0.0
            for _ in range(3):
                await until(lambda since=dropped: {"a", "b"} <= {r.device for r in readings if r.time_ns / 1e9 > since},
                            what="a reading of each device since the last drop")
                server.drop_connections()  # as devices do with clients idle for too long
                dropped = time.time()
            await until(lambda: {"a", "b"} <= {r.device for r in readings if r.time_ns / 1e9 > dropped},
                        what="a reading of each device after the last drop")
    after = [r for r in readings if r.time_ns / 1e9 > dropped]
    assert {r.device: r.fields["value"] for r in after} == {"a": 42, "b": 7}
    assert server.connections == 4
    # Each drop landed between two polls, or (rarely, on a slow machine) during one.
    assert not warnings_about(caplog, "connection 127.0.0.1")
    assert set(poller.status["a"].errors) <= {"disconnected"} and poller.status["a"].up


async def test_unit_that_hangs_up_costs_only_itself(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with ModbusTestServer({1: Unit("hangup"), 2: Unit()}) as server:
        # 200 ms: every hang-up means a reconnect, and a 30 ms connect times out on a busy machine
        (poller,) = make_pollers([device("rude", server.port, 1, timeout="200ms"), device("fine", server.port, 2, timeout="200ms")])
        async with running([poller]) as readings:
            await until(lambda: poller.status["rude"].errors.get("disconnected", 0) >= 2
                        and len(by_device(readings, "fine")) >= 9, what="two hang-ups and 9 good readings")
    assert poller.status["rude"].errors["disconnected"] >= 2 and not poller.status["rude"].up
    (rude,) = warnings_about(caplog, "rude:")
    assert "unit 1" in rude and "connection closed by the device" in rude and "no other master" in rude
    assert len(by_device(readings, "fine")) >= 9
    assert not warnings_about(caplog, "fine") and not warnings_about(caplog, "connection 127.0.0.1")
    # connected once at start; each hang-up is followed by a quiet reconnect, never a log line
    assert sum(m.startswith("connection") for m in caplog.messages) == 1


async def test_refused_connection_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    async with ModbusTestServer({1: Unit()}, port, listen=False) as server:
        (poller,) = make_pollers([device("late", port, timeout="200ms")])  # a 30 ms connect can time out when busy
        async with running([poller]) as readings:
            await until(lambda: poller.status["late"].errors.get("refused", 0) >= 2, what="two refused attempts")
            assert readings == []
            await server.listen()
            await until(lambda: readings, what="a reading once the port listens")
    assert readings and {r.device for r in readings} == {"late"}
    assert poller.status["late"].errors["refused"] >= 2 and poller.status["late"].up
    (refused,) = warnings_about(caplog, "refused")
    assert refused.startswith(f"connection 127.0.0.1:{port}: connection to 127.0.0.1:{port} refused (devices late)")
    back = [m for m in caplog.messages if m.startswith(f"connection 127.0.0.1:{port}: reconnected after")]
    assert len(back) == 1 and back[0].endswith("(refused)")
    assert sum(m.startswith("late: answering again") and m.endswith("(refused)") for m in caplog.messages) == 1


async def test_late_reply_is_discarded_not_taken_for_the_next(caplog: pytest.LogCaptureFixture) -> None:
    # First request answered after 80 ms (timeout 50 ms) with a wrong value; the retry is answered
    # at ~90 ms, so the stale reply arrives while the retry waits and must be ignored.
    unit = Unit(delays=[(0.08, 0xDEAD), (0.04, 42)])
    async with ModbusTestServer({1: unit}) as server:
        (poller,) = make_pollers([device("slow", server.port, timeout="50ms", retries=1)])
        async with poller:
            (reading,) = await poller.poll_once()
            (second,) = await poller.poll_once()
            stale = poller.client.stale_replies
    assert reading.fields == {"value": 42} == second.fields
    assert reading.quality == GOOD
    assert stale == 1
    assert poller.status["slow"].errors == {}  # a retry that succeeded is not an error
    assert not warnings_about(caplog, "slow")


async def test_only_read_function_codes_are_sent() -> None:
    profile = ProfileModel.model_validate({"protocol": "modbus", "points": [
        {"name": "c", "kind": "coil", "address": 0}, {"name": "d", "kind": "discrete", "address": 3},
        {"name": "h", "kind": "holding", "address": 0, "type": "int16"},
        {"name": "i", "kind": "input", "address": 0, "type": "float32"}]})
    async with ModbusTestServer({1: Unit()}) as server:
        (poller,) = make_pollers([device("all", server.port, profile=profile)])
        async with poller:
            (reading,) = await poller.poll_once()
    # every bit the test server sends is 0x55: the first bit of each request is set
    assert reading.fields == {"c": True, "d": True, "h": 42, "i": shortest_float32(struct.unpack(">f", b"\x00\x2a\x00\x2a")[0])}
    assert sorted(fc for _t, _u, fc, _a, _c in server.requests) == [1, 2, 3, 4]


async def test_partial_failure_gives_an_uncertain_reading() -> None:
    profile = ProfileModel.model_validate({"protocol": "modbus", "max_gap": 0, "points": [
        {"name": "ok", "kind": "holding", "address": 0, "type": "uint16"},
        {"name": "high", "kind": "holding", "address": 10, "type": "uint16", "valid": {"max": 10}},
        {"name": "late", "kind": "input", "address": 0, "type": "uint16"}]})
    unit = Unit(delays=[(0.0, 42), (0.0, 42), (0.2, 42)])  # the input request times out
    async with ModbusTestServer({1: unit}) as server:
        (poller,) = make_pollers([device("part", server.port, profile=profile)])
        async with poller:
            (reading,) = await poller.poll_once()
    assert reading.fields == {"ok": 42} and reading.quality == UNCERTAIN
    assert poller.status["part"].errors == {"timeout": 1} and poller.status["part"].up


async def test_poll_once_on_a_refused_connection_returns_nothing() -> None:
    (poller,) = make_pollers([device("x", free_port())])
    async with poller:
        assert await poller.poll_once() == []
    assert poller.status["x"].errors == {"refused": 1} and not poller.status["x"].up


async def test_devices_with_the_same_interval_poll_at_the_same_instants() -> None:
    async with ModbusTestServer({1: Unit()}) as one, ModbusTestServer({1: Unit()}) as two:
        pollers = make_pollers([device("a", one.port, interval="100ms"), device("b", two.port, interval="100ms")])
        async with running(pollers) as readings:
            await until(lambda: min(len(by_device(readings, d)) for d in ("a", "b")) >= 6, what="6 readings of each")
    slots = {dev: {round(t / 0.1) for t in by_device(readings, dev)} for dev in ("a", "b")}
    assert len(slots["a"] & slots["b"]) >= 4
    lateness = [(r.time_ns / 1e9) % 0.1 for r in readings]
    assert statistics.median(lateness) < 0.02, lateness


# --------------------------------------------------------------------------- gateway.polling
@pytest.mark.parametrize(("interval", "after", "expected"), [
    (1.0, 10.0, 11.0), (1.0, 10.2, 11.0), (0.1, 0.3, 0.4), (5.0, 1_700_000_001.0, 1_700_000_005.0),
    (0.05, 12.34, 12.35)])
def test_next_aligned(interval: float, after: float, expected: float) -> None:
    assert next_aligned(interval, after) == pytest.approx(expected)
    assert next_aligned(interval, after) > after


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(0.5, 3.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_schedule_aligns_backs_off_and_skips_missed_slots() -> None:
    now = [100.25]
    schedule: Schedule[str] = Schedule(clock=lambda: now[0])
    schedule.add("a", 1.0, 8.0)
    schedule.add("b", 1.0, 8.0)
    # The first poll is at once; from then on, the aligned slots.
    assert schedule.first() == ("a", 100.25) and schedule.due("b") == 100.25  # ties: first added
    now[0] = 100.26
    schedule.succeeded("a")
    schedule.succeeded("b")
    assert schedule.first() == ("a", 101.0) and schedule.due("b") == 101.0
    now[0] = 101.01
    schedule.succeeded("a")
    assert schedule.first() == ("b", 101.0)
    assert [schedule.failed("b") for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert schedule.due("b") == pytest.approx(109.01)
    now[0] = 104.5  # "a" was due at 102 but polled late: the missed slots are skipped
    schedule.succeeded("a")
    assert schedule.due("a") == 105.0
    schedule.succeeded("b")
    assert schedule.due("b") == 110.0


def test_health_logs_once_per_state_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = [0.0]
    health = Health("meter", clock=lambda: clock[0])
    health.ok()
    for _ in range(3):
        health.count("timeout", "t")
        health.down("timeout", "no answer — check wiring")
    clock[0] = 90.0
    health.down("refused", "refused — check port")
    health.down("refused", "refused — check port")
    health.degraded("exception", "exception 2 — check address")
    health.ok()
    health.ok()
    health.down("disconnected", "quietly", quiet=True)
    health.ok()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "meter: answering"),
        ("WARNING", "meter: no answer — check wiring"),
        ("WARNING", "meter: refused — check port"),
        ("WARNING", "meter: exception 2 — check address"),
        ("INFO", "meter: reading every point again after 0ms (exception)"),
        ("INFO", "meter: answering again after 0ms (disconnected)"),
    ]
    link = Health("connection x", clock=lambda: clock[0], words=("connected", "reconnected"))
    link.ok()
    link.down("refused", "refused")
    link.ok()
    assert [r.getMessage() for r in caplog.records[-3:]] == [
        "connection x: connected", "connection x: refused", "connection x: reconnected after 0ms (refused)"]
    assert health.status.errors == {"timeout": 3} and health.status.up
