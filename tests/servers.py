"""Fixtures that start real servers (Mosquitto, ...) on free loopback ports, and helpers to talk to
them: a collecting MQTT subscriber and a TCP proxy that can cut connections without a goodbye."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest
import pytest_asyncio
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from simulators.broker import Mosquitto, TlsFiles, free_port
from support import DEADLINE, STOP, unavailable
import time
import urllib.error
import urllib.request
import json
import urllib.parse
import ssl

__all__ = ["Mosquitto", "TcpProxy", "TlsFiles", "free_port", "make_ca", "make_client_cert", "pymodbus_server", "sluice_process",
           "subscriber"]

MOSQUITTO = "/usr/sbin/mosquitto"


def _need(binary: str, package: str) -> str:
    path = binary if os.path.exists(binary) else shutil.which(Path(binary).name)
    if path is None:
        unavailable(f"{binary} is not installed — sudo apt-get install {package}")
    return path


@contextlib.contextmanager
def sluice_process(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``python -m gateway.cli ARGS`` (a simulator, say) with text pipes, run from the repository;
    on leaving it is terminated, must exit 0 (else its stderr is shown), and its pipes are closed."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        yield proc
    finally:
        proc.terminate()
        assert proc.wait(timeout=STOP) == 0, proc.stderr.read() if proc.stderr else ""
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


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


def make_client_cert(directory: Path, name: str = "sluice-client") -> tuple[Path, Path]:
    """A client certificate and key signed by the CA that :func:`make_ca` made in ``directory``."""
    openssl = _need("/usr/bin/openssl", "openssl")
    key, csr, cert = (directory / f"{name}{ext}" for ext in (".key", ".csr", ".pem"))
    ext = directory / f"{name}.cnf"
    ext.write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    for args in (["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}"],
                 ["x509", "-req", "-in", str(csr), "-CA", str(directory / "ca.pem"), "-CAkey", str(directory / "ca.key"),
                  "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)]):
        subprocess.run([openssl, *args], check=True, capture_output=True)
    key.chmod(0o600)
    return cert, key


@pytest.fixture
def mosquitto_mtls(tmp_path: Path) -> Iterator[Mosquitto]:
    """Mosquitto with a TLS listener that requires a client certificate from its CA
    (``broker.tls.ca``); :func:`make_client_cert` on ``broker.tls.ca.parent`` issues one."""
    binary = _need(MOSQUITTO, "mosquitto")
    tls = make_ca(tmp_path / "pki")
    tls.require_certificate = True
    broker = Mosquitto(tmp_path / "mosquitto", binary=binary, tls=tls)
    try:
        broker.start()
        yield broker
    finally:
        broker.terminate()


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

    The MQTT layer (and aiomqtt) connect in ``loop.run_in_executor(None, ...)``; that thread belongs to the loop and is
    reaped when the loop closes, but conftest's thread check runs before pytest-asyncio closes the
    loop. Tests using MQTT request this fixture (it is torn down before the check)."""
    yield
    await asyncio.get_running_loop().shutdown_default_executor()


