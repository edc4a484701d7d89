"""The contract between the core and a protocol driver, and how drivers are found.

A driver is one module under ``drivers/`` (or one level down, ``drivers/modbus/tcp.py``) that defines, at module level:

``PROTOCOLS: frozenset[str]``
    the values of a device's ``protocol:`` key that it serves (e.g. ``{"modbus_tcp"}``).
``PROFILE_KIND: str``
    the value of a profile's ``protocol:`` key it understands (e.g. ``"modbus"``); several
    drivers may share one kind (TCP and RTU share register maps).
``DeviceModel``, ``ProfileModel``
    pydantic models, subclasses of :class:`DeviceConfig` and :class:`ProfileConfig`.
``check(devices: Sequence[Device]) -> list[Problem]``
    cross-device checks that one file cannot see (two devices on one serial port with different
    line settings, a profile point the device's unit cannot address, ...).
``claims(device: Device) -> list[Claim]``
    the physical resources the device uses (a serial port with its path resolved, a TCP
    ``host:port`` it connects to, an address it listens on), each with the key path that names it.
    Devices of one protocol may share a resource (their driver's ``check`` says how); the core
    refuses a resource claimed by two protocols (a ``modbus_rtu`` and a ``serial`` device on one
    port).
``make_pollers(devices: Sequence[Device]) -> list[Poller]``
    groups the devices by physical connection (one host:port, one serial bus) and returns one
    :class:`Poller` per connection. Constructors do no I/O.

The core never imports a driver by name: adding ``drivers/foo.py`` (or a module in a package,
``drivers/foo/bar.py``, for a protocol family sharing its models) is all a new protocol needs.
A lookup (:func:`driver_for_protocol`, :func:`driver_for_profile_kind`) imports the modules most
likely to serve it first — the one named like the key (``modbus_tcp``: ``drivers/modbus/tcp.py``),
then those sharing its first word — and stops at the one that does, so a configuration imports
only the drivers it uses (each costs 0.3–3 MB of memory); only listing every protocol (an error
message) imports them all.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Generic, Protocol, TypeVar, cast, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

import drivers
from gateway.encode import tag_problem
from gateway.reading import Reading
from gateway.units import Duration, Identifier

Emit = Callable[[Reading], None]
"""How a poller hands a reading to the core. Never blocks, never raises; the core commits it."""


def fail_at(loc: tuple[str | int, ...], message: str, given: Any = None) -> ValidationError:
    """A validation error at ``loc`` inside the model being validated (pydantic prefixes the
    enclosing path), so gateway.config reports it at that key's file:line:col. Raise it from a
    model validator."""
    return fail_at_all([(loc, message, given)])


def fail_at_all(found: Sequence[tuple[tuple[str | int, ...], str, Any]]) -> ValidationError:
    """:func:`fail_at` for several ``(loc, message, given)`` at once: each is reported."""
    return ValidationError.from_exception_data("config", [InitErrorDetails(
        type=PydanticCustomError("value_error", "{text}", {"text": message}), loc=loc, input=given)
        for loc, message, given in found])


ExactText = Annotated[str, StringConstraints(strip_whitespace=False)]
"""Text kept exactly as written, leading and trailing spaces included (tag keys and values)."""


class StrictModel(BaseModel):
    """Base of every configuration model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class DeviceConfig(StrictModel):
    """The settings every device has, whatever its protocol. Drivers subclass it."""

    id: Identifier = Field(description="unique device id, used in topics and tags")
    profile: str = Field(description="name of a file under profiles/ (without .yaml)")
    protocol: str
    enabled: bool = Field(default=True, description="false: the device is checked but not polled")
    interval: Duration = Field(default=1.0, gt=0, description="time between polls")
    timeout: Duration = Field(default=1.0, gt=0, description="how long to wait for an answer")
    retries: int = Field(default=1, ge=0, le=10, description="extra attempts within one poll")
    backoff_max: Duration = Field(default=60.0, gt=0, description="longest wait between polls of a device that is down")
    measurement: str | None = Field(default=None, min_length=1, description="overrides the profile's measurement")
    tags: dict[ExactText, ExactText] = Field(default_factory=dict,
                                             description="stored with every reading, exactly as written")

    @model_validator(mode="after")
    def _storable_tags(self) -> DeviceConfig:
        found = [(("tags", key), f"{what} '{text}' {problem} — write it without that backslash (e.g. '/' instead)",
                  text)
                 for key, value in self.tags.items()
                 for text, what in ((key, "tag key"), (value, "tag value"))
                 if (problem := tag_problem(text, key=what == "tag key")) is not None]
        if found:
            raise fail_at_all(found)
        return self


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """How to show one field of a reading to a person: its unit, and whether it is a float32
    (printed with the float32's own precision, not as the float64 that carries it)."""

    unit: str | None = None
    float32: bool = False


