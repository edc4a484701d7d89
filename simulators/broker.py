"""A private Mosquitto broker on a free loopback port, for the demo, the tests and the benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of a mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    require_certificate: bool = False


class Mosquitto:
    """A real Mosquitto on 127.0.0.1:<port> with persistence in its own directory.

    Persistence is on so a stopped and restarted broker keeps its sessions, as a production
    broker would; ``max_queued_messages`` is raised so long outages are not cut at Mosquitto's
    default of 1000 messages per offline client; ``set_tcp_nodelay`` is on, as README recommends for
    production brokers. ``stop()`` (SIGTERM: the broker saves its
    persistence file) and ``start()`` again on the same port simulate an outage; ``kill()`` is
    SIGKILL (Mosquitto then loses what it queued since its last save). ``async with`` starts and
    stops it without blocking the event loop.
    """

    def __init__(self, directory: Path, *, binary: str | None = None, port: int | None = None,
                 tls: TlsFiles | None = None, extra_conf: str = "", tcp_nodelay: bool = True) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise FileNotFoundError("mosquitto is not installed — sudo apt-get install mosquitto")
        self.binary = found
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.directory = Path(directory)
        self.tls = tls
        self.conf = self.directory / "mosquitto.conf"
        self.log = self.directory / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # Run as whoever runs us: as root mosquitto would switch to the `mosquitto` user and
            # could not write its persistence file or read keys in a private directory.
            f"user {getpass.getuser()}",
            "persistence true",
            f"persistence_location {self.directory}/",
            "autosave_interval 1",
            "max_queued_messages 1000000",
            "max_inflight_messages 100",
            "max_keepalive 3600",
            # Without it each PUBACK after the first of a batch waits for the client's delayed ACK
            # (~40 ms a batch): a 24 h backlog drained 3x slower (bench/backlog.py --broker-nagle).
            f"set_tcp_nodelay {'true' if tcp_nodelay else 'false'}",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
        ]
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
            if tls.require_certificate:
                lines += ["require_certificate true"]
        self.conf.write_text("\n".join(lines) + "\n" + extra_conf, encoding="utf-8")

    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"mosquitto exited at start: {err}\n{self.log_text()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 0.2):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout} s")
            time.sleep(0.02)

    def _end(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    terminate = stop

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def __aenter__(self) -> Mosquitto:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)
