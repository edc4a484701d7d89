"""The durable outbox: every reading is committed here before any sink sees it.

On-disk invariants (one SQLite file in WAL mode, ``application_id`` 0x536C7563, ``user_version`` 1)
-------------------------------------------------------------------------------------------------
* ``readings(seq, series, data)`` holds every stored reading. ``seq`` is assigned by the outbox
  from ``state.last_seq`` (a persisted counter written in the same transaction as the rows), so
  sequence numbers are strictly increasing and never reused in one file, even after every row
  was deleted and the process restarted. (A plain ``INTEGER PRIMARY KEY`` would restart at
  ``max(seq)+1`` and could hand out a seq a sink has already acknowledged; ``AUTOINCREMENT``
  would give the same guarantee as our counter at the cost of a second table write per row.)
* ``data`` is ``marshal`` format version 4 of ``[time_ns, quality, fields]``; ``quality`` is the
  reading's set of flags as its canonical string (``good``, ``uncertain``, ``clock_unsynced``,
  ``clock_unsynced,uncertain``: :func:`gateway.reading.quality`), so rows written before quality
  became a set (one flag) read as the same set. Ints stay ints (any size), floats floats
  (8-byte binary, exact), bools bools, strings strings (UTF-8).
  Version 4 is pinned when writing and every Python since 3.4 reads it. (Compact JSON was
  measured 8x slower to encode and 5x slower to decode here — float formatting dominates — and
  50 % larger; pickle could run code from a tampered file.) A row that cannot be decoded is
  skipped by ``fetch`` with an ERROR log and leaves with the next acknowledgement.
  ``series`` points into ``series(id, key, last_seq)`` where ``key`` is the JSON
  ``[device, measurement, tags]`` — the part of a reading that is the same for every poll of a
  device, stored once. A series row is deleted on open once no stored reading uses it
  (``last_seq`` < the oldest stored seq).
* Rows are only ever deleted from the oldest end, so the stored seqs are one contiguous range
  ``[first, state.last_seq]``. Rows leave only (a) when every configured sink has acknowledged
  them, or (b) by the ``drop_oldest`` policy, counted in ``state.dropped``.
* ``sinks(name, acked)``: sink ``name`` has delivered every reading with ``seq <= acked``; its
  pending readings are those with ``seq > acked``. A position never moves backwards. On open,
  sinks no longer configured are removed (their rows can then be deleted) and a new sink starts
  at the oldest stored row. With no sink configured nothing is deleted except by ``when_full``.
* ``sink_sent(name, sent)`` (sinks with end-to-end receipts only, e.g. MQTT with
  ``delivery: end_to_end``): sink ``name`` has *published* every reading with ``seq <= sent``;
  the far end's broker acknowledged them but the final consumer has not yet confirmed them with
  a receipt, so they still count as pending and are not deleted. ``acked <= sent <= last_seq``
  always: :meth:`Outbox.ack` raises ``sent`` with ``acked``, and on open a ``sent`` below
  ``acked`` (or above ``last_seq``) is clamped. Unlike ``acked``, ``sent`` may move back (to
  ``acked``, :meth:`Outbox.rewind_sent`) when receipts did not come in time and the readings are
  published again. It never decides what is deleted. The table was added without a schema version
  change (created if missing on open; an older Sluice ignores it and re-sends from ``acked``).
* ``sink_resend(name, due_ns, attempt)`` (same sinks): the readings between ``acked`` and ``sent``
  were published ``attempt`` times more without a receipt, and the next re-send is due at
  ``due_ns`` (wall clock, UTC ns). Written in the transaction that rewinds ``sent``
  (:meth:`Outbox.rewind_sent`), deleted when a receipt moves ``acked`` again
  (:meth:`Outbox.clear_resend`), so the re-send backoff survives a restart; meaningless (and
  ignored) once ``sent == acked``. Added like ``sink_sent``, without a schema version change.
* ``state`` (one row) holds ``last_seq``, ``rows``, ``bytes`` and ``dropped``, updated in the same
  transaction as the rows they describe. ``bytes`` is the size budget that ``max_bytes`` bounds:
  the sum over stored rows of ``len(data) + ROW_OVERHEAD`` — the payload, not the file, so it
  costs nothing to keep exact. Measured with drop_oldest in steady state, the database file
  stays within ~1 % of ``max_bytes``. Freed pages are reused, never returned to the filesystem.
  ``max_pages`` is a hard cap on the database file for when that estimate is not enough.
* The ``-wal`` stays within :attr:`Outbox.wal_bound` bytes (:func:`wal_bound`: 1/16 of
  ``max_bytes`` or of the filesystem, whichever is smaller, between 128 KiB and 16 MiB): the
  outbox's connection and the trace journal's (:func:`limit_wal`: these are per-connection
  settings) checkpoint once the WAL holds half of it (``wal_autocheckpoint``) and cut it back to
  it when it restarts (``journal_size_limit``); one transaction stores at most a
  quarter of it (:meth:`Outbox.append` splits a larger batch); after a write fails for want of
  space (or with an I/O error) the WAL is checkpointed and truncated to zero
  (``wal_checkpoint(TRUNCATE)``), and again at the first write that succeeds after that. So the
  whole outbox needs about ``max_bytes`` (plus dead letters and trace events) + ``wal_bound`` +
  32 KiB (``-shm``) of disk, and on a full disk it holds no more than that.
* ``dead_letters(id, sink, time_ns, count, readings, message, resend, attempts)``: batches a sink's
  far end refused *as data* (a field type conflict, a parse error) — never for a link, auth or
  server problem. Moving a batch here and moving the sink's position past it are one
  transaction (:meth:`Outbox.reject`), so a refused batch is always in exactly one of the two
  tables. ``readings`` is ``marshal`` v4 of ``[[device, measurement, tags, time_ns, quality,
  fields], ...]`` (self-contained: it does not use ``series``). ``id`` is ``AUTOINCREMENT``: an id
  the CLI printed never names another letter. ``resend = 1`` marks a letter the operator asked to
  re-send (``sluice deadletter resend``, which may run while the gateway runs: it only flips this
  flag); the sink's forwarder sends it before its next batch and deletes it once delivered. Dead
  letters are not counted in ``bytes``/``max_bytes``; they have their own cap,
  ``dead_letter_max_bytes`` (oldest letters deleted first, with a WARNING). The table was added
  without a schema version change: it is created if missing on open, and an older Sluice ignores it.
* ``trace_*`` tables belong to the traceability feed (``gateway/trace/journal.py``): its events
  go through this same file with the same commit and acknowledgement rules, on their own
  connection. This class never reads or changes them; they are not counted in ``bytes`` and
  ``when_full`` never drops them (trace events are evidence). :func:`prepare` lets that module
  (and the ``sluice lot`` CLI, before the gateway's first start) create the outbox file.
* Every change is one transaction (``BEGIN IMMEDIATE`` … ``COMMIT``). A crash or SIGKILL loses
  nothing that was committed (power loss with ``synchronous=normal`` may lose the last commits).
  A file that fails the integrity check on open, or is not a Sluice outbox, is renamed to
  ``<name>.corrupt-<UTC timestamp>`` (a ``-wal`` holding data follows as ``…-wal``; an empty one and
  the ``-shm`` are deleted), never deleted, and a fresh outbox is started;
  ``sluice outbox salvage`` (``gateway/salvage.py``) copies what it still holds back.
* Only SQLite touches the file: every connection is made by ``gateway/outbox_file.py``'s
  ``connect``, and vetting/moving aside happen only before this process's first connection to it
  (closing any plain descriptor of the file would drop the process's SQLite locks).
"""

