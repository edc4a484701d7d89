"""Modbus TCP (``protocol: modbus_tcp``): the driver entry points; one poller per host:port,
shared by every unit id behind it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final, Literal

from pydantic import Field

from drivers.modbus.client import ModbusTcpClient
from drivers.modbus.planner import plan_summary
from drivers.modbus.poller import ModbusPoller
from drivers.modbus.profile import ProfileModel, UnitConfig
from gateway.driver import (
    Claim,
    Device,
    Problem,
    slow_timeout,
    tcp_claim,
)

__all__ = ["PROFILE_KIND", "PROTOCOLS", "DeviceModel", "ModbusTcpPoller", "ProfileModel", "check", "claims",
           "make_pollers"]

PROTOCOLS: Final = frozenset({"modbus_tcp"})
PROFILE_KIND: Final = "modbus"

log = logging.getLogger(__name__)


class DeviceModel(UnitConfig):
    """A Modbus TCP device (``devices/<id>.yaml``, ``protocol: modbus_tcp``)."""

    protocol: Literal["modbus_tcp"] = Field(description="modbus_tcp: a device or gateway speaking Modbus TCP")
    host: str = Field(min_length=1, description="IP address or name of the device or TCP gateway")
    port: int = Field(default=502, ge=1, le=65535, description="its Modbus TCP port")


TcpDevice = Device[DeviceModel, ProfileModel]


class ModbusTcpPoller(ModbusPoller):
    """A :class:`ModbusPoller` over Modbus TCP: every unit id behind one host:port."""

    def __init__(self, host: str, port: int, devices: Sequence[TcpDevice]) -> None:
        self.host, self.port = host, port
        super().__init__(f"{host}:{port}", ModbusTcpClient(host, port), devices)


# =========================================================================== driver entry points
def make_pollers(devices: Sequence[TcpDevice]) -> list[ModbusTcpPoller]:
    """One poller per host:port, shared by every unit id behind it. Logs each device's plan."""
    by_connection: dict[tuple[str, int], list[TcpDevice]] = {}
    for dev in devices:
        by_connection.setdefault((dev.config.host, dev.config.port), []).append(dev)
    pollers = [ModbusTcpPoller(host, port, group) for (host, port), group in by_connection.items()]
    for poller in pollers:
        for device_id, requests in poller.plans.items():
            log.info("%s", plan_summary(device_id, requests))
    return pollers


def claims(device: TcpDevice) -> list[Claim]:
    """The host:port the device is reached at (shared by every unit id behind it)."""
    return [tcp_claim(device.config.host, device.config.port)]


def check(devices: Sequence[TcpDevice]) -> list[Problem]:
    """Cross-device checks: the same unit polled twice with the same profile (a copied file)."""
    problems: list[Problem] = []
    seen: dict[tuple[str, int, int, str], TcpDevice] = {}
    problems += filter(None, map(slow_timeout, devices))
    for dev in devices:
        cfg = dev.config
        key = (cfg.host.lower(), cfg.port, cfg.unit_id, dev.profile_name)
        other = seen.get(key)
        if other is not None:
            problems.append(Problem(
                dev, ("unit_id",),
                f"{cfg.host}:{cfg.port} unit {cfg.unit_id} is already polled as '{other.id}' "
                f"({other.source}) with the same profile",
                "a copied file? give this device its own unit_id (or host), or remove one of them"))
        else:
            seen[key] = dev
    return problems

