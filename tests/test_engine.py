"""The one delivery engine and sink contract (gateway/sinks/): partial-write results over both
streams (readings in the outbox, trace events in the journal) and the one sink registry."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support import until

from gateway.outbox import Outbox
from gateway.config import MqttSinkConfig
from gateway.reading import Reading
from gateway.sinks import SINKS, Where, make_sink
from gateway.sinks.base import Event, Message, Receipting, Result, SinkUnavailable
from gateway.sinks.engine import Delivery
from gateway.sinks.events import BATCHING, EventStream, pack_events
from gateway.sinks.readings import Forwarder
from gateway.trace.journal import Journal

T0 = 1_760_000_000_000_000_000


class ScriptedSink:
    """Answers each send with the next scripted answer (a Result, an exception, or a function of
    the batch); accepts everything once the script is used up. Remembers every batch."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.batches: list[list[Any]] = []
        self.connected = True
        self.last_error: str | None = None
        self.refused = 0
        self.receipts: Receipting | None = None

    async def wait_connected(self) -> None:
        await asyncio.sleep(0)

    async def send(self, batch: Sequence[Any]) -> Result:
        self.batches.append(list(batch))
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(batch)
        return answer if answer is not None else Result.whole(len(batch))


@contextlib.asynccontextmanager
async def running(delivery: Delivery[Any, Any]) -> AsyncIterator[None]:
    task = asyncio.create_task(delivery.run(), name=f"deliver[{delivery.name}]")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def refuse_bad(batch: Sequence[Message]) -> Result:
    """A far end that refuses, as data, every message carrying a reading of device ``bad``."""
    refused = [(i, "field type conflict") for i, (_topic, payload) in enumerate(batch) if b"device=bad" in payload]
    bad = {i for i, _r in refused}
    return Result([i for i in range(len(batch)) if i not in bad], refused)


async def test_a_refused_message_costs_only_its_readings_and_the_rest_is_written(tmp_path: Path) -> None:
    cfg = MqttSinkConfig.model_validate({"type": "mqtt", "host": "127.0.0.1", "topic": "t/{device}",
                                         "batch": {"max_readings": 100, "linger": "0ms"}})
    readings = [Reading(dev, T0 + i, {"v": i}, {"device": dev}) for i in range(6) for dev in ("a", "bad", "c")]
    sink = ScriptedSink(*[refuse_bad] * 20)
    with Outbox(tmp_path / "o.db", ["main"]) as outbox:
        fwd = Forwarder("main", outbox, sink, cfg, SimpleNamespace(gateway_id="gw", site="s"))
        outbox.append(readings)
        async with running(fwd):
            fwd.notify()
            await until(lambda: outbox.stats().pending["main"] == 0)
        (letter,) = outbox.dead_letters(with_readings=True)
    assert list(letter.readings) == [r for r in readings if r.device == "bad"]
    assert letter.message == "field type conflict"
    assert fwd.stats.dead_lettered == 6 and fwd.stats.delivered == 12
    # one batch of three messages (one per topic), then the bad message's readings in halves, never
    # the good messages again
    assert len(sink.batches[0]) == 3
    assert all(b"device=bad" in payload for batch in sink.batches[1:] for _t, payload in batch)


def _journal_with_events(path: Path, n: int) -> Journal:
    journal = Journal(path).__enter__()
    journal.commit([(seq, "LOT-1", T0, f'{{"seq": {seq}}}') for seq in range(1, n + 1)], (n, None), {})
    return journal


async def test_a_batch_cut_short_keeps_what_was_taken_and_sends_the_rest_again(tmp_path: Path) -> None:
    # EPCIS-like: events 1 and 2 captured, 3 refused as a document, then the repository says "later"
    sink = ScriptedSink(Result([0, 1], [(2, "HTTP 422: bad document")], unavailable="HTTP 503"))
    journal = _journal_with_events(tmp_path / "o.db", 5)
    try:
        delivery: Delivery[Event, Event] = Delivery("repo", EventStream("repo", journal), sink, pack_events,
                                                    BATCHING, what="events", recheck=0.05)
        async with running(delivery):
            delivery.notify()
            await until(lambda: journal.position("repo") == 5)
        assert [[seq for seq, _line in batch] for batch in sink.batches] == [[1, 2, 3, 4, 5], [4, 5]]
        assert [(seq, message) for _id, _sink, seq, _t, message in journal.dead_letters("repo")] == [
            (3, "HTTP 422: bad document")]
        assert delivery.stats.retries == 1 and delivery.stats.dead_lettered == 1
    finally:
        journal.__exit__()


async def test_an_unavailable_sink_acknowledges_nothing_and_flush_stops_at_it(tmp_path: Path) -> None:
    sink = ScriptedSink(SinkUnavailable("no route"))
    journal = _journal_with_events(tmp_path / "o.db", 3)
    try:
        delivery: Delivery[Event, Event] = Delivery("feed", EventStream("feed", journal), sink, pack_events,
                                                    BATCHING, what="events")
        await delivery.flush()
        assert journal.position("feed") == 0 and len(sink.batches) == 1
        await delivery.flush()
        assert journal.position("feed") == 3 and sink.batches[1] == sink.batches[0]
    finally:
        journal.__exit__()


def test_the_registry_names_every_kind_and_refuses_an_unknown_one() -> None:
    assert set(SINKS) == {"mqtt", "influxdb", "trace.mqtt", "trace.epcis", "trace.jsonl"}
    with pytest.raises(ValueError, match="no sink implementation for type 'carrier-pigeon'"):
        make_sink("x", SimpleNamespace(type="carrier-pigeon"), Where("gw", "s"))


def test_a_sink_module_is_imported_only_when_a_sink_of_its_kind_is_made() -> None:
    code = """
import sys
from gateway.config import InfluxSinkConfig, MqttSinkConfig
import gateway.app, gateway.trace.service
from gateway.sinks import Where, make_sink
make_sink("m", MqttSinkConfig.model_validate({"type": "mqtt", "host": "127.0.0.1"}), Where("gw", "s"))
before = sorted(m for m in ("influxdb_client", "aiohttp", "gateway.sinks.influx", "gateway.sinks.epcis") if m in sys.modules)
make_sink("i", InfluxSinkConfig.model_validate({"type": "influxdb", "url": "http://127.0.0.1:8086", "api": "v1",
                                               "database": "d"}), Where("gw", "s"))
print(before, "influxdb_client" in sys.modules and "aiohttp" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True"], out
