"""Forwarder: outbox -> messages -> sink -> ack, with the real Outbox and a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from servers import Mosquitto, Received, subscriber
from support import until
from test_encode import parse_line

from gateway.outbox import Outbox
from gateway.config import MqttSinkConfig
from gateway.sinks.base import Message, Result, SinkUnavailable
from gateway.sinks.mqtt import MqttSink
from gateway.sinks.readings import Forwarder
from gateway.reading import Reading

T0 = 1_760_000_000_000_000_000
DEVICES = ("boiler", "温室-1", "pump 2")


def config(port: int = 1883, **overrides: Any) -> MqttSinkConfig:
    base: dict[str, Any] = {"type": "mqtt", "host": "127.0.0.1", "port": port, "reconnect_min": "50ms",
                            "reconnect_max": "200ms", "keepalive": "5s",
                            "batch": {"max_readings": 40, "linger": "20ms"}}
    return MqttSinkConfig.model_validate(base | overrides)


def site_for(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60]


def readings(site: str, start: int, count: int) -> list[Reading]:
    """``count`` rounds of one reading per device, time_ns increasing."""
    out = []
    for i in range(start, start + count):
        for n, dev in enumerate(DEVICES):
            out.append(Reading(dev, T0 + i * 1_000_000 + n, {"t": 20.0 + i / 7, "n": i, "ok": i % 2 == 0},
                               {"site": site, "gateway": "gw1", "device": dev, "profile": "p"},
                               measurement="env"))
    return out


def decoded(messages: Sequence[Received], fmt: str) -> list[tuple[str, int]]:
    """(device, time_ns) of every reading in the data messages, in arrival order."""
    out = []
    for m in messages:
        if m.topic.endswith("/status"):
            continue
        if fmt == "json":
            out += [(r["device"], r["time_ns"]) for r in json.loads(m.payload)["readings"]]
        else:
            for line in m.payload.decode().splitlines(keepends=True):
                _meas, tags, _fields, stamp = parse_line(line)
                out.append((tags["device"], stamp))
    return out


def by_device(items: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for dev, stamp in items:
        out.setdefault(dev, []).append(stamp)
    return out


class AckSpy(Outbox):
    """The real outbox, recording every ack."""

    acks: list[int]

    def ack(self, sink: str, upto_seq: int) -> None:
        self.acks.append(upto_seq)
        super().ack(sink, upto_seq)


@contextlib.asynccontextmanager
async def running(fwd: Forwarder) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(fwd.run(), name=f"forward[{fwd.name}]")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def outbox(tmp_path: Path):  # type: ignore[no-untyped-def]
    with AckSpy(tmp_path / "outbox.db", ["main"], synchronous="normal") as box:
        box.acks = []
        yield box


# --------------------------------------------------------------------------- with Mosquitto
pytestmark = pytest.mark.usefixtures("close_default_executor")


@pytest.mark.parametrize("fmt", ["influx", "json"])
async def test_every_reading_once_in_order(mosquitto: Mosquitto, outbox: AckSpy, fmt: str,
                                           request: pytest.FixtureRequest) -> None:
    site = site_for(request)
    cfg = config(mosquitto.port, format=fmt, topic="sluice/{site}/{gateway}/{device}")
    ident = SimpleNamespace(gateway_id="gw1", site=site)
    sent = readings(site, 0, 60)
    async with subscriber(mosquitto.host, mosquitto.port, f"sluice/{site}/#") as sub, \
            MqttSink("main", cfg, "gw1", site) as sink:
        fwd = Forwarder("main", outbox, sink, cfg, ident)
        async with running(fwd):
            for i in range(0, len(sent), 30):  # as the committer does: append, then notify
                outbox.append(sent[i:i + 30])
                fwd.notify()
                await asyncio.sleep(0.01)  # paced as the committer would be, not a wait
            await sub.wait_until(lambda ms: len(decoded(ms, fmt)) >= len(sent))
            await asyncio.sleep(0.2)  # anything extra (a duplicate) would show up now
    got = decoded(sub.messages, fmt)
    assert len(got) == len(sent)
    assert by_device(got) == by_device([(r.device, r.time_ns) for r in sent])
    topics = {m.topic for m in sub.messages}
    assert {f"sluice/{site}/gw1/{d}" for d in DEVICES} <= topics
    assert outbox.stats().pending["main"] == 0
    assert fwd.stats.delivered == len(sent) and fwd.stats.retries == 0
    assert fwd.stats.messages >= len(DEVICES) and fwd.stats.last_delivery_ns is not None


async def test_broker_outage_loses_nothing_and_acks_nothing_while_down(
        mosquitto: Mosquitto, outbox: AckSpy, request: pytest.FixtureRequest) -> None:
    site = site_for(request)
    cfg = config(mosquitto.port)
    ident = SimpleNamespace(gateway_id="gw1", site=site)
    before, during, after = readings(site, 0, 20), readings(site, 20, 30), readings(site, 50, 10)
    # a persistent subscriber: the broker keeps its session across the restart
    async with subscriber(mosquitto.host, mosquitto.port, f"sluice/{site}/#", client_id=f"sub-{site}") as sub, \
            MqttSink("main", cfg, "gw1", site) as sink:
        fwd = Forwarder("main", outbox, sink, cfg, ident)
        async with running(fwd):
            outbox.append(before)
            fwd.notify()
            await sub.wait_until(lambda ms: len(decoded(ms, "influx")) >= len(before))

            mosquitto.stop()
            await until(lambda: not sink.connected)
            acks_when_down = len(outbox.acks)
            for i in range(0, len(during), 15):
                outbox.append(during[i:i + 15])
                fwd.notify()
                await asyncio.sleep(0.3)  # readings arrive over time while the broker is away
            await asyncio.sleep(0.5)  # time for attempts that must not acknowledge anything (bounded: a negative)
            assert len(outbox.acks) == acks_when_down, "acknowledged while the broker was down"
            assert outbox.stats().pending["main"] == len(during)

            mosquitto.start()
            outbox.append(after)
            fwd.notify()
            everything = before + during + after
            want = {(r.device, r.time_ns) for r in everything}
            await sub.wait_until(lambda ms: want <= set(decoded(ms, "influx")), timeout=15)
            await until(lambda: outbox.stats().pending["main"] == 0)
    got = decoded(sub.messages, "influx")
    # at least once; per device, first arrivals are oldest first
    firsts: dict[str, list[int]] = {}
    seen: set[tuple[str, int]] = set()
    for dev, stamp in got:
        if (dev, stamp) not in seen:
            seen.add((dev, stamp))
            firsts.setdefault(dev, []).append(stamp)
    assert firsts == by_device([(r.device, r.time_ns) for r in everything])
    assert fwd.stats.delivered >= len(everything)


@pytest.mark.parametrize("fmt", ["influx", "json"])
def test_default_topic_one_message_per_batch(fmt: str) -> None:
    """The default topic has no per-reading placeholder: a poll cycle of every device (one batch)
    is one message on the gateway's topic, in outbox order; each reading names its device."""
    cfg = config(format=fmt)
    assert cfg.topic == "sluice/{site}/{gateway}/readings"
    fwd = Forwarder("main", None, None, cfg, SimpleNamespace(gateway_id="gw1", site="farm"))  # type: ignore[arg-type]
    cycle = readings("farm", 0, 1)
    messages = fwd.build_messages(cycle)
    assert [topic for topic, _payload in messages] == ["sluice/farm/gw1/readings"]
    assert decoded([Received(*messages[0], False)], fmt) == [(r.device, r.time_ns) for r in cycle]
    # max_bytes still splits it, in order
    small = Forwarder("main", None, None, config(batch={"max_bytes": 1024}, format=fmt),  # type: ignore[arg-type]
                      SimpleNamespace(gateway_id="gw1", site="farm"))
    many = readings("farm", 0, 20)
    parts = small.build_messages(many)
    assert len(parts) > 1 and {topic for topic, _payload in parts} == {"sluice/farm/gw1/readings"}
    assert decoded([Received(t, p, False) for t, p in parts], fmt) == [(r.device, r.time_ns) for r in many]


