"""The trace feed's EPCIS 2.0 capture sink: ``POST <url><path>``, one signed EPCISDocument per event.

Contract: gateway/sinks/base.py (an :class:`~gateway.sinks.base.EventSink`). :meth:`EpcisSink.send`
posts the events of a batch in order and returns which were captured and which were refused as
documents (400, 413, 422: they become dead letters in the outbox and the feed goes on); a request
the repository answers "later" (408, 429, 5xx; and 401/403/404/405/415, configuration problems that
must not turn good events into dead letters) or a network error ends the batch there: what was
captured before it counts, the rest goes again once :meth:`EpcisSink.wait_connected` has waited
out the backoff or the server's Retry-After.

Why one event per request, not batches: every sealed line is a complete EPCIS document whose
signature covers exactly that document, so a repository gets something it can verify on its own;
a refused document names exactly one event (the dead letter is that event, not its neighbours);
and the feed carries few events (one per lot and window or binding change), so per-request
overhead does not matter. Only this module and gateway/sinks/influx.py import aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import aiohttp

from gateway.backoff import Backoff
from gateway.sinks.base import Event, Paced, Receipting, Result, SinkUnavailable, Where
from gateway.sinks.influx import _describe, _message, http_ssl, retry_after_seconds
from gateway.trace.config import EpcisSinkConfig

__all__ = ["EpcisSink", "classify", "create"]

log = logging.getLogger("gateway.trace.sinks")

DELIVERED, DUPLICATE, RETRY, REJECT = "delivered", "duplicate", "retry", "reject"


def classify(status: int) -> str:
    """What an answer to a capture request means for the event in it.

    2xx (201 for ``/events``, 202 for ``/capture``): delivered. 409: the repository already has an
    event with this eventID — which is a hash of the content, so it has this event (a resend
    after a lost answer): delivered. 400, 413, 422: the document is refused — dead letter.
    Everything else (408, 429, 5xx; and 401/403/404/405/415, which are configuration problems
    that must not turn good events into dead letters): retry."""
    if 200 <= status < 300:
        return DELIVERED
    if status == 409:
        return DUPLICATE
    if status in (400, 413, 422):
        return REJECT
    return RETRY


def _hint(status: int) -> str:
    if status in (401, 403):
        return "check `auth` (the token and its capture permission)"
    if status in (404, 405):
        return "check `url` and `path`: the base of the EPCIS 2.0 REST interface, and /capture or /events"
    if status == 415:
        return "the server does not take application/ld+json — is this an EPCIS 2.0 capture interface?"
    if status in (408, 429, 503):
        return "the repository is busy or rate-limiting us; nothing to do but wait"
    return "check the repository's log"


class EpcisSink(Paced):
    """``POST <url><path>``, one signed EPCISDocument per event. Construct freely (no I/O);
    ``async with`` opens the HTTP session; TLS is verified against the system CAs (or
    ``tls.ca_file``) unless ``tls.verify: false``."""

    def __init__(self, name: str, config: EpcisSinkConfig) -> None:
        self.name = name
        self.config = config
        self.endpoint = config.url + config.path
        self._session: aiohttp.ClientSession | None = None
        self._retry_at = 0.0
        self._backoff = Backoff(config.retry_min, config.retry_max, jitter=True)
        self.last_error: str | None = None
        self.requests = 0
        self.receipts: Receipting | None = None
        self.refused = 0  # not an MQTT broker (refused documents are dead letters)
        self.takes_heads = False

    async def __aenter__(self) -> EpcisSink:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                                              connector=aiohttp.TCPConnector(ssl=http_ssl(self.config.tls), limit=2))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send_head(self, head: str) -> None:
        """Signed heads are not captured by an EPCIS repository (``takes_heads`` is False)."""

    def subscribe(self, handler: Callable[[str, bytes], None]) -> None:
        """An EPCIS repository carries no binding commands."""

    async def reply(self, payload: bytes) -> None:
        raise SinkUnavailable("an EPCIS repository carries no command replies")

    async def send(self, batch: Sequence[Event]) -> Result:
        if self._session is None:
            raise SinkUnavailable(f"EPCIS sink '{self.name}' is not open")
        headers = {"Content-Type": "application/ld+json", "GS1-EPCIS-Version": "2.0.0"}
        if self.config.auth is not None:
            headers[self.config.auth_header] = self.config.auth.get_secret_value()
        accepted: list[int] = []
        refused: list[tuple[int, str]] = []
        for index, (seq, line) in enumerate(batch):
            try:
                async with self._session.post(self.endpoint, data=line.encode(), headers=headers) as response:
                    status = response.status
                    text = "" if status < 300 else _message(await response.text(errors="replace"))
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = _describe(exc)
                self._back_off(reason, None, f"check that the repository is reachable at {self.endpoint}")
                return self._stopped(accepted, refused, reason, exc)
            outcome = classify(status)
            if outcome == RETRY:
                reason = f"HTTP {status}: {text}".rstrip(": ")
                self._back_off(reason, retry_after_seconds(retry_after), _hint(status))
                return self._stopped(accepted, refused, reason)
            if outcome == REJECT:
                refused.append((index, f"HTTP {status}: {text}".rstrip(": ")))
                continue
            if outcome == DUPLICATE:
                log.info("EPCIS sink '%s': the repository already has event %d (HTTP 409) — counted as delivered",
                         self.name, seq)
            self.requests += 1
            accepted.append(index)
        if self.last_error is not None:
            log.info("EPCIS sink '%s': capturing to %s again", self.name, self.endpoint)
            self.last_error = None
        self._backoff.reset()
        return Result(accepted, refused)

    @staticmethod
    def _stopped(accepted: list[int], refused: list[tuple[int, str]], reason: str,
                 cause: BaseException | None = None) -> Result:
        """The batch ends at a failure: what was answered before it counts, the rest goes again."""
        if not accepted and not refused:
            raise SinkUnavailable(reason) from cause
        return Result(accepted, refused, unavailable=reason)

    def _back_off(self, reason: str, retry_after: float | None, hint: str) -> None:
        delay = self._backoff.next() if retry_after is None else retry_after
        self._retry_at = asyncio.get_running_loop().time() + delay
        if reason != self.last_error:
            log.warning("EPCIS sink '%s': cannot capture to %s: %s — events are kept in the outbox; retrying in %.1f s%s; %s",
                        self.name, self.endpoint, reason, delay,
                        " (the server's Retry-After)" if retry_after is not None else "", hint)
        self.last_error = reason


def create(name: str, config: EpcisSinkConfig, where: Where) -> EpcisSink:
    """The registry's factory (gateway/sinks/__init__.py)."""
    return EpcisSink(name, config)
