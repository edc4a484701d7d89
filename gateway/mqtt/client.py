"""Sluice's one MQTT layer: a paho-mqtt 2.x client driven by the asyncio event loop, kept connected
by its own supervisor, with batches of publishes that fail on the first refusal.

Why paho and not aiomqtt (ARCHITECTURE.md has the figures): aiomqtt 2.5 ignores the reason code of
a PUBACK (an MQTT 5 publish refused by a broker ACL completes like a success) and cannot
acknowledge a received message manually, which ``sluice ingest`` needs; reaching into its private
fields to batch publishes was what let a refusal count as a delivery. paho's public API does all
of it: ``on_publish`` gets the reason code (``CallbackAPIVersion.VERSION2``), ``manual_ack=True``
with ``ack(mid, qos)``, and a socket it lets us drive.

Contract:

* ``async with Client(settings, ...) as client:`` starts the task ``mqtt[<name>]`` that connects
  and stays connected; entering never waits for the broker. Leaving sends DISCONNECT (the will is
  then not published) and stops the task.
* :attr:`Client.connected` is true from the end of set-up (CONNACK, then the owner's
  ``on_connect`` coroutine — birth message — and the subscriptions) until the link is lost.
  :meth:`Client.wait_connected` waits for it. :attr:`Client.last_error` is the last connect, TLS,
  authentication or loss reason (None while connected); :attr:`Client.connects` counts connections.
* :meth:`Client.publish` hands a whole batch to paho at once (paho keeps ``max_inflight``
  unacknowledged on the wire and sends the rest in order as PUBACKs return) and returns one future
  that completes at the batch's last PUBACK; it fails with :class:`Refused` at the first PUBACK
  (or PUBCOMP) whose reason code is a failure (≥ 0x80, MQTT 5 only: a 3.1.1 broker cannot say
  so), or with :class:`NotConnected` when the link is down or drops first. Publishing is allowed
  from CONNACK on (the owner's ``on_connect`` publishes the birth message).
* Received messages go to ``on_message`` on the event loop, from CONNACK on (a resumed session's
  queue arrives before the SUBACK). With ``manual_ack`` the broker keeps each one until
  :meth:`Client.ack`; an acknowledgement of a message from an earlier connection is dropped
  (packet ids are per connection: the broker re-sends it). ``on_lost`` is called once per lost
  connection.
* Reconnecting (see gateway/backoff.py): a broker that is *gone* (refused, unreachable, timed out)
  is probed with a plain TCP connect every :data:`~gateway.backoff.PROBE_INTERVAL` and a full
  connect follows as soon as the port accepts; a broker that *answered* and refused (CONNACK
  refusal, TLS failure, a connection that dropped within :data:`STABLE_AFTER` of being made) is
  retried with capped exponential backoff (``reconnect_min`` … ``reconnect_max``, jittered). A
  connection lost after being stable is retried at once.

Threads: none of our own. paho's socket is registered with ``loop.add_reader``/``add_writer``
(``loop_read``/``loop_write``); ``loop_misc`` runs every second for keepalives. The one blocking
call, ``connect()`` (DNS, TCP and TLS handshakes), runs in the loop's default executor; the socket
callbacks it triggers reach the loop through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.backoff import PROBE_INTERVAL, Backoff, is_unreachable, probe, wait_reachable

__all__ = ["STABLE_AFTER", "Client", "Message", "NotConnected", "Refused", "Settings", "Will", "topic_matches"]

log = logging.getLogger("gateway.mqtt")

STABLE_AFTER = 10.0
"""A connection that lasted less than this (seconds) counts as a failed attempt for the backoff: a
broker that accepts and then drops us at once must not be hammered."""
CLOSE_TIMEOUT = 5.0
"""Seconds a clean shutdown waits for the DISCONNECT to go out."""

topic_matches = paho.topic_matches_sub


class NotConnected(Exception):
    """Not connected, or the connection dropped before every message of the batch was acknowledged."""


class Refused(Exception):
    """The broker refused a publish: an MQTT 5 PUBACK/PUBCOMP with a failure reason code."""

    def __init__(self, topic: str, reason: str, code: int) -> None:
        super().__init__(f"the broker refused the publish to {topic}: {reason} (0x{code:02x})")
        self.topic, self.reason, self.code = topic, reason, code


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(slots=True)
class Settings:
    """One connection's parameters. ``who`` names the owner in log lines (``MQTT sink 'broker'``);
    ``keeps`` says where unsent data waits during an outage; ``hint(reason)`` what to check."""

    who: str
    host: str
    port: int
    client_id: str
    protocol: Literal["3.1.1", "5"] = "5"
    username: str | None = None
    password: str | None = None
    keepalive: float = 30.0
    tls: Callable[[], ssl.SSLContext] | None = None
    will: Will | None = None
    max_inflight: int = 20
    clean: bool = False  # a fresh session at every connect (diagnostics only: the sinks and the ingest persist)
    session_expiry: int | None = None  # MQTT 5: seconds the broker keeps our session; 3.1.1: persistent
    receive_maximum: int | None = None  # MQTT 5: messages in flight to us at most
    manual_ack: bool = False
    subscriptions: list[tuple[str, int]] = field(default_factory=list)
    subscriptions_required: bool = False  # a refused subscription fails the connection (else: logged)
    connect_timeout: float = 15.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    probe_interval: float = PROBE_INTERVAL
    keeps: str = "data is kept and sent on reconnect"
    hint: Callable[[str], str] = lambda _reason: "check the broker's log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(slots=True)
class Message:
    """A received message. ``conn`` is the connection it came on (for :meth:`Client.ack`)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    properties: Properties | None
    conn: int


