"""The trace events stream: one trace sink's view of the feed's sealed events in the outbox
(``trace_events``, positions in ``trace_sinks``; gateway/trace/journal.py) for the delivery engine.

An event the far end refuses as a document becomes a dead letter (the journal's dead-letter write,
which moves the sink's position past it in the same transaction; ``sluice trace deadletters`` lists
them) and the feed goes on with the next one. Trace events never leave the outbox (they are the
evidence record) and carry no end-to-end receipts; dead letters are not re-sent.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence

from gateway.sinks.base import Event
from gateway.sinks.engine import Batching, Letter, Packed
from gateway.trace.journal import Journal

__all__ = ["BATCHING", "EventStream", "pack_events"]

log = logging.getLogger("gateway.trace.service")  # the feed's lines, as before the engine

BATCHING = Batching(max_items=100, max_bytes=2**62)
"""Events per batch (MQTT keeps up to ``max_inflight`` in flight; EPCIS posts one by one)."""


def pack_events(events: Sequence[Event]) -> Packed[Event]:
    """Trace sinks take the events themselves: one signed document each."""
    return list(events), [range(i, i + 1) for i in range(len(events))], sum(len(line) for _seq, line in events)


class EventStream:
    """One trace sink's sealed events (see the module docstring)."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, sink: str, journal: Journal) -> None:
        self.sink = sink
        self.journal = journal

    def start(self) -> None:
        return None

    def fetch(self, most: int, max_bytes: int) -> list[Event]:
        return self.journal.fetch(self.sink, limit=most)

    def seq(self, item: Event) -> int:
        return item[0]

    def time_ns(self, item: Event) -> int:
        return 0  # never lingered for (a batch goes as it is)

    def ack(self, items: Sequence[Event]) -> int:
        self.journal.ack(self.sink, items[-1][0])
        return len(items)

    def dead_letter(self, refused: Sequence[tuple[list[Event], str]], batch: Sequence[Event]) -> int:
        count = 0
        for part, reason in refused:
            for seq, _line in part:
                log.error("trace sink %s: event %d was refused as a document: %s — recorded as a dead letter in %s "
                          "(`sluice trace deadletters`); delivering the events after it", self.sink, seq, reason,
                          self.journal.path)
                self.journal.dead_letter(self.sink, seq, reason)
                count += 1
        self.journal.ack(self.sink, batch[-1][0])
        return count

    def hold(self) -> float | None:
        return None

    def due(self) -> float | None:
        return None

    def tags(self, items: Sequence[Event], parts: int) -> None:
        return None

    def next_letter(self) -> Letter[Event] | None:
        return None

    def letter_done(self, letter: Letter[Event], refused: str | None) -> None:
        return None
