"""Health endpoint, metrics, `sluice status`, and the systemd watchdog with a fake NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from e2e_support import counter_servers, device_ports, write_config
from gateway.cli import commands as cli
from gateway.app import Gateway
from gateway.config import load_config
from gateway.health import METRICS, fetch
from servers import free_port
from support import DEADLINE, STOP, until
import drivers.modbus.client
from gateway.sdnotify import watchdog_interval
from gateway.sdnotify import Notifier
import re
from gateway.trace.service import METRICS as TRACE_METRICS
import signal
import subprocess
import sys
import aiomqtt
from gateway.sinks.receipts import receipt_mac

LAYOUT = {0: [("tank-a", 1)]}


def _config(tmp_path: Path, servers, broker_port: int | None, *, health_port: int, dead: bool = True,
            sink_extra: dict | None = None) -> Path:
    devices = device_ports(LAYOUT, servers)
    if dead:
        devices["dead"] = (free_port(), 1)  # nothing listens: refused, down
    cfg = write_config(tmp_path / "cfg", devices=devices, broker_port=broker_port, sink_extra=sink_extra)
    data = yaml.safe_load((cfg / "gateway.yaml").read_text())
    data["health"] = {"listen": f"127.0.0.1:{health_port}"}
    (cfg / "gateway.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg


@contextlib.asynccontextmanager
async def _running(gateway: Gateway):
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop), name="gateway-under-test")
    try:
        await asyncio.wait_for(gateway.ready.wait(), DEADLINE)
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, STOP)


async def test_metrics_parse_and_every_documented_metric_is_present(tmp_path: Path, mosquitto, close_default_executor,
                                                                    capsys) -> None:
    servers = counter_servers(LAYOUT)
    port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        for s in servers:
            await stack.enter_async_context(s)
        gw = Gateway(load_config(_config(tmp_path, servers, mosquitto.port, health_port=port)))
        await stack.enter_async_context(_running(gw))
        assert gw.health_port == port
        await until(lambda: gw.forwarders[0].stats.delivered > 0  # type: ignore[attr-defined]
                     and any(st.errors for p in gw.pollers for st in p.status.values()))

        code, body = await asyncio.to_thread(fetch, "127.0.0.1", port, "/metrics")
        assert code == 200
        families = {f.name: f for f in text_string_to_metric_families(body)}
        samples = {s.name: s for f in families.values() for s in f.samples}
        missing = [name for name in METRICS if name not in samples]
        assert not missing, f"documented metrics missing from /metrics: {missing}"
        by_device = {(s.name, s.labels.get("device")): s.value for f in families.values() for s in f.samples}
        assert by_device[("sluice_device_up", "tank-a")] == 1
        assert by_device[("sluice_device_up", "dead")] == 0
        assert any(s.labels == {"device": "dead", "kind": "refused"} for s in families["sluice_device_errors"].samples), body
        assert families["sluice_device_polls"].type == "counter"
        assert samples["sluice_sink_connected"].value == 1
        assert samples["sluice_ready"].value == 1

        code, body = await asyncio.to_thread(fetch, "127.0.0.1", port, "/healthz")
        state = json.loads(body)
        assert code == 200 and state["live"] and state["ready"], state
        assert "device dead: down" in state["warnings"]
        code, _ = await asyncio.to_thread(fetch, "127.0.0.1", port, "/nope")
        assert code == 404

        rc = await asyncio.to_thread(cli.main, ["status", "--url", f"127.0.0.1:{port}"])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "tank-a" in out and "DOWN" in out and "refused" in out and "broker" in out and "connected" in out


async def test_status_when_nothing_listens_says_so(tmp_path: Path, capsys, close_default_executor) -> None:
    rc = await asyncio.to_thread(cli.main, ["status", "--url", f"127.0.0.1:{free_port()}"])
    assert rc == 3
    assert "cannot reach the gateway's health endpoint" in capsys.readouterr().err


async def test_a_busy_port_does_not_stop_the_gateway(tmp_path: Path, caplog) -> None:
    servers = counter_servers(LAYOUT)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with contextlib.AsyncExitStack() as stack:
            for s in servers:
                await stack.enter_async_context(s)
            gw = Gateway(load_config(_config(tmp_path, servers, None, health_port=port, dead=False)))
            await stack.enter_async_context(_running(gw))
            assert gw.health_port is None
            # It still reads and stores: watching it is what is lost, not the data.
            await until(lambda: gw.committer is not None and gw.committer.stats.committed >= 3, what="committed")
    # One clear line that names the setting to change (a second instance, or the demo, on 9108).
    about = [r for r in caplog.records if str(port) in r.getMessage()]
    assert len(about) == 1, [r.getMessage() for r in about]
    assert about[0].levelno == logging.ERROR
    assert "runs on without /healthz and /metrics" in about[0].getMessage()
    assert "set health.listen in " in about[0].getMessage() and "gateway.yaml" in about[0].getMessage()


class _FakeSystemd:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        got = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            got.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        self.messages += got
        return got

    async def wait_for(self, predicate, timeout: float = 20.0) -> dict[str, str]:
        async with asyncio.timeout(timeout):
            while True:
                for message in self.drain():
                    if predicate(message):
                        return message
                await asyncio.sleep(0.05)


async def test_watchdog_pings_only_while_every_loop_progresses(tmp_path: Path, monkeypatch, close_default_executor) -> None:
    fake = _FakeSystemd(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(fake.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    servers = counter_servers(LAYOUT)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for s in servers:
                await stack.enter_async_context(s)
            # A sink whose broker is down: the forwarder waits, which is not being wedged.
            cfg = _config(tmp_path, servers, free_port(), health_port=free_port(), dead=False)
            gw = Gateway(load_config(cfg), stall_margin=0.5)
            await stack.enter_async_context(_running(gw))
            ready = await fake.wait_for(lambda m: "READY" in m)
            assert ready["READY"] == "1" and "devices up" in ready["STATUS"]
            for _ in range(3):
                await fake.wait_for(lambda m: m.get("WATCHDOG") == "1")
            await until(lambda: gw.outbox is not None and gw.outbox.stats().pending["broker"] > 0)
            await fake.wait_for(lambda m: m.get("WATCHDOG") == "1")  # still pinging while buffering

            async def hang(*_args: object, **_kwargs: object) -> bytes:
                await asyncio.Event().wait()  # a read that never returns, whatever its timeout
                raise AssertionError

            monkeypatch.setattr(drivers.modbus.client.ModbusTcpClient, "read", hang)
            wedged = await fake.wait_for(lambda m: "WEDGED" in m.get("STATUS", ""))
            assert "poll[127.0.0.1:" in wedged["STATUS"] and "WATCHDOG" not in wedged
            # Once wedged, no more pings: systemd would restart us after WatchdogSec (a bounded negative).
            await asyncio.sleep(1.0)
            assert not [m for m in fake.drain() if "WATCHDOG" in m]
            code, body = await asyncio.to_thread(fetch, "127.0.0.1", gw.config.gateway.health.port, "/healthz")
            assert code == 503 and json.loads(body)["live"] is False
        fake.drain()
        assert any(m.get("STOPPING") == "1" for m in fake.messages)
    finally:
        fake.sock.close()


@pytest.mark.parametrize("env, expected", [
    ({}, None), ({"WATCHDOG_USEC": "30000000"}, 15.0), ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "0"}, None), ({"WATCHDOG_USEC": "x"}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_notifier_abstract_socket_and_absent_socket() -> None:
    assert Notifier("").send(READY=1) is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0sluice-test-" + str(free_port()))
        name = sock.getsockname()
        notifier = Notifier("@" + name[1:] if isinstance(name, str) else "@" + name[1:].decode())
        assert notifier.send(READY=1, STATUS="two\nlines")
        assert sock.recv(100) == b"READY=1\nSTATUS=two lines"
        notifier.close()


def test_readme_documents_exactly_the_metrics_served() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Health endpoint and metrics"):]
    section = section[:section.index("\n## ")]
    documented = set(re.findall(r"`((?:sluice|process)_[a-z_]+)`", section))

    assert documented == set(METRICS) | set(TRACE_METRICS)


async def test_sluice_run_notifies_ready_and_stopping(tmp_path: Path, close_default_executor) -> None:
    servers = counter_servers(LAYOUT)
    fake = _FakeSystemd(tmp_path / "notify.sock")
    try:
        async with contextlib.AsyncExitStack() as stack:
            for s in servers:
                await stack.enter_async_context(s)
            cfg = _config(tmp_path, servers, None, health_port=free_port(), dead=False)
            env = {**os.environ, "NOTIFY_SOCKET": str(fake.path), "WATCHDOG_USEC": "2000000"}
            env.pop("WATCHDOG_PID", None)
            proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                ready = await fake.wait_for(lambda m: "READY" in m, timeout=30)
                assert ready["READY"] == "1"
                await fake.wait_for(lambda m: m.get("WATCHDOG") == "1", timeout=30)
            finally:
                proc.send_signal(signal.SIGTERM)
                out, _ = await asyncio.to_thread(proc.communicate, timeout=STOP)
        assert proc.returncode == 0, out
        await fake.wait_for(lambda m: m.get("STOPPING") == "1", timeout=5)
    finally:
        fake.sock.close()


async def test_receipt_metrics_status_and_forged_receipts(tmp_path: Path, mosquitto, close_default_executor, capsys,
                                                          caplog) -> None:
    """``delivery: end_to_end`` with ``receipt_secret`` (read with ${file:}) through a real Mosquitto;
    this test plays the ingest: a receipt without a mac, one with another key's mac and one made
    for another gateway's topic are refused and counted; silence makes a receipt timeout; then
    genuine receipts empty the outbox. /metrics (parsed with prometheus_client) and ``sluice
    status`` show it all, and never the secret."""

    secret = "canary-receipt-secret-" + os.urandom(8).hex()
    secret_file = tmp_path / "receipt.key"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    servers = counter_servers(LAYOUT)
    port = free_port()
    extra = {"protocol": "5", "delivery": "end_to_end", "receipt_timeout": "1s",
             "receipt_secret": f"${{file:{secret_file}}}"}
    key = secret.encode()
    topic = "sluice-receipts/lab/gw-test"
    async with contextlib.AsyncExitStack() as stack:
        for s in servers:
            await stack.enter_async_context(s)
        gw = Gateway(load_config(_config(tmp_path, servers, mosquitto.port, health_port=port, dead=False,
                                         sink_extra=extra)))
        ingest = await stack.enter_async_context(aiomqtt.Client("127.0.0.1", mosquitto.port,
                                                                protocol=aiomqtt.ProtocolVersion.V5))
        await ingest.subscribe("sluice/lab/gw-test/+", qos=1)
        await stack.enter_async_context(_running(gw))
        fwd = gw.forwarders[0]
        answer = asyncio.Event()
        ids: list[str] = []

        async def play_ingest() -> None:
            async for message in ingest.messages:
                props = message.properties
                if props is None or not hasattr(props, "CorrelationData"):
                    continue
                assert props.ResponseTopic == topic
                ids.append(props.CorrelationData.decode())
                if answer.is_set():
                    written = [props.CorrelationData.decode()]
                    await ingest.publish(topic, json.dumps({"written": written, "mac": receipt_mac(
                        key, topic, written, [])}), qos=1)

        player = asyncio.create_task(play_ingest())
        stack.push_async_callback(lambda: asyncio.gather(player, return_exceptions=True))
        stack.callback(player.cancel)
        await until(lambda: len(ids) >= 1)
        forged = [{"written": ids[:1]},
                  {"written": ids[:1], "mac": receipt_mac(b"another key of 16+ chars", topic, ids[:1], [])},
                  {"written": ids[:1], "mac": receipt_mac(key, "sluice-receipts/lab/other-gw", ids[:1], [])}]
        for doc in forged:
            await ingest.publish(topic, json.dumps(doc), qos=1)
        await until(lambda: fwd.stats.receipts_refused >= 3 and fwd.stats.receipt_timeouts >= 1)
        assert fwd.stats.receipts == 0 and gw.outbox.position("broker") == 0
        answer.set()
        await until(lambda: fwd.stats.receipts >= 2 and gw.outbox.position("broker") > 0)

        code, body = await asyncio.to_thread(fetch, "127.0.0.1", port, "/metrics")
        assert code == 200
        samples = {(s.name, s.labels.get("sink")): s.value
                   for f in text_string_to_metric_families(body) for s in f.samples}
        assert samples[("sluice_sink_receipts_refused_total", "broker")] == 3
        assert samples[("sluice_sink_receipts_total", "broker")] >= 2
        assert samples[("sluice_sink_receipt_timeouts_total", "broker")] >= 1
        assert samples[("sluice_sink_receipt_resent_readings_total", "broker")] >= 1
        assert samples[("sluice_sink_dead_lettered_total", "broker")] == 0
        assert ("sluice_sink_unconfirmed_readings", "broker") in samples
        rc = await asyncio.to_thread(cli.main, ["status", "--url", f"127.0.0.1:{port}"])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "broker: end-to-end receipts" in out and "3 receipts refused" in out, out
    assert "ignored a receipt on sluice-receipts/lab/gw-test without a mac" in caplog.text
    for text in (body, out, caplog.text):
        assert secret not in text