def test_topic_template_placeholders() -> None:
    cfg = config(topic="x/{site}/{gateway}/{profile}/{measurement}/{device}")
    fwd = Forwarder("main", None, None, cfg, SimpleNamespace(gateway_id="gw1", site="farm"))  # type: ignore[arg-type]
    r = Reading("d1", T0, {"v": 1.0}, {"profile": "sdm630"}, measurement="energy+#")
    assert fwd.build_messages([r])[0][0] == "x/farm/gw1/sdm630/energy__/d1"


class FlakySink:
    """Fails the first ``failures`` sends (after seeing the messages), then accepts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[list[Message]] = []
        self.block = False
        self.receipts = None  # no end-to-end receipts

    @property
    def connected(self) -> bool:
        return True

    async def wait_connected(self) -> None:
        await asyncio.sleep(0)

    async def send(self, messages: Sequence[Message]) -> Result:
        self.calls.append(list(messages))
        if self.block:
            await asyncio.Event().wait()
        if self.failures:
            self.failures -= 1
            raise SinkUnavailable("link dropped mid-batch")
        return Result.whole(len(messages))


async def test_retry_resends_the_same_entries_in_order(outbox: AckSpy) -> None:
    sink = FlakySink(failures=2)
    cfg = config(batch={"max_readings": 10, "linger": "0ms"})
    fwd = Forwarder("main", outbox, sink, cfg, SimpleNamespace(gateway_id="gw1", site="s"))
    outbox.append(readings("s", 0, 3))
    async with running(fwd):
        fwd.notify()
        await until(lambda: outbox.stats().pending["main"] == 0)
    assert sink.calls[0] == sink.calls[1] == sink.calls[2]
    assert fwd.stats.retries == 2 and fwd.stats.delivered == 9
    assert outbox.acks == [9]


async def test_cancel_mid_send_leaves_batch_unacknowledged(outbox: AckSpy) -> None:
    sink = FlakySink(failures=0)
    sink.block = True
    cfg = config(batch={"max_readings": 10, "linger": "0ms"})
    fwd = Forwarder("main", outbox, sink, cfg, SimpleNamespace(gateway_id="gw1", site="s"))
    outbox.append(readings("s", 0, 2))
    async with running(fwd):
        fwd.notify()
        await until(lambda: len(sink.calls) == 1)
    assert outbox.acks == []
    assert outbox.stats().pending["main"] == 6
