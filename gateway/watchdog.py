"""The one watchdog of the gateway and of ``sluice ingest``: every long-running loop registers and
reports its own state; the watchdog judges each loop against what the loop declared, and pings
systemd (``WATCHDOG=1``) only while no loop is wedged.

Contracts:

* A loop gets a :class:`Loop` from :meth:`Watchdog.loop` and reports, as it goes, one of:

  - :meth:`Loop.idle` — nothing to do (no reading pending, a device schedule not yet due). Never
    wedged, however long.
  - :meth:`Loop.busy` — it has work and is doing it itself. Wedged when it has been busy for
    longer than its ``limit`` (given at registration) plus the watchdog's margin without
    reporting :meth:`Loop.progress`.
  - :meth:`Loop.waiting` ``(on, until)`` — it waits on something outside itself (*on* names it:
    "receipts from sluice ingest", "the database") and has declared that it acts again by
    ``until`` (monotonic seconds, the event loop's clock) at the latest: it re-sends, retries or
    gives up then. Waiting on the far end is not a wedge: the loop is wedged only when ``until``
    plus the margin has passed and it still has not reported anything. ``until=None``: waiting on
    something that has its own supervisor (a sink's reconnect loop); never wedged.

  :meth:`Loop.progress` says work moved (a batch delivered, a poll attempted, a retry made). A
  loop registered with ``counter`` (a poller, whose attempts the driver counts) makes progress
  whenever that number changes and is always busy. Reporting never blocks and never raises; a
  :class:`Loop` made without a watchdog (``Loop(name)``) is a valid no-op handle for tests and
  for parts run alone.
* :meth:`Watchdog.wedged` and :meth:`Watchdog.states` only read; the log lines about a loop
  (wedged, making progress again) come from :meth:`Watchdog.run`, once per change.
* :meth:`Watchdog.run` is the ping task: every ``min(WatchdogSec/2, 5 s)`` it judges the loops,
  sends ``WATCHDOG=1`` only when none is wedged (so systemd restarts a wedged service after
  ``WatchdogSec=``), and ``STATUS=`` whenever the status line changes.
* Health (``/healthz``, ``/metrics``, ``sluice status``) renders :meth:`Watchdog.states`; it needs
  to know nothing about the loops themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gateway.sdnotify import Notifier, watchdog_interval

__all__ = ["STALL_MARGIN", "Loop", "LoopState", "Watchdog"]

log = logging.getLogger(__name__)

STALL_MARGIN = 10.0
"""Seconds of slack past a loop's limit or declared deadline before it counts as wedged."""
PING_PERIOD_MAX = 5.0
"""Longest pause between two judgements (and STATUS= updates), whatever WatchdogSec is."""

State = Literal["idle", "busy", "waiting"]


@dataclass(frozen=True)
class LoopState:
    """What a loop last reported, as health renders it (all times in seconds)."""

    name: str
    state: State
    on: str  # what a waiting loop waits on ("" otherwise)
    until_in: float | None  # waiting: seconds until the loop's own deadline (negative: past it); None: no deadline
    quiet_for: float  # seconds since the last progress or change of state
    wedged_for: float | None  # seconds past the limit/deadline plus margin; None when not wedged


