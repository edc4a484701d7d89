"""Building blocks for end-to-end tests: a counter profile, a gateway config on disk, payload parsing."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import yaml
from simulators.broker import free_port
from drivers.modbus.profile import ProfileModel
from simulators.modbus_device import SimDevice
from simulators.modbus_tcp import ModbusTcpServer

COUNTER_PROFILE = """\
protocol: modbus
measurement: counters
points:
  - {name: count, kind: holding, address: 0, type: uint32, sim: {signal: counter, start: 1}}
  - {name: temp, kind: holding, address: 2, type: float32, byte_order: CDAB, unit: CEL,
     sim: {signal: sine, min: -5, max: 5, period: 10s}}
  - {name: level, kind: input, address: 10, type: int16, scale: 0.1, sim: {signal: ramp, min: 0, max: 100, step: 1}}
  - {name: door, kind: coil, address: 3, sim: {signal: step, values: [true, false], every: 1s}}
"""


def write_config(directory: Path, *, devices: dict[str, tuple[int, int]], broker_port: int | None,
                 interval: str = "100ms", timeout: str = "500ms", outbox: Path | None = None,
                 sink_extra: dict | None = None, buffer_extra: dict | None = None,
                 fmt: str = "influx", health_port: int | None = None) -> Path:
    """A gateway config dir: ``devices`` maps device id -> (port, unit id) on 127.0.0.1; the health
    endpoint on ``health_port`` (a free port if not given)."""
    (directory / "profiles").mkdir(parents=True, exist_ok=True)
    (directory / "devices").mkdir(exist_ok=True)
    (directory / "profiles" / "counter.yaml").write_text(COUNTER_PROFILE)
    gateway: dict = {
        "gateway": {"id": "gw-test", "site": "lab"},
        "buffer": {"path": str(outbox or directory / "outbox.db"), **(buffer_extra or {})},
        # Not the default 9108: another suite (or a helper's) may run a gateway at the same time.
        "health": {"listen": f"127.0.0.1:{health_port or free_port()}"},
        "sinks": {},
        "logging": {"level": "info", "format": "text"},
    }
    if broker_port is not None:
        gateway["sinks"]["broker"] = {"type": "mqtt", "host": "127.0.0.1", "port": broker_port,
                                      "format": fmt, "reconnect_min": "100ms", "reconnect_max": "1s",
                                      "batch": {"linger": "50ms"}, **(sink_extra or {})}
    (directory / "gateway.yaml").write_text(yaml.safe_dump(gateway, sort_keys=False))
    for dev_id, (port, unit) in devices.items():
        (directory / "devices" / f"{dev_id}.yaml").write_text(yaml.safe_dump({
            "id": dev_id, "protocol": "modbus_tcp", "profile": "counter", "host": "127.0.0.1",
            "port": port, "unit_id": unit, "interval": interval, "timeout": timeout, "retries": 0,
            "backoff_max": "1s"}, sort_keys=False))
    return directory


_LINE = re.compile(rb"^counters,(?P<tags>\S+) (?P<fields>\S+) (?P<ts>\d+)$")


def counts_by_device(payloads: list[bytes]) -> dict[str, list[int]]:
    """Counter values per device, in arrival order, from line-protocol payloads."""
    out: dict[str, list[int]] = defaultdict(list)
    for payload in payloads:
        for line in payload.splitlines():
            match = _LINE.match(line)
            assert match, f"unexpected line {line!r}"
            tags = dict(t.split(b"=", 1) for t in match.group("tags").split(b","))
            fields = dict(f.split(b"=", 1) for f in match.group("fields").split(b","))
            out[tags[b"device"].decode()].append(int(fields[b"count"].rstrip(b"i")))
    return dict(out)


def counter_servers(layout: dict[int, list[tuple[str, int]]]):
    """Simulator servers (not started): ``layout`` maps a server index to [(device id, unit id)]."""

    profile = ProfileModel.model_validate(yaml.safe_load(COUNTER_PROFILE))
    return [ModbusTcpServer([SimDevice(profile, unit, name=dev_id) for dev_id, unit in units])
            for units in layout.values()]


def device_ports(layout: dict[int, list[tuple[str, int]]], servers) -> dict[str, tuple[int, int]]:
    return {dev_id: (servers[i].port, unit) for i, units in layout.items() for dev_id, unit in units}
