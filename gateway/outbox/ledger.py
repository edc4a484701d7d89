"""The open outbox file's ledger: what is stored and what each sink has, in memory and on disk.

:class:`Ledger` owns the connection and the mirrors of the persisted counters (``last_seq``,
``rows``, ``bytes``, ``dropped``) and positions (``sinks.acked``, ``sink_sent``, ``sink_resend``),
each replaced only after a successful COMMIT; opening (vetting, migrating, checking the counters
against the rows), changing the configured sinks, writing acknowledged positions and deleting what
every sink has. :class:`~gateway.outbox.queue.Outbox` builds the queue's operations on it. The
tables and their invariants are in ``gateway/outbox/schema.py``.

* Acknowledged positions count at once and reach the file with the next commit of readings, or by
  the first ack :data:`ACK_WRITE_DELAY` after the first one not yet written, or with ``stats()``,
  or at close: a crash re-sends at most that much (duplicates, never loss).
* The ``-wal`` stays within :attr:`Ledger.wal_bound` bytes (``gateway/outbox/space.py``): the
  connection checkpoints at half of it and cuts it back to it when it restarts; after a write fails
  for want of space (or with an I/O error) the WAL is checkpointed and truncated to zero, and again
  at the first write that succeeds after that.
* Every change is one transaction (``BEGIN IMMEDIATE`` … ``COMMIT``); a crash or SIGKILL loses
  nothing that was committed (power loss with ``synchronous=normal`` may lose the last commits).
  Only SQLite touches the file: the connection is made by ``gateway/outbox/file.py``'s ``connect``,
  and vetting/moving aside happen only before this process's first connection to it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Self

from gateway.outbox import deadletters
from gateway.outbox.errors import OutboxError, describe, short_of_space
from gateway.outbox.file import connect, vet
from gateway.outbox.schema import migrate, use_wal
from gateway.outbox.space import WAL_MAX, filesystem_bytes, limit_wal, wal_bound

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


class Ledger:
    """The open file, its counters and the sinks' positions (see the module docstring); no I/O in
    ``__init__``. Use its subclass :class:`~gateway.outbox.queue.Outbox`."""

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

    def __enter__(self) -> Self:
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
            vet(self.path)  # only before this process's first connection (gateway/outbox/file.py)
            self.wal_bound = wal_bound(self.max_bytes, filesystem_bytes(self.path.parent))
            self._conn = self._connect()
            self._setup()
        except (sqlite3.Error, OSError) as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise OutboxError(describe(self.path, "opening", exc)) from exc

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
            raise OutboxError(describe(self.path, "changing the configured sinks", exc)) from exc
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
            use_wal(conn)
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
        migrate(conn)  # a new (or empty) file gets the schema, an older one this version's (vet() checked it)
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
            self._dead_letters = sum(deadletters.count(conn, deadletters.READINGS).values())
            conn.execute("COMMIT")
            self._oldest_known = False
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._series_ids.clear()
        self._series_by_id.clear()

    def _write_acks(self) -> None:
        """Write the positions not yet in the file (and delete what every sink has), in one transaction."""
        conn = self._require_open()
        try:
            conn.execute("BEGIN IMMEDIATE")
            deleted = self._delete_acknowledged()
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(exc)
            raise OutboxError(describe(self.path, "recording acknowledged positions", exc)) from exc
        self._committed()
        if deleted:
            self._rows, self._bytes = deleted
            self._oldest_known = False

    # -- sent positions (end-to-end receipts) ------------------------------------------------

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
        if exc is not None and short_of_space(exc):
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

