"""The MQTT sink: one broker connection with its own reconnect loop, QoS 1/2 batches that return
only when every message was acknowledged, and a retained online/offline status. The only module
that imports aiomqtt (and, through it, paho-mqtt).

Lifecycle: ``async with MqttSink(name, config, gateway_id, site) as sink:`` starts a task
``mqtt[<name>]`` that connects, publishes the retained birth message ``online`` on the status
topic (the will, ``offline`` retained, is registered with the broker at connect), and reconnects
after any loss with a capped exponential backoff with jitter (``reconnect_min`` ..
``reconnect_max``). Entering does not wait for the broker: the gateway runs (and buffers) while
it is unreachable. Leaving publishes ``offline`` (retained) and disconnects cleanly.

:meth:`MqttSink.send` is called by one forwarder at a time. :meth:`MqttSink.subscribe`, called
before entering, adds a topic filter that is subscribed (QoS 1) on every connection; its handler
is called on the event loop with each message's topic and payload (the trace command topic). The session is persistent
(``clean_session=False`` for MQTT 3.1.1; ``clean_start=False`` and a session expiry for MQTT 5)
with client id ``sluice-<gateway id>`` unless configured. A fresh aiomqtt client is made for
every connection attempt: aiomqtt 2.5 does not reset its state when a connection drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiomqtt
from aiomqtt import MqttError
from paho.mqtt.client import MQTT_ERR_SUCCESS, error_string
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import MqttSinkConfig, ssl_context
from gateway.forwarder import Message, SinkUnavailable

__all__ = ["MqttSink", "SinkUnavailable", "watch"]

log = logging.getLogger(__name__)

SESSION_EXPIRY = 7 * 86400
"""MQTT 5 session expiry (seconds): how long the broker keeps our session while we are away."""
CLOSE_TIMEOUT = 5.0
"""Seconds a clean shutdown waits for the `offline` status and the DISCONNECT."""
ONLINE = b"online"
OFFLINE = b"offline"


class _Link:
    """One live connection: the client and an event set when it is lost."""

    __slots__ = ("batches", "client", "lost", "reason")

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.lost = asyncio.Event()
        self.reason = ""
        self.batches: set[asyncio.Future[None]] = set()
        """Batches awaiting PUBACKs on this connection: they fail when it drops."""

    def drop(self, reason: str) -> None:
        if not self.lost.is_set():
            self.reason = reason
            self.lost.set()
        for done in self.batches:
            if not done.done():
                done.set_exception(SinkUnavailable(f"connection lost during a batch: {reason}"))


class _BatchAcks:
    """Counts a batch's PUBACKs (aiomqtt calls :meth:`set` with each); ``done`` completes at the last."""

    __slots__ = ("done", "missing")

    def __init__(self, done: asyncio.Future[None], count: int) -> None:
        self.done = done
        self.missing = count

    def set(self) -> None:
        self.missing -= 1
        if self.missing == 0 and not self.done.done():
            self.done.set_result(None)

    def expire(self, timeout: float) -> None:
        if not self.done.done():
            self.done.set_exception(TimeoutError(f"no acknowledgement within {timeout:.0f} s"))


