"""Modbus RTU over TCP, dial-in (``protocol: modbus_rtu_dtu``): the gateway listens on a TCP port,
cellular DTUs (4G/5G "data transfer units": USR-G771, ZLAN, Waveshare, ...) connect to it, say who
they are with a registration packet, and the RS485 bus behind each one is polled like a local port.

A device file::

    id: barn-meter
    protocol: modbus_rtu_dtu
    profile: eastron-sdm630
    unit_id: 1
    listen: 0.0.0.0:9000          # shared by every DTU device with the same listen:
    dtu:
      id: barn-4g                 # the devices behind one DTU name the same dtu.id, with the same block
      registration: {text: "BARN-0001"}     # or {hex: "fe 01 42"} or {regex: "^SN[0-9]{8}"}
      registration_timeout: 10s   # a connection that has not registered by then is closed
      heartbeat: {hex: "fe"}      # optional; recognised and dropped from the Modbus stream
      heartbeat_timeout: 3m       # nothing at all from the DTU this long: hang up (default 3m with a
                                  # heartbeat:, else off)

Design, top to bottom:

* **Packets** (:class:`Packet`): a literal (``text:`` UTF-8 or ``hex:``) or a regular expression
  (``regex:``, over bytes, anchored at the first byte). Registration is matched against the
  first bytes a connection sends; literals are tried before regexes, regexes in ``dtu.id``
  order. A connection that cannot match any literal and there is no regex, or that sent 512
  bytes without a match, or that is silent longer than the largest ``registration_timeout`` on
  its listener (the DTU is not known yet, so its own timeout cannot be chosen), is refused:
  closed, and logged once per peer address and reason.
* **Heartbeats** are recognised at the start of a received TCP segment (a DTU sends one as a
  packet of its own; when it travels in one segment with a reply it is in front of it) and
  dropped, repeatedly; so is a literal registration packet sent again (some DTUs prefix it to
  every packet). A segment that is the first part of a literal packet is held until the next
  one completes it (a packet cut by the network; :class:`PacketFilter`). A heartbeat literal
  that could be the start of a reply from one of the DTU's units is a configuration error.
* **Dead DTUs**: a DTU can stay connected — its TCP stack answering keepalives — while its modem
  or serial side hangs. A registered connection from which nothing arrives (no heartbeat, no
  reply) for ``heartbeat_timeout`` is hung up on, with one warning; the DTU's devices go down
  with the connection, and polling resumes when it dials in again.
* **Links** (:class:`DtuLink`, an :class:`~drivers.modbus_rtu.RtuLink`): one per DTU. The socket
  belongs to the listener; the client binds to the DTU's current connection. A DTU that dials in
  again replaces its old connection (closed; the request in flight fails as ``disconnected``)
  and its bus resumes at once.
* **Pollers**: one :class:`DtuListenerPoller` per listen address (the task the core runs), which
  binds the port and runs one :class:`DtuPoller` (a :class:`~drivers.modbus.ModbusPoller` over
  :class:`~drivers.modbus_rtu.ModbusRtuClient`, the same bus discipline: one outstanding request,
  reply found by unit id, function, length and CRC) per DTU, in a task ``poll[DTU <id>]``. While
  a DTU is offline its devices are down (logged once) and its poller waits for it to dial in
  instead of probing blindly. The DTU does the serial timing; ``pause`` adds silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from pydantic import Field, field_validator, model_validator

from drivers.modbus import ModbusConnectionError, ModbusPoller, ProfileModel, plan_summary
from drivers.modbus_rtu import RTU_HINTS, LineSettings, ModbusRtuClient, OnData, OnLost, pauses_of
from gateway.driver import Claim, Device, DeviceStatus, Emit, Problem, StrictModel, slow_timeout
from gateway.polling import Backoff, Health, format_duration
from gateway.reading import Reading
from gateway.units import Duration, Identifier

__all__ = ["DTU_HINTS", "PROFILE_KIND", "PROTOCOLS", "DeviceModel", "DtuLink", "DtuListener",
           "DtuListenerPoller", "DtuModel", "DtuPoller", "Packet", "PacketModel", "ProfileModel", "check", "claims",
           "make_pollers", "parse_listen"]

PROTOCOLS: Final = frozenset({"modbus_rtu_dtu"})
PROFILE_KIND: Final = "modbus"

log = logging.getLogger(__name__)

MAX_REGISTRATION: Final = 512
"""Bytes a new connection may send without matching a registration before it is refused."""
DTU_FRAME_GAP: Final = 0.25
"""A reply crossing a cellular link may arrive in several segments with gaps far above a serial
line's; a started reply is given up after this much quiet (not the 50 ms of a local bus)."""
DEFAULT_HEARTBEAT_TIMEOUT: Final = 180.0
"""Three missed heartbeats at the 60 s most DTUs are shipped with."""
_REPLY_FUNCTIONS: Final = frozenset({1, 2, 3, 4, 0x81, 0x82, 0x83, 0x84})

