"""The MQTT sink: the delivery engine's (and the trace feed's) side of one broker connection — QoS 1/2
batches that return only when every message was acknowledged *and accepted*, and a retained
online/offline status. Built on :class:`gateway.mqtt.client.Client`.

Lifecycle: ``async with MqttSink(name, config, gateway_id, site) as sink:`` starts the client,
which connects, publishes the retained birth message ``online`` on the status topic (the will,
``offline`` retained, is registered with the broker at connect) and reconnects after any loss
(gateway/mqtt/client.py: a TCP probe every second while the broker is gone, backoff from
``reconnect_min`` to ``reconnect_max`` for a broker that refuses us). Entering does not wait for
the broker: the gateway runs (and buffers) while it is unreachable. Leaving publishes ``offline``
(retained) and disconnects cleanly.

:meth:`MqttSink.send` is called by one delivery at a time. A batch the broker refuses (MQTT 5: a
PUBACK reason code ≥ 0x80, e.g. 0x87 *not authorized* from an ACL) raises :class:`SinkRefused` (a
:class:`SinkUnavailable`: nothing of the batch counts as delivered); the sink logs it once per
change of reason, counts it in :attr:`MqttSink.refused`, and :meth:`wait_connected` then waits a
capped exponential backoff before the engine tries again. MQTT 3.1.1 has no reason code in a
PUBACK: there a refused publish cannot be detected (README: use MQTT 5 or ``delivery: end_to_end``).

:meth:`MqttSink.subscribe`, called before entering, adds a topic filter that is subscribed (QoS 1)
on every connection; its handler is called on the event loop with each message's topic and
payload (the trace command topic). The session is persistent (``clean_session=False`` for MQTT
3.1.1; ``clean_start=False`` and a session expiry for MQTT 5) with client id
``sluice-<gateway id>`` unless configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence

from gateway.backoff import Backoff
from gateway.config import MqttSinkConfig, ssl_context
from gateway.mqtt import PacketTypes, Properties
from gateway.mqtt.client import Client, Message as Received, NotConnected, Refused, Settings, Will, topic_matches
from gateway.sinks.base import Message, Receipting, Result, SinkUnavailable, Where

__all__ = ["MqttSink", "SinkRefused", "SinkUnavailable", "create"]

log = logging.getLogger("gateway.mqtt")

SESSION_EXPIRY = 7 * 86400
"""MQTT 5 session expiry (seconds): how long the broker keeps our session while we are away."""
CLOSE_TIMEOUT = 5.0
"""Seconds a clean shutdown waits for the `offline` status."""
ONLINE = b"online"
OFFLINE = b"offline"


class SinkRefused(SinkUnavailable):
    """The broker refused a message of the batch (MQTT 5 reason code): nothing of it is delivered;
    the sink backs off before the next attempt. The sink has logged it (once per change of reason):
    callers need not log it again."""

    logged = True


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
        self.refused = 0  # batches the broker refused (MQTT 5 reason codes)
        self._refusal: str | None = None  # the current refusal, logged once
        self._retry_at = 0.0  # loop time before which no batch is sent after a refusal
        self._backoff = Backoff(config.reconnect_min, config.reconnect_max, jitter=True)
        self._subscriptions: dict[str, Callable[[str, bytes], None]] = {}
        self._receipt_handler: Callable[[bytes], None] | None = None
        self.receipts: Receipting | None = None
        """Itself with ``delivery: end_to_end`` (the capability of gateway/sinks/base.py), else None."""
        if config.delivery == "end_to_end":  # subscribed from the first connection on
            self._subscriptions[self.receipt_topic] = self._receipt
            self.receipts = self
        self._client: Client | None = None
        self.keeps = "readings are kept in the outbox"
        """Where unsent items wait, for log lines (the trace feed's sink says events)."""

    def _settings(self) -> Settings:
        cfg = self.config
        return Settings(
            who=f"MQTT sink '{self.name}'", host=cfg.host, port=cfg.effective_port, client_id=self.client_id,
            protocol=cfg.protocol, username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password is not None else None,
            keepalive=cfg.keepalive, tls=functools.partial(ssl_context, cfg.tls) if cfg.tls is not None else None,
            will=Will(self.status_topic, OFFLINE), max_inflight=cfg.max_inflight,
            session_expiry=SESSION_EXPIRY if cfg.protocol == "5" else None,
            subscriptions=[(f, 1) for f in self._subscriptions], connect_timeout=max(cfg.keepalive, 10.0),
            reconnect_min=cfg.reconnect_min, reconnect_max=cfg.reconnect_max,
            keeps=f"{self.keeps} and sent on reconnect", hint=lambda reason: hint(reason, self))

    def _receipt(self, _topic: str, payload: bytes) -> None:
        if self._receipt_handler is not None:
            self._receipt_handler(payload)

    # -- the receipt capability (delivery: end_to_end) ---------------------------------------------

    @property
    def receipt_timeout(self) -> float:
        return self.config.receipt_timeout

    @property
    def receipt_window(self) -> int:
        return self.config.receipt_window

    @property
    def receipt_key(self) -> bytes | None:
        secret = self.config.receipt_secret
        return secret.get_secret_value().encode() if secret is not None else None

    def on_receipt(self, handler: Callable[[bytes], None]) -> None:
        self._receipt_handler = handler

    async def send_tagged(self, batch: Sequence[Message], tags: Sequence[bytes]) -> Result:
        return await self.send(batch, tags)

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        """Subscribe to ``topic_filter`` on every connection; ``handler(topic, payload)`` must not
        block. Call before entering. Handler errors are logged and do not touch the connection."""
        self._subscriptions[topic_filter] = handler

    # -- state for the engine and health ------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    @property
    def connects(self) -> int:
        return self._client.connects if self._client is not None else 0

    @property
    def last_error(self) -> str | None:
        if self._refusal is not None:
            return self._refusal
        return self._client.last_error if self._client is not None else None

    async def wait_connected(self) -> None:
        """Return once a batch is worth sending: connected, and any backoff after a refusal is over."""
        while True:
            if self._client is not None and not self._client.connected:
                await self._client.wait_connected()
            delay = self._retry_at - asyncio.get_running_loop().time()
            if delay <= 0:
                return
            await asyncio.sleep(delay)

    # -- sending -------------------------------------------------------------------------------

    async def send(self, messages: Sequence[Message], correlation: Sequence[bytes] | None = None, *,
                   retain: bool = False) -> Result:
        """Publish ``messages`` at the configured QoS (up to ``max_inflight`` unacknowledged at once,
        in order); return when the broker acknowledged and accepted all of them. Raises
        :class:`SinkRefused` when it refused one (MQTT 5), :class:`SinkUnavailable` if not connected
        or if the link drops first (some may have arrived: the caller sends the batch again).

        ``correlation`` (``delivery: end_to_end``, MQTT 5): one batch id per message, sent as the
        message's *correlation data* with :attr:`receipt_topic` as its *response topic*; payload
        and topic are unchanged. ``retain``: the broker keeps the last message of each topic for
        subscribers that come later (the trace feed's signed heads)."""
        if not messages:
            return Result(())
        client = self._client
        if client is None:
            raise SinkUnavailable(f"MQTT sink '{self.name}' is not open")
        props: list[Properties | None] | None = None
        if correlation is not None:
            props = []
            for corr in correlation:
                p = Properties(PacketTypes.PUBLISH)
                p.ResponseTopic = self.receipt_topic
                p.CorrelationData = corr
                props.append(p)
        try:
            await client.publish(messages, self.config.qos, retain=retain, properties=props, timeout=self.ack_timeout)
        except NotConnected as exc:
            raise SinkUnavailable(str(exc)) from None
        except Refused as exc:
            self._refused(exc)
            raise SinkRefused(str(exc)) from None
        if self._refusal is not None:
            log.info("MQTT sink '%s': the broker accepts our publishes again", self.name)
            self._refusal = None
        self._backoff.reset()
        return Result.whole(len(messages))

    def _refused(self, exc: Refused) -> None:
        self.refused += 1
        delay = self._backoff.next()
        self._retry_at = asyncio.get_running_loop().time() + delay
        text = str(exc)
        if text != self._refusal:
            log.error("MQTT sink '%s': %s — %s and sent again, backing off up to %g s; check the broker's ACL for "
                      "user %s / client id %s", self.name, text, self.keeps, self.config.reconnect_max,
                      self.config.username or "(anonymous)", self.client_id)
        else:
            log.debug("MQTT sink '%s': refused again: %s", self.name, text)
        self._refusal = text

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> MqttSink:
        self._client = Client(self._settings(), on_connect=self._birth, on_message=self._dispatch)
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        client = self._client
        if client is None:
            return
        try:
            if client.connected:
                with contextlib.suppress(NotConnected, Refused, TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await client.publish([(self.status_topic, OFFLINE)], 1, retain=True)
        finally:
            await client.__aexit__(*exc)
            self._client = None

    async def _birth(self, _session_present: bool) -> None:
        assert self._client is not None
        try:
            await self._client.publish([(self.status_topic, ONLINE)], 1, retain=True, timeout=self.ack_timeout)
        except Refused as exc:  # the status is not data: carry on, but say so once
            if str(exc) != getattr(self, "_status_refused", None):
                log.error("MQTT sink '%s': %s — subscribers cannot see whether this gateway is online; check the "
                          "broker's ACL for the status topic", self.name, exc)
            self._status_refused = str(exc)

    def _dispatch(self, message: Received) -> None:
        for topic_filter, handler in self._subscriptions.items():
            if topic_matches(topic_filter, message.topic):
                try:
                    handler(message.topic, message.payload)
                except Exception:
                    log.exception("MQTT sink '%s': handler for %s failed", self.name, topic_filter)


def hint(reason: str, sink: MqttSink) -> str:
    """What to check, for a connection failure ``reason`` (no secret in it)."""
    low = reason.lower()
    cfg = sink.config
    if "not authori" in low or "bad user" in low or "refused the connection" in low:
        return "check the username and password (and the broker's ACL for this client id and its status topic)"
    if "certificate" in low or "ssl" in low or "tls" in low:
        ca = f"tls.ca_file ({cfg.tls.ca_file})" if cfg.tls and cfg.tls.ca_file else "the system CA bundle"
        return f"check {ca} and that the broker's certificate is valid for '{cfg.host}'"
    if cfg.tls is not None and cfg.tls.cert_file is None and ("no answer" in low or "without an mqtt goodbye" in low
                                                              or "closed" in low):
        # TLS 1.3: a broker that requires a client certificate rejects us after the handshake,
        # which shows up here only as a silent or closed connection.
        return ("if the broker requires a client certificate (mosquitto: require_certificate), set "
                f"tls.cert_file and tls.key_file; otherwise check the network path to {sink.address}")
    if "refused" in low or "without an mqtt goodbye" in low:
        return f"check that the broker is running and listening on {sink.address} (host, port, firewall)"
    if "timed out" in low or "no answer" in low or "unreachable" in low:
        return f"check the network path to {sink.address} and that it is an MQTT broker"
    if "name or service" in low or "resolution" in low or "nodename" in low:
        return f"check that the host name '{cfg.host}' resolves (DNS)"
    return "check the broker's log"


def create(name: str, config: MqttSinkConfig, where: Where) -> MqttSink:
    """The registry's factory (gateway/sinks/__init__.py)."""
    return MqttSink(name, config, where.gateway_id, where.site)