_PARITY_WORDS = {"none": "N", "even": "E", "odd": "O", "mark": "M", "space": "S"}


def parity_letter(value: Any, allowed: str) -> Any:
    """``parity:`` of every serial driver is the letter manuals print in ``9600 8N1`` (one of
    ``allowed``, e.g. ``NEO``); a word or a small letter is refused with the spelling to use
    (a pydantic "before" validator: what is not a string is left for the type check)."""
    if isinstance(value, str):
        letter = _PARITY_WORDS.get(value.strip().lower(), value.strip().upper())
        if letter in allowed and value != letter:
            raise ValueError(f"{value!r} is not how parity is written here — write parity: {letter} (the letter of "
                             f"8{letter}1, the same for every serial device: {', '.join(allowed)})")
    return value


class ProfileSource(StrictModel):
    """Where a profile's register map comes from (``source:``): the manufacturer's published
    document, where it was actually read, and how far it is confirmed. Shown by ``sluice profile show``."""

    title: str = Field(min_length=1, description="the document's title as printed (manual, protocol sheet, wiki page)",
                       examples=["Eastron SDM630 Modbus Protocol (input register table)"])
    version: str = Field(min_length=1, description="edition, revision or date as printed; say so when none is printed",
                         examples=["V1.4", "not printed in the copies read"])
    url: str = Field(pattern=r"^https?://\S+$", description="where the document can be read",
                     examples=["https://www.eastroneurope.com/images/uploads/products/protocol/SDM630_MODBUS_Protocol.pdf"])
    read_via: str | None = Field(default=None, description="where the table was actually read when not in the document "
                                 "itself: a transcription, an open-source driver (name it, with its URL)")
    verified: str = Field(min_length=1, description="how far the map is confirmed: what agrees with what, and "
                          "'not yet checked on a device' until it is; starts with 'false' or 'partial' when parts are "
                          "unsettled (those points carry verified: false)",
                          examples=["partial — one transcription; not yet checked on a meter"])


class ProfileConfig(StrictModel):
    """What every device profile has. Drivers subclass it with their point maps."""

    protocol: str
    manufacturer: str | None = Field(default=None, description="the maker as printed on the device",
                                     examples=["Eastron"])
    model: str | None = Field(default=None, description="the model as printed on the device", examples=["SDM630-Modbus v2"])
    description: str | None = Field(default=None, description="what the device is, in a few words",
                                    examples=["three-phase energy meter"])
    measurement: str | None = Field(default=None, min_length=1,
                                    description="InfluxDB measurement; defaults to the profile's name")
    source: ProfileSource | None = Field(default=None, description="the published document the map was written from")

    def field_info(self) -> dict[str, FieldInfo]:
        """Unit and precision of the fields this profile declares (for `sluice once`); none by default."""
        return {}


