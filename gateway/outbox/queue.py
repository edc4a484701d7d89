"""The durable outbox: every reading is committed here before any sink sees it, and leaves only
once every configured sink has it (or the ``when_full`` policy dropped it, counted).

:class:`Outbox` is the queue: :meth:`~Outbox.append` (one transaction per poll cycle, a backlog in
slices), :meth:`~Outbox.fetch` and :meth:`~Outbox.ack` per sink, the sent positions of sinks with
end-to-end receipts, :meth:`~Outbox.stats`, and the readings' side of the dead-letter store
(:meth:`~Outbox.reject` and what the forwarder re-sends). Its file, counters and positions are
:class:`~gateway.outbox.ledger.Ledger`'s; the tables and their invariants are in
``gateway/outbox/schema.py``.

* Readings are stored as ``(seq, series, data)``: the part of a reading that is the same for every
  poll of a device (device, measurement, tags) once in ``series``; ``data`` is ``marshal`` v4 of
  ``[time_ns, quality, fields]`` — ints stay ints (any size), floats floats (exact), bools bools,
  strings strings. (Compact JSON was measured 8x slower to encode and 5x slower to decode here and
  50 % larger; pickle could run code from a tampered file.) A row that cannot be decoded is skipped
  by ``fetch`` with an ERROR log and leaves with the next acknowledgement.
* A sink's pending readings are those above its acknowledged position; a new sink starts at the
  oldest stored row, a sink no longer configured loses its position. With no sink configured
  nothing is deleted except by ``when_full``.
* ``bytes`` (the sum of ``len(data) + ROW_OVERHEAD`` over stored rows, the payload, not the file)
  is what ``max_bytes`` bounds: measured with drop_oldest in steady state, the file stays within
  ~1 % of ``max_bytes``; ``max_pages`` is a hard cap on the file for when that is not enough. One
  transaction stores at most a quarter of the WAL bound (:meth:`Outbox.append` splits a larger batch).
* The sent position (``sink_sent``) of a sink with end-to-end receipts never decides what is
  deleted: ``acked <= sent <= last_seq``; :meth:`Outbox.ack` raises ``sent`` with ``acked``;
  :meth:`Outbox.rewind_sent` moves it back to ``acked`` with the re-send backoff (``sink_resend``),
  which a receipt that moves ``acked`` clears (:meth:`Outbox.clear_resend`).
* A batch a sink's far end refuses as data becomes a dead letter in the same transaction that moves
  the sink's position past it (:meth:`Outbox.reject`); letters are capped by
  ``dead_letter_max_bytes`` (a quarter of ``max_bytes`` by default, oldest deleted first).
"""

from __future__ import annotations

import json
import logging
import marshal
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.outbox import deadletters
from gateway.outbox.deadletters import MARSHAL_VERSION, DeadLetter, plain_fields
from gateway.outbox.errors import OutboxError, describe
from gateway.outbox.ledger import ACK_WRITE_DELAY, ROW_OVERHEAD, Ledger
from gateway.reading import Reading

__all__ = ["ACK_WRITE_DELAY", "ROW_OVERHEAD", "Entry", "Outbox", "OutboxStats"]

log = logging.getLogger(__name__)

_dumps = marshal.dumps
_loads = marshal.loads
# json.dumps with arguments builds a new encoder per call: bind one (series keys only).
_json = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored reading and its sequence number (strictly increasing, never reused in one file)."""

    seq: int
    reading: Reading


@dataclass(frozen=True, slots=True)
class OutboxStats:
    rows: int
    bytes: int  # sum of len(payload) + ROW_OVERHEAD over stored rows: what max_bytes bounds
    oldest_ns: int | None  # time_ns of the oldest stored reading
    dropped: int  # readings dropped by the when_full policy since the file was created (persisted)
    pending: dict[str, int]  # per sink: rows not yet acknowledged by it
    dead_letters: int = 0  # readings letters in the dead-letter store (every sink)


class Outbox(Ledger):
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
                data = _dumps([r.time_ns, r.quality, r.fields], MARSHAL_VERSION)
            except ValueError:  # a subclass (IntEnum, numpy float64 ...): store the plain value
                data = _dumps([int(r.time_ns), str(r.quality), plain_fields(r.fields)], MARSHAL_VERSION)
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
            raise OutboxError(describe(self.path, f"storing {batch} readings", exc)) from exc
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
            raise OutboxError(describe(self.path, f"reading entries for sink {sink}", exc)) from exc
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
            raise OutboxError(describe(self.path, f"clearing the re-send time of sink {sink}", exc)) from exc
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
            raise OutboxError(describe(self.path, f"recording seq {seq} as sent for sink {sink}", exc)) from exc
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
        blob = deadletters.encode_letter([e.reading for e in entries])
        message = deadletters.storable(message)  # before BEGIN: an error inside would leave the transaction open
        try:
            conn.execute("BEGIN IMMEDIATE")
            letter = deadletters.insert(conn, deadletters.READINGS, sink, message, blob=blob, count=len(entries))
            trimmed = deadletters.trim(conn, self.dead_letter_max_bytes, letter, self.path)
            deleted = None
            if upto > before:
                conn.execute("UPDATE sinks SET acked=? WHERE name=?", (upto, sink))
                self._acked[sink] = upto
                deleted = self._delete_acknowledged()
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._acked[sink] = before
            self._rollback(exc)
            raise OutboxError(describe(self.path, f"moving {len(entries)} readings of sink {sink} to the "
                                        "dead-letter table", exc)) from exc
        self._dead_letters += 1 - trimmed
        if deleted:
            self._rows, self._bytes = deleted
            self._oldest_known = False
        return int(letter)


    def dead_letters(self, sink: str | None = None, *, with_readings: bool = False) -> list[DeadLetter]:
        """Every readings letter (of ``sink``, if given), oldest first."""
        return deadletters.list_dead_letters(self._require_open(), sink, with_readings=with_readings,
                                             stream=deadletters.READINGS)

    def next_resend(self, sink: str) -> DeadLetter | None:
        """The oldest letter of ``sink`` marked for re-sending, with its readings, or None."""
        conn = self._require_open()
        try:
            return deadletters.next_resend(conn, sink)
        except sqlite3.Error as exc:
            raise OutboxError(describe(self.path, f"reading dead letters of sink {sink}", exc)) from exc

    def resolve(self, letter_id: int) -> None:
        """The letter was delivered after all: delete it."""
        self._letter_change(deadletters.resolve, (letter_id,), f"deleting dead letter {letter_id}")

    def refused_again(self, letter_id: int, message: str) -> None:
        """A re-sent letter was refused again: unmark it, keep the new message, count the attempt."""
        self._letter_change(deadletters.refused_again, (letter_id, message), f"updating dead letter {letter_id}")

    def mark_resend(self, ids: Sequence[int] | None = None, sink: str | None = None) -> int:
        """Mark letters for re-sending (``ids``, or all of ``sink``, or all); returns how many."""
        return deadletters.mark_resend(self._require_open(), ids, sink)

    def _letter_change(self, change: Any, args: tuple[Any, ...], what: str) -> None:
        conn = self._require_open()
        try:
            change(conn, *args)
            # Counted, not decremented: `sluice outbox salvage` adds letters from another process.
            count = sum(deadletters.count(conn, deadletters.READINGS).values())
        except sqlite3.Error as exc:
            self._rollback(exc)
            raise OutboxError(describe(self.path, what, exc)) from exc
        self._dead_letters = count

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