class MqttSink:
    """An MQTT broker as a sink. Construct freely (no I/O); use as an async context manager."""

    def __init__(self, name: str, config: MqttSinkConfig, gateway_id: str, site: str) -> None:
        self.name = name
        self.config = config
        self.client_id = config.client_id or f"sluice-{gateway_id}"
        self.status_topic = config.status_topic.format(site=site, gateway=gateway_id)
        self.receipt_topic = config.receipt_topic.format(site=site, gateway=gateway_id)
        self.address = f"{config.host}:{config.effective_port}"
        # A stuck broker (TCP up, no PUBACK) is normally caught by the keepalive; this is the backstop.
        self.ack_timeout = max(2.5 * config.keepalive, 10.0)
        self._link: _Link | None = None
        self._up = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connects = 0  # successful connections so far
        self._down_since = time.monotonic()
        self.last_error: str | None = None
        self._subscriptions: dict[str, Callable[[str, bytes], None]] = {}
        self.receipt_handler: Callable[[bytes], None] | None = None
        if config.delivery == "end_to_end":  # subscribed from the first connection on
            self._subscriptions[self.receipt_topic] = self._receipt

    def _receipt(self, _topic: str, payload: bytes) -> None:
        if self.receipt_handler is not None:
            self.receipt_handler(payload)

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        """Subscribe to ``topic_filter`` on every connection; ``handler(topic, payload)`` must not
        block. Call before entering. Handler errors are logged and do not touch the connection."""
        self._subscriptions[topic_filter] = handler

    # -- the forwarder's side ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._link is not None and not self._link.lost.is_set()

    async def wait_connected(self) -> None:
        while not self.connected:
            self._up.clear()
            await self._up.wait()

    async def send(self, messages: Sequence[Message], correlation: Sequence[bytes] | None = None) -> None:
        """Publish ``messages`` at the configured QoS with up to ``max_inflight`` unacknowledged at
        once, in order; return when the broker acknowledged all of them. Raises
        :class:`SinkUnavailable` if not connected or if the link drops first (some may have
        arrived: the caller sends the batch again).

        ``correlation`` (``delivery: end_to_end``, MQTT 5): one batch id per message, sent as the
        message's *correlation data* with :attr:`receipt_topic` as its *response topic*; payload
        and topic are unchanged."""
        if not messages:
            return
        link = self._link
        if link is None or link.lost.is_set():
            raise SinkUnavailable(f"not connected to {self.address}")
        # The whole batch is handed to paho at once (paho keeps at most max_inflight unacknowledged
        # on the wire and sends the rest, in order, as PUBACKs come back); one future completes
        # when the last PUBACK of the batch arrives. Awaiting aiomqtt's publish() per message
        # costs a task, a wait_for and an event per message: 3-4x the CPU of this.
        client = link.client
        paho = client._client  # private: test_mqtt checks the aiomqtt internals we use
        pending = client._pending_publishes  # {mid: object with .set()}, popped on PUBACK
        loop = asyncio.get_running_loop()
        acks = _BatchAcks(loop.create_future(), len(messages))
        qos = self.config.qos
        mids: list[int] = []
        link.batches.add(acks.done)
        timer = loop.call_later(self.ack_timeout, acks.expire, self.ack_timeout)
        try:
            for n, (topic, payload) in enumerate(messages):
                props = None
                if correlation is not None:
                    props = Properties(PacketTypes.PUBLISH)
                    props.ResponseTopic = self.receipt_topic
                    props.CorrelationData = correlation[n]
                info = paho.publish(topic, payload, qos, False, props)
                if info.rc != MQTT_ERR_SUCCESS:
                    raise SinkUnavailable(f"publish to {self.address} failed: {error_string(info.rc)}")
                if info.is_published():
                    acks.set()
                else:
                    pending[info.mid] = acks
                    mids.append(info.mid)
            try:
                await acks.done
            except TimeoutError as exc:
                link.drop(str(exc))
                raise SinkUnavailable(f"publish to {self.address} failed: {exc}") from None
        finally:
            timer.cancel()
            link.batches.discard(acks.done)
            for mid in mids:
                pending.pop(mid, None)
            if not acks.done.done():
                acks.done.cancel()
            elif not acks.done.cancelled():
                acks.done.exception()  # retrieved: a drop or expiry after a failed publish is not "never retrieved"

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> MqttSink:
        self._closing.clear()
        self._task = asyncio.create_task(self._supervise(), name=f"mqtt[{self.name}]")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT + 5.0):
                await asyncio.shield(task)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- connection management -----------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        cfg = self.config
        kwargs: dict[str, Any] = {}
        if cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props)
        else:
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V311, clean_session=False)
        if cfg.tls is not None:
            kwargs["tls_context"] = self._tls_context()
        client = aiomqtt.Client(
            cfg.host, cfg.effective_port,
            identifier=self.client_id,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password is not None else None,
            keepalive=max(int(cfg.keepalive), 5),
            will=aiomqtt.Will(self.status_topic, OFFLINE, qos=1, retain=True),
            max_inflight_messages=cfg.max_inflight + 2,
            timeout=max(cfg.keepalive, 10.0),
            logger=logging.getLogger("aiomqtt"),
            **kwargs,
        )
        # aiomqtt warns on every publish once more than 10 are pending; we allow max_inflight.
        client.pending_calls_threshold = cfg.max_inflight + 2
        return client

    def _tls_context(self) -> ssl.SSLContext:
        assert self.config.tls is not None
        return ssl_context(self.config.tls)

    async def _supervise(self) -> None:
        attempt = 0
        reported: str | None = None
        while not self._closing.is_set():
            connects = self.connects
            try:
                reason = await self._connect_once()
            except (OSError, ssl.SSLError, ValueError) as exc:  # TLS files unreadable or invalid
                reason = f"TLS set-up failed: {exc}"
            if reason is None:  # closing
                return
            if self.connects > connects:
                self._down_since = time.monotonic()
                attempt = 0
                log.warning("MQTT sink '%s': lost connection to %s: %s — readings are kept in the outbox "
                            "and sent on reconnect; %s", self.name, self.address, reason, _hint(reason, self))
            elif reason != reported:
                log.warning("MQTT sink '%s': cannot connect to %s: %s — readings are kept in the outbox; "
                            "retrying every %g–%g s; %s", self.name, self.address, reason,
                            self.config.reconnect_min, self.config.reconnect_max, _hint(reason, self))
            else:
                log.debug("MQTT sink '%s': still cannot connect to %s: %s", self.name, self.address, reason)
            reported = self.last_error = reason
            ceiling = min(self.config.reconnect_max, self.config.reconnect_min * 2 ** min(attempt, 30))
            delay = random.uniform(self.config.reconnect_min, ceiling)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: it can swallow a cancel on 3.11
                    await self._closing.wait()

    async def _connect_once(self) -> str | None:
        """One connection, held until it is lost (returns the reason) or we close (None)."""
        client = self._client()
        link: _Link | None = None
        try:
            async with client:
                await client.publish(self.status_topic, ONLINE, qos=1, retain=True)
                for topic_filter in self._subscriptions:
                    await client.subscribe(topic_filter, qos=1)
                link = self._link = _Link(client)
                self.connects += 1
                if self.last_error is None:
                    log.info("MQTT sink '%s': connected to %s as %s", self.name, self.address, self.client_id)
                else:
                    log.info("MQTT sink '%s': connected to %s as %s, after %.1f s without (%s)", self.name,
                             self.address, self.client_id, time.monotonic() - self._down_since, self.last_error)
                self.last_error = None
                self._up.set()
                waits = (asyncio.ensure_future(self._closing.wait()),  # we are shutting down
                         asyncio.ensure_future(self._watch(client, link)),  # the connection dropped
                         asyncio.ensure_future(link.lost.wait()))  # send() gave up on it
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiting in waits:
                        waiting.cancel()
                    await asyncio.gather(*waits, return_exceptions=True)
                if self._closing.is_set() and not link.lost.is_set():
                    link.drop("closing")
                    with contextlib.suppress(MqttError):
                        await client.publish(self.status_topic, OFFLINE, qos=1, retain=True, timeout=CLOSE_TIMEOUT)
                    return None
                # Lost (or dropped by send): leaving the block disconnects if the socket is still up.
                return link.reason
        except MqttError as exc:
            if link is not None:
                link.drop(_describe_error(exc))
                return link.reason
            return _describe_error(exc)
        finally:
            if link is not None:
                link.drop("closed")
            self._link = None

    async def _watch(self, client: aiomqtt.Client, link: _Link) -> None:
        # aiomqtt ends message iteration with an MqttError when the connection drops: this is the
        # disconnect detector, and it hands messages of our subscriptions (if any) to their handlers.
        try:
            async for message in client.messages:
                for topic_filter, handler in self._subscriptions.items():
                    if message.topic.matches(topic_filter):
                        payload = message.payload
                        try:
                            handler(str(message.topic), payload if isinstance(payload, bytes) else str(payload).encode())
                        except Exception:
                            log.exception("MQTT sink '%s': handler for %s failed", self.name, topic_filter)
        except MqttError as exc:
            link.drop(_describe_error(exc))


