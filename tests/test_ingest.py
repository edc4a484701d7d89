"""`sluice ingest` with real servers: gateway payloads (line protocol and JSON) from Mosquitto into
influxd read back value by value; VictoriaMetrics through the v2 API; malformed payloads to the
dead-letter topic; an influxd outage (nothing acknowledged meanwhile); SIGKILL of an ingest
process mid-stream; two workers on a shared subscription, one of them killed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from servers import Influxd, Mosquitto, VictoriaMetrics, free_port
from support import DEADLINE, STOP, until
from test_influx import T0, escaping_readings, expected_row, read_back, same

from gateway.encode import InfluxEncoder, JsonEncoder
from gateway.cloud.ingest import Ingest
from gateway.cloud.config import load_ingest_config
from gateway.cloud.lineproto import Malformed, parse_lines
from gateway.reading import Reading
from gateway.yamlpos import ConfigErrors
from gateway.health import fetch, parse_metrics

pytestmark = pytest.mark.usefixtures("close_default_executor")  # paho connects in the loop's executor

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, broker: Mosquitto, influx: dict[str, Any], **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "client_id": "ingest-test",
                 "reconnect_min": "100ms", "reconnect_max": "500ms", **extra.pop("mqtt", {})},
        "influxdb": {"retry_min": "50ms", "retry_max": "300ms", "timeout": "5s", **influx},
        "batch": {"linger": "50ms", **extra.pop("batch", {})},
        "logging": {"level": "info", "format": "text"},
        **extra,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def v1(server: Influxd) -> dict[str, Any]:
    return {"url": server.url, "api": "v1", "database": "sluice"}


@contextlib.asynccontextmanager
async def running(config_path: Path, client_id: str | None = None) -> AsyncIterator[Ingest]:
    ingest = Ingest(load_ingest_config(config_path), client_id=client_id)
    stop = asyncio.Event()
    task = asyncio.create_task(ingest.run(stop), name="ingest-under-test")
    try:
        await until(lambda: ingest.connected or task.done(), DEADLINE, "connected")
        if task.done():
            task.result()
        yield ingest
    finally:
        stop.set()
        await asyncio.wait_for(task, STOP)


@contextlib.asynccontextmanager
async def publisher(broker: Mosquitto) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"pub-{os.getpid()}", clean_session=True) as client:
        client.pending_calls_threshold = 1000
        yield client


@contextlib.asynccontextmanager
async def collecting(broker: Mosquitto, *filters: str) -> AsyncIterator[list[aiomqtt.Message]]:
    """MQTT 5 messages on ``filters`` (with their properties), collected until the block ends."""
    got: list[aiomqtt.Message] = []
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as sub:
        for topic_filter in filters:
            await sub.subscribe(topic_filter, qos=1)

        async def collect() -> None:
            async for message in sub.messages:
                got.append(message)

        collector = asyncio.create_task(collect(), name="collector")
        try:
            yield got
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)


def counter_payloads(n_messages: int, per_message: int, devices: int = 3) -> list[tuple[str, bytes]]:
    """Line-protocol messages as the gateway publishes them: a counter per device, one point per reading."""
    enc = InfluxEncoder()
    out = []
    for m in range(n_messages):
        dev = f"dev{m % devices}"
        readings = [Reading(dev, T0 + (m * per_message + i) * 1000, {"count": m * per_message + i, "v": (m + i) / 4},
                            {"site": "lab", "gateway": "gw1", "device": dev}, "good", "counters")
                    for i in range(per_message)]
        out.append((f"sluice/lab/gw1/{dev}", enc.encode(readings)))
    return out


def stored_counts(server: Influxd) -> list[int]:
    rows = read_back(server, {"counters"})
    return sorted(int(r["count"]) for r in rows)


def count_points(server: Influxd) -> int:
    series = server.query('SELECT count("count") FROM "counters"', "sluice")
    return int(series[0]["values"][0][1]) if series else 0  # type: ignore[index]


async def publish_all(client: aiomqtt.Client, messages: list[tuple[str, bytes]], window: int = 20) -> None:
    sem = asyncio.Semaphore(window)

    async def one(topic: str, payload: bytes) -> None:
        async with sem:
            await client.publish(topic, payload, qos=1)

    # in order per window: the gateway publishes with a small in-flight window too
    await asyncio.gather(*(one(t, p) for t, p in messages))


# --------------------------------------------------------------------------- parser and config (no servers)
def test_line_protocol_checker_accepts_the_encoders_output_and_explains_the_rest() -> None:
    readings = escaping_readings(2)
    points = parse_lines(InfluxEncoder().encode(readings))
    assert points.count == len(readings) and points.newest_ns == max(r.time_ns for r in readings)
    cases = {
        b"m f=1": "no timestamp",
        b"m,t=1 f=abc 1": "value 'abc' is not a number",
        b"m f=1u 1": "unsigned integer",
        b"m f=99999999999999999999i 1": "does not fit in 64 bits",
        b"m f=1e999 1": "not finite",
        b'm f="x 1': "without a closing quote",
        b"m,a f=1 1": "bad tag",
        b"m f=1 1\nm f=2 2\r\n": "line 2: carriage return",
        b"\xff\xfe": "not UTF-8",
    }
    for payload, reason in cases.items():
        with pytest.raises(Malformed, match=reason):
            parse_lines(payload)


def test_config_errors_are_located(tmp_path: Path) -> None:
    path = tmp_path / "ingest.yaml"
    path.write_text("mqtt:\n  host: 127.0.0.1\n  topics: ['sluice/#']\n  gruop: a\ninfluxdb:\n  url: http://127.0.0.1:8086\n"
                    "  api: v1\n  database: x\n  batch: {linger: 1s}\nbatch:\n  linger: 5\n"
                    "dead_letter_topic: sluice/dlq/{topic}\n")
    with pytest.raises(ConfigErrors) as info:
        load_ingest_config(path)
    text = str(info.value)
    assert "ingest.yaml:4:3: unknown key 'gruop' — did you mean 'group'?" in text
    assert "top-level block" in text  # influxdb.batch
    assert "ingest.yaml:11:11: linger: duration 5 has no unit" in text
    path.write_text("mqtt:\n  host: 127.0.0.1\n  topics: ['sluice/#']\ninfluxdb:\n  url: http://127.0.0.1:8086\n"
                    "  api: v1\n  database: x\ndead_letter_topic: sluice/dlq/{topic}\n")
    with pytest.raises(ConfigErrors, match="dead letters would be read again"):
        load_ingest_config(path)
    example = load_ingest_config(REPO / "config" / "ingest.yaml")
    assert example.mqtt.subscriptions() == ["$share/sluice-ingest/sluice/+/+/+"]


# --------------------------------------------------------------------------- with servers
async def test_gateway_payloads_are_written_value_by_value(tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd) -> None:
    cfg = write_config(tmp_path / "ingest.yaml", mosquitto, v1(influxd),
                       metrics={"listen": f"127.0.0.1:{free_port()}"})
    readings = escaping_readings(4)
    half = len(readings) // 2
    lp = InfluxEncoder().encode(readings[:half])
    js = JsonEncoder("gw1", "farm").encode(readings[half:])
    async with running(cfg) as ingest, publisher(mosquitto) as pub:
        await pub.publish("sluice/farm/gw1/status", b"online", qos=1, retain=True)
        await pub.publish("sluice/farm/gw1/mixed", lp, qos=1)
        await pub.publish("sluice/farm/gw1/mixed", js, qos=1)
        await until(lambda: ingest.stats.acked == 3, what="3 messages acknowledged")

        assert ingest.metrics_port is not None
        _code, text = await asyncio.to_thread(fetch, "127.0.0.1", ingest.metrics_port, "/metrics")
    metrics = {name: value for name, labels, value in parse_metrics(text) if not labels}
    assert metrics["sluice_ingest_points_written_total"] == len(readings)
    assert metrics["sluice_ingest_ignored_total"] == 1 and metrics["sluice_ingest_messages_acked_total"] == 3
    assert metrics["sluice_ingest_receipts_total"] == 0  # no gateway asked for receipts
    assert ingest.stats.dead_letters == {}
    got = read_back(influxd, {r.measurement for r in readings})
    want = [expected_row(r) for r in readings]
    assert len(got) == len(want)
    for row in want:
        assert any(same(g, row) for g in got), f"not stored as written: {row}"


async def test_malformed_payloads_go_to_the_dead_letter_topic_and_the_rest_flows(
        tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd, caplog: pytest.LogCaptureFixture) -> None:
    cfg = write_config(tmp_path / "ingest.yaml", mosquitto, v1(influxd))
    good = counter_payloads(6, 5)
    bad = [("sluice/lab/gw1/dev0", b"counters,device=dev0 count=notanumber 1"),
           ("sluice/lab/gw1/dev1", b'{"readings": [{"measurement": "counters"'),
           ("sluice/lab/gw1/dev2", b"counters,device=dev0 count=1i 2\ncounters,device=dev0 count=2i"),
           # a type conflict only the database can see: count is an integer in this series
           ("sluice/lab/gw1/dev0", b'counters,device=dev0,gateway=gw1,site=lab count="text",v=1.0 ' +
            str(T0 + 7).encode())]
    messages = good[:3] + bad + good[3:] + [bad[0]] * 5
    async with collecting(mosquitto, "sluice-dlq/#") as dlq:
        async with running(cfg) as ingest, publisher(mosquitto) as pub:
            for topic, payload in messages:
                await pub.publish(topic, payload, qos=1)
            await until(lambda: ingest.stats.acked == len(messages), what="every message acknowledged")
            await until(lambda: len(dlq) == 9, what="9 dead letters")
    assert stored_counts(influxd) == list(range(30))
    assert ingest.stats.dead_letters == {"line_protocol": 7, "json": 1, "rejected": 1}
    by_topic = {(str(m.topic), bytes(m.payload)): dict(m.properties.UserProperty) for m in dlq}  # type: ignore[union-attr, arg-type]
    props = by_topic[("sluice-dlq/sluice/lab/gw1/dev0", bad[0][1])]
    assert props["kind"] == "line_protocol" and "'notanumber'" in props["reason"]
    assert props["topic"] == "sluice/lab/gw1/dev0"
    assert "no timestamp" in by_topic[("sluice-dlq/sluice/lab/gw1/dev2", bad[2][1])]["reason"]
    assert "type conflict" in by_topic[("sluice-dlq/sluice/lab/gw1/dev0", bad[3][1])]["reason"]
    assert "not valid JSON" in by_topic[("sluice-dlq/sluice/lab/gw1/dev1", bad[1][1])]["reason"]
    # Logged once per kind per minute, not once per message.
    logged = [r for r in caplog.records if r.name == "gateway.ingest" and "not written" in r.getMessage()]
    assert len(logged) == 3


async def test_a_refused_message_is_split_so_only_its_refused_points_are_dead_lettered(
        tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd) -> None:
    """One message of 8 points, 2 with a field type conflict that only influxd sees: the 6 others
    are written, the dead letter holds just the 2 refused lines, and the gateway's receipt says
    dead_lettered (so it warns)."""
    cfg = write_config(tmp_path / "ingest.yaml", mosquitto, v1(influxd))
    (first,) = counter_payloads(1, 1)
    lines = [f"counters,device=dev0,gateway=gw1,site=lab count={i}i,v={i / 4} {T0 + 1000 * i}".encode()
             for i in range(1, 9)]
    for i in (2, 6):
        lines[i] = f'counters,device=dev0,gateway=gw1,site=lab count={i + 1}i,v="x{i}" {T0 + 1000 * (i + 1)}'.encode()
    mixed = b"\n".join(lines) + b"\n"
    async with collecting(mosquitto, "sluice-dlq/#", "sluice-receipts/#") as dlq:
        async with running(cfg) as ingest, aiomqtt.Client(
                mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as pub:
            await pub.publish(*first, qos=1)
            await until(lambda: ingest.stats.acked == 1)
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = "sluice-receipts/lab/gw1"
            props.CorrelationData = b"2-2:1/1"
            await pub.publish("sluice/lab/gw1/dev0", mixed, qos=1, properties=props)
            await until(lambda: ingest.stats.acked == 2 and len(dlq) == 2, what="dead letter and receipt")
    assert stored_counts(influxd) == [0, 1, 2, 4, 5, 6, 8]
    (letter,) = [m for m in dlq if str(m.topic).startswith("sluice-dlq/")]
    assert bytes(letter.payload) == lines[2] + b"\n" + lines[6] + b"\n"  # type: ignore[arg-type]
    reason = dict(letter.properties.UserProperty)["reason"]  # type: ignore[union-attr]
    assert "refused 2 of 8 points" in reason and "type conflict" in reason
    (receipt,) = [m for m in dlq if str(m.topic).startswith("sluice-receipts/")]
    assert json.loads(bytes(receipt.payload)) == {"dead_lettered": ["2-2:1/1"]}  # type: ignore[arg-type]


async def test_influxd_outage_nothing_acknowledged_then_everything_written(
        tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd) -> None:
    cfg = write_config(tmp_path / "ingest.yaml", mosquitto, v1(influxd), batch={"max_unacked": 8, "max_points": 20})
    messages = counter_payloads(60, 10)
    async with running(cfg) as ingest, publisher(mosquitto) as pub:
        await publish_all(pub, messages[:10])
        await until(lambda: ingest.stats.acked == 10, what="first messages acknowledged")
        await asyncio.to_thread(influxd.stop)
        await publish_all(pub, messages[10:])
        await until(lambda: ingest.stats.retries >= 3, what="writes retried")
        held = ingest.pending
        assert ingest.stats.acked == 10, "nothing may be acknowledged while the database is down"
        assert held <= 8, f"{held} messages held: more than the receive maximum"
        await asyncio.to_thread(influxd.start)
        await until(lambda: ingest.stats.acked == 60, what="everything acknowledged after the outage")
    assert stored_counts(influxd) == list(range(600))


async def test_victoria_metrics_through_the_v2_api(tmp_path: Path, mosquitto: Mosquitto,
                                                  victoria_metrics: VictoriaMetrics) -> None:
    cfg = write_config(tmp_path / "ingest.yaml", mosquitto,
                       {"url": victoria_metrics.url, "api": "v2", "bucket": "sluice", "org": "lab"})
    messages = counter_payloads(9, 20)
    async with running(cfg) as ingest, publisher(mosquitto) as pub:
        await publish_all(pub, messages)
        await until(lambda: ingest.stats.acked == 9, what="every message acknowledged")
    series = await asyncio.to_thread(victoria_metrics.export, '{__name__="counters_count"}')
    values = sorted(int(v) for s in series for v in s["values"])  # type: ignore[union-attr]
    assert values == list(range(180))
    stamps = sorted(t for s in series for t in s["timestamps"])  # type: ignore[union-attr]
    assert stamps == sorted((T0 + i * 1000) // 1_000_000 for i in range(180))  # VictoriaMetrics keeps ms


# --------------------------------------------------------------------------- processes
async def metric(port: int, name: str) -> float:
    """A sample of a worker's /metrics; -1 while it does not answer."""
    try:
        _code, text = await asyncio.to_thread(fetch, "127.0.0.1", port, "/metrics")
    except OSError:
        return -1
    return next(v for n, _labels, v in parse_metrics(text) if n == name)


