"""The ingest service (``sluice ingest``, whose commands are gateway/cli/ingest.py): the cloud side of the
MQTT path — gateway messages from the broker into InfluxDB, each acknowledged to the broker only after
its points are written. The only module besides gateway/mqtt/ that talks MQTT, through its client
(which acknowledges manually).

Delivery contract:

* One persistent MQTT 5 session (``clean_start=False``, a session expiry) subscribed at QoS 1
  with ``manual_ack``: the broker keeps every message until we send its PUBACK, and re-sends
  unacknowledged ones when we reconnect. A message is acknowledged after its points were
  written (a 2xx from the database), after it was published to the dead-letter topic (and that
  publish was acknowledged by the broker), or when it is ignored (retained ``online``/``offline``
  on a ``.../status`` topic). PUBACKs go out in the order the messages arrived.
* Backpressure is MQTT 5's *receive maximum* (``batch.max_unacked``): the broker never has more
  than that many messages in flight to us, so while the database is down we hold at most that
  many in memory and the rest wait in the broker's queue for this session.
* A crash (SIGKILL) loses nothing: unacknowledged messages are re-sent to the next connection
  with the same client id. Points written but not yet acknowledged are written again; identical
  series and timestamp make that an overwrite, not a duplicate. When the connection drops,
  messages not yet written are forgotten (the broker re-sends them) and acknowledgements of
  the old connection are never sent on the new one (packet ids are per connection).
* Messages are coalesced into one write request of at most ``batch.max_points`` points and
  ``batch.max_bytes`` bytes, sent when full, when the broker cannot hand us more
  (``max_unacked`` reached) or ``batch.linger`` after the first message. One write at a time.
* Malformed payloads (gateway/cloud/lineproto.py judges them without asking the database) and
  messages the database refuses as data (found by splitting a refused write in halves until the
  refused message stands alone, then its lines the same way: the lines it takes are written and
  the dead letter holds only the refused ones, as line protocol) are published to the dead-letter
  topic with the reason in MQTT 5 user properties (``reason``, ``kind``, ``topic``), counted,
  logged once per kind per minute, and acknowledged. Database outages (network errors, 5xx, 429)
  are retried with the influxdb sink's backoff; nothing is acknowledged meanwhile.
* SIGTERM/SIGINT: the in-flight write is abandoned unacknowledged, then a clean DISCONNECT.
* End-to-end receipts (gateways with ``delivery: end_to_end``): a message with MQTT 5 *correlation
  data* and a *response topic* matching one of ``receipt_topics`` is answered, after its points
  were written (or it went to the dead-letter topic) and before its PUBACK, by a QoS 1 publish
  to the response topic: ``{"written": [correlation data...], "dead_lettered": [...]}`` (JSON,
  one per response topic per write). The messages are acknowledged once the broker accepted the
  receipts (its PUBACK; a refusal is retried with backoff, see below); a receipt lost after that only
  makes the gateway send the batch again. A response topic outside ``receipt_topics`` is not answered. With
  ``receipt_secret`` the receipt also carries ``"mac"``: HMAC-SHA256 of the response topic and the
  lists (:func:`gateway.sinks.receipts.receipt_mac`); a gateway with a secret ignores receipts without it.

MQTT goes through the one MQTT layer (gateway/mqtt/client.py: paho-mqtt on the event loop,
``manual_ack``, receive maximum, reconnect with a TCP probe). Every publish of ours (dead letters,
receipts) is checked against the broker's reason code: a refused one (MQTT 5, e.g. 0x87 *not
authorized* from an ACL) leaves the messages it answers unacknowledged, is logged once per
change of reason, counted (``sluice_ingest_publishes_refused_total``) and retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.backoff import Backoff
from gateway.cloud.brokerconf import queue_advice
from gateway.encode import InfluxEncoder
from gateway.config import ssl_context
from gateway.health import PROMETHEUS_TEXT, LocalHttpServer, MetricsText, process_usage
from gateway.cloud.config import IngestConfig
from gateway.cloud.lineproto import Malformed, Points, to_lines
from gateway.watchdog import Loop, Watchdog
from gateway.mqtt import Client, Message, NotConnected, PacketTypes, Properties, Refused, Settings, topic_matches
from gateway.sinks.base import SinkUnavailable
from gateway.sinks.engine import isolate_refused
from gateway.sinks.influx import InfluxSink
from gateway.sinks.receipts import receipt_mac

__all__ = ["Ingest", "IngestStats", "MetricsServer", "render_metrics"]

log = logging.getLogger("gateway.ingest")  # the name in the service's log lines since the first release

CONNECT_TIMEOUT = 15.0
"""Seconds for TCP + TLS + CONNACK + SUBACK before the attempt counts as failed."""
PUBLISH_TIMEOUT = 30.0
"""Seconds a dead-letter or receipt publish may wait for its PUBACK before the connection is dropped."""
LOG_PERIOD = 60.0
"""A kind of malformed payload is logged at most once per this many seconds."""
REASON_LIMIT = 400
"""Characters of a reason carried in the dead letter's user property."""
STATUS_PAYLOADS = (b"online", b"offline")
KEPT = ("messages not yet written wait unacknowledged in the broker's queue for this session (bounded by its "
        "max_queued_messages / max_queued_bytes: see `sluice ingest check`), and with end-to-end receipts also in the "
        "gateways' outboxes")
