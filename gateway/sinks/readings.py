"""The readings stream: one sink's view of the outbox (gateway/buffer.py) for the delivery engine,
and :class:`Forwarder`, the engine wired for a readings sink.

* Positions: a batch moves the sink's position (:meth:`Outbox.ack`) once the sink took it; the
  new position counts at once and reaches the file with the next commit (gateway/buffer.py).
* Messages: a sink config with a ``topic`` template (MQTT) gets one group per topic, each
  device's order kept; one with ``topic = None`` (HTTP sinks) gets the batch in outbox order with
  ``""`` as the topic of every message; each group is split into messages of at most
  ``batch.max_bytes`` (a single reading larger than that goes alone).
* Dead letters: readings refused as data go to the outbox's dead-letter store with the server's
  reasons, in the transaction that moves the position past the batch (:meth:`Outbox.reject`);
  letters an operator marked (``sluice deadletter resend``) are sent before the next batch.
* ``delivery: end_to_end`` (a sink whose ``receipts`` is not None, MQTT 5): a PUBACK only moves
  the sink's *sent* position (:meth:`Outbox.mark_sent`); nothing is deleted. Every message of a
  batch carries the batch id ``<first>-<last>:<part>/<parts>`` (ASCII; ``first``..``last`` the
  outbox seq range the batch covers, contiguous with the previous batch; ``part`` 1-based of
  ``parts`` messages) as MQTT 5 correlation data, with the sink's receipt topic as response topic.
  ``sluice ingest`` publishes ``{"written": [ids...], "dead_lettered": [ids...]}`` (JSON) there
  once a message's points are in the database (or in its dead-letter topic). A range whose every
  part has a receipt is confirmed; the sink's ``acked`` position moves over confirmed ranges that
  join it (receipts may come in any order, from several ingest workers, and from before a
  restart). When the oldest sent batch has no complete receipt ``receipt_timeout`` after it was
  sent (or after the last receipt that moved ``acked``: an ingest working through a backlog in
  order is not waited out), the sent position goes back to ``acked`` and everything unconfirmed is
  published again (duplicates overwrite identical points). Re-sends back off: after the first, the
  next comes only 2×, 4×, 8× then 16× (:data:`gateway.sinks.receipts.RESEND_BACKOFF_MAX`)
  ``receipt_timeout`` later while no receipt moves ``acked`` — an ingest that is down costs the
  broker's queue one more copy of the window per back-off step, not one per ``receipt_timeout``;
  and a new copy never starts before the previous one was handed to the broker whole. The backoff
  (next due time, re-sends so far) is kept in the outbox (``sink_resend``) with the rewind, so a
  restart keeps it; readings sent before a restart with no re-send recorded are published again at
  start. At most ``receipt_window`` readings are sent but unconfirmed at once; while the window is
  full the engine reports itself *waiting* on receipts until its next re-send (gateway/watchdog.py:
  that is not a wedge). With ``receipt_secret`` a receipt counts only if its ``"mac"`` is
  :func:`receipt_mac` of it (others are counted, ignored). The state lives in
  :class:`gateway.sinks.receipts.Receipts`.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Sequence
from typing import Literal, Protocol

from gateway.outbox import Entry, Outbox, OutboxError
from gateway.config import BatchConfig
from gateway.encode import make_encoder
from gateway.reading import Reading
from gateway.sinks.base import Message, Sink
from gateway.sinks.engine import Batching, Delivery, DeliveryStats, Letter, Packed
from gateway.sinks.receipts import Receipts, batch_ids, parse_batch_id, receipt_mac
from gateway.watchdog import Loop

__all__ = ["Forwarder", "ForwarderStats", "Identity", "ReadingStream", "SinkConfig", "Topics", "batch_ids",
           "parse_batch_id", "receipt_mac"]

log = logging.getLogger("gateway.sinks.engine")  # the engine's lines, one logger for delivery

ForwarderStats = DeliveryStats


class SinkConfig(Protocol):
    """What a readings delivery reads from a sink's configuration."""

    @property
    def batch(self) -> BatchConfig: ...

    @property
    def format(self) -> Literal["influx", "json"]: ...

    @property
    def topic(self) -> str | None:
        """A topic template, or None: one stream of messages without topics (HTTP sinks)."""
        ...