class _Batch:
    """One publish call: done at its last acknowledgement, failed at the first refusal or loss."""

    __slots__ = ("done", "missing")

    def __init__(self, done: asyncio.Future[None], count: int) -> None:
        self.done, self.missing = done, count

    def acked(self) -> None:
        self.missing -= 1
        if self.missing <= 0 and not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class _Conn:
    """One connection attempt: the paho client, its pending PUBACKs, and whether it is alive."""

    def __init__(self, number: int, client: paho.Client) -> None:
        self.number = number
        self.paho = client
        self.alive = False  # CONNACK received and not lost
        self.released = False  # given up: a socket paho opens later (connect() in a thread) is closed
        self.lost = asyncio.Event()
        self.reason = ""
        self.pending: dict[int, tuple[_Batch, str]] = {}  # mid -> (batch, topic)
        self.connack: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.suback: asyncio.Future[list[ReasonCode]] = asyncio.get_running_loop().create_future()

    def drop(self, reason: str) -> None:
        self.alive = False
        if not self.lost.is_set():
            self.reason = reason
            self.lost.set()
        for batch, _topic in self.pending.values():
            batch.fail(NotConnected(f"connection lost during a batch: {reason}"))
        self.pending.clear()
        for fut in (self.connack, self.suback):
            if not fut.done():
                fut.set_exception(NotConnected(reason))
                fut.exception()  # retrieved: nobody may be waiting any more


