"""A private Mosquitto broker on a free loopback port, for the demo, the tests and the benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of a mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """``async with Mosquitto(workdir) as broker:`` runs a broker on 127.0.0.1:``broker.port``.

    Persistence is on (in ``workdir``) so a stopped and restarted broker keeps its sessions, as a
    production broker would; ``max_queued_messages`` is raised so long outages are not cut by the
    broker's default of 1000 messages per offline client. ``stop``/``start`` restart it on the
    same port; ``kill`` is a SIGKILL (Mosquitto then loses what it had queued since its last save).
    """

    def __init__(self, workdir: Path, *, binary: str | None = None, port: int | None = None,
                 extra_conf: str = "") -> None:
        self.workdir = Path(workdir)
        self.binary = binary
        self.port = port or 0
        self.extra_conf = extra_conf
        self.host = "127.0.0.1"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def _write_conf(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 100\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            + self.extra_conf, encoding="utf-8")
        return conf

    def start_sync(self, timeout: float = 10.0) -> None:
        binary = self.binary or find_mosquitto()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed — sudo apt-get install mosquitto")
        if not self.port:
            self.port = _free_port()
        conf = self._write_conf()
        self._proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}: {err.strip()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout}s")

    def stop_sync(self) -> None:
        """Graceful stop (SIGTERM): Mosquitto saves its persistence file first."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close()

    def kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._close()

    def _close(self) -> None:
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None

    async def start(self) -> None:
        await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)

    async def __aenter__(self) -> Mosquitto:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
