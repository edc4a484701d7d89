"""The device profile library for technicians: ``sluice profile list [--search co2]``, ``sluice
profile show NAME`` (points, units, valid ranges, the source document) and ``sluice profile test
NAME --host H --port P --unit N`` or ``--serial /dev/ttyUSB0`` (one read of every point through the Modbus driver's planner,
client and decoder, each value judged against its valid range; a value that looks wrong is shown
in every byte order, as ``sluice read`` shows a range, with the order that would make it plausible).

Profiles are read with the loader ``sluice check`` uses, from the shipped library
(``config/profiles/``) or ``--dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from drivers.modbus.codec import Request, RequestDecoder
from drivers.modbus.errors import ModbusConnectionError, ModbusError
from drivers.modbus.planner import plan
from drivers.modbus.profile import Point, points_of
from drivers.modbus.profile import ProfileModel as ModbusProfile
from drivers.wire import BYTE_ORDERS
from gateway.cli.commission import (
    EXIT_CANNOT_OPEN,
    EXIT_NO_ANSWER,
    EXIT_USAGE,
    cannot_open,
    error_text,
    interpret_pairs,
    interpret_registers,
    parse_target,
)
from gateway.cli.examples import shipped_config
from gateway.config import load_profiles
from gateway.driver import ProfileConfig
from gateway.reading import FieldValue
from gateway.units import duration_arg
from gateway.yamlpos import ConfigError

__all__ = ["add_parsers", "judge", "load_library", "profile_test_command"]

_DIGIT = {"coil": 0, "discrete": 1, "input": 3, "holding": 4}


def load_library(directory: Path | None, err: TextIO) -> dict[str, ProfileConfig]:
    """Every profile that validates in ``directory`` (default: the shipped library); the errors
    of the others are printed on ``err`` (`sluice check` says the same)."""
    errors: list[ConfigError] = []
    found = load_profiles(directory or shipped_config() / "profiles", errors)
    for error in errors:
        print(error, file=err)
    return {name: p for name, p in sorted(found.items()) if p is not None}


def _points(profile: ProfileConfig) -> list[tuple[str, str | None, Any]]:
    """(name, unit, valid range or None) of every point or field."""
    if isinstance(profile, ModbusProfile):
        return [(p.name, p.unit, p.valid) for p in profile.points]
    fields: dict[str, Any] = getattr(profile, "fields", {})
    return [(name, spec.unit, spec.valid) for name, spec in fields.items()]


def _range(valid: Any) -> str:
    if valid is None or (valid.min is None and valid.max is None):
        return ""
    low = "" if valid.min is None else f"{valid.min:.10g}"
    high = "" if valid.max is None else f"{valid.max:.10g}"
    return f"{low}..{high}"


def _find(library: dict[str, ProfileConfig], name: str, err: TextIO) -> ProfileConfig | None:
    if name in library:
        return library[name]
    close = difflib.get_close_matches(name, list(library), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "`sluice profile list` shows the names"
    print(f"sluice profile: no profile '{name}' — {hint}", file=err)
    return None


# =========================================================================== list, show
def list_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    library = load_library(args.dir, err)
    words = [w.lower() for w in (args.search or "").split()]
    shown = 0
    for name, profile in library.items():
        text = " ".join(str(x) for x in (name, profile.manufacturer, profile.model, profile.description,
                                          *(f"{n} {u or ''}" for n, u, _v in _points(profile))))
        if any(w not in text.lower() for w in words):
            continue
        what = " ".join(x for x in (profile.manufacturer, profile.model) if x) or "(example)"
        flag = "" if profile.source is None else f"  [{profile.source.verified.split(' — ')[0].split(';')[0]}]"
        about = f" — {profile.description}" if profile.description else ""
        print(f"{name:<24} {profile.protocol:<7} {what}{about}{flag}", file=out)
        shown += 1
    if not shown:
        print(f"no profile matches {args.search!r}" if words else "no profiles", file=err)
        return 1
    return 0


def _where(point: Any) -> str:
    if point.kind is None or point.address is None:
        return ""
    width = "04d" if point.address < 9999 else "05d"  # the manual's 5-digit form where it has one
    ref = f" ({_DIGIT[point.kind]}{point.address + 1:{width}})" if point.kind in _DIGIT else ""
    return f"{point.kind} {point.address}{ref}"


def show_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    profile = _find(load_library(args.dir, err), args.name, err)
    if profile is None:
        return EXIT_USAGE
    title = " ".join(x for x in (profile.manufacturer, profile.model) if x)
    print(f"{args.name}: {title or '(example profile)'} — {profile.description or ''}", file=out)
    print(f"  protocol: {profile.protocol}, measurement: {profile.measurement or args.name}", file=out)
    src = profile.source
    if src is None:
        print("  source: none given (an example, or your own profile)", file=out)
    else:
        print(f"  source: {src.title}\n  version: {src.version}\n  url: {src.url}", file=out)
        if src.read_via:
            print(f"  read via: {src.read_via}", file=out)
        print(f"  verified: {src.verified}", file=out)
    rows: list[tuple[str, ...]] = []
    head: tuple[str, ...]
    if isinstance(profile, ModbusProfile):
        for p in profile.points:
            rows.append((p.name, _where(p), p.point_type, p.byte_order if p.width > 1 else "",
                         "" if p.scale == 1 else f"×{p.scale:g}", p.unit or "", _range(p.valid),
                         "UNVERIFIED" if p.verified is False else ""))
        head = ("point", "register", "type", "order", "scale", "unit", "valid", "")
    else:
        for name, spec in getattr(profile, "fields", {}).items():
            rows.append((name, str(spec.type or ""), spec.unit or "", _range(spec.valid),
                         "UNVERIFIED" if spec.verified is False else ""))
        head = ("field", "type", "unit", "valid", "")
    if rows:
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        for r in (head, *rows):
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
    if any(r[-1] for r in rows):
        print("  UNVERIFIED: the published sources did not settle these; compare with the device's display "
              "(the profile file's comments say what to check)", file=out)
    return 0


# =========================================================================== test
def _in_range(value: FieldValue, point: Point) -> bool:
    if isinstance(value, (bool, str)):
        return True
    number = float(value)
    if not math.isfinite(number):
        return False
    # a float32 of tiny magnitude is what a float read in the wrong word order usually looks like
    if point.type.startswith("float") and 0 < abs(number) < 1e-6:
        return False
    return (point.min is None or number >= point.min) and (point.max is None or number <= point.max)


def _decode(point: Point, data: bytes, request: Request, **change: Any) -> FieldValue | None:
    """The point's value from its request's reply, decoded as the driver does (with ``change``
    applied to the point, and no valid range: what was read, not what would be kept)."""
    p = dataclasses.replace(point, min=None, max=None, **change)
    out: dict[str, FieldValue] = {}
    RequestDecoder(Request(request.kind, request.address, request.count, (p,))).decode(data, out)
    return out.get(p.name)


def judge(point: Point, data: bytes, request: Request) -> tuple[FieldValue | None, bool, list[tuple[str, FieldValue]]]:
    """(value read, plausible, [(byte order, value) that would be plausible instead])."""
    value = _decode(point, data, request)
    if value is None:
        return None, False, []
    if _in_range(value, point) or point.type in ("bool", "string"):
        return value, True, []
    orders = [o for o in BYTE_ORDERS if o != point.byte_order and (point.width > 1 or o in ("ABCD", "BADC"))]
    better = []
    for order in orders:
        other = _decode(point, data, request, byte_order=order)
        if other is not None and _in_range(other, point):
            better.append((order, other))
    return value, False, better


def _show(value: FieldValue | None, unit: str | None) -> str:
    if value is None:
        return "-"
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f"{text} {unit}" if unit else text


def _raw_rows(point: Point, data: bytes, request: Request) -> list[str]:
    """What `sluice read` prints for the point's registers: every interpretation."""
    start = 2 * (point.address - request.address)
    raw = data[start:start + 2 * point.width]
    rows = [f"{r['reference']}  {r['hex']}  uint16 {r['uint16']}  int16 {r['int16']}"
            for r in interpret_registers(point.address, raw, point.kind)]
    if point.width == 2:
        rows += [f"{r['order']}  int32 {r['int32']}  uint32 {r['uint32']}  float32 {r['float32']}"
                 for r in interpret_pairs(point.address, raw)]
    return rows


