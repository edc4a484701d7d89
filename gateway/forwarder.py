"""Delivery: one Forwarder per sink moves readings from the outbox to the sink, acknowledging
each batch to the outbox only after the sink confirmed every message of it.

Lifecycle (who calls what):

* The core builds ``Forwarder(name, outbox, sink, sink_config, identity)`` (no I/O), enters the
  sink's context, starts :meth:`Forwarder.run` as a task named ``forward[<name>]``, and calls
  :meth:`Forwarder.notify` after every outbox commit. ``run`` never returns on its own; it is
  cancelled at shutdown. Everything runs on the event loop; nothing here is thread-safe.
* A batch is: fetch the oldest unacknowledged entries (at most ``batch.max_readings`` /
  ``batch.max_bytes``), group them by topic keeping each device's order, split each topic's
  readings into messages of at most ``batch.max_bytes`` (a single reading larger than that goes
  alone), encode, ``await sink.send(messages)``, then ``outbox.ack(sink, last_seq)``.
* If the sink raises :class:`SinkUnavailable`, nothing is acknowledged; the forwarder waits for
  the sink to reconnect and fetches again from the same position, so the same entries go out
  again in the same order (the broker may see some twice: duplicates are fine, loss is not).
  Cancellation mid-send leaves the batch unacknowledged for the next start.
* If the sink raises :class:`SinkRejected` (the far end refused the *data*, e.g. an InfluxDB field
  type conflict: sending it again cannot succeed), the batch is sent again in halves until the
  refused readings stand alone (:func:`isolate_refused`); those move to the outbox's dead-letter
  table and the sink's position past the batch, in one transaction (:meth:`Outbox.reject`), and
  the queue flows on. Before each batch the forwarder sends the sink's dead letters that the operator
  marked for re-sending (``sluice deadletter resend``), oldest first.
* ``delivery: end_to_end`` (MQTT 5 sinks): a PUBACK only moves the sink's *sent* position
  (:meth:`Outbox.mark_sent`); nothing is deleted. Every message of a batch carries the batch id
  ``<first>-<last>:<part>/<parts>`` (ASCII; ``first``..``last`` the outbox seq range the batch
  covers, contiguous with the previous batch; ``part`` 1-based of ``parts`` messages) as MQTT 5
  correlation data, with the sink's receipt topic as response topic. ``sluice ingest`` publishes
  ``{"written": [ids...], "dead_lettered": [ids...]}`` (JSON) there once a message's points are in
  the database (or in its dead-letter topic). A range whose every part has a receipt is confirmed;
  the sink's ``acked`` position moves over confirmed ranges that join it (receipts may come in any
  order, from several ingest workers, and from before a restart). When the oldest sent batch has
  no complete receipt ``receipt_timeout`` after it was sent (or after the last receipt that moved
  ``acked``: an ingest working through a backlog in order is not waited out), the sent position
  goes back to ``acked`` and everything unconfirmed is published again (duplicates overwrite
  identical points). Re-sends back off: after the first, the next comes only 2×, 4×, 8× then
  16× (:data:`gateway.receipts.RESEND_BACKOFF_MAX`) ``receipt_timeout`` later while no receipt
  moves ``acked`` — an ingest that is down costs the broker's queue one more copy of the window
  per back-off step, not one per ``receipt_timeout``; and a new copy never starts before the
  previous one was handed to the broker whole. The backoff (next due time, re-sends so far) is kept in the
  outbox (``sink_resend``) with the rewind, so a restart keeps it; readings sent before a restart
  with no re-send recorded are published again at start (a fresh ``receipt_timeout`` after every
  restart could postpone them for ever). At most ``receipt_window`` readings are sent but
  unconfirmed at once; while the window is full the forwarder reports itself *waiting* on
  receipts until its next re-send (gateway/watchdog.py: that is not a wedge). With
  ``receipt_secret`` a receipt counts only if its ``"mac"`` is :func:`receipt_mac` of it (others
  are counted, ignored).
* The receipts' state (ranges awaiting receipts, confirmed ranges, the re-send backoff) lives in
  :class:`gateway.receipts.Receipts`, one per end_to_end forwarder; this docstring states its rules.
* Watchdog: the forwarder reports to its :class:`gateway.watchdog.Loop` — idle (nothing to send),
  busy (a batch on its way; progress at every delivered or failed batch), waiting on the sink's
  connection (no deadline: the sink reconnects by itself), on receipts (until the next re-send) or
  on a pause after an outbox error (until it retries).
* Messages: a sink config with a ``topic`` template (MQTT) gets one group per topic; one with
  ``topic = None`` (HTTP sinks) gets the batch in outbox order, split only by ``batch.max_bytes``,
  with ``""`` as the topic of every message.
"""

