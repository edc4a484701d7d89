"""Protocol-independent polling parts: wall-clock-aligned schedules, capped backoff, and
up/down health tracking that logs once per state change. Drivers (Modbus TCP, serial) reuse them.

Nothing here does I/O or knows a protocol; a poller owns one connection and drives these.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway.backoff import Backoff
from gateway.driver import DeviceStatus

__all__ = ["Backoff", "Health", "Schedule", "format_duration", "next_aligned"]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


def next_aligned(interval: float, after: float) -> float:
    """The first multiple of ``interval`` (seconds since the epoch) strictly after ``after``.

    Devices with the same interval therefore poll at the same instants, whatever their start
    time, so the core commits their readings together.
    """
    # The epsilon keeps float noise (0.3 / 0.1 = 2.9999…) from repeating the current slot.
    slot = (math.floor(after / interval + 1e-9) + 1) * interval
    return slot if slot > after else slot + interval


def format_duration(seconds: float) -> str:
    """`0.5` -> `500ms`, `90` -> `1m30s`: durations written the way the configuration takes them."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"


@dataclass(slots=True)
class _Slot(Generic[K]):
    key: K
    interval: float
    backoff: Backoff
    due: float


class Schedule(Generic[K]):
    """When each device is next due (wall-clock seconds).

    A device that answers is polled at the multiples of its interval (:func:`next_aligned`); a
    late poll skips the slots it missed rather than bursting to catch up. A device that does not
    answer is retried after capped exponential backoff starting at its interval and doubling up
    to its ``backoff_max``, so a dead device costs its connection one timeout per probe and
    ever fewer probes. Ties go to the device added first.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._slots: list[_Slot[K]] = []
        self._by_key: dict[K, _Slot[K]] = {}

    def add(self, key: K, interval: float, backoff_max: float) -> None:
        """Schedule ``key``: first poll at once (the first value should not wait a whole
        interval after start-up), then on the interval's aligned wall-clock slots."""
        slot = _Slot(key, interval, Backoff(interval, backoff_max), self._clock())
        self._slots.append(slot)
        self._by_key[key] = slot

    def __len__(self) -> int:
        return len(self._slots)

    def first(self) -> tuple[K, float]:
        """The device due soonest and when (wall-clock seconds; may be in the past)."""
        best = self._slots[0]
        for slot in self._slots:
            if slot.due < best.due:
                best = slot
        return best.key, best.due

    def due(self, key: K) -> float:
        return self._by_key[key].due

    def succeeded(self, key: K) -> None:
        """The device answered: back to its aligned slots."""
        slot = self._by_key[key]
        slot.backoff.reset()
        slot.due = next_aligned(slot.interval, max(slot.due, self._clock()))

    def failed(self, key: K) -> float:
        """The device did not answer: retry after its next backoff delay, which is returned."""
        slot = self._by_key[key]
        delay = slot.backoff.next()
        slot.due = self._clock() + delay
        return delay


_OK = ("ok", "")


class Health:
    """The up/down state of one device (or connection), logged once per state change.

    States: never seen, ``ok``, ``degraded`` (it answered but some requests or values failed)
    and ``down`` (it did not answer), the last two per error kind (``timeout``, ``exception``,
    ``refused``, …). A WARNING is logged when a device enters a failing state or its failing kind
    changes, an INFO line when it is fully well again (``words`` name the two: "answering" and
    "answering again" for a device, "connected" and "reconnected" for a connection); repeated failures of the same kind log
    nothing but are counted in ``status.errors``. ``quiet`` suppresses a down line when the
    cause was already logged elsewhere (the connection that carries the device went away).
    """

    def __init__(self, name: str, status: DeviceStatus | None = None,
                 logger: logging.Logger | None = None, clock: Callable[[], float] = time.monotonic,
                 words: tuple[str, str] = ("answering", "answering again")) -> None:
        self.name = name
        self._words = words
        self.status = status if status is not None else DeviceStatus()
        self._log = logger or log
        self._clock = clock
        self._state: tuple[str, str] | None = None
        self._since = clock()
        self._elapsed = 0.0

    @property
    def state(self) -> str | None:
        """``None`` (never seen), ``ok``, ``degraded:<kind>`` or ``down:<kind>``."""
        if self._state is None:
            return None
        return self._state[0] if self._state == _OK else ":".join(self._state)

    @property
    def is_down(self) -> bool:
        return self._state is not None and self._state[0] == "down"

    def count(self, kind: str, message: str) -> None:
        """One failed request (after its retries): counted, not logged."""
        self.status.errors[kind] = self.status.errors.get(kind, 0) + 1
        self.status.last_error = message

    def ok(self, time_ns: int | None = None, detail: str = "", summary: str = "") -> None:
        """Everything was read. ``detail`` goes on the first line, ``summary`` (what was counted
        while failing) on the line that says it is well again."""
        self._answered(time_ns)
        previous = self._enter(_OK)
        if previous is None:
            self._log.info("%s: %s%s", self.name, self._words[0], f" ({detail})" if detail else "")
        elif previous != _OK:
            what = self._words[1] if previous[0] == "down" else "reading every point again"
            self._log.info("%s: %s after %s (%s%s)", self.name, what,
                           format_duration(self._elapsed), previous[1], f": {summary}" if summary else "")

    def degraded(self, kind: str, message: str, time_ns: int | None = None) -> None:
        """It answered, but something failed: ``message`` says what and what to check."""
        self._answered(time_ns)
        if self._enter(("degraded", kind)) != ("degraded", kind):
            self._log.warning("%s: %s", self.name, message)

    def down(self, kind: str, message: str, *, quiet: bool = False) -> None:
        """It did not answer at all."""
        self.status.up = False
        if self._enter(("down", kind)) != ("down", kind) and not quiet:
            self._log.warning("%s: %s", self.name, message)

    def _answered(self, time_ns: int | None) -> None:
        self.status.up = True
        self.status.last_success_ns = time_ns if time_ns is not None else time.time_ns()

    def _enter(self, state: tuple[str, str]) -> tuple[str, str] | None:
        previous = self._state
        if previous != state:
            now = self._clock()
            self._elapsed = now - self._since
            self._since = now
            self._state = state
        return previous