async def profile_test_command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    profile = _find(load_library(args.dir, err), args.name, err)
    if profile is None:
        return EXIT_USAGE
    if not isinstance(profile, ModbusProfile):
        print(f"sluice profile test: '{args.name}' is a {profile.protocol} profile; `profile test` reads Modbus "
              "devices — for a serial sensor write a device file and run `sluice once`", file=err)
        return EXIT_USAGE
    if (args.host is None) == (args.serial is None):
        print("sluice profile test: give --host (Modbus TCP, or --rtu for a serial device server) or --serial "
              "(an RS485 adapter on this machine), one of them", file=err)
        return EXIT_USAGE
    try:
        target = parse_target(args.serial if args.serial else f"{args.host}:{args.port}", args.rtu)
    except ValueError as exc:
        print(f"sluice profile test: {exc}", file=err)
        return EXIT_USAGE
    line = (args.baudrate, args.parity, args.stopbits)
    client = target.client(*line)
    where = f"{target.describe(*line)} unit {args.unit}"
    try:
        await client.connect(args.timeout)
    except ModbusConnectionError as exc:
        cannot_open(exc, client, target, err)
        return EXIT_CANNOT_OPEN
    print(f"{args.name} at {where}: one read of every point", file=out)
    bad = 0
    try:
        for request in plan(points_of(profile), profile.max_gap, profile.max_registers):
            try:
                data = await client.read(args.unit, request.function, request.address, request.count, args.timeout)
            except ModbusError as exc:
                print(f"  {request}: {error_text(exc, client)}", file=out)
                bad += len(request.points)
                continue
            for point in request.points:
                bad += not _report(out, profile, point, data, request)
    finally:
        await client.close()
    total = len(profile.points)
    print(f"{total - bad} of {total} points plausible" + ("" if not bad else
          " — check the lines marked above; compare with the device's display"), file=out)
    return 0 if not bad else EXIT_NO_ANSWER


