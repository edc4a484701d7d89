"""The one delivery engine: a :class:`Delivery` per sink moves items of one stream — the outbox's
readings (gateway/sinks/readings.py) or the trace feed's sealed events
(gateway/sinks/events.py) — to the sink, moving the stream's position only after the sink
confirmed them (the contract is gateway/sinks/base.py).

Lifecycle (who calls what):

* The owner (the gateway, the trace service) builds ``Delivery(name, stream, sink, pack,
  batching, loop)`` (no I/O), enters the sink's context, starts :meth:`Delivery.run` as a task and
  calls :meth:`Delivery.notify` after every commit to the stream. ``run`` never returns on its
  own; it is cancelled at shutdown (an in-flight batch stays unacknowledged for the next start).
  :meth:`Delivery.flush` delivers what is there now, once, without waiting (a file sink at a stop).
  Everything runs on the event loop; nothing here is thread-safe.
* A batch is: fetch the oldest unacknowledged items (at most ``max_items`` / ``max_bytes``; a
  part-full batch lingers up to ``linger`` from its oldest item's time, except the first batch of
  a run), ``pack`` them into the sink's items (readings: messages grouped by topic; events: one
  per event), ``await sink.send(...)``, then move the stream's position past the batch.
* :class:`~gateway.sinks.base.SinkUnavailable`: nothing is acknowledged; the engine waits in the
  sink's ``wait_connected`` (plus a short pause that grows while it keeps failing, so a sink that
  cannot pace itself is never hammered) and fetches again from the same position, so the same items
  go out again in the same order. A result that leaves items undelivered acknowledges the
  delivered (or refused) prefix and does the same for the rest.
* Items refused **as data** (the result's ``refused``): a sink item that carried several stream
  items (a message of many readings) is sent again in halves until the refused items stand alone
  (:func:`isolate_refused`); the refused items go to the stream's dead letters and the position past
  the batch, in one transaction, and the stream flows on. Before each batch the engine sends the
  stream's dead letters an operator marked for re-sending (``sluice deadletter resend``).
* End-to-end receipts (a sink whose ``receipts`` is not None, readings only): the stream moves the
  *sent* position and bounds batches by the receipt window; see gateway/sinks/receipts.py.
* Watchdog: the engine reports to its :class:`gateway.watchdog.Loop` — idle (nothing to send), busy
  (a batch on its way; progress at every delivered or failed batch), waiting on the sink's
  connection (no deadline: the sink reconnects by itself), on receipts (until the next re-send) or
  on a pause after a storage error (until it retries).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from gateway.backoff import Backoff
from gateway.sinks.base import Result, Sink, SinkUnavailable
from gateway.sinks.receipts import RECEIPTS
from gateway.watchdog import Loop

__all__ = ["Batching", "Delivery", "DeliveryStats", "Letter", "Packed", "Stream", "isolate_refused"]

log = logging.getLogger(__name__)

RECHECK_INTERVAL = 5.0
"""Seconds between looks at the stream when nobody calls notify() (a lost wake-up costs at most this)."""
RESEND_CHECK_INTERVAL = 2.0
"""Seconds between looks for dead letters an operator marked for re-sending (another process marks them)."""
ERROR_PAUSE = 5.0
"""Seconds to wait after a storage error or an unexpected failure before trying again."""
RETRY_PAUSE = (0.05, 0.2)
"""The pause after a failed batch, beyond the sink's own wait: from 50 ms, doubling to 0.2 s while it fails."""
SPLIT_REQUESTS = 64
"""Most requests spent finding the refused items of one refused sink item; then what is still
refused goes to the dead letters in parts (a batch of all-bad readings must not cost 2n requests)."""
CONNECTION = "the sink's connection"

I = TypeVar("I")  # noqa: E741 — a stream's item
W = TypeVar("W")  # a sink's item
T = TypeVar("T")

Packed = tuple[list[W], list[Sequence[int]], int]
"""The sink's items for a batch, the stream items (indices) each one carries, and their bytes."""


@dataclass(frozen=True)
class Batching:
    max_items: int
    max_bytes: int
    linger: float = 0.0


@dataclass(frozen=True)
class Letter(Generic[I]):
    """A dead letter marked for re-sending."""

    id: int
    items: Sequence[I]