class ValidRange(StrictModel):
    """A point's plausible values (``valid: {min, max}``): outside them it is left out of the
    reading and the reading is marked uncertain. Shared by every driver's profiles."""

    min: float | None = Field(default=None, description="lowest plausible value")
    max: float | None = Field(default=None, description="highest plausible value")

    @model_validator(mode="after")
    def _order(self) -> ValidRange:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max} — swap them")
        return self


ConfigT = TypeVar("ConfigT", bound=DeviceConfig, covariant=True)
"""A driver's device model (its ``DeviceModel``)."""
ProfileT = TypeVar("ProfileT", bound=ProfileConfig, covariant=True)
"""A driver's profile model (its ``ProfileModel``)."""


@dataclass(frozen=True, slots=True)
class Device(Generic[ConfigT, ProfileT]):
    """A device with its profile resolved: what a driver polls. A driver names its own
    ``Device[DeviceModel, ProfileModel]``; the core, which serves every driver, holds
    :data:`AnyDevice` (read-only fields, hence covariant: every driver's device is one)."""

    config: ConfigT
    profile: ProfileT
    profile_name: str
    tags: dict[str, str]
    measurement: str
    source: Path  # the device's YAML file, for messages

    @property
    def id(self) -> str:
        return str(self.config.id)


AnyDevice = Device[DeviceConfig, ProfileConfig]
"""A device of any driver, as the core and the cross-driver checks see it."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A resource a device uses: ``resource`` names it exactly (``serial /dev/ttyUSB0``, ``tcp
    10.0.0.5:502``, ``listen 0.0.0.0:9000``), ``loc`` is the key that names it in the device's file."""

    resource: str
    loc: tuple[str | int, ...]


def serial_claim(port: str, loc: tuple[str | int, ...] = ("port",)) -> Claim:
    """A serial port, by the device it is (a /dev/serial/by-id/ link resolved)."""
    return Claim(f"serial port {os.path.realpath(port)}", loc)


def tcp_claim(host: str, port: int, loc: tuple[str | int, ...] = ("host",)) -> Claim:
    """A TCP endpoint the gateway connects to."""
    return Claim(f"TCP endpoint {host.lower()}:{port}", loc)


@dataclass(frozen=True, slots=True)
class Problem:
    """A cross-device problem a driver found; ``loc`` is a key path in the device's file."""

    device: AnyDevice
    loc: tuple[str | int, ...]
    message: str
    hint: str = ""
    warning: bool = False  # reported by `sluice check` and at start, but not fatal


def slow_timeout(device: AnyDevice) -> Problem | None:
    """A warning for a request/response device whose ``timeout`` is longer than its ``interval``:
    a device that does not answer then holds up its connection past its next poll."""
    cfg = device.config
    if cfg.timeout <= cfg.interval:
        return None
    return Problem(device, ("timeout",), f"timeout {cfg.timeout:g}s is longer than interval {cfg.interval:g}s: a "
                   "device that does not answer delays its next poll and the other devices on its connection",
                   "make the timeout shorter than the interval (a device answers in well under a second), or "
                   "poll less often", warning=True)


@dataclass(slots=True)
class DeviceStatus:
    """What the core and the health endpoint know about one device."""

    up: bool = False
    polls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    last_success_ns: int | None = None
    last_error: str | None = None


@runtime_checkable
class Poller(Protocol):
    """Owns one physical connection and polls its devices in turn; one asyncio task runs it.

    Lifecycle: constructed (no I/O) -> ``async with poller`` (may open nothing yet; connections
    are opened and reopened by ``run``) -> ``run(emit)`` until cancelled -> exit closes the
    connection. ``poll_once`` may be called instead of ``run`` (for ``sluice once``) and
    returns one reading per device that answered. ``run`` and ``poll_once`` never raise for
    device or network faults: those are logged once per state change and counted in ``status``.
    """

    name: str
    status: dict[str, DeviceStatus]

    async def __aenter__(self) -> Poller: ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def run(self, emit: Emit) -> None: ...
    async def poll_once(self) -> list[Reading]: ...


