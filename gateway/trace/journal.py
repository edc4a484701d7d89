"""The trace engine's journal: its tables in the gateway's durable outbox (``buffer.path``, SQLite
WAL), beside the readings; shared with the ``sluice lot`` CLI.

Trace events go into the same outbox file as readings, under the same rules: committed (FULL
fsync) before any sink sees them, delivered per sink in order from a persisted position that moves
only after the far end acknowledged, sent again after any failure, and kept through power cuts,
crashes and outages. The outbox's open-time integrity check covers them, and a file moved aside as
unusable takes them with it (see ``gateway/outbox/``). What differs from readings: events are
never deleted (they are the local evidence record; ``buffer.max_bytes`` and ``when_full`` bound
readings only), and this module keeps its own connection (``synchronous=FULL`` whatever
``buffer.synchronous`` says) so the chain head is written in the event's own transaction.

On-disk invariants (tables ``trace_*``, created and migrated with the file's schema version in
``gateway/outbox/schema.py``; the readings' tables are never touched here)
-----------------------------------------------------------------------------------------
* ``trace_commands(id, time_ns, kind, lot, location, source, status)``: binding changes queued by the
  CLI (any process may append; ``status`` NULL = pending). Only the engine sets ``status``
  (``done`` or ``refused: <why>``), in the same transaction as the events the command produced.
* ``trace_events(seq, lot, time_ns, line)``: every sealed event, ``seq`` 1, 2, 3 ... with no gap; the
  line is exactly what sinks receive; ``time_ns`` is when it was sealed (0 in older files). Never
  updated or deleted (the local evidence record).
* ``trace_chain``: one row (``seq``, ``head``, ``chain``) = the last event's seq and eventID, written in
  the same transaction as that event, so a crash can never fork the chain; ``chain`` is the chain's
  id (:func:`new_chain_id`), fixed when the table is made, before event 1, and never changed: every
  event and signed head of this outbox names it, so sinks and verifiers can tell this chain from one
  an earlier outbox held (a file moved aside as unusable takes its chain with it; the fresh outbox
  starts a new chain at seq 1). NULL for a chain begun by a Sluice before chain ids: it goes on
  without one.
* ``trace_bindings(lot, location, since_ns, start_ns)``: where each lot is, and the start of its open
  window; rewritten with the events that changed it.
* ``trace_sinks(name, acked)``: sink ``name`` has every event with ``seq <= acked``; it only grows.
  Events go out in seq order and are sent again after any failure (the same rule as the outbox).
* Dead letters: an event a sink's far end refused as a document (an EPCIS repository's 4xx) is a
  letter of stream ``trace`` (its ``seq``) in the outbox's one dead-letter store
  (``gateway/outbox/deadletters.py``; before schema version 3 the table ``trace_dead_letters``).
  Written in the same transaction that moves the sink's position past it, so a refused event never
  blocks the ones after it; the event itself stays in ``trace_events`` (the chain is never cut).
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.outbox import OutboxError, deadletters, prepare
from gateway.outbox.file import connect, identity
from gateway.outbox.space import filesystem_bytes, limit_wal, wal_bound

__all__ = ["Journal", "new_chain_id"]

def new_chain_id(time_ns: int | None = None) -> str:
    """A chain's id: its genesis time (UTC, to the second) and 32 random bits, e.g.
    ``20261202T143500Z-3f9a1c2e`` — unique, sortable, and usable in a file name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime((time.time_ns() if time_ns is None else time_ns) / 1e9))
    return f"{stamp}-{secrets.token_hex(4)}"


