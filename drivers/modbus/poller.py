"""The Modbus poller: one per connection (a host:port, a serial bus, an RTU-over-TCP link), every
unit id behind it, one transaction at a time, whatever the transport."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from drivers.modbus.client import ModbusClient
from drivers.modbus.codec import Request, RequestDecoder
from drivers.modbus.errors import (
    ILLEGAL_ADDRESS,
    ModbusConnectionError,
    ModbusError,
    ModbusExceptionResponse,
    ModbusFrameError,
    ModbusProtocolError,
    ModbusTimeout,
)
from drivers.modbus.planner import plan
from drivers.modbus.profile import ModbusDevice, points_of
from gateway.driver import (
    DeviceStatus,
    Emit,
)
from gateway.polling import Backoff, Health, Schedule
from gateway.reading import GOOD, UNCERTAIN, FieldValue, Reading


@dataclass(slots=True)
class _Unit:
    """One device on a poller's connection, with what start-up prepared for it."""

    device: ModbusDevice
    unit_id: int
    timeout: float
    retries: int
    requests: list[Request]
    decoders: list[RequestDecoder]
    health: Health
    where: str

log = logging.getLogger(__name__)


class ModbusPoller:
    """Polls every device (unit id) on one connection — a host:port, a serial bus, an RTU-over-TCP
    link — one transaction at a time (see :class:`gateway.driver.Poller` for the lifecycle).
    The transport is the ``client`` (:class:`ModbusClient`); the loop is the same for all.

    Each device keeps its own interval (aligned to the wall clock), timeout and retries. A
    device that does not answer is marked down and probed with capped exponential backoff, one
    attempt of one request per probe, so it costs the other devices at most its timeout per
    probe. A refused or lost connection is reopened with capped backoff; that concerns only
    this poller's devices. Timeouts and damaged frames (:class:`ModbusFrameError`) are retried
    up to the device's ``retries``.
    """

    def __init__(self, name: str, client: ModbusClient, devices: Sequence[ModbusDevice]) -> None:
        if not devices:
            raise ValueError("a poller needs at least one device")
        self.name = name
        self.status: dict[str, DeviceStatus] = {}
        self._client = client
        self._units: list[_Unit] = []
        for dev in sorted(devices, key=lambda d: (d.config.unit_id, d.id)):
            cfg = dev.config
            requests = plan(points_of(dev.profile),
                            cfg.max_gap if cfg.max_gap is not None else dev.profile.max_gap,
                            dev.profile.max_registers)
            status = self.status[dev.id] = DeviceStatus()
            where = f"{self.name} unit {cfg.unit_id}"
            self._units.append(_Unit(dev, cfg.unit_id, cfg.timeout, cfg.retries, requests,
                                     [RequestDecoder(r) for r in requests],
                                     Health(dev.id, status, log), where))
        cfgs = [u.device.config for u in self._units]
        self._connect_timeout = max(c.timeout for c in cfgs)
        self._reconnect = Backoff(min(min(c.interval for c in cfgs), 1.0), min(c.backoff_max for c in cfgs))
        self._link = Health(f"connection {self.name}", None, log, words=("connected", "reconnected"))

    @property
    def plans(self) -> dict[str, list[Request]]:
        return {u.device.id: u.requests for u in self._units}

    @property
    def client(self) -> ModbusClient:
        return self._client

    async def __aenter__(self) -> ModbusPoller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    # ------------------------------------------------------------------ connection
    async def _ensure_connected(self) -> bool:
        """Connect if needed. Connection failures are this poller's one shared state: logged once
        for the connection and counted for every device on it (their own lines stay quiet)."""
        if self._client.connected:
            return True
        if self._client.lost:
            # Many devices close a client that has been idle for a while: not a fault.
            log.debug("%s: connection closed by the device while idle; reconnecting", self.name)
        try:
            await self._client.connect(self._connect_timeout)
        except ModbusConnectionError as exc:
            hint = self._client.hints.get(exc.kind, "")
            self._link.down(exc.kind, f"{exc} (devices {self._device_list()}) — {hint}")
            for unit in self._units:
                unit.health.count(exc.kind, str(exc))
                unit.health.down(exc.kind, "", quiet=True)
            return False
        self._link.ok(detail=f"devices {self._device_list()}")
        self._reconnect.reset()
        return True

    def _device_list(self) -> str:
        return ", ".join(u.device.id for u in self._units)

    # ------------------------------------------------------------------ polling
    async def run(self, emit: Emit) -> None:
        schedule: Schedule[int] = Schedule()
        for n, unit in enumerate(self._units):
            cfg = unit.device.config
            schedule.add(n, cfg.interval, cfg.backoff_max)
        while True:
            n, when = schedule.first()
            delay = when - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not await self._ensure_connected():
                await asyncio.sleep(self._reconnect.next())
                continue  # due devices are polled as soon as the connection is back
            unit = self._units[n]
            reading = await self._poll(unit, probing=unit.health.is_down)
            if reading is None:
                schedule.failed(n)
            else:
                schedule.succeeded(n)
                emit(reading)

    async def poll_once(self) -> list[Reading]:
        readings: list[Reading] = []
        for unit in self._units:
            if not await self._ensure_connected():
                break
            reading = await self._poll(unit, probing=False)
            if reading is not None:
                readings.append(reading)
        return readings

    async def _poll(self, unit: _Unit, *, probing: bool) -> Reading | None:
        """Read every request of one device; None if it answered none of them.

        While the device is down only its first request is tried, once (a probe). A request that
        times out after its retries ends the poll of a device that has not answered anything yet.
        A connection lost during a request is this device's failure (kind ``disconnected``):
        the connection is closed and reopened before the next poll.
        """
        unit.health.status.polls += 1
        attempts = 1 if probing else 1 + unit.retries
        read = self._client.read
        fields: dict[str, FieldValue] = {}
        time_ns: int | None = None
        problem: tuple[str, str] | None = None
        invalid: list[str] = []
        pending = list(zip(unit.requests, unit.decoders))
        while pending:
            request, decoder = pending.pop(0)
            error: ModbusError | None = None
            for _attempt in range(attempts):
                try:
                    data = await read(unit.unit_id, request.function, request.address, request.count, unit.timeout)
                except (ModbusTimeout, ModbusFrameError) as exc:
                    error = exc
                    continue
                except ModbusExceptionResponse as exc:
                    error = exc
                    if exc.code in (5, 6):
                        continue  # busy: worth another attempt
                    if exc.code == ILLEGAL_ADDRESS and (parts := self._split(unit, request)):
                        pending[:0] = parts  # read its parts now; the next polls read them as planned
                        error = None
                    break
                except (ModbusConnectionError, ModbusProtocolError) as exc:
                    error = exc
                    break
                error = None
                if time_ns is None:
                    time_ns = time.time_ns()
                invalid += decoder.decode(data, fields)
                break
            if error is None:
                continue
            message = self._describe(unit, request, error)
            unit.health.count(error.kind, message)
            if problem is None:
                problem = (error.kind, message)
            if not self._client.connected:
                await self._client.close()
                break
            if time_ns is None and (probing or isinstance(error, ModbusTimeout)):
                break  # not answering: do not spend another timeout on each remaining request
        if time_ns is None:
            assert problem is not None
            unit.health.down(problem[0], problem[1])
            return None
        if problem is not None:
            unit.health.degraded(problem[0], problem[1], time_ns)
        elif invalid:
            unit.health.count("invalid", f"invalid values: {', '.join(invalid)}")
            unit.health.degraded("invalid", f"{unit.where}: {', '.join(invalid)} not a number or outside the "
                                 "valid range; left out of the reading — check the sensor, and the profile's "
                                 "scale, byte_order and valid:", time_ns)
        else:
            unit.health.ok(time_ns, unit.where)
        dev = unit.device
        return Reading(dev.id, time_ns, fields, dict(dev.tags),
                       UNCERTAIN if problem is not None or invalid else GOOD, dev.measurement)

    def _split(self, unit: _Unit, request: Request) -> list[tuple[Request, RequestDecoder]]:
        """A request the planner merged across unused registers that the device refused with
        exception 2 (it has no registers there): its parts, which replace it in the device's plan
        from now on (logged once, here). Empty when the request was not merged."""
        parts = plan(request.points, 0, unit.device.profile.max_registers)
        if len(parts) < 2:
            return []
        at = unit.requests.index(request)
        decoders = [RequestDecoder(p) for p in parts]
        unit.requests[at:at + 1] = parts
        unit.decoders[at:at + 1] = decoders
        gap = min(b.address - (a.address + a.count) for a, b in itertools.pairwise(parts))
        log.warning("%s: %s refused %s with exception 2 (illegal data address): it has no registers in the gaps "
                    "between its points; reading %s separately from now on — set max_gap: %d in the profile (or "
                    "the device) to plan it so from the start", unit.device.id, unit.where, request,
                    ", ".join(map(str, parts)), gap - 1)
        return list(zip(parts, decoders))

    def _describe(self, unit: _Unit, request: Request, error: ModbusError) -> str:
        what = f"{unit.where}, {request} (address {request.address})"
        hints = self._client.hints
        if isinstance(error, ModbusExceptionResponse):
            return f"{what}: the device answered {error} — {error.hint}"
        if isinstance(error, (ModbusTimeout, ModbusFrameError)):
            tries = "" if unit.retries == 0 else f" ({1 + unit.retries} attempts)"
            return f"{what}: {error}{tries} — {hints.get(error.kind, '')}"
        return f"{what}: {error} — {hints.get(error.kind, '')}"