from __future__ import annotations

import json
import marshal
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.outbox_file import APPLICATION_ID, SCHEMA_VERSION, connect, vet
from gateway.outbox_space import WAL_MAX, filesystem_bytes, limit_wal, wal_bound
from gateway.reading import Reading

log = logging.getLogger(__name__)

ROW_OVERHEAD = 16
"""Bytes counted per row on top of its payload (seq, series id, record and cell headers)."""
ACK_WRITE_DELAY = 2.0
"""Seconds an acknowledged position may stay in memory only: it is written with the next commit of
readings, or by the first ack after this delay, or at close. A crash re-sends at most that much
(duplicates, never loss); it saves a transaction and an fsync per delivered batch."""
BUSY_TIMEOUT = 5.0
"""Seconds a statement waits for another connection's lock (Python's default)."""
RECLAIM_WAIT = 0.2
"""Seconds the checkpoint after a failed write waits for other connections (it blocks the event loop)."""

_SCHEMA = f"""
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
CREATE TABLE state (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    last_seq INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    dropped INTEGER NOT NULL
);
INSERT INTO state VALUES (0, 0, 0, 0, 0);
CREATE TABLE sinks (name TEXT PRIMARY KEY, acked INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE series (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, last_seq INTEGER NOT NULL);
CREATE TABLE readings (seq INTEGER PRIMARY KEY, series INTEGER NOT NULL, data BLOB NOT NULL);
"""

# Added after version 1 without a version change: created on open when missing (see the docstring).
_DEAD_LETTER_SCHEMA = """
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
"""

_MARSHAL_VERSION = 4
_dumps = marshal.dumps
_loads = marshal.loads
# json.dumps with arguments builds a new encoder per call: bind one (series keys only).
_json = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


class OutboxError(Exception):
    """The outbox file could not be read or written (disk full, I/O error, locked, unreadable).

    Raised by :meth:`Outbox.append`, :meth:`Outbox.ack`, :meth:`Outbox.fetch` and on open. The
    failed transaction was rolled back: nothing of it is stored, and the outbox stays usable —
    the caller may retry later. The message is meant for the log. ``consumed`` (from
    :meth:`Outbox.append` only): how many leading readings of the batch were handled by the
    transactions that committed before the failure (stored, or dropped by ``when_full`` and
    counted); the others were not stored.
    """

    def __init__(self, message: str, *, consumed: int = 0) -> None:
        super().__init__(message)
        self.consumed = consumed


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored reading and its sequence number (strictly increasing, never reused in one file)."""

    seq: int
    reading: Reading


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A batch a sink's far end refused as data, with the server's message."""

    id: int
    sink: str
    time_ns: int  # when it was (last) refused, UTC ns
    count: int  # readings in it
    message: str  # the server's answer
    resend: bool  # marked for re-sending
    attempts: int  # times the far end refused it
    readings: tuple[Reading, ...] = ()  # empty unless asked for


@dataclass(frozen=True, slots=True)
class OutboxStats:
    rows: int
    bytes: int  # sum of len(payload) + ROW_OVERHEAD over stored rows: what max_bytes bounds
    oldest_ns: int | None  # time_ns of the oldest stored reading
    dropped: int  # readings dropped by the when_full policy since the file was created (persisted)
    pending: dict[str, int]  # per sink: rows not yet acknowledged by it
    dead_letters: int = 0  # batches in the dead-letter table (every sink)


