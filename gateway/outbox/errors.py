"""What goes wrong with the outbox file, said for the log: :class:`OutboxError` and its messages."""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["OutboxError", "describe", "short_of_space"]


class OutboxError(Exception):
    """The outbox file could not be read or written (disk full, I/O error, locked, unreadable).

    Raised by :meth:`~gateway.outbox.queue.Outbox.append`, ``ack``, ``fetch`` and on open. The
    failed transaction was rolled back: nothing of it is stored, and the outbox stays usable —
    the caller may retry later. The message is meant for the log. ``consumed`` (from ``append``
    only): how many leading readings of the batch were handled by the transactions that committed
    before the failure (stored, or dropped by ``when_full`` and counted); the others were not stored.
    """

    def __init__(self, message: str, *, consumed: int = 0) -> None:
        super().__init__(message)
        self.consumed = consumed


def short_of_space(exc: sqlite3.Error) -> bool:
    """A write failed for want of space (or with an I/O error, which a full disk may also give)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR")


def describe(path: Path, what: str, exc: BaseException) -> str:
    """``what`` failed on the outbox at ``path``: the error and what to do about it."""
    name = getattr(exc, "sqlite_errorname", None)
    text = f"outbox {path}: {what} failed: {exc}" + (f" ({name})" if name else "")
    if name == "SQLITE_FULL":
        text += " — free disk space, or lower buffer.max_bytes"
    elif name and name.startswith("SQLITE_IOERR"):
        text += " — check the storage device (SD card/eMMC wear, mount state)"
    elif name == "SQLITE_BUSY":
        text += " — another process has the outbox open; run one gateway per outbox file"
    return text
