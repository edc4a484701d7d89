"""`sluice ingest run` under systemd's notify protocol: READY once started, watchdog pings while
it makes progress (a fake NOTIFY_SOCKET stands in for systemd)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

def test_ready_then_watchdog_pings_with_broker_and_database_down(tmp_path: Path) -> None:
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text(yaml.safe_dump({
        "mqtt": {"host": "127.0.0.1", "port": 1, "reconnect_min": "100ms", "reconnect_max": "200ms"},
        "influxdb": {"url": "http://127.0.0.1:1", "api": "v1", "database": "x"},
        "logging": {"level": "warning", "format": "text"}}))
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "ingest", "run", "-c", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 3:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
        sock.close()
    assert messages and messages[0].startswith("READY=1"), messages
    assert "STATUS=ingesting sluice/+/+/+ into http://127.0.0.1:1" in messages[0]
    assert sum("WATCHDOG=1" in m for m in messages) >= 3, messages
    assert proc.returncode == 0, err.decode()