@contextlib.asynccontextmanager
async def pymodbus_server(unit: int, *, coils: list[bool], discrete: list[bool], holding: dict[int, list[int]],
                          inputs: dict[int, list[int]]) -> AsyncIterator[int]:
    """pymodbus's own TCP server (an implementation independent of ours) on a free loopback port,
    serving one unit: bits from address 0, register blocks {start address: words}; yields the port.
    Every kind needs at least one bit or block (pymodbus refuses an empty one)."""
    def blocks(image: dict[int, list[int]]) -> list[SimData]:
        return [SimData(address, values=words, datatype=DataType.REGISTERS) for address, words in image.items()]

    device = SimDevice(id=unit, simdata=(
        [SimData(0, values=coils, datatype=DataType.BITS)],
        [SimData(0, values=discrete, datatype=DataType.BITS)],
        blocks(holding),
        blocks(inputs),
    ))
    server = ModbusTcpServer(device, address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    try:
        yield server.transport.sockets[0].getsockname()[1]
    finally:
        await server.shutdown()


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

    def add(self, message: Received) -> None:
        """Record one arrival and wake :meth:`wait_until`."""
        self.messages.append(message)
        self._changed.set()

    async def wait_until(self, condition: Callable[[list[Received]], bool], timeout: float = DEADLINE) -> None:
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
                tls = ssl.create_default_context(cafile=str(tls_ca))
            try:
                async with aiomqtt.Client(host, port, identifier=client_id, clean_session=client_id is None,
                                          tls_context=tls, keepalive=10) as client:
                    await client.subscribe(topic_filter, qos=1)
                    subscribed.set()
                    async for message in client.messages:
                        collector.add(Received(str(message.topic), bytes(message.payload),  # type: ignore[arg-type]
                                               bool(message.retain)))
            except aiomqtt.MqttError:
                if client_id is None and not subscribed.is_set():
                    raise
                await asyncio.sleep(0.1)

    task = asyncio.create_task(run(), name=f"subscriber[{topic_filter}]")
    try:
        waiter = asyncio.ensure_future(subscribed.wait())
        await asyncio.wait((waiter, task), timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
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


# --------------------------------------------------------------------------- InfluxDB 1.x and VictoriaMetrics
INFLUXD = "/usr/bin/influxd"
VICTORIA_METRICS = "/usr/bin/victoria-metrics"


class _HttpServer:
    """A server process on a free loopback port with its data in ``directory``; ``stop()`` is graceful
    (SIGTERM, then SIGKILL after 15 s) and ``start()`` again keeps the data and the port."""

    ready_path = "/ping"
    name = "server"

    def __init__(self, directory: Path, binary: str) -> None:
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.log = self.directory / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = DEADLINE) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=1.0) as response:
                    if response.status < 300:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} did not come up on {self.url}; log:\n{tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            if proc is not None:
                proc.wait()
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def request(self, path: str, data: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
        """A blocking HTTP request (GET, or POST with ``data``) to the server: (status, body)."""

        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, data=data), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


class Influxd(_HttpServer):
    """Debian's influxd 1.x: HTTP and RPC on free loopback ports, meta/data/wal in ``directory``,
    reporting, monitoring and the other background services off."""

    name = "influxd"

    def __init__(self, directory: Path, binary: str = INFLUXD) -> None:
        super().__init__(directory, binary)
        self.rpc_port = free_port()
        self.conf = self.directory / "influxdb.conf"
        d = self.directory
        self.conf.write_text(f"""reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{d}/meta"
  logging-enabled = false
[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[subscriber]
  enabled = false
[continuous_queries]
  enabled = false
[retention]
  enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
  pprof-enabled = false
[logging]
  level = "warn"
  suppress-logo = true
""")

    def command(self) -> list[str]:
        return [self.binary, "-config", str(self.conf)]

    def query(self, q: str, db: str | None = None) -> list[dict[str, object]]:
        """InfluxQL (epoch=ns); the ``series`` of the first statement's result ([] if none)."""

        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        status, body = self.request("/query?" + urllib.parse.urlencode(params), data=b"" if q.split()[0].upper()
                                    in ("CREATE", "DROP") else None)
        result = json.loads(body)
        if status != 200 or "error" in result.get("results", [{}])[0]:
            raise RuntimeError(f"InfluxQL {q!r} failed: {status} {body[:300]!r}")
        return result["results"][0].get("series", [])

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')


@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[Influxd]:
    """A running influxd 1.x (v1 API: /write, /query; no /api/v2/write) with database ``sluice``."""
    server = Influxd(tmp_path / "influxd", _need(INFLUXD, "influxdb"))
    try:
        server.start()
        server.create_database("sluice")
        yield server
    finally:
        server.stop()


class VictoriaMetrics(_HttpServer):
    """VictoriaMetrics single-node: InfluxDB line protocol on /write and /api/v2/write, read back with
    /api/v1/export. It acknowledges before storing: always ``stop()`` it (SIGTERM flushes), never kill."""

    name = "victoria-metrics"
    ready_path = "/health"

    def __init__(self, directory: Path, binary: str = VICTORIA_METRICS) -> None:
        super().__init__(directory, binary)

    def command(self) -> list[str]:
        return [self.binary, f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={self.directory}/data",
                "-loggerLevel=ERROR", "-retentionPeriod=100y"]

    def export(self, match: str = '{__name__=~".+"}') -> list[dict[str, object]]:
        """Every series matching ``match`` after a flush: [{"metric": {...}, "values": [...], "timestamps": [...]}]."""

        self.request("/internal/force_flush")
        _status, body = self.request("/api/v1/export?" + urllib.parse.urlencode({"match[]": match}))
        return [json.loads(line) for line in body.splitlines() if line.strip()]


@pytest.fixture
def victoria_metrics(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    """A running VictoriaMetrics on a free loopback port, stopped gracefully at teardown."""
    server = VictoriaMetrics(tmp_path / "vm", _need(VICTORIA_METRICS, "victoria-metrics"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
