"""A simulated cellular DTU that dials in to the gateway (``protocol: modbus_rtu_dtu``): it connects
to the gateway's listen address, sends its registration packet, sends heartbeats, and serves
units over the connection with the RTU framing of :class:`~simulators.modbus_rtu.RtuLine` (the
device's faults and answers are :mod:`simulators.modbus_device`'s); ``sluice sim dtu``. This
module is the transport only: dialling, registration, heartbeats and the DTU's own faults.

Faults: the units' faults (``no_answer``, ``delay``, ``exception``, ``crc``, ``garbage``,
``truncate``), plus the DTU's own: :meth:`DtuSim.drop` (the connection drops; it dials in again
after ``reconnect_delay``), ``register=False`` (connects and says nothing), a heartbeat written
just before every reply (``heartbeat_before_reply``), registration and heartbeats written in
``segments`` TCP writes ``segment_pause`` apart (a packet split across TCP segments), :attr:`DtuSim.hung`
(stays connected but sends nothing: no heartbeat, no reply — a DTU whose modem hangs), and
``drop_every`` in ``sluice sim dtu``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from gateway.logs import add_log_level, setup_logging
from gateway.units import parse_duration
from simulators.modbus_device import ServesUnits, SimDevice, Units
from simulators.modbus_rtu import RtuOverTcp, parse_fault_arg, parse_unit_arg, sim_units_from_args

__all__ = ["DtuSim", "main_sim_dtu"]

log = logging.getLogger("sluice.sim")


class DtuSim(ServesUnits):
    """A DTU with an RTU bus behind it that dials in to ``host:port``. ``async with`` starts
    dialling (and redialling after every drop); leaving hangs up for good."""

    def __init__(self, devices: Iterable[SimDevice], *, host: str, port: int, registration: bytes | None,
                 heartbeat: bytes | None = None, heartbeat_interval: float = 30.0, reconnect_delay: float = 1.0,
                 heartbeat_before_reply: bool = False, segments: int = 1, segment_pause: float = 0.0,
                 seed: int = 0) -> None:
        self.units = Units(devices, where=f"the DTU dialling {host}:{port}")
        self.host, self.port = host, port
        self.registration = registration
        self.heartbeat = heartbeat
        self.heartbeat_interval = heartbeat_interval
        self.reconnect_delay = reconnect_delay
        self.heartbeat_before_reply = heartbeat_before_reply
        self.segments, self.segment_pause = segments, segment_pause
        self.hung = False  # connected, but sends nothing at all
        self.carrier = RtuOverTcp(self.units, name=f"sim-dtu[{self.path}]", seed=seed, write=self._write)
        self._held: bytearray | None = None  # replies waiting for a split packet to be sent
        self.connections = 0  # successful dial-ins
        self.heartbeats = 0
        self.connected = asyncio.Event()
        self._dialler: asyncio.Task[None] | None = None

    @property
    def path(self) -> str:
        return f"{self.host}:{self.port}"

    async def __aenter__(self) -> DtuSim:
        await self.carrier.line.__aenter__()
        self._dialler = asyncio.create_task(self._dial(), name=f"sim-dtu-dial[{self.path}]")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._dialler is not None:
            self._dialler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dialler
            self._dialler = None
        await self.carrier.line.__aexit__(*exc)
        self.drop()

    def drop(self) -> None:
        """The connection drops (coverage lost); the DTU dials in again after ``reconnect_delay``."""
        self.carrier.drop()

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            lost: asyncio.Future[None] = loop.create_future()
            try:
                transport, _stream = await loop.create_connection(functools.partial(self.carrier.protocol, lost),
                                                                  self.host, self.port)
            except OSError as exc:
                log.debug("sim DTU: cannot reach %s (%s); retrying", self.path, exc)
                await asyncio.sleep(self.reconnect_delay)
                continue
            self.connections += 1
            try:
                if self.registration is not None:
                    await self._send_split(self.registration)
                self.connected.set()
                while not lost.done():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.heartbeat_interval):
                            await asyncio.shield(lost)
                    if not lost.done() and self.heartbeat is not None and not self.hung:
                        await self._send_split(self.heartbeat)
                        self.heartbeats += 1
            finally:
                self.connected.clear()
                if self.carrier.transport is transport:
                    self.drop()
            await asyncio.sleep(self.reconnect_delay)

    async def _send_split(self, packet: bytes) -> None:
        """``packet`` in ``segments`` writes ``segment_pause`` apart (asyncio sets TCP_NODELAY, so
        each write leaves as a segment of its own). A reply due meanwhile follows the packet, as
        a DTU sends a packet whole however the network cuts it."""
        step = max(1, -(-len(packet) // max(1, self.segments)))
        self._held = bytearray()
        try:
            for start in range(0, len(packet), step):
                if start:
                    await asyncio.sleep(self.segment_pause)
                self.carrier.send(packet[start:start + step])
        finally:
            held, self._held = self._held, None
        if held:
            self.carrier.send(bytes(held))

    def _write(self, data: bytes) -> None:
        """A framed reply from the line: after a heartbeat if asked, after a packet being split."""
        if self.hung:
            return
        chunks = [data]
        if self.heartbeat_before_reply and self.heartbeat is not None:
            chunks.insert(0, self.heartbeat)
            self.heartbeats += 1
        for chunk in chunks:
            if self._held is not None:
                self._held += chunk  # after the packet being sent in pieces
            else:
                self.carrier.send(chunk)

    def describe(self) -> str:
        who = repr(self.registration) if self.registration is not None else "nothing (no registration)"
        return (f"DTU dialling in to {self.path}, registering as {who}: {len(self.devices)} units — "
                f"{self.units.describe()}")


# =========================================================================== sluice sim dtu
def _packet(text: str | None, hex_text: str | None, what: str) -> bytes | None:
    if hex_text is not None:
        try:
            return bytes.fromhex("".join(hex_text.split()))
        except ValueError:
            raise SystemExit(f"sluice sim dtu: --{what}-hex {hex_text!r} is not hex bytes") from None
    return text.encode("utf-8") if text is not None else None


def _seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main_sim_dtu(argv: Sequence[str] | None = None) -> int:
    """``sluice sim dtu``: dial in to a gateway and serve units until SIGINT/SIGTERM; 2 for bad arguments."""
    parser = argparse.ArgumentParser(
        prog="sluice sim dtu",
        description="Simulate a 4G/5G DTU that dials in to the gateway's DTU listener (protocol: modbus_rtu_dtu), "
                    "registers, sends heartbeats and serves Modbus RTU units from profiles.")
    parser.add_argument("--connect", required=True, metavar="HOST:PORT", help="the gateway's listen address")
    reg = parser.add_mutually_exclusive_group(required=True)
    reg.add_argument("--registration", metavar="TEXT", help="registration packet as text")
    reg.add_argument("--registration-hex", metavar="HEX", help="registration packet as hex bytes")
    hb = parser.add_mutually_exclusive_group()
    hb.add_argument("--heartbeat", metavar="TEXT", help="heartbeat packet as text")
    hb.add_argument("--heartbeat-hex", metavar="HEX", help="heartbeat packet as hex bytes")
    parser.add_argument("--heartbeat-interval", type=_seconds, default=30.0, metavar="DURATION",
                        help="time between heartbeats (default 30s)")
    parser.add_argument("--reconnect-delay", type=_seconds, default=5.0, metavar="DURATION",
                        help="wait before dialling in again after a drop (default 5s)")
    parser.add_argument("--segments", type=int, default=1, metavar="N",
                        help="fault: write registration and heartbeats in N pieces (TCP segments)")
    parser.add_argument("--segment-pause", type=_seconds, default=0.05, metavar="DURATION",
                        help="time between those pieces (default 50ms)")
    parser.add_argument("--drop-every", type=_seconds, default=None, metavar="DURATION",
                        help="fault: drop the connection this often (it dials in again)")
    parser.add_argument("--unit", dest="units", action="append", type=parse_unit_arg, required=True,
                        metavar="UNIT=PROFILE", help="a unit id and the profile it serves (repeat for more units)")
    parser.add_argument("--profiles", type=Path, default=Path("config/profiles"), help="profile directory")
    parser.add_argument("--fault", dest="faults", action="append", type=parse_fault_arg, default=[],
                        metavar="UNIT:FAULT[=VALUE]", help="e.g. 2:crc=0.1, 3:no_answer, 4:delay=0.5")
    add_log_level(parser, "info")
    args = parser.parse_args(argv)

    host, sep, port = args.connect.rpartition(":")
    if not sep or not port.isdigit():
        print(f"--connect {args.connect!r}: write HOST:PORT, e.g. 127.0.0.1:9000", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    devices = sim_units_from_args(args.profiles, args.units, args.faults)
    if devices is None:
        return 2
    registration = _packet(args.registration, args.registration_hex, "registration")
    heartbeat = _packet(args.heartbeat, args.heartbeat_hex, "heartbeat")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with DtuSim(devices.values(), host=host.strip("[]"), port=int(port), registration=registration,
                          heartbeat=heartbeat, heartbeat_interval=args.heartbeat_interval,
                          reconnect_delay=args.reconnect_delay, segments=args.segments,
                          segment_pause=args.segment_pause) as sim:
            print(sim.describe(), flush=True)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(args.drop_every):
                        await stop.wait()
                if not stop.is_set():
                    log.info("sim DTU: dropping the connection (--drop-every)")
                    sim.drop()

    asyncio.run(main())
    return 0