DTU_HINTS: Final[Mapping[str, str]] = {
    **RTU_HINTS,
    "timeout": "check the unit id and the device behind the DTU (power, RS485 wiring, and that the DTU's "
               "serial port uses the device's baud rate and parity); if every unit times out, check that the "
               "DTU is in transparent (raw) mode, not Modbus TCP mode",
    "garbage": "bytes that are no Modbus RTU frame — is the DTU in Modbus TCP mode, or does it send a "
               "heartbeat that dtu.heartbeat does not describe? Else check its serial settings",
    "offline": "check that the DTU's server address and port point at this gateway's "
               "listen address, its SIM, APN and signal, and that what it registers with matches "
               "dtu.registration (refused connections are logged)",
    "disconnected": "the DTU's connection dropped (cellular coverage, power) — it normally dials in again "
                    "by itself",
}


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


class DeviceModel(LineSettings):
    """A Modbus RTU device behind a DTU that dials in (``protocol: modbus_rtu_dtu``)."""

    protocol: Literal["modbus_rtu_dtu"]
    listen: str = Field(description="address:port the gateway listens on for DTUs, e.g. 0.0.0.0:9000")
    dtu: DtuModel

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, value: Any) -> str:
        host, port = parse_listen(value)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# =========================================================================== the link
class DtuLink:
    """One DTU's bus (:class:`drivers.modbus_rtu.RtuLink`). The listener hands it the DTU's
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
        self.transport = transport  # type: ignore[assignment]
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


# =========================================================================== pollers
class DtuPoller(ModbusPoller):
    """The devices behind one DTU. In :meth:`run`, while the DTU is offline, it waits for the DTU
    to dial in (the devices are down, logged once) rather than probing on a backoff timer, so a
    DTU that reconnects is polled again at once."""

    def __init__(self, link: DtuLink, devices: Sequence[Device]) -> None:
        self.link = link
        client = ModbusRtuClient(link, pauses=pauses_of(devices), hints=DTU_HINTS, frame_gap=DTU_FRAME_GAP)
        super().__init__(link.name, client, devices)
        self._following = False

    async def run(self, emit: Emit) -> None:
        self._following = True
        await super().run(emit)

    async def _ensure_connected(self) -> bool:
        if await super()._ensure_connected():
            return True
        if not self._following:
            return False
        await self.link.online.wait()
        return await super()._ensure_connected()


class DtuListenerPoller:
    """The :class:`gateway.driver.Poller` of one listen address: binds it in ``run`` (retrying
    with backoff if the port is taken) and runs one :class:`DtuPoller` per DTU."""

    def __init__(self, listen: str, devices: Sequence[Device]) -> None:
        by_dtu: dict[str, list[Device]] = {}
        for dev in devices:
            by_dtu.setdefault(dev.config.dtu.id, []).append(dev)
        self.name = f"{listen} (DTU dial-in)"
        self.pollers = [DtuPoller(DtuLink(group[0].config.dtu, listen), group)
                        for _id, group in sorted(by_dtu.items())]
        self.listener = DtuListener(listen, [p.link for p in self.pollers])
        self.status: dict[str, DeviceStatus] = {k: v for p in self.pollers for k, v in p.status.items()}
        self._health = Health(f"DTU listener {listen}", None, log, words=("listening", "listening again"))
        self._backoff_max = min(d.config.backoff_max for d in devices)
        self._listening = asyncio.Event()

    @property
    def plans(self) -> dict[str, Any]:
        return {k: v for p in self.pollers for k, v in p.plans.items()}

    async def __aenter__(self) -> DtuListenerPoller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for poller in self.pollers:
            await poller.__aexit__(*exc)
        await self.listener.stop()

    async def wait_listening(self) -> int:
        """The bound port, once ``run`` or ``poll_once`` listens (for port 0 in tests)."""
        await self._listening.wait()
        return self.listener.port

    async def _listen(self) -> None:
        backoff = Backoff(1.0, self._backoff_max)
        while True:
            try:
                await self.listener.start()
            except ModbusConnectionError as exc:
                self._health.down("listen", f"{exc} — another program (a second gateway?) holds the port, or "
                                  "the address is not this machine's; retrying")
                await asyncio.sleep(backoff.next())
                continue
            self._health.ok(detail=f"DTUs {', '.join(p.link.spec.id for p in self.pollers)}")
            self._listening.set()
            return

    async def run(self, emit: Emit) -> None:
        await self._listen()
        try:
            async with asyncio.TaskGroup() as group:
                for poller in self.pollers:
                    group.create_task(poller.run(emit), name=f"poll[{poller.name}]")
        finally:
            await self.listener.stop()

    async def poll_once(self) -> list[Reading]:
        """Listen, wait up to each DTU's ``registration_timeout`` for it to dial in, read it once."""
        await self._listen()
        for poller in self.pollers:
            poller.link.wait = poller.link.spec.registration_timeout
        try:
            results = await asyncio.gather(*(p.poll_once() for p in self.pollers))
        finally:
            await self.listener.stop()
        return [r for batch in results for r in batch]


