"""The one dead-letter store of an outbox file: what a sink's far end refused as data, for readings
and for trace events (table ``dead_letters``; its invariants are in ``gateway/outbox/schema.py``).

Every function takes an open connection to the file. :func:`insert` and :func:`trim` run inside the
caller's transaction, because a letter is written in the same transaction that moves its sink's
position past what it holds (``Outbox.reject`` for readings, ``Journal.dead_letter`` for trace
events); the others are one transaction each. Another process (``sluice deadletter``, ``sluice
outbox salvage``) gets its connection from :func:`open_for_dead_letters`.

Readings letters may be re-sent: ``sluice deadletter resend`` marks them (:func:`mark_resend`), the
sink's forwarder takes them (:func:`next_resend`) before its next batch and deletes a delivered one
(:func:`resolve`) or unmarks it (:func:`refused_again`). A trace letter names an event that stays in
the journal and is never re-sent: marking skips it (a CLI says so).
"""

from __future__ import annotations

import logging
import marshal
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.outbox.errors import OutboxError, describe
from gateway.outbox.file import connect
from gateway.outbox.schema import APPLICATION_ID, migrate
from gateway.reading import Reading

__all__ = ["READINGS", "STREAMS", "TRACE", "DeadLetter", "Stream", "count", "encode_letter", "insert",
           "letter_bytes", "letter_line", "list_dead_letters", "mark_resend", "next_resend", "open_for_dead_letters",
           "plain_fields", "refused_again", "resolve", "storable", "trim"]

log = logging.getLogger(__name__)

Stream = Literal["readings", "trace"]
READINGS: Stream = "readings"
TRACE: Stream = "trace"
STREAMS: tuple[Stream, ...] = (READINGS, TRACE)

MARSHAL_VERSION = 4
_COLUMNS = "id, sink, time_ns, count, message, resend, attempts, stream, seq"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What a sink's far end refused as data, with the far end's message."""

    id: int
    sink: str
    time_ns: int  # when it was (last) refused, UTC ns
    count: int  # readings in it (1 for a trace event)
    message: str  # the far end's answer
    resend: bool  # marked for re-sending (readings only)
    attempts: int  # times the far end refused it
    readings: tuple[Reading, ...] = ()  # empty unless asked for (and for a trace event)
    stream: Stream = READINGS
    seq: int | None = None  # trace: the event's seq in trace_events
    event: str | None = None  # trace, when asked for: the event's line as sinks receive it


def plain_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with subclasses (IntEnum, numpy float64 ...) turned into plain float/int/bool/str."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        for kind in (bool, int, float, str):
            if isinstance(value, kind):
                out[str(name)] = kind(value)
                break
        else:
            raise TypeError(f"field {name!r}: {type(value).__name__} is not float, int, bool or str")
    return out


def _reading_row(r: Reading) -> list[Any]:
    fields = r.fields
    try:
        marshal.dumps(fields, MARSHAL_VERSION)
    except ValueError:
        fields = plain_fields(fields)
    return [r.device, r.measurement, dict(r.tags), int(r.time_ns), str(r.quality), fields]


def encode_letter(readings: Sequence[Reading]) -> bytes:
    """The ``readings`` blob of a readings letter."""
    return marshal.dumps([_reading_row(r) for r in readings], MARSHAL_VERSION)


def storable(message: str) -> str:
    """``message`` as SQLite can store it: a lone surrogate (text decoded with ``surrogateescape``)
    becomes a backslash escape instead of raising ``UnicodeEncodeError`` mid-transaction."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def insert(conn: sqlite3.Connection, stream: Stream, sink: str, message: str, *, blob: bytes = b"", count: int = 1,
           seq: int | None = None, time_ns: int | None = None, resend: bool = False, attempts: int = 1) -> int:
    """Inside the caller's transaction: store a letter; returns its id. ``message`` must be
    :func:`storable` already (an encoding error would leave the transaction half done)."""
    (letter,) = conn.execute(
        "INSERT INTO dead_letters (stream, sink, time_ns, count, readings, message, resend, attempts, seq) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (stream, sink, time.time_ns() if time_ns is None else time_ns, count, blob, message, int(resend), attempts,
         seq)).fetchone()
    return int(letter)


def letter_bytes(conn: sqlite3.Connection) -> int:
    """The bytes of readings the letters hold (what ``dead_letter_max_bytes`` bounds)."""
    return int(conn.execute("SELECT coalesce(sum(length(readings)), 0) FROM dead_letters "
                            "WHERE stream='readings'").fetchone()[0])


def trim(conn: sqlite3.Connection, cap: int, keep: int, path: Path) -> int:
    """Inside the caller's transaction: delete the oldest readings letters (never ``keep``) while
    their readings exceed ``cap`` bytes, with a WARNING each; returns how many went."""
    total = letter_bytes(conn)
    if total <= cap:
        return 0
    gone = []
    for letter, size, n, sink in conn.execute(
            "SELECT id, length(readings), count, sink FROM dead_letters WHERE stream='readings' AND id != ? "
            "ORDER BY id", (keep,)):
        if total <= cap:
            break
        total -= size
        gone.append((letter, n, sink))
    conn.executemany("DELETE FROM dead_letters WHERE id=?", [(g[0],) for g in gone])
    for letter, n, sink in gone:
        log.warning("outbox %s: dead letters exceed %d bytes: deleted letter %d (%d readings refused by "
                    "sink %s) — resend or inspect dead letters sooner (`sluice deadletter list`)",
                    path, cap, letter, n, sink)
    return len(gone)


