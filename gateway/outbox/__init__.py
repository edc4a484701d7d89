"""The durable outbox: one SQLite file (WAL) that every reading, and every trace event, is committed
to before any sink sees it.

Its roles, one module each:

* :mod:`~gateway.outbox.schema` — every table of the file, the schema version (``PRAGMA
  user_version``) and the numbered migrations from each older version; the on-disk invariants.
* :mod:`~gateway.outbox.file` — the only way a process connects to the file (counted), vetting and
  moving an unusable file aside before the first connection, :func:`prepare`.
* :mod:`~gateway.outbox.space` — the WAL's bound and whether ``max_bytes`` fits the filesystem.
* :mod:`~gateway.outbox.ledger` — the open file's counters and per-sink positions.
* :mod:`~gateway.outbox.queue` — :class:`Outbox`: append, fetch, ack, sent positions, drop when full.
* :mod:`~gateway.outbox.deadletters` — the one dead-letter store, for readings and trace events.
* :mod:`~gateway.outbox.errors` — :class:`OutboxError` and its messages.
"""

from gateway.outbox.deadletters import DeadLetter
from gateway.outbox.errors import OutboxError
from gateway.outbox.file import prepare
from gateway.outbox.queue import ACK_WRITE_DELAY, ROW_OVERHEAD, Entry, Outbox, OutboxStats

__all__ = ["ACK_WRITE_DELAY", "ROW_OVERHEAD", "DeadLetter", "Entry", "Outbox", "OutboxError", "OutboxStats", "prepare"]
