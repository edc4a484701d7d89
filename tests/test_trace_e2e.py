"""End to end: a serial code reader (pty simulator) at the cold-room door scans a lot label; the
running gateway, with the trace service attached the way `sluice run` does it, records the
binding event, with the scanned code, in the JSON Lines feed; `sluice check` reads trace.yaml."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from pathlib import Path

from gateway.app import Gateway
from gateway.config import load_config
from gateway.trace.config import load_trace_config
from gateway.trace.seal import load_public_key, verify_lines
from gateway.trace.service import TraceService
from simulators.serial_sensor import SerialSensorSim, load_profile
from support import until
from gateway.cli.commands import main

REPO = Path(__file__).resolve().parent.parent

TRACE = """\
window: 15m
locations:
  cold-room-1:
    scanners: [door-scanner]
    read_point: urn:epc:id:sgln:4012345.00001.0
lots:
  LOT-2026-0042: {producer: CN-FARM-001, attributes: {variety: Albion}}
sinks:
  feed: {type: jsonl, path: feed.jsonl}
"""


def _config(tmp_path: Path, port: str, trace: str = TRACE) -> Path:
    cfg = tmp_path / "config"
    (cfg / "devices").mkdir(parents=True)
    (cfg / "profiles").mkdir()
    shutil.copy(REPO / "config" / "profiles" / "barcode-reader.yaml", cfg / "profiles")
    (cfg / "gateway.yaml").write_text(f"gateway: {{id: gw-1, site: farm-1}}\nbuffer: {{path: {tmp_path / 'outbox.db'}}}\n"
                                      "health: {enabled: false}\n")
    (cfg / "devices" / "door-scanner.yaml").write_text(
        f"id: door-scanner\nprotocol: serial\nprofile: barcode-reader\nport: {port}\nbaudrate: 9600\ninterval: 1s\n")
    (cfg / "trace.yaml").write_text(trace)
    return cfg


async def test_a_scan_at_the_door_becomes_the_binding_event_in_the_feed(tmp_path, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("STATE_DIRECTORY", str(state))
    profile = load_profile(REPO / "config" / "profiles" / "barcode-reader.yaml")
    async with SerialSensorSim(profile, every=0.2, values={"code": "LOT-2026-0042"}) as sim:
        config = load_config(_config(tmp_path, sim.path))
        trace = load_trace_config(config)
        assert trace is not None
        feed = state / "feed.jsonl"
        stop = asyncio.Event()
        async with TraceService(trace) as service:  # as cmd_run: service first, its task, then the gateway
            trace_task = asyncio.create_task(service.run(), name="trace")
            gateway = Gateway(config, on_reading=service.observe)
            run = asyncio.create_task(gateway.run(stop), name="gateway")
            try:
                await until(lambda: feed.exists() and feed.read_text(), what="the first event in the feed")
                await until(lambda: sim.frames >= 5, what="more scans of the same label")  # they make no more events
            finally:
                stop.set()
                await run
                trace_task.cancel()
                await asyncio.gather(trace_task, return_exceptions=True)
    lines = feed.read_text().splitlines()
    assert len(lines) == 1, lines  # scanned again and again at the same door: one binding event
    event = json.loads(lines[0])["epcisBody"]["eventList"][0]
    assert (event["sluice:lot"], event["sluice:reason"], event["sluice:location"]) == ("LOT-2026-0042", "enter", "cold-room-1")
    assert event["sluice:source"] == "scan:door-scanner" and event["sluice:code"] == "LOT-2026-0042"
    assert event["quantityList"] == [{"epcClass": "urn:sluice:lot:CN-FARM-001:LOT-2026-0042"}]
    assert event["sluice:attributes"] == {"variety": "Albion"}
    assert verify_lines(lines, load_public_key(state / "trace-ed25519.key")) == (1, None)
    with sqlite3.connect(tmp_path / "outbox.db") as db:  # one durable outbox holds the readings and the events
        assert db.execute("SELECT count(*) FROM readings").fetchone()[0] >= 1
        assert [r[0] for r in db.execute("SELECT line FROM trace_events ORDER BY seq")] == lines
        assert db.execute("SELECT acked FROM trace_sinks WHERE name='feed'").fetchone()[0] == 1
    db.close()
    assert sorted(p.name for p in tmp_path.rglob("*.db")) == ["outbox.db"]


def test_check_reports_trace_yaml_errors_with_their_place(tmp_path, capsys):
    cfg = _config(tmp_path, "/dev/null", TRACE.replace("type: jsonl", "type: jsnl"))
    assert main(["check", "-c", str(cfg)]) == 2
    assert "trace.yaml:9:16: unknown type 'jsnl'" in capsys.readouterr().err
    (cfg / "trace.yaml").write_text(TRACE.replace("scanners: [door-scanner]", "scanners: [door-scaner]"))
    assert main(["check", "-c", str(cfg)]) == 2
    assert "trace.yaml:4:16: unknown device 'door-scaner'" in capsys.readouterr().err
    (cfg / "trace.yaml").write_text(TRACE)
    assert main(["check", "-c", str(cfg)]) == 0
    assert "1 locations, 1 lots, 1 trace sinks" in capsys.readouterr().out
