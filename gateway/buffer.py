"""The durable outbox: every reading is committed here before any sink sees it.

CONTRACT (implementation in progress — the signatures below are fixed; other modules code to them)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.reading import Reading


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored reading and its sequence number (strictly increasing, never reused in one file)."""

    seq: int
    reading: Reading


@dataclass(frozen=True, slots=True)
class OutboxStats:
    rows: int
    bytes: int
    oldest_ns: int | None  # time_ns of the oldest stored reading
    dropped: int  # readings dropped by the when_full policy since the file was created (persisted)
    pending: dict[str, int]  # per sink: rows not yet acknowledged by it


class Outbox:
    """SQLite (WAL) outbox. Synchronous methods, called from the event loop; no I/O in __init__.

    Use as ``with Outbox(...) as outbox:``. One writer process per file.
    """

    def __init__(self, path: Path, sinks: Sequence[str], *, max_bytes: int = 256 * 1024**2,
                 when_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest",
                 synchronous: Literal["full", "normal"] = "full") -> None:
        raise NotImplementedError

    def __enter__(self) -> Outbox:
        raise NotImplementedError

    def __exit__(self, *exc: object) -> None:
        raise NotImplementedError

    def append(self, readings: Sequence[Reading]) -> int:
        """Commit ``readings`` in ONE transaction; returns how many were stored."""
        raise NotImplementedError

    def fetch(self, sink: str, max_rows: int, max_bytes: int) -> list[Entry]:
        """The oldest entries not yet acknowledged by ``sink``, in seq order (at least one if any)."""
        raise NotImplementedError

    def ack(self, sink: str, upto_seq: int) -> None:
        """``sink`` has delivered every entry with seq <= upto_seq; rows every sink has are deleted."""
        raise NotImplementedError

    def stats(self) -> OutboxStats:
        raise NotImplementedError
