"""Fixtures that start real servers (Mosquitto, ...) on free loopback ports, and helpers to talk to
them: a collecting MQTT subscriber and a TCP proxy that can cut connections without a goodbye."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest
import pytest_asyncio

from simulators.broker import Mosquitto, TlsFiles, free_port

__all__ = ["Mosquitto", "TcpProxy", "TlsFiles", "free_port", "make_ca", "subscriber"]

MOSQUITTO = "/usr/sbin/mosquitto"


def _need(binary: str, package: str) -> str:
    path = binary if os.path.exists(binary) else shutil.which(Path(binary).name)
    if path is None:
        message = f"{binary} is not installed — sudo apt-get install {package}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running Mosquitto (plain MQTT on loopback), stopped and reaped at teardown."""
    broker = Mosquitto(tmp_path / "mosquitto", binary=_need(MOSQUITTO, "mosquitto"))
    try:
        broker.start()
        yield broker
    finally:
        broker.terminate()


def make_ca(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A throw-away CA and a server certificate for ``host`` (IP or DNS name) via the openssl CLI."""
    openssl = _need("/usr/bin/openssl", "openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = directory / "ext.cnf"
    san = f"IP:{host}" if host.replace(".", "").isdigit() else f"DNS:{host}"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=Sluice test CA")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={host}")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return TlsFiles(ca, cert, key)


@pytest.fixture
def mosquitto_tls(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running Mosquitto with a TLS listener; its CA is ``broker.tls.ca``."""
    binary = _need(MOSQUITTO, "mosquitto")
    tls = make_ca(tmp_path / "pki")
    broker = Mosquitto(tmp_path / "mosquitto", binary=binary, tls=tls)
    try:
        broker.start()
        yield broker
    finally:
        broker.terminate()


@pytest_asyncio.fixture
async def close_default_executor() -> AsyncIterator[None]:
    """Shut the event loop's default executor down at the end of the test.

    aiomqtt connects in ``loop.run_in_executor(None, ...)``; that thread belongs to the loop and is
    reaped when the loop closes, but conftest's thread check runs before pytest-asyncio closes the
    loop. Tests using aiomqtt request this fixture (it is torn down before the check)."""
    yield
    await asyncio.get_running_loop().shutdown_default_executor()


# --------------------------------------------------------------------------- subscriber
@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class Collector:
    """Messages received so far, in arrival order; :meth:`wait_until` polls a condition."""

    messages: list[Received] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on(self, topic: str) -> list[Received]:
        return [m for m in self.messages if m.topic == topic]

    async def wait_until(self, condition: Callable[[list[Received]], bool], timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not condition(self.messages):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"condition not met within {timeout} s; got {len(self.messages)} messages: "
                                     f"{[(m.topic, m.payload[:60], m.retain) for m in self.messages[-5:]]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))


@contextlib.asynccontextmanager
async def subscriber(host: str, port: int, topic_filter: str, *, client_id: str | None = None,
                     tls_ca: Path | None = None) -> AsyncIterator[Collector]:
    """Subscribe (QoS 1) and collect messages in the background until the block ends.

    With ``client_id`` the session is persistent and the subscriber reconnects by itself, so
    messages published while the broker was down or restarting are queued for it and arrive.
    """
    collector = Collector()
    subscribed = asyncio.Event()

    async def run() -> None:
        while True:
            tls = None
            if tls_ca is not None:
                import ssl
                tls = ssl.create_default_context(cafile=str(tls_ca))
            try:
                async with aiomqtt.Client(host, port, identifier=client_id, clean_session=client_id is None,
                                          tls_context=tls, keepalive=10) as client:
                    await client.subscribe(topic_filter, qos=1)
                    subscribed.set()
                    async for message in client.messages:
                        collector.messages.append(Received(str(message.topic), bytes(message.payload),  # type: ignore[arg-type]
                                                           bool(message.retain)))
                        collector._changed.set()
            except aiomqtt.MqttError:
                if client_id is None and not subscribed.is_set():
                    raise
                await asyncio.sleep(0.1)

    task = asyncio.create_task(run(), name=f"subscriber[{topic_filter}]")
    try:
        waiter = asyncio.ensure_future(subscribed.wait())
        await asyncio.wait((waiter, task), timeout=10.0, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()
        if not subscribed.is_set():
            raise RuntimeError(f"could not subscribe to {topic_filter} on {host}:{port}")
        yield collector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task


# --------------------------------------------------------------------------- TCP proxy
class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target. ``cut()`` closes every connection abruptly (no MQTT
    DISCONNECT reaches the broker: it publishes the will), as a pulled cable or a crash would."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        for coro in (pipe(reader, up_writer), pipe(up_reader, writer)):
            task = asyncio.create_task(coro, name="proxy-pipe")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def cut(self) -> None:
        for w in self._writers:
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    # linger 0: close with RST, no FIN handshake, like a crashed peer
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            w.transport.abort()
        self._writers.clear()
