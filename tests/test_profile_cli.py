"""`sluice profile list/show/test` (issue 15, part 3): the library is browsable, and `profile test`
reads every point of a profile once from a (simulated) device through the Modbus driver, judges
each value against its valid range, and shows the byte order that makes a wrong-looking value
plausible — as `sluice read` shows a range in every byte order."""

from __future__ import annotations

import io
from pathlib import Path

from gateway.cli.commands import build_parser, main
from gateway.cli.profiles import load_library, profile_test_command
from simulators.modbus_device import SimDevice
from simulators.modbus_rtu import RtuBus
from simulators.modbus_tcp import ModbusTcpServer

PROFILES = Path(__file__).resolve().parent.parent / "config" / "profiles"


def test_list_finds_the_co2_sensors(capsys) -> None:
    assert main(["profile", "list", "--search", "co2"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()]
    assert "dfrobot-sen0659" in names and "serial-co2-request" in names
    assert "eastron-sdm630" not in names
    assert main(["profile", "list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(list(PROFILES.glob("*.yaml")))
    assert main(["profile", "list", "--search", "no such device anywhere"]) == 1


def test_show_prints_points_units_ranges_and_the_source_document(capsys) -> None:
    assert main(["profile", "show", "eastron-sdm120"]) == 0
    out = capsys.readouterr().out
    assert "Eastron SDM120-Modbus" in out and "sdm120modbus_manual.pdf" in out and "verified:" in out
    assert "voltage" in out and " V " in out and "0..300" in out and "input 0 (30001)" in out
    assert main(["profile", "show", "dixell-xr-cx"]) == 0
    out = capsys.readouterr().out
    assert out.count("UNVERIFIED") >= 3
    assert main(["profile", "show", "pms5003"]) == 0
    assert "source: none given" in capsys.readouterr().out
    assert main(["profile", "show", "eastron-sdm12"]) == 2
    assert "did you mean eastron-sdm120" in capsys.readouterr().err


async def _test(name: str, port: int | str, unit: int, *extra: str) -> tuple[int, str]:
    where = ["--serial", port] if isinstance(port, str) else ["--host", "127.0.0.1", "--port", str(port)]
    args = build_parser().parse_args(["profile", "test", name, *where, "--unit", str(unit), "--timeout", "5s", *extra])
    out, err = io.StringIO(), io.StringIO()
    code = await profile_test_command(args, out, err)
    return code, out.getvalue() + err.getvalue()


async def test_profile_test_reads_every_point_of_a_simulated_meter() -> None:
    profile = load_library(None, io.StringIO())["eastron-sdm120"]
    async with ModbusTcpServer([SimDevice(profile, 7, name="sdm120")]) as server:
        code, out = await _test("eastron-sdm120", server.port, 7)
    assert code == 0, out
    assert "10 of 10 points plausible" in out
    for point in profile.points:
        assert f"ok    {point.name} " in out, out


async def test_a_wrong_byte_order_is_shown_with_the_order_that_fits() -> None:
    """The device sends its floats low word first (CDAB); the profile says ABCD: the frequency
    (45..65 Hz) reads as a tiny number, and the hint names CDAB and the value it gives."""
    profile = load_library(None, io.StringIO())["eastron-sdm120"]
    swapped = profile.model_copy(update={"points": [p.model_copy(update={"byte_order": "CDAB"}) for p in profile.points]})
    async with ModbusTcpServer([SimDevice(swapped, 3, name="swapped")]) as server:
        code, out = await _test("eastron-sdm120", server.port, 3)
    assert code == 1, out
    line = next(x for x in out.splitlines() if " frequency " in x)
    assert line.lstrip().startswith("WRONG"), out
    hint = out.split(line, 1)[1].splitlines()[1]
    assert "byte_order: CDAB reads 5" in hint or "byte_order: CDAB reads 4" in hint, out
    assert "set byte_order: CDAB on this point (the profile says ABCD)" in hint
    assert "CDAB  int32" in out and "float32" in out  # the interpretations `sluice read` prints


async def test_profile_test_on_an_rs485_line_through_the_rtu_driver() -> None:
    """The meter on a serial bus (a pty playing an RTU bus at 9600 8E1), another device beside it."""
    library = load_library(None, io.StringIO())
    async with RtuBus([SimDevice(library["eastron-sdm120"], 2, name="meter"),
                       SimDevice(library["renke-rs-ws-n01-8"], 1, name="th")]) as bus:
        code, out = await _test("eastron-sdm120", bus.path, 2, "--parity", "E")
        code_th, out_th = await _test("renke-rs-ws-n01-8", bus.path, 1)
    assert code == 0 and "10 of 10 points plausible" in out and f"{bus.path} at 9600 8E1 unit 2" in out, out
    assert code_th == 0 and "2 of 2 points plausible" in out_th, out_th


async def test_profile_test_needs_one_target() -> None:
    args = build_parser().parse_args(["profile", "test", "eastron-sdm120", "--unit", "1"])
    err = io.StringIO()
    assert await profile_test_command(args, io.StringIO(), err) == 2 and "give --host" in err.getvalue()


async def test_a_profile_of_another_device_is_refused_point_by_point() -> None:
    """The wrong profile for the device: its requests are refused (exception 2), each said in words."""
    profile = load_library(None, io.StringIO())["renke-rs-ws-n01-8"]
    async with ModbusTcpServer([SimDevice(profile, 5, name="th")]) as server:
        code, out = await _test("eastron-sdm120", server.port, 5)
    assert code == 1, out
    assert "the device answered exception 2" in out and "0 of 10 points plausible" in out, out


async def test_profile_test_without_a_device_says_so() -> None:
    async with ModbusTcpServer([]) as server:
        port = server.port
    code, out = await _test("eastron-sdm120", port, 1)
    assert code == 3 and "sluice: " in out and "refused" in out


async def test_serial_profiles_are_not_read_by_profile_test() -> None:
    code, out = await _test("pms5003", 1502, 1)
    assert code == 2 and "sluice once" in out
