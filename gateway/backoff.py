"""When to try again: the one capped exponential backoff of Sluice, and the cheap TCP probe that
lets a link come back within a second of its server instead of at the end of a long backoff.

Who uses what:

* :class:`Backoff` paces attempts a server *answered* and refused (MQTT CONNACK refusals, TLS
  failures, a refused publish, HTTP 5xx/429, a device that does not answer): ``initial``, 2×,
  4×, … capped at ``maximum``; with ``jitter`` the delay is drawn uniformly between ``initial``
  and that ceiling, so many gateways refused at once do not come back in step.
* :func:`wait_reachable` is for a server that is simply *gone* (connection refused, unreachable,
  timed out): a TCP connect every ``interval`` seconds costs the far end one SYN and one FIN,
  nothing like a full MQTT or TLS session, so it may run far more often than the backoff allows
  full attempts, and the first full attempt follows the server's return within one interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import socket
import ssl
from collections.abc import Callable

__all__ = ["PROBE_INTERVAL", "Backoff", "is_unreachable", "probe", "wait_reachable"]

PROBE_INTERVAL = 1.0
"""Seconds between TCP probes of a server that is down."""
PROBE_TIMEOUT = 3.0
"""Seconds one probe may take (a firewall that drops SYNs costs this much, not a full connect timeout)."""
PROBE_SETTLE = 0.2
"""Seconds an accepted probe connection must stay up to count (see :func:`probe`)."""

_UNREACHABLE = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT,
                          errno.ECONNRESET, errno.EHOSTDOWN, errno.ENETDOWN, errno.EADDRNOTAVAIL})


class Backoff:
    """Capped exponential delays: ``initial``, 2×, 4×, … up to ``maximum``; :meth:`reset` on success.

    With ``jitter`` each delay is uniform in [``initial``, that ceiling]."""

    __slots__ = ("_uniform", "failures", "initial", "jitter", "maximum")

    def __init__(self, initial: float, maximum: float, *, jitter: bool = False,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        self.initial = initial
        self.maximum = max(maximum, initial)
        self.jitter = jitter
        self.failures = 0
        self._uniform = uniform

    def next(self) -> float:
        """The delay before the next attempt after one more failure."""
        ceiling = min(self.maximum, self.initial * 2 ** min(self.failures, 62))
        self.failures += 1
        return self._uniform(self.initial, ceiling) if self.jitter else ceiling

    def reset(self) -> None:
        self.failures = 0


def is_unreachable(exc: BaseException) -> bool:
    """The server is not there at all (nothing listens, no route, DNS, a TCP timeout) — as opposed to
    a server that answered and refused (TLS, authentication), which must be backed off."""
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return False
    if isinstance(exc, socket.gaierror | TimeoutError | ConnectionRefusedError):
        return True
    return isinstance(exc, OSError) and exc.errno in _UNREACHABLE


async def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT, settle: float = PROBE_SETTLE) -> bool:
    """True if a TCP connection to ``host:port`` is accepted and not reset within ``settle`` seconds
    (it is closed again then). The settle time matters: a server being killed still completes
    handshakes into its listen backlog for a moment after its clients saw their connections close,
    then resets them; MQTT and HTTP servers send nothing first, so silence means someone listens."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    try:
        try:
            async with asyncio.timeout(settle):
                await reader.read(1)  # EOF or a reset: nobody is there after all
            return False
        except TimeoutError:
            return True
        except OSError:
            return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def wait_reachable(host: str, port: int, interval: float = PROBE_INTERVAL) -> None:
    """Return once ``host:port`` accepts a TCP connection, probing every ``interval`` seconds."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        if await probe(host, port, min(PROBE_TIMEOUT, max(interval, 0.5) * 3)):
            return
        await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
