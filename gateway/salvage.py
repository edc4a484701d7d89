"""`sluice outbox salvage FILE`: copy what a damaged outbox (one moved aside as unusable) still holds
into the live outbox, and say what could not be read.

What goes where, and why
------------------------
* **Readings** not yet delivered become **dead letters of the live outbox, already marked for
  re-sending** (one letter per sink per run of up to :data:`LETTER_READINGS` readings, message
  ``salvaged from <file> …``). That is the outbox's existing way of delivering readings outside
  its own sequence, and the only one another process may use while the gateway runs (the gateway
  alone numbers and appends readings; ``sluice deadletter resend`` only writes the same table):
  each sink's forwarder sends them before its next batch, deletes a letter once the far end
  acknowledged it, and a letter the far end refuses stays, as any dead letter does. Readings keep
  their read time, so a reading delivered before the damage and sent again is the same point.
  A sink gets the readings its position in the damaged file says it had not acknowledged (all of
  them if that position cannot be read, or the sink is new). Letters respect the outbox's
  dead-letter budget (``buffer.max_bytes`` / 4): what does not fit is left for the next run, once
  the first letters are delivered (``sluice deadletter list`` shows them).
* **Trace events** are sealed, hash-chained evidence of the *old* chain: re-sealing them would make
  new events, and appending them to the live chain would break it. They are copied byte for byte
  into the live outbox's ``trace_salvaged(source, seq, lot, time_ns, line)`` table — never
  ``trace_events``, so the live chain and its sinks are untouched — where they are kept like the
  live events (never deleted), and ``--events FILE`` also writes them as JSON Lines in seq order
  (``sluice trace verify`` checks them up to the first unreadable event). The report says which of
  them each sink of the old file had not acknowledged yet: those never left the gateway.
* **Queued lot commands** the old file never applied are listed, not applied: replaying a
  binding change late would date the events wrongly; re-issue them with ``sluice lot``.
* Nothing is ever written to the damaged file (a read-only SQLite connection), and only SQLite
  touches either file. Every write to the live outbox is one short transaction (one letter, or
  up to 500 events), so the gateway waits milliseconds at most.

Idempotent: ``salvage_log(source, sink, first, last)`` in the live outbox (its tables are part of the
outbox schema, ``gateway/outbox/schema.py``) records the seq ranges
already copied for each sink from a source file (by file name: the ``.corrupt-<stamp>`` names are
unique), and trace events are keyed by (source, seq); running it again copies only what the first
run left (a budget that was full, or a run that was interrupted), never the same reading twice.

Reading a damaged B-tree: rows are read in key order in ranges; when a range fails
(``SQLITE_CORRUPT``) every key of it is tried alone, so one bad page costs only its own rows. Keys
are contiguous (readings ``[first, last_seq]``, events ``1..head``), so any key in the range that
was neither read nor found is reported as lost, as ranges, with the pages the integrity check
names.
"""

from __future__ import annotations

import json
import marshal
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.outbox import OutboxError, deadletters
from gateway.outbox.deadletters import encode_letter, open_for_dead_letters
from gateway.outbox.file import CORRUPT_CODES, connect
from gateway.outbox.schema import APPLICATION_ID
from gateway.reading import Reading

__all__ = ["LETTER_READINGS", "SalvageReport", "salvage"]

LETTER_READINGS = 500
"""Readings per salvaged dead letter (one transaction each)."""
_CHUNK = 500