async def watch(host: str, port: int, topic_filter: str, *, retry: float = 1.0) -> AsyncIterator[tuple[str, bytes]]:
    """Subscribe to ``topic_filter`` (QoS 1, clean session) and yield ``(topic, payload)`` forever,
    reconnecting every ``retry`` seconds while the broker is unreachable. For the demo and for
    diagnostics; the gateway itself only publishes."""
    while True:
        try:
            async with aiomqtt.Client(host, port, logger=logging.getLogger("aiomqtt")) as client:
                await client.subscribe(topic_filter, qos=1)
                async for message in client.messages:
                    payload = message.payload
                    yield str(message.topic), payload if isinstance(payload, bytes) else str(payload).encode()
        except MqttError as exc:
            log.debug("watching %s on %s:%d: %s; retrying", topic_filter, host, port, _describe_error(exc))
            await asyncio.sleep(retry)


def _describe_error(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, MqttError) and str(exc) == "Disconnected during message iteration" and cause is not None:
        exc = cause
    rc = getattr(exc, "rc", None)
    if rc is not None and getattr(rc, "value", rc) in (128, 7):  # paho's "connection lost"
        return "the connection closed without an MQTT goodbye (broker stopped, network cut, or keepalive expired)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    # aiomqtt turns OSError into MqttError(str(exc)): drop the "[Errno 111] " prefix
    return re.sub(r"^\[Errno -?\d+\] ", "", str(exc)) or type(exc).__name__