from __future__ import annotations

import asyncio
import logging
import string
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from gateway.buffer import Entry, Outbox, OutboxError
from gateway.config import BatchConfig
from gateway.encode import make_encoder
from gateway.reading import Reading
from gateway.receipts import RECEIPTS, Receipts, batch_ids, parse_batch_id, receipt_mac
from gateway.watchdog import Loop

__all__ = ["Forwarder", "ForwarderStats", "Identity", "Message", "Sink", "SinkConfig", "SinkRejected",
           "SinkUnavailable", "batch_ids", "parse_batch_id", "receipt_mac"]  # the last three: gateway/receipts.py

log = logging.getLogger(__name__)

RECHECK_INTERVAL = 5.0
"""Seconds between outbox checks when nobody calls notify() (a lost wake-up costs at most this)."""
RESEND_CHECK_INTERVAL = 2.0
"""Seconds between looks for dead letters an operator marked for re-sending (another process marks them)."""
ERROR_PAUSE = 5.0
"""Seconds to wait after an outbox error or an unexpected failure before trying again."""

Message = tuple[str, bytes]
"""(topic, payload)"""


class SinkUnavailable(Exception):
    """The sink cannot take messages now: not connected, or the link dropped before every message
    of the batch was acknowledged. Nothing of the batch may be considered delivered."""


class SinkRejected(Exception):
    """The far end refused the batch's data itself (a type conflict, a parse error): sending the same
    batch again would be refused again. The message is the server's answer, for the dead letter."""


class SinkConfig(Protocol):
    """What a forwarder reads from a sink's configuration."""

    @property
    def batch(self) -> BatchConfig: ...

    @property
    def format(self) -> Literal["influx", "json"]: ...

    @property
    def topic(self) -> str | None:
        """A topic template, or None: one stream of messages without topics (HTTP sinks)."""
        ...


class Sink(Protocol):
    """What a forwarder needs from a sink (``gateway.mqtt.MqttSink`` is the implementation)."""

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self) -> None:
        """Return once the sink is connected (immediately if it is)."""
        ...

    async def send(self, messages: Sequence[Message]) -> None:
        """Publish all ``messages``; return only when every one was acknowledged by the far end.
        Raises :class:`SinkUnavailable` otherwise, or :class:`SinkRejected` if the far end refused
        the data as such (an MQTT sink never does)."""
        ...


class Identity(Protocol):
    """Where the gateway is: :class:`gateway.config.Config` has both."""

    @property
    def gateway_id(self) -> str: ...

    @property
    def site(self) -> str: ...


@dataclass
class ForwarderStats:
    delivered: int = 0  # readings acknowledged to the outbox
    messages: int = 0  # messages the sink confirmed
    bytes: int = 0  # payload bytes the sink confirmed
    batches: int = 0
    retries: int = 0  # batches that failed and will be sent again
    dead_lettered: int = 0  # readings the far end refused as data, moved to the dead-letter table
    resent: int = 0  # readings from dead letters delivered after all
    last_delivery_ns: int | None = None  # wall-clock time of the last acknowledged batch
    receipts: int = 0  # end_to_end: batch ids confirmed by receipts
    receipt_timeouts: int = 0  # end_to_end: times unconfirmed readings were published again
    receipt_resent: int = 0  # end_to_end: readings published again after a receipt timeout
    receipts_refused: int = 0  # end_to_end with receipt_secret: receipts without a valid mac, ignored


SPLIT_REQUESTS = 64
"""Most requests spent finding the refused readings of one refused batch; then what is still
refused goes to the dead letters in parts (a batch of all-bad readings must not cost 2n requests)."""

T = TypeVar("T")


