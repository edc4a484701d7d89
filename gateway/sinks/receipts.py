"""End-to-end receipts (``delivery: end_to_end``): one forwarder's bookkeeping of what it published
and what ``sluice ingest`` confirmed, the batch ids, the receipt MAC, and when to publish again.

The rules (what the delivery relies on, who calls what) are in gateway/sinks/readings.py's module
docstring; this module holds the state. :class:`Receipts` runs on the event loop of its delivery
and is never shared: :meth:`Receipts.on_receipt` is the sink's receipt handler (given to the sink's
``receipts.on_receipt``), and the readings stream calls :meth:`Receipts.restore` once at start,
:meth:`Receipts.check` before each batch, :meth:`Receipts.room` to bound a batch, and
:meth:`Receipts.published` after each PUBACKed one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.backoff import Backoff
from gateway.outbox import Outbox, OutboxError
from gateway.watchdog import Loop

__all__ = ["RECEIPTS", "RESEND_BACKOFF_MAX", "Receipts", "batch_ids", "parse_batch_id", "receipt_mac"]

log = logging.getLogger("gateway.sinks.engine")  # the delivery's lines

RESEND_BACKOFF_MAX = 16
"""The longest pause between two re-sends without a receipt, in ``receipt_timeout``s."""
RECEIPTS = "receipts from sluice ingest"
"""What a delivery with a full window waits on (the watchdog's and /healthz's words)."""

_BATCH_ID = re.compile(r"(\d+)-(\d+):(\d+)/(\d+)")


def batch_ids(first: int, last: int, parts: int) -> list[bytes]:
    """The correlation data of each of the ``parts`` messages of the batch covering seqs first..last."""
    return [f"{first}-{last}:{i}/{parts}".encode() for i in range(1, parts + 1)]


def receipt_mac(key: bytes, topic: str, written: Sequence[str], dead_lettered: Sequence[str]) -> str:
    """The ``mac`` of a receipt (``receipt_secret``): HMAC-SHA256, hex, over the receipt topic and
    the id lists in a fixed serialisation, so a receipt cannot be moved to another gateway's topic.
    Replaying an old receipt confirms nothing new: batch ids are outbox seqs, never reused."""
    text = topic + "\n" + json.dumps({"written": list(written), "dead_lettered": list(dead_lettered)},
                                     separators=(",", ":"))
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def parse_batch_id(text: str) -> tuple[int, int, int, int] | None:
    """(first, last, part, parts) of a batch id, or None if it is not one."""
    m = _BATCH_ID.fullmatch(text)
    if m is None:
        return None
    first, last, part, parts = map(int, m.groups())
    if not (0 < first <= last and 0 < part <= parts):
        return None
    return first, last, part, parts


class ReceiptCounts(Protocol):
    """The counters a :class:`Receipts` moves (the delivery's ``DeliveryStats``)."""

    delivered: int
    last_delivery_ns: int | None
    receipts: int
    receipt_timeouts: int
    receipt_resent: int
    receipts_refused: int


class Receipts:
    """One end_to_end forwarder's receipts: sent batches awaiting receipts, confirmed ranges, the
    re-send backoff (see gateway/sinks/readings.py's module docstring for the rules)."""

    def __init__(self, sink: str, outbox: Outbox, timeout: float, window: int, stats: ReceiptCounts, loop: Loop,
                 wake: Callable[[], None], key: tuple[bytes, str] | None = None) -> None:
        self.sink = sink
        self.timeout = timeout
        self.window = window
        self._outbox = outbox
        self._stats = stats
        self._loop = loop
        self._wake = wake  # the delivery's: acked moved, the window has room again
        self._key = key  # (receipt_secret, receipt topic): receipts without its mac are ignored
        self._refused_logged = 0.0  # monotonic time a refused receipt was last logged
        self.outstanding: deque[tuple[int, int, float]] = deque()  # (first, last, deadline), oldest first
        self.backoff = Backoff(2 * timeout, RESEND_BACKOFF_MAX * timeout)  # failures: re-sends without a receipt
        self.resume_at = 0.0  # loop time before which no re-send happens (the backoff)
        self._republish_to = 0  # sent position at the last rewind: below it the previous copy is still going out
        self.parts: dict[tuple[int, int], set[int]] = {}  # incomplete ranges: parts received
        self.confirmed: dict[int, int] = {}  # complete ranges not yet joined to acked: first -> last

    # -- receipts in -----------------------------------------------------------------------------

    def on_receipt(self, payload: bytes) -> None:
        """A receipt from ``sluice ingest``. Never raises on bad input."""
        try:
            doc = json.loads(payload)
            ids = [*doc.get("written", ()), *doc.get("dead_lettered", ())]
        except (ValueError, AttributeError, TypeError):
            log.warning("sink %s: ignoring a receipt that is not JSON with written/dead_lettered lists: %.200r",
                        self.sink, payload)
            return
        if self._key is not None and not self._authentic(doc):
            return
        if doc.get("dead_lettered"):
            log.warning("sink %s: ingest dead-lettered messages of batches %s — see its dead-letter topic",
                        self.sink, ", ".join(map(str, doc["dead_lettered"]))[:400])
        acked = self._acked()
        for text in ids:
            parsed = parse_batch_id(str(text))
            if parsed is None:
                continue
            first, last, part, parts = parsed
            if last <= acked:
                continue
            key = (first, last)
            got = self.parts.setdefault(key, set())
            got.add(part)
            if len(got) >= parts:
                del self.parts[key]
                self.confirmed[first] = max(last, self.confirmed.get(first, 0))
                self._stats.receipts += 1
        self._advance()

    def _authentic(self, doc: dict[str, object]) -> bool:
        """The receipt carries the mac of ``receipt_secret``; else it is counted, logged (at most once
        a minute) and ignored — a forged receipt must never delete readings."""
        assert self._key is not None
        key, topic = self._key
        mac = doc.get("mac")
        try:
            expected = receipt_mac(key, topic, doc.get("written", []), doc.get("dead_lettered", []))  # type: ignore[arg-type]
        except TypeError:
            expected = ""
        if isinstance(mac, str) and expected and hmac.compare_digest(mac, expected):
            return True
        self._stats.receipts_refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 60.0:
            self._refused_logged = now
            log.warning("sink %s: ignored a receipt on %s %s (%d so far) — set the same receipt_secret in "
                        "ingest.yaml, and restrict with broker ACLs who may publish there", self.sink, topic,
                        "without a mac" if mac is None else "with a wrong mac", self._stats.receipts_refused)
        return False

    def _acked(self) -> int:
        return self._outbox.position(self.sink)

    def _advance(self) -> None:
        """Move ``acked`` over confirmed ranges that join it."""
        start = pos = self._acked()
        moved = True
        while moved:
            moved = False
            for first, last in list(self.confirmed.items()):
                if last <= pos:
                    del self.confirmed[first]
                elif first <= pos + 1:
                    pos = last
                    del self.confirmed[first]
                    moved = True
        if pos <= start:
            return
        pos = min(pos, self._outbox.last_seq)
        try:
            self._outbox.ack(self.sink, pos)
        except OutboxError as exc:  # the receipt is lost; the readings are published again later
            log.error("sink %s: outbox error while recording a receipt: %s", self.sink, exc)
            return
        for key in [k for k in self.parts if k[1] <= pos]:
            del self.parts[key]
        while self.outstanding and self.outstanding[0][1] <= pos:
            self.outstanding.popleft()
        now = asyncio.get_running_loop().time()
        if self.outstanding:  # the far end works through what we sent, in order: give the next its time
            first, last, deadline = self.outstanding[0]
            self.outstanding[0] = (first, last, max(deadline, now + self.timeout))
        if self.backoff.failures:
            log.info("sink %s: receipts again after %d re-send%s", self.sink, self.backoff.failures,
                     "s" if self.backoff.failures != 1 else "")
            self.backoff.reset()
            self.resume_at = 0.0
            try:
                self._outbox.clear_resend(self.sink)
            except OutboxError as exc:  # a restart then backs off once more than needed: harmless
                log.error("sink %s: %s", self.sink, exc)
        self._stats.delivered += pos - start
        self._stats.last_delivery_ns = time.time_ns()
        self._wake()

    # -- the delivery's side ----------------------------------------------------------------------

    def due(self) -> float | None:
        """Loop time of the next re-send (the oldest outstanding batch's deadline, or the backoff's if
        later); None when nothing awaits a receipt."""
        if not self.outstanding:
            return None
        return max(self.outstanding[0][2], self.resume_at)

    def room(self) -> int:
        """Readings that may still be published before the window is full (at least 1)."""
        return max(1, self.window - (self._outbox.sent(self.sink) - self._acked()))

    def check(self) -> float | None:
        """Re-send when due; returns seconds to wait when the window is full, else None."""
        now = asyncio.get_running_loop().time()
        due = self.due()
        # Never a new copy while the previous one is still being handed to the broker (a slow link
        # and a big window could otherwise restart the re-send from acked for ever).
        if due is not None and due <= now and self._outbox.sent(self.sink) >= self._republish_to:
            first, last, _deadline = self.outstanding[0]
            self._resend(f"no receipt for readings seq {first}–{last} within {self.timeout:g} s")
            self._stats.receipt_timeouts += 1
            return None
        if due is not None and self._outbox.sent(self.sink) - self._acked() >= self.window:
            self._loop.waiting(RECEIPTS, due)
            return max(due - now, 0.01)
        return None

    def published(self, first: int, last: int) -> None:
        """The broker acknowledged the batch first..last: its readings await a receipt."""
        self._outbox.mark_sent(self.sink, last)
        if self._acked() < last:
            self.outstanding.append((first, last, max(asyncio.get_running_loop().time() + self.timeout,
                                                      self.resume_at)))

    def _resend(self, why: str) -> None:
        """Publish every unconfirmed reading again from ``acked``, and back off the next re-send
        (kept in the outbox with the rewind, so a restart keeps it)."""
        sent, acked = self._outbox.sent(self.sink), self._acked()
        delay = self.backoff.next()
        self._republish_to = sent
        self._outbox.rewind_sent(self.sink, (time.time_ns() + int(delay * 1e9), self.backoff.failures))
        self.resume_at = asyncio.get_running_loop().time() + delay
        self.outstanding.clear()
        self._stats.receipt_resent += sent - acked
        if self.backoff.failures == 1:
            log.warning("sink %s: %s — publishing the %d readings not yet confirmed again; while no receipt "
                        "comes, again after %.0f s, then less and less often (at most every %.0f s) — is "
                        "`sluice ingest` running and writing?", self.sink, why, sent - acked, delay,
                        self.backoff.maximum)
        else:
            log.info("sink %s: %s — publishing the %d readings not yet confirmed again (re-send %d; next in %.0f s)",
                     self.sink, why, sent - acked, self.backoff.failures, delay)

    def restore(self) -> None:
        """At start: readings sent before the restart still await receipts. With a re-send backoff
        recorded, keep it; else publish them again now."""
        sent, acked = self._outbox.sent(self.sink), self._acked()
        recorded = self._outbox.resend_due(self.sink)
        wait, attempt = 0.0, 0
        if recorded is not None:  # also when stopped mid-re-send (sent back at acked): the backoff holds
            due_ns, attempt = recorded
            self.backoff.failures = attempt
            wait = min(max((due_ns - time.time_ns()) / 1e9, 0.0), self.backoff.maximum)  # a clock jump bounds nothing
            self.resume_at = asyncio.get_running_loop().time() + wait
        if sent <= acked:
            return
        if recorded is None:
            self._resend(f"{sent - acked} readings sent before the restart have no receipt yet")
            return
        self.outstanding.append((acked + 1, sent, self.resume_at))
        log.info("sink %s: %d readings sent before the restart await receipts after %d re-send%s; the next "
                 "re-send is due in %.0f s", self.sink, sent - acked, attempt, "s" if attempt != 1 else "", wait)