# =========================================================================== driver entry points
_DTU_KEYS: Final = ("registration", "registration_timeout", "heartbeat", "heartbeat_timeout")


def _packet_key(packet: PacketModel) -> tuple[str, str]:
    if packet.regex is not None:
        return "regex", packet.regex
    return "bytes", (packet.hex if packet.hex is not None else (packet.text or "").encode("utf-8").hex())


def claims(device: Device) -> list[Claim]:
    """The address the gateway listens on for DTUs (shared by every DTU that dials in there)."""
    return [Claim(f"listen address {device.config.listen}", ("listen",))]


def check(devices: Sequence[Device]) -> list[Problem]:
    """One DTU has one setting and one listen address; two DTUs on one listener register
    differently; a heartbeat cannot be mistaken for a reply; no unit is polled twice."""
    problems: list[Problem] = []
    first: dict[str, Device] = {}
    registrations: dict[tuple[str, tuple[str, str]], Device] = {}
    seen: dict[tuple[str, int, str], Device] = {}
    problems += filter(None, map(slow_timeout, devices))
    for dev in devices:
        cfg = dev.config
        dtu = cfg.dtu
        other = first.setdefault(dtu.id, dev)
        if other is not dev:
            ocfg = other.config
            if ocfg.listen != cfg.listen:
                problems.append(Problem(
                    dev, ("listen",), f"DTU '{dtu.id}' listens on {ocfg.listen} for '{other.id}' ({other.source}), "
                    f"but this device says {cfg.listen}",
                    "a DTU dials in to one address: give every device behind it the same listen:"))
                continue
            differ = [k for k in _DTU_KEYS if getattr(dtu, k) != getattr(ocfg.dtu, k)]
            if differ:
                problems.append(Problem(
                    dev, ("dtu", differ[0]),
                    f"DTU '{dtu.id}' is set up differently for '{other.id}' ({other.source}): {differ[0]} differs",
                    "every device behind one DTU repeats the same dtu: block — copy it from the other file"))
                continue
        else:
            key = (cfg.listen, _packet_key(dtu.registration))
            taken = registrations.setdefault(key, dev)
            if taken is not dev:
                problems.append(Problem(
                    dev, ("dtu", "registration"),
                    f"DTU '{dtu.id}' registers like DTU '{taken.config.dtu.id}' ({taken.source}) on {cfg.listen}",
                    "each DTU needs its own registration packet (usually its serial number or IMEI) — set a "
                    "distinct one in the DTU and here"))
        unit_key = (dtu.id, cfg.unit_id, dev.profile_name)
        if unit_key in seen:
            problems.append(Problem(
                dev, ("unit_id",),
                f"DTU '{dtu.id}' unit {cfg.unit_id} is already polled as '{seen[unit_key].id}' "
                f"({seen[unit_key].source}) with the same profile",
                "a copied file? give this device its own unit_id, or remove one of them"))
        else:
            seen[unit_key] = dev
    for dev in devices:
        hb = dev.config.dtu.heartbeat
        if hb is None or first.get(dev.config.dtu.id) is not dev:
            continue
        literal = Packet(hb).literal
        units = {d.config.unit_id for d in devices if d.config.dtu.id == dev.config.dtu.id}
        if literal is not None and literal[0] in units and (len(literal) == 1 or literal[1] in _REPLY_FUNCTIONS):
            problems.append(Problem(
                dev, ("dtu", "heartbeat"),
                f"heartbeat {show_bytes(literal)} could be the start of a reply from unit {literal[0]}",
                "set the DTU's heartbeat to text, or to bytes starting above f7 (e.g. fe), and write the same here"))
    return problems


def make_pollers(devices: Sequence[Device]) -> list[DtuListenerPoller]:
    """One poller (one task; inside it one task per DTU) per listen address."""
    groups: dict[str, list[Device]] = {}
    for dev in devices:
        groups.setdefault(dev.config.listen, []).append(dev)
    pollers = [DtuListenerPoller(listen, group) for listen, group in groups.items()]
    for poller in pollers:
        for device_id, requests in poller.plans.items():
            log.info("%s", plan_summary(device_id, requests))
    return pollers
