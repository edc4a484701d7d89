"""A broker that refuses our publishes (a Mosquitto ACL; MQTT 5 PUBACK reason code 0x87 *not
authorized*) or drops us right after connecting: nothing counts as delivered, the refusal is
logged once and counted, retries back off, and the gateway stays responsive (polling commits,
/metrics answers, CPU bounded) — the gateway sink, the trace feed's MQTT sink and `sluice ingest`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_support import counter_servers, device_ports, write_config
from servers import Influxd, Mosquitto, TcpProxy, free_port, subscriber
from support import unavailable
from test_ingest import publisher, running, v1
from test_ingest import write_config as write_ingest_config
from test_mqtt import connected, sink_config, site_for

from gateway.sinks.base import Result, SinkUnavailable
from gateway.health import fetch, parse_metrics
from gateway.cloud.ingest import render_metrics
from gateway.sinks.mqtt import MqttSink, SinkRefused
from gateway.trace.config import TraceMqttSinkConfig
from gateway.sinks.trace_mqtt import TraceMqttSink
from simulators.broker import find_mosquitto

pytestmark = pytest.mark.usefixtures("close_default_executor")


def acl_broker(directory: Path, acl: str) -> Mosquitto:
    """A Mosquitto whose anonymous clients get only the topics of ``acl`` (lines before any
    ``user`` line apply to anonymous clients); rewrite the file and :func:`reload` to change it."""
    binary = find_mosquitto()
    if binary is None:
        unavailable("mosquitto is not installed — sudo apt-get install mosquitto")
    (directory / "acl").parent.mkdir(parents=True, exist_ok=True)
    (directory / "acl").write_text(acl)
    return Mosquitto(directory / "mosquitto", binary=binary, extra_conf=f"acl_file {directory / 'acl'}\n")


def reload(broker: Mosquitto, directory: Path, acl: str) -> None:
    (directory / "acl").write_text(acl)
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)  # mosquitto re-reads acl_file


@pytest.fixture
def refusing(tmp_path: Path):
    broker = acl_broker(tmp_path / "acl-broker", "topic readwrite ok/#\ntopic readwrite sluice/+/gw1/status\n")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def test_mqtt5_refusal_fails_the_batch_logs_once_counts_and_backs_off(
        refusing: Mosquitto, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> None:
    site = site_for(request)
    cfg = sink_config(refusing.port, protocol="5", reconnect_min="5s", reconnect_max="10s")
    with caplog.at_level(logging.DEBUG, logger="gateway.mqtt"):
        async with MqttSink("acl", cfg, "gw1", site) as sink:
            await connected(sink)
            for _ in range(3):
                with pytest.raises(SinkRefused) as refused:
                    await sink.send([("ok/a", b"1"), (f"sluice/{site}/gw1/denied", b"2"), ("ok/b", b"3")])
                assert isinstance(refused.value, SinkUnavailable)  # the forwarder keeps the readings
                assert "not authorized" in str(refused.value).lower() and f"sluice/{site}/gw1/denied" in str(refused.value)
            assert sink.refused == 3 and sink.connected
            # The forwarder waits in wait_connected after a failure: after a refusal that is a backoff.
            waiting = asyncio.ensure_future(sink.wait_connected())
            await asyncio.sleep(0.05)
            assert not waiting.done()
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            # Allowed topics are still accepted (a batch that is accepted clears the refusal).
            await sink.send([("ok/c", b"4")])
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING and "refused the publish" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert f"sluice/{site}/gw1/denied" in lines[0].getMessage() and "ACL" in lines[0].getMessage()
    assert any("accepts our publishes again" in r.getMessage() for r in caplog.records)


async def test_mqtt311_cannot_see_a_refusal(refusing: Mosquitto, request: pytest.FixtureRequest) -> None:
    """Documented in README: a 3.1.1 broker acknowledges a refused publish like any other."""
    site = site_for(request)
    async with MqttSink("acl", sink_config(refusing.port, protocol="3.1.1"), "gw1", site) as sink:
        await connected(sink)
        await sink.send([(f"sluice/{site}/gw1/denied", b"x")])
        assert sink.refused == 0


async def test_trace_mqtt_sink_does_not_ack_a_refused_event(refusing: Mosquitto, request: pytest.FixtureRequest) -> None:
    site = site_for(request)
    cfg = TraceMqttSinkConfig(type="mqtt", host="127.0.0.1", port=refusing.port, protocol="5", reconnect_min="5s",
                              reconnect_max="10s", keepalive="5s", topic="sluice/{site}/{gateway}/trace")
    acked: list[Result] = []  # a result would name what the far end accepted: there must be none
    async with TraceMqttSink("feed", cfg, "gw1", site) as sink:
        await asyncio.wait_for(sink.wait_connected(), 10)
        with pytest.raises(SinkRefused):
            acked.append(await sink.send([(1, '{"event": 1}')]))
        assert acked == [] and sink.mqtt.refused == 1


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metrics(port: int) -> dict[tuple[str, str], float]:
    _code, text = fetch("127.0.0.1", port, "/metrics", timeout=5.0)
    return {(name, labels.get("sink", "")): value for name, labels, value in parse_metrics(text)}


async def _watch_gateway(proc: subprocess.Popen[bytes], health: int, seconds: float) -> list[dict[tuple[str, str], float]]:
    """/metrics every 0.5 s for ``seconds`` (each answer must come: a spinning loop cannot answer)."""
    samples = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        assert proc.poll() is None, "the gateway exited"
        samples.append(await asyncio.to_thread(_metrics, health))
        await asyncio.sleep(0.5)
    return samples


@contextlib.asynccontextmanager
async def _gateway(tmp_path: Path, broker_port: int, log: Path, **sink_extra: Any):
    servers = counter_servers({0: [("a", 1)]})
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        health = free_port()
        cfg = write_config(tmp_path / "cfg", devices=device_ports({0: [("a", 1)]}, servers), broker_port=broker_port,
                           sink_extra={"protocol": "5", **sink_extra})
        data = yaml.safe_load((cfg / "gateway.yaml").read_text())
        data["health"] = {"listen": f"127.0.0.1:{health}"}
        (cfg / "gateway.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)], stdout=out, stderr=out,
                                    stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await asyncio.to_thread(_metrics, health)
                    break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                    await asyncio.sleep(0.2)
            yield proc, health
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


async def test_gateway_stays_responsive_while_the_broker_refuses_everything_then_delivers(tmp_path: Path) -> None:
    """The reported spin: an ACL denying every topic of the gateway (status included), MQTT 5. Over
    the window /metrics answers every time, polling keeps committing, nothing is delivered, the
    refusal is counted and logged once, the gateway uses a fraction of a core; once the ACL
    allows the topics every committed reading is delivered."""
    broker = acl_broker(tmp_path / "acl-broker", "topic read nothing/#\n")
    log = tmp_path / "gateway.log"
    await asyncio.to_thread(broker.start)
    try:
        async with _gateway(tmp_path, broker.port, log) as (proc, health):
            cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
            samples = await _watch_gateway(proc, health, 8.0)
            cpu = (_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
            first, last = samples[0], samples[-1]
            assert last[("sluice_outbox_committed_total", "")] > first[("sluice_outbox_committed_total", "")] + 10
            assert last[("sluice_sink_delivered_total", "broker")] == 0
            refused = last[("sluice_sink_publishes_refused_total", "broker")]
            assert 1 <= refused <= 40, refused  # backed off (reconnect_max 1 s), not a retry per loop turn
            assert cpu < 0.5, f"the gateway used {cpu:.0%} of a core while the broker refused"
            text = log.read_text()
            assert text.count("refused the publish to sluice/lab/gw-test/readings") == 1, text[-3000:]
            assert "refused the publish to sluice/lab/gw-test/status" in text  # the birth message: said once
            _code, body = await asyncio.to_thread(fetch, "127.0.0.1", health, "/healthz")
            assert "sink broker: the broker refused the publish to sluice/lab/gw-test/readings" in body, body
            async with subscriber(broker.host, broker.port, "nothing/#"):  # (any client still works)
                pass
            reload(broker, tmp_path / "acl-broker", "topic readwrite sluice/#\n")
            deadline = time.monotonic() + 60
            while True:
                now = await asyncio.to_thread(_metrics, health)
                delivered = now[("sluice_sink_delivered_total", "broker")]
                if delivered >= last[("sluice_outbox_committed_total", "")]:
                    break
                assert time.monotonic() < deadline, f"only {delivered} delivered after the ACL allowed the topics"
                await asyncio.sleep(0.3)
        assert "accepts our publishes again" in log.read_text()
    finally:
        await asyncio.to_thread(broker.stop)


class _DroppingProxy(TcpProxy):
    """Accepts, forwards, and cuts every connection ``after`` seconds: a broker that drops us right
    after connecting. ``accepted`` counts connections."""

    def __init__(self, target_host: str, target_port: int, after: float) -> None:
        super().__init__(target_host, target_port)
        self.after = after
        self.accepted = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await super()._handle(reader, writer)
        asyncio.get_running_loop().call_later(self.after, self.cut)


async def test_a_broker_that_drops_us_right_after_connecting_is_not_hammered(tmp_path: Path, mosquitto: Mosquitto) -> None:
    log = tmp_path / "gateway.log"
    async with _DroppingProxy(mosquitto.host, mosquitto.port, 0.05) as proxy, \
            _gateway(tmp_path, proxy.port, log) as (proc, health):
        start = proxy.accepted
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        samples = await _watch_gateway(proc, health, 8.0)
        cpu = (_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        assert samples[-1][("sluice_outbox_committed_total", "")] > samples[0][("sluice_outbox_committed_total", "")] + 10
        # reconnect_min 100 ms, reconnect_max 1 s: a connection that lasts 0.05 s is a failure, so the
        # attempts back off to about one a second; resetting the backoff at every connect (the old
        # behaviour) made one every ~0.15 s (about 50 here).
        connects = proxy.accepted - start
        print(f"{connects} connections in 8 s")
        assert connects <= 25, f"{connects} connections in 8 s"
        assert cpu < 0.5, f"the gateway used {cpu:.0%} of a core"


async def test_ingest_does_not_ack_what_it_could_not_dead_letter(tmp_path: Path, influxd: Influxd,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The dead-letter topic is denied: the malformed message stays unacknowledged, the refusal is
    counted and logged once; once the ACL allows it, the dead letter goes out and is acknowledged."""
    directory = tmp_path / "acl-broker"
    acl = "topic readwrite sluice/#\n"
    broker = acl_broker(directory, acl)
    await asyncio.to_thread(broker.start)
    try:
        cfg = write_ingest_config(tmp_path / "ingest.yaml", broker, v1(influxd))
        with caplog.at_level(logging.INFO, logger="gateway.ingest"):
            async with running(cfg) as ingest, publisher(broker) as pub:
                await pub.publish("sluice/lab/gw1/dev0", b"counters,device=dev0 count=notanumber 1", qos=1)
                await pub.publish("sluice/lab/gw1/dev0", b"counters,device=dev0 count=notanumber 2", qos=1)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while ingest.stats.refused["dead letter"] < 2:
                    assert loop.time() < deadline, "no refusal seen"
                    await asyncio.sleep(0.05)
                assert ingest.stats.acked == 0 and ingest.stats.dead_letters == {}
                reload(broker, directory, acl + "topic readwrite sluice-dlq/#\n")
                deadline = loop.time() + 30
                while ingest.stats.acked < 2:
                    assert loop.time() < deadline, "not acknowledged after the ACL allowed the dead-letter topic"
                    await asyncio.sleep(0.05)
                refused_metric = [v for name, labels, v in parse_metrics(render_metrics(ingest))
                                  if name == "sluice_ingest_publishes_refused_total" and labels == {"kind": "dead_letter"}]
                assert refused_metric and refused_metric[0] >= 2
        refused = [r for r in caplog.records if "refused the publish to sluice-dlq/" in r.getMessage()]
        assert len(refused) == 1 and refused[0].levelno == logging.ERROR
        assert ingest.stats.dead_letters == {"line_protocol": 2}
    finally:
        await asyncio.to_thread(broker.stop)