def _report(out: TextIO, profile: ModbusProfile, point: Point, data: bytes, request: Request) -> bool:
    model = next(p for p in profile.points if p.name == point.name)
    value, ok, better = judge(point, data, request)
    valid = _range(model.valid)
    mark = " (UNVERIFIED in the profile)" if model.verified is False else ""
    if ok:
        print(f"  ok    {point.name:<24} {_show(value, model.unit):<18} {valid}{mark}", file=out)
        return True
    print(f"  WRONG {point.name:<24} {_show(value, model.unit):<18} outside {valid or 'a plausible range'}{mark}",
          file=out)
    for order, other in better:
        print(f"        byte_order: {order} reads {_show(other, model.unit)}, inside the range — if the device's "
              f"display agrees, set byte_order: {order} on this point (the profile says {point.byte_order})", file=out)
    if not better:
        print("        no byte order makes it plausible: check the address, scale and type against the manual, "
              "and the sensor itself", file=out)
    for row in _raw_rows(point, data, request):
        print(f"          {row}", file=out)
    return False


# =========================================================================== the parsers
def cmd_profile(args: argparse.Namespace) -> int:
    if args.action == "test":
        return asyncio.run(profile_test_command(args))
    return {"list": list_command, "show": show_command}[args.action](args, sys.stdout, sys.stderr)


def add_parsers(sub: Any) -> None:
    """``sluice profile list|show|test`` on the main parser's subcommands."""
    p = sub.add_parser("profile", help="the device profile library: find a device, show its points and source "
                       "document, test it against the real device")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def with_dir(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dir", type=Path, default=None, metavar="DIR",
                       help="a profiles directory (default: the shipped library, config/profiles)")
        q.set_defaults(func=cmd_profile)

    q = actions.add_parser("list", help="every profile: name, protocol, maker and model, how far it is verified")
    q.add_argument("--search", default=None, metavar="WORDS", help="only profiles whose name, maker, model, "
                   "description, points or units contain every word (e.g. co2, sdm, soil)")
    with_dir(q)
    q = actions.add_parser("show", help="a profile's points, units, valid ranges and source document")
    q.add_argument("name", metavar="NAME")
    with_dir(q)
    q = actions.add_parser("test", help="read every point of a Modbus profile once from a device and judge each "
                           "value against its valid range, with byte-order hints")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--host", default=None, help="the device's (or its Modbus TCP gateway's) address")
    q.add_argument("--port", type=int, default=502, help="TCP port (default 502)")
    q.add_argument("--serial", default=None, metavar="PORT", help="or a serial port with the device on its RS485 "
                   "line (/dev/ttyUSB0), with --baudrate, --parity, --stopbits")
    q.add_argument("--baudrate", type=int, default=9600, help="serial baud rate (default 9600)")
    q.add_argument("--parity", choices=["N", "E", "O"], default="N", help="serial parity (default N)")
    q.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    q.add_argument("--unit", type=int, default=1, help="unit (slave) id (default 1)")
    q.add_argument("--rtu", action="store_true", help="HOST:PORT is a serial device server in raw mode (RTU over TCP)")
    q.add_argument("--timeout", type=duration_arg, default=1.0, metavar="DURATION", help="per request (default 1s)")
    with_dir(q)