"""Where readings are while the database is down: the ingest has no outbox of its own."""


@dataclass(slots=True)
class _Msg:
    mid: int
    qos: int
    topic: str
    gen: int  # the connection it arrived on
    message: Message  # what the MQTT layer acknowledges
    points: Points | None = None
    problem: Malformed | None = None
    payload: bytes = b""  # the original, for a dead letter (for line protocol, the same object as points.data)
    reply: str | None = None  # end-to-end receipts: response topic and correlation data
    corr: str | None = None


@dataclass
class IngestStats:
    received: int = 0  # messages
    acked: int = 0
    points_written: int = 0
    write_requests: int = 0
    retries: int = 0  # write requests that failed and were sent again
    ignored: int = 0  # status messages
    dead_letters: Counter[str] = field(default_factory=Counter)  # by kind
    newest_ns: int = 0  # newest point time written
    receipts: int = 0  # receipt messages published
    connects: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # our publishes the broker refused, by what they were


class _Limiter:
    """Log a kind of problem at most once per period; say how many were not logged."""

    def __init__(self, period: float = LOG_PERIOD, clock: Callable[[], float] = time.monotonic) -> None:
        self._period, self._clock = period, clock
        self._last: dict[str, float] = {}
        self._quiet: Counter[str] = Counter()

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = self._clock()
        if now - self._last.get(kind, -self._period) < self._period:
            self._quiet[kind] += 1
            return
        self._last[kind] = now
        more = self._quiet.pop(kind, 0)
        log.warning(message + (" (and %d more of this kind in the last minute)" if more else ""), *args,
                    *((more,) if more else ()))


