"""The DTU side of Modbus RTU over TCP, dial-in (:mod:`drivers.modbus.dtu`): the registration and
heartbeat packets, the ``dtu:`` block, the listener that accepts DTUs and tells them apart, and
one :class:`DtuLink` (an :class:`~drivers.modbus.rtu_client.RtuLink`) per DTU. See
:mod:`drivers.modbus.dtu` for the design.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Sequence
from typing import Any, Final, Literal, cast

from pydantic import Field, field_validator, model_validator

from drivers.modbus.errors import ModbusConnectionError
from drivers.modbus.rtu_client import OnData, OnLost
from gateway.driver import StrictModel
from gateway.polling import format_duration
from gateway.units import Duration, Identifier

log = logging.getLogger(__name__)

MAX_REGISTRATION: Final = 512
"""Bytes a new connection may send without matching a registration before it is refused."""
DEFAULT_HEARTBEAT_TIMEOUT: Final = 180.0
"""Three missed heartbeats at the 60 s most DTUs are shipped with."""

# =========================================================================== packets
class PacketModel(StrictModel):
    """A registration or heartbeat packet: exactly one of ``text``, ``hex`` or ``regex``."""

    text: str | None = Field(default=None, min_length=1, max_length=256,
                             description="literal text, sent as UTF-8 (YAML double quotes take \\r, \\n, \\x..)")
    hex: str | None = Field(default=None, description="literal bytes in hex, spaces allowed: 'fe 01 42'")
    regex: str | None = Field(default=None, min_length=1,
                              description="regular expression over the bytes, matched at the first byte")

    @model_validator(mode="after")
    def _exactly_one(self) -> PacketModel:
        given = [k for k in ("text", "hex", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of text:, hex: or regex: (" +
                             (f"got {', '.join(given)}" if given else "got none") + ")")
        return self

    @field_validator("hex")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digits = "".join(value.replace(":", " ").split())
        try:
            data = bytes.fromhex(digits)
        except ValueError:
            raise ValueError(f"'{value}' is not hex bytes — write pairs of hex digits, e.g. 'fe 01 42'") from None
        if not 1 <= len(data) <= 256:
            raise ValueError("a packet is 1 to 256 bytes")
        return data.hex()

    @field_validator("regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            pattern = re.compile(value.encode("utf-8"), re.DOTALL)
        except re.error as exc:
            raise ValueError(f"'{value}' is not a regular expression: {exc}") from None
        if pattern.match(b"") is not None:
            raise ValueError(f"'{value}' matches no bytes at all, so it would accept anything — make it "
                             "require at least one byte")
        return value


class Packet:
    """A compiled :class:`PacketModel`: :meth:`match` at the start of a byte buffer."""

    __slots__ = ("literal", "regex", "text")

    def __init__(self, model: PacketModel) -> None:
        self.regex: re.Pattern[bytes] | None = None
        self.literal: bytes | None = None
        if model.regex is not None:
            self.regex = re.compile(model.regex.encode("utf-8"), re.DOTALL)
            self.text = f"regex '{model.regex}'"
        elif model.hex is not None:
            self.literal = bytes.fromhex(model.hex)
            self.text = f"hex {self.literal.hex(' ')}"
        else:
            assert model.text is not None
            self.literal = model.text.encode("utf-8")
            self.text = f"text '{model.text}'"

    def match(self, data: bytes | bytearray) -> int:
        """Bytes the packet takes at the start of ``data`` (> 0); 0 if more bytes could still make
        it match; -1 if it cannot match."""
        if self.literal is not None:
            if data.startswith(self.literal):
                return len(self.literal)
            return 0 if self.literal.startswith(data) else -1
        assert self.regex is not None
        found = self.regex.match(data)
        return found.end() if found is not None and found.end() > 0 else 0


class PacketFilter:
    """Drops heartbeats (and repeated literal registrations) from the start of each received
    segment, over and over, and hands on what follows. A segment that is the first part of a
    literal packet (a heartbeat split across TCP segments) is held until the next one says what
    it was: the rest of the packet (dropped) or anything else (handed on, held bytes first).
    Regex packets have no partial match in ``re``: they must arrive in one segment."""

    __slots__ = ("dropped", "held", "packets")

    def __init__(self, packets: Sequence[Packet]) -> None:
        self.packets = tuple(packets)
        self.dropped = 0
        self.held = b""

    def feed(self, data: bytes) -> bytes:
        """The bytes of ``data`` (after what was held) that are not packets; never raises."""
        if self.held:
            data, self.held = self.held + data, b""
        while data:
            partial = False
            for packet in self.packets:
                n = packet.match(data)
                if n > 0:
                    data = data[n:]
                    self.dropped += 1
                    break
                partial = partial or (n == 0 and packet.literal is not None)
            else:
                if partial:
                    self.held = data
                    return b""
                return data
        return b""


def show_bytes(data: bytes | bytearray, limit: int = 32) -> str:
    """Bytes as a technician compares them with a DTU's settings page: text if printable, else hex."""
    head = bytes(data[:limit])
    more = " …" if len(data) > limit else ""
    if head and all(32 <= b < 127 for b in head):
        return f"'{head.decode('ascii')}'{more}"
    return f"hex {head.hex(' ')}{more}"