class Journal:
    """Open with ``with Journal(path) as j:``; every method is one transaction.

    ``path`` is the outbox file. ``check=True`` (the gateway's own process) vets it as
    :class:`~gateway.outbox.Outbox` does if this process has no connection to it yet (whichever of
    the two opens first vets; ``gateway/outbox/file.py``); a CLI next to a running gateway leaves
    that to the gateway, and checks :meth:`moved` after writing. Raises
    :class:`~gateway.outbox.OutboxError` if the file is not a Sluice outbox or cannot be prepared."""

    def __init__(self, path: Path, *, check: bool = False) -> None:
        self.path = path
        self.check = check
        self._conn: sqlite3.Connection | None = None
        self._ident: tuple[int, int] | None = None

    def __enter__(self) -> Journal:
        for _attempt in range(3):
            prepare(self.path, check=self.check)  # an outbox file of this schema version, in WAL mode (persistent)
            ident = identity(self.path)
            conn = connect(self.path, timeout=10)
            try:
                conn.execute("PRAGMA synchronous=FULL")
                # The WAL is shared and these settings are per connection: bound this one's share too. It does
                # not know max_bytes, so it takes the filesystem's; its transactions are small, and the outbox's
                # own connection checkpoints at its (possibly smaller) threshold with every commit of readings.
                limit_wal(conn, wal_bound(None, filesystem_bytes(Path(self.path).parent)))
                _start_chain(conn)
            except BaseException:
                conn.close()
                raise
            if identity(self.path) == ident:  # the file we opened is the one at the path (see moved())
                self._conn, self._ident = conn, ident
                return self
            conn.close()  # a gateway moved it aside while we opened it: open the new one
        raise OutboxError(f"outbox {self.path} keeps being replaced while it is opened — is a gateway restarting "
                          "in a loop?")

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("journal is not open: use `with Journal(path) as journal:`")
        return self._conn

    def moved(self) -> bool:
        """The file this journal has open is no longer the one at its path: a starting gateway moved
        it aside as unusable (only ever at its start; a moved file never comes back), so what was
        written through this journal is in the old file. A CLI checks this after writing."""
        return identity(self.path) != self._ident

    # -- CLI side --------------------------------------------------------------------------
    def queue(self, kind: str, lot: str, location: str | None, source: str = "cli", time_ns: int | None = None) -> int:
        cur = self.conn.execute("INSERT INTO trace_commands (time_ns, kind, lot, location, source) VALUES (?, ?, ?, ?, ?)",
                                (time_ns or time.time_ns(), kind, lot, location, source))
        return int(cur.lastrowid or 0)

    def command_status(self, command_id: int) -> str | None:
        row = self.conn.execute("SELECT status FROM trace_commands WHERE id=?", (command_id,)).fetchone()
        return row[0] if row else None

    # -- engine side -----------------------------------------------------------------------
    def pending_commands(self) -> list[tuple[int, int, str, str, str | None, str]]:
        return self.conn.execute("SELECT id, time_ns, kind, lot, location, source FROM trace_commands "
                                 "WHERE status IS NULL ORDER BY id").fetchall()

    def chain(self) -> tuple[int, str | None]:
        seq, head = self.conn.execute("SELECT seq, head FROM trace_chain WHERE id=0").fetchone()
        return int(seq), head

    def chain_id(self) -> str | None:
        """This outbox's chain id (None: a chain begun before chain ids, which goes on without one)."""
        chain: str | None = self.conn.execute("SELECT chain FROM trace_chain WHERE id=0").fetchone()[0]
        return chain

    def bindings(self) -> dict[str, tuple[str, int, int]]:
        return {lot: (loc, since, start) for lot, loc, since, start in
                self.conn.execute("SELECT lot, location, since_ns, start_ns FROM trace_bindings")}

    def applied(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT lot FROM trace_applied")}

    def commit(self, sealed: Sequence[tuple[int, str, int, str]], head: tuple[int, str | None],
               bindings: dict[str, tuple[str, int, int]], command: tuple[int, str] | None = None,
               applied: Sequence[str] = ()) -> None:
        """Store sealed events (seq, lot, time_ns, line), the new chain head and bindings at once."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO trace_events VALUES (?, ?, ?, ?)", sealed)
            conn.execute("UPDATE trace_chain SET seq=?, head=? WHERE id=0", head)
            conn.execute("DELETE FROM trace_bindings")
            conn.executemany("INSERT INTO trace_bindings VALUES (?, ?, ?, ?)",
                             [(lot, *b) for lot, b in bindings.items()])
            if command is not None:
                conn.execute("UPDATE trace_commands SET status=? WHERE id=?", (command[1], command[0]))
            conn.executemany("INSERT OR IGNORE INTO trace_applied VALUES (?)", [(a,) for a in applied])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite rolls back by itself on SQLITE_FULL
                conn.execute("ROLLBACK")
            raise

    def position(self, sink: str) -> int:
        self.conn.execute("INSERT OR IGNORE INTO trace_sinks VALUES (?, 0)", (sink,))
        return int(self.conn.execute("SELECT acked FROM trace_sinks WHERE name=?", (sink,)).fetchone()[0])

    def fetch(self, sink: str, limit: int = 200) -> list[tuple[int, str]]:
        return self.conn.execute("SELECT seq, line FROM trace_events WHERE seq > ? ORDER BY seq LIMIT ?",
                                 (self.position(sink), limit)).fetchall()

    def ack(self, sink: str, seq: int) -> None:
        self.conn.execute("UPDATE trace_sinks SET acked=max(acked, ?) WHERE name=?", (seq, sink))

    def dead_letter(self, sink: str, seq: int, message: str) -> None:
        """Record that ``sink`` refused event ``seq`` (a letter of stream ``trace`` in the outbox's one
        dead-letter store) and move its position past it, in one transaction."""
        conn = self.conn
        self.position(sink)
        message = deadletters.storable(message)  # before BEGIN: an error inside would leave the transaction open
        conn.execute("BEGIN IMMEDIATE")
        try:
            deadletters.insert(conn, deadletters.TRACE, sink, message, seq=seq)
            conn.execute("UPDATE trace_sinks SET acked=max(acked, ?) WHERE name=?", (seq, sink))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite rolls back by itself on SQLITE_FULL
                conn.execute("ROLLBACK")
            raise

    def delivery(self, sinks: Sequence[str]) -> dict[str, tuple[int, int]]:
        """sink -> (acked position, dead letters), for the health figures."""
        dead = deadletters.count(self.conn, deadletters.TRACE)
        return {name: (self.position(name), int(dead.get(name, 0))) for name in sinks}

    def last_sealed_ns(self) -> int:
        row = self.conn.execute("SELECT time_ns FROM trace_events ORDER BY seq DESC LIMIT 1").fetchone()
        return int(row[0]) if row else 0

    def dead_letters(self, sink: str | None = None) -> list[tuple[int, str, int, int, str]]:
        """(id, sink, seq, time_ns, message) of the trace letters, oldest first."""
        return [(d.id, d.sink, d.seq or 0, d.time_ns, d.message)
                for d in deadletters.list_dead_letters(self.conn, sink, stream=deadletters.TRACE)]

    def letters(self, sink: str | None = None, *, with_events: bool = False) -> list[deadletters.DeadLetter]:
        """The trace letters as the dead-letter store gives them (``with_events``: each with its event's line)."""
        return deadletters.list_dead_letters(self.conn, sink, with_readings=with_events, stream=deadletters.TRACE)

    def line(self, seq: int) -> str | None:
        row = self.conn.execute("SELECT line FROM trace_events WHERE seq=?", (seq,)).fetchone()
        return row[0] if row else None

    def lot_lines(self, lot: str) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT line FROM trace_events WHERE lot=? ORDER BY seq", (lot,))]

    def all_lines(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT line FROM trace_events ORDER BY seq")]


def _start_chain(conn: sqlite3.Connection) -> None:
    """An empty chain gets its id here, before its first event, in one transaction (any process may
    be first); a chain begun before chain ids (events, no id) goes on without one."""
    if conn.execute("SELECT 1 FROM trace_chain WHERE id=0 AND seq=0 AND chain IS NULL").fetchone() is None:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("UPDATE trace_chain SET chain=? WHERE id=0 AND seq=0 AND chain IS NULL", (new_chain_id(),))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