class Ingest:
    """The ingest service. Construct freely (no I/O); ``await run(stop)`` until ``stop`` is set."""

    def __init__(self, config: IngestConfig, client_id: str | None = None, watchdog: Watchdog | None = None) -> None:
        self.config = config
        self.watchdog = watchdog if watchdog is not None else Watchdog()
        """The write loop reports to it (gateway/watchdog.py); ``cmd_run`` pings systemd through it."""
        self._loop_report = Loop("write[ingest]")
        self.client_id = client_id or config.mqtt.effective_client_id
        self.address = f"{config.mqtt.host}:{config.mqtt.effective_port}"
        self.stats = IngestStats()
        self._encoder = InfluxEncoder()
        self._limiter = _Limiter()
        self._pending: deque[_Msg] = deque()
        self._pending_points = 0
        self._pending_bytes = 0
        self._first_at = 0.0  # loop time the oldest pending message arrived
        self._wake = asyncio.Event()
        self._mqtt: Client | None = None
        self._refusal: str | None = None  # the current refusal of our publishes, logged once
        self._refusal_backoff = Backoff(config.mqtt.reconnect_min, config.mqtt.reconnect_max, jitter=True)
        self.metrics_port: int | None = None

    @property
    def connected(self) -> bool:
        """Connected and subscribed."""
        return self._mqtt is not None and self._mqtt.connected

    @property
    def last_error(self) -> str | None:
        return self._mqtt.last_error if self._mqtt is not None else None

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- running ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        """Ingest until ``stop`` is set; ``ready`` is called once the metrics endpoint (if any) listens."""
        async with contextlib.AsyncExitStack() as stack:
            sink = await stack.enter_async_context(InfluxSink("ingest", self.config.influxdb, kept=KEPT))
            for level, line in queue_advice(self.config):
                log.log(level, "ingest: %s", line)
            if self.config.metrics is not None:
                server = await stack.enter_async_context(MetricsServer(self, self.config.metrics.host,
                                                                       self.config.metrics.port))
                self.metrics_port = server.port
            # Busy without progress: one write request (the sink's timeout) or one dead-letter publish.
            self._loop_report = self.watchdog.loop("write[ingest]", max(self.config.influxdb.timeout, PUBLISH_TIMEOUT) + 5.0)
            stack.callback(self.watchdog.remove, "write[ingest]")
            self._mqtt = await stack.enter_async_context(Client(self._settings(), on_connect=self._on_connect,
                                                                on_message=self._on_message, on_lost=self._drop))
            writer = asyncio.create_task(self._write_loop(sink), name="write[ingest]")
            if ready is not None:
                ready()
            waiter = asyncio.ensure_future(stop.wait())
            try:
                done, _ = await asyncio.wait((waiter, writer), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                # The in-flight write is abandoned: its messages stay unacknowledged at the broker.
                writer.cancel()
                await asyncio.gather(writer, waiter, return_exceptions=True)
            if writer in done and not writer.cancelled() and (failure := writer.exception()) is not None:
                raise failure

    # -- MQTT ------------------------------------------------------------------------------------

    def _settings(self) -> Settings:
        cfg = self.config.mqtt
        return Settings(
            who="ingest", host=cfg.host, port=cfg.effective_port, client_id=self.client_id, protocol="5",
            username=cfg.username, password=cfg.password.get_secret_value() if cfg.password is not None else None,
            keepalive=cfg.keepalive, tls=functools.partial(ssl_context, cfg.tls) if cfg.tls is not None else None,
            max_inflight=20,  # our own publishes: dead letters and receipts
            session_expiry=int(cfg.session_expiry), receive_maximum=self.config.batch.max_unacked, manual_ack=True,
            subscriptions=[(topic, cfg.qos) for topic in cfg.subscriptions()], subscriptions_required=True,
            connect_timeout=CONNECT_TIMEOUT, reconnect_min=cfg.reconnect_min, reconnect_max=cfg.reconnect_max,
            keeps="unacknowledged messages stay at the broker", hint=lambda reason: _hint(reason, self.address))

    def _current(self, msg: _Msg) -> bool:
        """The message came on the connection that is up now (only then may it be acknowledged)."""
        return self._mqtt is not None and msg.gen == self._mqtt.current

    async def _on_connect(self, session_present: bool) -> None:
        self.stats.connects += 1
        log.info("ingest: %s, subscribed to %s", "session resumed" if session_present else "new session",
                 ", ".join(self.config.mqtt.subscriptions()))
        self._wake.set()

    def _drop(self, _reason: str) -> None:
        """The connection is gone: forget what was not written (the broker re-sends it)."""
        self._pending.clear()
        self._pending_points = self._pending_bytes = 0

    def _on_message(self, message: Message) -> None:
        stats = self.stats
        stats.received += 1
        payload = message.payload
        topic = message.topic
        msg = _Msg(message.mid, message.qos, topic, message.conn, message)
        if topic.endswith("/status") and payload in STATUS_PAYLOADS:
            stats.ignored += 1
        else:
            try:
                msg.points = to_lines(payload, self._encoder, self.config.format)
            except Malformed as exc:
                msg.problem = exc
            msg.payload = payload
            props = message.properties
            reply = getattr(props, "ResponseTopic", None) if props is not None else None
            corr = getattr(props, "CorrelationData", None) if props is not None else None
            if reply and corr:
                msg.reply, msg.corr = reply, corr.decode("ascii", "replace")
        if not self._pending:
            self._first_at = asyncio.get_running_loop().time()
        self._pending.append(msg)
        if msg.points is not None:
            self._pending_points += msg.points.count
            self._pending_bytes += len(msg.points.data)
        batch = self.config.batch
        if (len(self._pending) >= batch.max_unacked or self._pending_points >= batch.max_points
                or self._pending_bytes >= batch.max_bytes or len(self._pending) == 1):
            self._wake.set()

    # -- writing and acknowledging ----------------------------------------------------------------

    async def _next_batch(self) -> list[_Msg]:
        batch = self.config.batch
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._loop_report.idle()
                self._wake.clear()
                await self._wake.wait()
            full = (len(self._pending) >= batch.max_unacked or self._pending_points >= batch.max_points
                    or self._pending_bytes >= batch.max_bytes)
            remaining = self._first_at + batch.linger - loop.time()
            if full or remaining <= 0:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
        out: list[_Msg] = []
        points = size = 0
        while self._pending:
            msg = self._pending[0]
            n, b = (msg.points.count, len(msg.points.data)) if msg.points is not None else (0, 0)
            if out and (points + n > batch.max_points or size + b > batch.max_bytes):
                break
            self._pending.popleft()
            out.append(msg)
            points += n
            size += b
        self._pending_points -= points
        self._pending_bytes -= size
        self._first_at = loop.time()
        return out

    async def _write_loop(self, sink: InfluxSink) -> None:
        while True:
            batch = await self._next_batch()
            self._loop_report.busy()
            await self._write(sink, [m for m in batch if m.points is not None and m.points.count])
            done = []
            for msg in batch:
                if msg.problem is not None and not await self._dead_letter(msg):
                    continue  # not acknowledged: the broker re-sends it after the reconnect
                done.append(msg)
            if not await self._send_receipts(done):
                continue  # the connection is gone: the broker re-sends them (written again: an overwrite)
            for msg in done:
                self._ack(msg)
            self._loop_report.progress()

    async def _database_back(self, sink: InfluxSink) -> None:
        """A write failed: wait out the sink's backoff (the watchdog sees: waiting on the database)."""
        self.stats.retries += 1
        report = self._loop_report
        report.progress()
        report.waiting(f"the database at {self.config.influxdb.url}", sink.retry_at)
        await sink.wait_connected()
        report.busy()

    async def _publish(self, what: str, gen: int, messages: list[tuple[str, bytes]],
                       properties: list[Properties | None] | None = None) -> bool:
        """Publish until the broker accepts: True then; False once the connection ``gen`` is gone
        (nothing of the batch it belongs to is acknowledged: the broker re-sends it). A refusal
        (MQTT 5 reason code) is logged once per change of reason, counted, and backed off."""
        while self._mqtt is not None and self._mqtt.current == gen:
            try:
                await self._mqtt.publish(messages, 1, properties=properties, timeout=PUBLISH_TIMEOUT)
            except NotConnected:
                return False
            except Refused as exc:
                self.stats.refused[what] += 1
                delay = self._refusal_backoff.next()
                if str(exc) != self._refusal:
                    log.error("ingest: %s (a %s) — the messages it answers stay unacknowledged at the broker; trying "
                              "again, backing off up to %g s; check the broker's ACL for user %s", exc, what,
                              self.config.mqtt.reconnect_max, self.config.mqtt.username or "(anonymous)")
                self._refusal = str(exc)
                await asyncio.sleep(delay)
                continue
            if self._refusal is not None:
                log.info("ingest: the broker accepts our publishes again")
                self._refusal = None
            self._refusal_backoff.reset()
            return True
        return False

    async def _send_receipts(self, done: list[_Msg]) -> bool:
        """Publish the receipts of written / dead-lettered messages (see the module docstring) and
        wait until the broker accepted them; False if the connection went away first."""
        allowed = self.config.receipt_topics
        by_topic: dict[str, dict[str, list[str]]] = {}
        gen = 0
        for msg in done:
            if msg.reply is None or not self._current(msg):
                continue
            if not any(topic_matches(f, msg.reply) for f in allowed):
                self._limiter.warning("receipt-topic", "ingest: not answering receipts on %s (from a message on "
                                      "%s): it is outside receipt_topics %s", msg.reply, msg.topic, allowed)
                continue
            gen = msg.gen
            kind = "written" if msg.problem is None else "dead_lettered"
            by_topic.setdefault(msg.reply, {}).setdefault(kind, []).append(msg.corr or "")
        if not by_topic:
            return True
        secret = self.config.receipt_secret
        messages = []
        for topic, ids in by_topic.items():
            receipt: dict[str, list[str] | str] = dict(ids)
            if secret is not None:
                receipt["mac"] = receipt_mac(secret.get_secret_value().encode(), topic,
                                             ids.get("written", []), ids.get("dead_lettered", []))
            messages.append((topic, json.dumps(receipt, separators=(",", ":")).encode()))
        if not await self._publish("receipt", gen, messages):
            return False
        self.stats.receipts += len(messages)
        return True

    async def _write(self, sink: InfluxSink, messages: list[_Msg]) -> None:
        """Write the messages' points; one the database refuses as data gets its ``problem`` set."""
        parts = [messages] if messages else []
        while parts:
            part = parts.pop()
            points = [m.points for m in part if m.points is not None]  # all of them: the caller passes parsed ones
            payload = b"".join(p.data for p in points)
            while True:
                if not any(self._current(m) for m in part):
                    break  # the connection they came on is gone: the broker re-sends them
                try:
                    result = await sink.send([("", payload)])
                except SinkUnavailable:
                    await self._database_back(sink)
                    continue
                if result.refused:
                    if len(part) == 1:
                        await self._split_message(sink, part[0], result.refused[0][1])
                    else:  # find the refused message(s): halves, first half first
                        half = len(part) // 2
                        parts += [part[half:], part[:half]]
                    break
                self.stats.write_requests += 1
                self.stats.points_written += sum(p.count for p in points)
                self.stats.newest_ns = max(self.stats.newest_ns, *(p.newest_ns for p in points))
                break

    async def _split_message(self, sink: InfluxSink, msg: _Msg, message: str) -> None:
        """The database refused ``msg`` as data: write the lines it takes (:func:`isolate_refused`);
        the refused lines become the message's dead letter (the original payload if all were)."""
        assert msg.points is not None
        lines = msg.points.data.splitlines(keepends=True)

        async def send(part: Sequence[bytes]) -> str | None:
            while self._current(msg):
                try:
                    result = await sink.send([("", b"".join(part))])
                except SinkUnavailable:
                    await self._database_back(sink)
                    continue
                if result.refused:
                    return result.refused[0][1]
                self.stats.write_requests += 1
                self.stats.points_written += len(part)
                return None
            raise SinkUnavailable("the connection the message came on is gone")

        try:
            refused = await isolate_refused(lines, message, send)
        except SinkUnavailable:
            return  # not acknowledged: the broker re-sends it after the reconnect
        bad = [line for part, _answer in refused for line in part]
        if not bad:  # taken in parts after all (a request too large): written
            return
        reasons = "; ".join(dict.fromkeys(answer for _part, answer in refused))
        if len(bad) < len(lines):
            msg.payload = b"".join(bad)
            msg.problem = Malformed("rejected", f"the database refused {len(bad)} of {len(lines)} points (the "
                                                f"others were written): {reasons}")
        else:
            msg.problem = Malformed("rejected", f"the database refused it: {reasons}")

    async def _dead_letter(self, msg: _Msg) -> bool:
        """Publish ``msg`` to the dead-letter topic; True once the broker acknowledged and accepted it."""
        problem = msg.problem
        assert problem is not None
        if not self._current(msg):
            return False
        topic = self.config.dead_letter_topic.format(topic=msg.topic)
        self._limiter.warning(problem.kind, "ingest: message on %s not written: %s — published to %s and "
                              "acknowledged", msg.topic, problem.reason, topic)
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("reason", problem.reason[:REASON_LIMIT]), ("kind", problem.kind), ("topic", msg.topic)]
        if not await self._publish("dead letter", msg.gen, [(topic, msg.payload)], [props]):
            return False
        self.stats.dead_letters[problem.kind] += 1
        return True

    def _ack(self, msg: _Msg) -> None:
        # Acknowledgements belong to the connection the message came on (the layer drops others).
        if self._mqtt is not None and self._mqtt.ack(msg.message):
            self.stats.acked += 1


