"""Commissioning tools for technicians: ``sluice read`` (one range, every interpretation) and
``sluice scan`` (which unit ids answer, at which line settings).

Both talk through the gateway's own transports — :class:`~drivers.modbus.rtu_client.ModbusRtuClient`
over a :class:`~drivers.modbus.rtu.SerialLink` or :class:`~drivers.modbus.rtu_tcp.TcpLink`, or
:class:`~drivers.modbus.client.ModbusTcpClient` — so what they see is what the gateway will see, and
they can only send read function codes. A serial port is opened with the same exclusive lock as
the gateway's: while the gateway (or another tool) holds the port they refuse to run and say so.

A TARGET is a serial port (``/dev/ttyUSB0``) or ``HOST:PORT`` (Modbus TCP; with ``--rtu``, raw RTU
frames to a serial device server).

Time bound of a scan: every probe is one request with ``--timeout`` (a garbled reply ends it
sooner), plus the inter-frame silence on a serial line, so a silent bus costs at most
``units × baud rates × parities × (timeout + 4 ms)``, plus half a second per setting listening for
late replies, plus opening the port once per setting (a setting the adapter refuses is reported
and skipped); a Modbus TCP target that drops the connection is reconnected within another
``timeout``. The bound is printed before the scan starts; off a terminal, a line says how far the
scan is at least every 5 s.

Late replies (RTU): a reply is counted only for the unit that was asked — its unit id and CRC
must check. The line is drained before every probe; a complete reply found there, or inside
another unit's probe, is a late answer of the unit whose id it carries, never noise from the unit
asked. Such a unit is asked once more with a long timeout (2 s) at the end of the setting, and the
report says how long it took and which ``--timeout`` would have found it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from drivers.modbus.client import ModbusClient, ModbusTcpClient
from drivers.modbus.errors import ModbusConnectionError, ModbusExceptionResponse, ModbusFrameError, ModbusTimeout
from drivers.modbus.profile import BIT_KINDS, FUNCTION, looks_like_reference, parse_register_reference
from drivers.modbus.rtu import SerialLink
from drivers.modbus.rtu_client import ModbusRtuClient, damage_kind, replies_in
from drivers.modbus.rtu_tcp import RTU_TCP_HINTS, TcpLink
from drivers.wire import BYTE_ORDERS, char_time, inter_frame_silence, swap_register_bytes, to_big_endian
from gateway.polling import format_duration
from gateway.reading import shortest_float32
from gateway.units import duration_arg

__all__ = ["ORDERS", "add_parsers", "cannot_open", "error_text", "interpret_pairs", "interpret_registers", "read_command", "scan_command"]

EXIT_NO_ANSWER = 1
EXIT_USAGE = 2
EXIT_CANNOT_OPEN = 3
ORDERS = BYTE_ORDERS
_REF_DIGIT = {"coil": 0, "discrete": 1, "input": 3, "holding": 4}
_GATEWAY_NO_UNIT = (10, 11)  # a Modbus TCP gateway saying "no such unit behind me"


# =========================================================================== interpretations
def _ascii(data: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "." for b in data)


def _number(value: float) -> float | str:
    """JSON has no NaN or infinity: those go out as text."""
    return value if math.isfinite(value) else str(value)


def interpret_registers(address: int, data: bytes, kind: str) -> list[dict[str, Any]]:
    """One row per register: address, manual reference, hex, uint16, int16, its two characters."""
    rows = []
    digit = _REF_DIGIT[kind]
    for i in range(len(data) // 2):
        word = data[2 * i:2 * i + 2]
        rows.append({"address": address + i, "reference": f"{digit}{address + i + 1:04d}" if address + i < 9999
                     else f"{digit}{address + i + 1:05d}", "hex": word.hex(" "),
                     "uint16": struct.unpack(">H", word)[0], "int16": struct.unpack(">h", word)[0],
                     "ascii": _ascii(word)})
    return rows


def interpret_pairs(address: int, data: bytes) -> list[dict[str, Any]]:
    """For every two neighbouring registers and every byte order: int32, uint32, float32."""
    rows = []
    for i in range(len(data) // 2 - 1):
        wire = data[2 * i:2 * i + 4]
        for order in ORDERS:
            be = to_big_endian(wire, order)
            rows.append({"address": address + i, "order": order, "hex": wire.hex(" "),
                         "int32": struct.unpack(">i", be)[0], "uint32": struct.unpack(">I", be)[0],
                         "float32": _number(shortest_float32(struct.unpack(">f", be)[0]))})
    return rows


def _bits(data: bytes, count: int) -> list[int]:
    word = int.from_bytes(data, "little")
    return [(word >> i) & 1 for i in range(count)]


# =========================================================================== targets and ports
@dataclass(slots=True)
class Target:
    text: str
    serial: bool
    host: str = ""
    port: int = 0
    rtu: bool = False

    def client(self, baudrate: int, parity: str, stopbits: int) -> ModbusClient:
        if self.serial:
            line = (baudrate, 8, parity, stopbits)
            return ModbusRtuClient(SerialLink(self.text, baudrate, parity, stopbits), char=char_time(*line),
                                   silence=inter_frame_silence(*line))
        if self.rtu:
            return ModbusRtuClient(TcpLink(self.host, self.port), hints=RTU_TCP_HINTS)
        return ModbusTcpClient(self.host, self.port)

    def describe(self, baudrate: int, parity: str, stopbits: int) -> str:
        if self.serial:
            return f"{self.text} at {baudrate} 8{parity}{stopbits}"
        return f"{self.host}:{self.port} ({'RTU over TCP' if self.rtu else 'Modbus TCP'})"


def parse_target(text: str, rtu: bool) -> Target:
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and not text.startswith("/"):
        return Target(text, False, host.strip("[]"), int(port), rtu)
    if rtu:
        raise ValueError(f"--rtu is for HOST:PORT targets; {text} is a serial port, which speaks RTU anyway")
    return Target(text, True)


def port_holder(path: str) -> tuple[int, str] | None:
    """The process (pid, command line) that has the serial port open, if /proc lets us see it."""
    real = os.path.realpath(path)
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.path.realpath(fd) == real:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return int(entry.name), cmd
        except OSError:
            continue
    return None


def held_message(path: str) -> str:
    holder = port_holder(path)
    if holder is not None and ("sluice" in holder[1] or "gateway.cli" in holder[1]):
        who = f"the running gateway (pid {holder[0]}: {holder[1]})"
    elif holder is not None:
        who = f"another program (pid {holder[0]}: {holder[1]})"
    else:
        who = "another program — most likely the running gateway"
    return (f"serial port {path} is held by {who}. The gateway keeps its serial ports while it runs, and one bus "
            "has one master: stop it first (sudo systemctl stop sluice), run sluice read/scan, then start it "
            "again (sudo systemctl start sluice)")


async def _open(client: ModbusClient, target: Target, timeout: float, err: TextIO) -> bool:
    try:
        await client.connect(timeout)
    except ModbusConnectionError as exc:
        cannot_open(exc, client, target, err)
        return False
    return True


def cannot_open(exc: ModbusConnectionError, client: ModbusClient, target: Target, err: TextIO) -> None:
    """Why the target could not be opened, on ``err``: for a serial port held by another process, who holds it."""
    if exc.kind == "busy" and target.serial:
        print(f"sluice: {held_message(target.text)}", file=err)
    else:
        print(f"sluice: {exc} — {client.hints.get(exc.kind, '')}", file=err)


def error_text(exc: Exception, client: ModbusClient) -> str:
    """A failed request in words, with what to check (``sluice read``, ``sluice profile test``)."""
    if isinstance(exc, ModbusExceptionResponse):
        return f"the device answered {exc} — {exc.hint}"
    kind = getattr(exc, "kind", "")
    return f"{exc} — {client.hints.get(kind, '')}"


# =========================================================================== sluice read
def _register_range(args: argparse.Namespace) -> tuple[str, int]:
    """(kind, 0-based address) from ``--ref`` or ``--kind``/``--address``; ValueError for people when
    they conflict, or when ``--address`` looks like the manual's reference (as ``check`` says of a profile)."""
    if args.ref is not None:
        kind, address = parse_register_reference(args.ref)
        if args.kind is not None and args.kind != kind:
            raise ValueError(f"--ref {args.ref} is a {kind} reference but --kind says {args.kind} — give one of them")
        if args.address is not None and args.address != address:
            raise ValueError(f"--ref {args.ref} is {kind} address {address} but --address says {args.address} "
                             "— give --ref, or --kind and --address")
        return kind, address
    kind = args.kind or "holding"
    address = 0 if args.address is None else args.address
    for meant_kind in dict.fromkeys((kind, "holding", "input", "discrete")):  # its own kind first
        meant = looks_like_reference(meant_kind, address)
        if meant is not None:
            raise ValueError(f"--address {address} looks like the manual's {_REF_DIGIT[meant_kind]}xxxx reference, "
                             f"not a 0-based address — give --ref {address} (= {meant_kind} address {meant}), or "
                             f"--kind {meant_kind} --address {meant}")
    return kind, address


