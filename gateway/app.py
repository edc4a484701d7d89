"""The running gateway: pollers -> committer -> outbox -> forwarders -> sinks, and a clean stop."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from gateway import driver as drivers
from gateway.outbox import Outbox, OutboxStats
from gateway.config import Config, ConfigErrors
from gateway.driver import AnyDevice, DriverModule, Poller
from gateway.health import HealthServer, SinkSnapshot, Snapshot, status_line
from gateway.clock import ClockWatch
from gateway.committer import Committer
from gateway.reading import CLOCK_UNSYNCED, Reading, quality
from gateway.sdnotify import Notifier
from gateway.security import startup_warnings
from gateway.sinks import Where, make_sink
from gateway.sinks.readings import Forwarder
from gateway.watchdog import Watchdog

log = logging.getLogger(__name__)

FORWARD_ACK_LIMIT = 60.0
"""Seconds a batch may take for a sink without an ``ack_timeout`` of its own."""
def make_pollers(devices: Sequence[AnyDevice]) -> list[Poller]:
    """One poller per physical connection, from whichever driver serves each device's protocol."""
    by_module: dict[str, tuple[DriverModule, list[AnyDevice]]] = {}
    for dev in devices:
        module = drivers.driver_for_protocol(dev.config.protocol)
        assert module is not None, "config validation guarantees a driver"
        by_module.setdefault(module.__name__, (module, []))[1].append(dev)
    pollers: list[Poller] = []
    for module, group in by_module.values():
        pollers.extend(module.make_pollers(group))
    return pollers