@dataclass
class SalvageReport:
    source: str
    readings_read: int = 0  # decodable readings found in the damaged file
    readings_lost: list[tuple[int, int]] = field(default_factory=list)  # seq ranges not readable
    readings_copied: dict[str, int] = field(default_factory=dict)  # per live sink: readings put in letters now
    readings_left: dict[str, int] = field(default_factory=dict)  # per live sink: not copied, the letter budget was full
    readings_already: int = 0  # readings copied by an earlier run (all sinks)
    letters: int = 0  # dead letters written now
    old_letters_copied: int = 0  # the damaged file's own dead letters, copied as they were
    events_read: int = 0
    events_copied: int = 0
    events_lost: list[tuple[int, int]] = field(default_factory=list)
    events_undelivered: dict[str, tuple[int, int]] = field(default_factory=dict)  # old sink -> (first, last) not acked
    pending_commands: list[tuple[int, int, str, str, str | None]] = field(default_factory=list)
    damaged_pages: list[tuple[int, str]] = field(default_factory=list)  # (page, table) SQLite cannot parse
    pages: int | None = None
    problems: list[str] = field(default_factory=list)  # what could not be read at all (a table, a counter)

    def lines(self) -> list[str]:
        """The report for people, one finding per line."""
        damaged = ", ".join(f"{p} ({t})" for p, t in self.damaged_pages[:20])
        out = [f"{self.source}: {self.pages if self.pages is not None else '?'} pages"
               + (f", damaged: page {damaged}" if damaged else "")]
        out += [f"  could not read: {p}" for p in self.problems]
        lost = sum(b - a + 1 for a, b in self.readings_lost)
        out.append(f"  readings: {self.readings_read} read, {lost} unreadable"
                   + (f" (seq {_ranges_text(self.readings_lost)})" if lost else ""))
        for sink, n in self.readings_copied.items():
            left = self.readings_left.get(sink, 0)
            out.append(f"    sink {sink}: {n} readings copied into dead letters marked for re-sending"
                       + (f"; {left} left — the dead-letter budget is full: run this again once they are "
                          "delivered (`sluice deadletter list`)" if left else ""))
        if self.readings_already:
            out.append(f"    {self.readings_already} copied by an earlier run (not again)")
        if self.old_letters_copied:
            out.append(f"    {self.old_letters_copied} dead letters of the damaged file copied as they were")
        lost_e = sum(b - a + 1 for a, b in self.events_lost)
        out.append(f"  trace events (the old chain): {self.events_read} read, {lost_e} unreadable"
                   + (f" (seq {_ranges_text(self.events_lost)})" if lost_e else "")
                   + f", {self.events_copied} copied now into trace_salvaged")
        for sink, (a, b) in self.events_undelivered.items():
            out.append(f"    old sink {sink} had not received events {a}–{b}: they never left the gateway")
        for cid, time_ns, kind, lot, location in self.pending_commands:
            when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(time_ns / 1e9))
            out.append(f"  lot command {cid} ({kind} {lot}{' ' + location if location else ''}, queued {when}) was never "
                       "applied: run it again with `sluice lot` if it still holds")
        return out

    @property
    def complete(self) -> bool:
        """Everything was readable and everything readable was copied."""
        return not (self.readings_lost or self.events_lost or self.problems or any(self.readings_left.values()))


def _ranges(keys: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for k in sorted(keys):
        if out and k == out[-1][1] + 1:
            out[-1] = (out[-1][0], k)
        else:
            out.append((k, k))
    return out


def _ranges_text(ranges: Sequence[tuple[int, int]], limit: int = 12) -> str:
    text = ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in ranges[:limit])
    return text + (f" and {len(ranges) - limit} more ranges" if len(ranges) > limit else "")