class Outbox:
    """SQLite (WAL) outbox. Synchronous methods, called from the event loop; no I/O in __init__.

    Use as ``with Outbox(...) as outbox:``. One writer of readings per file (the gateway); the
    trace journal writes its own tables beside them (the ``sluice lot`` CLI from another process),
    each transaction short, so a writer waits at most milliseconds for the other.

    ``max_bytes`` bounds :attr:`OutboxStats.bytes` (see the module docstring); ``when_full``
    decides what goes when a batch would exceed it. ``max_pages``, if given, is also applied as
    ``PRAGMA max_page_count`` on every open: a hard cap on the file (database pages, not the
    WAL) beyond which writes fail with :class:`OutboxError` ("database or disk is full"), as
    they would on a full disk.
    """

    def __init__(self, path: Path, sinks: Sequence[str], *, max_bytes: int = 256 * 1024**2,
                 when_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest",
                 synchronous: Literal["full", "normal"] = "full",
                 max_pages: int | None = None, dead_letter_max_bytes: int | None = None) -> None:
        if when_full not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"when_full must be drop_oldest or drop_newest, not {when_full!r}")
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be full or normal, not {synchronous!r}")
        if len(set(sinks)) != len(sinks):
            raise ValueError(f"sink names must be unique: {list(sinks)}")
        self.path = Path(path)
        self._sink_names = list(sinks)
        self.max_bytes = max_bytes
        self.when_full = when_full
        self._synchronous = synchronous
        self._max_pages = max_pages
        self.dead_letter_max_bytes = max_bytes // 4 if dead_letter_max_bytes is None else dead_letter_max_bytes
        self._dead_letters = 0
        self._conn: sqlite3.Connection | None = None
        # Mirrors of the persisted state, replaced only after a successful COMMIT.
        self._last_seq = 0
        self._rows = 0
        self._bytes = 0
        self._dropped = 0
        self._acked: dict[str, int] = {}
        self._acks_dirty: set[str] = set()  # sinks whose acked/sent position is not yet in the file
        self._acks_due: float | None = None  # monotonic time by which they are written at the latest
        self._sent: dict[str, int] = {}  # sinks with a persisted sent position (sink_sent)
        self._resend: dict[str, tuple[int, int]] = {}  # sink_resend: name -> (due_ns, attempt)
        self._oldest_ns: int | None = None
        self._oldest_known = False
        self._series_ids: dict[tuple[Any, ...], int] = {}  # (device, measurement, tag items) -> id
        self._series_by_id: dict[int, tuple[str, str, dict[str, str]]] = {}
        self._dropping = False  # a when_full episode is under way (log once at start and end)
        self._episode_dropped = 0
        self.wal_bound = WAL_MAX
        """Bytes the ``-wal`` stays within (set on open from ``max_bytes`` and the filesystem: :func:`wal_bound`)."""
        self._reclaim_due = False  # a write failed for want of space: truncate the WAL after the next success

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Outbox:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Open (creating, checking, or replacing a corrupt file). Raises :class:`OutboxError`."""
        if self._conn is not None:
            raise RuntimeError("outbox already open")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            vet(self.path)  # only before this process's first connection (gateway/outbox_file.py)
            self.wal_bound = wal_bound(self.max_bytes, filesystem_bytes(self.path.parent))
            self._conn = self._connect()
            self._setup()
        except (sqlite3.Error, OSError) as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise OutboxError(_describe(self.path, "opening", exc)) from exc

    def close(self) -> None:
        if self._conn is not None:
            if self._acks_dirty:
                try:
                    self._write_acks()
                except OutboxError as exc:  # they are delivered again after the restart
                    log.warning("%s", exc)
            self._conn.close()
            self._conn = None
        if self._dropping:
            log.info("outbox %s: %d readings dropped (when_full=%s) before closing",
                     self.path, self._episode_dropped, self.when_full)
            self._dropping = False

    @property
    def last_seq(self) -> int:
        """The highest seq ever committed to this file (0 for a new file)."""
        return self._last_seq

    def set_sinks(self, sinks: Sequence[str]) -> None:
        """Change the configured sinks of an open outbox (a reload), as :meth:`open` would: a new
        sink starts at the oldest stored row; a sink no longer configured loses its position, and
        rows only it was holding back are deleted now. One transaction; raises
        :class:`OutboxError` if SQLite fails (nothing changed then)."""
        if len(set(sinks)) != len(sinks):
            raise ValueError(f"sink names must be unique: {list(sinks)}")
        conn = self._require_open()
        gone = [name for name in self._acked if name not in sinks]
        new = [(name, self._first_seq() - 1) for name in sinks if name not in self._acked]
        if not gone and not new:
            self._sink_names = list(sinks)
            return
        before = dict(self._acked)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("DELETE FROM sinks WHERE name=?", [(n,) for n in gone])
            conn.executemany("INSERT INTO sinks VALUES (?, ?)", new)
            conn.executemany("DELETE FROM sink_sent WHERE name=?", [(n,) for n in gone + [m for m, _s in new]])
            conn.executemany("DELETE FROM sink_resend WHERE name=?", [(n,) for n in gone + [m for m, _s in new]])
            for name in gone:
                del self._acked[name]
            for name in gone + [m for m, _s in new]:
                self._sent.pop(name, None)
                self._resend.pop(name, None)
            self._acked.update(new)
            deleted = self._delete_acknowledged()
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._acked = before
            self._rollback(exc)
            raise OutboxError(_describe(self.path, "changing the configured sinks", exc)) from exc
        self._sink_names = list(sinks)
        for name in gone:
            log.info("outbox %s: sink %s is no longer configured; forgetting its position", self.path, name)
        if deleted:
            self._rows, self._bytes = deleted
            self._oldest_known = False

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per call.
        conn = connect(self.path, timeout=BUSY_TIMEOUT)  # counted: the file is never vetted or moved under it
        try:
            _use_wal(conn)
            conn.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
            limit_wal(conn, self.wal_bound)
            if self._max_pages is not None:
                conn.execute(f"PRAGMA max_page_count={int(self._max_pages)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _setup(self) -> None:
        conn = self._conn
        assert conn is not None
        _create(conn)  # a new (or empty) file: vet() checked it
        conn.execute("BEGIN IMMEDIATE")
        try:
            last_seq, rows, nbytes, dropped = conn.execute(
                "SELECT last_seq, rows, bytes, dropped FROM state").fetchone()
            first, last = conn.execute("SELECT min(seq), max(seq) FROM readings").fetchone()
            real_rows = 0 if first is None else last - first + 1
            if real_rows != rows or (last is not None and last > last_seq):
                # Cannot happen if every change went through this class; repair rather than trust.
                rows, nbytes, top = conn.execute(
                    f"SELECT count(*), coalesce(sum(length(data)), 0) + count(*) * {ROW_OVERHEAD},"
                    " coalesce(max(seq), 0) FROM readings").fetchone()
                last_seq = max(last_seq, top)
                log.warning("outbox %s: counters disagreed with the stored rows; recounted %d rows",
                            self.path, rows)
                conn.execute("UPDATE state SET last_seq=?, rows=?, bytes=? WHERE id=0",
                             (last_seq, rows, nbytes))
            acked = dict(conn.execute("SELECT name, acked FROM sinks").fetchall())
            gone = [name for name in acked if name not in self._sink_names]
            for name in gone:
                log.info("outbox %s: sink %s is no longer configured; forgetting its position",
                         self.path, name)
                del acked[name]
            conn.executemany("DELETE FROM sinks WHERE name=?", [(n,) for n in gone])
            start = (first - 1) if first is not None else last_seq
            new = [(n, start) for n in self._sink_names if n not in acked]
            conn.executemany("INSERT INTO sinks VALUES (?, ?)", new)
            acked.update(new)
            self._acked = acked
            self._last_seq, self._rows, self._bytes, self._dropped = last_seq, rows, nbytes, dropped
            deleted = self._delete_acknowledged()
            if deleted:
                self._rows, self._bytes = deleted
            conn.execute("DELETE FROM series WHERE last_seq < ?", (self._first_seq(),))
            for statement in _DEAD_LETTER_SCHEMA.split(";"):  # not executescript: it would COMMIT
                if statement.strip():
                    conn.execute(statement)
            conn.executemany("DELETE FROM sink_sent WHERE name=?", [(n,) for n in gone])
            conn.executemany("DELETE FROM sink_resend WHERE name=?", [(n,) for n in gone])
            sent = {}
            for name, seq in conn.execute("SELECT name, sent FROM sink_sent").fetchall():
                if name in acked:
                    sent[name] = min(max(seq, acked[name]), last_seq)
            self._sent = sent
            self._resend = {name: (due, attempt) for name, due, attempt
                            in conn.execute("SELECT name, due_ns, attempt FROM sink_resend").fetchall() if name in acked}
            # Letters of sinks no longer configured stay: they are the operator's to list and resend.
            self._dead_letters = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            conn.execute("COMMIT")
            self._oldest_known = False
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._series_ids.clear()
        self._series_by_id.clear()

    # -- the contract ------------------------------------------------------------------------

    def append(self, readings: Sequence[Reading]) -> int:
        """Commit ``readings``; returns how many were stored.

        One transaction — or, for a batch whose payload exceeds a quarter of :attr:`wal_bound`
        (a backlog held in memory while the disk was full), one per such slice, oldest first, so
        that the WAL stays within its bound. When a slice would take :attr:`OutboxStats.bytes`
        over ``max_bytes``: with ``drop_oldest`` the oldest stored readings are deleted until it
        fits (if the batch alone is bigger than ``max_bytes``, its own oldest readings go too);
        with ``drop_newest`` only the leading part that fits is stored. Every dropped reading is
        counted in the file. Raises :class:`OutboxError` if SQLite fails (disk full, I/O error);
        then nothing of the failed slice is stored, ``consumed`` says how many leading readings
        the slices before it took, and the outbox stays usable.
        """
        self._require_open()
        if not readings:
            return 0
        series_ids = self._series_ids
        texts: dict[tuple[Any, ...], str] = {}
        keyed: list[tuple[tuple[Any, ...], bytes]] = []
        for r in readings:
            key = (r.device, r.measurement, tuple(r.tags.items()))
            if key not in series_ids and key not in texts:
                texts[key] = _json([r.device, r.measurement, dict(sorted(r.tags.items()))])
            try:
                data = _dumps([r.time_ns, r.quality, r.fields], _MARSHAL_VERSION)
            except ValueError:  # a subclass (IntEnum, numpy float64 ...): store the plain value
                data = _dumps([int(r.time_ns), str(r.quality), _plain(r.fields)], _MARSHAL_VERSION)
            keyed.append((key, data))
        limit = self.wal_bound // 4
        stored = start = 0
        refuse = False
        while start < len(keyed):
            end, size = start, 0
            while end < len(keyed) and (end == start or size + len(keyed[end][1]) + ROW_OVERHEAD <= limit):
                size += len(keyed[end][1]) + ROW_OVERHEAD
                end += 1
            try:
                n = self._append_slice(keyed[start:end], texts, len(keyed), refuse=refuse)
            except OutboxError as exc:
                exc.consumed = start
                raise
            # drop_newest stores a leading part only: once a slice was cut, the later ones go too.
            refuse = refuse or n < end - start
            stored += n
            start = end
        return stored

    def _append_slice(self, keyed: list[tuple[tuple[Any, ...], bytes]], texts: dict[tuple[Any, ...], str],
                      batch: int, *, refuse: bool = False) -> int:
        """One transaction of :meth:`append`; ``texts`` holds the series keys not stored before the batch;
        ``refuse`` (drop_newest, an earlier slice was cut): store none of ``keyed``, count them dropped."""
        conn = self._require_open()
        series_ids = self._series_ids
        new_series = {key: texts[key] for key, _d in keyed if key not in series_ids}
        total = sum(len(data) for _k, data in keyed) + ROW_OVERHEAD * len(keyed)

        if self._acks_dirty and self._bytes + total > self.max_bytes:
            self._write_acks()  # deleting delivered rows first may make room
        dropped_now = 0
        cut_seq = None  # drop_oldest: delete stored rows with seq <= cut_seq
        freed_rows = freed_bytes = 0
        added: dict[tuple[Any, ...], int] = {}
        if self._bytes + total > self.max_bytes or refuse:
            if self.when_full == "drop_newest":
                room = -1 if refuse else self.max_bytes - self._bytes
                keep = 0
                for _key, data in keyed:
                    if room < len(data) + ROW_OVERHEAD:
                        break
                    room -= len(data) + ROW_OVERHEAD
                    keep += 1
                dropped_now = len(keyed) - keep
                del keyed[keep:]
                total = sum(len(d) for _k, d in keyed) + ROW_OVERHEAD * keep
            else:
                if total > self.max_bytes:  # the batch alone does not fit: keep its newest part
                    skip = 0
                    while total > self.max_bytes:
                        total -= len(keyed[skip][1]) + ROW_OVERHEAD
                        skip += 1
                    dropped_now = skip
                    del keyed[:skip]
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Positions acknowledged since the last write go in this transaction (and rows every sink has go).
            base_rows, base_bytes = self._delete_acknowledged() or (self._rows, self._bytes)
            need = base_bytes + total - self.max_bytes
            if need > 0 and self.when_full == "drop_oldest":
                # Python walks only the rows it drops: in steady state about one batch' worth.
                cur = conn.execute("SELECT seq, length(data) FROM readings ORDER BY seq")
                for seq, size in cur:
                    freed_bytes += size + ROW_OVERHEAD
                    freed_rows += 1
                    cut_seq = seq
                    if freed_bytes >= need:
                        break
                cur.close()
                if cut_seq is not None:
                    conn.execute("DELETE FROM readings WHERE seq <= ?", (cut_seq,))
                dropped_now += freed_rows
            for key, text in new_series.items():
                cur = conn.execute("INSERT INTO series (key, last_seq) VALUES (?, 0) "
                                   "ON CONFLICT (key) DO UPDATE SET key=key RETURNING id", (text,))
                added[key] = cur.fetchone()[0]
                cur.close()
            seq = self._last_seq
            rows = []
            used: dict[int, int] = {}
            for key, data in keyed:
                sid = series_ids.get(key) or added[key]
                seq += 1
                used[sid] = seq
                rows.append((seq, sid, data))
            conn.executemany("INSERT INTO readings VALUES (?, ?, ?)", rows)
            conn.executemany("UPDATE series SET last_seq=? WHERE id=?", [(s, i) for i, s in used.items()])
            new_rows = base_rows + len(rows) - freed_rows
            new_bytes = base_bytes + total - freed_bytes
            conn.execute("UPDATE state SET last_seq=?, rows=?, bytes=?, dropped=? WHERE id=0",
                         (seq, new_rows, new_bytes, self._dropped + dropped_now))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(exc)
            raise OutboxError(_describe(self.path, f"storing {batch} readings", exc)) from exc
        self._committed()
        series_ids.update(added)
        delivered_gone = base_rows != self._rows
        self._last_seq, self._rows, self._bytes = seq, new_rows, new_bytes
        if freed_rows or delivered_gone or self._rows == len(rows):
            self._oldest_known = False
        self._note_drops(dropped_now)
        return len(rows)

    def fetch(self, sink: str, max_rows: int, max_bytes: int, *, after: int | None = None) -> list[Entry]:
        """The oldest entries not yet acknowledged by ``sink``, in seq order (at least one if any).

        At most ``max_rows`` entries whose payloads (counted as in :attr:`OutboxStats.bytes`)
        total at most ``max_bytes`` — except that the first entry is always returned. ``after``
        (a seq at or beyond the sink's position, e.g. its sent position) starts later. Raises
        ``ValueError`` for an unknown sink, :class:`OutboxError` if SQLite fails.
        """
        conn = self._require_open()
        after = max(self._position(sink), after or 0)
        if after >= self._last_seq:
            return []
        out: list[Entry] = []
        budget = max_bytes
        series = self._series_by_id
        try:
            cur = conn.execute("SELECT seq, series, data FROM readings WHERE seq > ? ORDER BY seq LIMIT ?",
                               (after, max(1, max_rows)))
            for seq, sid, data in cur:
                budget -= len(data) + ROW_OVERHEAD
                if budget < 0 and out:
                    break
                s = series.get(sid)
                if s is None:
                    s = self._load_series(sid)
                try:
                    time_ns, quality, fields = _loads(data)
                except (ValueError, EOFError, TypeError) as exc:
                    log.error("outbox %s: entry %d cannot be decoded (%s); skipping it", self.path, seq, exc)
                    continue
                out.append(Entry(seq, Reading(s[0], time_ns, fields, dict(s[2]), quality, s[1])))
            cur.close()
        except sqlite3.Error as exc:
            raise OutboxError(_describe(self.path, f"reading entries for sink {sink}", exc)) from exc
        return out

    def ack(self, sink: str, upto_seq: int) -> None:
        """``sink`` has delivered every entry with seq <= upto_seq; rows every sink has are deleted.

        The position counts at once (fetch, stats); it reaches the file with the next
        :meth:`append`, or with an ack :data:`ACK_WRITE_DELAY` after the first one not yet
        written, or at :meth:`close`, rows every sink has being deleted in that transaction.
        Acknowledging less than before is a no-op. Raises ``ValueError`` for an unknown sink or a
        seq never handed out, :class:`OutboxError` if SQLite fails writing (the position stays
        acknowledged in memory and is written with a later transaction).
        """
        self._require_open()
        before = self._position(sink)
        if upto_seq > self._last_seq:
            raise ValueError(f"sink {sink} acknowledged seq {upto_seq}, beyond the last stored "
                             f"seq {self._last_seq}")
        if upto_seq <= before:
            return
        self._acked[sink] = upto_seq
        if self._sent.get(sink, upto_seq) < upto_seq:
            self._sent[sink] = upto_seq
        self._acks_dirty.add(sink)
        now = time.monotonic()
        if self._acks_due is None:
            self._acks_due = now + ACK_WRITE_DELAY
        elif now >= self._acks_due:
            self._write_acks()

    def _write_acks(self) -> None:
        """Write the positions not yet in the file (and delete what every sink has), in one transaction."""
        conn = self._require_open()
        try:
            conn.execute("BEGIN IMMEDIATE")
            deleted = self._delete_acknowledged()
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(exc)
            raise OutboxError(_describe(self.path, "recording acknowledged positions", exc)) from exc
        self._committed()
        if deleted:
            self._rows, self._bytes = deleted
            self._oldest_known = False

    # -- sent positions (end-to-end receipts) ------------------------------------------------

    def position(self, sink: str) -> int:
        """``sink``'s acknowledged position: every seq up to it was delivered (see ``sinks``)."""
        return self._position(sink)

    def sent(self, sink: str) -> int:
        """``sink``'s sent position: every seq up to it was published (at least ``acked``)."""
        return max(self._position(sink), self._sent.get(sink, 0))

    def mark_sent(self, sink: str, upto_seq: int) -> None:
        """``sink``'s broker acknowledged every entry with seq <= ``upto_seq``; nothing is deleted.
        Marking less than before is a no-op. Raises like :meth:`ack`."""
        self._set_sent(sink, upto_seq, forward=True)

    def rewind_sent(self, sink: str, resend: tuple[int, int] | None = None) -> None:
        """Receipts did not come: the sent position goes back to ``acked`` (published again).
        ``resend``: ``(due_ns, attempt)`` kept in ``sink_resend`` in the same transaction."""
        self._set_sent(sink, self._position(sink), forward=False, resend=resend)

    def resend_due(self, sink: str) -> tuple[int, int] | None:
        """``(due_ns, attempt)`` of ``sink``'s next re-send (see ``sink_resend``); None when no re-send
        was recorded since a receipt last moved ``acked``."""
        self._position(sink)  # an unknown sink raises
        return self._resend.get(sink)

    def clear_resend(self, sink: str) -> None:
        """A receipt moved ``acked``: forget the re-send backoff (no-op when there is none)."""
        if sink not in self._resend:
            return
        conn = self._require_open()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM sink_resend WHERE name=?", (sink,))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise OutboxError(_describe(self.path, f"clearing the re-send time of sink {sink}", exc)) from exc
        del self._resend[sink]

    def _set_sent(self, sink: str, seq: int, *, forward: bool, resend: tuple[int, int] | None = None) -> None:
        conn = self._require_open()
        acked = self._position(sink)
        if seq > self._last_seq:
            raise ValueError(f"sink {sink} sent seq {seq}, beyond the last stored seq {self._last_seq}")
        current = self.sent(sink)
        seq = max(seq, acked)
        if resend is None and ((forward and seq <= current) or (not forward and seq == current and sink in self._sent)):
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO sink_sent VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET sent=excluded.sent",
                         (sink, seq))
            if resend is not None:
                conn.execute("INSERT INTO sink_resend VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                             "due_ns=excluded.due_ns, attempt=excluded.attempt", (sink, *resend))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(exc)
            raise OutboxError(_describe(self.path, f"recording seq {seq} as sent for sink {sink}", exc)) from exc
        self._sent[sink] = seq
        if resend is not None:
            self._resend[sink] = resend

    def stats(self) -> OutboxStats:
        """Counters kept in memory (no table scan); at most one indexed row read for oldest_ns.
        Acknowledged positions not yet written are written first, so rows counts only what some
        sink still needs (called every few seconds at most: health, watchdog, stop)."""
        conn = self._require_open()
        if self._acks_dirty:
            try:
                self._write_acks()
            except OutboxError as exc:  # the counts then include delivered rows not yet deleted
                log.debug("%s", exc)
        if not self._oldest_known:
            row = conn.execute("SELECT data FROM readings ORDER BY seq LIMIT 1").fetchone()
            try:
                self._oldest_ns = _loads(row[0])[0] if row else None
            except (ValueError, EOFError, TypeError):
                self._oldest_ns = None
            self._oldest_known = True
        first = self._first_seq()
        pending = {name: self._last_seq - max(acked, first - 1) for name, acked in self._acked.items()}
        return OutboxStats(rows=self._rows, bytes=self._bytes, oldest_ns=self._oldest_ns,
                           dropped=self._dropped, pending=pending, dead_letters=self._dead_letters)

    # -- dead letters ------------------------------------------------------------------------

    def reject(self, sink: str, entries: Sequence[Entry], message: str, *, upto: int | None = None) -> int:
        """``sink``'s far end refused ``entries`` as data: store them as one dead letter with the
        server's ``message`` and move the sink's position past them (or to ``upto``: the end of
        the batch they were refused from, whose other readings were written), in ONE transaction.
        A message that is not storable text (lone surrogates) is kept with backslash escapes.

        ``entries`` must be (some of) the oldest pending entries of ``sink``, as :meth:`fetch` returned them.
        Returns the letter's id. Older letters are deleted (WARNING) while the letters' readings
        exceed ``dead_letter_max_bytes``; the new one is always kept. Raises :class:`OutboxError`
        if SQLite fails (then nothing changed: the batch is still pending).
        """
        conn = self._require_open()
        before = self._position(sink)
        upto = max(entries[-1].seq, upto or 0)
        if upto > self._last_seq:
            raise ValueError(f"sink {sink} rejected seq {upto}, beyond the last stored seq {self._last_seq}")
        blob = encode_letter([e.reading for e in entries])
        message = _storable(message)  # before BEGIN: an error inside would leave the transaction open
        try:
            conn.execute("BEGIN IMMEDIATE")
            (letter,) = conn.execute(
                "INSERT INTO dead_letters (sink, time_ns, count, readings, message) VALUES (?, ?, ?, ?, ?) "
                "RETURNING id", (sink, time.time_ns(), len(entries), blob, message)).fetchone()
            trimmed = self._trim_dead_letters(letter)
            deleted = None
            if upto > before:
                conn.execute("UPDATE sinks SET acked=? WHERE name=?", (upto, sink))
                self._acked[sink] = upto
                deleted = self._delete_acknowledged()
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._acked[sink] = before
            self._rollback(exc)
            raise OutboxError(_describe(self.path, f"moving {len(entries)} readings of sink {sink} to the "
                                        "dead-letter table", exc)) from exc
        self._dead_letters += 1 - trimmed
        if deleted:
            self._rows, self._bytes = deleted
            self._oldest_known = False
        return int(letter)

    def dead_letters(self, sink: str | None = None, *, with_readings: bool = False) -> list[DeadLetter]:
        """Every dead letter (of ``sink``, if given), oldest first."""
        return _list_dead_letters(self._require_open(), sink, with_readings)

    def next_resend(self, sink: str) -> DeadLetter | None:
        """The oldest letter of ``sink`` marked for re-sending, with its readings, or None."""
        conn = self._require_open()
        try:
            row = conn.execute(f"SELECT {_LETTER_COLUMNS}, readings FROM dead_letters WHERE sink=? AND resend=1 "
                               "ORDER BY id LIMIT 1", (sink,)).fetchone()
        except sqlite3.Error as exc:
            raise OutboxError(_describe(self.path, f"reading dead letters of sink {sink}", exc)) from exc
        return None if row is None else _letter(row, True)

    def resolve(self, letter_id: int) -> None:
        """The letter was delivered after all: delete it."""
        self._letter_change("DELETE FROM dead_letters WHERE id=?", (letter_id,), f"deleting dead letter {letter_id}")

    def refused_again(self, letter_id: int, message: str) -> None:
        """A re-sent letter was refused again: unmark it, keep the new message, count the attempt."""
        self._letter_change("UPDATE dead_letters SET resend=0, attempts=attempts+1, message=?, time_ns=? WHERE id=?",
                            (_storable(message), time.time_ns(), letter_id), f"updating dead letter {letter_id}")

    def mark_resend(self, ids: Sequence[int] | None = None, sink: str | None = None) -> int:
        """Mark letters for re-sending (``ids``, or all of ``sink``, or all); returns how many."""
        return mark_resend(self._require_open(), ids, sink)

    def _letter_change(self, sql: str, args: tuple[Any, ...], what: str) -> None:
        conn = self._require_open()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, args)
            # Counted, not decremented: `sluice outbox salvage` adds letters from another process.
            (count,) = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(exc)
            raise OutboxError(_describe(self.path, what, exc)) from exc
        self._dead_letters = count

    def _trim_dead_letters(self, keep: int) -> int:
        """Inside a transaction: delete the oldest letters (never ``keep``) beyond the cap."""
        conn = self._conn
        assert conn is not None
        (total,) = conn.execute("SELECT coalesce(sum(length(readings)), 0) FROM dead_letters").fetchone()
        if total <= self.dead_letter_max_bytes:
            return 0
        gone = []
        for letter, size, count, sink in conn.execute(
                "SELECT id, length(readings), count, sink FROM dead_letters WHERE id != ? ORDER BY id", (keep,)):
            if total <= self.dead_letter_max_bytes:
                break
            total -= size
            gone.append((letter, count, sink))
        conn.executemany("DELETE FROM dead_letters WHERE id=?", [(g[0],) for g in gone])
        for letter, count, sink in gone:
            log.warning("outbox %s: dead letters exceed %d bytes: deleted letter %d (%d readings refused by "
                        "sink %s) — resend or inspect dead letters sooner (`sluice deadletter list`)",
                        self.path, self.dead_letter_max_bytes, letter, count, sink)
        return len(gone)

    # -- internals ---------------------------------------------------------------------------

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("outbox is not open: use it as `with Outbox(...) as outbox:`")
        return self._conn

    def _position(self, sink: str) -> int:
        try:
            return self._acked[sink]
        except KeyError:
            raise ValueError(f"unknown sink {sink!r}; configured: {sorted(self._acked)}") from None

    def _first_seq(self) -> int:
        """The seq of the oldest stored row (last_seq + 1 when empty): rows are contiguous."""
        return self._last_seq - self._rows + 1

    def _delete_acknowledged(self) -> tuple[int, int] | None:
        """Inside a transaction: write the positions acknowledged since the last write, delete rows
        every sink has; returns the new (rows, bytes) or None. (A rollback marks them unwritten again.)"""
        if self._acks_dirty:
            conn = self._conn
            assert conn is not None
            dirty = [n for n in self._acks_dirty if n in self._acked]
            conn.executemany("UPDATE sinks SET acked=? WHERE name=?", [(self._acked[n], n) for n in dirty])
            conn.executemany("UPDATE sink_sent SET sent=? WHERE name=?",
                             [(self._sent[n], n) for n in dirty if n in self._sent])
            self._acks_dirty.clear()
            self._acks_due = None
        if not self._acked or not self._rows:
            return None
        floor = min(self._acked.values())
        if floor < self._first_seq():
            return None
        conn = self._conn
        assert conn is not None
        n, size = conn.execute("SELECT count(*), coalesce(sum(length(data)), 0) FROM readings "
                               "WHERE seq <= ?", (floor,)).fetchone()
        conn.execute("DELETE FROM readings WHERE seq <= ?", (floor,))
        rows, nbytes = self._rows - n, self._bytes - size - n * ROW_OVERHEAD
        conn.execute("UPDATE state SET rows=?, bytes=? WHERE id=0", (rows, nbytes))
        return rows, nbytes  # the caller adopts them once the transaction has committed

    def _load_series(self, sid: int) -> tuple[str, str, dict[str, str]]:
        conn = self._conn
        assert conn is not None
        (text,) = conn.execute("SELECT key FROM series WHERE id=?", (sid,)).fetchone()
        device, measurement, tags = json.loads(text)
        s = (device, measurement, tags)
        self._series_by_id[sid] = s
        return s

    def _rollback(self, exc: sqlite3.Error | None = None) -> None:
        """After a failed transaction: undo it; a failure for want of space gives the WAL's space back."""
        if self._acked:  # positions written in the failed transaction are not in the file
            self._acks_dirty.update(self._acked)
            self._acks_due = self._acks_due or time.monotonic() + ACK_WRITE_DELAY
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as again:  # SQLite may already have rolled back (SQLITE_FULL, IOERR)
                log.debug("outbox %s: rollback failed: %s", self.path, again)
        if exc is not None and _short_of_space(exc):
            self._reclaim_due = True
            self._reclaim()

    def _committed(self) -> None:
        """After a COMMIT: the first one after a failure for want of space truncates the WAL again
        (what the failed writes and their retries left in it)."""
        if self._reclaim_due:
            self._reclaim_due = False
            self._reclaim()

    def _reclaim(self) -> None:
        """Checkpoint the whole WAL into the database and truncate it to zero bytes. On a full disk
        this frees what the WAL held (the database file itself may need to grow first: then it
        fails, and is tried again after the next failed or successful write). Waits at most
        :data:`RECLAIM_WAIT` for another connection's reader or writer: it runs on the event loop."""
        conn = self._conn
        if conn is None:
            return
        try:
            conn.execute(f"PRAGMA busy_timeout={int(RECLAIM_WAIT * 1000)}")
            try:
                busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
        except sqlite3.Error as exc:
            self._reclaim_due = True
            log.debug("outbox %s: checkpointing the WAL failed: %s", self.path, exc)
            return
        if busy:
            self._reclaim_due = True
        log.debug("outbox %s: WAL checkpoint (truncate): busy %d, %d frames, %d checkpointed",
                  self.path, busy, frames, done)

    def _note_drops(self, n: int) -> None:
        if n:
            self._dropped += n
            self._episode_dropped += n
            if not self._dropping:
                self._dropping = True
                log.warning("outbox %s is full (max_bytes %d): dropping the %s readings (when_full=%s) "
                            "until sinks catch up — check the sinks' connections", self.path,
                            self.max_bytes, "oldest" if self.when_full == "drop_oldest" else "newest",
                            self.when_full)
        elif self._dropping:
            log.info("outbox %s no longer full: %d readings were dropped", self.path, self._episode_dropped)
            self._dropping = False
            self._episode_dropped = 0


