"""sluice read and sluice scan (gateway.cli.commission) against the simulators: a pty RTU bus with a
few units, the Modbus TCP simulator, a silent bus (every unit id probed exactly once, one attempt
each), a serial port the gateway holds (refused, saying so), and the byte-order table checked
against the driver's own encoder."""

from __future__ import annotations

import asyncio
import io
import json
import struct
from typing import Any

import pytest

from drivers.modbus.codec import encode
from drivers.modbus.profile import ProfileModel, points_of
from drivers.modbus.rtu import SerialLink
from gateway.cli.commands import build_parser
from gateway.cli.commission import Progress, interpret_pairs, read_command, scan_command
from gateway.units import parse_duration
from simulators.modbus_device import Faults, SimDevice
from simulators.modbus_rtu import RtuBus
from simulators.modbus_tcp import ModbusTcpServer
from gateway.cli.commission import _parities

PROFILE = ProfileModel.model_validate({"protocol": "modbus", "points": [
    {"name": "volts", "kind": "holding", "address": 0, "type": "float32", "byte_order": "CDAB",
     "sim": {"signal": "constant", "value": 230.3}},
    {"name": "model", "kind": "holding", "address": 2, "type": "string", "length": 4,
     "sim": {"signal": "constant", "value": "SDM630"}},
    {"name": "alarm", "kind": "coil", "address": 3, "sim": {"signal": "constant", "value": 1}},
]})


def args(*argv: str) -> Any:
    return build_parser().parse_args(list(argv))


def unit(n: int) -> SimDevice:
    return SimDevice(PROFILE, n, name=f"meter{n}", faults=Faults())