async def read_command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        target = parse_target(args.target, args.rtu)
        kind, address = _register_range(args)
    except ValueError as exc:
        print(f"sluice read: {exc}", file=err)
        return EXIT_USAGE
    limit = 2000 if kind in BIT_KINDS else 125
    if not 1 <= args.count <= limit or address + args.count > 65536:
        print(f"sluice read: --count must be 1..{limit} for {kind} and stay below address 65536", file=err)
        return EXIT_USAGE
    client = target.client(args.baudrate, args.parity, args.stopbits)
    where = target.describe(args.baudrate, args.parity, args.stopbits)
    if not await _open(client, target, args.timeout, err):
        return EXIT_CANNOT_OPEN
    try:
        data = await client.read(args.unit, FUNCTION[kind], address, args.count, args.timeout)
    except (ModbusTimeout, ModbusFrameError, ModbusExceptionResponse, ModbusConnectionError) as exc:
        print(f"sluice read: {where} unit {args.unit}, {kind} {address}+{args.count}: {error_text(exc, client)}",
              file=err)
        return EXIT_NO_ANSWER
    finally:
        await client.close()
    head = {"target": where, "unit": args.unit, "kind": kind, "address": address, "count": args.count}
    if kind in BIT_KINDS:
        bits = _bits(data, args.count)
        if args.json:
            print(json.dumps({**head, "bits": bits}), file=out)
            return 0
        print(f"{where} unit {args.unit}: {kind} {address}..{address + args.count - 1}", file=out)
        for i, bit in enumerate(bits):
            print(f"  {address + i:>5}  {_REF_DIGIT[kind]}{address + i + 1:04d}  {bit}", file=out)
        return 0
    registers = interpret_registers(address, data, kind)
    pairs = interpret_pairs(address, data)
    strings = {"ABCD": _ascii(data), "BADC": _ascii(swap_register_bytes(data))}
    if args.json:
        print(json.dumps({**head, "registers": registers, "pairs": pairs, "ascii": strings}), file=out)
        return 0
    print(f"{where} unit {args.unit}: {kind} registers {address}..{address + args.count - 1} "
          f"({registers[0]['reference']}..{registers[-1]['reference']})", file=out)
    print(f"\n  {'address':>7}  {'ref':>6}  {'hex':<5}  {'uint16':>6}  {'int16':>6}  ascii", file=out)
    for r in registers:
        print(f"  {r['address']:>7}  {r['reference']:>6}  {r['hex']:<5}  {r['uint16']:>6}  {r['int16']:>6}  "
              f"{r['ascii']}", file=out)
    if pairs:
        print(f"\n  {'address':>7}  {'order':<5}  {'hex':<11}  {'int32':>11}  {'uint32':>10}  float32", file=out)
        for r in pairs:
            first = r["order"] == "ABCD"
            print(f"  {str(r['address']) + '+1' if first else '':>7}  {r['order']:<5}  "
                  f"{r['hex'] if first else '':<11}  {r['int32']:>11}  {r['uint32']:>10}  {r['float32']}", file=out)
    print(f"\n  ascii ABCD (first character in the high byte): {strings['ABCD']!r}", file=out)
    print(f"  ascii BADC (first character in the low byte):  {strings['BADC']!r}", file=out)
    return 0


