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
from support import STOP, until

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
            await asyncio.wait_for(task, STOP)
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
            await until(lambda: servers[0].stats.count(function=3) >= 3, what="3 polls by the gateway process")
            (cfg / "devices" / "tank-a.yaml").write_text("id: tank-a\nprotocol: modbus_tcp\nprofile: nope\n")
            proc.send_signal(signal.SIGHUP)
            before = servers[0].stats.count(function=3)
            await until(lambda: servers[0].stats.count(function=3) >= before + 5, what="5 more polls: still polling")
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.to_thread(proc.communicate, timeout=STOP)
    assert proc.returncode == 0, out
    assert "tank-a.yaml:1:1: required key 'host' is missing" in out and "configuration NOT reloaded: " in out, out


# --------------------------------------------------------------------------- in-place reload (issue 5)
TWO = {0: [("tank-a", 1)], 1: [("tank-b", 1)]}


def _device_yaml(cfg: Path, dev: str, **changes: object) -> None:
    path = cfg / "devices" / f"{dev}.yaml"
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _gaps(values: list[int]) -> int:
    """Counter values missing between the first and the last one."""
    return len(set(range(min(values), max(values) + 1)) - set(values))


def _poller_of(gw, dev: str):
    return next(p for p in gw.pollers if dev in p.status)


