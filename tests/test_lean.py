"""`sluice run` imports what its configuration uses (issue 13, memory): with bench/spine.py's
configuration — one MQTT sink, Modbus TCP devices, the health endpoint — no other sink, driver,
the trace feed, the cloud side or the libraries only they need are imported. A behaviour, not a
figure: bench/spine.py measures the memory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from simulators.broker import free_port

# The module dumps sys.modules at exit; the gateway runs exactly as `python -m gateway.cli run`.
RUN = """
import atexit, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
sys.argv[0] = "sluice"
runpy.run_module("gateway.cli", run_name="__main__", alter_sys=True)
"""

NOT_FOR_THIS_CONFIG = [
    "aiohttp", "influxdb_client", "cryptography", "jsonschema", "pymodbus",  # libraries of other features
    "gateway.sinks.influx", "gateway.sinks.epcis", "gateway.sinks.trace_mqtt", "gateway.sinks.jsonl",
    "gateway.trace", "gateway.cloud", "gateway.cli.commission", "gateway.cli.demo",
    "drivers.modbus.rtu", "drivers.modbus.rtu_client", "drivers.modbus.dtu", "drivers.modbus.dtu_link",
    "drivers.modbus.rtu_tcp", "drivers.serial",
]


def write_config(root: Path) -> Path:
    cfg = root / "config"
    (cfg / "profiles").mkdir(parents=True)
    (cfg / "devices").mkdir()
    (cfg / "profiles" / "bench.yaml").write_text(yaml.safe_dump({"protocol": "modbus", "measurement": "bench", "points": [
        {"name": f"p{i}", "kind": "holding", "address": 2 * i, "type": "float32"} for i in range(10)]}))
    port = free_port()  # nothing listens: the poller retries, which is all this test needs
    for u in range(3):
        (cfg / "devices" / f"u{u}.yaml").write_text(yaml.safe_dump({
            "id": f"u{u}", "protocol": "modbus_tcp", "profile": "bench", "host": "127.0.0.1", "port": port,
            "unit_id": u + 1, "interval": "1s", "timeout": "1s", "retries": 0}))
    (cfg / "gateway.yaml").write_text(yaml.safe_dump({
        "gateway": {"id": "lean", "site": "lab"},
        "buffer": {"path": str(root / "outbox.db")},
        "sinks": {"broker": {"type": "mqtt", "host": "127.0.0.1", "port": free_port(), "qos": 1}},
        "health": {"listen": f"127.0.0.1:{free_port()}"},
        "logging": {"level": "warning", "format": "text"}}))
    return cfg


def test_sluice_run_imports_only_what_the_configuration_uses(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    env.pop("WATCHDOG_USEC", None)
    dump = tmp_path / "modules.txt"
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(dump), "run", "-c", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        ready = False
        while not ready and time.monotonic() < deadline:
            try:
                ready = "READY=1" in notify.recv(4096).decode()
            except TimeoutError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert ready, "the gateway did not report READY=1 within 30 s"
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        notify.close()
    assert proc.returncode == 0, err.decode()
    modules = set(dump.read_text().split())
    assert {"gateway.app", "gateway.sinks.mqtt", "drivers.modbus.tcp", "gateway.health"} <= modules  # it did run
    loaded = sorted(m for m in modules for name in NOT_FOR_THIS_CONFIG if m == name or m.startswith(name + "."))
    assert loaded == []
