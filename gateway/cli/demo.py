"""`sluice demo`: simulated devices -> gateway -> outbox -> private Mosquitto, live in the terminal.

Everything runs on loopback and in a temporary directory: the shipped example configuration
(config/, or ``-c DIR``) is copied with free ports (devices, broker, health endpoint), the
simulator serves its devices, a private broker is started if a `mosquitto` binary exists, and a
subscriber shows what the broker received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import yaml

from gateway.app import Gateway
from gateway.config import Config, load_config
from gateway.cli.examples import shipped_config
from gateway.logs import setup_logging
from gateway.mqtt import watch
from gateway.reading import Reading
from simulators.broker import Mosquitto, find_mosquitto
from simulators.simulation import load_simulation

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_demo_config(source: Path, target: Path, broker_port: int | None) -> Path:
    """Copy ``source`` (a gateway config dir) to ``target`` with free device ports, the outbox in
    ``target`` and the MQTT sink pointed at ``broker_port`` (no sink when None)."""
    target.mkdir(parents=True, exist_ok=True)
    gw = yaml.safe_load((source / "gateway.yaml").read_text(encoding="utf-8"))
    gw["buffer"] = {**gw.get("buffer", {}), "path": str(target / "outbox.db")}
    gw["profiles_dir"] = str((source / gw.get("profiles_dir", "profiles")).resolve())
    source_devices = source / gw.get("devices_dir", "devices")
    gw["devices_dir"] = "devices"
    if broker_port is None:
        gw["sinks"] = {}
    else:
        gw["sinks"] = {"demo-broker": {"type": "mqtt", "host": "127.0.0.1", "port": broker_port,
                                       "batch": {"linger": "200ms"}}}
    gw["logging"] = {"level": "warning", "format": "text"}
    # A free port: the default 9108 may be a running gateway's (or another demo's).
    gw["health"] = {**gw.get("health", {}), "listen": f"127.0.0.1:{free_port()}"}
    (target / "gateway.yaml").write_text(yaml.safe_dump(gw, sort_keys=False), encoding="utf-8")
    devices = target / "devices"
    devices.mkdir()
    ports: dict[int, int] = {}
    for file in sorted(source_devices.glob("*.yaml")):
        dev = yaml.safe_load(file.read_text(encoding="utf-8"))
        if "port" in dev:
            dev["port"] = ports.setdefault(dev["port"], free_port())
        dev["host"] = "127.0.0.1"
        (devices / file.name).write_text(yaml.safe_dump(dev, sort_keys=False), encoding="utf-8")
    return target


class Display:
    """Plain-text live view: latest reading per device, commit and delivery counters."""

    def __init__(self, config: Config, broker: str | None, stream: TextIO = sys.stdout) -> None:
        self.config = config
        self.broker = broker
        self.stream = stream
        self.latest: dict[str, Reading] = {}
        self.reads: dict[str, int] = {}
        self.received_messages = 0
        self.received_lines = 0
        self.last_topic = ""
        self.last_line = ""
        self.status = "-"
        self.tty = stream.isatty()

    def on_reading(self, reading: Reading) -> None:
        self.latest[reading.device] = reading
        self.reads[reading.device] = self.reads.get(reading.device, 0) + 1

    def on_message(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/status"):
            self.status = payload.decode(errors="replace")
            return
        self.received_messages += 1
        lines = payload.splitlines()
        self.received_lines += len(lines)
        self.last_topic = topic
        if lines:
            self.last_line = lines[-1].decode(errors="replace")

    def render(self, gateway: Gateway) -> str:
        out = []
        units = {}
        for dev in self.config.devices:
            for p in getattr(dev.profile, "points", []):
                units[(dev.id, p.name)] = p.unit or ""
        for dev in self.config.devices:
            r = self.latest.get(dev.id)
            if r is None:
                out.append(f"  {dev.id:<16} (waiting for the first answer)")
                continue
            shown = []
            for name, value in list(r.fields.items())[:4]:
                text = f"{value:.2f}" if isinstance(value, float) else str(value)
                shown.append(f"{name}={text}{units.get((dev.id, name), '')}")
            extra = f" +{len(r.fields) - 4} more" if len(r.fields) > 4 else ""
            out.append(f"  {dev.id:<16} #{self.reads[dev.id]:<4} {'  '.join(shown)}{extra}")
        committer = gateway.committer
        stats = gateway.outbox_stats()
        if committer and stats:
            out.append(f"  outbox: {committer.stats.committed} readings committed in "
                       f"{committer.stats.commits} transactions, {stats.rows} waiting, {stats.dropped} dropped")
        for fwd in gateway.forwarders:
            s = fwd.stats
            out.append(f"  sink {fwd.name}: {s.delivered} readings delivered in {s.messages} MQTT messages"
                       f" ({s.bytes} bytes), {s.retries} retries")
        if self.broker:
            out.append(f"  broker {self.broker}: gateway status '{self.status}'; a subscriber received "
                       f"{self.received_lines} readings in {self.received_messages} messages")
            if self.last_line:
                width = shutil.get_terminal_size((120, 24)).columns - 6
                line = self.last_line if len(self.last_line) <= width else self.last_line[: width - 1] + "…"
                out.append(f"  last on {self.last_topic}:\n    {line}")
        return "\n".join(out)


async def _subscribe(port: int, topic: str, display: Display) -> None:
    async for message_topic, payload in watch("127.0.0.1", port, topic):
        display.on_message(message_topic, payload)


async def demo(duration: float | None, source: Path) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    timer = loop.call_later(duration, stop.set) if duration else None
    try:
        return await _demo(stop, source)
    finally:
        if timer is not None:
            timer.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _demo(stop: asyncio.Event, source: Path) -> int:
    print("Sluice demo: simulated Modbus TCP devices -> gateway -> SQLite outbox -> MQTT")
    mosquitto = find_mosquitto()
    with tempfile.TemporaryDirectory(prefix="sluice-demo-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            broker_port = None
            if mosquitto is None:
                print("  No `mosquitto` binary found, so readings stay in the outbox and nothing is forwarded.\n"
                      "  To see the MQTT part too: sudo apt-get install mosquitto   (then run the demo again)")
            else:
                broker = await stack.enter_async_context(Mosquitto(Path(tmp) / "broker", binary=mosquitto))
                broker_port = broker.port
                print(f"  private Mosquitto broker on 127.0.0.1:{broker_port}")
            config_dir = write_demo_config(source, Path(tmp) / "config", broker_port)
            config = load_config(config_dir)
            for server in load_simulation(config_dir):
                await stack.enter_async_context(server)
                print(f"  simulator: {server.describe()}")
            print(f"  outbox: {config.gateway.buffer.path}")
            print("  Ctrl-C stops; nothing read is lost (it stays in the outbox).\n")
            display = Display(config, f"127.0.0.1:{broker_port}" if broker_port else None)
            gateway = Gateway(config, on_reading=display.on_reading)
            tasks = [asyncio.create_task(gateway.run(stop), name="gateway")]
            if broker_port:
                tasks.append(asyncio.create_task(
                    _subscribe(broker_port, f"sluice/{config.site}/{config.gateway_id}/#", display),
                    name="demo-subscriber"))
            started = time.monotonic()
            lines = 0
            try:
                while not stop.is_set() and not tasks[0].done():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await stop.wait()
                    text = f"[{time.monotonic() - started:5.1f}s]\n" + display.render(gateway)
                    if display.tty and lines:
                        sys.stdout.write(f"\x1b[{lines}A\x1b[J")
                    sys.stdout.write(text + "\n")
                    sys.stdout.flush()
                    lines = text.count("\n") + 1
            finally:
                stop.set()
                await tasks[0]
                for task in tasks[1:]:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            print("\n" + display.render(gateway))
    print("demo stopped.")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    source = args.config or shipped_config()
    if not (source / "gateway.yaml").exists():
        print(f"sluice demo: no gateway.yaml in {source} — give a configuration directory with -c "
              "(`sluice init DIR` writes one)", file=sys.stderr)
        return 2
    return asyncio.run(demo(args.duration, source))
