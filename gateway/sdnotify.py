"""systemd's notification protocol (``sd_notify``) over ``$NOTIFY_SOCKET``, without a dependency.

Contract: :class:`Notifier` is a no-op when the service was not started by systemd with
``Type=notify`` (no ``$NOTIFY_SOCKET``). Messages are single datagrams of ``KEY=value`` lines;
sending never raises (a notification that cannot be delivered is logged once at DEBUG — the
service must keep running whatever happens to its supervisor's socket).
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["Notifier", "watchdog_interval"]

log = logging.getLogger(__name__)


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WatchdogSec=``), or None when no watchdog is set
    for this process (``$WATCHDOG_USEC`` unset, or ``$WATCHDOG_PID`` naming another process)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Notifier:
    """Sends sd_notify datagrams to ``address`` (default ``$NOTIFY_SOCKET``; ``@name`` is abstract)."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address = address
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` fields in one datagram, e.g. ``send(READY=1, STATUS="polling")``."""
        if not self.address:
            return False
        text = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(text.encode("utf-8", "replace"), target)
        except OSError as exc:
            if not self._failed:
                log.debug("cannot notify systemd at %s: %s", self.address, exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