class Identity(Protocol):
    """Where the gateway is: :class:`gateway.config.Config` has both."""

    @property
    def gateway_id(self) -> str: ...

    @property
    def site(self) -> str: ...


class Topics:
    """Renders the topic template per (device, measurement, profile); the result is cached.
    ``fixed`` is the one topic of a template with only {site} and {gateway} (the default), else None."""

    def __init__(self, template: str, gateway: str, site: str) -> None:
        self._template = template
        self._fixed = {"gateway": gateway, "site": site}
        self._cache: dict[tuple[str, str, str], str] = {}
        names = {name for _lit, name, _spec, _conv in string.Formatter().parse(template) if name}
        self.fixed = template.format(**self._fixed) if names <= self._fixed.keys() else None

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


class ReadingStream:
    """One sink's readings in the outbox (see the module docstring)."""

    errors: tuple[type[Exception], ...] = (OutboxError,)

    def __init__(self, sink: str, outbox: Outbox, receipts: Receipts | None = None) -> None:
        self.sink = sink
        self.outbox = outbox
        self.receipts = receipts

    def start(self) -> None:
        if self.receipts is not None:
            self.receipts.restore()

    def fetch(self, most: int, max_bytes: int) -> list[Entry]:
        rec = self.receipts
        if rec is None:
            return self.outbox.fetch(self.sink, most, max_bytes)
        # the window bounds what is unconfirmed, a batch included
        return self.outbox.fetch(self.sink, min(most, rec.room()), max_bytes, after=self.outbox.sent(self.sink))

    def seq(self, item: Entry) -> int:
        return item.seq

    def time_ns(self, item: Entry) -> int:
        return item.reading.time_ns

    def _first(self, items: Sequence[Entry]) -> int:
        return min(items[0].seq, self.outbox.sent(self.sink) + 1)

    def tags(self, items: Sequence[Entry], parts: int) -> list[bytes] | None:
        if self.receipts is None:
            return None
        return batch_ids(self._first(items), items[-1].seq, parts)

    def ack(self, items: Sequence[Entry]) -> int:
        if self.receipts is not None:
            self.receipts.published(self._first(items), items[-1].seq)
            return 0
        self.outbox.ack(self.sink, items[-1].seq)
        return len(items)

    def dead_letter(self, refused: Sequence[tuple[list[Entry], str]], batch: Sequence[Entry]) -> int:
        bad = [e for part, _answer in refused for e in part]
        reasons = "; ".join(dict.fromkeys(answer for _part, answer in refused))[:2000]
        letter = self.outbox.reject(self.sink, bad, reasons, upto=batch[-1].seq)
        log.error("sink %s refused %d of %d readings (seq %d–%d) as data: %s — moved them to dead letter %d, "
                  "wrote the others and carried on; fix the cause, then `sluice deadletter resend %d`",
                  self.sink, len(bad), len(batch), batch[0].seq, batch[-1].seq, reasons, letter, letter)
        return len(bad)

    def hold(self) -> float | None:
        return self.receipts.check() if self.receipts is not None else None

    def due(self) -> float | None:
        return self.receipts.due() if self.receipts is not None else None

    def next_letter(self) -> Letter[Entry] | None:
        letter = self.outbox.next_resend(self.sink)
        if letter is None:
            return None
        return Letter(letter.id, [Entry(0, r) for r in letter.readings])

    def letter_done(self, letter: Letter[Entry], refused: str | None) -> None:
        if refused is not None:
            self.outbox.refused_again(letter.id, refused)
            log.error("sink %s refused dead letter %d (%d readings) again: %s — it stays in the dead-letter table",
                      self.sink, letter.id, len(letter.items), refused)
            return
        self.outbox.resolve(letter.id)
        log.info("sink %s: dead letter %d (%d readings) delivered on re-send", self.sink, letter.id, len(letter.items))


