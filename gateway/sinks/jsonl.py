"""The JSON Lines trace sink: one file per chain, each event in it exactly once.

Contract: gateway/sinks/base.py (an :class:`~gateway.sinks.base.EventSink`): the delivery engine
calls :meth:`JsonlSink.send` with batches of ``(seq, line)`` from the outbox, in seq order, the same
events again after any failure, and moves the position only when ``send`` returned (after the
``fsync``); a file that cannot be written raises :class:`~gateway.sinks.base.SinkUnavailable` and
the next attempt waits :data:`RETRY` (:meth:`JsonlSink.wait_connected`). :meth:`JsonlSink.send_head`
gets the newest signed head for what it took. :meth:`JsonlSink.write` and
:meth:`JsonlSink.write_head` are the same, synchronous, raising OSError:

* **Exactly once within a chain.** Lines whose seq the file already ends with are skipped: a batch
  sent again after a crash between the ``fsync`` and the acknowledgement is not written twice.
* **One chain per file.** The outbox holds one chain (``sluice:chain``, fixed at its genesis,
  ``gateway/trace/journal.py``). An outbox moved aside as unusable takes its chain with it and the
  fresh one starts a new chain at seq 1. When the first batch names another chain than the file's
  last event, the skip rule must not apply (it would drop the new chain's first events): the file
  and its ``.head`` are moved aside as ``<path>.chain-<old chain id>`` (``…chain-unnamed-<UTC
  time>`` for a chain begun before chain ids) and ``<path>.chain-<id>.head``, ONE warning names both
  files and the salvage command for the old chain's events the feed never received, and the new
  chain starts a new file at ``path``. Nothing is deleted or rewritten: each file verifies on its own
  (``sluice trace verify <path>.chain-<id>`` uses its ``.head`` by itself).
* Only ``os.replace`` renames, the head first: a crash between the two renames leaves the old
  chain's file at ``path`` with no ``.head`` and its head already aside; the next start finds the
  old chain there again and finishes the move under the same name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.outbox.file import fsync_dir
from gateway.sinks.base import Event, Paced, Receipting, Result, SinkUnavailable, Where
from gateway.trace.config import JsonlSinkConfig
from gateway.trace.seal import CHAIN

__all__ = ["JsonlSink", "create"]

log = logging.getLogger("gateway.trace.service")

_TAIL = 65536
"""Bytes read from the end of the file to find its last event."""
RETRY = 1.0
"""Seconds between attempts to write a file that could not be written."""


@dataclass(frozen=True)
class _Tail:
    seq: int
    chain: str | None


def _parse(line: str | bytes) -> _Tail | None:
    """(seq, chain) of a feed line, or None when it is not one (a torn or foreign line)."""
    try:
        event = json.loads(line)["epcisBody"]["eventList"][0]
        return _Tail(int(event["sluice:seq"]), event.get(CHAIN))
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class JsonlSink(Paced):
    """See the module docstring. ``outbox`` (the outbox file) only lets the chain-switch warning name
    the newest moved-aside outbox, where the old chain's undelivered events are."""

    def __init__(self, name: str, path: Path, outbox: Path | None = None) -> None:
        self.name, self.path = name, path
        self.head_path = path.with_name(path.name + ".head")
        self.outbox = outbox
        self._tail: _Tail | None = None
        self._read = False
        self._retry_at = 0.0
        self.last_error: str | None = None
        self._head_error: str | None = None
        self.receipts: Receipting | None = None
        self.refused = 0
        self.takes_heads = True

    async def __aenter__(self) -> JsonlSink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(self, batch: Sequence[Event]) -> Result:
        try:
            self.write(batch)
        except OSError as exc:
            self.last_error = str(exc)
            self._retry_at = asyncio.get_running_loop().time() + RETRY
            raise SinkUnavailable(str(exc)) from exc
        self.last_error = None
        return Result.whole(len(batch))

    async def send_head(self, head: str) -> None:
        """:meth:`write_head`; a failure is logged (once until it works again), not raised: the
        service tries again after ``head_interval``."""
        try:
            self.write_head(head)
        except OSError as exc:
            if self._head_error is None:
                log.warning("trace sink %s: the signed head could not be written (%s); trying again later",
                            self.name, exc)
            self._head_error = str(exc)
        else:
            self._head_error = None

    def subscribe(self, handler: Callable[[str, bytes], None]) -> None:
        """A file carries no binding commands."""

    async def reply(self, payload: bytes) -> None:
        raise SinkUnavailable("a file carries no command replies")

    def write_head(self, head: str) -> None:
        """Replace ``<path>.head`` with ``head`` (write, fsync, rename); raises OSError."""
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(head + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.head_path)

    def _last(self) -> _Tail | None:
        """The file's last event (None: no file, or no event in it)."""
        try:
            with self.path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _TAIL))
                tail = f.read().splitlines()
        except FileNotFoundError:
            return None
        return next((t for raw in reversed(tail) if (t := _parse(raw)) is not None), None)

    def write(self, batch: Sequence[Event]) -> None:
        """Raises OSError when the file cannot be written; nothing is then acknowledged."""
        if not batch:
            return
        if not self._read:
            self._tail, self._read = self._last(), True
        first = _parse(batch[0][1])
        chain = first.chain if first is not None else None
        if self._tail is not None and self._tail.chain != chain:
            self._switch(self._tail, chain, batch[0][0])
            self._tail = None
        last = self._tail.seq if self._tail is not None else 0
        fresh = [line for seq, line in batch if seq > last]
        if fresh:
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in fresh))
                f.flush()
                os.fsync(f.fileno())
        self._tail = _Tail(max(last, batch[-1][0]), chain)

    def _switch(self, old: _Tail, chain: str | None, seq: int) -> None:
        """Move the old chain's file and head aside (see the module docstring)."""
        label = old.chain if old.chain is not None else "unnamed-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        n = 0
        while True:  # a free name, or the one a move cut short by a crash left its head under
            aside = self.path.with_name(f"{self.path.name}.chain-{label}" + (f".{n}" if n else ""))
            head = aside.with_name(aside.name + ".head")
            if not aside.exists() and not (head.exists() and self.head_path.exists()):
                break
            n += 1
        try:
            os.replace(self.head_path, head)
        except FileNotFoundError:
            pass
        os.replace(self.path, aside)
        fsync_dir(self.path.parent)
        head_note = f"its signed head is {head}" if head.exists() else "it had no signed head"
        outbox = _newest_aside(self.outbox)
        where = (f"the moved-aside outbox {outbox}" if outbox is not None else
                 "the outbox file moved aside as unusable (<outbox>.corrupt-<time>)")
        log.warning("trace sink %s: the outbox holds a new chain (%s, from seq %d): the outbox was replaced, most likely "
                    "moved aside as unusable at start. %s held %s up to seq %d: moved it to %s (%s); the new chain goes "
                    "to %s. Events of the old chain this feed never received are in %s: `sluice outbox salvage %s "
                    "--events FILE` exports them", self.name, _name(chain), seq, self.path, _name(old.chain), old.seq,
                    aside, head_note, self.path, where, outbox or "FILE")


def _name(chain: str | None) -> str:
    return f"chain {chain}" if chain is not None else "a chain without an id"


def _newest_aside(outbox: Path | None) -> Path | None:
    """The newest ``<outbox>.corrupt-*`` beside the outbox (names only: nothing is opened)."""
    if outbox is None:
        return None
    try:
        names = [n for n in os.listdir(outbox.parent) if n.startswith(outbox.name + ".corrupt-") and not n.endswith("-wal")]
    except OSError:
        return None
    return outbox.with_name(max(names)) if names else None  # `.corrupt-<UTC stamp>[.n]`: the newest sorts last


def create(name: str, config: JsonlSinkConfig, where: Where) -> JsonlSink:
    """The registry's factory (gateway/sinks/__init__.py): paths relative to the state directory."""
    path = config.path if config.path.is_absolute() else where.state / config.path
    return JsonlSink(name, path, where.outbox)