class Worker:
    """``python -m gateway.cli.ingest run`` as a child process; its config has a metrics port."""

    def __init__(self, config: Path, client_id: str, log: Path) -> None:
        self.port = load_ingest_config(config).metrics.port  # type: ignore[union-attr]
        self.args = [sys.executable, "-m", "gateway.cli.ingest", "run", "-c", str(config), "--client-id", client_id]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    async def subscribed(self) -> None:
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while await metric(self.port, "sluice_ingest_connected") != 1:
            assert asyncio.get_running_loop().time() < deadline, f"worker did not connect: {self.log.read_text()[-1000:]}"
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


async def test_sigkill_mid_stream_loses_nothing(tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd) -> None:
    cfg = write_config(tmp_path / "ingest.yaml", mosquitto, v1(influxd), batch={"max_points": 100},
                       metrics={"listen": f"127.0.0.1:{free_port()}"})
    messages = counter_payloads(300, 10)
    worker = Worker(cfg, "ingest-kill", tmp_path / "worker.log")
    worker.start()
    try:
        await worker.subscribed()
        async with publisher(mosquitto) as pub:
            publishing = asyncio.create_task(publish_all(pub, messages), name="publish")
            await until(lambda: count_points(influxd) > 0, what="first points written")
            worker.kill()
            written_at_kill = count_points(influxd)
            await publishing
        worker.start()
        await worker.subscribed()
        await until(lambda: count_points(influxd) == 3000, 60, "every point written after the restart")
        assert worker.stop() == 0
    finally:
        worker.stop()
    assert written_at_kill < 3000, "the kill came too late to test anything"
    assert stored_counts(influxd) == list(range(3000))


