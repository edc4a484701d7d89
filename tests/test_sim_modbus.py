"""The Modbus TCP simulator over a real socket: raw MBAP frames in, the driver's codec to decode.

The client here is deliberately tiny and separate from the gateway's: it sends anything
(writes, bad lengths), which the gateway's read-only client cannot.
"""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.client import ModbusTcpClient
from drivers.modbus.codec import RequestDecoder
from drivers.modbus.planner import plan
from drivers.modbus.profile import ProfileModel, points_of
from gateway.yamlpos import ConfigErrors
from simulators.modbus_device import (
    GATEWAY_NO_RESPONSE,
    ILLEGAL_ADDRESS,
    ILLEGAL_FUNCTION,
    ILLEGAL_VALUE,
    SimDevice,
)
from simulators.modbus_tcp import ModbusTcpServer
from simulators.simulation import load_simulation, main_sim, run_simulator

REPO = Path(__file__).resolve().parent.parent


class RawClient:
    """Speaks MBAP frames; ``request`` returns the reply PDU or raises TimeoutError."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.tid = 0

    async def __aenter__(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass

    def send(self, unit: int, pdu: bytes) -> int:
        self.tid += 1
        self.writer.write(struct.pack(">HHHB", self.tid, 0, len(pdu) + 1, unit) + pdu)
        return self.tid

    async def recv(self, timeout: float = 1.0) -> tuple[int, int, bytes]:
        async with asyncio.timeout(timeout):
            tid, _pid, length, unit = struct.unpack(">HHHB", await self.reader.readexactly(7))
            return tid, unit, await self.reader.readexactly(length - 1)

    async def request(self, unit: int, pdu: bytes, timeout: float = 1.0) -> bytes:
        tid = self.send(unit, pdu)
        got_tid, got_unit, reply = await self.recv(timeout)
        assert (got_tid, got_unit) == (tid, unit)
        return reply

    async def read(self, unit: int, function: int, address: int, count: int, timeout: float = 1.0) -> bytes:
        return await self.request(unit, struct.pack(">BHH", function, address, count), timeout)


def profile(*points: dict[str, Any], **extra: Any) -> ProfileModel:
    return ProfileModel.model_validate({"protocol": "modbus", "points": list(points), **extra})


def const(value: Any) -> dict[str, Any]:
    return {"signal": "constant", "value": value}


def registers(reply: bytes) -> list[int]:
    assert reply[1] == len(reply) - 2, reply.hex()
    return list(struct.unpack(f">{reply[1] // 2}H", reply[2:]))


# --------------------------------------------------------------------------- values
# (type, byte_order, extra point keys, simulated value, expected decoded value)
VALUES: list[tuple[str, str, dict[str, Any], Any, Any]] = [
    ("int16", "ABCD", {}, -1234, -1234),
    ("int16", "BADC", {}, -1234, -1234),
    ("uint16", "ABCD", {}, 65535, 65535),
    ("uint16", "DCBA", {}, 513, 513),
    *[("int32", o, {}, -123456789, -123456789) for o in ("ABCD", "BADC", "CDAB", "DCBA")],
    ("uint32", "CDAB", {}, 4_000_000_000, 4_000_000_000),
    *[("int64", o, {}, -1234567890123, -1234567890123) for o in ("ABCD", "BADC", "CDAB", "DCBA")],
    ("uint64", "DCBA", {}, 2**63 + 5, 2**63 + 5),
    *[("float32", o, {}, 21.5, 21.5) for o in ("ABCD", "BADC", "CDAB", "DCBA")],
    *[("float64", o, {}, 3.141592653589793, 3.141592653589793) for o in ("ABCD", "BADC", "CDAB", "DCBA")],
    ("string", "ABCD", {"length": 4}, "SDM630", "SDM630"),
    ("string", "BADC", {"length": 3}, "AB-1", "AB-1"),
    ("int16", "ABCD", {"scale": 0.1}, 21.7, 21.7),
    ("uint16", "ABCD", {"scale": 0.1, "offset": -40}, -12.3, -12.3),
    ("int32", "CDAB", {"scale": 0.01}, 1234.56, 1234.56),
    ("float32", "ABCD", {"scale": 2, "offset": 1}, 9.0, 9.0),
    ("uint16", "ABCD", {}, 70000, 70000 - 65536),  # an overflowing counter wraps like a device's
]


async def test_values_decode_back_through_the_drivers_codec() -> None:
    points: list[dict[str, Any]] = []
    expected: dict[str, Any] = {}
    address = 0
    for i, (type_, order, extra, value, decoded) in enumerate(VALUES):
        points.append({"name": f"p{i}", "kind": "holding", "address": address, "type": type_,
                       "byte_order": order, "sim": const(value), **extra})
        expected[f"p{i}"] = decoded
        address += extra.get("length", {"16": 1, "32": 2, "64": 4}.get(type_[-2:], 1))
    # Bits: three flags in one status register, one in a byte-swapped register, coils, discretes.
    points += [
        {"name": "b0", "kind": "holding", "address": 100, "bit": 0, "sim": const(True)},
        {"name": "b3", "kind": "holding", "address": 100, "bit": 3, "sim": const("true")},
        {"name": "b5", "kind": "holding", "address": 100, "bit": 5, "sim": const(False)},
        {"name": "sw9", "kind": "holding", "address": 101, "bit": 9, "byte_order": "BADC", "sim": const(1)},
        {"name": "in_bit", "kind": "input", "address": 7, "bit": 15, "sim": const(True)},
        {"name": "c0", "kind": "coil", "address": 0, "sim": const(True)},
        {"name": "c9", "kind": "coil", "address": 9, "sim": const(True)},
        {"name": "c4", "kind": "coil", "address": 4, "sim": const(False)},
        {"name": "d2", "kind": "discrete", "address": 2, "sim": const(1)},
    ]
    expected |= {"b0": True, "b3": True, "b5": False, "sw9": True, "in_bit": True,
                 "c0": True, "c9": True, "c4": False, "d2": True}
    prof = profile(*points)
    requests = plan(points_of(prof), max_gap=200)
    async with ModbusTcpServer([SimDevice(prof, 1)]) as server, RawClient(server.port) as client:
        out: dict[str, Any] = {}
        for req in requests:
            reply = await client.read(1, req.function, req.address, req.count)
            assert reply[0] == req.function, f"{req}: {reply.hex()}"
            assert RequestDecoder(req).decode(reply[2:], out) == []
    assert out == pytest.approx(expected)
    assert set(out) == set(expected)


async def test_default_signals_and_gaps() -> None:
    prof = profile({"name": "t", "kind": "input", "address": 2, "type": "int16", "scale": 0.1,
                    "valid": {"min": 10, "max": 30}},
                   {"name": "label", "kind": "input", "address": 3, "type": "string", "length": 2})
    dev = SimDevice(prof, 1, origin=time.time())
    async with ModbusTcpServer([dev]) as server, RawClient(server.port) as client:
        regs = registers(await client.read(1, 4, 0, 5))
    assert regs[:2] == [0, 0]  # not in the profile: reads as 0
    assert 150 <= regs[2] <= 250  # default: slow sine across valid, starting mid-range (20.0)
    assert struct.pack(">2H", *regs[3:]) == b"labe"  # a string point reads as its name


# --------------------------------------------------------------------------- counters
async def test_counter_advances_once_per_read_that_covers_it() -> None:
    prof = profile({"name": "n", "kind": "holding", "address": 0, "type": "uint32",
                    "sim": {"signal": "counter", "start": 10, "step": 1}},
                   {"name": "other", "kind": "holding", "address": 5, "type": "uint16"})
    server = ModbusTcpServer([SimDevice(prof, 1)])
    async with server, RawClient(server.port) as client:
        seen = [registers(await client.read(1, 3, 0, 2))[1] for _ in range(3)]
        await client.read(1, 3, 5, 1)  # does not cover the counter
        seen.append(registers(await client.read(1, 3, 1, 1))[0])  # half of it: still one read
        server.set_faults(1, exception=4)
        assert (await client.read(1, 3, 0, 2))[0] == 0x83
        server.set_faults(1, no_answer=True)
        with pytest.raises(TimeoutError):
            await client.read(1, 3, 0, 2, timeout=0.1)
        server.set_faults(1)
        seen.append(registers(await client.read(1, 3, 0, 6))[1])
    assert seen == [10, 11, 12, 13, 14]  # faulted requests did not consume a value


# --------------------------------------------------------------------------- protocol errors
async def test_illegal_address_count_and_function() -> None:
    prof = profile({"name": "a", "kind": "holding", "address": 10, "type": "float32"})
    async with ModbusTcpServer([SimDevice(prof, 1)]) as server, RawClient(server.port) as client:
        assert registers(await client.read(1, 3, 0, 12)) [:10] == [0] * 10
        assert await client.read(1, 3, 11, 2) == bytes([0x83, ILLEGAL_ADDRESS])  # past the last point
        assert await client.read(1, 4, 0, 1) == bytes([0x84, ILLEGAL_ADDRESS])  # no input registers
        assert await client.read(1, 1, 0, 1) == bytes([0x81, ILLEGAL_ADDRESS])
        assert await client.read(1, 3, 0, 0) == bytes([0x83, ILLEGAL_VALUE])
        assert await client.read(1, 3, 0, 126) == bytes([0x83, ILLEGAL_VALUE])
        assert await client.request(1, bytes([0x2B, 0x0E, 1, 0])) == bytes([0xAB, ILLEGAL_FUNCTION])
        assert await client.request(1, bytes([3, 0, 0])) == bytes([0x83, ILLEGAL_VALUE])  # short PDU
        assert server.stats.exceptions[(1, ILLEGAL_ADDRESS)] == 3


WRITES = [bytes.fromhex("050000ff00"), bytes.fromhex("0600000007"),
          bytes.fromhex("0f0000000201" "03"), bytes.fromhex("10000000010200" "07")]


async def test_writes_are_refused_and_counted() -> None:
    prof = profile({"name": "a", "kind": "holding", "address": 0, "type": "uint16"},
                   {"name": "c", "kind": "coil", "address": 0})
    async with ModbusTcpServer([SimDevice(prof, 1)]) as server, RawClient(server.port) as client:
        for pdu in WRITES:
            assert await client.request(1, pdu) == bytes([pdu[0] | 0x80, ILLEGAL_FUNCTION])
        await client.read(1, 3, 0, 1)
    assert server.stats.writes == 4
    assert server.stats.count(function=3) == 1 and server.stats.count(unit=1) == 5


async def test_a_writable_device_keeps_what_was_written() -> None:
    prof = profile({"name": "a", "kind": "holding", "address": 0, "type": "uint16", "sim": const(1)},
                   {"name": "c", "kind": "coil", "address": 1})
    async with ModbusTcpServer([SimDevice(prof, 1, writable=True)]) as server, RawClient(server.port) as client:
        for pdu in WRITES:
            assert (await client.request(1, pdu))[0] == pdu[0]
        assert registers(await client.read(1, 3, 0, 1)) == [7]
        assert (await client.read(1, 1, 0, 2))[2] == 0b11
        assert await client.request(1, bytes.fromhex("0600050001")) == bytes([0x86, ILLEGAL_ADDRESS])


# --------------------------------------------------------------------------- units and faults
async def test_many_unit_ids_on_one_port_and_unknown_units() -> None:
    devices = [SimDevice(profile({"name": "v", "kind": "input", "address": 0, "type": "uint16",
                                  "sim": const(100 + u)}), u) for u in (1, 2, 7)]
    async with ModbusTcpServer(devices) as server, RawClient(server.port) as client:
        assert [registers(await client.read(u, 4, 0, 1))[0] for u in (1, 2, 7)] == [101, 102, 107]
        assert await client.read(9, 4, 0, 1) == bytes([0x84, GATEWAY_NO_RESPONSE])
        server.unknown_unit = "silent"
        with pytest.raises(TimeoutError):
            await client.read(9, 4, 0, 1, timeout=0.1)
    assert server.describe() == f"simulating 3 devices on 127.0.0.1:{server.port} (unit ids 1, 2, 7)"
    assert server.stats.count(unit=9) == 2


def two_units() -> list[SimDevice]:
    prof = profile({"name": "v", "kind": "holding", "address": 0, "type": "uint16", "sim": const(5)})
    return [SimDevice(prof, 1), SimDevice(prof, 2)]


async def test_no_answer_and_delay_hold_up_only_their_unit() -> None:
    async with ModbusTcpServer(two_units()) as server, RawClient(server.port) as client:
        server.faults(1).no_answer = True
        client.send(1, bytes.fromhex("0300000001"))
        assert registers(await client.read(2, 3, 0, 1)) == [5]  # unit 2 is not affected
        server.faults(1).no_answer = False
        server.faults(1).delay = 0.3
        start = time.monotonic()
        slow = client.send(1, bytes.fromhex("0300000001"))
        fast = client.send(2, bytes.fromhex("0300000001"))
        first, second = await client.recv(), await client.recv()
        assert (first[0], second[0]) == (fast, slow)
        assert time.monotonic() - start >= 0.29
        with pytest.raises(TimeoutError):  # the silenced request was never answered late
            await client.recv(timeout=0.05)


async def test_exception_and_disconnect_faults() -> None:
    async with ModbusTcpServer(two_units()) as server:
        server.set_faults(1, exception=GATEWAY_NO_RESPONSE)
        async with RawClient(server.port) as client:
            assert await client.read(1, 3, 0, 1) == bytes([0x83, GATEWAY_NO_RESPONSE])
            server.set_faults(1, disconnect=True)
            client.send(1, bytes.fromhex("0300000001"))
            assert await client.reader.read() == b""  # closed by the server
        async with RawClient(server.port) as client:  # a new connection works, for the other unit
            assert registers(await client.read(2, 3, 0, 1)) == [5]
    assert server.stats.connections == 2


async def test_refuse_and_resume_on_the_same_port() -> None:
    async with ModbusTcpServer(two_units()) as server:
        port = server.port
        async with RawClient(port) as client:
            await server.refuse()
            assert await client.reader.read() == b""  # open connections are closed too
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        await server.resume()
        assert server.port == port
        async with RawClient(port) as client:
            assert registers(await client.read(2, 3, 0, 1)) == [5]


async def test_the_gateways_own_client_reads_the_simulator() -> None:
    prof = profile({"name": "n", "kind": "input", "address": 3, "type": "float32", "byte_order": "CDAB",
                    "sim": const(-7.25)})
    async with ModbusTcpServer([SimDevice(prof, 4)]) as server:
        client = ModbusTcpClient("127.0.0.1", server.port)
        await client.connect(1.0)
        try:
            data = await client.read(4, 4, 3, 2, timeout=1.0)
        finally:
            await client.close()
    out: dict[str, Any] = {}
    RequestDecoder(plan(points_of(prof))[0]).decode(data, out)
    assert out == {"n": -7.25}


# --------------------------------------------------------------------------- configuration
PROFILE_YAML = """\
protocol: modbus
points:
  - {name: n, kind: holding, address: 0, type: uint16, sim: {signal: counter, start: 1}}
