"""Issue 11 item 5, with real processes: a ``sluice run`` with ``delivery: end_to_end`` and no ingest
answering, a real Mosquitto, a datagram socket standing in for systemd's watchdog, and a paho
subscriber counting every publication of a reading.

* Waiting for receipts (the window full) is not a wedge: WATCHDOG=1 keeps coming for longer than
  the limit the old health check applied (``2*ack_timeout + linger + 5 + margin``), and /healthz
  says what the forwarder waits on and until when.
* A SIGKILL while readings are unconfirmed: the restarted gateway publishes them again at once
  (``receipt_timeout`` is an hour here: only the start can have done it), and a second restart
  inside the recorded backoff publishes no third copy.
* While nobody answers, re-sends back off (the broker would queue a copy of the window per
  re-send for the absent ingest): the copies the subscriber counts are the recorded re-sends plus
  one, each back-off step at least twice the one before, across a SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from e2e_support import counter_servers, device_ports, write_config
from gateway.health import fetch
from servers import free_port
from test_health import _FakeSystemd
from test_receipts import _positions, until

LAYOUT = {0: [("a", 1), ("b", 2)], 1: [("c", 1)]}


def _gateway(config: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(config)], env=env,
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    finally:
        out.close()


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _config(tmp_path: Path, servers: list[Any], broker_port: int, outbox: Path, *, health: dict[str, Any] | None = None,
            **sink: Any) -> Path:
    extra = {"protocol": "5", "delivery": "end_to_end", **sink}
    config = write_config(tmp_path / "config", devices=device_ports(LAYOUT, servers), broker_port=broker_port,
                          interval="100ms", outbox=outbox, sink_extra=extra)
    doc = yaml.safe_load((config / "gateway.yaml").read_text())
    doc["health"] = health or {"enabled": False}
    (config / "gateway.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return config


@contextlib.contextmanager
def publications(port: int, topic_filter: str = "sluice/#") -> Iterator[list[str]]:
    """The batch id (MQTT 5 correlation data) of every message published on ``topic_filter``, as
    a plain paho subscriber sees them (a copy of every publication, as an absent ingest's queue would)."""
    ids: list[str] = []
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"counter-{os.getpid()}", protocol=mqtt.MQTTv5)

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            c.subscribe(topic_filter, qos=1)

    def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        corr = getattr(message.properties, "CorrelationData", None)
        if corr:
            ids.append(corr.decode())

    client.on_connect = on_connect
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert subscribed.wait(30), "the counting subscriber did not subscribe"
        yield ids
    finally:
        client.disconnect()
        client.loop_stop()


@contextlib.asynccontextmanager
async def _devices_and_counter(tmp_path: Path, mosquitto: Any, **sink: Any) -> AsyncIterator[tuple[Path, list[str]]]:
    """Simulated devices running, a gateway configuration for them (outbox: tmp_path/outbox.db) and
    the batch ids a paho subscriber sees (:func:`publications`)."""
    servers = counter_servers(LAYOUT)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        config = _config(tmp_path, servers, mosquitto.port, tmp_path / "outbox.db", **sink)
        with publications(mosquitto.port) as ids:
            yield config, ids


def _copies_of_first(ids: list[str]) -> int:
    """How often seq 1 was published: each publication round of it is a batch starting at 1, part 1."""
    return sum(1 for i in ids if i.startswith("1-") and ":1/" in i)


