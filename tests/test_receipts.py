"""End-to-end delivery receipts (``delivery: end_to_end``, issue 4).

With a fake sink: the sent position moves at the PUBACK and ``acked`` only on receipts (in any
order, in parts, after a restart); a missing receipt makes the forwarder publish again after
``receipt_timeout``; the window bounds what is unconfirmed. With real servers (a ``sluice run``
subprocess, Mosquitto, ``sluice ingest`` in-process, influxd): receipts advance the outbox, and a
Mosquitto SIGKILL that loses the messages it had queued loses no reading with ``end_to_end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support import STOP, until
import yaml

from gateway.outbox import Outbox
from gateway.config import ConfigErrors, MqttSinkConfig, load_config
from gateway.sinks.base import Message, Result, SinkUnavailable
from gateway.sinks.readings import Forwarder, batch_ids, parse_batch_id
from gateway.reading import Reading
from e2e_support import counter_servers, device_ports, write_config
from test_ingest import running, v1
from test_ingest import write_config as write_ingest_config

T0 = 1_760_000_000_000_000_000


def e2e_config(**overrides: Any) -> MqttSinkConfig:
    base: dict[str, Any] = {"type": "mqtt", "host": "127.0.0.1", "port": 1883, "protocol": "5",
                            "delivery": "end_to_end", "receipt_timeout": "1s",
                            "batch": {"max_readings": 10, "linger": "0s"},
                            "topic": "sluice/{site}/{gateway}/{device}"}  # a topic per device: batches of several parts
    return MqttSinkConfig.model_validate(base | overrides)


class FakeSink:
    """Acknowledges every publish; remembers the batch ids; receipts are given by the test."""

    def __init__(self) -> None:
        self.connected = True
        self.sent: list[tuple[list[Message], list[bytes]]] = []
        self.receipt_handler: Any = None
        self.fail = False
        self.receipts = self  # the capability: receipt topic, timeout, window, key, handler, tagged sends
        self.receipt_topic = "sluice-receipts/s/gw"
        self.receipt_key: bytes | None = None
        self.receipt_timeout = 1.0
        self.receipt_window = 10_000

    def configure(self, config: MqttSinkConfig) -> FakeSink:
        """Take the receipt settings of ``config`` (as MqttSink does from its configuration)."""
        self.receipt_timeout, self.receipt_window = config.receipt_timeout, config.receipt_window
        secret = config.receipt_secret
        self.receipt_key = secret.get_secret_value().encode() if secret is not None else None
        return self

    def on_receipt(self, handler: Any) -> None:
        self.receipt_handler = handler

    async def wait_connected(self) -> None:
        await asyncio.sleep(0.01)

    async def send(self, messages: Sequence[Message]) -> Result:
        raise AssertionError("an end_to_end sink is sent to with batch ids (send_tagged)")

    async def send_tagged(self, messages: Sequence[Message], correlation: Sequence[bytes]) -> Result:
        if self.fail:
            raise SinkUnavailable("down")
        assert correlation is not None and len(correlation) == len(messages)
        self.sent.append((list(messages), list(correlation)))
        await asyncio.sleep(0)
        return Result.whole(len(messages))

    def receipt(self, ids: Sequence[bytes], kind: str = "written") -> None:
        self.receipt_handler(json.dumps({kind: [i.decode() for i in ids]}).encode())


def readings(n: int, devices: Sequence[str] = ("a", "b")) -> list[Reading]:
    return [Reading(devices[i % len(devices)], T0 + i, {"n": i}, {"device": devices[i % len(devices)]})
            for i in range(n)]


@contextlib.asynccontextmanager
async def forwarding(outbox: Outbox, sink: FakeSink, **overrides: Any):
    cfg = e2e_config(**overrides)
    fwd = Forwarder("broker", outbox, sink.configure(cfg), cfg, SimpleNamespace(gateway_id="gw", site="s"))
    task = asyncio.create_task(fwd.run())
    try:
        yield fwd
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_batch_id_round_trip() -> None:
    assert batch_ids(11, 20, 2) == [b"11-20:1/2", b"11-20:2/2"]
    assert parse_batch_id("11-20:2/2") == (11, 20, 2, 2)
    for bad in ("", "20-11:1/1", "1-2:3/2", "1-2:0/1", "x-2:1/1", "1-2:1/1 "):
        assert parse_batch_id(bad) is None


def test_end_to_end_needs_mqtt5_located_at_the_key(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump({
        "gateway": {"id": "gw", "site": "s"}, "buffer": {"path": str(tmp_path / "o.db")},
        "sinks": {"broker": {"type": "mqtt", "host": "127.0.0.1", "delivery": "end_to_end"}}}, sort_keys=False))
    with pytest.raises(ConfigErrors) as info:
        load_config(tmp_path)
    text = "\n".join(str(e) for e in info.value.errors)
    assert "gateway.yaml:" in text and "MQTT 5" in text and "protocol" in text
    line = next(str(e) for e in info.value.errors if "MQTT 5" in str(e))
    at = (tmp_path / "gateway.yaml").read_text().splitlines().index("    delivery: end_to_end") + 1
    assert line.split(":")[1] == str(at), line  # located at the `delivery:` key
    assert e2e_config().receipt_topic == "sluice-receipts/{site}/{gateway}"
    assert MqttSinkConfig.model_validate({"type": "mqtt", "host": "127.0.0.1"}).delivery == "broker"


def test_sent_position_persisted_clamped_and_rewound(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, ["broker"]) as outbox:
        outbox.append(readings(10))
        assert outbox.sent("broker") == 0
        outbox.mark_sent("broker", 6)
        outbox.mark_sent("broker", 4)  # never backwards by marking
        assert outbox.sent("broker") == 6
        assert outbox.stats().pending["broker"] == 10 and outbox.stats().rows == 10  # nothing deleted
        outbox.ack("broker", 3)
        assert outbox.stats().rows == 7 and outbox.sent("broker") == 6
        with pytest.raises(ValueError):
            outbox.mark_sent("broker", 11)
    with Outbox(path, ["broker"]) as outbox:
        assert (outbox.position("broker"), outbox.sent("broker")) == (3, 6)
        assert [e.seq for e in outbox.fetch("broker", 100, 10**6, after=outbox.sent("broker"))] == [7, 8, 9, 10]
        outbox.ack("broker", 8)  # acked beyond sent raises sent
        assert outbox.sent("broker") == 8
        outbox.rewind_sent("broker")
        assert outbox.sent("broker") == 8
        outbox.mark_sent("broker", 10)
        outbox.rewind_sent("broker")
        assert outbox.sent("broker") == 8
    with Outbox(path, ["broker"]) as outbox:
        assert outbox.sent("broker") == 8
    with Outbox(path, ["other"]) as outbox:  # the sink is gone: so is its sent position
        assert outbox.sent("other") == outbox.position("other")
    assert sqlite3.connect(path).execute("SELECT count(*) FROM sink_sent").fetchone()[0] == 0


async def test_receipts_advance_acked_in_any_order(tmp_path: Path) -> None:
    sink = FakeSink()
    with Outbox(tmp_path / "o.db", ["broker"]) as outbox:
        outbox.append(readings(30))
        async with forwarding(outbox, sink, receipt_timeout="60s") as fwd:
            await until(lambda: outbox.sent("broker") == 30, what="all sent")
            assert outbox.position("broker") == 0 and outbox.stats().rows == 30
            ids = [i for _m, corr in sink.sent for i in corr]
            ranges = sorted({parse_batch_id(i.decode())[:2] for i in ids})  # type: ignore[index]
            assert ranges == [(1, 10), (11, 20), (21, 30)]  # contiguous
            assert all(len(msgs) == 2 for msgs, _ in sink.sent)  # two topics: two parts per batch
            sink.receipt([i for i in ids if i.startswith(b"11-")])  # the second batch first
            assert outbox.position("broker") == 0
            sink.receipt([b"1-10:1/2"])  # one part of two: not yet
            assert outbox.position("broker") == 0
            sink.receipt([b"1-10:2/2"], kind="dead_lettered")
            assert outbox.position("broker") == 20 and outbox.stats().rows == 10
            sink.receipt([b"garbage", b"21-30:1/2"])
            sink.receipt_handler(b"not json")
            sink.receipt([i for i in ids if i.startswith(b"21-")])
            assert outbox.position("broker") == 30 and outbox.stats().rows == 0
            assert fwd.stats.delivered == 30 and fwd.stats.receipt_timeouts == 0


async def test_no_receipt_means_publishing_again_and_late_receipts_still_count(tmp_path: Path) -> None:
    sink = FakeSink()
    with Outbox(tmp_path / "o.db", ["broker"]) as outbox:
        outbox.append(readings(20))
        async with forwarding(outbox, sink, receipt_timeout="1s") as fwd:
            await until(lambda: len(sink.sent) == 2, what="first round")
            first_round = [i for _m, corr in sink.sent for i in corr]
            await until(lambda: fwd.stats.receipt_timeouts >= 1 and len(sink.sent) >= 4, what="second round")
            assert outbox.position("broker") == 0
            sink.receipt(first_round)  # late receipts of the first round: still proof of the write
            assert outbox.position("broker") == 20 and outbox.stats().rows == 0


async def test_resends_back_off_while_no_receipt_comes_and_a_receipt_resets_them(tmp_path: Path) -> None:
    """No receipt: the first re-send after receipt_timeout, the next only 2x, then 4x receipt_timeout
    after the one before (not a window per receipt_timeout); the schedule is in the outbox."""
    sink = FakeSink()
    with Outbox(tmp_path / "o.db", ["broker"]) as outbox:
        outbox.append(readings(10))
        async with forwarding(outbox, sink, receipt_timeout="1s", receipt_window=10) as fwd:
            await until(lambda: outbox.resend_due("broker") is not None, what="first re-send")
            due1, attempt1 = outbox.resend_due("broker")  # type: ignore[misc]
            # The re-send is recorded before it goes out: wait until it went out and the loop waits again.
            await until(lambda: (outbox.resend_due("broker")[1] == 2  # type: ignore[index]
                                 and sum(1 for _m, corr in sink.sent if corr[0] == b"1-10:1/2") == 3
                                 and fwd.loop.judge(0.0).state == "waiting"),
                        what="second re-send out, waiting on receipts",
                        state=lambda: (outbox.resend_due("broker"), len(sink.sent), fwd.loop.judge(0.0).state))
            due2, _ = outbox.resend_due("broker")  # type: ignore[misc]
            copies = sum(1 for _m, corr in sink.sent if corr[0] == b"1-10:1/2")
            assert (attempt1, copies) == (1, 3)  # the first publication and two re-sends
            # The second re-send came after the first one's due time and waits 4 s more.
            assert due2 - due1 >= 4e9
            assert fwd.stats.receipt_timeouts == 2 and fwd.stats.receipt_resent == 20
            state = fwd.loop.judge(0.0)
            assert state.state == "waiting" and state.on == "receipts from sluice ingest"
            sink.receipt([b"1-10:1/2", b"1-10:2/2"])
            assert outbox.position("broker") == 10 and outbox.resend_due("broker") is None
            outbox.append(readings(10))
            fwd.notify()
            await until(lambda: outbox.sent("broker") == 20, what="new readings")
            assert fwd.stats.receipt_timeouts == 2  # the backoff was reset: nothing more re-sent yet


async def test_a_resend_goes_out_whole_before_the_next_one_starts(tmp_path: Path) -> None:
    """A slow link: re-publishing the window takes longer than the backoff. The next re-send still
    waits until the previous copy was handed to the broker whole (never restarted from acked)."""
    sink = FakeSink()
    real_send = sink.send

    async def slow_send(messages: Sequence[Message], correlation: Sequence[bytes] | None = None) -> None:
        await real_send(messages, correlation)
        if sum(1 for _m, corr in sink.sent if corr[0].startswith(b"1-")) >= 2:  # re-sending: slowly
            await asyncio.sleep(0.3)

    sink.send = slow_send  # type: ignore[method-assign]
    with Outbox(tmp_path / "o.db", ["broker"]) as outbox:
        outbox.append(readings(100))
        async with forwarding(outbox, sink, receipt_timeout="1s", receipt_window=100,
                              batch={"max_readings": 10, "linger": "0s"}) as fwd:
            await until(lambda: fwd.stats.receipt_timeouts >= 2, 60, "two re-sends")
    firsts = [parse_batch_id(corr[0].decode())[0] for _m, corr in sink.sent]  # type: ignore[index]
    rounds = [i for i, first in enumerate(firsts) if first == 1]
    assert len(rounds) >= 3
    for start, end in itertools.pairwise(rounds):  # every copy covers the whole window before the next begins
        assert firsts[start:end] == list(range(1, 101, 10)), firsts


async def test_window_bounds_unconfirmed_and_restart_resends_once_then_keeps_the_backoff(tmp_path: Path) -> None:
    """Readings sent before a restart are published again at start (not a fresh receipt_timeout
    later); that re-send's backoff is in the outbox, so the next restart does not re-send again;
    late receipts of the first copy still confirm."""
    path = tmp_path / "o.db"
    sink = FakeSink()
    with Outbox(path, ["broker"]) as outbox:
        outbox.append(readings(50))
        async with forwarding(outbox, sink, receipt_timeout="60s", receipt_window=20):
            await until(lambda: outbox.sent("broker") == 20, what="window full")
            await asyncio.sleep(0.3)  # a bounded negative: nothing more may be sent
            assert outbox.sent("broker") == 20  # no more until receipts come
            ids = [i for _m, corr in sink.sent for i in corr]
        assert outbox.resend_due("broker") is None
    sink2 = FakeSink()
    with Outbox(path, ["broker"]) as outbox:  # a restart: sent 20, acked 0, no re-send recorded
        async with forwarding(outbox, sink2, receipt_timeout="60s", receipt_window=20) as fwd:
            await until(lambda: len(sink2.sent) == 2 and outbox.sent("broker") == 20, what="re-sent at start")
            assert [i for _m, corr in sink2.sent for i in corr] == ids
            assert fwd.stats.receipt_resent == 20
            due_ns, attempt = outbox.resend_due("broker")  # type: ignore[misc]
            assert attempt == 1 and due_ns > time.time_ns() + 100e9  # 2 x receipt_timeout
    sink3 = FakeSink()
    with Outbox(path, ["broker"]) as outbox:  # a second restart inside the backoff: no new copy
        async with forwarding(outbox, sink3, receipt_timeout="60s", receipt_window=20) as fwd:
            await asyncio.sleep(0.3)  # a bounded negative: no new copy may be sent
            assert sink3.sent == [] and fwd.stats.receipt_resent == 0
            assert fwd.loop.judge(0.0).state == "waiting"  # on receipts, until the recorded re-send time
            sink3.receipt(ids)  # the first copy's receipts, late
            await until(lambda: outbox.sent("broker") == 40, what="window moved on")
            assert outbox.position("broker") == 20 and outbox.resend_due("broker") is None


# -- with real servers ---------------------------------------------------------------------------

LAYOUT = {0: [("a", 1), ("b", 2)], 1: [("c", 1)]}


def _gateway(config: Path, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    finally:
        out.close()


def _positions(path: Path) -> tuple[int, int, int]:
    """(acked, sent, last_seq) of sink ``broker``, read without opening the outbox for writing."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:
        return 0, 0, 0  # not created yet
    try:
        (acked,) = conn.execute("SELECT acked FROM sinks WHERE name='broker'").fetchone() or (0,)
        row = conn.execute("SELECT sent FROM sink_sent WHERE name='broker'").fetchone() \
            if conn.execute("SELECT 1 FROM sqlite_schema WHERE name='sink_sent'").fetchone() else None
        (last,) = conn.execute("SELECT last_seq FROM state").fetchone()
    except sqlite3.OperationalError:
        return 0, 0, 0
    finally:
        conn.close()
    return acked, max(acked, row[0] if row else 0), last