"""


def write_sim(tmp_path: Path, text: str) -> Path:
    (tmp_path / "profiles").mkdir(exist_ok=True)
    (tmp_path / "profiles" / "counter.yaml").write_text(PROFILE_YAML)
    (tmp_path / "sim.yaml").write_text(text)
    return tmp_path / "sim.yaml"


async def test_sim_yaml_groups_ports_and_applies_faults(tmp_path: Path) -> None:
    path = write_sim(tmp_path, """\
unknown_unit: silent
devices:
  - {profile: counter, port: 0, unit_id: 3}
  - {profile: counter, port: 0, unit_id: 4, faults: {exception: 6}}
""")
    servers = load_simulation(path)
    assert [list(s.devices) for s in servers] == [[3], [4]]  # port 0: a server (and free port) each
    assert servers[1].faults(4).exception == 6 and servers[0].unknown_unit == "silent"
    async with servers[1] as server, RawClient(server.port) as client:
        assert await client.read(4, 3, 0, 1) == bytes([0x83, 6])


def test_sim_yaml_errors_are_located(tmp_path: Path) -> None:
    path = write_sim(tmp_path, """\
devices:
  - {profile: counter, port: 5020, unit_id: 1}
  - {profile: countr, port: 5020, unit_id: 2}
  - {profile: counter, port: 5020, unit_id: 1}
  - profile: counter
    port: 5021
    faults: {delay: 2, no_anwser: true}
