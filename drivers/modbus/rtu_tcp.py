"""Modbus RTU over TCP, dial-out (``protocol: modbus_rtu_tcp``): raw RTU frames (CRC included,
no MBAP header) over a TCP connection to a serial device server (Moxa NPort, USR-TCP232,
Waveshare, ...) in "TCP server / raw" mode.

The bus discipline and framing are :class:`drivers.modbus.rtu_client.ModbusRtuClient`'s: one
outstanding request per socket, the reply found in the stream by unit id, function code, length
and CRC, bytes between transactions discarded, so a stream that broke mid-frame resynchronises
on the next request. The device server does the serial timing on its side; ``pause`` adds
silence between transactions for converters or devices that need it. A closed or reset
connection is reopened by the poller with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Final, Literal, cast

from pydantic import Field

from drivers.modbus.client import open_tcp
from drivers.modbus.errors import ModbusConnectionError
from drivers.modbus.planner import plan_summary
from drivers.modbus.poller import ModbusPoller
from drivers.modbus.profile import ProfileModel
from drivers.modbus.rtu_client import RTU_HINTS, LineSettings, ModbusRtuClient, OnData, OnLost, pauses_of
from drivers.modbus.tcp import check, claims
from gateway.driver import Device

__all__ = ["PROFILE_KIND", "PROTOCOLS", "RTU_TCP_HINTS", "DeviceModel", "ProfileModel", "TcpLink", "check", "claims",
           "make_pollers"]

PROTOCOLS: Final = frozenset({"modbus_rtu_tcp"})
PROFILE_KIND: Final = "modbus"

log = logging.getLogger(__name__)

RTU_TCP_HINTS: Final[Mapping[str, str]] = {
    **RTU_HINTS,
    "timeout": "check the unit id and the device behind the converter (power, RS485 wiring, and that the "
               "converter's serial port uses the device's baud rate and parity); if every unit times out, "
               "check that the converter is in raw TCP server mode, not Modbus TCP gateway mode",
    "garbage": "bytes that are no Modbus RTU frame — is the converter in Modbus TCP (MBAP) mode? Then use "
               "protocol: modbus_tcp; else check its serial settings against the device",
    "refused": "nothing accepts connections there — check the converter's TCP port and that it is in TCP "
               "server mode",
    "unreachable": "check the converter's IP address, the network cable and that it is powered",
    "disconnected": "the converter closed the connection — many allow one client only: check that no other "
                    "master holds it",
}


class _Stream(asyncio.Protocol):
    def __init__(self, on_data: OnData, on_lost: OnLost) -> None:
        self.on_data: OnData | None = on_data
        self.on_lost: OnLost | None = on_lost
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection: a Transport, never datagram

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        on_lost, self.on_lost, self.on_data = self.on_lost, None, None
        if on_lost is not None:
            on_lost(exc)


class TcpLink:
    """A TCP connection carrying raw RTU frames (:class:`drivers.modbus.rtu_client.RtuLink`)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.name = f"{host}:{port}"
        self._stream: _Stream | None = None

    async def open(self, on_data: OnData, on_lost: OnLost, timeout: float) -> None:
        self.close()
        self._stream = await open_tcp(lambda: _Stream(on_data, on_lost), self.host, self.port, timeout, self.name)

    def write(self, data: bytes) -> None:
        stream = self._stream
        if stream is None or stream.transport is None or stream.transport.is_closing():
            raise ModbusConnectionError("disconnected", f"connection to {self.name} is closed")
        stream.transport.write(data)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and stream.transport is not None:
            stream.on_lost = stream.on_data = None  # closing on purpose is no loss
            stream.transport.abort()


class DeviceModel(LineSettings):
    """A Modbus RTU device behind a serial device server (``protocol: modbus_rtu_tcp``)."""

    protocol: Literal["modbus_rtu_tcp"] = Field(
        description="modbus_rtu_tcp: RTU frames through a serial device server in raw (transparent) mode")
    host: str = Field(min_length=1, description="IP address or name of the serial device server")
    port: int = Field(ge=1, le=65535, description="its raw TCP port (Moxa 4001, USR 8234/502, ...)")


RtuTcpDevice = Device[DeviceModel, ProfileModel]


def make_pollers(devices: Sequence[RtuTcpDevice]) -> list[ModbusPoller]:
    """One poller (one connection, one transaction at a time) per converter host:port."""
    groups: dict[tuple[str, int], list[RtuTcpDevice]] = {}
    for dev in devices:
        groups.setdefault((dev.config.host, dev.config.port), []).append(dev)
    pollers = []
    for (host, port), group in groups.items():
        client = ModbusRtuClient(TcpLink(host, port), pauses=pauses_of(group), hints=RTU_TCP_HINTS)
        poller = ModbusPoller(f"{host}:{port} (RTU over TCP)", client, group)
        for device_id, requests in poller.plans.items():
            log.info("%s", plan_summary(device_id, requests))
        pollers.append(poller)
    return pollers
