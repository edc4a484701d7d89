"""Simulated Modbus TCP devices: one listening port, MBAP framing, the units behind it
(:class:`~simulators.modbus_device.Units` of :class:`~simulators.modbus_device.SimDevice`).

:class:`ModbusTcpServer` is an async context manager (port 0 picks a free port); it owns only the
sockets and the MBAP header: what a unit answers, and its faults, are the device's. Per
connection, a slow unit's reply is held back without holding up the others. ``sluice sim``
(:mod:`simulators.simulation`) builds these servers from a ``sim.yaml`` or a gateway
configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Iterable
from typing import Any

from simulators.modbus_device import Later, ServesUnits, SimDevice, UnknownUnit, Units

__all__ = ["ModbusTcpServer"]

log = logging.getLogger("sluice.sim")

_MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length, unit id


class ModbusTcpServer(ServesUnits):
    """One listening port serving one or many simulated units. ``async with`` starts it.

    ``unknown_unit``: a request for a unit id no device has gets exception 0x0B ("exception",
    like a TCP gateway whose serial device does not answer) or nothing ("silent").
    """

    def __init__(self, devices: Iterable[SimDevice], *, host: str = "127.0.0.1", port: int = 0,
                 unknown_unit: UnknownUnit = "exception") -> None:
        self.units = Units(devices, where=f"{host}:{port}", unknown_unit=unknown_unit, disconnects=True)
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.StreamWriter, Later] = {}
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def name(self) -> str:
        return f"sim[{self.host}:{self.port}]"

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def unknown_unit(self) -> UnknownUnit:
        return self.units.unknown_unit

    @unknown_unit.setter
    def unknown_unit(self, value: UnknownUnit) -> None:
        self.units.unknown_unit = value

    async def __aenter__(self) -> ModbusTcpServer:
        await self.resume()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.refuse()

    async def resume(self) -> None:
        """Listen (again) on the same port; the first call binds, port 0 picks a free one."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.debug("%s: listening", self.name)

    async def refuse(self) -> None:
        """Stop listening (new connections are refused) and close every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer, late in list(self._connections.items()):
            await late.cancel()
            writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers))
        if server is not None:
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        task.set_name(f"{self.name}<-{peer[0]}:{peer[1]}" if peer else self.name)
        self._handlers.add(task)
        late = Later()
        self._connections[writer] = late
        self.stats.connections += 1
        try:
            while True:
                header = await reader.readexactly(7)
                tid, pid, length, unit = _MBAP.unpack(header)
                if pid != 0 or not 2 <= length <= 254:
                    log.debug("%s: bad MBAP header %s, closing the connection", self.name, header.hex())
                    return
                pdu = await reader.readexactly(length - 1)
                verdict = self.units.request(unit, pdu)
                if verdict.action == "close":
                    return
                if verdict.action == "reply":
                    reply = verdict.pdu if verdict.device is None else self.units.reply(verdict.device, pdu)
                    self._send(writer, tid, unit, reply)
                    await writer.drain()
                elif verdict.action == "later" and verdict.device is not None:
                    late.start(self._answer_later(writer, verdict.delay, tid, verdict.device, pdu),
                               name=f"{self.name}:delay[unit {unit}]")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            await late.cancel()
            del self._connections[writer]
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _answer_later(self, writer: asyncio.StreamWriter, delay: float, tid: int,
                            device: SimDevice, pdu: bytes) -> None:
        await asyncio.sleep(delay)
        if not writer.is_closing():
            self._send(writer, tid, device.unit_id, self.units.reply(device, pdu))

    @staticmethod
    def _send(writer: asyncio.StreamWriter, tid: int, unit: int, reply: bytes) -> None:
        writer.write(_MBAP.pack(tid, 0, len(reply) + 1, unit) + reply)

    def describe(self) -> str:
        units = ", ".join(str(u) for u in sorted(self.devices))
        return f"simulating {len(self.devices)} devices on {self.host}:{self.port} (unit ids {units})"
