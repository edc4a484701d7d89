"""The committer: every poller's readings into the outbox, one transaction per poll cycle, and what
happens to them while the outbox cannot be written (disk full). Used by :class:`gateway.app.Gateway`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.outbox import Outbox, OutboxError
from gateway.reading import Reading
from gateway.watchdog import Loop

__all__ = ["MAX_UNSTORED", "OUTAGE_QUIET", "CommitStats", "Committer"]

log = logging.getLogger("gateway.app")  # the name in the gateway's log lines, as before the module was split

MAX_UNSTORED = 100_000
"""Readings held in memory while the outbox cannot be written (disk full); beyond it the oldest go."""
OUTAGE_QUIET = 30.0
"""Seconds after the outbox took readings again during which a new failure is the same outage: on a
disk that stays nearly full, commits may fail and succeed by turns; that is logged once, not each time."""


@dataclass
class CommitStats:
    """Every reading emitted is, at any moment, committed, pending (in memory) or lost:
    ``received == committed + Committer.pending + lost``."""

    received: int = 0  # readings handed over by the pollers
    committed: int = 0  # handed to the outbox (stored, or dropped there by when_full and counted in the file)
    commits: int = 0
    failed_commits: int = 0
    lost: int = 0  # readings dropped from memory, never stored: counted the moment they are dropped
    last_commit_ns: int | None = None


class Committer:
    """Collects readings from every poller and commits them to the outbox in one transaction.

    Pollers call :meth:`emit` (never blocks). After the first reading of a cycle arrives the
    committer waits ``delay`` seconds so that devices polled at the same instant share one
    commit, then commits everything gathered and calls ``on_commit`` (wakes the forwarders).
    If the outbox cannot be written (disk full, I/O error) the readings stay in memory and the
    commit is retried every second. At most :data:`MAX_UNSTORED` are held: beyond that the oldest
    are dropped at the failed commit that finds them over the limit — they are *lost*, counted
    in ``stats.lost`` at that moment and logged once per outage (WARNING when it starts dropping,
    INFO with the outage's figures when the outbox takes readings again). :meth:`close` makes the
    last attempt at the stop; what it cannot store is lost, counted and logged (ERROR) with its
    exact number. Readings still held are never counted as lost. On a disk that stays nearly full
    commits may fail and succeed by turns: within :data:`OUTAGE_QUIET` of a recovery that is the
    same outage (counted in ``stats.failed_commits``, not logged again unless readings were lost).
    """

    def __init__(self, outbox: Outbox, on_commit: Callable[[], None], delay: float, loop: Loop | None = None) -> None:
        self._outbox = outbox
        self._loop = loop if loop is not None else Loop("commit")  # busy while readings wait for a commit
        self._on_commit = on_commit
        self._delay = delay
        self._pending: list[Reading] = []
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._failing = False
        self._failing_since = 0.0
        self._announced = False  # the current outage was logged (ERROR)
        self._quiet_until = 0.0  # monotonic time before which a new failure is not logged again
        self._outage_lost = 0  # lost since the outbox last took readings (as logged)
        self.stats = CommitStats()

    @property
    def pending(self) -> int:
        """Readings read but not yet committed (held in memory while the outbox fails)."""
        return len(self._pending)

    @property
    def failing(self) -> bool:
        """True from a failed commit until the next successful one."""
        return self._failing

    def emit(self, reading: Reading) -> None:
        self._pending.append(reading)
        self.stats.received += 1
        if self._timer is None:  # the first reading of a cycle: commit ``delay`` from now
            self._loop.busy()
            if self._delay:
                self._timer = asyncio.get_running_loop().call_later(self._delay, self._wake.set)
            else:
                self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()  # one timer per cycle wakes us (not a wake-up and then a sleep)
            self._wake.clear()
            self._timer = None
            if not self.flush() and self._pending:
                await asyncio.sleep(1.0)  # the outbox is failing: retry shortly, without spinning
                self._wake.set()

    def flush(self) -> bool:
        """Commit what is pending; True when the outbox took it (or nothing was pending)."""
        if not self._pending:
            return True
        batch = self._pending
        self._loop.progress()  # an attempt, failed or not, is progress: a failing disk is not a wedge
        try:
            self._outbox.append(batch)
        except OutboxError as exc:
            self.stats.failed_commits += 1
            if exc.consumed:  # a large backlog goes in slices: the first ones were stored
                del batch[:exc.consumed]
                self._count(exc.consumed)
            if not self._failing:
                self._failing = True
                self._failing_since = now = time.monotonic()
                if now >= self._quiet_until:
                    log.error("cannot store readings in the outbox: %s — keeping up to %d in memory; "
                              "check free disk space", exc, MAX_UNSTORED)
                    self._announced = True
            excess = len(batch) - MAX_UNSTORED
            if excess > 0:
                if not self._outage_lost:
                    log.warning("outbox still not writable and %d readings held in memory: dropping the oldest "
                                "beyond %d from now on — they are lost (sluice_outbox_lost_total)",
                                len(batch), MAX_UNSTORED)
                del batch[:excess]
                self.stats.lost += excess
                self._outage_lost += excess
            return False
        self._pending = []
        if self._failing:
            self._failing = False
            if self._announced or self._outage_lost:
                log.info("outbox writable again after %.0f s: %d readings held in memory stored now; %d readings "
                         "lost while it was not", time.monotonic() - self._failing_since, len(batch), self._outage_lost)
                self._announced = False
                self._outage_lost = 0
                self._quiet_until = time.monotonic() + OUTAGE_QUIET
        self._loop.idle()
        self._count(len(batch))
        return True

    def _count(self, n: int) -> None:
        """The outbox took ``n`` readings."""
        self.stats.committed += n
        self.stats.commits += 1
        self.stats.last_commit_ns = time.time_ns()
        self._on_commit()

    def close(self) -> int:
        """The last commit, at the stop (polling has stopped): what the outbox does not take now is
        lost — counted and logged with its number. Tried twice (a failed write gives the WAL's
        space back, which may be enough for the second). Returns the readings lost now."""
        if self.flush() or self.flush():
            return 0
        n = len(self._pending)
        self._pending = []
        self._loop.idle()
        self.stats.lost += n
        log.error("%d readings held in memory could not be stored in the outbox before stopping and are lost "
                  "(%d lost in all this run) — check free disk space", n, self.stats.lost)
        return n