class Loop:
    """One loop's reporting handle (see the module docstring)."""

    __slots__ = ("_changed", "_clock", "_count", "_counter", "_on", "_since", "_state", "_until", "limit", "name")

    def __init__(self, name: str, limit: float = 60.0, *, clock: Callable[[], float] = time.monotonic,
                 counter: Callable[[], int] | None = None) -> None:
        self.name = name
        self.limit = limit
        self._clock = clock
        self._counter = counter
        self._count = counter() if counter is not None else 0
        self._state: State = "busy" if counter is not None else "idle"
        self._on = ""
        self._until: float | None = None
        self._since = clock()
        self._changed = False

    def progress(self) -> None:
        """Work moved; the state stays what it was."""
        self._since = self._clock()

    def idle(self) -> None:
        self._set("idle", "", None)

    def busy(self) -> None:
        """Has work (from now on judged against ``limit`` since the last progress)."""
        if self._state != "busy":
            self._set("busy", "", None)

    def waiting(self, on: str, until: float | None) -> None:
        """Waits on ``on`` and acts again by ``until`` (monotonic), or indefinitely (None)."""
        if self._state != "waiting" or self._on != on or self._until != until:
            self._set("waiting", on, until)

    def _set(self, state: State, on: str, until: float | None) -> None:
        self._state, self._on, self._until = state, on, until
        self._since = self._clock()

    def judge(self, margin: float) -> LoopState:
        """The loop's state now; ``wedged_for`` set when it is wedged."""
        now = self._clock()
        if self._counter is not None:
            count = self._counter()
            if count != self._count:
                self._count, self._since = count, now
        wedged_for: float | None = None
        if self._state == "busy":
            over = now - self._since - self.limit - margin
            wedged_for = over if over > 0 else None
        elif self._state == "waiting" and self._until is not None:
            over = now - max(self._until, self._since) - margin
            wedged_for = over if over > 0 else None
        until_in = None if self._until is None or self._state != "waiting" else self._until - now
        return LoopState(self.name, self._state, self._on, until_in, now - self._since, wedged_for)


class Watchdog:
    """The registry of loops and the systemd ping task (see the module docstring)."""

    def __init__(self, margin: float = STALL_MARGIN, clock: Callable[[], float] = time.monotonic) -> None:
        self.margin = margin
        self._clock = clock
        self._loops: dict[str, Loop] = {}

    def loop(self, name: str, limit: float = 60.0, counter: Callable[[], int] | None = None) -> Loop:
        """Register (or replace) the loop ``name``; ``limit``: seconds it may be busy without progress."""
        handle = Loop(name, limit, clock=self._clock, counter=counter)
        self._loops[name] = handle
        return handle

    def remove(self, name: str) -> None:
        self._loops.pop(name, None)

    def names(self) -> list[str]:
        return list(self._loops)

    def states(self) -> list[LoopState]:
        return [loop.judge(self.margin) for loop in list(self._loops.values())]

    def wedged(self) -> list[LoopState]:
        return [s for s in self.states() if s.wedged_for is not None]

    async def run(self, notifier: Notifier, status: Callable[[], str], interval: float | None = None) -> None:
        """Ping systemd while no loop is wedged; keep STATUS= current (see the module docstring).
        ``interval``: seconds between pings (default: half of ``$WATCHDOG_USEC``; None there means
        systemd watches nothing, and only STATUS= is kept current)."""
        if not notifier.enabled:
            return
        if interval is None:
            interval = watchdog_interval()
        period = min(interval, PING_PERIOD_MAX) if interval is not None else PING_PERIOD_MAX
        last_status = ""
        reported: set[str] = set()
        while True:
            await asyncio.sleep(period)
            wedged = self.wedged()
            names = {s.name for s in wedged}
            for s in wedged:
                if s.name not in reported:
                    log.error("%s is wedged: %s — %s", s.name, describe(s, self.margin),
                              "the systemd watchdog will restart the service" if interval is not None
                              else "restart the service")
            for name in reported - names:
                log.info("%s is making progress again", name)
            reported = names
            text = status()
            fields: dict[str, str | int] = {}
            if not wedged and interval is not None:
                fields["WATCHDOG"] = 1
            if text != last_status:
                fields["STATUS"] = last_status = text
            if fields:
                notifier.send(**fields)


def describe(s: LoopState, margin: float = 0.0) -> str:
    """One line about a loop's state, for logs and /healthz."""
    if s.state == "waiting":
        if s.until_in is None:
            return f"waiting on {s.on}"
        if s.until_in >= 0:
            return f"waiting on {s.on}, acting again within {s.until_in:.0f} s"
        return f"waiting on {s.on}, {-s.until_in:.0f} s past its own deadline"
    if s.state == "busy":
        return f"has work but made no progress for {s.quiet_for:.0f} s" if s.wedged_for is not None else "working"
    return "idle"