def _hint(reason: str, address: str) -> str:
    low = reason.lower()
    if "not authori" in low or "bad user" in low or "refused the connection" in low:
        return "check the username and password (and the broker's ACL for this client id)"
    if "certificate" in low or "ssl" in low or "tls" in low:
        return "check tls.ca_file and that the broker's certificate is valid for the host name"
    if "refused" in low:
        return f"check that the broker is running and listening on {address} (host, port, firewall)"
    return f"check the network path to {address} and the broker's log"


# --------------------------------------------------------------------------- metrics
METRICS: dict[str, tuple[str, str]] = {
    "sluice_ingest_connected": ("gauge", "1 while connected and subscribed to the broker"),
    "sluice_ingest_messages_received_total": ("counter", "MQTT messages received (re-sent ones included)"),
    "sluice_ingest_messages_acked_total": ("counter", "MQTT messages acknowledged to the broker"),
    "sluice_ingest_points_written_total": ("counter", "Points written to the database"),
    "sluice_ingest_write_requests_total": ("counter", "Successful write requests"),
    "sluice_ingest_write_retries_total": ("counter", "Write requests that failed and are sent again"),
    "sluice_ingest_dead_letters_total": ("counter", "Messages published to the dead-letter topic, by kind"),
    "sluice_ingest_ignored_total": ("counter", "Status messages (online/offline) acknowledged and not written"),
    "sluice_ingest_receipts_total": ("counter", "End-to-end receipts published to gateways"),
    "sluice_ingest_publishes_refused_total": ("counter", "Our publishes the broker refused (MQTT 5 reason code), "
                                                         "by what they were; retried with backoff"),
    "sluice_ingest_pending_messages": ("gauge", "Messages received and not yet acknowledged"),
    "sluice_ingest_lag_seconds": ("gauge", "Now minus the time of the newest point written (0 before the first)"),
    "process_cpu_seconds_total": ("counter", "User and system CPU time of the process"),
}


