"""The direct InfluxDB sink: line-protocol batches from the outbox written over HTTP, acknowledged
only on a 2xx. The only module that imports influxdb-client (and aiohttp, which it brings).

Two write APIs (``api:`` in the sink's config):

* ``v2`` — ``POST /api/v2/write?org=&bucket=&precision=ns`` with ``Authorization: Token``, through
  influxdb-client's **async** write API (``InfluxDBClientAsync``). InfluxDB 1.8+, 2.x, 3.x,
  Cloud, VictoriaMetrics. Why async and not the sync ``WriteApi`` in a thread: the async client
  runs on aiohttp in our event loop, so a write needs no thread (the sync client would need
  ``asyncio.to_thread`` per request, or its own batching thread whose retries and buffer would
  sit outside the outbox and could acknowledge before the server did). The async client has no
  retry or batching of its own, which is what we want: the outbox and this module own both.
* ``v1`` — ``POST /write?db=&rp=&precision=ns`` (HTTP basic auth) for InfluxDB 1.x before 1.8,
  which has no ``/api/v2/write``. influxdb-client cannot speak it, so this is a plain aiohttp
  request on the same kind of session.

Lifecycle: ``async with InfluxSink(name, config, gateway_id, site) as sink:`` opens the HTTP
session (no I/O in the constructor; no request until the first ``send``). One delivery calls
:meth:`send` at a time; each message (one line-protocol payload, gzip-compressed unless
``gzip: false``) is one request.

Outcomes of a request:

* 2xx: written. The batch is acknowledged once every message of it was.
* 429, 503 (and every other 5xx), a timeout or a network error: :class:`SinkUnavailable`. The
  sink then reports itself not ``connected`` until the retry time: the server's ``Retry-After``
  (seconds or an HTTP date, capped at one hour) if it sent one, else a capped exponential
  backoff with jitter between ``retry_min`` and ``retry_max`` (gateway/backoff.py). The engine
  waits in :meth:`wait_connected` and sends the same batch again; when nothing accepted the
  connection, that wait ends as soon as a TCP probe (every second) finds the server listening
  again, so writing resumes within about a second of its return, whatever the backoff had reached.
* 400/422 whose message says the data is bad (``partial write``, ``unable to parse``,
  ``field type conflict``, ``points beyond retention`` ...), and 413 (request too large):
  the message is *refused* in the returned :class:`~gateway.sinks.base.Result` (with the
  server's message) and the batch's next message is written; the delivery engine finds the refused
  readings and moves them to the dead letters.
  A partial write means the server stored the other points of the request; re-sending the
  letter later rewrites them identically (same series and timestamp), which is harmless.
* any other 4xx (401/403 credentials, 404 unknown database/bucket/org, or a 400 we do not
  recognise as a data error): :class:`SinkUnavailable` with an ERROR naming what to check —
  a configuration problem must never turn good data into dead letters.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import json
import logging
import re
import ssl
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from influxdb_client.client.exceptions import InfluxDBError
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.client.write_api_async import WriteApiAsync
from influxdb_client.domain.write_precision import WritePrecision

from gateway.backoff import Backoff, is_unreachable, wait_reachable
from gateway.config import InfluxSinkConfig, TlsConfig, ssl_context
from gateway.sinks.base import Message, Paced, Receipting, Result, SinkUnavailable, Where

__all__ = ["InfluxSink", "WriteOutcome", "classify", "create", "http_ssl", "retry_after_seconds"]

log = logging.getLogger(__name__)

RETRY_AFTER_CAP = 3600.0
"""Longest Retry-After we honour (seconds): a server asking for more is probably misconfigured."""
GZIP_LEVEL = 1
"""Request bodies (v1, and v2 through :func:`_fast_gzip`): level 1 compresses line protocol ~8× at a
fraction of level 6's CPU (a Pi matters)."""

_DATA_ERRORS = re.compile(r"partial write|unable to parse|field type conflict|type conflict|invalid field|"
                          r"invalid number|bad timestamp|points beyond retention|beyond retention policy|"
                          r"max-values-per-tag|invalid boolean|unbalanced quotes|missing (field|tag)|"
                          r"invalid tag|invalid measurement", re.IGNORECASE)


class WriteOutcome:
    """How a non-2xx answer is treated: ``retry`` (SinkUnavailable) or ``reject`` (dead letter)."""

    RETRY = "retry"
    REJECT = "reject"


def classify(status: int, message: str) -> str:
    """:attr:`WriteOutcome.REJECT` when the answer says the data itself is bad, else RETRY."""
    if status == 413:
        return WriteOutcome.REJECT
    if status in (400, 422) and _DATA_ERRORS.search(message):
        return WriteOutcome.REJECT
    return WriteOutcome.RETRY


def http_ssl(tls: TlsConfig | None) -> ssl.SSLContext | bool:
    """aiohttp's ``ssl=`` for an HTTP sink's ``tls:`` block (also the EPCIS sink's)."""
    if tls is None:
        return True  # aiohttp's default: verify against the system CAs for https
    if not tls.verify:
        return False
    return ssl_context(tls)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    delta = when.timestamp() - (time.time() if now is None else now)
    return min(max(delta, 0.0), RETRY_AFTER_CAP)