# =========================================================================== configuration
class DtuModel(StrictModel):
    """The DTU a device sits behind; every device behind one DTU repeats the same block."""

    id: Identifier = Field(description="a name for the DTU, used in logs")
    registration: PacketModel = Field(description="what the DTU sends first when it connects")
    registration_timeout: Duration = Field(default=10.0, gt=0, le=300,
                                           description="how long a new connection may take to register")
    heartbeat: PacketModel | None = Field(default=None, description="a keep-alive packet the DTU sends; dropped")
    heartbeat_timeout: Duration | None = Field(
        default=None, gt=0, le=86400,
        description="a registered DTU from which nothing (no heartbeat, no reply) arrives for this long is hung "
                    f"up on; default {DEFAULT_HEARTBEAT_TIMEOUT:g}s with a heartbeat:, else only TCP keepalive")

    @property
    def silence_limit(self) -> float | None:
        """The heartbeat timeout in effect: the configured one, the default when the DTU sends
        heartbeats, else None (a DTU without heartbeats may be quiet between polls)."""
        if self.heartbeat_timeout is not None:
            return self.heartbeat_timeout
        return DEFAULT_HEARTBEAT_TIMEOUT if self.heartbeat is not None else None


def parse_listen(value: Any) -> tuple[str, int]:
    """``0.0.0.0:9000``, ``[::]:9000``, ``:9000`` or ``9000`` -> (host, port); ValueError for people."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"'{value}' is not a listen address — write host:port, e.g. 0.0.0.0:9000 (every "
                         "interface) or 127.0.0.1:9000")
    return host, int(port)


# =========================================================================== the link
class DtuLink:
    """One DTU's bus (:class:`drivers.modbus.rtu_client.RtuLink`). The listener hands it the DTU's
    registered connection (:meth:`attach`); the client binds to that connection on ``open`` and
    unbinds on ``close`` — closing the link never hangs up on the DTU (the client closes its link
    before every reconnect). ``wait`` is how long ``open`` waits for a DTU that is offline."""

    def __init__(self, spec: DtuModel, listen: str) -> None:
        self.spec = spec
        self.name = f"DTU {spec.id}"
        self.listen = listen
        self.registration = Packet(spec.registration)
        filters = [Packet(spec.heartbeat)] if spec.heartbeat is not None else []
        if self.registration.literal is not None:
            filters.append(self.registration)
        self._filter = PacketFilter(filters)
        self.wait = 0.0
        self.online = asyncio.Event()
        self.registrations = 0
        self.silent = 0  # connections hung up on because nothing arrived for the heartbeat timeout
        self._peer: _Peer | None = None
        self._bound: _Peer | None = None
        self._on_data: OnData | None = None
        self._on_lost: OnLost | None = None

    @property
    def heartbeats(self) -> int:
        """Heartbeats (and repeated registrations) dropped."""
        return self._filter.dropped

    @property
    def peer(self) -> str | None:
        return self._peer.address if self._peer is not None else None

    # ------------------------------------------------------------------ the listener's side
    def attach(self, peer: _Peer, rest: bytes) -> None:
        old, self._peer = self._peer, peer
        self.registrations += 1
        self._filter.held = b""
        self.online.set()
        if old is not None:
            log.info("%s dialled in again from %s; its old connection from %s is closed", self.name,
                     peer.address, old.address)
            old.hang_up()
            if self._bound is old:
                self._lost(ConnectionResetError("the DTU dialled in again"))
        else:
            log.info("%s registered from %s on %s", self.name, peer.address, self.listen)
        if rest:
            self.receive(peer, rest)

    def receive(self, peer: _Peer, data: bytes) -> None:
        if peer is not self._peer:
            return
        data = self._filter.feed(data)
        if data and self._bound is peer and self._on_data is not None:
            self._on_data(data)

    def peer_lost(self, peer: _Peer, exc: Exception | None) -> None:
        if peer is not self._peer:
            return
        self._peer = None
        self.online.clear()
        log.info("%s: connection from %s closed%s", self.name, peer.address, f" ({exc})" if exc else "")
        if self._bound is peer:
            self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        on_lost = self._on_lost
        self._bound, self._on_data, self._on_lost = None, None, None
        if on_lost is not None:
            on_lost(exc)

    # ------------------------------------------------------------------ the client's side
    async def open(self, on_data: OnData, on_lost: OnLost, timeout: float) -> None:
        self.close()
        if self._peer is None and self.wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(timeout, self.wait)):
                    await self.online.wait()
        if self._peer is None:
            raise ModbusConnectionError("offline", f"{self.name} has not dialled in to {self.listen}")
        self._bound, self._on_data, self._on_lost = self._peer, on_data, on_lost

    def write(self, data: bytes) -> None:
        peer = self._bound
        if peer is None or peer.transport is None or peer.transport.is_closing():
            raise ModbusConnectionError("disconnected", f"{self.name}: connection closed")
        peer.transport.write(data)

    def close(self) -> None:
        self._bound, self._on_data, self._on_lost = None, None, None


class _Peer(asyncio.Protocol):
    """One accepted connection: registering, then carrying one DTU's bus."""

    def __init__(self, listener: DtuListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        self.host = "?"
        self.link: DtuLink | None = None
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._heard = 0.0  # loop time of the last byte received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection: a Transport, never datagram
        peer = transport.get_extra_info("peername")
        if peer:
            self.host = str(peer[0])
            self.address = f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _keepalive(sock)
        self.listener.peers.add(self)
        self._timer = asyncio.get_running_loop().call_later(self.listener.registration_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self.link is None:
            what = (f"sent {show_bytes(self._buf)}, which matches no DTU's registration" if self._buf else
                    "sent nothing")
            self.listener.refuse(self, f"{what} within {format_duration(self.listener.registration_timeout)}")

    def data_received(self, data: bytes) -> None:
        self._heard = asyncio.get_running_loop().time()
        if self.link is not None:
            self.link.receive(self, data)
            return
        self._buf += data
        found = self.listener.identify(self._buf)
        if found is None:
            if len(self._buf) >= MAX_REGISTRATION:
                self.listener.refuse(self, f"sent {show_bytes(self._buf)}, which matches no DTU's registration")
            return
        if found is False:
            self.listener.refuse(self, f"registered as {show_bytes(self._buf)}, which matches no DTU's registration")
            return
        link, n = found
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.link = link
        rest = bytes(self._buf[n:])
        self._buf.clear()
        self.listener.registered(self)
        limit = link.spec.silence_limit
        if limit is not None:
            self._timer = asyncio.get_running_loop().call_later(limit, self._watch, limit)
        link.attach(self, rest)

    def _watch(self, limit: float) -> None:
        """The heartbeat timeout: a DTU can stay connected (its TCP stack answering keepalives)
        while its modem or serial side hangs; nothing arriving for ``limit`` means it is dead."""
        quiet = asyncio.get_running_loop().time() - self._heard
        if quiet < limit:
            self._timer = asyncio.get_running_loop().call_later(limit - quiet, self._watch, limit)
            return
        self._timer = None
        assert self.link is not None
        self.link.silent += 1
        log.warning("%s: nothing from %s for %s (no heartbeat, no reply): hanging up — a DTU normally dials in "
                    "again; if not, check its power, SIM and signal, and that dtu.heartbeat_timeout is longer "
                    "than the DTU's heartbeat interval", self.link.name, self.address, format_duration(limit))
        self.hang_up()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.listener.peers.discard(self)
        if self.link is not None:
            self.link.peer_lost(self, exc)

    def hang_up(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _keepalive(sock: socket.socket) -> None:
    """A cellular link can vanish without a FIN: let the kernel notice within about two minutes."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


class DtuListener:
    """The listening socket for one ``listen:`` address and the DTUs that may dial in to it.
    ``start`` binds (port 0 picks a free port: :attr:`port`), ``stop`` closes every connection."""

    def __init__(self, listen: str, links: Sequence[DtuLink]) -> None:
        self.listen = listen
        self.host, self.port = parse_listen(listen)
        self.links = sorted(links, key=lambda k: k.spec.id)
        self._literal = [k for k in self.links if k.registration.literal is not None]
        self._regex = [k for k in self.links if k.registration.regex is not None]
        self.registration_timeout = max(k.spec.registration_timeout for k in self.links)
        self.peers: set[_Peer] = set()
        self.refused = 0
        self._refusals: dict[str, str] = {}  # peer host -> the reason last logged
        self._server: asyncio.Server | None = None

    def identify(self, data: bytes | bytearray) -> tuple[DtuLink, int] | Literal[False] | None:
        """The DTU whose registration starts ``data`` and its length; None while more bytes could
        still match one; False if none can."""
        pending = False
        for link in self._literal:
            n = link.registration.match(data)
            if n > 0:
                return link, n
            pending = pending or n == 0
        for link in self._regex:
            n = link.registration.match(data)
            if n > 0:
                return link, n
            pending = True
        return None if pending else False

    def refuse(self, peer: _Peer, reason: str) -> None:
        self.refused += 1
        if self._refusals.get(peer.host) != reason:
            self._refusals[peer.host] = reason
            log.warning("DTU listener %s: refused a connection from %s: it %s — known DTUs: %s. Check the DTU's "
                        "registration packet setting against dtu.registration (logged once per address and "
                        "reason)", self.listen, peer.address, reason,
                        ", ".join(f"{k.spec.id} ({k.registration.text})" for k in self.links))
        else:
            log.debug("DTU listener %s: refused %s again: it %s", self.listen, peer.address, reason)
        peer.hang_up()

    def registered(self, peer: _Peer) -> None:
        self._refusals.pop(peer.host, None)

    async def start(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Peer(self), self.host, self.port, reuse_address=True)
        except OSError as exc:
            raise ModbusConnectionError("listen", f"cannot listen on {self.listen}: {exc.strerror or exc}") from None
        if self.port == 0:  # a free port was picked (tests): say which in every message
            self.port = self._server.sockets[0].getsockname()[1]
            self.listen = f"{self.host}:{self.port}"
            for link in self.links:
                link.listen = self.listen

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for peer in list(self.peers):
            peer.hang_up()
        if server is not None:
            await server.wait_closed()