class Client:
    """See the module docstring. Construct freely (no I/O); use as an async context manager."""

    def __init__(self, settings: Settings, *, on_connect: Callable[[bool], Awaitable[None]] | None = None,
                 on_message: Callable[[Message], None] | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self._on_connect_hook = on_connect
        self._on_message_hook = on_message
        self._on_lost_hook = on_lost
        self._conn: _Conn | None = None
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._numbers = 0
        self.connects = 0
        self.last_error: str | None = None
        self.down_since = time.monotonic()
        self.session_present = False

    # -- state -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    @property
    def connection(self) -> int:
        """The number of the current (or last) connection: compare with :attr:`Message.conn`."""
        return self._conn.number if self._conn is not None else 0

    @property
    def current(self) -> int:
        """The number of the connection that is up (from CONNACK on), 0 while none is."""
        conn = self._conn
        return conn.number if conn is not None and conn.alive else 0

    async def wait_connected(self) -> None:
        await self._up.wait()

    # -- publishing and acknowledging ----------------------------------------------------------

    def publish(self, messages: Sequence[tuple[str, bytes]], qos: int = 1, *, retain: bool = False,
                properties: Sequence[Properties | None] | None = None, timeout: float | None = None) -> asyncio.Future[None]:
        """Hand ``messages`` (topic, payload) to paho at once; the future completes at the last
        PUBACK and fails with :class:`Refused` or :class:`NotConnected` (see the module docstring).
        ``timeout``: no acknowledgement in time drops the connection (a stuck broker)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        batch = _Batch(done, len(messages))
        conn = self._conn
        if conn is None or not conn.alive:
            batch.fail(NotConnected(f"not connected to {self.settings.address}"))
            return done
        if not messages:
            batch.acked()
            return done
        for n, (topic, payload) in enumerate(messages):
            info = conn.paho.publish(topic, payload, qos, retain, properties[n] if properties is not None else None)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                # The socket went away under us (paho queues the message for a reconnect we never
                # make): the link is lost now, not when its callback gets to run.
                self._lost(conn, f"publish failed: {paho.error_string(info.rc)}")
                batch.fail(NotConnected(f"publish to {self.settings.address} failed: {paho.error_string(info.rc)}"))
                return done
            if qos == 0 or info.is_published():
                batch.acked()
            else:
                conn.pending[info.mid] = (batch, topic)
        if timeout is not None and not done.done():
            timer = loop.call_later(timeout, self._expire, conn, batch, timeout)
            done.add_done_callback(lambda _f: timer.cancel())
        return done

    def _expire(self, conn: _Conn, batch: _Batch, timeout: float) -> None:
        if not batch.done.done():
            self._lost(conn, f"no acknowledgement within {timeout:.0f} s")
            conn.paho.disconnect()

    def ack(self, message: Message) -> bool:
        """Acknowledge a message received with ``manual_ack``; False (nothing sent) if it came on an
        earlier connection or the link is down — the broker then re-sends it."""
        conn = self._conn
        if conn is None or not conn.alive or message.conn != conn.number:
            return False
        if message.qos > 0:
            conn.paho.ack(message.mid, message.qos)
        return True

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = asyncio.create_task(self._supervise(), name=f"mqtt[{self.settings.who}]")
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the supervisor ------------------------------------------------------------------------

    async def _supervise(self) -> None:
        s = self.settings
        backoff = Backoff(s.reconnect_min, s.reconnect_max, jitter=True)
        reported: str | None = None
        probing = False  # before the next attempt, see whether anything listens
        delay = 0.0  # the backoff owed before the next full attempt, if the broker is there
        while True:
            if probing and not await probe(s.host, s.port):
                # Gone (stopped, restarting, unreachable): no backoff is owed to a broker that was
                # not there; connect as soon as it accepts connections again.
                log.debug("%s: nothing accepts connections on %s; probing every %g s", s.who, s.address, s.probe_interval)
                await wait_reachable(s.host, s.port, s.probe_interval)
                log.debug("%s: %s accepts connections again; connecting", s.who, s.address)
                delay = 0.0
            if delay > 0:
                log.debug("%s: waiting %.1f s before connecting to %s again", s.who, delay, s.address)
                await asyncio.sleep(delay)
            connects = self.connects
            started = time.monotonic()
            kind, reason = await self._connect_once()
            if self.connects > connects:  # we were connected, and lost it
                self.down_since = time.monotonic()
                log.warning("%s: lost connection to %s: %s — %s; %s", s.who, s.address, reason, s.keeps, s.hint(reason))
                if time.monotonic() - started >= STABLE_AFTER:
                    backoff.reset()
                    delay = 0.0
                else:  # accepted and dropped at once: owed a backoff if it is still there
                    delay = backoff.next()
                probing = True
            else:
                # Unreachable after a probe found the port open: not simply down, so back off too.
                delay = 0.0 if kind == "unreachable" and not probing else backoff.next()
                probing = kind == "unreachable"
                if reason != reported:
                    how = (f"probing every {s.probe_interval:g} s and connecting as soon as it answers" if probing
                           else f"retrying in {delay:.1f} s (then backing off up to {s.reconnect_max:g} s)")
                    log.warning("%s: cannot connect to %s: %s — %s; %s; %s", s.who, s.address, reason, s.keeps, how,
                                s.hint(reason))
                else:
                    log.debug("%s: still cannot connect to %s: %s", s.who, s.address, reason)
            reported = self.last_error = reason

    def _make(self) -> paho.Client:
        s = self.settings
        v5 = s.protocol == "5"
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id,
                             protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                             clean_session=None if v5 else s.clean, manual_ack=s.manual_ack, reconnect_on_failure=False)
        client.connect_timeout = s.connect_timeout
        client.max_inflight_messages_set(s.max_inflight)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls is not None:
            client.tls_set_context(s.tls())
        if s.will is not None:
            client.will_set(s.will.topic, s.will.payload, s.will.qos, s.will.retain)
        return client

    async def _connect_once(self) -> tuple[str, str]:
        """One connection, held until it is lost. Returns (kind, reason): kind ``unreachable`` (TCP),
        ``refused`` (the broker or TLS said no) or ``lost`` (it was up). Cancelled on close."""
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            client = self._make()
        except (OSError, ssl.SSLError, ValueError) as exc:  # TLS files unreadable or invalid
            return "refused", f"TLS set-up failed: {_describe(exc)}"
        self._numbers += 1
        conn = self._conn = _Conn(self._numbers, client)
        self._bind(conn)
        props: Properties | None = None
        kwargs: dict[str, Any] = {}
        if s.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            if s.session_expiry is not None:
                props.SessionExpiryInterval = s.session_expiry
            if s.receive_maximum is not None:
                props.ReceiveMaximum = s.receive_maximum
            kwargs = {"clean_start": s.clean, "properties": props}
        misc: asyncio.Task[None] | None = None
        try:
            try:
                await loop.run_in_executor(None, functools.partial(
                    client.connect, s.host, s.port, max(int(s.keepalive), 5), **kwargs))
            except (OSError, ssl.SSLError, ssl.CertificateError, paho.WebsocketConnectionError) as exc:
                return ("unreachable" if is_unreachable(exc) else "refused"), _describe(exc)
            misc = loop.create_task(self._misc_loop(client), name=f"mqtt-keepalive[{s.who}]")
            try:
                async with asyncio.timeout(s.connect_timeout):
                    self.session_present = await conn.connack
                    if s.subscriptions:
                        if s.protocol == "5":
                            client.subscribe([(f, SubscribeOptions(qos=q)) for f, q in s.subscriptions])
                        else:
                            client.subscribe(list(s.subscriptions))
                        self._check_subscriptions(await conn.suback)
                    if self._on_connect_hook is not None:
                        await self._on_connect_hook(self.session_present)
            except TimeoutError:
                return "refused", f"no answer within {s.connect_timeout:.0f} s"
            except NotConnected as exc:
                return "refused", str(exc) or "connection closed during set-up"
            except _SetupRefused as exc:
                return "refused", str(exc)
            if conn.lost.is_set():
                return "refused", conn.reason
            self.connects += 1
            if self.last_error is None:
                log.info("%s: connected to %s as %s", s.who, s.address, s.client_id)
            else:
                log.info("%s: connected to %s as %s, after %.1f s without (%s)", s.who, s.address, s.client_id,
                         time.monotonic() - self.down_since, self.last_error)
            self.last_error = None
            self._up.set()
            await conn.lost.wait()
            return "lost", conn.reason
        finally:
            self._up.clear()
            if not conn.lost.is_set():  # we are leaving (closing or a failed set-up): say goodbye
                conn.alive = False
                if client.socket() is not None:
                    client.disconnect()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(CLOSE_TIMEOUT):
                            await asyncio.shield(conn.lost.wait())
                self._lost(conn, "closed")
            if misc is not None:
                misc.cancel()
                await asyncio.gather(misc, return_exceptions=True)
            self._release(conn)

    def _check_subscriptions(self, reasons: list[ReasonCode]) -> None:
        s = self.settings
        refused = [f"{topic}: {rc}" for (topic, _q), rc in zip(s.subscriptions, reasons) if rc.is_failure]
        if not refused:
            return
        text = "the broker refused the subscription (" + "; ".join(refused) + ") — check the broker's ACL for this user"
        if s.subscriptions_required:
            raise _SetupRefused(text)
        if text != getattr(self, "_sub_refused", None):
            log.error("%s: %s", s.who, text)
        self._sub_refused = text

    async def _misc_loop(self, client: paho.Client) -> None:
        # A timer, not an event: keepalive pings and their timeouts are paho's clock.
        while client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(1.0)

    def _lost(self, conn: _Conn, reason: str) -> None:
        was = not conn.lost.is_set()
        conn.drop(reason)
        if conn is self._conn:
            self._up.clear()
        if was and self._on_lost_hook is not None:
            self._on_lost_hook(reason)

    # -- paho's callbacks (on the loop thread, except socket callbacks during connect()) --------

    def _call(self, func: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            func(*args)
        else:
            self._loop.call_soon_threadsafe(func, *args)

    def _bind(self, conn: _Conn) -> None:
        client = conn.paho

        def socket_open(_c: paho.Client, _u: Any, sock: Any) -> None:
            def readable() -> None:
                client.loop_read()
                # An SSL socket may hold decrypted bytes that select() does not see.
                while getattr(sock, "pending", None) is not None and sock.pending() > 0:
                    if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break

            self._call(self._opened, conn, sock, readable)

        def socket_close(_c: paho.Client, _u: Any, sock: Any) -> None:
            self._call(self._unwatch, sock, True)

        def register_write(_c: paho.Client, _u: Any, sock: Any) -> None:
            self._call(self._watch, sock, client.loop_write, False)

        def unregister_write(_c: paho.Client, _u: Any, sock: Any) -> None:
            self._call(self._unwatch, sock, False)

        def connected(_c: paho.Client, _u: Any, flags: Any, reason: ReasonCode, _p: Any) -> None:
            def apply() -> None:
                if conn.connack.done():
                    return
                if reason.is_failure:
                    conn.connack.set_exception(_SetupRefused(f"the broker refused the connection: {reason}"))
                else:
                    conn.alive = True
                    conn.connack.set_result(bool(flags.session_present))
            self._call(apply)

        def subscribed(_c: paho.Client, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any) -> None:
            if not conn.suback.done():
                conn.suback.set_result(list(reasons))

        def disconnected(_c: paho.Client, _u: Any, _flags: Any, reason: ReasonCode, _p: Any) -> None:
            text = str(reason)
            if text in ("Unspecified error", "Normal disconnection") or not reason.is_failure:
                text = ("the connection closed without an MQTT goodbye (broker stopped, network cut, or keepalive "
                        "expired)" if reason.is_failure else "disconnected")
            self._call(self._lost, conn, text)

        def published(_c: paho.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
            entry = conn.pending.pop(mid, None)
            if entry is None:
                return
            batch, topic = entry
            if reason.is_failure:
                batch.fail(Refused(topic, str(reason), reason.value))
            else:
                batch.acked()

        def received(_c: paho.Client, _u: Any, m: paho.MQTTMessage) -> None:
            if self._on_message_hook is None:
                return
            props = getattr(m, "properties", None)
            # paho types the payload bytes | bytearray; bytes() of a bytes object is that object, no copy.
            self._on_message_hook(Message(m.topic, bytes(m.payload), m.qos, bool(m.retain), m.mid, props, conn.number))

        client.on_socket_open = socket_open
        client.on_socket_close = socket_close
        client.on_socket_register_write = register_write
        client.on_socket_unregister_write = unregister_write
        client.on_connect = connected
        client.on_subscribe = subscribed
        client.on_disconnect = disconnected
        client.on_publish = published
        client.on_message = received

    def _opened(self, conn: _Conn, sock: Any, readable: Callable[[], None]) -> None:
        if conn.released:  # connect() finished in its thread after we gave the attempt up
            with contextlib.suppress(OSError):
                sock.close()
            return
        self._watch(sock, readable, True)

    def _watch(self, sock: Any, callback: Callable[[], Any], read: bool) -> None:
        assert self._loop is not None
        if sock.fileno() < 0:
            return
        if read:
            self._loop.add_reader(sock.fileno(), callback)
        else:
            self._loop.add_writer(sock.fileno(), callback)

    def _unwatch(self, sock: Any, read: bool) -> None:
        assert self._loop is not None
        fd = sock.fileno()
        if fd < 0:
            return
        if read:
            self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)

    def _release(self, conn: _Conn) -> None:
        conn.released = True
        client = conn.paho
        client.on_socket_close = None
        sock = client.socket()
        if sock is not None:  # a half-open attempt: release the socket and its reader
            self._unwatch(sock, True)
            with contextlib.suppress(OSError):
                sock.close()


class _SetupRefused(Exception):
    """The broker refused the connection or a required subscription."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    if text.startswith("[Errno"):
        text = text.split("] ", 1)[-1]
    return text or type(exc).__name__