async def isolate_refused(items: Sequence[T], message: str, send: Callable[[Sequence[T]], Awaitable[None]],
                          budget: int = SPLIT_REQUESTS) -> list[tuple[list[T], str]]:
    """``items`` were refused as data together (the server said ``message``): send them again in
    halves (first half first) until every refused part is a single item; after ``budget`` requests
    a refused part is not split further. Returns the refused parts, in order, each with the
    server's message; the rest was written. Raises what ``send`` raises other than
    :class:`SinkRejected` (the caller then sends the whole batch again later: harmless)."""
    refused: list[tuple[list[T], str]] = []
    stack: list[tuple[list[T], str | None]] = [(list(items), message)]  # None: not sent yet
    while stack:
        part, answer = stack.pop()
        if answer is None:
            budget -= 1
            try:
                await send(part)
                continue
            except SinkRejected as exc:
                answer = str(exc)
        if len(part) == 1 or budget <= 0:
            refused.append((part, answer))
        else:
            half = len(part) // 2
            stack += [(part[half:], None), (part[:half], None)]
    return refused


class _Topics:
    """Renders the topic template per (device, measurement, profile); the result is cached.
    ``fixed`` is the one topic of a template with only {site} and {gateway} (the default), else None."""

    def __init__(self, template: str, gateway: str, site: str) -> None:
        self._template = template
        self._fixed = {"gateway": gateway, "site": site}
        self._names = {name for _lit, name, _spec, _conv in string.Formatter().parse(template) if name}
        self._cache: dict[tuple[str, str, str], str] = {}
        self.fixed = template.format(**self._fixed) if self._names <= self._fixed.keys() else None

    def __call__(self, reading: Reading) -> str:
        key = (reading.device, reading.measurement, reading.tags.get("profile", ""))
        topic = self._cache.get(key)
        if topic is None:
            # '+', '#' and NUL are not allowed in a topic name; a measurement could hold them.
            values = {"device": key[0], "measurement": key[1], "profile": key[2] or "unknown"}
            values = {k: v.replace("+", "_").replace("#", "_").replace("\0", "_") for k, v in values.items()}
            topic = self._template.format(**self._fixed, **values)
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[key] = topic
        return topic