class Stream(Protocol[I]):
    """One sink's view of an item stream: fetch after its position, acknowledge, dead-letter."""

    errors: tuple[type[Exception], ...]
    """What the stream's storage raises (the engine pauses and retries, logging once)."""

    def start(self) -> None:
        """Once, before the first fetch of a run."""
        ...

    def fetch(self, most: int, max_bytes: int) -> list[I]:
        """The oldest items the sink has not taken (at least one if any, however large)."""
        ...

    def seq(self, item: I) -> int: ...

    def time_ns(self, item: I) -> int:
        """When the item came into being (a part-full batch lingers from the oldest's time)."""
        ...

    def ack(self, items: Sequence[I]) -> int:
        """The sink took ``items`` (the oldest fetched): move the position past them. Returns how
        many count as delivered now (0 when receipts must confirm them first)."""
        ...

    def dead_letter(self, refused: Sequence[tuple[list[I], str]], batch: Sequence[I]) -> int:
        """The far end refused ``refused`` (parts of ``batch``, each with its reason) as data: store
        them as dead letters and move the position past ``batch``, in one transaction; log it.
        Returns how many items were dead-lettered."""
        ...

    def hold(self) -> float | None:
        """Seconds to wait before the next batch (a full receipt window), or None."""
        ...

    def due(self) -> float | None:
        """Loop time of the next re-send to wake for while nothing is pending (receipts), or None."""
        ...

    def tags(self, items: Sequence[I], parts: int) -> Sequence[bytes] | None:
        """One id per sink item when the sink confirms end to end (receipts), else None."""
        ...

    def next_letter(self) -> Letter[I] | None:
        """The oldest dead letter marked for re-sending, or None."""
        ...

    def letter_done(self, letter: Letter[I], refused: str | None) -> None:
        """The re-sent ``letter`` was delivered (``refused`` None) or refused again; log it."""
        ...


@dataclass
class DeliveryStats:
    delivered: int = 0  # items acknowledged to the stream
    messages: int = 0  # sink items the sink confirmed
    bytes: int = 0  # payload bytes the sink confirmed
    batches: int = 0
    retries: int = 0  # batches that failed and will be sent again
    dead_lettered: int = 0  # items the far end refused as data, moved to the dead letters
    resent: int = 0  # items from dead letters delivered after all
    last_delivery_ns: int | None = None  # wall-clock time of the last acknowledged batch
    receipts: int = 0  # end_to_end: batch ids confirmed by receipts
    receipt_timeouts: int = 0  # end_to_end: times unconfirmed readings were published again
    receipt_resent: int = 0  # end_to_end: readings published again after a receipt timeout
    receipts_refused: int = 0  # end_to_end with receipt_secret: receipts without a valid mac, ignored


async def isolate_refused(items: Sequence[T], message: str, send: Callable[[Sequence[T]], Awaitable[str | None]],
                          budget: int = SPLIT_REQUESTS) -> list[tuple[list[T], str]]:
    """``items`` were refused as data together (the far end said ``message``): send them again in
    halves (first half first) until every refused part is a single item; after ``budget`` requests
    a refused part is not split further. ``send`` returns None when the part was taken, else the
    far end's reason. Returns the refused parts, in order, each with its reason; the rest was
    written. Raises what ``send`` raises (:class:`SinkUnavailable`: the caller sends the whole
    batch again later, which is harmless)."""
    refused: list[tuple[list[T], str]] = []
    stack: list[tuple[list[T], str | None]] = [(list(items), message)]  # None: not sent yet
    while stack:
        part, answer = stack.pop()
        if answer is None:
            budget -= 1
            answer = await send(part)
            if answer is None:
                continue
        if len(part) == 1 or budget <= 0:
            refused.append((part, answer))
        else:
            half = len(part) // 2
            stack += [(part[half:], None), (part[:half], None)]
    return refused


