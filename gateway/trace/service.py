"""The running trace engine: observes readings, applies queued binding commands, seals events
into ``trace.db`` and delivers them, in order, to the trace sinks.

Lifecycle: ``TraceService(cfg, state_dir)`` (no I/O) -> ``async with service`` (opens the
journal, loads or creates the signing key, restores bindings, applies the lots' configured
locations once) -> :meth:`observe` is called with every reading (the gateway's ``on_reading``
hook; never blocks) -> :meth:`run` until cancelled. Everything runs on the event loop.

Delivery follows the outbox's rule: a sink's position moves only after the sink confirmed
(the JSON Lines sink: after ``fsync``); on failure the same events are sent again, in order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.reading import Reading
from gateway.trace.config import JsonlSinkConfig, TraceConfig
from gateway.trace.engine import Command, TraceCore
from gateway.trace.journal import Journal
from gateway.trace.seal import Sealer, load_or_create_key

__all__ = ["JsonlSink", "TraceService", "state_dir"]

log = logging.getLogger(__name__)

TICK = 1.0
"""Seconds between looks at the command table, the clock and the sinks."""


def state_dir() -> Path:
    return Path(os.environ.get("STATE_DIRECTORY", ".").split(":")[0])


def resolve(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else base / path


class JsonlSink:
    """Appends lines to a file; exactly once: lines whose seq the file already ends with are skipped."""

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        self._last: int | None = None

    def _last_seq(self) -> int:
        import json

        try:
            with self.path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 65536))
                tail = f.read().splitlines()
        except FileNotFoundError:
            return 0
        for raw in reversed(tail):
            try:
                return int(json.loads(raw)["epcisBody"]["eventList"][0]["sluice:seq"])
            except (ValueError, KeyError, IndexError, TypeError):
                continue
        return 0

    def send(self, batch: Sequence[tuple[int, str]]) -> None:
        """Raises OSError when the file cannot be written; nothing is then acknowledged."""
        if self._last is None:
            self._last = self._last_seq()
        fresh = [line for seq, line in batch if seq > self._last]
        if fresh:
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in fresh))
                f.flush()
                os.fsync(f.fileno())
        self._last = max(self._last, batch[-1][0])


class TraceService:
    """See the module docstring."""

    def __init__(self, cfg: TraceConfig, state: Path | None = None, sinks: dict[str, Any] | None = None,
                 clock: Any = time.time_ns) -> None:
        self.cfg = cfg
        self.state = state or state_dir()
        self._clock = clock
        self._sinks = sinks
        self._pending: list[dict[str, Any]] = []
        self._journal: Journal | None = None
        self._failing: set[str] = set()
        self.core: TraceCore | None = None
        self.sealer: Sealer | None = None

    async def __aenter__(self) -> TraceService:
        journal = Journal(resolve(self.cfg.file.database, self.state)).__enter__()
        self._journal = journal
        key = load_or_create_key(resolve(self.cfg.file.key_file, self.state))
        seq, head = journal.chain()
        self.sealer = Sealer(key, self.cfg.gateway_id, seq, head)
        self.core = TraceCore(self.cfg, journal.bindings())
        if self._sinks is None:
            self._sinks = {name: JsonlSink(name, resolve(s.path, self.state))
                           for name, s in self.cfg.file.sinks.items() if isinstance(s, JsonlSinkConfig)}
        done = journal.applied()
        for lot_id, lot in self.cfg.file.lots.items():
            if lot.location is not None and lot_id not in done and lot_id not in self.core.lots:
                journal.queue("start", lot_id, lot.location, "config", self._clock())
        journal.commit([], (self.sealer.seq, self.sealer.head), self.core.state(),
                       applied=[k for k, v in self.cfg.file.lots.items() if v.location])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._journal is not None:
            try:
                self.step()
            finally:
                self._journal.__exit__()
                self._journal = None

    def observe(self, reading: Reading) -> None:
        """Every reading, as it is read. Never blocks, never raises."""
        try:
            assert self.core is not None
            self._pending += self.core.feed(reading)
        except Exception:
            log.exception("trace: reading of %s could not be traced", reading.device)

    def step(self) -> None:
        """One round: commit observed events, apply queued commands, close due windows, deliver."""
        journal, core = self._journal, self.core
        assert journal is not None and core is not None
        self._commit(self._pending)
        self._pending = []
        for cid, t, kind, lot, location, source in journal.pending_commands():
            try:
                events = core.command(Command(kind, lot, location, t, source))
            except ValueError as exc:
                log.warning("trace: %s %s refused: %s", kind, lot, exc)
                self._commit([], (cid, f"refused: {exc}"))
                continue
            self._commit(events, (cid, "done"))
        self._commit(core.tick(self._clock()))
        self.deliver()

    def _commit(self, events: list[dict[str, Any]], command: tuple[int, str] | None = None) -> None:
        if not events and command is None:
            return
        sealer, journal, core = self.sealer, self._journal, self.core
        assert sealer is not None and journal is not None and core is not None
        seq, head = sealer.seq, sealer.head
        try:
            sealed = []
            for event in events:
                line = sealer.seal(event)
                sealed.append((sealer.seq, event["sluice:lot"], 0, line))
            journal.commit(sealed, (sealer.seq, sealer.head), core.state(), command)
        except BaseException:
            sealer.seq, sealer.head = seq, head  # nothing stored: the chain continues from the stored head
            raise

    def deliver(self) -> None:
        journal = self._journal
        assert journal is not None and self._sinks is not None
        for name, sink in self._sinks.items():
            while True:
                batch = journal.fetch(name)
                if not batch:
                    break
                try:
                    sink.send(batch)
                except OSError as exc:
                    if name not in self._failing:
                        log.error("trace sink %s: %s — events are kept in %s and sent when it works again",
                                  name, exc, journal.path)
                        self._failing.add(name)
                    break
                journal.ack(name, batch[-1][0])
                if name in self._failing:
                    log.info("trace sink %s: delivering again", name)
                    self._failing.discard(name)

    async def run(self) -> None:
        """Step every :data:`TICK` seconds until cancelled."""
        while True:
            self.step()
            await asyncio.sleep(TICK)