async def run(command: Any, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    async with asyncio.timeout(30):  # a hang guard, not a timing assertion
        code = await command(args(*argv), out, err)
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- interpretations
@pytest.mark.parametrize("order", ["ABCD", "CDAB", "BADC", "DCBA"])
@pytest.mark.parametrize(("type_", "value"), [("float32", 230.3), ("int32", -123456789), ("uint32", 3_000_000_000)])
def test_every_byte_order_reads_back_what_the_driver_encodes(order: str, type_: str, value: float) -> None:
    profile = ProfileModel.model_validate({"protocol": "modbus", "points": [
        {"name": "x", "kind": "holding", "address": 7, "type": type_, "byte_order": order}]})
    (point,) = points_of(profile)
    wire = struct.pack(">2H", *encode(point, value))
    rows = {r["order"]: r for r in interpret_pairs(7, wire)}
    assert rows[order][type_] == value
    assert rows[order]["address"] == 7


def test_progress_bar_on_a_terminal_and_plain_lines_elsewhere() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, plain = Tty(), io.StringIO()
    for stream in (tty, plain):
        bar = Progress(stream, 4)
        bar.step("9600 8N1", 1, 0)
        bar.line("unit 2 answered")
        bar.step("9600 8N1", 2, 1)
        bar.end()
    assert "\r[" + "#" * 15 + "." * 15 + "] 2/4" in tty.getvalue()
    assert plain.getvalue() == "unit 2 answered\n"


# --------------------------------------------------------------------------- sluice read
async def test_read_shows_the_value_in_the_byte_order_the_manual_names() -> None:
    async with RtuBus([unit(3)]) as bus:
        code, out, err = await run(read_command, "read", bus.path, "--unit", "3", "--ref", "40001", "--count", "6")
        assert code == 0, err
        code, js, err = await run(read_command, "read", bus.path, "--unit", "3", "--count", "6", "--json")
        assert code == 0, err
        code, bits, err = await run(read_command, "read", bus.path, "--unit", "3", "--kind", "coil", "--count", "4",
                                    "--json")
        assert code == 0, err
        assert bus.stats.writes == 0
    assert "holding registers 0..5 (40001..40006)" in out
    assert any(line.split()[:1] == ["CDAB"] and line.endswith(" 230.3") for line in out.splitlines())
    assert "ascii ABCD (first character in the high byte): 'L.CfSDM630..'" in out
    doc = json.loads(js)
    cdab = next(r for r in doc["pairs"] if r["address"] == 0 and r["order"] == "CDAB")
    assert cdab["float32"] == 230.3
    assert doc["registers"][2] == {"address": 2, "reference": "40003", "hex": "53 44", "uint16": 21316,
                                   "int16": 21316, "ascii": "SD"}
    assert doc["ascii"]["ABCD"].startswith("L.CfSDM630")
    assert json.loads(bits)["bits"] == [0, 0, 0, 1]


async def test_read_over_modbus_tcp_and_a_unit_that_does_not_answer() -> None:
    async with ModbusTcpServer([SimDevice(PROFILE, 1)], unknown_unit="silent") as server:
        code, out, err = await run(read_command, "read", f"127.0.0.1:{server.port}", "--count", "2", "--json")
        assert code == 0, err
        assert json.loads(out)["pairs"][1]["float32"] == 230.3  # CDAB
        code, out, err = await run(read_command, "read", f"127.0.0.1:{server.port}", "--unit", "9", "--timeout",
                                   "50ms")
    assert code == 1 and out == ""
    assert "unit 9, holding 0+10: no answer within 50ms" in err


# --------------------------------------------------------------------------- sluice scan
async def test_scan_finds_the_units_of_a_bus_and_reports_garble() -> None:
    async with RtuBus([unit(2), unit(5), unit(7)]) as bus:
        bus.set_faults(7, crc=1.0)
        code, out, err = await run(scan_command, "scan", bus.path, "--units", "1-8", "--timeout", "50ms")
        assert bus.stats.count() == 8  # one probe per unit id, no retries
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "2 unit(s) answered (holding 0+2):"
    assert lines[1].split()[:2] == ["unit", "2"] and lines[1].endswith("19661 17254")
    assert lines[2].split()[:2] == ["unit", "5"]
    assert "garbled replies (crc)" in lines[3] and "unit(s) 7" in lines[3]
    assert "at most" in err and "unit 2 answered" in err


async def test_scan_of_a_silent_bus_probes_each_id_once_per_baud_rate_and_ends() -> None:
    async with RtuBus([]) as bus:
        code, out, err = await run(scan_command, "scan", bus.path, "--units", "1-12", "--baudrates", "9600,19200",
                                   "--timeout", "20ms", "--json")
        assert bus.stats.count() == 24
    assert code == 1
    assert json.loads(out)["found"] == []
    # the bound printed up front: 24 probes × (20 ms + the 9600-baud inter-frame silence)
    assert "12 unit ids × 2 setting(s)" in err and "20ms per probe: at most 1.57s" in err


async def test_scan_tries_every_baud_rate_and_parity_and_says_what_answered_where() -> None:
    # Wire-timed: the units hear only a port set to 19200 baud. (A pty cannot carry parity, so
    # they answer at either parity here; on RS485 only the matching one answers.)
    async with RtuBus([unit(2), unit(5)], baudrate=19200, wire_timing=True) as bus:
        code, out, err = await run(scan_command, "scan", bus.path, "--units", "1-6", "--baudrates", "9600,19200",
                                   "--parity", "N,O", "--timeout", "50ms")
        assert bus.wrong_line == 6 * sum(f"refused {bus.path} at 9600 8{p}1" not in out for p in "NO")
        assert bus.stats.count() == 6 * (4 - out.count("not tried"))  # each id once per setting tried
        code_json, out_json, _ = await run(scan_command, "scan", bus.path, "--units", "2", "--baudrates",
                                           "19200,9600", "--parity", "all", "--timeout", "50ms", "--json")
    assert code == 0, err
    assert "6 unit ids × 4 setting(s)" in err
    lines = out.splitlines()
    assert f"  at {bus.path} at 19200 8N1: unit(s) 2, 5" in lines
    assert (f"  at {bus.path} at 19200 8O1: unit(s) 2, 5" in lines) != (
        f"  not tried: the port refused {bus.path} at 19200 8O1" in lines)
    assert [line.split()[:2] for line in lines[1:3]] == [["unit", "2"], ["unit", "5"]] and "19200 8N1" in lines[1]
    assert not any("9600 8" in line for line in lines if "unit(s)" in line)
    assert code_json == 0
    report = json.loads(out_json)
    # Every setting either answered or was refused by the port (this kernel's ptys refuse some
    # parity changes with EINVAL: reported, skipped, and the scan goes on); 9600 never answered.
    answered = [f["settings"].split(" at ")[1] for f in report["found"]]
    refused = [s.split(" at ")[1] for s in report["refused_settings"]]
    assert "19200 8N1" in answered and not any(s.startswith("9600") for s in answered)
    assert sorted(answered + [s for s in refused if s.startswith("19200")]) == ["19200 8E1", "19200 8N1", "19200 8O1"]


def test_scan_parity_list_is_checked() -> None:
    assert _parities("n,e,N") == ["N", "E"] and _parities("all") == ["N", "E", "O"]
    with pytest.raises(ValueError, match="write N, E or O"):
        _parities("N,X")


async def test_scan_over_modbus_tcp_ignores_gateway_no_unit_exceptions() -> None:
    async with ModbusTcpServer([SimDevice(PROFILE, 1), SimDevice(PROFILE, 4)]) as server:  # others: exception 0x0B
        code, out, err = await run(scan_command, "scan", f"127.0.0.1:{server.port}", "--units", "0-5", "--json")
    assert code == 0, err
    assert [f["unit"] for f in json.loads(out)["found"]] == [1, 4]


async def test_read_and_scan_refuse_a_port_the_gateway_holds() -> None:
    async with RtuBus([unit(1)]) as bus:
        gateway = SerialLink(bus.path)
        await gateway.open(lambda data: None, lambda exc: None, 1.0)
        try:
            results = [await run(read_command, "read", bus.path),
                       await run(scan_command, "scan", bus.path, "--units", "1-3")]
        finally:
            gateway.close()
        assert bus.stats.count() == 0
        code, _out, err = await run(read_command, "read", bus.path, "--count", "2")  # free again
        assert code == 0, err
    for code, out, err in results:
        assert code == 3 and out == ""
        assert f"serial port {bus.path} is held by" in err and "stop it first (sudo systemctl stop sluice)" in err


# --------------------------------------------------------------------------- slow units, late replies
async def test_a_unit_answering_in_150ms_is_found_and_its_late_replies_blamed_on_nobody_else() -> None:
    slow = SimDevice(PROFILE, 1, name="slow", faults=Faults(delay=0.15))
    async with RtuBus([slow, unit(3)], wire_timing=True) as bus:
        code, out, err = await run(scan_command, "scan", bus.path, "--units", "1-6")  # the default 100ms probe
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "2 unit(s) answered (holding 0+2):", out
    assert lines[1].split()[:2] == ["unit", "3"] and lines[2].split()[:2] == ["unit", "1"] and "slow" in lines[2]
    assert "garbled" not in out and "share a unit id" not in out, out
    (advice,) = [line for line in lines if line.startswith("  slow:")]
    assert "unit(s) 1 answered only after the 100ms probe" in advice
    suggested = advice.split("--timeout ")[1].split(",")[0]
    assert parse_duration(suggested) >= 0.3  # twice the measured reply time, at least


async def test_a_long_silent_scan_says_how_far_it_is() -> None:
    async with RtuBus([]) as bus:
        code, _out, err = await run(scan_command, "scan", bus.path, "--units", "1-60", "--timeout", "100ms")
    assert code == 1
    assert any(line.startswith("… ") and "/60 probed" in line for line in err.splitlines()), err