def _corrupt(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorname", None) in CORRUPT_CODES or "malformed" in str(exc)


def _one(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row, or None when the row cannot be read (or there is none)."""
    try:
        row = conn.execute(sql, args).fetchone()
    except sqlite3.DatabaseError as exc:
        if not _corrupt(exc):
            raise
        return None
    return None if row is None else row[0]


def _scan(conn: sqlite3.Connection, table: str, key: str, columns: str, lo: int, hi: int | None,
          lost: list[int], *, contiguous: bool = True) -> Iterator[tuple[Any, ...]]:
    """Rows of ``table`` with ``lo <= key <= hi`` in key order, skipping what cannot be read; the keys
    in that range that could not be read are appended to ``lost`` (``hi`` None, the end being
    unreadable: up to the last row that can be found, and keys after it are not counted). Keys
    that are not ``contiguous`` (ids of deleted rows) count as lost only when reading them failed."""
    select = f"SELECT {key}, {columns} FROM {table}"
    top = hi if hi is not None else 2**62
    done = lo - 1
    found = lo - 1
    while done < top:
        try:
            cur = conn.execute(f"{select} WHERE {key} > ? AND {key} <= ? ORDER BY {key} LIMIT {_CHUNK}", (done, top))
            got = 0
            for row in cur:
                if contiguous:  # a key skipped over is lost
                    lost.extend(range(done + 1, row[0]))
                done = found = row[0]
                got += 1
                yield row
            if got == 0:
                break
            continue
        except sqlite3.DatabaseError as exc:
            if not _corrupt(exc):
                raise
        # The range crosses a damaged page: try each key of the next chunk alone.
        end = min(done + _CHUNK, top)
        for k in range(done + 1, end + 1):
            try:
                row = conn.execute(f"{select} WHERE {key} = ?", (k,)).fetchone()
            except sqlite3.DatabaseError as exc:
                if not _corrupt(exc):
                    raise
                lost.append(k)
                continue
            if row is None:
                if contiguous:
                    lost.append(k)
            else:
                found = k
                yield row
        done = end
        if hi is None and found < done - _CHUNK * 8:
            break  # nothing found for a long stretch past the damage: the end
    if hi is None:
        while lost and lost[-1] > found:
            lost.pop()  # not known to have existed
    elif contiguous:
        lost.extend(range(done + 1, hi + 1))


def _decode_reading(series: dict[int, tuple[str, str, dict[str, str]]], sid: int, data: bytes) -> Reading | None:
    s = series.get(sid)
    if s is None:
        return None
    try:
        time_ns, quality, fields = marshal.loads(data)
    except (ValueError, EOFError, TypeError):
        return None
    if not (isinstance(time_ns, int) and isinstance(quality, str) and isinstance(fields, dict)):
        return None
    return Reading(s[0], time_ns, fields, dict(s[2]), quality, s[1])


def salvage(damaged: Path, live: Path, sinks: Sequence[str], *, letter_budget: int,
            events_out: Path | None = None) -> SalvageReport:
    """Copy what ``damaged`` still holds into the live outbox ``live`` (see the module docstring).
    Raises :class:`OutboxError` when either file cannot be used at all."""
    damaged, live = Path(damaged), Path(live)
    if not damaged.exists():
        raise OutboxError(f"{damaged} does not exist")
    if os.path.realpath(damaged) == os.path.realpath(live):
        raise OutboxError(f"{damaged} is the live outbox (buffer.path) — give the moved-aside file "
                          f"({damaged.name}.corrupt-…)")
    made = [side for side in (Path(f"{damaged}-wal"), Path(f"{damaged}-shm")) if not side.exists()]
    report = SalvageReport(source=damaged.name)
    try:
        src = connect(damaged, readonly=True)
    except sqlite3.Error as exc:
        raise OutboxError(f"{damaged}: cannot open it: {exc}") from exc
    try:
        found = _read(src, report)
    finally:
        src.close()
        for side in made:  # our read-only connection made them: an empty WAL and its index hold no data
            if side.name.endswith("-shm") or (side.exists() and not side.stat().st_size):
                side.unlink(missing_ok=True)
    dst = open_for_dead_letters(live)
    try:
        _write(dst, report, sinks, found, letter_budget)
    except sqlite3.Error as exc:
        raise OutboxError(f"outbox {live}: writing what was salvaged failed: {exc} — run it again: "
                          "what was written is not written twice") from exc
    finally:
        dst.close()
    report.pending_commands = found.commands
    if events_out is not None:
        _export_events(events_out, found.events)
    return report


@dataclass
class _Found:
    """What could be read from the damaged file."""

    readings: list[tuple[int, Reading]] = field(default_factory=list)  # (seq, reading)
    letters: list[tuple[Any, ...]] = field(default_factory=list)  # its own dead letters, as stored
    events: list[tuple[int, str, int, str]] = field(default_factory=list)  # (seq, lot, time_ns, line)
    commands: list[Any] = field(default_factory=list)  # lot commands never applied
    positions: dict[str, int] = field(default_factory=dict)  # readings sink -> acked


def _read(src: sqlite3.Connection, report: SalvageReport) -> _Found:
    report.pages = _one(src, "PRAGMA page_count")
    # dbstat walks every table's B-tree and marks the pages it cannot parse; the integrity check's
    # messages name pages too, when it can run at all.
    damaged = {(int(p), str(t)) for p, t in _safe_rows(src, "SELECT pageno, name FROM dbstat WHERE pagetype='corrupted'")}
    try:
        problems = [r[0] for r in src.execute("PRAGMA integrity_check(100)")]
    except sqlite3.DatabaseError as exc:
        problems = [str(exc)]
    if problems != ["ok"]:
        damaged |= {(int(p), "?") for msg in problems for p in re.findall(r"[Pp]age (\d+)", msg)
                    if not any(int(p) == q for q, _t in damaged)}
    report.damaged_pages = sorted(damaged)
    if _one(src, "PRAGMA application_id") not in (APPLICATION_ID, None):
        raise OutboxError("the file is not a Sluice outbox (application_id) — nothing to salvage from it")
    try:
        tables = {r[0] for r in src.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        if not _corrupt(exc):
            raise
        report.problems.append(f"the schema ({exc}): nothing can be read")
        return _Found()

    # series: device, measurement, tags of each reading
    series: dict[int, tuple[str, str, dict[str, str]]] = {}
    lost_series: list[int] = []
    if "series" in tables:
        top = _one(src, "SELECT max(id) FROM series")
        for sid, text in _scan(src, "series", "id", "key", 1, top, lost_series, contiguous=False):
            try:
                device, measurement, tags = json.loads(text)
                series[sid] = (str(device), str(measurement), {str(k): str(v) for k, v in tags.items()})
            except (ValueError, TypeError, AttributeError):
                lost_series.append(sid)
    # readings: [first, last_seq], contiguous
    readings: list[tuple[int, Reading]] = []
    if "readings" in tables:
        last = _one(src, "SELECT last_seq FROM state") if "state" in tables else None
        if last is None:
            last = _one(src, "SELECT max(seq) FROM readings")
            if last is None:
                report.problems.append("the outbox counters (state) and the last reading: readings are read "
                                       "up to the last one found")
        first = _one(src, "SELECT min(seq) FROM readings")
        if first is None:
            acked = [a for (a,) in _safe_rows(src, "SELECT acked FROM sinks")] if "sinks" in tables else []
            first = min(acked) + 1 if acked else 1
        lost: list[int] = []
        for seq, sid, data in _scan(src, "readings", "seq", "series, data", first, last, lost):
            r = _decode_reading(series, sid, data)
            if r is None:
                lost.append(seq)
            else:
                readings.append((seq, r))
        report.readings_read = len(readings)
        report.readings_lost = _ranges(lost)
    letters: list[tuple[Any, ...]] = []
    if "dead_letters" in tables:
        lost_letters: list[int] = []
        top = _one(src, "SELECT max(id) FROM dead_letters")
        # From schema version 3 the store also holds trace letters (no readings): they are not copied.
        columns = {r[1] for r in _safe_rows(src, "PRAGMA table_info(dead_letters)")}
        stream = "stream" if "stream" in columns else "'readings'"
        for *row, kind in _scan(src, "dead_letters", "id", f"sink, time_ns, count, readings, message, resend, attempts, "
                                f"{stream}", 1, top, lost_letters, contiguous=False):
            if kind != deadletters.READINGS:
                continue
            try:
                ok = isinstance(marshal.loads(row[4]), list)
            except (ValueError, EOFError, TypeError):
                ok = False
            if ok:
                letters.append(tuple(row))
            else:
                lost_letters.append(row[0])
        if lost_letters:
            report.problems.append(f"dead letters {_ranges_text(_ranges(lost_letters))}")
    events: list[tuple[int, str, int, str]] = []
    if "trace_events" in tables:
        head = _one(src, "SELECT seq FROM trace_chain WHERE id=0") if "trace_chain" in tables else None
        if head is None:
            head = _one(src, "SELECT max(seq) FROM trace_events")
        lost_events: list[int] = []
        events = list(_scan(src, "trace_events", "seq", "lot, time_ns, line", 1, head, lost_events))
        report.events_read = len(events)
        report.events_lost = _ranges(lost_events)
        if "trace_sinks" in tables and events:
            top_seq = max(head or 0, events[-1][0])
            for name, acked in _safe_rows(src, "SELECT name, acked FROM trace_sinks"):
                if acked < top_seq:
                    report.events_undelivered[str(name)] = (int(acked) + 1, top_seq)
    commands: list[Any] = []
    if "trace_commands" in tables:
        commands = _safe_rows(src, "SELECT id, time_ns, kind, lot, location FROM trace_commands WHERE status IS NULL "
                                   "ORDER BY id")
    # positions of the old sinks, for which readings each had not acknowledged
    positions = {str(k): int(v) for k, v in _safe_rows(src, "SELECT name, acked FROM sinks")} if "sinks" in tables else {}
    return _Found(readings, letters, events, commands, positions)


def _safe_rows(conn: sqlite3.Connection, sql: str) -> list[Any]:
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.DatabaseError as exc:
        if not _corrupt(exc):
            raise
        return []


def _write(dst: sqlite3.Connection, report: SalvageReport, sinks: Sequence[str], found: _Found, budget: int) -> None:
    readings, positions, events = found.readings, found.positions, found.events
    source = report.source
    room = budget - deadletters.letter_bytes(dst)
    for sink in sinks:
        done = dst.execute("SELECT first, last FROM salvage_log WHERE source=? AND sink=?", (source, sink)).fetchall()
        floor = positions.get(sink, -1)  # the sink had every seq <= floor
        todo = [(seq, r) for seq, r in readings if seq > floor and not any(a <= seq <= b for a, b in done)]
        report.readings_already += sum(1 for seq, _r in readings if seq > floor) - len(todo)
        copied = 0
        for i in range(0, len(todo), LETTER_READINGS):
            part = todo[i:i + LETTER_READINGS]
            blob = encode_letter([r for _seq, r in part])
            if len(blob) > room:
                break
            first, last = part[0][0], part[-1][0]
            message = (f"salvaged from {source}: readings seq {first}–{last} of the damaged outbox, not yet "
                       f"delivered to this sink when it was moved aside")

            def put(sink: str = sink, part: list[tuple[int, Reading]] = part, blob: bytes = blob,
                    first: int = first, last: int = last, message: str = message) -> None:
                deadletters.insert(dst, deadletters.READINGS, sink, message, blob=blob, count=len(part), resend=True)
                dst.execute("INSERT INTO salvage_log VALUES (?, ?, ?, ?)", (source, sink, first, last))
            _transaction(dst, put)
            room -= len(blob)
            copied += len(part)
            report.letters += 1
        report.readings_copied[sink] = copied
        report.readings_left[sink] = len(todo) - copied
    # the damaged file's own dead letters: as they were, once
    for lid, sink, time_ns, count, blob, message, resend, attempts in found.letters:
        key = f"letter {lid}"
        if dst.execute("SELECT 1 FROM salvage_log WHERE source=? AND sink=? AND first=?", (source, key, lid)).fetchone():
            continue

        def put_letter(lid: int = lid, sink: str = sink, time_ns: int = time_ns, count: int = count, blob: bytes = blob,
                       message: str = message, resend: int = resend, attempts: int = attempts, key: str = key) -> None:
            deadletters.insert(dst, deadletters.READINGS, sink, deadletters.storable(
                f"{message} [salvaged from {source}, letter {lid}]"), blob=blob, count=count, time_ns=time_ns,
                resend=bool(resend), attempts=attempts)
            dst.execute("INSERT INTO salvage_log VALUES (?, ?, ?, ?)", (source, key, lid, lid))
        _transaction(dst, put_letter)
        report.old_letters_copied += 1
    for i in range(0, len(events), _CHUNK):
        chunk = events[i:i + _CHUNK]

        def put_events(chunk: list[tuple[int, str, int, str]] = chunk) -> None:
            before = dst.total_changes
            dst.executemany("INSERT OR IGNORE INTO trace_salvaged VALUES (?, ?, ?, ?, ?)",
                            [(source, seq, lot, time_ns, line) for seq, lot, time_ns, line in chunk])
            report.events_copied += dst.total_changes - before
        _transaction(dst, put_events)


def _transaction(conn: sqlite3.Connection, body: Callable[[], object]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        body()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _export_events(path: Path, events: list[tuple[int, str, int, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for _seq, _lot, _t, line in events), encoding="utf-8")
    os.replace(tmp, path)