async def test_two_workers_share_the_load_and_one_may_die(tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd) -> None:
    ports = [free_port(), free_port()]
    workers = []
    for n, port in enumerate(ports):
        cfg = write_config(tmp_path / f"ingest{n}.yaml", mosquitto, v1(influxd), mqtt={"group": "g1"},
                           metrics={"listen": f"127.0.0.1:{port}"}, batch={"max_points": 100})
        workers.append(Worker(cfg, f"ingest-w{n}", tmp_path / f"w{n}.log"))
    messages = counter_payloads(200, 10)
    for w in workers:
        w.start()

    try:
        for w in workers:
            await w.subscribed()
        async with publisher(mosquitto) as pub:
            await publish_all(pub, messages[:100])
            await until(lambda: count_points(influxd) >= 500, what="half written")
            shares = [await metric(p, "sluice_ingest_points_written_total") for p in ports]
            workers[0].kill()
            await publish_all(pub, messages[100:])
        workers[0].start()  # a supervisor restarts it: its unacknowledged messages are in its session
        await workers[0].subscribed()
        await until(lambda: count_points(influxd) == 2000, 60, "every point written")
        for w in workers:
            assert w.stop() == 0
    finally:
        for w in workers:
            w.stop()
    assert all(s > 0 for s in shares), f"both workers should have written a share: {shares}"
    assert stored_counts(influxd) == list(range(2000))


async def test_messages_queued_while_away_are_written_and_acknowledged_on_resume(
        tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd) -> None:
    # A resumed session's queued messages arrive before the SUBACK: they must be acknowledged on
    # this connection, not left for the next reconnect.
    cfg = write_config(tmp_path / "ingest.yaml", mosquitto, v1(influxd), batch={"linger": "0ms"})
    async with running(cfg):
        pass  # creates the persistent session and its subscription
    messages = counter_payloads(30, 400)  # ~1 MiB: Mosquitto sends the queue before the SUBACK
    async with publisher(mosquitto) as pub:
        await publish_all(pub, messages)
    async with running(cfg) as ingest:
        await until(lambda: ingest.stats.points_written >= 12000, what="all written")
        await until(lambda: ingest.stats.acked == 30, what="all 30 acknowledged")
    async with running(cfg) as again:
        await asyncio.sleep(0.5)  # a resumed session's queue comes at once on connecting: a bounded negative
        assert again.stats.received == 0, "acknowledged messages were delivered again"
    assert stored_counts(influxd) == list(range(12000))