def _pending(path: Path) -> dict[str, dict[int, int]]:
    """device -> {count value: time_ns} of readings still in the outbox (not confirmed)."""
    out: dict[str, dict[int, int]] = {}
    with Outbox(path, ["broker"]) as outbox:
        for entry in outbox.fetch("broker", 10**9, 10**12):
            out.setdefault(entry.reading.device, {})[int(entry.reading.fields["count"])] = entry.reading.time_ns
    return out


def _in_db(influxd: Any) -> dict[str, dict[int, list[int]]]:
    """device -> {count value: [time_ns of every point with it]} in influxd."""
    out: dict[str, dict[int, list[int]]] = {}
    for series in influxd.query('SELECT "count" FROM counters GROUP BY device', db="sluice"):
        device = series["tags"]["device"]  # type: ignore[index]
        for stamp, value in series["values"]:  # type: ignore[index]
            out.setdefault(device, {}).setdefault(int(value), []).append(int(stamp))
    return out


def _ingest_yaml(tmp_path: Path, broker: Any, influxd: Any) -> Path:
    return write_ingest_config(tmp_path / "ingest.yaml", broker, v1(influxd), batch={"linger": "50ms"})


@pytest.mark.parametrize("delivery", ["end_to_end", "broker"])
async def test_mosquitto_sigkill_with_queued_messages(delivery: str, tmp_path: Path, mosquitto: Any, influxd: Any,
                                                      close_default_executor: None) -> None:
    """The ingest is away (its persistent session queues at the broker) while the gateway publishes;
    Mosquitto is SIGKILLed and its persistence file removed — what it had not saved yet is gone, as
    after a kill between two autosaves. With ``end_to_end`` the gateway publishes again after
    ``receipt_timeout`` and every committed reading reaches influxd; with ``broker`` the PUBACKed
    readings were deleted from the outbox, so loss is possible: the test prints it, asserts nothing."""

    servers = counter_servers(LAYOUT)
    outbox_path = tmp_path / "outbox.db"
    log = tmp_path / "gateway.log"
    ingest_cfg = _ingest_yaml(tmp_path, mosquitto, influxd)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        async with running(ingest_cfg):
            pass  # creates the ingest's persistent session: from now on the broker queues for it
        extra = {"protocol": "5", "delivery": delivery, "receipt_timeout": "2s"}
        config = write_config(tmp_path / "config", devices=device_ports(LAYOUT, servers), broker_port=mosquitto.port,
                              interval="50ms", outbox=outbox_path, sink_extra=extra)
        proc = _gateway(config, log)
        try:
            await until(lambda: _positions(outbox_path)[1 if delivery == "end_to_end" else 0] >= 60, 30,
                        "published while the ingest is away")
            await asyncio.to_thread(mosquitto.kill)
            for f in mosquitto.directory.glob("mosquitto.db*"):
                f.unlink()
            await asyncio.to_thread(mosquitto.start)
            async with running(ingest_cfg) as ingest:
                await asyncio.sleep(1.0)
                if delivery == "end_to_end":
                    await until(lambda: _positions(outbox_path)[0] >= 80, 60, "receipts after the re-send")
                    assert ingest.stats.receipts > 0
                else:
                    await asyncio.sleep(3.0)  # time to deliver what is left; nothing below depends on how much
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(proc.wait, STOP) == 0, log.read_text()[-3000:]
                if delivery == "end_to_end":
                    await until(lambda: _positions(outbox_path)[0] >= 80, 5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    pending = _pending(outbox_path)
    db = _in_db(influxd)
    missing = 0
    for device in ("a", "b", "c"):
        have = set(db.get(device, {})) | set(pending.get(device, {}))
        top = max(have)
        missing += len(set(range(1, top + 1)) - have)
        assert all(len(stamps) == 1 for stamps in db.get(device, {}).values())  # one point per reading
    if delivery == "end_to_end":
        assert missing == 0, f"{missing} readings lost"
        assert "no receipt for readings" in log.read_text()
    else:
        print(f"delivery: broker — {missing} readings lost with the broker's queue")  # documented, not asserted
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("ingest_secret", ["same", "none"])
async def test_receipt_secret_between_real_gateway_and_ingest(ingest_secret: str, tmp_path: Path, mosquitto: Any,
                                                              influxd: Any, close_default_executor: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``sluice run`` and ``sluice ingest`` with the same ``receipt_secret`` (from the environment):
    receipts are accepted and the outbox empties. An ingest without the secret sends receipts
    the gateway ignores: nothing is deleted, and the log says what to fix (never the secret)."""

    secret = "env-receipt-secret-" + "7" * 20
    monkeypatch.setenv("SLUICE_TEST_RECEIPT_KEY", secret)
    servers = counter_servers(LAYOUT)
    outbox_path = tmp_path / "outbox.db"
    log = tmp_path / "gateway.log"
    extra = {} if ingest_secret == "none" else {"receipt_secret": "${SLUICE_TEST_RECEIPT_KEY}"}
    ingest_cfg = write_ingest_config(tmp_path / "ingest.yaml", mosquitto, v1(influxd), batch={"linger": "50ms"},
                                     **extra)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        ingest = await stack.enter_async_context(running(ingest_cfg))
        config = write_config(tmp_path / "config", devices=device_ports(LAYOUT, servers), broker_port=mosquitto.port,
                              interval="50ms", outbox=outbox_path,
                              sink_extra={"protocol": "5", "delivery": "end_to_end", "receipt_timeout": "2s",
                                          "receipt_secret": "${SLUICE_TEST_RECEIPT_KEY}"})
        proc = _gateway(config, log)
        try:
            if ingest_secret == "same":
                await until(lambda: _positions(outbox_path)[0] >= 60, 30, "receipts accepted")
            else:
                await until(lambda: "ignored a receipt" in log.read_text(), 30, "receipts refused")
                assert ingest.stats.receipts > 0
                assert _positions(outbox_path)[0] == 0
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, STOP) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert secret not in text and "Traceback" not in text
    assert ("ignored a receipt" in text) == (ingest_secret == "none")


def test_a_short_receipt_secret_is_a_located_error_that_never_shows_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, devices={}, broker_port=1883,
                          sink_extra={"protocol": "5", "delivery": "end_to_end", "receipt_secret": "canary-short"})
    with pytest.raises(ConfigErrors) as caught:
        load_config(config)
    text = "\n".join(map(str, caught.value.errors))
    assert "receipt_secret is shorter than 16 characters" in text and "gateway.yaml:" in text
    assert "canary-short" not in text