class Forwarder(Delivery[Entry, Message]):
    """The delivery engine for one readings sink: its outbox stream, its messages, its receipts."""

    def __init__(self, name: str, outbox: Outbox, sink: Sink[Message], config: SinkConfig,
                 identity: Identity, loop: Loop | None = None) -> None:
        batch = config.batch
        self._max_bytes = batch.max_bytes
        self._encoder = make_encoder(config.format, identity.gateway_id, identity.site)
        self._topic = Topics(config.topic, identity.gateway_id, identity.site) if config.topic is not None else None
        loop = loop if loop is not None else Loop(f"forward[{name}]")
        stream = ReadingStream(name, outbox)
        super().__init__(name, stream, sink, self._pack_entries, Batching(batch.max_readings, batch.max_bytes, batch.linger),
                         loop)
        capability = sink.receipts if sink is not None else None
        if capability is not None:
            secret = capability.receipt_key
            key = (secret, capability.receipt_topic) if secret is not None else None
            stream.receipts = Receipts(name, outbox, capability.receipt_timeout, capability.receipt_window,
                                       self.stats, self.loop, self.notify, key)
            capability.on_receipt(stream.receipts.on_receipt)

    def _pack_entries(self, entries: Sequence[Entry]) -> Packed[Message]:
        return self.pack([e.reading for e in entries])

    def build_messages(self, readings: Sequence[Reading]) -> list[Message]:
        """Group by topic (first-seen order, each device's order kept) and split by max_bytes."""
        return self.pack(readings)[0]

    def pack(self, readings: Sequence[Reading]) -> Packed[Message]:
        """The messages of ``readings`` (see the module docstring), the readings (indices) each one
        carries, and the payload bytes."""
        item = self._encoder.item
        by_topic: dict[str, tuple[list[bytes], Sequence[int]]] = {}
        topic_of = self._topic
        # One topic for every reading (no topic, or a template without per-reading placeholders: the
        # default): the batch is one group in outbox order, so a poll cycle's readings share a message.
        fixed = "" if topic_of is None else topic_of.fixed
        if fixed is not None:
            encoded = list(map(item, readings))
            if all(encoded):
                by_topic[fixed] = (encoded, range(len(encoded)))
            else:
                kept = [i for i, e in enumerate(encoded) if e]
                by_topic[fixed] = ([encoded[i] for i in kept], kept)
        else:
            assert topic_of is not None
            groups: dict[str, tuple[list[bytes], list[int]]] = {}
            for i, reading in enumerate(readings):
                one = item(reading)
                if one:
                    topic = topic_of(reading)
                    group = groups.get(topic)
                    if group is None:
                        groups[topic] = ([one], [i])
                    else:
                        group[0].append(one)
                        group[1].append(i)
            by_topic.update(groups)
        limit = self._max_bytes
        size = self._encoder.size
        message = self._encoder.message
        out: list[Message] = []
        covers: list[Sequence[int]] = []
        total_bytes = 0
        for topic, (items, index) in by_topic.items():
            if not items:
                continue
            start, total = 0, 0
            for i, line in enumerate(items):
                if i > start and size(total + len(line), i + 1 - start) > limit:
                    payload = message(items[start:i])
                    out.append((topic, payload))
                    covers.append(index[start:i])
                    total_bytes += len(payload)
                    start, total = i, 0
                total += len(line)
            payload = message(items[start:])
            out.append((topic, payload))
            covers.append(index[start:])
            total_bytes += len(payload)
        return out, covers, total_bytes
