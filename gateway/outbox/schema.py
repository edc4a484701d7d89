"""The outbox file's schema: every table of the file, its version, and the numbered steps that bring
an older file to this version.

One SQLite file in WAL mode holds the readings (:mod:`gateway.outbox.queue`), the one dead-letter
store (:mod:`gateway.outbox.deadletters`), the trace journal's ``trace_*`` tables
(``gateway/trace/journal.py``) and what ``sluice outbox salvage`` copied in (``gateway/salvage.py``).
``PRAGMA application_id`` (:data:`APPLICATION_ID`) marks it as a Sluice outbox and ``PRAGMA
user_version`` says which steps of :data:`STEPS` it has had: a file of version ``v`` has had steps
``1 .. v``, a new (or empty) file is version 0. :func:`migrate` runs the missing steps and sets the
version in ONE transaction, in whichever process opens the file first (the gateway, ``sluice lot``,
``sluice deadletter``, ``sluice outbox salvage``): a crash mid-way leaves the file as it was. A file
of a newer version than :data:`SCHEMA_VERSION` is refused (``gateway/outbox/file.py``'s vetting),
never changed: run the Sluice that wrote it.

Versions
--------
1. The readings: ``state``, ``sinks``, ``series``, ``readings`` (the first Sluice outbox).
2. What version-1 files gained without a version change, each created only where missing (so a
   version-1 file with any subset of them is completed): the readings' dead letters, ``sink_sent``,
   ``sink_resend``, the trace journal's tables (``trace_chain.chain`` added where missing: NULL,
   a chain begun before chain ids goes on without one) and the salvage tables.
3. One dead-letter store: ``dead_letters`` gains ``stream`` (``'readings'`` or ``'trace'``) and
   ``seq``; the rows of ``trace_dead_letters`` move into it (new ids, in their order) and that
   table goes.

On-disk invariants
------------------
* ``readings(seq, series, data)``: every stored reading. ``seq`` comes from ``state.last_seq`` (a
  persisted counter written in the same transaction as the rows), so seqs are strictly increasing
  and never reused in one file, even after every row was deleted. ``data`` is ``marshal`` v4 of
  ``[time_ns, quality, fields]`` (``quality``: the canonical flags string of
  :func:`gateway.reading.quality`). ``series`` points into ``series(id, key, last_seq)``, ``key``
  the JSON ``[device, measurement, tags]``; a series row no stored reading uses goes on open. Rows
  leave only from the oldest end, so the stored seqs are one range ``[first, state.last_seq]``.
* ``sinks(name, acked)``: sink ``name`` has every reading with ``seq <= acked``; it never moves back.
  ``sink_sent(name, sent)``: published, awaiting end-to-end receipts (``acked <= sent <=
  last_seq``; may move back to ``acked``). ``sink_resend(name, due_ns, attempt)``: the receipt
  re-send backoff, written with the rewind of ``sent``.
* ``state`` (one row): ``last_seq``, ``rows``, ``bytes`` (sum of ``len(data) + ROW_OVERHEAD``: what
  ``max_bytes`` bounds), ``dropped`` (readings the ``when_full`` policy dropped), written in the same
  transaction as the rows they describe.
* ``dead_letters(id, stream, sink, time_ns, count, readings, message, resend, attempts, seq)``: what
  a sink's far end refused *as data*, never for a link, auth or server problem, with the far end's
  message; ``id`` is ``AUTOINCREMENT`` (an id once printed never names another letter). A letter
  is written in the same transaction that moves its sink's position past what it holds, so a
  refused item is always in exactly one of the two places. ``stream`` says whose:

  - ``'readings'``: ``readings`` is ``marshal`` v4 of ``[[device, measurement, tags, time_ns,
    quality, fields], ...]`` (self-contained), ``count`` how many; ``seq`` NULL. ``resend = 1``
    marks a letter the operator asked to re-send (``sluice deadletter resend``, which only flips
    this flag); the sink's forwarder sends it before its next batch and deletes it once delivered,
    or clears the mark and counts ``attempts`` when it is refused again. Their ``readings`` bytes
    are capped (``dead_letter_max_bytes``, oldest deleted first).
  - ``'trace'``: event ``seq`` of ``trace_events`` a trace sink refused as a document (``readings``
    empty, ``count`` 1). The event itself stays in ``trace_events`` (the chain is never cut); these
    letters are never re-sent, marked or trimmed.

  Reading sinks and trace sinks are named in different files, so ``(stream, sink)`` names a sink.
* ``trace_*`` (the trace journal's invariants are in ``gateway/trace/journal.py``), ``salvage_log``
  and ``trace_salvaged`` (``gateway/salvage.py``) are never counted in ``bytes`` nor dropped by
  ``when_full``: trace events are evidence.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "STEPS", "migrate", "use_wal", "version"]

APPLICATION_ID = 0x536C7563  # "Sluc": marks the file as a Sluice outbox

_V1 = """
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    last_seq INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    dropped INTEGER NOT NULL
);
INSERT OR IGNORE INTO state VALUES (0, 0, 0, 0, 0);
CREATE TABLE IF NOT EXISTS sinks (name TEXT PRIMARY KEY, acked INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS series (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS readings (seq INTEGER PRIMARY KEY, series INTEGER NOT NULL, data BLOB NOT NULL);
"""

_V2 = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sink TEXT NOT NULL,
    time_ns INTEGER NOT NULL,
    count INTEGER NOT NULL,
    readings BLOB NOT NULL,
    message TEXT NOT NULL,
    resend INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS dead_letters_by_sink ON dead_letters (sink, resend, id);
CREATE TABLE IF NOT EXISTS sink_sent (name TEXT PRIMARY KEY, sent INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sink_resend (name TEXT PRIMARY KEY, due_ns INTEGER NOT NULL, attempt INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS trace_commands (id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, kind TEXT NOT NULL,
    lot TEXT NOT NULL, location TEXT, source TEXT NOT NULL, status TEXT);
CREATE TABLE IF NOT EXISTS trace_events (seq INTEGER PRIMARY KEY, lot TEXT NOT NULL, time_ns INTEGER NOT NULL,
    line TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS trace_events_lot ON trace_events (lot, seq);
CREATE TABLE IF NOT EXISTS trace_chain (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER NOT NULL, head TEXT,
    chain TEXT);
INSERT OR IGNORE INTO trace_chain (id, seq, head) VALUES (0, 0, NULL);
CREATE TABLE IF NOT EXISTS trace_bindings (lot TEXT PRIMARY KEY, location TEXT NOT NULL, since_ns INTEGER NOT NULL,
    start_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS trace_sinks (name TEXT PRIMARY KEY, acked INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS trace_applied (lot TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS trace_dead_letters (id INTEGER PRIMARY KEY, sink TEXT NOT NULL, seq INTEGER NOT NULL,
    time_ns INTEGER NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS salvage_log (source TEXT NOT NULL, sink TEXT NOT NULL, first INTEGER NOT NULL,
    last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS trace_salvaged (source TEXT NOT NULL, seq INTEGER NOT NULL, lot TEXT NOT NULL,
    time_ns INTEGER NOT NULL, line TEXT NOT NULL, PRIMARY KEY (source, seq));
"""

_V3 = """
DROP INDEX IF EXISTS dead_letters_by_sink;
CREATE INDEX dead_letters_by_sink ON dead_letters (stream, sink, resend, id);
INSERT INTO dead_letters (stream, sink, time_ns, count, readings, message, seq)
    SELECT 'trace', sink, time_ns, 1, x'', message, seq FROM trace_dead_letters ORDER BY id;
DROP TABLE trace_dead_letters;
"""


def _run(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):  # not executescript: it would COMMIT the caller's transaction
        if statement.strip():
            conn.execute(statement)


def _step_1(conn: sqlite3.Connection) -> None:
    """The readings."""
    _run(conn, _V1)


def _step_2(conn: sqlite3.Connection) -> None:
    """What version-1 files gained without a version change, where missing."""
    _run(conn, _V2)
    if "chain" not in {row[1] for row in conn.execute("PRAGMA table_info(trace_chain)")}:
        conn.execute("ALTER TABLE trace_chain ADD COLUMN chain TEXT")


def _step_3(conn: sqlite3.Connection) -> None:
    """One dead-letter store for readings and trace events."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(dead_letters)")}
    if "stream" not in have:
        conn.execute("ALTER TABLE dead_letters ADD COLUMN stream TEXT NOT NULL DEFAULT 'readings'")
    if "seq" not in have:
        conn.execute("ALTER TABLE dead_letters ADD COLUMN seq INTEGER")
    _run(conn, _V3)


STEPS: tuple[Callable[[sqlite3.Connection], None], ...] = (_step_1, _step_2, _step_3)
"""``STEPS[v]`` takes a file from version ``v`` to ``v + 1``."""
SCHEMA_VERSION = len(STEPS)


def version(conn: sqlite3.Connection) -> int:
    """The file's schema version (0: a new file, or not a Sluice outbox)."""
    if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
        return 0
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


class NotAnOutbox(sqlite3.DatabaseError):
    """The file holds tables but is not a Sluice outbox (another application's SQLite file)."""


class TooNew(sqlite3.DatabaseError):
    """The file was written by a newer Sluice (a schema version this one does not know)."""


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the file to :data:`SCHEMA_VERSION` (a new or empty file gets the whole schema), in one
    transaction; a no-op without a write lock when it is there already. Returns the version the
    file had. Raises :class:`NotAnOutbox`, :class:`TooNew`, or ``sqlite3.Error``."""
    if version(conn) == SCHEMA_VERSION:
        return SCHEMA_VERSION
    conn.execute("BEGIN IMMEDIATE")
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id != APPLICATION_ID and conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
            raise NotAnOutbox(f"not a Sluice outbox (application_id {app_id:#x})")
        was = version(conn)  # again, under the lock: another process may have migrated it meanwhile
        if was > SCHEMA_VERSION:
            raise TooNew(f"outbox schema version {was}, this Sluice reads up to {SCHEMA_VERSION} — "
                         "run the Sluice version that wrote it to deliver its readings first")
        for step in STEPS[was:]:
            step(conn)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return was


def use_wal(conn: sqlite3.Connection) -> None:
    """Switch ``conn``'s database to WAL mode (persistent in the file), or raise."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise sqlite3.OperationalError(f"cannot switch to WAL mode (journal_mode={mode})")
