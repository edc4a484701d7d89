"""The feed's network sinks: an MQTT topic and an EPCIS 2.0 capture interface.

Contract (the same as the JSON Lines sink's, and the outbox's): the service calls
:meth:`send` with the oldest unacknowledged sealed events ``(seq, line)`` of this sink, one call
at a time, and ``ack(seq)`` moves the sink's position in the outbox. A sink calls ``ack`` only
after the far end confirmed (MQTT: PUBACK; HTTP: a 2xx). It raises
:class:`~gateway.forwarder.SinkUnavailable` to have the rest sent again later, in order, and
:class:`Rejected` when the far end refused one event *as a document* (it then becomes a dead
letter in the outbox and the position moves past it). :meth:`wait_connected` returns when a
send is worth trying (MQTT: connected; HTTP: the backoff or the server's Retry-After is over).

Why one event per message and per request, not batches: every sealed line is a complete EPCIS
document whose signature covers exactly that document, so a subscriber or a repository gets
something it can verify on its own; a refused document names exactly one event (the dead letter
is that event, not its neighbours); and the feed carries few events (one per lot and window or
binding change), so per-message overhead does not matter. MQTT keeps up to ``max_inflight``
messages unacknowledged at once, so a backlog still goes out quickly.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from gateway.backoff import Backoff
from gateway.config import ssl_context
from gateway.forwarder import SinkUnavailable
from gateway.influx import _describe, _message, retry_after_seconds
from gateway.mqtt import MqttSink
from gateway.trace.config import EpcisSinkConfig, TraceMqttSinkConfig

__all__ = ["EpcisSink", "Rejected", "TraceMqttSink", "classify"]

log = logging.getLogger(__name__)

Batch = Sequence[tuple[int, str]]
Ack = Callable[[int], None]


class Rejected(Exception):
    """The far end refused event ``seq`` as a document; sending it again cannot succeed."""

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(message)
        self.seq = seq


class TraceMqttSink:
    """The feed on an MQTT topic (QoS 1), through :class:`gateway.mqtt.MqttSink`; also carries the
    command subscription (see :meth:`subscribe`)."""

    def __init__(self, name: str, config: TraceMqttSinkConfig, gateway_id: str, site: str) -> None:
        # Its own client id: the readings' MQTT sink may use the same broker, and two clients with
        # one id would take the connection from each other forever.
        if config.client_id is None:
            config = config.model_copy(update={"client_id": f"sluice-{gateway_id}-trace"})
        self.name = name
        self.config = config
        self.topic = config.topic.format(site=site, gateway=gateway_id)
        self.command_topic = config.command_topic.format(site=site, gateway=gateway_id) if config.command_topic else None
        self.reply_topic = config.reply_topic.format(site=site, gateway=gateway_id)
        self.head_topic = config.head_topic.format(site=site, gateway=gateway_id) if config.head_topic else None
        self.mqtt = MqttSink(name, config, gateway_id, site)
        self.mqtt.keeps = "events are kept in the outbox"

    async def __aenter__(self) -> TraceMqttSink:
        await self.mqtt.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.mqtt.__aexit__(*exc)

    def subscribe(self, handler: Callable[[str, bytes], None]) -> None:
        if self.command_topic is not None:
            self.mqtt.subscribe(self.command_topic, handler)

    async def wait_connected(self) -> None:
        await self.mqtt.wait_connected()

    async def send(self, batch: Batch, ack: Ack) -> None:
        await self.mqtt.send([(self.topic, line.encode()) for _seq, line in batch])
        ack(batch[-1][0])

    async def reply(self, payload: bytes) -> None:
        """Publish a command's answer; raises SinkUnavailable when not connected."""
        await self.mqtt.send([(self.reply_topic, payload)])

    async def send_head(self, head: str) -> None:
        """Publish a signed chain head on ``head_topic``, retained: a verifier that subscribes later
        gets the newest head at once. Raises SinkUnavailable when not connected."""
        if self.head_topic is not None:
            await self.mqtt.send([(self.head_topic, head.encode())], retain=True)


# --------------------------------------------------------------------------- EPCIS capture
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


class EpcisSink:
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

    async def __aenter__(self) -> EpcisSink:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                                              connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=2))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ssl(self) -> ssl.SSLContext | bool:
        tls = self.config.tls
        if tls is None:
            return True
        if not tls.verify:
            return False
        return ssl_context(tls)

    async def wait_connected(self) -> None:
        delay = self._retry_at - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def send(self, batch: Batch, ack: Ack) -> None:
        if self._session is None:
            raise SinkUnavailable(f"EPCIS sink '{self.name}' is not open")
        headers = {"Content-Type": "application/ld+json", "GS1-EPCIS-Version": "2.0.0"}
        if self.config.auth is not None:
            headers[self.config.auth_header] = self.config.auth.get_secret_value()
        for seq, line in batch:
            try:
                async with self._session.post(self.endpoint, data=line.encode(), headers=headers) as response:
                    status = response.status
                    text = "" if status < 300 else _message(await response.text(errors="replace"))
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = _describe(exc)
                self._back_off(reason, None, f"check that the repository is reachable at {self.endpoint}")
                raise SinkUnavailable(reason) from exc
            outcome = classify(status)
            if outcome == RETRY:
                reason = f"HTTP {status}: {text}".rstrip(": ")
                self._back_off(reason, retry_after_seconds(retry_after), _hint(status))
                raise SinkUnavailable(reason)
            if outcome == REJECT:
                raise Rejected(seq, f"HTTP {status}: {text}".rstrip(": "))
            if outcome == DUPLICATE:
                log.info("EPCIS sink '%s': the repository already has event %d (HTTP 409) — counted as delivered",
                         self.name, seq)
            self.requests += 1
            ack(seq)
        if self.last_error is not None:
            log.info("EPCIS sink '%s': capturing to %s again", self.name, self.endpoint)
            self.last_error = None
        self._backoff.reset()

    def _back_off(self, reason: str, retry_after: float | None, hint: str) -> None:
        delay = self._backoff.next() if retry_after is None else retry_after
        self._retry_at = asyncio.get_running_loop().time() + delay
        if reason != self.last_error:
            log.warning("EPCIS sink '%s': cannot capture to %s: %s — events are kept in the outbox; retrying in %.1f s%s; %s",
                        self.name, self.endpoint, reason, delay,
                        " (the server's Retry-After)" if retry_after is not None else "", hint)
        self.last_error = reason


def make_sink(name: str, config: Any, gateway_id: str, site: str) -> TraceMqttSink | EpcisSink:
    if isinstance(config, TraceMqttSinkConfig):
        return TraceMqttSink(name, config, gateway_id, site)
    if isinstance(config, EpcisSinkConfig):
        return EpcisSink(name, config)
    raise ValueError(f"no trace sink for {type(config).__name__}")
