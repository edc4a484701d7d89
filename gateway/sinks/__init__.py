"""Sinks and the one sink registry: a configured sink's kind -> the factory that builds it.

Each entry is a ``"module:attribute"`` string imported only when a sink of that kind is configured,
so the InfluxDB client and aiohttp are not imported by a gateway that does not use them. A factory
is called as ``factory(name, config, where)`` (:class:`gateway.sinks.base.Where`) and returns a sink
of the contract in gateway/sinks/base.py, not yet entered. The gateway's ``sinks:`` use the kind
``<type>``, the trace feed's ``sinks:`` ``trace.<type>``.
"""

from __future__ import annotations

import importlib
from typing import Any

from gateway.sinks.base import Event, Message, Result, Sink, SinkUnavailable, Where

__all__ = ["SINKS", "Event", "Message", "Result", "Sink", "SinkUnavailable", "Where", "make_sink"]

SINKS: dict[str, str] = {
    "mqtt": "gateway.sinks.mqtt:create",
    "influxdb": "gateway.sinks.influx:create",
    "trace.mqtt": "gateway.sinks.trace_mqtt:create",
    "trace.epcis": "gateway.sinks.epcis:create",
    "trace.jsonl": "gateway.sinks.jsonl:create",
}


def make_sink(name: str, config: Any, where: Where, *, feed: str = "") -> Any:
    """The sink for one ``sinks:`` entry (``feed="trace"`` for trace.yaml's), by its ``type``:
    an async context manager, not yet open."""
    kind = f"{feed}.{config.type}" if feed else str(config.type)
    target = SINKS.get(kind)
    if target is None:
        raise ValueError(f"no sink implementation for type {config.type!r}")
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)(name, config, where)
