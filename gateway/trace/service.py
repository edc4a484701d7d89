"""The running trace engine: observes readings, applies queued binding commands, seals events
into the gateway's durable outbox (its ``trace_*`` tables, ``gateway/trace/journal.py``) and delivers them, in order, to the trace sinks.

Lifecycle: ``TraceService(cfg, state_dir)`` (no I/O) -> ``async with service`` (opens the
journal, loads or creates the signing key, restores bindings, applies the lots' configured
locations once) -> :meth:`observe` is called with every reading (the gateway's ``on_reading``
hook; never blocks) -> :meth:`run` until cancelled. Everything runs on the event loop.

Delivery is the gateway's one delivery engine (gateway/sinks/engine.py) over the trace events
stream (gateway/sinks/events.py): a sink's position moves only after the sink confirmed (the JSON
Lines sink, ``gateway/sinks/jsonl.py``: after ``fsync``; MQTT: PUBACK; EPCIS capture: a 2xx); on
failure the same events are sent again, in order. Every sink (built by the sink registry,
gateway/sinks/__init__.py) has its own task ``trace-sink[<name>]``, started on entering, woken by
every commit; when a sink has taken every event it gets its due signed head. At a stop the JSON
Lines sinks are written once more (what the last step sealed). An event an EPCIS repository refuses
as a document becomes a dead letter in the outbox (``sluice trace deadletters``) and the sink goes
on with the next one.

Binding commands arrive from the CLI (queued in the outbox by another process) and from the
MQTT command topic of an MQTT trace sink: ``{"op": "start|move|end", "lot": ..., "location":
..., "id": <anything, echoed>}``. A valid command is queued in the outbox and applied at once
like the CLI's; the answer (``{"id", "ok", "status"}``, ``status`` ``done`` or ``refused: why``,
or the error for an invalid message) goes to the sink's reply topic.

Late readings (for a window that had already closed: grace too short, or a lot that left early)
are not used; :attr:`TraceService.late` counts them since start (for the health module) and a
WARNING names the new ones, at most once per window.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

from gateway.config import Config, ConfigErrors
from gateway.health import add_metrics
from gateway.reading import Reading
from gateway.sinks import make_sink
from gateway.sinks.base import Event, EventSink, SinkUnavailable, Where
from gateway.sinks.engine import Delivery
from gateway.sinks.events import BATCHING, EventStream, pack_events
from gateway.trace.config import JsonlSinkConfig, TraceConfig, check_reload, load_trace_config
from gateway.trace.engine import Command, TraceCore
from gateway.trace.journal import Journal
from gateway.trace.seal import Sealer, load_or_create_key

__all__ = ["METRICS", "TraceService", "reloading", "state_dir"]

log = logging.getLogger(__name__)

TICK = 1.0
"""Seconds between looks at the command table, the clock and the sinks."""


METRICS: dict[str, tuple[str, str]] = {
    # name: (type, help) — added to the gateway's /metrics while the feed runs; the README lists them.
    "sluice_trace_events_total": ("counter", "Trace events sealed and stored in the outbox by this process"),
    "sluice_trace_chain_seq": ("gauge", "Sequence number of the chain head (the last event in the outbox)"),
    "sluice_trace_last_event_timestamp_seconds": ("gauge", "Unix time the last trace event was sealed (0: none)"),
    "sluice_trace_late_readings_total": ("counter", "Readings not used because their window had already closed"),
    "sluice_trace_sink_delivered_total": ("counter", "Trace events the sink acknowledged (all time, from the outbox)"),
    "sluice_trace_sink_pending_events": ("gauge", "Trace events in the outbox not yet acknowledged by the sink"),
    "sluice_trace_sink_dead_letters_total": ("counter", "Trace events the sink's far end refused (dead letters)"),
    "sluice_trace_sink_publishes_refused_total": ("counter", "MQTT 5: trace publishes the broker refused, kept and retried"),
}


def state_dir() -> Path:
    return Path(os.environ.get("STATE_DIRECTORY", ".").split(":")[0])


def resolve(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else base / path


class TraceService:
    """See the module docstring."""

    def __init__(self, cfg: TraceConfig, state: Path | None = None, sinks: dict[str, EventSink] | None = None,
                 clock: Any = time.time_ns) -> None:
        self.cfg = cfg
        self.state = state or state_dir()
        self._clock = clock
        self._given = sinks  # sinks given instead of trace.yaml's (not entered yet)
        self._pending: list[dict[str, Any]] = []
        # Events (and the command they answer) the core produced but the journal could not store yet
        # (a full disk): stored first, in order, before anything else is taken from the core.
        self._unstored: list[tuple[list[dict[str, Any]], tuple[int, str] | None]] = []
        self._store_failing = False
        self._journal: Journal | None = None
        self._injected = sinks is not None
        self.sinks: dict[str, EventSink] = {}
        """The running sinks, by name."""
        self.deliveries: dict[str, Delivery[Event, Event]] = {}
        """Their delivery engines (gateway/sinks/engine.py), by name."""
        self._files: set[str] = set()  # sinks written once more at the stop (JSON Lines files)
        self._stacks: dict[str, AsyncExitStack] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._resink: asyncio.Task[None] | None = None
        self._replies: set[asyncio.Task[None]] = set()
        self.core: TraceCore | None = None
        self.sealer: Sealer | None = None
        self._late_logged = 0
        self._late_window: int | None = None
        self.emitted = 0
        """Events sealed and stored since start."""
        self.last_sealed_ns = 0
        self._unregister: Any = None
        self._heads: dict[str, tuple[int, float]] = {}  # sink -> (seq, monotonic time) of the last head it took

    @property
    def late(self) -> int:
        """Readings dropped since start because their window had already closed (a counter)."""
        return self.core.late if self.core is not None else 0

    async def __aenter__(self) -> TraceService:
        journal = Journal(resolve(self.cfg.database, self.state), check=True).__enter__()
        self._journal = journal
        key = load_or_create_key(resolve(self.cfg.file.key_file, self.state))
        seq, head = journal.chain()
        self.sealer = Sealer(key, self.cfg.gateway_id, seq, head, journal.chain_id())
        self.core = TraceCore(self.cfg, journal.bindings())
        self._queue_config_lots()
        self.last_sealed_ns = journal.last_sealed_ns()
        self._unregister = add_metrics(self.metrics)
        try:
            if self._given is not None:
                for name, sink in self._given.items():
                    await self._start(name, sink, file=True)
            else:
                for name in self.cfg.file.sinks:
                    await self._start_sink(name)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    def _queue_config_lots(self) -> None:
        """Lots that trace.yaml puts in a location start there once (at the first start that sees them)."""
        journal, core, sealer = self._journal, self.core, self.sealer
        assert journal is not None and core is not None and sealer is not None
        done = journal.applied()
        for lot_id, lot in self.cfg.file.lots.items():
            if lot.location is not None and lot_id not in done and lot_id not in core.lots:
                journal.queue("start", lot_id, lot.location, "config", self._clock())
        journal.commit([], (sealer.seq, sealer.head), core.state(),
                       applied=[k for k, v in self.cfg.file.lots.items() if v.location])

    async def _start_sink(self, name: str) -> None:
        config = self.cfg.file.sinks[name]
        where = Where(self.cfg.gateway_id, self.cfg.site, self.state, resolve(self.cfg.database, self.state))
        await self._start(name, make_sink(name, config, where, feed="trace"), file=isinstance(config, JsonlSinkConfig))

    async def _start(self, name: str, sink: EventSink, *, file: bool) -> None:
        """Enter ``sink`` and start its delivery task."""
        journal = self._journal
        assert journal is not None
        sink.subscribe(lambda _topic, payload: self._on_command(sink, payload))
        stack = AsyncExitStack()
        await stack.enter_async_context(sink)  # type: ignore[arg-type]  # every sink is an async context manager
        delivery: Delivery[Event, Event] = Delivery(
            name, EventStream(name, journal), sink, pack_events, BATCHING, what="events", recheck=TICK,
            caught_up=partial(self._send_head, name, sink), failure_level=logging.WARNING)
        self.sinks[name], self._stacks[name], self.deliveries[name] = sink, stack, delivery
        if file:
            self._files.add(name)
        self._tasks[name] = asyncio.create_task(delivery.run(), name=f"trace-sink[{name}]")

    async def _stop(self, name: str, *, flush: bool = False) -> None:
        """Stop delivering to ``name`` (its unacknowledged events stay in the outbox) and close it;
        ``flush``: a file sink gets what is sealed first."""
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        delivery = self.deliveries.pop(name, None)
        if flush and delivery is not None and name in self._files:
            try:
                await delivery.flush()
            except sqlite3.Error as exc:
                log.error("trace sink %s: not written at the stop (%s); its events stay in the outbox", name, exc)
        self.sinks.pop(name, None)
        self._files.discard(name)
        stack = self._stacks.pop(name, None)
        if stack is not None:
            await stack.aclose()

    def reload(self, cfg: TraceConfig) -> None:
        """Apply a changed trace.yaml (SIGHUP) to the running feed, on the same journal and key:
        the chain continues. Raises ConfigErrors, having changed nothing, for what cannot change
        while running (:func:`gateway.trace.config.check_reload`). Lots keep their location and
        open window (:meth:`TraceCore.reconfigure`); lots newly placed by trace.yaml start there;
        changed, added or removed sinks (JSON Lines files and network sinks alike) are restarted,
        started or stopped by a task (each keeps its position in the outbox)."""
        core, sealer = self.core, self.sealer
        assert core is not None and sealer is not None
        old = self.cfg
        if cfg == old:
            log.info("trace.yaml unchanged")
            return
        check_reload(old, cfg, {lot.id: lot.location for lot in core.lots.values()})
        self.cfg = cfg
        core.reconfigure(cfg)
        sealer.gateway_id = cfg.gateway_id
        if not self._injected:
            names = set(old.file.sinks) | set(cfg.file.sinks)
            renamed = (old.gateway_id, old.site) != (cfg.gateway_id, cfg.site)  # in topics and client ids
            changed = sorted(n for n in names if renamed or old.file.sinks.get(n) != cfg.file.sinks.get(n))
            if changed:
                previous = self._resink
                self._resink = asyncio.get_running_loop().create_task(self._swap_net(changed, previous),
                                                                      name="trace-sinks-reload")
        self._queue_config_lots()
        log.info("trace.yaml reloaded from %s: %d locations, %d lots, %d sinks; the chain continues at seq %d in %s",
                 cfg.path, len(cfg.file.locations), len(cfg.file.lots), len(cfg.file.sinks), sealer.seq,
                 resolve(cfg.database, self.state))

    async def _swap_net(self, names: list[str], previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        for name in names:
            await self._stop(name)
            if name in self.cfg.file.sinks:
                try:
                    await self._start_sink(name)
                except Exception:
                    log.exception("trace sink %s could not be started after the reload; its events stay in the outbox "
                                  "— fix trace.yaml and reload again", name)
            else:
                log.info("trace sink %s removed; its position stays in the outbox", name)

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._journal is not None:
                try:
                    self.step()
                except sqlite3.Error as err:  # a full disk at the stop: say exactly what is lost
                    # A command's events are not: the command stays queued and is applied at the next start.
                    lost = sum(len(e) for e, c in self._unstored if c is None) + len(self._pending)
                    log.error("trace: %d events could not be stored in the outbox before stopping and are lost (%s) "
                              "— check free disk space", lost, err)
        finally:
            if self._unregister is not None:
                self._unregister()
                self._unregister = None
            if self._resink is not None:
                self._resink.cancel()
                await asyncio.gather(self._resink, return_exceptions=True)
                self._resink = None
            for name in list(self._stacks):
                await self._stop(name, flush=True)
            for task in list(self._replies):
                task.cancel()
            await asyncio.gather(*self._replies, return_exceptions=True)
            if self._journal is not None:
                self._journal.__exit__()
                self._journal = None

    def metrics(self) -> list[tuple[str, str, str, list[tuple[dict[str, str], float]]]]:
        """The feed's figures for /metrics (:func:`gateway.health.add_metrics`): counters in memory,
        positions and dead letters from the outbox (one small query per sink)."""
        journal, sealer = self._journal, self.sealer
        if journal is None or sealer is None:
            return []
        delivery = journal.delivery(list(self.sinks))
        figures: dict[str, list[tuple[dict[str, str], float]]] = {
            "sluice_trace_events_total": [({}, self.emitted)],
            "sluice_trace_chain_seq": [({}, sealer.seq)],
            "sluice_trace_last_event_timestamp_seconds": [({}, self.last_sealed_ns / 1e9)],
            "sluice_trace_late_readings_total": [({}, self.late)],
            "sluice_trace_sink_delivered_total": [({"sink": n}, acked - dead) for n, (acked, dead) in delivery.items()],
            "sluice_trace_sink_pending_events": [({"sink": n}, sealer.seq - acked) for n, (acked, _d) in delivery.items()],
            "sluice_trace_sink_dead_letters_total": [({"sink": n}, dead) for n, (_a, dead) in delivery.items()],
            "sluice_trace_sink_publishes_refused_total": [({"sink": n}, sink.refused) for n, sink in self.sinks.items()
                                                          if n not in self._files],
        }
        return [(name, *METRICS[name], samples) for name, samples in figures.items()]

    def observe(self, reading: Reading) -> None:
        """Every reading, as it is read. Never blocks, never raises."""
        try:
            assert self.core is not None
            self._pending += self.core.feed(reading)
        except Exception:
            log.exception("trace: reading of %s could not be traced", reading.device)

    def step(self) -> None:
        """One round: commit observed events, apply queued commands, close due windows (the
        deliveries are woken by every commit)."""
        journal, core = self._journal, self.core
        assert journal is not None and core is not None
        self._store([])  # what earlier steps could not store goes first; a command is applied only once
        for cid, t, kind, lot, location, source in journal.pending_commands():
            try:
                events = core.command(Command(kind, lot, location, t, source))
            except ValueError as exc:
                log.warning("trace: %s %s refused: %s", kind, lot, exc)
                self._store([], (cid, f"refused: {exc}"))
                continue
            self._store(events, (cid, "done"))
        now = self._clock()
        self._store(core.tick(now))
        self._log_late(now)

    def _store(self, events: list[dict[str, Any]], command: tuple[int, str] | None = None) -> None:
        """Seal and commit everything not yet stored, in order, then ``events``; on a failure
        (sqlite3.Error: a full disk) all of it stays in memory for the next step and it raises."""
        if self._pending:
            self._unstored.append((self._pending, None))
            self._pending = []
        if events or command is not None:
            self._unstored.append((events, command))
        while self._unstored:
            self._commit(*self._unstored[0])
            self._unstored.pop(0)

    def _log_late(self, now: int) -> None:
        assert self.core is not None
        window = now // self.core.window_ns
        if self.core.late > self._late_logged and window != self._late_window:
            log.warning("trace: %d reading(s) arrived after their window had closed and were not used (%d since "
                        "start) — raise `grace` in trace.yaml if the devices report late", self.core.late - self._late_logged,
                        self.core.late)
            self._late_logged, self._late_window = self.core.late, window

    def _commit(self, events: list[dict[str, Any]], command: tuple[int, str] | None = None) -> None:
        if not events and command is None:
            return
        sealer, journal, core = self.sealer, self._journal, self.core
        assert sealer is not None and journal is not None and core is not None
        seq, head = sealer.seq, sealer.head
        now = self._clock()
        try:
            sealed = []
            for event in events:
                line = sealer.seal(event)
                sealed.append((sealer.seq, event["sluice:lot"], now, line))
            journal.commit(sealed, (sealer.seq, sealer.head), core.state(), command)
        except BaseException:
            sealer.seq, sealer.head = seq, head  # nothing stored: the chain continues from the stored head
            raise
        if events:
            self.emitted += len(events)
            self.last_sealed_ns = now
            for delivery in self.deliveries.values():
                delivery.notify()

    def _head_due(self, name: str) -> tuple[int, str] | None:
        """(seq, signed head) for sink ``name`` at its acknowledged position, when it takes one and its
        last is older than ``head_interval`` or for an earlier seq; else None. A head names only
        what the sink acknowledged, so whoever receives it can hold the events it names."""
        journal, sealer = self._journal, self.sealer
        assert journal is not None and sealer is not None
        seq = journal.position(name)
        last = self._heads.get(name)
        if seq == 0 or (last is not None and last[0] == seq and time.monotonic() - last[1] < self.cfg.file.head_interval):
            return None
        event_id = json.loads(journal.line(seq) or "{}").get("epcisBody", {}).get("eventList", [{}])[0].get("eventID")
        return seq, sealer.signed_head(seq, event_id, self._clock())

    async def _send_head(self, name: str, sink: EventSink) -> None:
        """Give a sink that takes heads its due head (the engine calls this whenever the sink has
        taken every event); a failure is tried again later."""
        if not sink.takes_heads:
            return
        head = self._head_due(name)
        if head is None:
            return
        try:
            await sink.send_head(head[1])
        except SinkUnavailable:
            return  # its events are not going out either: the next head follows them
        self._heads[name] = (head[0], time.monotonic())

    # -- MQTT commands -------------------------------------------------------------------
    def _on_command(self, sink: EventSink, payload: bytes) -> None:
        """A message on the command topic. Invalid ones are logged and answered; never raises."""
        request_id: Any = None
        try:
            try:
                msg = json.loads(payload)
            except ValueError as exc:
                raise ValueError(f"not JSON: {exc}") from None
            if not isinstance(msg, dict):
                raise ValueError('expected a JSON object like {"op": "move", "lot": "LOT-1", "location": "truck-7"}')
            request_id = msg.get("id")
            op, lot, location = msg.get("op"), msg.get("lot"), msg.get("location")
            unknown = sorted(set(msg) - {"op", "lot", "location", "id"})
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(unknown)} — use op, lot, location, id")
            if op not in ("start", "move", "end"):
                raise ValueError(f"op {op!r} — use start, move or end")
            if not isinstance(lot, str) or not lot.strip() or len(lot) > 200:
                raise ValueError("lot must be the lot's id (a non-empty string)")
            if op == "end":
                if location is not None:
                    raise ValueError("end takes no location")
            elif not isinstance(location, str) or location not in self.cfg.file.locations:
                raise ValueError(f"location {location!r} is unknown — use one of " + ", ".join(self.cfg.file.locations))
            assert self._journal is not None
            cid = self._journal.queue(op, lot.strip(), location, "mqtt", self._clock())
            self.step()
            status = self._journal.command_status(cid) or "queued"
            reply = {"id": request_id, "ok": status == "done", "op": op, "lot": lot.strip(), "status": status}
        except ValueError as exc:
            log.warning("trace command on MQTT refused: %s (message: %.200r)", exc, payload)
            reply = {"id": request_id, "ok": False, "status": f"invalid: {exc}"}
        except Exception as exc:  # a journal failure must not end the MQTT connection
            log.exception("trace command on MQTT failed")
            reply = {"id": request_id, "ok": False, "status": f"failed: {exc}"}
        task = asyncio.get_running_loop().create_task(self._reply(sink, json.dumps(reply).encode()),
                                                      name="trace-reply")
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    @staticmethod
    async def _reply(sink: EventSink, payload: bytes) -> None:
        try:
            await sink.reply(payload)
        except SinkUnavailable as exc:
            log.info("trace command reply not sent (%s); the command itself was handled", exc)

    async def run(self) -> None:
        """Step every :data:`TICK` seconds until cancelled. A journal that cannot be written (a full
        disk) is logged once per change of state; events wait in memory and are stored, in order,
        when it can be written again."""
        while True:
            try:
                self.step()
            except sqlite3.Error as exc:
                if not self._store_failing:
                    log.error("trace: cannot store events in the outbox (%s) — %d events wait in memory and are "
                              "sealed when it can be written again; check free disk space", exc,
                              sum(len(e) for e, _c in self._unstored))
                    self._store_failing = True
            else:
                if self._store_failing:
                    log.info("trace: outbox writable again; the events that waited are sealed")
                    self._store_failing = False
            await asyncio.sleep(TICK)


def reloading(load: Callable[[], Config], service: TraceService | None) -> Callable[[], Config]:
    """``load`` (the gateway's reload: :func:`gateway.app.serve` calls it on SIGHUP and applies
    nothing when it raises ConfigErrors) made to re-read and validate trace.yaml too, and to apply
    a valid change to the running ``service`` (:meth:`TraceService.reload`: same journal, the
    chain continues). A broken trace.yaml raises ConfigErrors (``file:line:col: ...``): serve logs
    them and everything keeps running as before. A trace.yaml that appeared or disappeared is
    only noted: starting or stopping the feed takes a restart."""

    def load_all() -> Config:
        config = load()
        trace = load_trace_config(config)
        if service is None and trace is not None:
            log.warning("%s appeared: the traceability feed starts at the next restart of the gateway", trace.path)
        elif service is not None and trace is None:
            log.warning("%s is gone: the traceability feed keeps running with the previous one until the gateway "
                        "restarts", service.cfg.path)
        elif service is not None and trace is not None:
            try:
                service.reload(trace)
            except ConfigErrors:
                raise
            except Exception:  # never let the feed end the gateway's reload loop
                log.exception("trace.yaml could not be applied in full; the feed keeps running — restart the "
                              "gateway if it misbehaves")
        return config

    return load_all