def count(conn: sqlite3.Connection, stream: Stream) -> dict[str, int]:
    """sink -> letters of ``stream``."""
    return {str(sink): int(n) for sink, n in conn.execute(
        "SELECT sink, count(*) FROM dead_letters WHERE stream=? GROUP BY sink", (stream,))}


def _letter(row: Sequence[Any], with_readings: bool) -> DeadLetter:
    readings: tuple[Reading, ...] = ()
    event = None
    if with_readings:
        if row[7] == READINGS:
            readings = tuple(Reading(d, t, f, tags, q, m) for d, m, tags, t, q, f in marshal.loads(row[9]))
        else:
            event = row[10]
    return DeadLetter(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], readings, row[7], row[8], event)


def list_dead_letters(conn: sqlite3.Connection, sink: str | None = None, *, with_readings: bool = False,
                      stream: Stream | None = None) -> list[DeadLetter]:
    """Every letter (of ``stream`` and ``sink``, if given), oldest first; ``with_readings`` also
    decodes a readings letter's readings and reads a trace letter's event."""
    columns = _COLUMNS + (", readings, (SELECT line FROM trace_events e WHERE e.seq = d.seq)" if with_readings else "")
    where, args = [], []
    for column, value in (("stream", stream), ("sink", sink)):
        if value is not None:
            where.append(f"{column}=?")
            args.append(value)
    sql = f"SELECT {columns} FROM dead_letters d {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY id"
    return [_letter(row, with_readings) for row in conn.execute(sql, args)]


def next_resend(conn: sqlite3.Connection, sink: str) -> DeadLetter | None:
    """The oldest readings letter of ``sink`` marked for re-sending, with its readings, or None."""
    row = conn.execute(f"SELECT {_COLUMNS}, readings, NULL FROM dead_letters WHERE stream='readings' AND sink=? "
                       "AND resend=1 ORDER BY id LIMIT 1", (sink,)).fetchone()
    return None if row is None else _letter(row, True)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def resolve(conn: sqlite3.Connection, letter_id: int) -> None:
    """The letter was delivered after all: delete it (one transaction)."""
    with _transaction(conn):
        conn.execute("DELETE FROM dead_letters WHERE id=?", (letter_id,))


def refused_again(conn: sqlite3.Connection, letter_id: int, message: str) -> None:
    """A re-sent letter was refused again: unmark it, keep the new message, count the attempt."""
    with _transaction(conn):
        conn.execute("UPDATE dead_letters SET resend=0, attempts=attempts+1, message=?, time_ns=? WHERE id=?",
                     (storable(message), time.time_ns(), letter_id))


def mark_resend(conn: sqlite3.Connection, ids: Sequence[int] | None = None, sink: str | None = None) -> int:
    """Mark readings letters for re-sending (``ids``, or every letter of ``sink``, or every letter);
    one transaction; returns how many. Trace letters are never marked (their events stay in the
    journal and are not re-sent)."""
    readings = "UPDATE dead_letters SET resend=1 WHERE stream='readings'"
    with _transaction(conn):
        if ids is not None:
            return sum(conn.execute(f"{readings} AND id=?", (i,)).rowcount for i in ids)
        if sink is not None:
            return conn.execute(f"{readings} AND sink=?", (sink,)).rowcount
        return conn.execute(readings).rowcount


def letter_line(d: DeadLetter) -> str:
    """One letter as ``sluice deadletter list`` and ``sluice trace deadletters`` print it."""
    when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(d.time_ns / 1e9))
    if d.stream == TRACE:
        return f"{d.id:>6}  {d.sink:<12} {when}  event seq {d.seq} refused: {d.message}"
    mark = " (marked for re-sending)" if d.resend else ""
    return f"{d.id:>6}  {d.sink:<12} {when}  {d.count} readings, refused {d.attempts}×{mark}: {d.message}"


def open_for_dead_letters(path: Path) -> sqlite3.Connection:
    """A plain connection to an existing outbox for listing and marking dead letters from another
    process (``sluice deadletter``, ``sluice outbox salvage``) while the gateway may be running; an
    older file is migrated first (``gateway/outbox/schema.py``). Raises :class:`OutboxError` if the
    file is missing or not an outbox."""
    if not Path(path).exists():
        raise OutboxError(f"outbox {path} does not exist — check buffer.path, or the gateway never ran")
    try:
        conn = connect(path, must_exist=True, timeout=10.0)
        try:
            if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                raise OutboxError(f"{path} is not a Sluice outbox")
            migrate(conn)
        except BaseException:
            conn.close()
            raise
    except sqlite3.Error as exc:
        raise OutboxError(describe(Path(path), "opening for dead letters", exc)) from exc
    return conn
