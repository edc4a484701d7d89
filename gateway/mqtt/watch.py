"""A diagnostic subscriber on the one MQTT layer: ``watch`` yields what a topic filter receives."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from gateway.mqtt.client import Client, Settings

__all__ = ["watch"]


async def watch(host: str, port: int, topic_filter: str, *, retry: float = 1.0) -> AsyncIterator[tuple[str, bytes]]:
    """Subscribe to ``topic_filter`` (QoS 1, clean session) and yield ``(topic, payload)`` forever, reconnecting
    while the broker is unreachable. For the demo and for diagnostics; the gateway itself only publishes."""
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    settings = Settings(who=f"watch[{topic_filter}]", host=host, port=port, client_id=f"sluice-watch-{os.getpid()}-{id(queue):x}",
                        protocol="3.1.1", clean=True, subscriptions=[(topic_filter, 1)], reconnect_min=retry,
                        reconnect_max=retry)
    async with Client(settings, on_message=lambda m: queue.put_nowait((m.topic, m.payload))):
        while True:
            yield await queue.get()