class ProfileFamily(Protocol):
    """What loading a profile needs of its kind: the model (a driver module has it, and so has a
    family package's ``profile`` module)."""

    @property
    def ProfileModel(self) -> type[ProfileConfig]: ...


class DriverModule(Protocol):
    """What a driver module provides, as the core sees it (the module docstring above says what
    each name means). The core calls ``check``, ``claims`` and ``make_pollers`` only with devices
    of the driver's own ``PROTOCOLS``, so a driver declares them over its own ``Device[...]``."""

    __name__: str

    @property
    def PROTOCOLS(self) -> frozenset[str]: ...
    @property
    def PROFILE_KIND(self) -> str: ...
    @property
    def DeviceModel(self) -> type[DeviceConfig]: ...
    @property
    def ProfileModel(self) -> type[ProfileConfig]: ...

    def check(self, devices: Sequence[AnyDevice], /) -> list[Problem]: ...
    def claims(self, device: AnyDevice, /) -> list[Claim]: ...
    def make_pollers(self, devices: Sequence[AnyDevice], /) -> Sequence[Poller]: ...


def _driver_names() -> list[str]:
    """The modules of the ``drivers`` package and of its subpackages (``modbus.tcp``), by name,
    not imported."""
    names: list[str] = []
    for info in pkgutil.iter_modules(drivers.__path__):
        if info.name.startswith("_"):
            continue
        names.append(info.name)
        if info.ispkg:
            path = [str(Path(p) / info.name) for p in drivers.__path__]
            names += [f"{info.name}.{sub.name}" for sub in pkgutil.iter_modules(path) if not sub.name.startswith("_")]
    return sorted(names)


def driver_modules() -> list[DriverModule]:
    """Every module in the ``drivers`` package, or one level down in its subpackages
    (``drivers/modbus/tcp.py``), that declares ``PROTOCOLS`` (imports them all)."""
    modules = [importlib.import_module(f"drivers.{name}") for name in _driver_names()]
    # A module that declares PROTOCOLS is a driver: the contract above is what it promises.
    return cast("list[DriverModule]", [m for m in modules if hasattr(m, "PROTOCOLS")])


def _search(key: str, serves: Callable[[DriverModule], bool]) -> DriverModule | None:
    """The first driver module that ``serves`` ``key``, importing candidates one by one in the
    order of the module docstring (same name, same first word, then the rest by name)."""
    word = key.split("_")[0]

    def order(name: str) -> tuple[bool, bool, str]:
        flat = name.replace(".", "_")  # modbus.rtu_tcp serves modbus_rtu_tcp
        return flat != key, flat.split("_")[0] != word, name

    for name in sorted(_driver_names(), key=order):
        module = importlib.import_module(f"drivers.{name}")
        if hasattr(module, "PROTOCOLS") and serves(cast("DriverModule", module)):
            return cast("DriverModule", module)
    return None


@functools.cache
def driver_for_protocol(protocol: str) -> DriverModule | None:
    """The driver serving ``protocol``, or None if no driver does."""
    return _search(protocol, lambda m: protocol in m.PROTOCOLS)


@functools.cache
def driver_for_profile_kind(kind: str) -> ProfileFamily | None:
    """The module holding the ``ProfileModel`` of profile kind ``kind``: a family package's own
    ``drivers/<kind>/profile.py`` (every transport of the family shares it, and loading a profile
    then imports no transport), else the first driver module of that kind."""
    try:
        module = importlib.import_module(f"drivers.{kind}.profile")
    except ModuleNotFoundError:
        module = None
    if module is not None and hasattr(module, "ProfileModel"):
        return cast("ProfileFamily", module)
    return _search(kind, lambda m: m.PROFILE_KIND == kind)


def known_protocols() -> list[str]:
    return sorted(p for m in driver_modules() for p in m.PROTOCOLS)


def known_profile_kinds() -> list[str]:
    return sorted({m.PROFILE_KIND for m in driver_modules()})