def render_metrics(ingest: Ingest) -> str:
    """Prometheus text exposition format 0.0.4 (the gateway's renderer helpers)."""
    out = MetricsText()
    stats = ingest.stats

    def sample(name: str, value: float, **labels: str) -> None:
        out.family(name, *METRICS[name])
        out.sample(name, value, **labels)

    sample("sluice_ingest_connected", ingest.connected)
    sample("sluice_ingest_messages_received_total", stats.received)
    sample("sluice_ingest_messages_acked_total", stats.acked)
    sample("sluice_ingest_points_written_total", stats.points_written)
    sample("sluice_ingest_write_requests_total", stats.write_requests)
    sample("sluice_ingest_write_retries_total", stats.retries)
    out.family("sluice_ingest_dead_letters_total", *METRICS["sluice_ingest_dead_letters_total"])
    for kind, n in sorted(stats.dead_letters.items()):
        out.sample("sluice_ingest_dead_letters_total", n, kind=kind)
    sample("sluice_ingest_ignored_total", stats.ignored)
    sample("sluice_ingest_receipts_total", stats.receipts)
    out.family("sluice_ingest_publishes_refused_total", *METRICS["sluice_ingest_publishes_refused_total"])
    for what in ("dead letter", "receipt"):
        out.sample("sluice_ingest_publishes_refused_total", stats.refused[what], kind=what.replace(" ", "_"))
    sample("sluice_ingest_pending_messages", ingest.pending)
    lag = max(0.0, (time.time_ns() - stats.newest_ns) / 1e9) if stats.newest_ns else 0.0
    sample("sluice_ingest_lag_seconds", lag)
    sample("process_cpu_seconds_total", process_usage()["cpu"])
    return "\n".join(out.lines) + "\n"


def MetricsServer(ingest: Ingest, host: str, port: int) -> LocalHttpServer:
    """``async with MetricsServer(ingest, host, port):`` answers ``GET /metrics``."""
    return LocalHttpServer({"/metrics": lambda: ("200 OK", PROMETHEUS_TEXT, render_metrics(ingest).encode())},
                           host, port, "ingest: metrics")