def _resend_record(path: Path) -> tuple[int, int] | None:
    """(due_ns, attempt) of sink ``broker`` from ``sink_resend``, read-only."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:
        return None
    try:
        return conn.execute("SELECT due_ns, attempt FROM sink_resend WHERE name='broker'").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


async def test_waiting_for_receipts_is_not_a_wedge(tmp_path: Path, mosquitto: Any, close_default_executor: None) -> None:
    keepalive, linger, margin = 5.0, 0.05, 3.0  # margin: slack for a loaded machine
    ack_timeout = max(2.5 * keepalive, 10.0)  # the MQTT sink's backstop for a PUBACK
    old_limit = 2 * ack_timeout + linger + 5.0 + margin  # what the old health check allowed a busy forwarder
    port = free_port()
    servers = counter_servers(LAYOUT)
    outbox = tmp_path / "outbox.db"
    log = tmp_path / "gateway.log"
    fake = _FakeSystemd(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(fake.path), "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)

    async def health() -> dict[str, Any]:
        _code, body = await asyncio.to_thread(fetch, "127.0.0.1", port, "/healthz")
        return json.loads(body)

    try:
        async with contextlib.AsyncExitStack() as stack:
            for server in servers:
                await stack.enter_async_context(server)
            config = _config(tmp_path, servers, mosquitto.port, outbox, keepalive=f"{keepalive:g}s",
                             receipt_timeout=f"{old_limit + 30:.0f}s", receipt_window=20,
                             health={"listen": f"127.0.0.1:{port}", "watchdog_margin": f"{margin:g}s"})
            proc = _gateway(config, log, env)
            try:
                await fake.wait_for(lambda m: m.get("READY") == "1", timeout=60)
                waiting: list[str] = []

                async def reports_waiting() -> bool:
                    body = await health()
                    waiting[:] = [w for w in body["warnings"] if w.startswith("forward[broker]: waiting on receipts")]
                    return bool(waiting)

                await until(lambda: _positions(outbox)[1] >= 20, 60, "the window full")
                deadline = time.monotonic() + 60
                while not await reports_waiting():
                    assert time.monotonic() < deadline, "the forwarder never reported waiting"
                    await asyncio.sleep(0.2)
                since = time.monotonic()
                assert _positions(outbox)[:2] == (0, 20)  # the window is full, nothing confirmed
                assert "acting again within" in waiting[0], waiting
                fake.drain()
                # Watch for longer than the old limit: pings go on, nothing is called wedged.
                late_pings = 0
                while time.monotonic() < since + old_limit + 3.0:
                    await asyncio.sleep(0.2)
                    for message in fake.drain():
                        assert "WEDGED" not in message.get("STATUS", ""), message
                        if message.get("WATCHDOG") == "1" and time.monotonic() > since + old_limit:
                            late_pings += 1
                    assert proc.poll() is None, log.read_text()[-3000:]
                assert late_pings >= 2, fake.messages[-10:]
                body = await health()
                assert body["live"] is True and not body["reasons"], body
                assert any(w.startswith("forward[broker]: waiting on receipts") for w in body["warnings"]), body
                assert _positions(outbox)[0] == 0  # still nothing confirmed: it was waiting all along
            finally:
                assert _stop(proc) == 0, log.read_text()[-3000:]
    finally:
        fake.sock.close()
    text = log.read_text()
    assert "wedged" not in text and "Traceback" not in text, text[-3000:]


async def test_a_restart_publishes_unconfirmed_readings_again_at_once_and_only_once(
        tmp_path: Path, mosquitto: Any, close_default_executor: None) -> None:
    outbox = tmp_path / "outbox.db"
    log = tmp_path / "gateway.log"
    # An hour: a re-publication within this test can only come from the start.
    async with _devices_and_counter(tmp_path, mosquitto, receipt_timeout="1h", receipt_window=30) as (config, ids):
        proc = _gateway(config, log)
        try:
            await until(lambda: _positions(outbox)[1] >= 30, 60, "the window published")
            await until(lambda: _copies_of_first(ids) == 1, 30, "the first copy seen")
            assert _resend_record(outbox) is None
            _stop(proc, signal.SIGKILL)
            proc = _gateway(config, log)
            await until(lambda: _copies_of_first(ids) == 2, 60, "published again after the restart")
            assert "sent before the restart have no receipt yet" in log.read_text()
            await until(lambda: _resend_record(outbox) is not None, 30, "the re-send recorded")
            due_ns, attempt = _resend_record(outbox)  # type: ignore[misc]
            assert attempt == 1 and due_ns > time.time_ns() + 3600e9  # the next in 2 x receipt_timeout
            await until(lambda: _positions(outbox)[1] >= 30, 60, "the window published again")
            _stop(proc, signal.SIGKILL)
            proc = _gateway(config, log)
            await until(lambda: "await receipts after 1 re-send" in log.read_text(), 60, "second start")
            # The forwarder decided (it logs before it sends anything): the backoff it read stands.
            await until(lambda: _positions(outbox)[1] >= 30, 60, "the window is full again")
            assert _resend_record(outbox) == (due_ns, 1)
        finally:
            code = _stop(proc)
        copies = _copies_of_first(ids)
    assert code == 0, log.read_text()[-3000:]
    assert copies == 2, f"seq 1 was published {copies} times"
    assert "Traceback" not in log.read_text()


async def test_resends_back_off_across_a_restart_while_nobody_answers(
        tmp_path: Path, mosquitto: Any, close_default_executor: None) -> None:
    outbox = tmp_path / "outbox.db"
    log = tmp_path / "gateway.log"
    dues: dict[int, int] = {}

    def record() -> int:
        got = _resend_record(outbox)
        if got is not None:
            dues.setdefault(got[1], got[0])
        return got[1] if got is not None else 0

    async with _devices_and_counter(tmp_path, mosquitto, receipt_timeout="1s", receipt_window=30) as (config, ids):
        proc = _gateway(config, log)
        try:
            await until(lambda: record() >= 1, 60, "the first re-send")
            _stop(proc, signal.SIGKILL)  # inside the backoff: the restart keeps it
            proc = _gateway(config, log)
            await until(lambda: record() >= 3, 90, "the third re-send")
            attempts = record()
            await until(lambda: _copies_of_first(ids) >= attempts + 1, 30, "every re-send seen")
        finally:
            code = _stop(proc)
        copies = _copies_of_first(ids)
    assert code == 0, log.read_text()[-3000:]
    # Each step waits at least twice as long as the one before (2, 4 x receipt_timeout), so over
    # these >= 7 s the old rule (a copy per receipt_timeout) would have published >= 7 copies.
    assert dues[2] - dues[1] >= 4e9 and dues[3] - dues[2] >= 8e9, dues
    # (+1: a SIGKILL in the middle of a re-send may publish its batch once more after the restart.)
    assert copies <= attempts + 2, f"seq 1 published {copies} times for {attempts} re-sends"
    assert "Traceback" not in log.read_text()
