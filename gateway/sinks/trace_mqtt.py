"""The trace feed's MQTT sink: each sealed event (one signed EPCIS document) as one QoS 1 message
on the feed topic, through the readings' MQTT sink (gateway/sinks/mqtt.py) and so the one MQTT
layer; the retained signed heads on ``head_topic``; binding commands on ``command_topic`` and
their answers on ``reply_topic`` (the service handles them, gateway/trace/service.py).

Contract: gateway/sinks/base.py (an :class:`~gateway.sinks.base.EventSink`). A batch returns whole
once the broker acknowledged and accepted every message (up to ``max_inflight`` in flight), else it
raises :class:`~gateway.sinks.base.SinkUnavailable` (a refusal: the sink backs off and says so).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gateway.sinks.base import Event, Receipting, Result, Where
from gateway.sinks.mqtt import MqttSink
from gateway.trace.config import TraceMqttSinkConfig

__all__ = ["TraceMqttSink", "create"]


class TraceMqttSink:
    """The feed on an MQTT topic (QoS 1), through :class:`gateway.sinks.mqtt.MqttSink`; also carries
    the command subscription (see :meth:`subscribe`) and the signed heads (``head_topic``)."""

    def __init__(self, name: str, config: TraceMqttSinkConfig, gateway_id: str, site: str) -> None:
        # Its own client id: the readings' MQTT sink may use the same broker, and two clients with
        # one id would take the connection from each other forever.
        if config.client_id is None:
            config = config.model_copy(update={"client_id": f"sluice-{gateway_id}-trace"})
        self.name = name
        self.config = config
        self.topic = config.topic.format(site=site, gateway=gateway_id)
        self.command_topic = config.command_topic.format(site=site, gateway=gateway_id) if config.command_topic else None
        self.reply_topic = config.reply_topic.format(site=site, gateway=gateway_id)
        self.head_topic = config.head_topic.format(site=site, gateway=gateway_id) if config.head_topic else None
        self.mqtt = MqttSink(name, config, gateway_id, site)
        self.mqtt.keeps = "events are kept in the outbox"
        self.receipts: Receipting | None = None
        self.takes_heads = self.head_topic is not None

    async def __aenter__(self) -> TraceMqttSink:
        await self.mqtt.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.mqtt.__aexit__(*exc)

    def subscribe(self, handler: Callable[[str, bytes], None]) -> None:
        if self.command_topic is not None:
            self.mqtt.subscribe(self.command_topic, handler)

    @property
    def connected(self) -> bool:
        return self.mqtt.connected

    @property
    def last_error(self) -> str | None:
        return self.mqtt.last_error

    @property
    def refused(self) -> int:
        return self.mqtt.refused

    async def wait_connected(self) -> None:
        await self.mqtt.wait_connected()

    async def send(self, batch: Sequence[Event]) -> Result:
        return await self.mqtt.send([(self.topic, line.encode()) for _seq, line in batch])

    async def reply(self, payload: bytes) -> None:
        """Publish a command's answer; raises SinkUnavailable when not connected."""
        await self.mqtt.send([(self.reply_topic, payload)])

    async def send_head(self, head: str) -> None:
        """Publish a signed chain head on ``head_topic``, retained: a verifier that subscribes later
        gets the newest head at once. Raises SinkUnavailable when not connected."""
        if self.head_topic is not None:
            await self.mqtt.send([(self.head_topic, head.encode())], retain=True)


def create(name: str, config: TraceMqttSinkConfig, where: Where) -> TraceMqttSink:
    """The registry's factory (gateway/sinks/__init__.py)."""
    return TraceMqttSink(name, config, where.gateway_id, where.site)