@dataclass
class Gateway:
    """One configuration, running. ``run`` returns when ``stop`` is set, having lost nothing:
    polling stops first, every reading already read is committed, forwarders are cancelled with
    their in-flight batch left unacknowledged in the outbox (it is sent again next start)."""

    config: Config
    pollers: list[Poller] = field(default_factory=list)
    committer: Committer | None = None
    forwarders: list[Forwarder] = field(default_factory=list)
    outbox: Outbox | None = None
    started_ns: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    final_stats: OutboxStats | None = None
    """The outbox's figures at the moment the gateway stopped."""
    on_reading: Callable[[Reading], None] | None = None
    """Called with every reading as it is read (the demo's live view); None costs nothing."""
    sinks: dict[str, Any] = field(default_factory=dict)
    watchdog: Watchdog = field(default_factory=Watchdog)
    """Every loop reports to it; it pings systemd only while none is wedged (gateway/watchdog.py)."""
    stall_margin: float | None = None
    """Seconds of slack past each loop's limit or deadline before it counts as wedged
    (None: the configuration's ``health.watchdog_margin``)."""
    clock: ClockWatch = field(default_factory=ClockWatch)
    """Whether the system clock is synchronised: readings taken while it is not are flagged."""
    health_port: int | None = None
    """The port the health endpoint listens on once running (None: not serving)."""
    _poll_tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict, repr=False)
    _poller_stacks: dict[int, AsyncExitStack] = field(default_factory=dict, repr=False)
    _forward_tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict, repr=False)
    _sink_stacks: dict[str, AsyncExitStack] = field(default_factory=dict, repr=False)
    _ended: asyncio.Future[None] | None = field(default=None, repr=False)
    """Set when a poll or forward task ends by itself (a failure): the run ends with it."""
    _emit: Callable[[Reading], None] | None = field(default=None, repr=False)

    def outbox_stats(self) -> OutboxStats | None:
        """Live figures while running, the final ones after the stop, None before the start."""
        if self.final_stats is not None:
            return self.final_stats
        return self.outbox.stats() if self.outbox is not None else None

    def snapshot(self, lag: bool = True) -> Snapshot:
        """What health renders (gateway/health.py): figures and names only, read now. ``lag=False``
        skips the one outbox row per sink that each sink's lag costs (STATUS= does not show it)."""
        cfg = self.config
        running = self.outbox is not None and self.final_stats is None
        snap = Snapshot(cfg.gateway_id, cfg.site, self.started_ns, running and self.ready.is_set(),
                        [(dev, st) for p in self.pollers for dev, st in p.status.items()], self.outbox_stats(),
                        cfg.gateway.buffer.max_bytes, clock_synced=self.clock.synced, clock_jumps=self.clock.jumps,
                        loops=self.watchdog.states())
        committer = self.committer
        if committer is not None:
            cs = committer.stats
            snap.received, snap.committed, snap.failed_commits, snap.lost = (cs.received, cs.committed,
                                                                             cs.failed_commits, cs.lost)
            snap.held, snap.outbox_failing = committer.pending, committer.failing
        forwarders = {f.name: f for f in self.forwarders}
        now_ns = time.time_ns()
        for name, sink in self.sinks.items():
            fwd = forwarders.get(name)
            entry = SinkSnapshot(name, bool(getattr(sink, "connected", False)), fwd.stats if fwd is not None else None)
            entry.last_error = getattr(sink, "last_error", None)
            entry.refused = getattr(sink, "refused", 0)
            if lag and running and self.outbox is not None:
                entry.lag, entry.unconfirmed = _lag(self.outbox, name, now_ns)
            snap.sinks.append(entry)
        return snap

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        buf = cfg.gateway.buffer
        self.started_ns = time.time_ns()
        self.final_stats = None
        self.watchdog.margin = cfg.gateway.health.watchdog_margin if self.stall_margin is None else self.stall_margin
        for warning in startup_warnings(cfg):
            log.warning("%s", warning)
        notifier = Notifier()
        async with AsyncExitStack() as stack:
            stack.callback(notifier.close)
            outbox = stack.enter_context(Outbox(buf.resolved_path(), list(cfg.gateway.sinks),
                                                max_bytes=buf.max_bytes, when_full=buf.when_full,
                                                synchronous=buf.synchronous))
            self.outbox = outbox
            self._forward_tasks = {}
            self._sink_stacks = {}
            self._poll_tasks = {}
            self._poller_stacks = {}
            ended = self._ended = asyncio.get_running_loop().create_future()
            stack.push_async_callback(self._stop_forwarders)
            for name in cfg.gateway.sinks:
                await self._start_sink(name, cfg)
            forwarders = self.forwarders

            def wake_forwarders() -> None:
                for fwd in forwarders:
                    fwd.notify()

            self.committer = committer = Committer(outbox, wake_forwarders, buf.commit_delay,
                                                   self.watchdog.loop("commit", buf.commit_delay + 1.0))
            commit_task = asyncio.create_task(committer.run(), name="commit")
            clock = self.clock
            clock.poll()
            observe = self.on_reading
            store = committer.emit

            def emit(reading: Reading) -> None:
                if clock.synced is False:
                    # its timestamp cannot be trusted; the driver's own flags (uncertain) stay
                    reading.quality = quality(reading.quality, CLOCK_UNSYNCED)
                if observe is not None:
                    observe(reading)
                store(reading)

            self._emit = emit
            stack.push_async_callback(self._stop_pollers)
            for poller in make_pollers(cfg.devices):
                await self._start_poller(poller)
            for poller in self.pollers:
                self._run_poller(poller)
            await self._serve_health(stack)
            log.info("gateway %s at %s running: %d devices on %d connections, %d sinks, outbox %s",
                     cfg.gateway_id, cfg.site, len(cfg.devices), len(self.pollers), len(forwarders),
                     buf.resolved_path())
            self.ready.set()
            notifier.send(READY=1, STATUS=status_line(self.snapshot(lag=False)))
            stop_task = asyncio.create_task(stop.wait(), name="stop")
            watchdog_task = asyncio.create_task(self.watchdog.run(notifier, lambda: status_line(self.snapshot(lag=False))), name="watchdog")
            clock_task = asyncio.create_task(clock.run(), name="clock")
            try:
                done, _ = await asyncio.wait([stop_task, commit_task, ended],
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception() if task is not stop_task else None
                    if exc is not None:
                        raise exc
            finally:
                notifier.send(STOPPING=1, STATUS="stopping: committing what was read")
                await _cancel([watchdog_task, clock_task])
                await self._stop_pollers()
                await _cancel([commit_task])
                committer.close()
                await self._stop_forwarders()
                await _cancel([stop_task])
                stats = self.final_stats = outbox.stats()
                log.info("gateway stopped: %d readings committed this run, %d lost (not stored: the outbox could "
                         "not be written), %d left in the outbox", committer.stats.committed, committer.stats.lost,
                         stats.rows)

    # -- pieces that a reload starts and stops one by one ----------------------------------------

    def _watch(self, task: asyncio.Task[None]) -> None:
        """A poll or forward task that ends (other than by being cancelled) ends the run."""
        def done(t: asyncio.Task[None]) -> None:
            ended = self._ended
            if ended is None or t.cancelled() or ended.done():
                return
            exc = t.exception()
            if exc is not None:
                ended.set_exception(exc)
            else:
                ended.set_result(None)
        task.add_done_callback(done)

    async def _start_sink(self, name: str, cfg: Config) -> None:
        assert self.outbox is not None
        sink_cfg = cfg.gateway.sinks[name]
        stack = AsyncExitStack()
        sink = await stack.enter_async_context(make_sink(name, sink_cfg, Where(cfg.gateway_id, cfg.site)))
        self._sink_stacks[name] = stack
        self.sinks[name] = sink
        # Busy without progress: a batch takes at most two acknowledgement timeouts and a linger.
        limit = 2 * float(getattr(sink, "ack_timeout", FORWARD_ACK_LIMIT)) + sink_cfg.batch.linger + 5.0
        fwd = Forwarder(name, self.outbox, sink, sink_cfg, cfg, self.watchdog.loop(f"forward[{name}]", limit))
        self.forwarders.append(fwd)
        task = asyncio.create_task(fwd.run(), name=f"forward[{name}]")
        self._forward_tasks[name] = task
        self._watch(task)

    async def _stop_sink(self, name: str) -> None:
        """Cancel the forwarder (its in-flight batch stays unacknowledged) and close the sink."""
        task = self._forward_tasks.pop(name, None)
        if task is not None:
            await _cancel([task])
        self.forwarders[:] = [f for f in self.forwarders if f.name != name]
        self.watchdog.remove(f"forward[{name}]")
        self.sinks.pop(name, None)
        stack = self._sink_stacks.pop(name, None)
        if stack is not None:
            await stack.aclose()

    async def _stop_forwarders(self) -> None:
        for name in list(self._sink_stacks):
            await self._stop_sink(name)

    async def _start_poller(self, poller: Poller) -> None:
        stack = AsyncExitStack()
        await stack.enter_async_context(poller)
        self._poller_stacks[id(poller)] = stack
        self.pollers.append(poller)

    def _run_poller(self, poller: Poller) -> None:
        # A poller is always busy: every attempt (an answer, a timeout, a refused connection) is
        # progress, so a device that is down is not a wedge — only a loop that stopped attempting.
        # Its limit: the slowest schedule (interval, or the backoff of a device that is down) plus
        # one full round of timeouts of every device.
        devices = {d.id: d.config for d in self.config.devices}
        cfgs = [devices[d] for d in poller.status if d in devices]
        limit = (max((max(c.interval, c.backoff_max) for c in cfgs), default=60.0)
                 + sum(c.timeout * (1 + c.retries) for c in cfgs))
        statuses = list(poller.status.values())
        self.watchdog.loop(f"poll[{poller.name}]", limit,
                           counter=lambda: sum(st.polls + sum(st.errors.values()) for st in statuses))
        assert self._emit is not None, "pollers start once the committer runs"
        task = asyncio.create_task(poller.run(self._emit), name=f"poll[{poller.name}]")
        self._poll_tasks[id(poller)] = task
        self._watch(task)

    async def _stop_poller(self, poller: Poller) -> None:
        task = self._poll_tasks.pop(id(poller), None)
        if task is not None:
            await _cancel([task])
        self.watchdog.remove(f"poll[{poller.name}]")
        self.pollers[:] = [p for p in self.pollers if p is not poller]
        stack = self._poller_stacks.pop(id(poller), None)
        if stack is not None:
            await stack.aclose()

    async def _stop_pollers(self) -> None:
        for poller in list(self.pollers):
            await self._stop_poller(poller)

    def poll_task(self, poller: Poller) -> asyncio.Task[None] | None:
        """The task running ``poller`` (tests: an unchanged poller keeps its task across a reload)."""
        return self._poll_tasks.get(id(poller))

    async def apply(self, new: Config) -> None:
        """Apply ``new`` to the running gateway, restarting only what changed (see :func:`serve`).
        ``new`` must differ from the running configuration only in devices, profiles and sinks
        (:func:`needs_full_restart` is False). The outbox, committer and health endpoint stay."""
        old = self.config
        assert self.outbox is not None
        # Pollers: a new poller whose device set and devices equal a running one's is not needed.
        before = {d.id: d for d in old.devices}
        after = {d.id: d for d in new.devices}
        keep: list[Poller] = []
        start: list[Poller] = []
        running = {frozenset(p.status): p for p in self.pollers}
        for candidate in make_pollers(new.devices):
            ids = frozenset(candidate.status)
            same = running.get(ids)
            if same is not None and same.name == candidate.name and all(before.get(i) == after[i] for i in ids):
                keep.append(same)
            else:
                start.append(candidate)
        for poller in [p for p in self.pollers if not any(p is k for k in keep)]:
            await self._stop_poller(poller)  # before the new ones: a port or connection is exclusive
        # Sinks: unchanged ones keep their connection and forwarder.
        old_sinks, new_sinks = old.gateway.sinks, new.gateway.sinks
        for name in old_sinks:
            if name not in new_sinks or old_sinks[name] != new_sinks[name]:
                await self._stop_sink(name)
        self.outbox.set_sinks(list(new_sinks))  # added sinks start at the oldest row; removed ones let go
        self.config = new
        for name in new_sinks:
            if name not in self._sink_stacks:
                await self._start_sink(name, new)
        for poller in start:
            await self._start_poller(poller)
            self._run_poller(poller)
        for fwd in self.forwarders:
            fwd.notify()
        log.info("configuration applied: %d pollers kept, %d started; %d devices on %d connections, %d sinks",
                 len(keep), len(start), len(new.devices), len(self.pollers), len(self.forwarders))

    async def _serve_health(self, stack: AsyncExitStack) -> None:
        """Start the /healthz and /metrics endpoint. A port that cannot be bound is logged, not
        fatal: reading and buffering matter more than being watched."""
        health = self.config.gateway.health
        self.health_port = None
        if not health.enabled:
            return
        try:
            server = await stack.enter_async_context(HealthServer(self.snapshot, health.host, health.port))
        except OSError as exc:
            # One line, and the gateway goes on: it still reads and delivers; only watching it is lost.
            busy = " (another Sluice gateway or demo on this machine?)" if exc.errno == errno.EADDRINUSE else ""
            log.error("health endpoint: cannot listen on %s: %s%s — the gateway runs on without /healthz and "
                      "/metrics (and `sluice status`); set health.listen in %s to a free port (and the unit's "
                      "SocketBindAllow= with it)", health.listen, exc.strerror or exc, busy, self.config.path)
            return
        self.health_port = server.port


def _lag(outbox: Outbox, sink: str, now_ns: int) -> tuple[float, int]:
    """(age of the oldest reading ``sink`` has not acknowledged, readings sent but unconfirmed)."""
    try:
        oldest = outbox.fetch(sink, 1, 1)
        unconfirmed = outbox.sent(sink) - outbox.position(sink)
    except Exception:  # the outbox failing is reported elsewhere (or a sink removed by a reload just now)
        return 0.0, 0
    return (max(0.0, (now_ns - oldest[0].reading.time_ns) / 1e9) if oldest else 0.0), unconfirmed


async def _cancel(tasks: Sequence[asyncio.Task[object]]) -> None:
    """Cancel and reap ``tasks``. A task that swallowed its cancellation (a library catching
    CancelledError at the wrong moment) is cancelled again rather than waited for forever."""
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    while pending:
        _done, pending = await asyncio.wait(pending, timeout=1.0)
        for task in pending:
            log.warning("task %s did not stop when cancelled; cancelling it again", task.get_name())
            task.cancel()
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s had failed: %r", task.get_name(), task.exception())


async def serve(config: Config, load: Callable[[], Config], stop: asyncio.Event, reload: asyncio.Event,
                on_reload: Callable[[Config], None] | None = None,
                on_reading: Callable[[Reading], None] | None = None,
                on_gateway: Callable[[Gateway], None] | None = None) -> None:
    """Run ``config`` until ``stop`` is set; each time ``reload`` is set (SIGHUP), load the
    configuration again with ``load`` and validate it *before* touching the running gateway.

    Invalid: every error is logged and the running configuration stays. Unchanged: nothing
    happens. Changed only in devices, profiles or sinks: :meth:`Gateway.apply` restarts just
    those — a poller whose devices (and their profiles) are all unchanged keeps running, a
    connection with any changed, added or removed device is rebuilt; an unchanged sink keeps its
    connection and forwarder, a changed one is restarted on its outbox position, an added one
    starts at the oldest stored row, a removed one's position is dropped. The outbox, the
    committer, the health endpoint and the metrics of what was kept stay. Any other change
    (gateway id, site, buffer, logging, health, …: :func:`needs_full_restart`) stops the whole
    gateway cleanly — polling stops, everything read is committed, in-flight batches stay
    unacknowledged — and starts it again on the same outbox. ``on_reload`` is called with the
    new configuration before it is applied; ``on_gateway`` with every Gateway started (tests).
    Reloads requested while one is being applied are coalesced into one more reload after it.
    systemd gets RELOADING=1 before and READY=1 after.
    """
    notifier = Notifier()
    try:
        while True:
            run_stop = asyncio.Event()
            gateway = Gateway(config, on_reading=on_reading)
            if on_gateway is not None:
                on_gateway(gateway)
            task = asyncio.create_task(gateway.run(run_stop), name="gateway")
            restart = await _until_reload(gateway, task, run_stop, config, load, stop, reload, notifier, on_reload)
            if restart is None:
                return
            config = restart
    finally:
        notifier.close()


async def _until_reload(gateway: Gateway, task: asyncio.Task[None], run_stop: asyncio.Event, config: Config,
                        load: Callable[[], Config], stop: asyncio.Event, reload: asyncio.Event,
                        notifier: Notifier, on_reload: Callable[[Config], None] | None) -> Config | None:
    """Wait for the run to end, a stop or a valid changed configuration; apply what can be
    applied in place; returns a configuration that needs a full restart, or None."""
    while True:
        waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(reload.wait())}
        try:
            await asyncio.wait({task, *waits}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if task.done():
            task.result()  # a failed run raises here
            return None
        if stop.is_set():
            run_stop.set()
            await task
            return None
        reload.clear()
        log.info("reloading the configuration from %s", config.path)
        try:
            new = load()
        except ConfigErrors as exc:
            for err in exc.errors:
                log.error("%s", err)
            log.error("configuration NOT reloaded: %d error%s — still running the previous configuration; "
                      "fix the files and reload again", len(exc.errors), "s" if len(exc.errors) != 1 else "")
            continue
        changes = describe_changes(config, new)
        if not changes:  # load() may have applied trace.yaml: systemd still sees a whole reload
            notifier.send(RELOADING=1, STATUS="reloading")
            log.info("configuration unchanged (gateway.yaml, devices, profiles); nothing to restart")
            notifier.send(READY=1, STATUS=status_line(gateway.snapshot(lag=False)))
            continue
        full = needs_full_restart(config, new)
        notifier.send(RELOADING=1, STATUS="reloading: " + "; ".join(changes))
        if on_reload is not None:
            on_reload(new)
        if full or not gateway.ready.is_set():
            log.info("configuration changed (%s): restarting the whole gateway (%s); buffered readings stay "
                     "in the outbox", "; ".join(changes), full or "not running yet")
            run_stop.set()
            await task
            return new  # the new run sends READY=1
        log.info("configuration changed (%s): restarting only what changed; buffered readings stay in the outbox",
                 "; ".join(changes))
        try:
            await gateway.apply(new)
        except Exception:
            log.exception("applying the new configuration failed; restarting the whole gateway with it")
            run_stop.set()
            await task
            return new
        config = new
        notifier.send(READY=1, STATUS=status_line(gateway.snapshot(lag=False)))


def needs_full_restart(old: Config, new: Config) -> str:
    """Why ``new`` cannot be applied in place (empty: it can). Anything in ``gateway.yaml`` except
    ``sinks:`` — the identity (gateway id, site), buffer, logging, health — restarts everything."""
    rest_old = old.gateway.model_copy(update={"sinks": {}})
    rest_new = new.gateway.model_copy(update={"sinks": {}})
    if rest_old != rest_new:
        fields = [f for f in type(rest_new).model_fields if getattr(rest_old, f) != getattr(rest_new, f)]
        return "gateway settings changed: " + ", ".join(fields)
    for attr in ("gateway_id", "site", "path"):
        if getattr(old, attr, None) != getattr(new, attr, None):
            return f"{attr} changed"
    return ""


def describe_changes(old: Config, new: Config) -> list[str]:
    """What differs between two configurations, by device id and sink name."""
    out: list[str] = []
    before = {d.id: d for d in old.devices}
    after = {d.id: d for d in new.devices}

    def names(ids: Sequence[str]) -> str:
        return ", ".join(sorted(ids))

    for what, a, b in (("devices", before, after), ("sinks", old.gateway.sinks, new.gateway.sinks)):
        added = [k for k in b if k not in a]
        removed = [k for k in a if k not in b]
        changed = [k for k in b if k in a and a[k] != b[k]]
        if added:
            out.append(f"{what} added: {names(added)}")
        if removed:
            out.append(f"{what} removed: {names(removed)}")
        if changed:
            out.append(f"{what} changed: {names(changed)}")
    rest_old = old.gateway.model_copy(update={"sinks": {}})
    rest_new = new.gateway.model_copy(update={"sinks": {}})
    if rest_old != rest_new:
        fields = [f for f in type(rest_new).model_fields if getattr(rest_old, f) != getattr(rest_new, f)]
        out.append("gateway settings changed: " + ", ".join(fields))
    if old.gateway.buffer.resolved_path() != new.gateway.buffer.resolved_path():
        log.warning("buffer.path changed: readings still in %s are not moved to %s — restore the old "
                    "path to deliver them", old.gateway.buffer.resolved_path(), new.gateway.buffer.resolved_path())
    return out