_LETTER_COLUMNS = "id, sink, time_ns, count, message, resend, attempts"


def _reading_row(r: Reading) -> list[Any]:
    fields = r.fields
    try:
        _dumps(fields, _MARSHAL_VERSION)
    except ValueError:
        fields = _plain(fields)
    return [r.device, r.measurement, dict(r.tags), int(r.time_ns), str(r.quality), fields]


def encode_letter(readings: Sequence[Reading]) -> bytes:
    """The ``readings`` blob of a dead letter (``dead_letters`` in the module docstring)."""
    return _dumps([_reading_row(r) for r in readings], _MARSHAL_VERSION)


def _letter(row: Sequence[Any], with_readings: bool) -> DeadLetter:
    readings: tuple[Reading, ...] = ()
    if with_readings:
        readings = tuple(Reading(d, t, f, tags, q, m) for d, m, tags, t, q, f in _loads(row[7]))
    return DeadLetter(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], readings)


def _list_dead_letters(conn: sqlite3.Connection, sink: str | None, with_readings: bool) -> list[DeadLetter]:
    columns = _LETTER_COLUMNS + (", readings" if with_readings else "")
    where, args = ("WHERE sink=?", (sink,)) if sink is not None else ("", ())
    return [_letter(row, with_readings)
            for row in conn.execute(f"SELECT {columns} FROM dead_letters {where} ORDER BY id", args)]