# =========================================================================== sluice scan
@dataclass(slots=True)
class Found:
    unit: int
    settings: str
    registers: list[int] = field(default_factory=list)
    exception: str | None = None
    late: float | None = None  # seconds it took, when that was longer than the probe's timeout


@dataclass(slots=True)
class Noise:
    settings: str
    units: list[int] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)


class Progress:
    """A bar redrawn in place on a terminal; on anything else, a plain line per event and, through
    a silent stretch, a line every ``every`` seconds saying how far the scan is."""

    def __init__(self, stream: TextIO, total: int, every: float = 5.0) -> None:
        self.stream = stream
        self.total = total
        self.done = 0
        self.tty = stream.isatty()
        self.every = every
        self._said = time.monotonic()

    def step(self, settings: str, unit: int, found: int) -> None:
        self.done += 1
        if self.tty:
            width = 30
            filled = width * self.done // max(self.total, 1)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}  {settings}  "
                              f"unit {unit:<3}  found {found}\x1b[K")
            self.stream.flush()
        elif time.monotonic() - self._said >= self.every and self.done < self.total:
            self.line(f"… {self.done}/{self.total} probed (last: unit {unit} at {settings}), {found} found")

    def line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        print(text, file=self.stream, flush=True)
        self._said = time.monotonic()

    def end(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def parse_units(text: str, tcp: bool) -> list[int]:
    """``1-247``, ``5``, ``1-10,20,30-32`` -> unit ids (0..255 on Modbus TCP, 1..247 on RTU)."""
    low, high = (0, 255) if tcp else (1, 247)
    units: list[int] = []
    for part in text.split(","):
        a, sep, b = part.strip().partition("-")
        if not a.isdigit() or (sep and not b.isdigit()):
            raise ValueError(f"--units {text!r}: write ids and ranges, e.g. 1-247 or 1-10,20")
        first, last = int(a), int(b) if sep else int(a)
        if not low <= first <= last <= high:
            raise ValueError(f"--units {text!r}: unit ids are {low}..{high} here")
        units.extend(u for u in range(first, last + 1) if u not in units)
    return units


async def scan_command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        target = parse_target(args.target, args.rtu)
        units = parse_units(args.units, tcp=not target.serial and not target.rtu)
        bauds = [int(b) for b in args.baudrates.split(",")] if args.baudrates else [9600]
        parities = _parities(args.parity)
    except ValueError as exc:
        print(f"sluice scan: {exc}", file=err)
        return EXIT_USAGE
    lines = [(baud, parity) for baud in bauds for parity in parities]
    if not target.serial:
        lines = lines[:1]  # the line settings are the converter's, not ours
    timeout = args.timeout
    per_probe = timeout + (max(inter_frame_silence(b, 8, p, args.stopbits) for b, p in lines)
                           if target.serial else 0.0)
    bound = len(units) * len(lines) * per_probe + (len(lines) * max(LATE_DRAIN, 5 * timeout) if target.serial else 0)
    progress = Progress(err, len(units) * len(lines))
    progress.line(f"scanning {len(units)} unit ids × {len(lines)} setting(s) on {args.target}, "
                  f"{format_duration(timeout)} per probe: at most {format_duration(bound)} plus opening the port")
    found: list[Found] = []
    noise: list[Noise] = []
    refused: list[str] = []
    function = FUNCTION[args.kind]
    for baud, parity in lines:
        settings = target.describe(baud, parity, args.stopbits)
        client = target.client(baud, parity, args.stopbits)
        try:
            await client.connect(timeout)
        except ModbusConnectionError as exc:
            if exc.kind != "settings":
                progress.end()
                cannot_open(exc, client, target, err)
                return EXIT_CANNOT_OPEN
            refused.append(settings)
            progress.line(f"{exc} — skipped")
            progress.step(settings, 0, len(found))
            continue
        heard = Noise(settings)
        late: set[int] = set()  # units whose reply came after their probe's timeout
        try:
            for unit in units:
                late.update(_late_replies(client))
                try:
                    if not client.connected and not await _open(client, target, timeout, err):
                        progress.end()
                        return EXIT_CANNOT_OPEN
                    data = await client.read(unit, function, args.address, args.count, timeout)
                except ModbusExceptionResponse as exc:
                    if exc.code not in _GATEWAY_NO_UNIT:
                        found.append(Found(unit, settings, exception=str(exc)))
                        progress.line(f"unit {unit} answered at {settings} with {exc}")
                except ModbusFrameError as exc:
                    nbytes = (args.count + 7) // 8 if function <= 2 else 2 * args.count
                    # A late reply of another unit is that unit's, never noise from the one asked.
                    others = [r for r in replies_in(exc.data) if r[0] != unit]
                    late.update(r[0] for r in others)
                    rest = bytearray(exc.data)
                    for _unit, start, end in reversed(others):
                        del rest[start:end]
                    if rest:
                        heard.units.append(unit)
                        heard.kinds.add(exc.kind if not others else damage_kind(rest, unit, function, nbytes))
                except (ModbusTimeout, ModbusConnectionError):
                    pass
                else:
                    found.append(Found(unit, settings, _values(data, function, args.count)))
                    progress.line(f"unit {unit} answered at {settings}: {found[-1].registers}")
                progress.step(settings, unit, len(found))
            if isinstance(client, ModbusRtuClient) and client.connected:
                await asyncio.sleep(max(LATE_DRAIN, 5 * timeout))  # the last units' late replies
                late.update(_late_replies(client))
            answered = {f.unit for f in found if f.settings == settings}
            for unit in sorted(late - answered):
                await _probe_late(client, unit, function, args, settings, timeout, found, progress)
        finally:
            await client.close()
        if heard.units:
            noise.append(heard)
    progress.end()
    if args.json:
        print(json.dumps({"target": args.target, "kind": args.kind, "address": args.address, "count": args.count,
                          "found": [{"unit": f.unit, "settings": f.settings, "registers": f.registers,
                                     "exception": f.exception, "late_s": f.late} for f in found],
                          "garbled": [{"settings": n.settings, "units": n.units, "kinds": sorted(n.kinds)}
                                      for n in noise],
                          "refused_settings": refused}), file=out)
    else:
        _report(out, args, found, noise, refused, several=len(lines) > 1)
    return 0 if found else EXIT_NO_ANSWER


LATE_DRAIN: Final = 0.5
"""Seconds the line is listened to after a setting's last probe, for late replies."""
LATE_TIMEOUT: Final = 2.0
"""The timeout (at least 10 probe timeouts) for a unit heard answering after its probe's timeout."""


def _values(data: bytes, function: int, count: int) -> list[int]:
    return list(struct.unpack(f">{len(data) // 2}H", data)) if function > 2 else _bits(data, count)


def _late_replies(client: ModbusClient) -> set[int]:
    """Units whose complete replies arrived between probes (after their own probe gave up)."""
    if not isinstance(client, ModbusRtuClient):
        return set()  # Modbus TCP matches replies by transaction id: nothing is misattributed
    return {r[0] for r in replies_in(client.take_stray())}


async def _probe_late(client: ModbusClient, unit: int, function: int, args: argparse.Namespace, settings: str,
                      timeout: float, found: list[Found], progress: Progress) -> None:
    """Ask a unit heard answering late once more, with time enough; say how long it took."""
    patient = max(LATE_TIMEOUT, 10 * timeout)
    started = time.monotonic()
    try:
        await asyncio.sleep(max(LATE_DRAIN, 5 * timeout))  # let the line go quiet first
        _late_replies(client)
        started = time.monotonic()
        data = await client.read(unit, function, args.address, args.count, patient)
    except ModbusExceptionResponse as exc:
        found.append(Found(unit, settings, exception=str(exc), late=time.monotonic() - started))
    except (ModbusTimeout, ModbusFrameError, ModbusConnectionError):
        progress.line(f"unit {unit} at {settings} replied after its {format_duration(timeout)} probe, but not "
                      f"again within {format_duration(patient)}")
        return
    else:
        found.append(Found(unit, settings, _values(data, function, args.count), late=time.monotonic() - started))
    f = found[-1]
    progress.line(f"unit {unit} answered at {settings} in {format_duration(f.late or 0)}, after the "
                  f"{format_duration(timeout)} probe: {f.exception or f.registers}")


def suggested_timeout(seconds: float) -> str:
    """A ``--timeout`` with room above a measured reply time: twice it, in 100 ms steps."""
    return format_duration(max(0.2, math.ceil(2 * seconds * 10) / 10))


def _report(out: TextIO, args: argparse.Namespace, found: list[Found], noise: list[Noise], refused: list[str],
            several: bool) -> None:
    """The scan's table: every answer, then (several settings tried) which units answered at which."""
    if found:
        print(f"{len(found)} unit(s) answered ({args.kind} {args.address}+{args.count}):", file=out)
        for f in found:
            what = f"answered {f.exception} — a device is there; try another --kind/--address" if f.exception \
                else " ".join(str(v) for v in f.registers)
            if f.late is not None:
                what += f"  (in {format_duration(f.late)}: slow)"
            print(f"  unit {f.unit:>3}  {f.settings}  {what}", file=out)
    else:
        print(f"no unit answered on {args.target} — check the wiring (A/B), power, and the line settings "
              "(try --baudrates 9600,19200,38400 --parity N,E,O)", file=out)
    slow = [f for f in found if f.late is not None]
    if slow:
        worst = max(f.late or 0.0 for f in slow)
        print(f"  slow: unit(s) {', '.join(str(f.unit) for f in slow)} answered only after the "
              f"{format_duration(args.timeout)} probe (up to {format_duration(worst)}): scan with --timeout "
              f"{suggested_timeout(worst)}, and give these devices a timeout: of at least that", file=out)
    if several and found:
        by_settings: dict[str, list[int]] = {}
        for f in found:
            by_settings.setdefault(f.settings, []).append(f.unit)
        for settings, answered in by_settings.items():
            print(f"  at {settings}: unit(s) {', '.join(map(str, answered))}", file=out)
    for settings in refused:
        print(f"  not tried: the port refused {settings}", file=out)
    for n in noise:
        print(f"  garbled replies ({', '.join(sorted(n.kinds))}) at {n.settings} from unit(s) "
              f"{', '.join(map(str, n.units[:10]))}{' …' if len(n.units) > 10 else ''}: something is on the "
              "line at other settings (baud rate, parity), or two devices share a unit id", file=out)


# =========================================================================== the parsers
def _parities(text: str) -> list[str]:
    """``N``, ``N,E,O`` or ``all`` -> parities to try, in order."""
    if text.strip().lower() == "all":
        return ["N", "E", "O"]
    parities: list[str] = []
    for part in text.split(","):
        parity = part.strip().upper()
        if parity not in ("N", "E", "O"):
            raise ValueError(f"--parity {text!r}: write N, E or O, several as N,E,O, or all")
        if parity not in parities:
            parities.append(parity)
    return parities


def _line_options(p: argparse.ArgumentParser, *, scan: bool = False) -> None:
    p.add_argument("target", metavar="TARGET", help="serial port (/dev/ttyUSB0) or HOST:PORT")
    p.add_argument("--rtu", action="store_true", help="HOST:PORT is a serial device server in raw mode (RTU over "
                   "TCP), not Modbus TCP")
    if scan:
        p.add_argument("--parity", default="N", help="serial parities to try: N (default), E, O, several as N,E,O, "
                       "or all; each with every --baudrates")
    else:
        p.add_argument("--parity", choices=["N", "E", "O"], default="N", help="serial parity (default N)")
    p.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    # read: None when not given, so that a --ref of another kind is refused rather than silently overriding it
    p.add_argument("--kind", choices=list(FUNCTION), default="holding" if scan else None,
                   help="register type (default holding)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")


def cmd_read(args: argparse.Namespace) -> int:
    return asyncio.run(read_command(args))


def cmd_scan(args: argparse.Namespace) -> int:
    started = time.monotonic()
    code = asyncio.run(scan_command(args))
    print(f"scan took {format_duration(time.monotonic() - started)}", file=sys.stderr)
    return code


def add_parsers(sub: Any) -> None:
    """``sluice read`` and ``sluice scan`` on the main parser's subcommands."""
    p = sub.add_parser("read", help="read an address range once and show every interpretation "
                       "(int16/uint16, int32/uint32/float32 in each byte order, ASCII)")
    _line_options(p)
    p.add_argument("--baudrate", type=int, default=9600, help="serial baud rate (default 9600)")
    p.add_argument("--unit", type=int, default=1, help="unit (slave) id (default 1)")
    p.add_argument("--address", type=int, default=None, help="0-based protocol address (default 0)")
    p.add_argument("--ref", default=None, help="or the manual's reference instead of --kind/--address: 40001, 30010")
    p.add_argument("--count", type=int, default=10, help="registers (or bits) to read (default 10)")
    p.add_argument("--timeout", type=duration_arg, default=1.0, metavar="DURATION", help="default 1s")
    p.set_defaults(func=cmd_read)
    p = sub.add_parser("scan", help="find which unit ids answer, at which baud rates and parities; bounded time on "
                       "a silent bus")
    _line_options(p, scan=True)
    p.add_argument("--units", default="1-247", help="unit ids to try: 1-247 (default), 1-10,20")
    p.add_argument("--baudrates", default=None, help="serial baud rates to try, e.g. 9600,19200 (default 9600)")
    p.add_argument("--address", type=int, default=0, help="address each probe reads (default 0)")
    p.add_argument("--count", type=int, default=2, help="registers each probe reads (default 2)")
    p.add_argument("--timeout", type=duration_arg, default=0.1, metavar="DURATION",
                   help="per probe (default 100ms); a unit heard answering later is asked again with 2s; total "
                        "at most units × baud rates × parities × timeout")
    p.set_defaults(func=cmd_scan)
