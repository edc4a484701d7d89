"""MqttSink against a real Mosquitto: acknowledged batches, birth/will status, outages, TLS."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from servers import Mosquitto, TcpProxy, make_ca, subscriber
from support import DEADLINE, until

from gateway.config import MqttSinkConfig, TlsConfig
from gateway.sinks.base import SinkUnavailable
from gateway.sinks.mqtt import MqttSink
from servers import free_port

pytestmark = pytest.mark.usefixtures("close_default_executor")


def sink_config(port: int, **overrides: Any) -> MqttSinkConfig:
    base: dict[str, Any] = {"type": "mqtt", "host": "127.0.0.1", "port": port, "reconnect_min": "50ms",
                            "reconnect_max": "200ms", "keepalive": "5s"}
    return MqttSinkConfig(**(base | overrides))


def site_for(request: pytest.FixtureRequest) -> str:
    """A unique site per test, so topics never collide."""
    return re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60]


async def connected(sink: MqttSink, timeout: float = DEADLINE) -> None:
    await asyncio.wait_for(sink.wait_connected(), timeout)


async def test_batch_acknowledged_in_order_and_birth_retained(mosquitto: Mosquitto, request: pytest.FixtureRequest,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    site = site_for(request)
    cfg = sink_config(mosquitto.port, max_inflight=20, password="s3cret-pw", username="gw")
    async with subscriber(mosquitto.host, mosquitto.port, f"sluice/{site}/#") as sub:
        with caplog.at_level(logging.DEBUG):
            async with MqttSink("main", cfg, "gw1", site) as sink:
                await connected(sink)
                messages = [(f"sluice/{site}/gw1/d{i % 3}", f"m{i}".encode()) for i in range(300)]
                await sink.send(messages)
                data = lambda ms: [m for m in ms if not m.topic.endswith("/status")]  # noqa: E731
                await sub.wait_until(lambda ms: len(data(ms)) >= 300)
                assert [(m.topic, m.payload) for m in data(sub.messages)] == messages
                assert sink.client_id == "sluice-gw1"
            # clean exit: `offline`, retained
            await sub.wait_until(lambda ms: [m.payload for m in sub.on(f"sluice/{site}/gw1/status")][-1:] == [b"offline"])
        assert "s3cret-pw" not in caplog.text
        assert not any("pending publish calls" in r.getMessage() for r in caplog.records)

    # a subscriber arriving later sees the retained status
    async with subscriber(mosquitto.host, mosquitto.port, f"sluice/{site}/gw1/status") as late:
        await late.wait_until(lambda ms: len(ms) >= 1)
        assert (late.messages[0].payload, late.messages[0].retain) == (b"offline", True)


async def test_will_on_unclean_loss_then_reconnect(mosquitto: Mosquitto, request: pytest.FixtureRequest,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    site = site_for(request)
    status = f"sluice/{site}/gw1/status"
    async with TcpProxy(mosquitto.host, mosquitto.port) as proxy, \
            subscriber(mosquitto.host, mosquitto.port, status) as sub:
        cfg = sink_config(proxy.port)
        with caplog.at_level(logging.INFO, logger="gateway.mqtt"):
            async with MqttSink("edge", cfg, "gw1", site) as sink:
                await connected(sink)
                await sub.wait_until(lambda ms: [m.payload for m in ms] == [b"online"])
                proxy.cut()  # no DISCONNECT reaches the broker: it publishes the will
                await sub.wait_until(lambda ms: [m.payload for m in ms][:2] == [b"online", b"offline"])
                await sub.wait_until(lambda ms: [m.payload for m in ms][:3] == [b"online", b"offline", b"online"])
                await connected(sink)
                assert sink.connects == 2
                await sink.send([(f"sluice/{site}/gw1/x", b"after")])
        await sub.wait_until(lambda ms: [m.payload for m in ms][-1:] == [b"offline"])
    lost = [r for r in caplog.records if "lost connection" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert f"127.0.0.1:{proxy.port}" in lost[0].getMessage()
    assert sum("connected to" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records) == 2


async def test_send_raises_sink_unavailable_when_down_and_recovers(mosquitto: Mosquitto,
                                                                   request: pytest.FixtureRequest,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    site = site_for(request)
    async with MqttSink("main", sink_config(mosquitto.port), "gw1", site) as sink:
        await connected(sink)
        mosquitto.stop()
        await until(lambda: not sink.connected, what="the sink noticing the broker is gone")
        with pytest.raises(SinkUnavailable):
            await sink.send([(f"sluice/{site}/x", b"1")])
        await asyncio.sleep(0.5)  # several failed attempts: one warning for the loss, one for refusal
        mosquitto.start()
        await connected(sink)
        await sink.send([(f"sluice/{site}/x", b"2")])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "gateway.mqtt"]
    assert len(warnings) <= 2, warnings
    assert any("check that the broker is running" in w for w in warnings), warnings


async def test_not_connected_at_start_is_not_an_error(request: pytest.FixtureRequest) -> None:
    async with MqttSink("main", sink_config(free_port()), "gw1", site_for(request)) as sink:
        await until(lambda: sink.last_error, what="a first failed attempt")
        assert not sink.connected
        assert sink.last_error == "Connection refused"
        with pytest.raises(SinkUnavailable):
            await sink.send([("t", b"x")])


async def test_tls_verified_and_wrong_ca_refused(mosquitto_tls: Mosquitto, tmp_path: Path,
                                                 request: pytest.FixtureRequest) -> None:
    assert mosquitto_tls.tls is not None
    site = site_for(request)
    good = sink_config(mosquitto_tls.port, tls=TlsConfig(ca_file=mosquitto_tls.tls.ca))
    async with subscriber(mosquitto_tls.host, mosquitto_tls.port, f"sluice/{site}/#",
                          tls_ca=mosquitto_tls.tls.ca) as sub:
        async with MqttSink("tls", good, "gw1", site) as sink:
            await connected(sink)
            await sink.send([(f"sluice/{site}/gw1/d", b"secret")])
            await sub.wait_until(lambda ms: any(m.payload == b"secret" for m in ms))

    other = make_ca(tmp_path / "other-pki")
    bad = sink_config(mosquitto_tls.port, tls=TlsConfig(ca_file=other.ca))
    async with MqttSink("tls", bad, "gw2", site) as sink:
        await until(lambda: sink.last_error, what="a failed TLS attempt")
        assert not sink.connected
        assert "certificate" in (sink.last_error or "").lower()


async def test_mqtt5_session_and_status(mosquitto: Mosquitto, request: pytest.FixtureRequest) -> None:
    site = site_for(request)
    cfg = sink_config(mosquitto.port, protocol="5", qos=2, client_id="edge-5")
    async with subscriber(mosquitto.host, mosquitto.port, f"sluice/{site}/#") as sub:
        async with MqttSink("v5", cfg, "gw1", site) as sink:
            await connected(sink)
            await sink.send([(f"sluice/{site}/gw1/d", b"v5")])
            await sub.wait_until(lambda ms: any(m.payload == b"v5" for m in ms))
        await sub.wait_until(lambda ms: [m.payload for m in sub.on(f"sluice/{site}/gw1/status")] == [b"online", b"offline"])


def test_one_mqtt_layer_and_no_aiomqtt() -> None:
    """paho-mqtt is imported only by gateway/mqtt/ (the one MQTT layer); nothing shipped imports aiomqtt
    (it ignores PUBACK reason codes; the tests keep it as an independent client)."""
    root = Path(__file__).resolve().parent.parent
    for path in [*root.glob("gateway/**/*.py"), *root.glob("drivers/*.py"), *root.glob("simulators/*.py")]:
        text = path.read_text()
        assert not re.search(r"^\s*(import|from) aiomqtt", text, re.M), path
        if "gateway/mqtt/" not in path.as_posix():
            assert not re.search(r"^\s*(import|from) paho", text, re.M), f"{path} imports paho: use gateway.mqtt"