def _hint(reason: str, sink: MqttSink) -> str:
    low = reason.lower()
    cfg = sink.config
    if "refused" in low and ("authori" in low or "password" in low or "code:4" in low or "code:5" in low
                             or "code:134" in low or "code:135" in low):
        return "check the username and password (and the broker's ACL for this client id)"
    if "not authori" in low or "bad user" in low:
        return "check the username and password (and the broker's ACL for this client id)"
    if "certificate" in low or "ssl" in low or "tls" in low:
        ca = f"tls.ca_file ({cfg.tls.ca_file})" if cfg.tls and cfg.tls.ca_file else "the system CA bundle"
        return f"check {ca} and that the broker's certificate is valid for '{cfg.host}'"
    if cfg.tls is not None and cfg.tls.cert_file is None and ("timed out" in low or "without an mqtt goodbye" in low
                                                              or "closed" in low):
        # TLS 1.3: a broker that requires a client certificate rejects us after the handshake,
        # which shows up here only as a silent or closed connection.
        return ("if the broker requires a client certificate (mosquitto: require_certificate), set "
                f"tls.cert_file and tls.key_file; otherwise check the network path to {sink.address}")
    if "refused" in low or "without an mqtt goodbye" in low:
        return f"check that the broker is running and listening on {sink.address} (host, port, firewall)"
    if "timed out" in low or "timeout" in low or "unreachable" in low:
        return f"check the network path to {sink.address} and that it is an MQTT broker"
    if "name or service" in low or "resolution" in low or "nodename" in low:
        return f"check that the host name '{cfg.host}' resolves (DNS)"
    return "check the broker's log"
