"""Reload (SIGHUP): a broken configuration keeps the running one; a valid one is applied with
nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from e2e_support import counter_servers, counts_by_device, device_ports, write_config
from gateway.app import serve
from gateway.config import load_config
from servers import free_port, subscriber

LAYOUT = {0: [("tank-a", 1), ("tank-b", 2)]}
TOPIC = "sluice/lab/gw-test/#"


def _write(cfg_dir: Path, ports: dict, devices: list[str], broker_port: int | None) -> Path:
    cfg = write_config(cfg_dir, devices={d: ports[d] for d in devices}, broker_port=broker_port)
    for extra in set(ports) - set(devices):
        (cfg / "devices" / f"{extra}.yaml").unlink(missing_ok=True)
    data = yaml.safe_load((cfg / "gateway.yaml").read_text())
    data["health"] = {"listen": f"127.0.0.1:{free_port()}"}
    (cfg / "gateway.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg


async def test_reload_keeps_a_broken_config_out_and_applies_a_good_one_without_loss(
        tmp_path: Path, mosquitto, close_default_executor, caplog) -> None:
    caplog.set_level(logging.INFO)
    servers = counter_servers(LAYOUT)
    async with contextlib.AsyncExitStack() as stack:
        for s in servers:
            await stack.enter_async_context(s)
        ports = device_ports(LAYOUT, servers)
        cfg = _write(tmp_path / "cfg", ports, ["tank-a"], mosquitto.port)
        sub = await stack.enter_async_context(subscriber(mosquitto.host, mosquitto.port, TOPIC))

        def counts() -> dict[str, list[int]]:
            return counts_by_device([m.payload for m in sub.messages if not m.topic.endswith("/status")])

        stop, reload = asyncio.Event(), asyncio.Event()
        applied: list[object] = []
        task = asyncio.create_task(serve(load_config(cfg), lambda: load_config(cfg), stop, reload, applied.append),
                                   name="serve")
        try:
            await sub.wait_until(lambda _m: len(counts().get("tank-a", [])) >= 3)

            good = (cfg / "gateway.yaml").read_text()
            (cfg / "gateway.yaml").write_text(good.replace("buffer:", "bufer:"))
            reload.set()
            await sub.wait_until(lambda _m: "configuration NOT reloaded" in caplog.text)
            assert "unknown key 'bufer'" in caplog.text and not applied
            seen = len(counts()["tank-a"])
            await sub.wait_until(lambda _m: len(counts()["tank-a"]) >= seen + 3)  # still running the old one

            (cfg / "gateway.yaml").write_text(good)
            reload.set()
            await sub.wait_until(lambda _m: "configuration unchanged" in caplog.text)

            _write(tmp_path / "cfg", ports, ["tank-a", "tank-b"], mosquitto.port)
            (cfg / "gateway.yaml").write_text(good)  # same health port as before
            reload.set()
            await sub.wait_until(lambda _m: len(counts().get("tank-b", [])) >= 3)
            assert "devices added: tank-b" in caplog.text and len(applied) == 1
            assert not task.done()
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    # Every value tank-a produced across both runs arrived (duplicates are allowed, gaps are not).
    values = sorted(set(counts()["tank-a"]))
    assert values == list(range(values[0], values[-1] + 1))
    served = servers[0].stats.count(function=3)
    assert served > 0


async def test_sighup_with_a_broken_config_keeps_the_process_running(tmp_path: Path, close_default_executor) -> None:
    servers = counter_servers({0: [("tank-a", 1)]})
    async with contextlib.AsyncExitStack() as stack:
        for s in servers:
            await stack.enter_async_context(s)
        ports = device_ports({0: [("tank-a", 1)]}, servers)
        cfg = _write(tmp_path / "cfg", ports, ["tank-a"], None)
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for _ in range(600):
                if servers[0].stats.count(function=3) >= 3:
                    break
                await asyncio.sleep(0.05)
            (cfg / "devices" / "tank-a.yaml").write_text("id: tank-a\nprotocol: modbus_tcp\nprofile: nope\n")
            proc.send_signal(signal.SIGHUP)
            before = servers[0].stats.count(function=3)
            for _ in range(600):
                if servers[0].stats.count(function=3) >= before + 5:
                    break
                await asyncio.sleep(0.05)
            assert servers[0].stats.count(function=3) >= before + 5  # still polling
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, out
    assert "tank-a.yaml:1:1: required key 'host' is missing" in out and "configuration NOT reloaded: " in out, out
