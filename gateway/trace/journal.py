"""``trace.db``: the trace engine's SQLite journal (WAL), shared with the ``sluice lot`` CLI.

On-disk invariants
------------------
* ``commands(id, time_ns, kind, lot, location, source, status)``: binding changes queued by the
  CLI (any process may append; ``status`` NULL = pending). Only the engine sets ``status``
  (``done`` or ``refused: <why>``), in the same transaction as the events the command produced.
* ``events(seq, lot, time_ns, line)``: every sealed event, ``seq`` 1, 2, 3 ... with no gap; the
  line is exactly what sinks receive; ``time_ns`` is when it was sealed (0 in older files). Never
  updated or deleted (the local evidence record).
* ``chain``: one row (``seq``, ``head``) = the last event's seq and eventID, written in the same
  transaction as that event, so a crash can never fork the chain.
* ``bindings(lot, location, since_ns, start_ns)``: where each lot is, and the start of its open
  window; rewritten with the events that changed it.
* ``sinks(name, acked)``: sink ``name`` has every event with ``seq <= acked``; it only grows.
  Events go out in seq order and are sent again after any failure (the same rule as the outbox).
* ``dead_letters(id, sink, seq, time_ns, message)``: an event a sink's far end refused as a
  document (an EPCIS repository's 4xx). Written in the same transaction that moves the sink's
  position past it, so a refused event never blocks the ones after it; the event itself stays
  in ``events`` (the chain is never cut).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Journal"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, kind TEXT NOT NULL,
    lot TEXT NOT NULL, location TEXT, source TEXT NOT NULL, status TEXT);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, lot TEXT NOT NULL, time_ns INTEGER NOT NULL, line TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_lot ON events (lot, seq);
CREATE TABLE IF NOT EXISTS chain (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER NOT NULL, head TEXT);
INSERT OR IGNORE INTO chain VALUES (0, 0, NULL);
CREATE TABLE IF NOT EXISTS bindings (lot TEXT PRIMARY KEY, location TEXT NOT NULL, since_ns INTEGER NOT NULL,
    start_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sinks (name TEXT PRIMARY KEY, acked INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS applied (lot TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY, sink TEXT NOT NULL, seq INTEGER NOT NULL,
    time_ns INTEGER NOT NULL, message TEXT NOT NULL);
"""


class Journal:
    """Open with ``with Journal(path) as j:``; every method is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def __enter__(self) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        self._conn = conn
        return self

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("journal is not open: use `with Journal(path) as journal:`")
        return self._conn

    # -- CLI side --------------------------------------------------------------------------
    def queue(self, kind: str, lot: str, location: str | None, source: str = "cli", time_ns: int | None = None) -> int:
        cur = self.conn.execute("INSERT INTO commands (time_ns, kind, lot, location, source) VALUES (?, ?, ?, ?, ?)",
                                (time_ns or time.time_ns(), kind, lot, location, source))
        return int(cur.lastrowid or 0)

    def command_status(self, command_id: int) -> str | None:
        row = self.conn.execute("SELECT status FROM commands WHERE id=?", (command_id,)).fetchone()
        return row[0] if row else None

    # -- engine side -----------------------------------------------------------------------
    def pending_commands(self) -> list[tuple[int, int, str, str, str | None, str]]:
        return self.conn.execute("SELECT id, time_ns, kind, lot, location, source FROM commands "
                                 "WHERE status IS NULL ORDER BY id").fetchall()

    def chain(self) -> tuple[int, str | None]:
        seq, head = self.conn.execute("SELECT seq, head FROM chain WHERE id=0").fetchone()
        return int(seq), head

    def bindings(self) -> dict[str, tuple[str, int, int]]:
        return {lot: (loc, since, start) for lot, loc, since, start in
                self.conn.execute("SELECT lot, location, since_ns, start_ns FROM bindings")}

    def applied(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT lot FROM applied")}

    def commit(self, sealed: Sequence[tuple[int, str, int, str]], head: tuple[int, str | None],
               bindings: dict[str, tuple[str, int, int]], command: tuple[int, str] | None = None,
               applied: Sequence[str] = ()) -> None:
        """Store sealed events (seq, lot, time_ns, line), the new chain head and bindings at once."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", sealed)
            conn.execute("UPDATE chain SET seq=?, head=? WHERE id=0", head)
            conn.execute("DELETE FROM bindings")
            conn.executemany("INSERT INTO bindings VALUES (?, ?, ?, ?)",
                             [(lot, *b) for lot, b in bindings.items()])
            if command is not None:
                conn.execute("UPDATE commands SET status=? WHERE id=?", (command[1], command[0]))
            conn.executemany("INSERT OR IGNORE INTO applied VALUES (?)", [(a,) for a in applied])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def position(self, sink: str) -> int:
        self.conn.execute("INSERT OR IGNORE INTO sinks VALUES (?, 0)", (sink,))
        return int(self.conn.execute("SELECT acked FROM sinks WHERE name=?", (sink,)).fetchone()[0])

    def fetch(self, sink: str, limit: int = 200) -> list[tuple[int, str]]:
        return self.conn.execute("SELECT seq, line FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                 (self.position(sink), limit)).fetchall()

    def ack(self, sink: str, seq: int) -> None:
        self.conn.execute("UPDATE sinks SET acked=max(acked, ?) WHERE name=?", (seq, sink))

    def dead_letter(self, sink: str, seq: int, message: str) -> None:
        """Record that ``sink`` refused event ``seq`` and move its position past it, at once."""
        conn = self.conn
        self.position(sink)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT INTO dead_letters (sink, seq, time_ns, message) VALUES (?, ?, ?, ?)",
                         (sink, seq, time.time_ns(), message))
            conn.execute("UPDATE sinks SET acked=max(acked, ?) WHERE name=?", (seq, sink))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def delivery(self, sinks: Sequence[str]) -> dict[str, tuple[int, int]]:
        """sink -> (acked position, dead letters), for the health figures."""
        dead = dict(self.conn.execute("SELECT sink, count(*) FROM dead_letters GROUP BY sink").fetchall())
        return {name: (self.position(name), int(dead.get(name, 0))) for name in sinks}

    def last_sealed_ns(self) -> int:
        row = self.conn.execute("SELECT time_ns FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return int(row[0]) if row else 0

    def dead_letters(self, sink: str | None = None) -> list[tuple[int, str, int, int, str]]:
        """(id, sink, seq, time_ns, message), oldest first."""
        return self.conn.execute("SELECT id, sink, seq, time_ns, message FROM dead_letters WHERE ? IS NULL OR sink=? "
                                 "ORDER BY id", (sink, sink)).fetchall()

    def line(self, seq: int) -> str | None:
        row = self.conn.execute("SELECT line FROM events WHERE seq=?", (seq,)).fetchone()
        return row[0] if row else None

    def lot_lines(self, lot: str) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT line FROM events WHERE lot=? ORDER BY seq", (lot,))]

    def all_lines(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT line FROM events ORDER BY seq")]