class Forwarder:
    """Moves one sink's readings from the outbox to the sink. See the module docstring."""

    def __init__(self, name: str, outbox: Outbox, sink: Sink, config: SinkConfig,
                 identity: Identity, loop: Loop | None = None) -> None:
        self.name = name
        self.loop = loop if loop is not None else Loop(f"forward[{name}]")
        """What this forwarder reports to the watchdog (see the module docstring)."""
        self._outbox = outbox
        self._sink = sink
        self._batch = config.batch
        self._encoder = make_encoder(config.format, identity.gateway_id, identity.site)
        self._topic = _Topics(config.topic, identity.gateway_id, identity.site) if config.topic is not None else None
        self._wake = asyncio.Event()
        self._resend_check_at = 0.0  # loop time of the next look for dead letters to re-send
        self.stats = ForwarderStats()
        self._receipts: Receipts | None = None
        if getattr(config, "delivery", "broker") == "end_to_end":
            secret = getattr(config, "receipt_secret", None)
            key = (secret.get_secret_value().encode(), str(sink.receipt_topic)) if secret is not None else None  # type: ignore[attr-defined]
            self._receipts = Receipts(name, outbox, config.receipt_timeout, config.receipt_window,  # type: ignore[attr-defined]
                                      self.stats, self.loop, self._wake.set, key)
            sink.receipt_handler = self._receipts.on_receipt  # type: ignore[attr-defined]

    def notify(self) -> None:
        """New entries were committed to the outbox. Never blocks."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver forever; cancel to stop (an unacknowledged batch stays in the outbox)."""
        failing = False
        rec = self._receipts
        loop = self.loop
        if rec is not None:
            rec.restore()
        while True:
            try:
                if not self._sink.connected:
                    loop.waiting("the sink's connection", None)  # the sink reconnects by itself
                    await self._sink.wait_connected()
                if not await self._resend_dead_letter():
                    continue
                wait = rec.check() if rec is not None else None
                if wait is not None:
                    self._wake.clear()
                    await self._wait_wake(wait)
                    continue
                entries = await self._next_batch()
                if not entries:
                    continue
                loop.busy()
                messages = self.build_messages([e.reading for e in entries])
                if rec is not None:
                    first = min(entries[0].seq, self._outbox.sent(self.name) + 1)
                    try:
                        await self._sink.send(messages, batch_ids(first, entries[-1].seq,  # type: ignore[call-arg]
                                                                  len(messages)))
                    except SinkUnavailable as exc:
                        self.stats.retries += 1
                        loop.progress()
                        log.debug("sink %s: batch of %d readings not published (%s); will resend",
                                  self.name, len(entries), exc)
                        loop.waiting("the sink's connection", None)
                        await self._sink.wait_connected()
                        continue
                    loop.progress()
                    rec.published(first, entries[-1].seq)
                    stats = self.stats
                    stats.messages += len(messages)
                    stats.bytes += sum(len(payload) for _topic, payload in messages)
                    stats.batches += 1
                    continue
                try:
                    await self._sink.send(messages)
                except SinkUnavailable as exc:
                    self.stats.retries += 1
                    loop.progress()
                    log.debug("sink %s: batch of %d readings not delivered (%s); will resend",
                              self.name, len(entries), exc)
                    loop.waiting("the sink's connection", None)
                    await self._sink.wait_connected()
                    continue
                except SinkRejected as exc:
                    await self._reject(entries, str(exc))
                    loop.progress()
                    continue
                loop.progress()
                self._outbox.ack(self.name, entries[-1].seq)
                stats = self.stats
                stats.delivered += len(entries)
                stats.messages += len(messages)
                stats.bytes += sum(len(payload) for _topic, payload in messages)
                stats.batches += 1
                stats.last_delivery_ns = time.time_ns()
                if failing:
                    log.info("sink %s: delivering again", self.name)
                    failing = False
            except OutboxError as exc:
                if not failing:
                    log.error("sink %s: outbox error: %s — retrying every %.0f s; check the disk",
                              self.name, exc, ERROR_PAUSE)
                    failing = True
                self.stats.retries += 1
                loop.waiting("a retry after an outbox error", asyncio.get_running_loop().time() + ERROR_PAUSE)
                await asyncio.sleep(ERROR_PAUSE)
            except Exception:
                # A bug must not stop delivery for good: log it with the traceback, retry later.
                if not failing:
                    log.exception("sink %s: unexpected failure while forwarding — retrying every %.0f s",
                                  self.name, ERROR_PAUSE)
                    failing = True
                self.stats.retries += 1
                loop.waiting("a retry after an unexpected failure", asyncio.get_running_loop().time() + ERROR_PAUSE)
                await asyncio.sleep(ERROR_PAUSE)

    async def _reject(self, entries: list[Entry], message: str) -> None:
        """The far end refused the batch as data: find the refused readings (:func:`isolate_refused`),
        move them to one dead letter and the position past the batch; the rest was written."""
        async def send(part: Sequence[Entry]) -> None:
            await self._sink.send(self.build_messages([e.reading for e in part]))

        try:
            refused = await isolate_refused(entries, message, send)
        except SinkUnavailable as exc:  # the whole batch goes again (and is refused again)
            self.stats.retries += 1
            log.debug("sink %s: lost while isolating refused readings (%s); will resend", self.name, exc)
            await self._sink.wait_connected()
            return
        bad = [e for part, _answer in refused for e in part]
        stats = self.stats
        if not bad:  # every half was taken (a request too large, HTTP 413): all written
            self._outbox.ack(self.name, entries[-1].seq)
            stats.delivered += len(entries)
            stats.last_delivery_ns = time.time_ns()
            log.info("sink %s: a batch of %d readings refused whole (%s) was taken in parts", self.name,
                     len(entries), message)
            return
        reasons = "; ".join(dict.fromkeys(answer for _part, answer in refused))[:2000]
        letter = self._outbox.reject(self.name, bad, reasons, upto=entries[-1].seq)
        stats.dead_lettered += len(bad)
        stats.delivered += len(entries) - len(bad)
        stats.last_delivery_ns = time.time_ns()
        log.error("sink %s refused %d of %d readings (seq %d–%d) as data: %s — moved them to dead letter %d, "
                  "wrote the others and carried on; fix the cause, then `sluice deadletter resend %d`",
                  self.name, len(bad), len(entries), entries[0].seq, entries[-1].seq, reasons, letter, letter)

    async def _resend_dead_letter(self) -> bool:
        """Send the oldest dead letter marked for re-sending, if any. False when the sink is
        unavailable (the caller waits and comes back), True otherwise."""
        now = asyncio.get_running_loop().time()
        if now < self._resend_check_at:
            return True
        letter = self._outbox.next_resend(self.name)
        if letter is None:
            self._resend_check_at = now + RESEND_CHECK_INTERVAL
            return True
        self.loop.busy()
        try:
            await self._sink.send(self.build_messages(letter.readings))
        except SinkUnavailable:
            self.stats.retries += 1
            self.loop.progress()
            self.loop.waiting("the sink's connection", None)
            await self._sink.wait_connected()
            return False
        except SinkRejected as exc:
            self.loop.progress()
            self._outbox.refused_again(letter.id, str(exc))
            log.error("sink %s refused dead letter %d (%d readings) again: %s — it stays in the dead-letter table",
                      self.name, letter.id, letter.count, exc)
            return True
        self.loop.progress()
        self._outbox.resolve(letter.id)
        self.stats.resent += letter.count
        log.info("sink %s: dead letter %d (%d readings) delivered on re-send", self.name, letter.id, letter.count)
        return True

    async def _next_batch(self) -> list[Entry]:
        """Wait for entries, linger for a part-full batch, return the batch (maybe empty)."""
        batch = self._batch
        self._wake.clear()  # cleared before the fetch: a commit after it wakes us again
        after = None
        most = batch.max_readings
        if self._receipts is not None:  # the window bounds what is unconfirmed, a batch included
            after = self._outbox.sent(self.name)
            most = min(most, self._receipts.room())
        entries = self._outbox.fetch(self.name, most, batch.max_bytes, after=after)
        if not entries:
            due = self._receipts.due() if self._receipts is not None else None
            if due is None:
                self.loop.idle()
                await self._wait_wake(RECHECK_INTERVAL)
            else:  # all sent: wake for the next re-send, not up to RECHECK_INTERVAL after it
                self.loop.waiting(RECEIPTS, due)
                await self._wait_wake(min(RECHECK_INTERVAL, max(due - asyncio.get_running_loop().time(), 0.01)))
            return []
        # The first batch of a run goes at once: lingering is for steady state, and an operator
        # watching a new install should see the first value as soon as it is read.
        if len(entries) < most and batch.linger > 0 and self.stats.batches:
            # Linger from the oldest reading's time, so a backlog (old readings) goes at once.
            age = (time.time_ns() - entries[0].reading.time_ns) / 1e9
            deadline = asyncio.get_running_loop().time() + min(batch.linger - age, batch.linger)
            while len(entries) < most:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                self._wake.clear()
                if not await self._wait_wake(remaining):
                    break  # nothing committed meanwhile: send what we have
                more = self._outbox.fetch(self.name, most, batch.max_bytes, after=after)
                if len(more) == len(entries):  # limited by max_bytes: full already
                    entries = more
                    break
                entries = more
        return entries

    async def _wait_wake(self, timeout: float) -> bool:
        """True when notified, False on timeout."""
        # A timer that sets the same event, not asyncio.timeout/wait_for: a timeout there cancels
        # the task and unwinds it with an exception (once per lingered batch: measurable CPU), and
        # on Python 3.11 wait_for can swallow a cancellation that arrives as the wake-up completes.
        if self._wake.is_set():
            return True
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self._wake.set()

        timer = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()
        return not expired

    def build_messages(self, readings: Sequence[Reading]) -> list[Message]:
        """Group by topic (first-seen order, each device's order kept) and split by max_bytes. With one
        topic for every reading (no template, or one without per-reading placeholders: the default)
        the batch stays one group in outbox order, so a poll cycle's readings share a message."""
        item = self._encoder.item
        by_topic: dict[str, list[bytes]] = {}
        topic_of = self._topic
        fixed = "" if topic_of is None else topic_of.fixed
        if fixed is not None:
            by_topic[fixed] = [encoded for encoded in map(item, readings) if encoded]
        for reading in readings if topic_of is not None and fixed is None else ():
            encoded = item(reading)
            if encoded:
                topic = topic_of(reading)
                items = by_topic.get(topic)
                if items is None:
                    by_topic[topic] = [encoded]
                else:
                    items.append(encoded)
        limit = self._batch.max_bytes
        size = self._encoder.size
        message = self._encoder.message
        out: list[Message] = []
        for topic, items in by_topic.items():
            if not items:
                continue
            start, total = 0, 0
            for i, encoded in enumerate(items):
                if i > start and size(total + len(encoded), i + 1 - start) > limit:
                    out.append((topic, message(items[start:i])))
                    start, total = i, 0
                total += len(encoded)
            out.append((topic, message(items[start:])))
        return out