def mark_resend(conn: sqlite3.Connection, ids: Sequence[int] | None = None, sink: str | None = None) -> int:
    """Set ``resend`` on letters (``ids``, or every letter of ``sink``, or every letter); one transaction."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        if ids is not None:
            n = sum(conn.execute("UPDATE dead_letters SET resend=1 WHERE id=?", (i,)).rowcount for i in ids)
        elif sink is not None:
            n = conn.execute("UPDATE dead_letters SET resend=1 WHERE sink=?", (sink,)).rowcount
        else:
            n = conn.execute("UPDATE dead_letters SET resend=1").rowcount
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return n


def prepare(path: Path, *, check: bool) -> None:
    """Make ``path`` an outbox file that another module may keep its own tables in (the trace
    journal's ``trace_*`` tables), before or while :class:`Outbox` has it open: a missing or empty
    file gets the outbox schema (what :meth:`Outbox.open` would create; the Outbox later opens it
    as a new, empty outbox). With ``check`` (the gateway's own process) an unusable file is first
    moved aside exactly as :meth:`Outbox.open` does, if this process has no connection to it yet; without
    it (a CLI next to a running gateway) a file that is not a Sluice outbox raises
    :class:`OutboxError` and nothing is touched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if check:
            vet(path)  # only before this process's first connection (gateway/outbox_file.py)
        conn = connect(path, timeout=10.0)
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            if app_id != APPLICATION_ID and conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                raise OutboxError(f"{path} is not a Sluice outbox (application_id {app_id:#x}) — "
                                  "check buffer.path in gateway.yaml")
            _use_wal(conn)
            if app_id != APPLICATION_ID:
                _create(conn)
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        raise OutboxError(_describe(path, "preparing", exc)) from exc


def _short_of_space(exc: sqlite3.Error) -> bool:
    """A write failed for want of space (or with an I/O error, which a full disk may also give)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR")


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch ``conn``'s database to WAL mode (persistent in the file), or raise."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise sqlite3.OperationalError(f"cannot switch to WAL mode (journal_mode={mode})")


def _create(conn: sqlite3.Connection) -> None:
    """Give an empty database the outbox schema; a no-op if another connection did it first."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def open_for_dead_letters(path: Path) -> sqlite3.Connection:
    """A plain connection to an existing outbox for listing and marking dead letters from another
    process (``sluice deadletter``) while the gateway may be running. It touches nothing else.
    Raises :class:`OutboxError` if the file is missing or not an outbox."""
    if not Path(path).exists():
        raise OutboxError(f"outbox {path} does not exist — check buffer.path, or the gateway never ran")
    try:
        conn = connect(path, must_exist=True, timeout=10.0)
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            conn.close()
            raise OutboxError(f"{path} is not a Sluice outbox")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        if "dead_letters" not in tables:  # a file no gateway with dead letters has opened yet
            conn.execute("BEGIN IMMEDIATE")
            for statement in _DEAD_LETTER_SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise OutboxError(_describe(Path(path), "opening for dead letters", exc)) from exc
    return conn


def list_dead_letters(conn: sqlite3.Connection, sink: str | None = None, *,
                      with_readings: bool = False) -> list[DeadLetter]:
    """Every dead letter (of ``sink``, if given), oldest first, on a connection from
    :func:`open_for_dead_letters`."""
    return _list_dead_letters(conn, sink, with_readings)


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in fields.items():
        for kind in (bool, int, float, str):
            if isinstance(value, kind):
                out[str(name)] = kind(value)
                break
        else:
            raise TypeError(f"field {name!r}: {type(value).__name__} is not float, int, bool or str")
    return out


def _storable(message: str) -> str:
    """``message`` as SQLite can store it: a lone surrogate (text decoded with ``surrogateescape``)
    becomes a backslash escape instead of raising ``UnicodeEncodeError`` mid-transaction."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def _describe(path: Path, what: str, exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    text = f"outbox {path}: {what} failed: {exc}" + (f" ({name})" if name else "")
    if name == "SQLITE_FULL":
        text += " — free disk space, or lower buffer.max_bytes"
    elif name and name.startswith("SQLITE_IOERR"):
        text += " — check the storage device (SD card/eMMC wear, mount state)"
    elif name == "SQLITE_BUSY":
        text += " — another process has the outbox open; run one gateway per outbox file"
    return text
