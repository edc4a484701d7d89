"""SIGHUP reload of trace.yaml through the gateway's reload (gateway.app.serve): a broken file is
logged with its place and the old one keeps running; a valid change is applied on the same
journal (the chain continues, the open window keeps what it gathered); what cannot change while
running (the journal's path) is refused with its place."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest
from test_trace import REPO, TRACE_YAML, T0, M, S, Clock, _cold, _device

from gateway.app import serve
from gateway.config import load_config
from gateway.reading import Reading
from gateway.trace.config import load_trace_config
from gateway.trace.seal import load_public_key, verify_lines
from gateway.trace.service import TraceService, reloading
from servers import free_port
from support import STOP, until
import sys
import subprocess
import signal
import os
from servers import subscriber

pytestmark = pytest.mark.usefixtures("close_default_executor")


def _config_dir(tmp_path: Path) -> Path:
    cfg = tmp_path / "config"
    (cfg / "devices").mkdir(parents=True)
    shutil.copytree(REPO / "config" / "profiles", cfg / "profiles")
    (cfg / "gateway.yaml").write_text(f"gateway: {{id: gw-1, site: farm-1}}\nbuffer: {{path: {tmp_path / 'outbox.db'}}}\n"
                                      f"health: {{listen: '127.0.0.1:{free_port()}'}}\n")
    for dev, profile in (("coldroom-1", "coldroom-controller"), ("truck-th", "greenhouse-th"),
                         ("door-scanner", "greenhouse-th")):
        (cfg / "devices" / f"{dev}.yaml").write_text(_device(dev, profile, free_port()))  # nothing listens: down
    (cfg / "trace.yaml").write_text(TRACE_YAML)
    return cfg


async def _until_logged(caplog, text: str, count: int = 1) -> None:
    await until(lambda: caplog.text.count(text) >= count, what=f"{count} x {text!r} logged")


async def test_sighup_reloads_trace_yaml_and_the_chain_continues(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = _config_dir(tmp_path)
    state, clock = tmp_path / "state", Clock()
    (state / "out").mkdir(parents=True)
    config = load_config(cfg)
    stop, reload = asyncio.Event(), asyncio.Event()
    async with TraceService(load_trace_config(config), state, clock=clock) as svc:
        serving = asyncio.create_task(serve(config, reloading(lambda: load_config(cfg), svc), stop, reload), name="serve")
        try:
            svc.observe(Reading("door-scanner", T0 + M, {"code": "LOT-A"}))
            svc.observe(_cold(T0 + 2 * M, 2.0))
            svc.step()
            first = svc.cfg

            # broken: logged with file:line:col, nothing changes
            (cfg / "trace.yaml").write_text(TRACE_YAML.replace("devices: [coldroom-1]", "devices: [coldroom-9]"))
            reload.set()
            await _until_logged(caplog, "configuration NOT reloaded")
            assert "trace.yaml:8:15: unknown device 'coldroom-9'" in caplog.text
            assert svc.cfg is first

            # cannot change while running: refused, located
            (cfg / "trace.yaml").write_text("key_file: other.key\n" + TRACE_YAML)
            reload.set()
            await _until_logged(caplog, "configuration NOT reloaded", 2)
            assert "trace.yaml:1:11: key_file cannot change while the gateway runs" in caplog.text
            assert svc.cfg is first
            # the journal lives in the outbox: moving the outbox is refused too, located in gateway.yaml
            (cfg / "trace.yaml").write_text(TRACE_YAML)
            gateway_yaml = (cfg / "gateway.yaml").read_text()
            (cfg / "gateway.yaml").write_text(gateway_yaml.replace("outbox.db", "elsewhere.db"))
            reload.set()
            await _until_logged(caplog, "configuration NOT reloaded", 3)
            assert "gateway.yaml:2:16: buffer.path cannot change while the trace feed runs" in caplog.text
            assert svc.cfg is first
            (cfg / "gateway.yaml").write_text(gateway_yaml)

            # valid: a tighter threshold, a lot placed by the file, a second sink
            clock.now = T0 + 3 * M
            changed = (TRACE_YAML.replace("max: 4}", "max: 2.5}")
                       .replace("sinks:\n", "  LOT-B: {location: truck-7}\nsinks:\n  copy: {type: jsonl, path: out/copy.jsonl}\n"))
            (cfg / "trace.yaml").write_text(changed)
            reload.set()
            await _until_logged(caplog, "trace.yaml reloaded")
            assert svc.cfg is not first and svc.cfg.file.lots["LOT-B"].location == "truck-7"
            svc.observe(_cold(T0 + 4 * M, 3.0))  # an excursion only under the new threshold
            clock.now = T0 + 15 * M + 6 * S
            svc.step()
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)
    public = load_public_key(state / "trace-ed25519.key")
    feed = (state / "out" / "feed.jsonl").read_text().splitlines()
    assert verify_lines(feed, public) == (len(feed), None)  # one chain, across the reload
    assert (state / "out" / "copy.jsonl").read_text().splitlines() == feed  # the new sink starts at seq 1
    events = [json.loads(line)["epcisBody"]["eventList"][0] for line in feed]
    assert [(e["sluice:seq"], e["sluice:lot"], e["sluice:reason"]) for e in events][:3] == [
        (1, "LOT-A", "enter"), (2, "LOT-B", "enter"), (3, "LOT-A", "window")]
    assert events[1]["sluice:source"] == "config"
    reports = [r for el in events[2]["sensorElementList"] for r in el["sensorReport"]]
    stats = next(r for r in reports if "meanValue" in r)
    assert (stats["minValue"], stats["maxValue"]) == (2, 3)  # the reading before the reload is kept
    alarm = next(r for r in reports if r.get("exception") == "ALARM_CONDITION")
    assert alarm["minValue"] == 3


async def test_reload_starts_a_new_network_sink_from_seq_1_and_stops_a_removed_one(tmp_path, mosquitto):
    state, clock = tmp_path / "state", Clock()
    (state / "out").mkdir(parents=True)
    cfg = _config_dir(tmp_path)
    async with TraceService(load_trace_config(load_config(cfg)), state, clock=clock) as svc:
        load = reloading(lambda: load_config(cfg), svc)
        svc.observe(Reading("door-scanner", T0 + M, {"code": "LOT-A"}))
        svc.step()
        async with subscriber(mosquitto.host, mosquitto.port, "sluice/farm-1/gw-1/trace/events") as sub:
            bus = f"  bus: {{type: mqtt, host: 127.0.0.1, port: {mosquitto.port}}}\n"
            (cfg / "trace.yaml").write_text(TRACE_YAML + bus)
            load()
            await sub.wait_until(lambda ms: len(ms) == 1)
            svc.observe(_cold(T0 + 2 * M, 3.0))
            clock.now = T0 + 15 * M + 6 * S
            svc.step()
            await sub.wait_until(lambda ms: len(ms) == 2)
            assert [json.loads(m.payload)["epcisBody"]["eventList"][0]["sluice:seq"] for m in sub.messages] == [1, 2]
            (cfg / "trace.yaml").write_text(TRACE_YAML)
            load()
            assert svc._resink is not None  # noqa: SLF001 - the re-sink task a reload starts; awaited to know it ended
            await svc._resink  # noqa: SLF001 - see above
            assert set(svc.sinks) == {"feed"} and "bus" not in svc.deliveries  # no network sink left


async def test_sluice_run_reloads_trace_yaml_on_sighup(tmp_path):
    cfg = _config_dir(tmp_path)
    log_file = tmp_path / "run.log"
    env = {**os.environ, "STATE_DIRECTORY": str(tmp_path / "state")}
    (tmp_path / "state" / "out").mkdir(parents=True)

    async def logged(text: str) -> None:
        await until(lambda: text in log_file.read_text(), what=f"{text!r} logged", state=lambda: log_file.read_text()[-1000:])

    with log_file.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        await logged("running:")
        (cfg / "trace.yaml").write_text(TRACE_YAML.replace("window: 15m", "window: 15 minutes"))
        proc.send_signal(signal.SIGHUP)
        await logged("configuration NOT reloaded")
        (cfg / "trace.yaml").write_text(TRACE_YAML.replace("window: 15m", "window: 5m"))
        proc.send_signal(signal.SIGHUP)
        await logged("trace.yaml reloaded")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, STOP)
    text = log_file.read_text()
    assert proc.returncode == 0, text
    assert "trace.yaml:1:9: " in text and "the chain continues at seq 0" in text, text