class Delivery(Generic[I, W]):
    """Moves one sink's items from a stream to the sink. See the module docstring."""

    def __init__(self, name: str, stream: Stream[I], sink: Sink[W], pack: Callable[[Sequence[I]], Packed[W]],
                 batching: Batching, loop: Loop | None = None, *, what: str = "readings",
                 recheck: float | None = None, caught_up: Callable[[], Awaitable[None]] | None = None,
                 failure_level: int = logging.DEBUG) -> None:
        self.name = name
        self.loop = loop if loop is not None else Loop(f"forward[{name}]")
        """What this delivery reports to the watchdog (see the module docstring)."""
        self.stream = stream
        self.sink = sink
        self.stats = DeliveryStats()
        self._pack = pack
        self._batching = batching
        self._what = what  # "readings", "events": for log lines
        self._recheck = recheck
        self._caught_up = caught_up  # called whenever the stream has nothing more (trace: a signed head)
        self._failure_level = failure_level  # how a failed batch is logged (once per failing spell)
        self._wake = asyncio.Event()
        self._resend_check_at = 0.0  # loop time of the next look for dead letters to re-send
        self._pause = Backoff(*RETRY_PAUSE)
        self._failing = False  # a storage error or an unexpected failure, logged once
        self._down: str | None = None  # the sink failed; logged once at failure_level

    def notify(self) -> None:
        """New items were committed to the stream. Never blocks."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver forever; cancel to stop (an unacknowledged batch stays in the stream)."""
        loop, sink, stream = self.loop, self.sink, self.stream
        stream.start()
        while True:
            try:
                if not sink.connected:
                    loop.waiting(CONNECTION, None)  # the sink reconnects by itself
                    await sink.wait_connected()
                if not await self._resend_letter():
                    continue
                hold = stream.hold()
                if hold is not None:
                    self._wake.clear()
                    await self._wait_wake(hold)
                    continue
                items = await self._next_batch()
                if not items:
                    continue
                loop.busy()
                await self._deliver(items)
                if self._failing:
                    log.info("sink %s: delivering again", self.name)
                    self._failing = False
            except stream.errors as exc:
                await self._error(f"storage error: {exc} — retrying every {ERROR_PAUSE:.0f} s; check the disk",
                                  "a retry after an outbox error")
            except Exception:
                # A bug must not stop delivery for good: log it with the traceback, retry later.
                await self._error(None, "a retry after an unexpected failure")

    async def flush(self) -> None:
        """Deliver what the stream holds now, batch after batch, without waiting; stop at the first
        failure (its items stay for later)."""
        if self.stream.hold() is not None:
            return
        while items := self.stream.fetch(self._batching.max_items, self._batching.max_bytes):
            if not await self._deliver(items, wait=False):
                return
        if self._caught_up is not None:
            await self._caught_up()

    async def _error(self, text: str | None, waiting: str) -> None:
        if not self._failing:
            if text is None:
                log.exception("sink %s: unexpected failure while forwarding — retrying every %.0f s",
                              self.name, ERROR_PAUSE)
            else:
                log.error("sink %s: %s", self.name, text)
            self._failing = True
        self.stats.retries += 1
        self.loop.waiting(waiting, asyncio.get_running_loop().time() + ERROR_PAUSE)
        await asyncio.sleep(ERROR_PAUSE)

    async def _send(self, items: Sequence[I], wire: list[W]) -> Result:
        receipts = self.sink.receipts
        tags = self.stream.tags(items, len(wire)) if receipts is not None else None
        if receipts is not None and tags is not None:
            return await receipts.send_tagged(wire, tags)  # type: ignore[arg-type]  # receipts: readings only
        return await self.sink.send(wire)

    async def _deliver(self, items: list[I], wait: bool = True) -> bool:
        """Send one batch and settle it with the stream. False when (some of) it must go again."""
        stats, stream, loop = self.stats, self.stream, self.loop
        wire, covers, size = self._pack(items)
        try:
            result = await self._send(items, wire) if wire else Result(())
        except SinkUnavailable as exc:
            await self._unavailable(len(items), exc, wait)
            return False
        loop.progress()
        n = len(items)
        # Per stream item: None = taken, "" = not delivered, text = refused with that reason.
        state: list[str | None] = [None] * n
        for cover in covers:
            for i in cover:
                state[i] = ""
        for j in result.accepted:
            for i in covers[j]:
                state[i] = None
        refused = result.reasons()
        groups: list[tuple[list[I], str]] = []
        for j, reason in refused.items():
            for i in covers[j]:
                state[i] = reason or "refused"
        done = next((i for i, s in enumerate(state) if s == ""), n)
        for j, reason in refused.items():
            inside = [items[i] for i in covers[j] if i < done]
            if inside:
                groups.append((inside, reason or "refused"))
        batch = items[:done]
        if groups:
            if not await self._reject(batch, groups, wait):
                return False
        elif batch:
            delivered = stream.ack(batch)
            stats.messages += len(wire)
            stats.bytes += size
            stats.batches += 1
            if delivered:
                stats.delivered += delivered
                stats.last_delivery_ns = time.time_ns()
        if done < n:
            await self._unavailable(n - done, SinkUnavailable(result.unavailable or "not every item was delivered"), wait)
            return False
        if self._down is not None:  # said at INFO only where the failure was said at WARNING
            log.log(logging.INFO if self._failure_level >= logging.WARNING else logging.DEBUG,
                    "sink %s: delivering again", self.name)
            self._down = None
        self._pause.reset()
        return True

    async def _reject(self, batch: list[I], groups: list[tuple[list[I], str]], wait: bool) -> bool:
        """Items of ``batch`` were refused as data: find them (:func:`isolate_refused` for a sink
        item that carried several), dead-letter them and move past the batch; the rest was written."""
        async def send(part: Sequence[I]) -> str | None:
            wire, _covers, _size = self._pack(part)
            result = await self.sink.send(wire)
            if result.refused:
                return result.refused[0][1] or "refused"
            if len(result.accepted) < len(wire):
                raise SinkUnavailable(result.unavailable or "not every item was delivered")
            return None

        refused: list[tuple[list[I], str]] = []
        try:
            for group, reason in groups:
                refused += await isolate_refused(group, reason, send) if len(group) > 1 else [(group, reason)]
        except SinkUnavailable as exc:  # the whole batch goes again (and is refused again)
            log.debug("sink %s: lost while isolating refused %s (%s); will resend", self.name, self._what, exc)
            await self._unavailable(len(batch), exc, wait)
            return False
        stats = self.stats
        if not refused:  # every half was taken (a request too large, HTTP 413): all written
            stats.delivered += self.stream.ack(batch)
            stats.last_delivery_ns = time.time_ns()
            log.info("sink %s: a batch of %d %s refused whole (%s) was taken in parts", self.name,
                     len(batch), self._what, "; ".join(reason for _g, reason in groups)[:2000])
            return True
        bad = self.stream.dead_letter(refused, batch)
        stats.dead_lettered += bad
        stats.delivered += len(batch) - bad
        stats.last_delivery_ns = time.time_ns()
        return True

    async def _unavailable(self, count: int, exc: SinkUnavailable, wait: bool) -> None:
        self.stats.retries += 1
        self.loop.progress()
        if self._down is None and not exc.logged:
            log.log(self._failure_level, "sink %s: %d %s not delivered (%s); will resend", self.name, count,
                    self._what, exc)
        self._down = str(exc)
        if not wait:
            return
        self.loop.waiting(CONNECTION, None)
        await self.sink.wait_connected()
        # The sink paces itself (a backoff, a reconnect loop); this only keeps one that cannot
        # (a file) from being retried in a tight loop.
        await asyncio.sleep(self._pause.next())

    async def _resend_letter(self) -> bool:
        """Send the oldest dead letter marked for re-sending, if any. False when the sink is
        unavailable (the caller waits and comes back), True otherwise."""
        now = asyncio.get_running_loop().time()
        if now < self._resend_check_at:
            return True
        letter = self.stream.next_letter()
        if letter is None:
            self._resend_check_at = now + RESEND_CHECK_INTERVAL
            return True
        self.loop.busy()
        wire, _covers, _size = self._pack(letter.items)
        try:
            result = await self.sink.send(wire)
            if not result.refused and len(result.accepted) < len(wire):
                raise SinkUnavailable(result.unavailable or "not every item was delivered")
        except SinkUnavailable:
            self.stats.retries += 1
            self.loop.progress()
            self.loop.waiting(CONNECTION, None)
            await self.sink.wait_connected()
            return False
        self.loop.progress()
        if result.refused:
            self.stream.letter_done(letter, result.refused[0][1] or "refused")
            return True
        self.stream.letter_done(letter, None)
        self.stats.resent += len(letter.items)
        return True

    async def _next_batch(self) -> list[I]:
        """Wait for items, linger for a part-full batch, return the batch (maybe empty)."""
        batching, stream = self._batching, self.stream
        self._wake.clear()  # cleared before the fetch: a commit after it wakes us again
        recheck = self._recheck if self._recheck is not None else RECHECK_INTERVAL
        items = stream.fetch(batching.max_items, batching.max_bytes)
        if not items:
            if self._caught_up is not None:
                await self._caught_up()
            due = stream.due()
            if due is None:
                self.loop.idle()
                await self._wait_wake(recheck)
            else:  # all sent: wake for the next re-send, not up to the recheck interval after it
                self.loop.waiting(RECEIPTS, due)
                await self._wait_wake(min(recheck, max(due - asyncio.get_running_loop().time(), 0.01)))
            return []
        # The first batch of a run goes at once: lingering is for steady state, and an operator
        # watching a new install should see the first value as soon as it is read.
        most = batching.max_items
        if len(items) < most and batching.linger > 0 and self.stats.batches:
            # Linger from the oldest item's time, so a backlog (old items) goes at once.
            age = (time.time_ns() - stream.time_ns(items[0])) / 1e9
            deadline = asyncio.get_running_loop().time() + min(batching.linger - age, batching.linger)
            while len(items) < most:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                self._wake.clear()
                if not await self._wait_wake(remaining):
                    break  # nothing committed meanwhile: send what we have
                more = stream.fetch(most, batching.max_bytes)
                if len(more) == len(items):  # limited by max_bytes: full already
                    items = more
                    break
                items = more
        return items

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
