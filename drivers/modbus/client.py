"""The transport contract of :class:`~drivers.modbus.poller.ModbusPoller` (:class:`ModbusClient`)
and the Modbus TCP client: MBAP framing, one transaction at a time, a timeout per request, stale
replies discarded. It can only send function codes 1, 2, 3 and 4: the gateway never writes to a
device."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Final, Protocol, TypeVar, cast

from drivers.modbus.codec import mbap_request, mbap_split, read_reply_data
from drivers.modbus.errors import ModbusConnectionError, ModbusProtocolError, ModbusTimeout
from drivers.modbus.profile import READ_FUNCTIONS
from gateway.polling import format_duration

_P = TypeVar("_P", bound=asyncio.BaseProtocol)


_DOWN_HINT: Final = {
    "timeout": "check the unit id, that the device is powered, and its RS485 wiring (A/B, termination) "
               "and baud rate if it sits behind a TCP converter",
    "refused": "nothing accepts Modbus connections there — check the port and that the device's "
               "Modbus TCP server is enabled",
    "unreachable": "check the IP address, the network cable and that the device is powered",
    "disconnected": "many devices allow only one or two clients: check that no other master (SCADA, "
                    "a second gateway) holds it, and that the device accepts this unit id and request",
    "bad_response": "the answer was not valid Modbus TCP — check that host:port is a Modbus TCP "
                    "server (not RTU over TCP) and the unit id",
}


class _Connection(asyncio.Protocol):
    """One TCP connection: reassembles MBAP frames and hands the awaited one to its waiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiting_tid = -1
        self.waiter: asyncio.Future[bytes] | None = None
        self.stale = 0  # replies to requests that had already timed out
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection: a Transport, never datagram

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while True:
            try:
                found = mbap_split(buf)
            except ModbusProtocolError as exc:
                self._lost_framing(exc)
                return
            if found is None:
                return
            tid, end = found
            if tid == self.waiting_tid and self.waiter is not None and not self.waiter.done():
                # The PDU only: the unit id of the answer is not checked, the transaction id
                # already pairs it with the request.
                self.waiter.set_result(bytes(buf[7:end]))
            else:
                self.stale += 1
            del buf[:end]

    def _lost_framing(self, why: ModbusProtocolError) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ModbusProtocolError(f"{why}; reconnecting"))
        self.buffer.clear()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            reason = f": {exc}" if exc else ""
            self.waiter.set_exception(ModbusConnectionError("disconnected", f"connection closed by the device{reason}"))
        if not self.closed.done():
            self.closed.set_result(None)


def _expire(future: asyncio.Future[bytes], timeout: float) -> None:
    if not future.done():
        future.set_exception(ModbusTimeout(f"no answer within {format_duration(timeout)}"))


async def open_tcp(factory: Callable[[], _P], host: str, port: int, timeout: float, name: str = "") -> _P:
    """A TCP connection whose failures are the :class:`ModbusConnectionError` kinds the poller
    tells apart: ``refused`` (nothing listens) and ``unreachable`` (no answer, no route)."""
    where = name or f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            _transport, protocol = await asyncio.get_running_loop().create_connection(factory, host, port)
    except ConnectionRefusedError:
        raise ModbusConnectionError("refused", f"connection to {where} refused") from None
    except TimeoutError:
        raise ModbusConnectionError("unreachable", f"no answer connecting to {where} within "
                                    f"{format_duration(timeout)}") from None
    except OSError as exc:
        raise ModbusConnectionError("unreachable", f"cannot connect to {where}: {exc.strerror or exc}") from None
    return protocol


class ModbusTcpClient:
    """A Modbus TCP client for one host:port that can only read.

    One transaction at a time (callers serialise; the poller does). Each request has its own
    timeout; a reply that arrives after its request timed out carries an older transaction id
    and is discarded, never mistaken for the answer to the next request. Not an async context
    manager by itself: the poller that owns it opens and closes it.
    """

    hints: Mapping[str, str] = _DOWN_HINT

    def __init__(self, host: str, port: int = 502) -> None:
        self.host = host
        self.port = port
        self._conn: _Connection | None = None
        self._tid = 0

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and conn.transport is not None and not conn.transport.is_closing()

    @property
    def lost(self) -> bool:
        """The connection closed (by the device, or after a framing error) since it was opened;
        cleared by :meth:`connect` and :meth:`close`."""
        return self._conn is not None and not self.connected

    @property
    def stale_replies(self) -> int:
        return self._conn.stale if self._conn is not None else 0

    async def connect(self, timeout: float) -> None:
        """Open the connection; raises :class:`ModbusConnectionError` (``refused``/``unreachable``)."""
        await self.close()
        self._conn = await open_tcp(_Connection, self.host, self.port, timeout)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.transport is None:
            return
        conn.transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await conn.closed

    async def read(self, unit: int, function: int, address: int, count: int, timeout: float) -> bytes:
        """Read ``count`` registers or bits; returns the reply's data bytes (registers big endian
        as sent; bits packed least significant first).

        Raises :class:`ModbusTimeout`, :class:`ModbusExceptionResponse`,
        :class:`ModbusProtocolError` or :class:`ModbusConnectionError`.
        """
        if function not in READ_FUNCTIONS:
            raise ValueError(f"function code {function} is not a read: this client only reads (1, 2, 3, 4)")
        conn = self._conn
        if conn is None or conn.transport is None:
            raise ModbusConnectionError("disconnected", "not connected")
        if conn.transport.is_closing():
            raise ModbusConnectionError("disconnected", "connection closed by the device")
        self._tid = tid = self._tid % 0xFFFF + 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        conn.waiting_tid, conn.waiter = tid, future
        conn.transport.write(mbap_request(tid, unit, function, address, count))
        handle = loop.call_later(timeout, _expire, future, timeout)
        try:
            pdu = await future
        finally:
            handle.cancel()
            conn.waiter, conn.waiting_tid = None, -1
        return read_reply_data(pdu, function, count)


class ModbusClient(Protocol):
    """What :class:`ModbusPoller` needs from a transport (Modbus TCP, RTU on a serial port,
    RTU over TCP): one transaction at a time, a timeout per request, read function codes only.

    ``hints`` maps an error kind to what a technician should check; ``connected`` is False
    before :meth:`connect` and after the link was lost; ``lost`` is True when it was open and
    went away by itself (cleared by ``connect``/``close``).
    """

    hints: Mapping[str, str]

    @property
    def connected(self) -> bool: ...
    @property
    def lost(self) -> bool: ...
    async def connect(self, timeout: float) -> None: ...
    async def close(self) -> None: ...
    async def read(self, unit: int, function: int, address: int, count: int, timeout: float) -> bytes: ...


