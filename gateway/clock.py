"""Clock sanity: is the system clock synchronised (boxes without an RTC boot with a wrong clock),
and did it jump? Readings taken while it is not synchronised get quality ``clock_unsynced``.

Contract: :class:`ClockWatch` is polled from the event loop (:meth:`ClockWatch.run`, once a
second); :attr:`ClockWatch.synced` is True, False, or None when the state cannot be known.
Sources, in order:

1. the kernel's own flag: ``adjtimex()`` with no modes (read-only) returns ``TIME_ERROR`` while
   the clock is unsynchronised (``STA_UNSYNC``) — what ``timedatectl`` shows as "System clock
   synchronized". Only the return value is used, so the ``struct timex`` layout does not matter.
2. where that call is forbidden — the shipped unit's ``ProtectClock=yes`` filters every
   ``@clock`` system call, the read-only use included — the file systemd-timesyncd creates once it
   has synchronised the clock, ``/run/systemd/timesync/synchronized``.
3. otherwise unknown (None): readings are not flagged, and that is logged once.

A jump is a change of the wall clock against the monotonic clock of more than
``jump_threshold`` seconds between two polls: logged as a WARNING with its size, and counted.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["ClockWatch", "kernel_clock_synced"]

log = logging.getLogger(__name__)

TIME_ERROR = 5
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")

_libc: ctypes.CDLL | None = None


def kernel_clock_synced() -> bool | None:
    """True/False from the kernel (or timesyncd's flag when adjtimex is forbidden); None if unknown."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        buf = ctypes.create_string_buffer(1024)  # zeroed: modes = 0 reads only; larger than any struct timex
        state: int = _libc.adjtimex(buf)  # ctypes calls return an int unless restype says otherwise
    except (OSError, AttributeError):
        state = -1
    if state >= 0:
        return state != TIME_ERROR
    if TIMESYNCD_FLAG.exists():
        return True
    return None


class ClockWatch:
    """Tracks synchronisation and jumps; see the module docstring."""

    def __init__(self, check_sync: Callable[[], bool | None] = kernel_clock_synced,
                 wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic,
                 jump_threshold: float = 2.0, period: float = 5.0) -> None:
        self._check = check_sync
        self.period = period  # how often run() polls; jumps accumulate, so 5 s is enough
        self._wall = wall
        self._mono = mono
        self.jump_threshold = jump_threshold
        self.synced: bool | None = None
        self.jumps = 0
        self.last_jump = 0.0
        self._base: tuple[float, float] | None = None
        self._checked = False

    def poll(self) -> None:
        synced = self._check()
        if not self._checked or synced != self.synced:
            if synced is False:
                log.warning("the system clock is not synchronised — readings are flagged quality=clock_unsynced "
                            "until it is; check NTP (timedatectl status) and the network")
            elif synced is True and self._checked:
                log.info("the system clock is synchronised; readings are no longer flagged")
            elif synced is None:
                log.info("cannot tell whether the system clock is synchronised (no adjtimex, no "
                         "systemd-timesyncd); readings are not flagged")
        self.synced, self._checked = synced, True
        wall, mono = self._wall(), self._mono()
        if self._base is not None:
            drift = (wall - self._base[0]) - (mono - self._base[1])
            if abs(drift) > self.jump_threshold:
                self.jumps += 1
                self.last_jump = drift
                log.warning("the system clock jumped %s%.1f s — readings around this time may be out of order; "
                            "%s", "+" if drift > 0 else "", drift,
                            "it was probably just synchronised" if synced else "check NTP and the RTC")
        self._base = (wall, mono)

    async def run(self) -> None:
        """Poll every ``period`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.period)
            self.poll()
