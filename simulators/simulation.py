"""What ``sluice sim`` serves: a ``sim.yaml`` (:class:`SimFile`) or a gateway configuration
directory, turned into simulated servers (Modbus TCP ports, RTU buses, serial device servers,
DTUs dialling in), and the ``sluice sim`` entry point (:func:`load_simulation`,
:func:`run_simulator`, :func:`main_sim`).

Each server is a transport (:mod:`simulators.modbus_tcp`, :mod:`simulators.modbus_rtu`,
:mod:`simulators.modbus_dtu`) around the one transport-independent device of
:mod:`simulators.modbus_device`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import logging
import os
import signal
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeGuard, TypeVar

from pydantic import Field, model_validator

from drivers.modbus.dtu_link import parse_listen
from drivers.modbus import dtu, rtu, rtu_tcp, tcp
from drivers.modbus.dtu import DtuDevice
from drivers.modbus.profile import ModbusDevice, ProfileModel
from drivers.modbus.rtu import RtuDevice, bus_key
from drivers.modbus.rtu_tcp import RtuTcpDevice
from gateway.config import is_loopback, load_config, load_profiles
from gateway.validation import validate_doc
from gateway.driver import AnyDevice, Device, DeviceConfig, StrictModel
from gateway.logs import add_log_level, setup_logging
from gateway.units import Duration, Identifier
from gateway.yamlpos import ConfigError, ConfigErrors, load_yaml
from simulators.modbus_device import Faults, SimDevice, UnknownUnit
from simulators.modbus_dtu import DtuSim
from simulators.modbus_rtu import RtuBus, RtuTcpServer
from simulators.modbus_tcp import ModbusTcpServer

__all__ = ["SimFile", "SimServer", "buses_for_config", "load_simulation", "main_sim", "run_simulator",
           "sim_device_for"]

log = logging.getLogger("sluice.sim")


# =========================================================================== sim.yaml
class FaultsModel(StrictModel):
    no_answer: bool = Field(default=False, description="never answer this unit")
    delay: Duration = Field(default=0.0, le=3600, description="wait this long before answering")
    exception: int | None = Field(default=None, ge=1, le=255, description="answer with this exception code")
    disconnect: bool = Field(default=False, description="close the connection on a request for this unit")


class SimDeviceModel(StrictModel):
    profile: str = Field(min_length=1, description="a file of profiles_dir, without .yaml")
    port: int = Field(ge=0, le=65535, description="devices on one port share a server; 0: a free port")
    unit_id: int = Field(default=1, ge=0, le=255, description="the Modbus unit id it answers")
    name: Identifier | None = Field(default=None, description="for messages; defaults to <profile>@<port>/<unit>")
    seed: int = Field(default=0, description="seeds the random walks")
    writable: bool = Field(default=False, description="accept writes (5, 6, 15, 16) instead of exception 01")
    faults: FaultsModel = Field(default=FaultsModel(), description="misbehaviour to rehearse with")


class RtuFaultsModel(FaultsModel):
    crc: float = Field(default=0.0, ge=0, le=1, description="share of replies sent with a wrong CRC")
    garbage: float = Field(default=0.0, ge=0, le=1, description="share of replies preceded by noise")
    truncate: float = Field(default=0.0, ge=0, le=1, description="share of replies cut short")


class SimUnitModel(StrictModel):
    profile: str = Field(min_length=1, description="a file of profiles_dir, without .yaml")
    unit_id: int = Field(ge=1, le=247, description="the Modbus unit id it answers, 1..247")
    name: Identifier | None = Field(default=None, description="for messages; defaults to <profile>/<unit>")
    seed: int = Field(default=0, description="seeds the random walks")
    writable: bool = Field(default=False, description="accept writes (5, 6, 15, 16) instead of exception 01")
    faults: RtuFaultsModel = Field(default=RtuFaultsModel(), description="misbehaviour to rehearse with")


class SimBusModel(StrictModel):
    """An RTU bus: served on a new pseudo-terminal (its path is printed), or on a serial port."""

    link: Path | None = Field(default=None, description="also make this path a symlink to the pty; relative to "
                                                        "this file")
    serial_port: str | None = Field(default=None, min_length=1,
                                    description="serve on this serial port instead of a pty (a null-modem "
                                                "cable or a socat pty pair to the gateway's port)")
    baudrate: int = Field(default=9600, ge=300, le=4_000_000, description="bits per second (for wire timing)")
    parity: Literal["N", "E", "O"] = Field(default="N", description="N, E or O")
    stopbits: Literal[1, 2] = Field(default=1, description="1 or 2")
    wire_timing: bool = Field(default=False, description="each frame takes its transmission time at baudrate")
    devices: list[SimUnitModel] = Field(min_length=1, description="the units on this bus")

    @model_validator(mode="after")
    def _one_port(self) -> SimBusModel:
        if self.link is not None and self.serial_port is not None:
            raise ValueError("give link: (a pty, linked there) or serial_port: (a real port), not both")
        return self


class ServerOptions(StrictModel):
    unknown_unit: UnknownUnit = Field(default="exception", description="exception: answer 0x0B; silent: answer nothing")


class SimFile(StrictModel):
    """``sim.yaml``: which profiles to serve on which ports and unit ids."""

    profiles_dir: Path = Field(default=Path("profiles"), description="relative to this file")
    host: str = Field(default="127.0.0.1", min_length=1, description="address to listen on")
    unknown_unit: UnknownUnit = Field(default="exception",
                                      description="exception: answer 0x0B; silent: answer nothing")
    servers: dict[int, ServerOptions] = Field(default_factory=dict, description="per-port options")
    devices: list[SimDeviceModel] = Field(default_factory=list, description="Modbus TCP devices")
    buses: list[SimBusModel] = Field(default_factory=list, description="Modbus RTU buses")


def _display(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def _is_gateway_config(path: Path) -> bool:
    return path.is_dir() or path.name == "gateway.yaml"


class SimServer(Protocol):
    """What ``sluice sim`` runs: a TCP server or an RTU bus (``async with`` serves it)."""

    @property
    def devices(self) -> dict[int, SimDevice]: ...

    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: object) -> None: ...
    def describe(self) -> str: ...


def load_simulation(path: Path | str) -> list[SimServer]:
    """Servers and buses (not started) for a ``sim.yaml`` file or a gateway configuration directory.

    A gateway configuration (a directory, or its ``gateway.yaml``) is served as written: every
    enabled ``modbus_tcp`` device whose host is a loopback address, at its port and unit id; the
    Modbus RTU devices of every serial port on a bus of their own
    (:func:`simulators.modbus_rtu.buses_for_config`); every ``modbus_rtu_tcp`` device on a
    loopback host behind a simulated serial device server at its port; every DTU with a literal
    registration dialling in to its ``listen:`` address.
    Raises :class:`ConfigErrors` with every problem located as ``file:line:col``.
    """
    path = Path(path)
    if _is_gateway_config(path):
        return _from_gateway_config(path)
    errors: list[ConfigError] = []
    doc, errs = load_yaml(path, _display(path))
    if doc is None:
        raise ConfigErrors(errs)
    errors += errs
    sim = validate_doc(doc, SimFile, errors)
    if sim is None:
        raise ConfigErrors(errors)
    profiles = load_profiles(path.parent / sim.profiles_dir, errors)
    origin = time.time()
    groups: dict[int, list[SimDevice]] = {}
    free: list[SimDevice] = []
    seen: dict[tuple[int, int], int] = {}
    if not sim.devices and not sim.buses:
        errors.append(doc.error((), "nothing to simulate", "add `devices:` (Modbus TCP) or `buses:` (Modbus RTU)"))

    def modbus_profile(loc: tuple[str | int, ...], name: str) -> ProfileModel | None:
        profile = profiles.get(name)
        if isinstance(profile, ProfileModel):
            return profile
        if name in profiles:
            errors.append(doc.error(loc, f"profile '{name}' is not a Modbus profile",
                                    "choose a profile with `protocol: modbus`"))
        elif profiles or not errors:
            close = difflib.get_close_matches(name, list(profiles), n=1)
            errors.append(doc.error(loc, f"unknown profile '{name}'", f"did you mean '{close[0]}'?" if close else
                                    f"add {sim.profiles_dir}/{name}.yaml; available: "
                                    + (", ".join(sorted(profiles)) or "none")))
        return None

    for i, dev in enumerate(sim.devices):
        profile = modbus_profile(("devices", i, "profile"), dev.profile)
        if profile is None:
            continue
        if dev.port and (dev.port, dev.unit_id) in seen:
            errors.append(doc.error(("devices", i, "unit_id"), f"port {dev.port} unit id {dev.unit_id} is "
                                    f"already simulated by device {seen[(dev.port, dev.unit_id)] + 1}",
                                    "give each device on one port its own unit_id"))
            continue
        seen[(dev.port, dev.unit_id)] = i
        faults = Faults(**dev.faults.model_dump())
        device = SimDevice(profile, dev.unit_id, name=dev.name or f"{dev.profile}@{dev.port}/{dev.unit_id}",
                           seed=dev.seed, origin=origin, writable=dev.writable, faults=faults)
        (groups.setdefault(dev.port, []) if dev.port else free).append(device)
    for port in sim.servers:
        if port not in groups:
            errors.append(doc.error(("servers", port), f"no device is simulated on port {port}",
                                    "remove these options or fix the port number", key=True))
    buses: list[SimServer] = []
    for b, bus in enumerate(sim.buses):
        units: dict[int, SimDevice] = {}
        for j, unit in enumerate(bus.devices):
            profile = modbus_profile(("buses", b, "devices", j, "profile"), unit.profile)
            if unit.unit_id in units:
                errors.append(doc.error(("buses", b, "devices", j, "unit_id"), f"unit id {unit.unit_id} is already "
                                        f"on this bus ({units[unit.unit_id].name})",
                                        "give each device on one bus its own unit_id"))
            elif profile is not None:
                units[unit.unit_id] = SimDevice(profile, unit.unit_id, name=unit.name or f"{unit.profile}/{unit.unit_id}",
                                                seed=unit.seed, origin=origin, writable=unit.writable,
                                                faults=Faults(**unit.faults.model_dump()))
        link = path.parent / bus.link if bus.link is not None else None
        buses.append(RtuBus(units.values(), link=link, serial_port=bus.serial_port, baudrate=bus.baudrate,
                            parity=bus.parity, stopbits=bus.stopbits, wire_timing=bus.wire_timing))
    if errors:
        raise ConfigErrors(errors)
    options = {port: sim.servers.get(port, ServerOptions(unknown_unit=sim.unknown_unit)) for port in groups}
    servers: list[SimServer] = [ModbusTcpServer(devs, host=sim.host, port=port, unknown_unit=options[port].unknown_unit)
                                for port, devs in groups.items()]
    servers += [ModbusTcpServer([dev], host=sim.host, port=0, unknown_unit=sim.unknown_unit) for dev in free]
    return servers + buses


# =========================================================================== from a gateway configuration
ConfigT = TypeVar("ConfigT", bound=DeviceConfig)


def _served(dev: AnyDevice, model: type[ConfigT]) -> TypeGuard[Device[ConfigT, ProfileModel]]:
    """Whether ``dev`` is a device of the Modbus driver whose device model is ``model`` (each
    ``protocol:`` has its own model, so this is the protocol check, typed)."""
    return isinstance(dev.config, model) and isinstance(dev.profile, ProfileModel)


def sim_device_for(dev: ModbusDevice, origin: float, faults: Faults | None = None) -> SimDevice:
    """A gateway device's unit, served from its profile; seeded by its id, so the same
    configuration gives the same random walks every run."""
    return SimDevice(dev.profile, dev.config.unit_id, name=dev.id, seed=zlib.crc32(dev.id.encode()), origin=origin,
                     faults=faults)


def _from_gateway_config(path: Path) -> list[SimServer]:
    config = load_config(path, secrets=False)  # devices only: the sinks' secrets are not read
    origin = time.time()
    groups: dict[tuple[str, int], list[SimDevice]] = {}
    for dev in config.devices:
        if not _served(dev, tcp.DeviceModel):  # protocol: modbus_tcp
            continue
        cfg = dev.config
        if not is_loopback(cfg.host):
            log.warning("not simulating %s: its host %s is not this machine", dev.id, cfg.host)
            continue
        host = cfg.host if cfg.host[:1].isdigit() or ":" in cfg.host else "127.0.0.1"
        group = groups.setdefault((host, cfg.port), [])
        if any(d.unit_id == cfg.unit_id for d in group):
            log.warning("not simulating %s: unit id %d on %s:%d is already simulated for another device",
                        dev.id, cfg.unit_id, host, cfg.port)
            continue
        group.append(sim_device_for(dev, origin))
    servers: list[SimServer] = [ModbusTcpServer(devs, host=host, port=port) for (host, port), devs in groups.items()]
    return servers + buses_for_config(config.devices, origin)


def _link_for(port: str) -> Path | None:
    """The configured port path if the simulator may make it a symlink to its pty, so that the
    gateway configuration works as written: a free path (or an earlier simulator's dangling or
    /dev/pts link) in a writable directory outside /dev. Never a real device."""
    path = Path(port).absolute()
    if path.parts[1:2] == ("dev",) or not os.access(path.parent, os.W_OK):
        return None
    if path.is_symlink():
        return path if os.readlink(path).startswith("/dev/pts/") or not path.exists() else None
    return None if path.exists() else path


def buses_for_config(devices: Sequence[AnyDevice], origin: float) -> list[SimServer]:
    """The RTU side of a gateway configuration: one bus per serial port (``modbus_rtu``) at its
    line settings, serving exactly its devices' units and profiles; one simulated serial device
    server per loopback ``host:port`` (``modbus_rtu_tcp``); one DTU per ``dtu.id``
    (``modbus_rtu_dtu``) that dials in to the listen address and registers with its literal
    registration packet. A bus is served on a new pty, linked at the configured port path when
    that is possible (:func:`_link_for`); else a warning says to point the devices at the pty
    path printed at start."""
    serial: dict[str, list[RtuDevice]] = {}
    servers: dict[tuple[str, int], list[RtuTcpDevice]] = {}
    dtus: dict[str, list[DtuDevice]] = {}
    for dev in devices:
        if _served(dev, dtu.DeviceModel):  # protocol: modbus_rtu_dtu
            dtus.setdefault(dev.config.dtu.id, []).append(dev)
        elif _served(dev, rtu.DeviceModel):  # protocol: modbus_rtu
            serial.setdefault(bus_key(dev.config.port), []).append(dev)
        elif _served(dev, rtu_tcp.DeviceModel):  # protocol: modbus_rtu_tcp
            cfg = dev.config
            if is_loopback(cfg.host):
                servers.setdefault(("127.0.0.1" if cfg.host == "localhost" else cfg.host, cfg.port), []).append(dev)
            else:
                log.warning("not simulating %s: its host %s is not this machine", dev.id, cfg.host)
    buses: list[SimServer] = []
    for group in serial.values():
        line = group[0].config
        link = _link_for(line.port)
        if link is None:
            log.warning("devices %s use %s, which the simulator cannot take over (a real device, or a directory "
                        "it cannot write): serving them on a new pseudo-terminal — point their port: at the path "
                        "printed below", ", ".join(d.id for d in group), line.port)
        buses.append(RtuBus(_units(group, origin), link=link, baudrate=line.baudrate, parity=line.parity,
                            stopbits=line.stopbits))
    buses += [RtuTcpServer(_units(group, origin), host=host, port=port) for (host, port), group in servers.items()]
    for dtu_id, dtu_group in dtus.items():
        dial = dtu_group[0].config
        registration, heartbeat = _literal(dial.dtu.registration), dial.dtu.heartbeat
        if registration is None:
            log.warning("not simulating DTU %s: its registration is a regex — run `sluice sim dtu --registration "
                        "...` with a packet that matches it", dtu_id)
            continue
        host, port = parse_listen(dial.listen)
        limit = dial.dtu.silence_limit
        buses.append(DtuSim(_units(dtu_group, origin), host="127.0.0.1" if host in ("0.0.0.0", "::") else host, port=port,
                            registration=registration, heartbeat=None if heartbeat is None else _literal(heartbeat),
                            heartbeat_interval=min(30.0, limit / 3) if limit else 30.0))
    return buses


def _literal(packet: Any) -> bytes | None:
    """The bytes of a DTU packet given as text: or hex:; None for a regex."""
    if packet.hex is not None:
        return bytes.fromhex(packet.hex)
    return packet.text.encode("utf-8") if packet.text is not None else None


def _units(group: Sequence[ModbusDevice], origin: float) -> list[SimDevice]:
    units: dict[int, SimDevice] = {}
    for dev in group:
        unit = dev.config.unit_id
        if unit in units:
            log.warning("not simulating %s: unit id %d is already simulated on its bus for %s", dev.id, unit,
                        units[unit].name)
            continue
        units[unit] = sim_device_for(dev, origin)
    return list(units.values())


# =========================================================================== sluice sim
async def run_simulator(config_path: Path | str, *, ready: Callable[[list[SimServer]], Any] | None = None,
                        stop: asyncio.Event | None = None) -> None:
    """Serve what ``config_path`` declares until ``stop`` is set (or the task is cancelled).

    ``config_path`` is a ``sim.yaml`` file or a gateway configuration directory (see
    :func:`load_simulation`). Prints one line per server (and for an
    RTU bus ``port: <path>``, the port the gateway opens), then calls ``ready(servers)``.
    Raises :class:`ConfigErrors` for a bad configuration and :class:`OSError` if a port is taken.
    """
    servers = load_simulation(config_path)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
            print(server.describe(), flush=True)
            if isinstance(server, RtuBus):
                print(f"port: {server.path}", flush=True)
        if not servers:
            print(f"nothing to simulate in {config_path}: no Modbus TCP or RTU-over-TCP device on a loopback "
                  "host, no Modbus RTU device", flush=True)
        if ready is not None:
            ready(servers)
        if stop is None:
            await asyncio.Future()  # until cancelled
        else:
            await stop.wait()


def main_sim(argv: Sequence[str] | None = None, *, default_config: Path = Path("config")) -> int:
    """``sluice sim``: 0 after SIGINT/SIGTERM, 1 if a port is taken, 2 for configuration errors.
    ``default_config``: what to serve when neither a file nor ``--config`` is given (``sluice``
    passes the directory ``sluice run`` uses)."""
    parser = argparse.ArgumentParser(
        prog="sluice sim", description="Simulate Modbus TCP devices and Modbus RTU buses (on pseudo-terminals, whose "
                                       "paths are printed) from their profiles until Ctrl-C.")
    parser.add_argument("file", nargs="?", type=Path, help="a simulator file (see config/sim.yaml)")
    parser.add_argument("-c", "--config", type=Path, default=None,
                        help="a gateway configuration directory: simulate its Modbus TCP, RTU and RTU-over-TCP "
                             "devices on this machine "
                             "(default when no file is given: the same directory `sluice run` uses)")
    add_log_level(parser, "info")
    args = parser.parse_args(argv)
    if args.file is not None and args.config is not None:
        parser.error("give a simulator file or --config, not both")
    if args.file is not None:
        target = args.file
    elif args.config is not None:
        target = args.config
    else:
        target = default_config

    setup_logging(args.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_simulator(target, stop=stop)

    try:
        asyncio.run(main())
    except ConfigErrors as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        print(f"{len(exc.errors)} error{'s' if len(exc.errors) != 1 else ''} in {target}; nothing was started",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot listen: {exc.strerror or exc} — is another simulator (or the real device) using "
              "the port? Stop it or change the port", file=sys.stderr)
        return 1
    return 0