servers:
  5099: {unknown_unit: silent}
""")
    with pytest.raises(ConfigErrors) as exc:
        load_simulation(path)
    lines = [str(e).replace(str(path), "sim.yaml") for e in exc.value.errors]
    assert lines == [
        "sim.yaml:7:21: delay: duration 2 has no unit — write it with one, e.g. '2s' or '2ms'",
        "sim.yaml:7:24: unknown key 'no_anwser' — did you mean 'no_answer'?",
    ], lines
    (tmp_path / "sim.yaml").write_text((tmp_path / "sim.yaml").read_text().replace(
        "{delay: 2, no_anwser: true}", "{delay: 2s, no_answer: true}"))
    with pytest.raises(ConfigErrors) as exc:
        load_simulation(path)
    lines = [str(e).replace(str(path), "sim.yaml") for e in exc.value.errors]
    assert lines == [
        "sim.yaml:3:15: unknown profile 'countr' — did you mean 'counter'?",
        "sim.yaml:4:45: port 5020 unit id 1 is already simulated by device 1 — give each device on one port "
        "its own unit_id",
        "sim.yaml:9:3: no device is simulated on port 5099 — remove these options or fix the port number",
    ], lines


def test_gateway_config_is_served_as_written(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "counter.yaml").write_text(PROFILE_YAML)
    (tmp_path / "gateway.yaml").write_text("gateway: {id: gw, site: test}\n")
    (tmp_path / "devices").mkdir()
    for name, host, port, unit, enabled in [("a", "127.0.0.1", 15020, 1, True), ("b", "localhost", 15020, 2, True),
                                            ("c", "10.0.0.9", 502, 1, True), ("d", "127.0.0.1", 15021, 1, False),
                                            ("e", "127.0.0.1", 15022, 5, True)]:
        (tmp_path / "devices" / f"{name}.yaml").write_text(
            f"{{id: {name}, protocol: modbus_tcp, profile: counter, host: {host}, port: {port}, "
            f"unit_id: {unit}, enabled: {str(enabled).lower()}}}\n")
    servers = load_simulation(tmp_path)
    assert [(s.host, s.port, sorted(s.devices)) for s in servers] == [
        ("127.0.0.1", 15020, [1, 2]), ("127.0.0.1", 15022, [5])]
    assert servers[0].devices[2].name == "b"


async def test_run_simulator_prints_each_server_and_stops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sim(tmp_path, "devices: [{profile: counter, port: 0, unit_id: 1}]\n")
    stop = asyncio.Event()
    started: list[ModbusTcpServer] = []

    def ready(servers: list[ModbusTcpServer]) -> None:
        started.extend(servers)
        stop.set()

    await run_simulator(path, ready=ready, stop=stop)
    assert capsys.readouterr().out == f"simulating 1 devices on 127.0.0.1:{started[0].port} (unit ids 1)\n"
    assert not started[0].listening


def test_main_sim_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sim(tmp_path, "devices: [{profile: counter, port: 0, unit: 1}]\n")
    assert main_sim([str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'unit' — did you mean 'unit_id'?" in err and "nothing was started" in err


@pytest.mark.parametrize("target", ["config/sim.yaml", "config"])
def test_shipped_configs_load(target: str) -> None:
    servers = load_simulation(REPO / target)
    assert servers and all(s.devices for s in servers)