async def test_reload_restarts_only_the_changed_poller_and_a_full_restart_loses_nothing(
        tmp_path: Path, close_default_executor, caplog) -> None:
    caplog.set_level(logging.INFO)
    servers = counter_servers(TWO)
    async with contextlib.AsyncExitStack() as stack:
        for s in servers:
            await stack.enter_async_context(s)
        cfg = _write(tmp_path / "cfg", device_ports(TWO, servers), ["tank-a", "tank-b"], None)
        seen: dict[str, list[int]] = {}
        gateways: list = []

        def observe(r) -> None:
            seen.setdefault(r.device, []).append(r.fields["count"])

        stop, reload = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(load_config(cfg), lambda: load_config(cfg), stop, reload,
                                         on_reading=observe, on_gateway=gateways.append), name="serve")
        try:
            await until(lambda: len(seen.get("tank-a", [])) >= 3 and len(seen.get("tank-b", [])) >= 3, what="polls")
            gw = gateways[0]
            a_poller, b_poller = _poller_of(gw, "tank-a"), _poller_of(gw, "tank-b")
            a_task, a_status = gw.poll_task(a_poller), a_poller.status["tank-a"]
            sink_free = gw.outbox

            # tank-b changes: only its poller is rebuilt, with the new settings.
            _device_yaml(cfg, "tank-b", interval="200ms")
            reload.set()
            await until(lambda: "configuration applied" in caplog.text, what="the reload")
            assert len(gateways) == 1 and gw.outbox is sink_free
            assert _poller_of(gw, "tank-a") is a_poller and gw.poll_task(a_poller) is a_task
            assert not a_task.done() and a_poller.status["tank-a"] is a_status
            new_b = _poller_of(gw, "tank-b")
            assert new_b is not b_poller and gw.poll_task(new_b) is not None
            assert next(d for d in gw.config.devices if d.id == "tank-b").config.interval == 0.2
            n = len(seen["tank-a"])
            await until(lambda: len(seen["tank-a"]) >= n + 3 and len(seen["tank-b"]) >= 6, what="polls after")
            a_values = seen["tank-a"]
            # No gap, no restart. A poll that failed (a timeout on a busy machine) was served but not
            # read: such gaps are allowed, as many as the poller counted errors.
            assert a_values == sorted(set(a_values)) and _gaps(a_values) <= sum(a_status.errors.values()), a_status

            # An invalid configuration changes nothing.
            caplog.clear()
            _device_yaml(cfg, "tank-a", profile="nope")
            reload.set()
            await until(lambda: "configuration NOT reloaded" in caplog.text, what="the refusal")
            assert _poller_of(gw, "tank-a") is a_poller and gw.poll_task(a_poller) is a_task
            assert _poller_of(gw, "tank-b") is new_b and len(gateways) == 1
            _device_yaml(cfg, "tank-a", profile="counter")

            # An identity change restarts everything on the same outbox.
            data = yaml.safe_load((cfg / "gateway.yaml").read_text())
            data["gateway"]["site"] = "lab2"
            (cfg / "gateway.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
            reload.set()
            await until(lambda: len(gateways) == 2 and gateways[1].ready.is_set(), what="the full restart")
            a_status2 = _poller_of(gateways[1], "tank-a").status["tank-a"]
            assert "restarting the whole gateway (gateway settings changed: gateway)" in caplog.text
            n = len(seen["tank-a"])
            await until(lambda: len(seen["tank-a"]) >= n + 3, what="polls after the restart")
        finally:
            stop.set()
            await asyncio.wait_for(task, STOP)
    # No sink: nothing leaves the outbox, so every reading observed must be stored in it.
    assert gateways[1].final_stats.rows == sum(len(v) for v in seen.values())
    a_values = sorted(set(seen["tank-a"]))
    # A gap is a value the simulator served that no reading holds: a poll that failed (counted), or
    # the one transaction the full restart cancelled in flight (the request was served, its reply
    # never read: no reading existed to lose). Every reading observed is stored (asserted above).
    failed = sum(a_status.errors.values()) + sum(a_status2.errors.values())
    assert _gaps(a_values) <= failed + 1, (a_values, a_status, a_status2)


async def test_reload_adds_a_sink_from_the_oldest_row_and_a_removed_sink_lets_rows_go(
        tmp_path: Path, mosquitto, close_default_executor, caplog) -> None:
    caplog.set_level(logging.INFO)
    layout = {0: [("tank-a", 1)]}
    servers = counter_servers(layout)
    async with contextlib.AsyncExitStack() as stack:
        for s in servers:
            await stack.enter_async_context(s)
        cfg = _write(tmp_path / "cfg", device_ports(layout, servers), ["tank-a"], mosquitto.port)
        data = yaml.safe_load((cfg / "gateway.yaml").read_text())
        live = data["sinks"]["broker"]
        data["sinks"]["dead"] = {**live, "port": free_port()}  # nothing listens: it holds every row back
        (cfg / "gateway.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        late = await stack.enter_async_context(subscriber(mosquitto.host, mosquitto.port, "late/#"))
        seen: list[int] = []
        gateways: list = []
        stop, reload = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(load_config(cfg), lambda: load_config(cfg), stop, reload,
                                         on_reading=lambda r: seen.append(r.fields["count"]),
                                         on_gateway=gateways.append), name="serve")
        try:
            await until(lambda: gateways and gateways[0].outbox is not None and gateways[0].ready.is_set()
                         and gateways[0].outbox.stats().rows >= 8, what="rows held back by the dead sink")
            gw = gateways[0]
            broker_sink, broker_fwd = gw.sinks["broker"], next(f for f in gw.forwarders if f.name == "broker")
            before = list(seen)
            del data["sinks"]["dead"]
            data["sinks"]["late"] = {**live, "topic": "late/{site}/{gateway}/{device}",
                                     "status_topic": "late/{site}/{gateway}/status"}
            (cfg / "gateway.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
            reload.set()
            await until(lambda: "configuration applied" in caplog.text, what="the reload")
            assert len(gateways) == 1
            assert gw.sinks["broker"] is broker_sink and broker_fwd in gw.forwarders  # kept its connection
            assert set(gw.outbox.stats().pending) == {"broker", "late"}

            def late_values() -> list[int]:
                return counts_by_device([m.payload for m in late.messages
                                         if not m.topic.endswith("/status")]).get("tank-a", [])

            await late.wait_until(lambda _m: set(before) <= set(late_values()))  # everything buffered
            await until(lambda: gw.outbox.stats().rows < 8, what="rows let go once the dead sink is gone")
        finally:
            stop.set()
            await asyncio.wait_for(task, STOP)