class _Refused(Exception):
    """A non-2xx answer: status, the server's message, its Retry-After header."""

    def __init__(self, status: int, message: str, retry_after: str | None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after


class InfluxSink(Paced):
    """InfluxDB (or a compatible server) as a sink. Construct freely; use as an async context manager."""

    def __init__(self, name: str, config: InfluxSinkConfig, gateway_id: str = "", site: str = "",
                 kept: str = "readings are kept in the outbox") -> None:
        self.name = name
        self.config = config
        self._kept = kept  # where what is not written waits, for the outage warning (sluice ingest has no outbox)
        parts = urlsplit(config.url)
        self._host, self._port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        self.address = f"{self._host}:{self._port}"
        self._session: aiohttp.ClientSession | None = None
        self._client: InfluxDBClientAsync | None = None
        self._write_api: WriteApiAsync | None = None
        self._retry_at = 0.0  # loop time before which we do not try again
        self._backoff = Backoff(config.retry_min, config.retry_max, jitter=True)
        self._gone = False  # the last failure was a refused/unreachable connection: probe while waiting
        self.last_error: str | None = None
        self.requests = 0  # successful write requests
        self.failures = 0  # requests that failed (retried) or were refused (dead-lettered)
        self.receipts: Receipting | None = None  # no end-to-end receipts over HTTP
        self.refused = 0  # not an MQTT broker: nothing refuses a whole batch (data refusals are dead letters)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> InfluxSink:
        cfg = self.config
        timeout_ms = int(cfg.timeout * 1000)
        if cfg.api == "v2":
            kwargs: dict[str, Any] = {}
            if cfg.tls is not None:
                kwargs["verify_ssl"] = cfg.tls.verify
                if cfg.tls.ca_file is not None:
                    kwargs["ssl_ca_cert"] = str(cfg.tls.ca_file)
                if cfg.tls.cert_file is not None:
                    kwargs["cert_file"] = str(cfg.tls.cert_file)
                    kwargs["cert_key_file"] = str(cfg.tls.key_file)
            self._client = InfluxDBClientAsync(url=cfg.url, token=cfg.token.get_secret_value() if cfg.token else "",
                                               # None: no organisation (InfluxDB 1.8); the client accepts it, its annotation says str
                                               org=cfg.org, timeout=timeout_ms, enable_gzip=cfg.gzip, **kwargs)  # type: ignore[arg-type]
            if cfg.gzip:
                _fast_gzip(self._client)
            self._write_api = self._client.write_api()
        else:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=cfg.timeout),
                                                  connector=aiohttp.TCPConnector(ssl=http_ssl(cfg.tls), limit=4))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()  # type: ignore[no-untyped-call]  # influxdb-client leaves close() unannotated
            self._client = self._write_api = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the delivery engine's side ----------------------------------------------------------------

    @property
    def retry_at(self) -> float:
        """Event-loop time before which no request is made (after a failure; 0 when none)."""
        return self._retry_at

    async def wait_connected(self) -> None:
        """Wait out the backoff or Retry-After; after a connection failure (nothing listening, no
        route) return as soon as the server accepts TCP connections again (gateway/backoff.py)."""
        delay = self._retry_at - asyncio.get_running_loop().time()
        if delay <= 0:
            return
        if not self._gone:
            await asyncio.sleep(delay)
            return
        probing = asyncio.ensure_future(wait_reachable(self._host, self._port))
        try:
            done, _ = await asyncio.wait((probing,), timeout=delay)
        finally:
            probing.cancel()
            await asyncio.gather(probing, return_exceptions=True)
        if done:  # it is back: try at once, and from the start of the backoff if it fails otherwise
            self._retry_at = 0.0
            self._backoff.reset()

    async def send(self, messages: Sequence[Message]) -> Result:
        """Write every message's payload, in order; see the module docstring for the outcomes."""
        refused: list[tuple[int, str]] = []
        for index, (_topic, payload) in enumerate(messages):
            try:
                await self._write(payload)
            except _Refused as exc:
                self.failures += 1
                if classify(exc.status, exc.message) == WriteOutcome.REJECT:
                    refused.append((index, str(exc)))
                    continue
                self._back_off(str(exc), retry_after_seconds(exc.retry_after), _hint(exc.status, self.config))
                raise SinkUnavailable(str(exc)) from None
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.failures += 1
                reason = _describe(exc)
                self._back_off(reason, None, f"check that the database runs and listens at {self.config.url} "
                                             "(host, port, firewall)", gone=_gone(exc))
                raise SinkUnavailable(reason) from exc
            self.requests += 1
        if self.last_error is not None:
            log.info("InfluxDB sink '%s': writing to %s again", self.name, self.config.url)
            self.last_error = None
        self._backoff.reset()
        if not refused:
            return Result.whole(len(messages))
        bad = {i for i, _m in refused}
        return Result([i for i in range(len(messages)) if i not in bad], refused)

    def _back_off(self, reason: str, retry_after: float | None, hint: str, gone: bool = False) -> None:
        delay = self._backoff.next() if retry_after is None else retry_after
        self._gone = gone and retry_after is None
        self._retry_at = asyncio.get_running_loop().time() + delay
        if reason != self.last_error:
            log.warning("InfluxDB sink '%s': cannot write to %s: %s — %s; retrying "
                        "in %.1f s%s; %s", self.name, self.config.url, reason, self._kept, delay,
                        " (the server's Retry-After)" if retry_after is not None else
                        " or as soon as it accepts connections" if self._gone else "", hint)
        else:
            log.debug("InfluxDB sink '%s': still cannot write: %s; retrying in %.1f s", self.name, reason, delay)
        self.last_error = reason

    async def _write(self, payload: bytes) -> None:
        if self._write_api is not None:
            cfg = self.config
            try:
                assert cfg.bucket is not None  # api v2 requires one (InfluxSinkConfig's validator)
                # org None: the client's (InfluxDB 1.8 has none); WritePrecision.NS is the str "ns" the
                # method takes, though annotated as the WritePrecision class.
                await self._write_api.write(bucket=cfg.bucket, org=cfg.org, record=payload,  # type: ignore[arg-type]
                                            write_precision=WritePrecision.NS)  # type: ignore[arg-type]
            except InfluxDBError as exc:
                status = getattr(exc, "status", None) or (exc.response.status if exc.response is not None else 0)
                if not status:
                    raise OSError(exc.message) from exc
                raise _Refused(int(status), _message(str(exc.message)), exc.retry_after) from None
            return
        if self._session is None:
            raise SinkUnavailable(f"InfluxDB sink '{self.name}' is not open")
        cfg = self.config
        params = {"db": cfg.database or "", "precision": "ns"}
        if cfg.retention_policy:
            params["rp"] = cfg.retention_policy
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        body = payload
        if cfg.gzip:
            body = gzip.compress(payload, compresslevel=GZIP_LEVEL, mtime=0)
            headers["Content-Encoding"] = "gzip"
        auth = None
        if cfg.username is not None and cfg.password is not None:
            auth = aiohttp.BasicAuth(cfg.username, cfg.password.get_secret_value())
        async with self._session.post(f"{cfg.url}/write", params=params, data=body, headers=headers,
                                      auth=auth) as response:
            if 200 <= response.status < 300:
                return
            text = await response.text(errors="replace")
            raise _Refused(response.status, _message(text) or response.reason or "", response.headers.get("Retry-After"))


