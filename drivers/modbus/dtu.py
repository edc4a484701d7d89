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
* **Links** (:class:`DtuLink`, an :class:`~drivers.modbus.rtu_client.RtuLink`): one per DTU. The socket
  belongs to the listener; the client binds to the DTU's current connection. A DTU that dials in
  again replaces its old connection (closed; the request in flight fails as ``disconnected``)
  and its bus resumes at once.
* **Pollers**: one :class:`DtuListenerPoller` per listen address (the task the core runs), which
  binds the port and runs one :class:`DtuPoller` (a :class:`~drivers.modbus.poller.ModbusPoller` over
  :class:`~drivers.modbus.rtu_client.ModbusRtuClient`, the same bus discipline: one outstanding request,
  reply found by unit id, function, length and CRC) per DTU, in a task ``poll[DTU <id>]``. While
  a DTU is offline its devices are down (logged once) and its poller waits for it to dial in
  instead of probing blindly. The DTU does the serial timing; ``pause`` adds silence.
"""


from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from pydantic import Field, field_validator

from drivers.modbus.dtu_link import DtuLink, DtuListener, DtuModel, Packet, PacketModel, parse_listen, show_bytes
from drivers.modbus.errors import ModbusConnectionError
from drivers.modbus.planner import plan_summary
from drivers.modbus.poller import ModbusPoller
from drivers.modbus.profile import ProfileModel
from drivers.modbus.rtu_client import RTU_HINTS, LineSettings, ModbusRtuClient, pauses_of
from gateway.driver import Claim, Device, DeviceStatus, Emit, Problem, slow_timeout
from gateway.polling import Backoff, Health
from gateway.reading import Reading

__all__ = ["DTU_HINTS", "PROFILE_KIND", "PROTOCOLS", "DeviceModel", "DtuListenerPoller", "DtuPoller", "ProfileModel", "check",
           "claims", "make_pollers"]

PROTOCOLS: Final = frozenset({"modbus_rtu_dtu"})
PROFILE_KIND: Final = "modbus"

log = logging.getLogger(__name__)

DTU_FRAME_GAP: Final = 0.25
"""A reply crossing a cellular link may arrive in several segments with gaps far above a serial
line's; a started reply is given up after this much quiet (not the 50 ms of a local bus)."""
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


class DeviceModel(LineSettings):
    """A Modbus RTU device behind a DTU that dials in (``protocol: modbus_rtu_dtu``)."""

    protocol: Literal["modbus_rtu_dtu"] = Field(description="modbus_rtu_dtu: behind a 4G/5G DTU that dials in")
    listen: str = Field(description="address:port the gateway listens on for DTUs, e.g. 0.0.0.0:9000")
    dtu: DtuModel = Field(description="the DTU this device is behind: its name and how it registers")

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, value: Any) -> str:
        host, port = parse_listen(value)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


DtuDevice = Device[DeviceModel, ProfileModel]


# =========================================================================== pollers
class DtuPoller(ModbusPoller):
    """The devices behind one DTU. In :meth:`run`, while the DTU is offline, it waits for the DTU
    to dial in (the devices are down, logged once) rather than probing on a backoff timer, so a
    DTU that reconnects is polled again at once."""

    def __init__(self, link: DtuLink, devices: Sequence[DtuDevice]) -> None:
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

    def __init__(self, listen: str, devices: Sequence[DtuDevice]) -> None:
        by_dtu: dict[str, list[DtuDevice]] = {}
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


def claims(device: DtuDevice) -> list[Claim]:
    """The address the gateway listens on for DTUs (shared by every DTU that dials in there)."""
    return [Claim(f"listen address {device.config.listen}", ("listen",))]


def check(devices: Sequence[DtuDevice]) -> list[Problem]:
    """One DTU has one setting and one listen address; two DTUs on one listener register
    differently; a heartbeat cannot be mistaken for a reply; no unit is polled twice."""
    problems: list[Problem] = []
    first: dict[str, DtuDevice] = {}
    registrations: dict[tuple[str, tuple[str, str]], DtuDevice] = {}
    seen: dict[tuple[str, int, str], DtuDevice] = {}
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


def make_pollers(devices: Sequence[DtuDevice]) -> list[DtuListenerPoller]:
    """One poller (one task; inside it one task per DTU) per listen address."""
    groups: dict[str, list[DtuDevice]] = {}
    for dev in devices:
        groups.setdefault(dev.config.listen, []).append(dev)
    pollers = [DtuListenerPoller(listen, group) for listen, group in groups.items()]
    for poller in pollers:
        for device_id, requests in poller.plans.items():
            log.info("%s", plan_summary(device_id, requests))
    return pollers