def _fast_gzip(client: InfluxDBClientAsync) -> None:
    """Make the client gzip write bodies at :data:`GZIP_LEVEL` instead of its fixed level 9, which
    cost ingest into VictoriaMetrics ~3x the CPU of the whole v1 path (bench/backlog.py --target vm)."""
    conf = client.conf
    original = conf.update_request_body

    def update_request_body(path: str, body: Any) -> Any:
        if path == "/api/v2/write" and isinstance(body, (bytes, str)):
            data = body.encode() if isinstance(body, str) else body
            return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)
        return original(path, body)

    conf.update_request_body = update_request_body  # type: ignore[method-assign]


def _gone(exc: BaseException) -> bool:
    """Nothing accepted the connection (as opposed to a server that answered badly or too slowly)."""
    if isinstance(exc, aiohttp.ClientSSLError):
        return False
    if isinstance(exc, aiohttp.ClientConnectorError):
        return True
    return is_unreachable(exc) and not isinstance(exc, TimeoutError)


def _message(body: str) -> str:
    """The server's error text: InfluxDB answers ``{"error": ...}`` (1.x) or ``{"message": ...}`` (2.x)."""
    body = body.strip()
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500]
    if isinstance(data, dict):
        return str(data.get("error") or data.get("message") or body)[:500]
    return body[:500]


def _hint(status: int, cfg: InfluxSinkConfig) -> str:
    if status in (401, 403):
        return ("check the token and its write permission on the bucket" if cfg.api == "v2"
                else "check username and password and the user's WRITE grant on the database")
    if status == 404:
        return (f"check that bucket '{cfg.bucket}' and org '{cfg.org}' exist and that the server has /api/v2/write "
                "(InfluxDB 1.8+; use api: v1 for older 1.x)" if cfg.api == "v2"
                else f"check that database '{cfg.database}' exists (CREATE DATABASE)")
    if status in (429, 503):
        return "the server is overloaded or rate-limiting us; nothing to do but wait"
    if status >= 500:
        return "check the database's log"
    return "check the server's message above"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error is not None:
        return exc.os_error.strerror or str(exc.os_error)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def create(name: str, config: InfluxSinkConfig, where: Where) -> InfluxSink:
    """The registry's factory (gateway/sinks/__init__.py)."""
    return InfluxSink(name, config, where.gateway_id, where.site)
