"""Traceability feed: weighings of a scale and packaging codes of a code reader recorded as events of
the lot present (stable weights only, once per weighing), schema-valid, event ids as GS1's
reference generator computes them, chain verifiable; late readings counted and logged."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from test_trace import REPO, T0, M, S, Clock, _device, _iso, _schema

from gateway.config import load_config
from gateway.reading import Reading
from gateway.trace.config import load_trace_config
from gateway.trace.hashing import event_hash
from gateway.trace.journal import Journal
from gateway.trace.seal import load_public_key, verify_lines
from gateway.trace.service import TraceService
from gateway.yamlpos import ConfigErrors
import jsonschema  # a test dependency: missing is a failure, never a skip
from epcis_event_hash_generator import hash_generator, json_to_py
from gateway.cli.commands import main

TRACE = """\
window: 15m
grace: 5s
outage_after: 1m
locations:
  cold-room-1:
    devices: [coldroom-1]
    read_point: urn:epc:id:sgln:4012345.00001.0
    points: [room_temperature]
  packing-1:
    scanners: [pack-scanner]
    scales: [pack-scale]
    record_codes: true
    read_point: urn:epc:id:sgln:4012345.00002.0
    biz_step: packing
lots:
  LOT-A: {gtin: "04012345123456", lot_number: A1, producer: CN-FARM-001}
  LOT-B: {producer: CN-FARM-001}
sinks:
  feed: {type: jsonl, path: feed.jsonl}
"""


def _serial(dev_id: str, profile: str) -> str:
    return f"id: {dev_id}\nprotocol: serial\nprofile: {profile}\nport: /dev/tty-{dev_id}\nbaudrate: 9600\ninterval: 1s\n"


def _config(tmp_path: Path, trace: str = TRACE):
    cfg = tmp_path / "config"
    (cfg / "devices").mkdir(parents=True)
    shutil.copytree(REPO / "config" / "profiles", cfg / "profiles")
    (cfg / "gateway.yaml").write_text("gateway: {id: gw-1, site: farm-1}\n")
    (cfg / "devices" / "coldroom-1.yaml").write_text(_device("coldroom-1", "coldroom-controller", 5021))
    (cfg / "devices" / "pack-scale.yaml").write_text(_serial("pack-scale", "scale-continuous"))
    (cfg / "devices" / "pack-scanner.yaml").write_text(_serial("pack-scanner", "barcode-reader"))
    (cfg / "trace.yaml").write_text(trace)
    return load_trace_config(load_config(cfg))


def _weight(t: int, weight: float, stable: bool = True, unit: str = "kg", net: bool = False) -> Reading:
    return Reading("pack-scale", t, {"weight": weight, "unit": unit, "stable": stable, "net": net, "overload": False})


def _overload(t: int) -> Reading:
    return Reading("pack-scale", t, {"overload": True, "stable": False})


def _scan(t: int, code: str) -> Reading:
    return Reading("pack-scanner", t, {"code": code})


async def _packing(tmp_path: Path) -> tuple[list[dict], list[str], TraceService]:
    """Packing station: a weight with no lot; LOT-A scanned in; a crate weighed (moving, stable,
    resting, overload, emptied, weighed again); a packaging code; LOT-B started; a crate weighed
    for LOT-B; a weight in an unknown unit; both lots shipped."""
    cfg = _config(tmp_path)
    clock, state = Clock(), tmp_path / "state"
    state.mkdir()
    async with TraceService(cfg, state, clock=clock) as svc:
        readings = [
            _weight(T0 + 30 * S, 5.0),                      # no lot here yet: not recorded
            _weight(T0 + 50 * S, 0.0),                      # emptied
            _scan(T0 + M, "(01)04012345123456(10)A1"),      # LOT-A enters packing-1
            _weight(T0 + 2 * M, 10.1, stable=False),        # moving
            _weight(T0 + 2 * M + S, 12.345, net=True),      # recorded
            _weight(T0 + 2 * M + 2 * S, 12.345, net=True),  # the same load, resting: not again
            _weight(T0 + 2 * M + 3 * S, 12.345, net=True),
            _overload(T0 + 2 * M + 4 * S),                  # never recorded
            _weight(T0 + 2 * M + 5 * S, 0.0),               # emptied: not a weight
            _weight(T0 + 2 * M + 6 * S, 12.345),            # the next crate, same weight: recorded
            _scan(T0 + 3 * M, "PKG-0000123"),               # a packaging code: recorded for LOT-A
        ]
        for r in readings:
            svc.observe(r)
        clock.now = T0 + 3 * M + S
        svc.step()
        with Journal(state / "outbox.db") as cli:
            cli.queue("start", "LOT-B", "packing-1", time_ns=T0 + 5 * M)
        clock.now = T0 + 5 * M + S
        svc.step()
        svc.observe(_weight(T0 + 6 * M, 8.5, stable=False))
        svc.observe(_weight(T0 + 6 * M + S, 8.5))            # LOT-B entered last: its weight
        svc.observe(_weight(T0 + 6 * M + 2 * S, 0.0))
        svc.observe(_weight(T0 + 6 * M + 3 * S, 9.0, unit="oz"))  # no Rec 20 mass unit known: not recorded
        with Journal(state / "outbox.db") as cli:
            cli.queue("end", "LOT-A", None, time_ns=T0 + 8 * M)
            cli.queue("end", "LOT-B", None, time_ns=T0 + 8 * M)
        clock.now = T0 + 8 * M + S
        svc.step()
        assert svc.core is not None and svc.core.unbound == 1
    lines = (state / "feed.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], lines, svc


async def test_stable_weights_and_packaging_codes_are_events_of_the_lot_present(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "gateway.trace")
    docs, lines, _svc = await _packing(tmp_path)
    events = [d["epcisBody"]["eventList"][0] for d in docs]
    assert [(e["sluice:seq"], e["sluice:lot"], e["sluice:reason"], e["bizStep"], e["eventTime"]) for e in events] == [
        (1, "LOT-A", "enter", "arriving", _iso(T0 + M)),
        (2, "LOT-A", "weight", "packing", _iso(T0 + 2 * M + S)),
        (3, "LOT-A", "weight", "packing", _iso(T0 + 2 * M + 6 * S)),
        (4, "LOT-A", "code", "packing", _iso(T0 + 3 * M)),
        (5, "LOT-B", "enter", "arriving", _iso(T0 + 5 * M)),
        (6, "LOT-B", "weight", "packing", _iso(T0 + 6 * M + S)),
        (7, "LOT-A", "end", "shipping", _iso(T0 + 8 * M)),
        (8, "LOT-B", "end", "shipping", _iso(T0 + 8 * M)),
    ]
    lgtin = "https://id.gs1.org/01/04012345123456/10/A1"
    scale = "urn:sluice:device:gw-1:pack-scale"
    weighed = events[1]
    assert weighed["quantityList"] == [{"epcClass": lgtin, "quantity": 12.345, "uom": "KGM"}]
    assert weighed["sensorElementList"] == [
        {"sensorMetadata": {"time": _iso(T0 + 2 * M + S), "deviceID": scale},
         "sensorReport": [{"type": "Mass", "value": 12.345, "uom": "KGM", "sluice:point": "weight", "sluice:net": True}]}]
    assert weighed["sluice:source"] == "scale:pack-scale" and weighed["sluice:location"] == "packing-1"
    assert weighed["readPoint"] == {"id": "urn:epc:id:sgln:4012345.00002.0"}
    assert events[2]["sensorElementList"][0]["sensorReport"][0]["sluice:net"] is False
    assert events[3]["sluice:code"] == "PKG-0000123" and events[3]["sluice:source"] == "scan:pack-scanner"
    assert events[3]["quantityList"] == [{"epcClass": lgtin}] and "sensorElementList" not in events[3]
    assert events[5]["quantityList"] == [{"epcClass": "urn:sluice:lot:CN-FARM-001:LOT-B", "quantity": 8.5, "uom": "KGM"}]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("pack-scale" in w and "'oz'" in w for w in warnings), warnings
    assert not any("no known lot" in w for w in warnings)  # the packaging code was recorded, not refused
    assert verify_lines(lines, load_public_key(tmp_path / "state" / "trace-ed25519.key")) == (8, None)


async def test_weighing_events_validate_and_their_ids_match_the_reference(tmp_path):
    docs, _lines, _svc = await _packing(tmp_path)
    validator = jsonschema.Draft7Validator(_schema(), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    reasons = set()
    for doc in docs:
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, errors
        event = doc["epcisBody"]["eventList"][0]
        reasons.add(event["sluice:reason"])
        reference = hash_generator.epcis_hashes_from_events(json_to_py.event_list_from_epcis_document_json(
            json.loads(json.dumps(doc))))
        assert reference == [event["eventID"]]
        assert event_hash({k: v for k, v in event.items() if k != "eventID"}, doc["@context"]) == event["eventID"]
    assert {"weight", "code"} <= reasons


async def test_show_prints_weighings_and_codes(tmp_path, capsys, monkeypatch):
    await _packing(tmp_path)
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    capsys.readouterr()
    assert main(["trace", "show", "LOT-A", "-c", str(tmp_path / "config"), "--csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "weight 12.345 KGM net" in out[2] and "code PKG-0000123" in out[4]


async def test_late_readings_are_counted_and_logged_once_per_window(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "gateway.trace")
    cfg = _config(tmp_path)
    clock, state = Clock(), tmp_path / "state"
    state.mkdir()
    cold = "room_temperature"
    async with TraceService(cfg, state, clock=clock) as svc:
        with Journal(state / "outbox.db") as cli:
            cli.queue("start", "LOT-B", "cold-room-1", time_ns=T0)
        svc.step()
        svc.observe(Reading("coldroom-1", T0 + M, {cold: 2.0}))
        clock.now = T0 + 15 * M + 6 * S  # the first window closes
        svc.step()
        assert svc.late == 0
        svc.observe(Reading("coldroom-1", T0 + 14 * M, {cold: 2.0}))  # for the closed window
        svc.step()
        svc.observe(Reading("coldroom-1", T0 + 14 * M + 30 * S, {cold: 2.0}))
        svc.step()  # the same window: counted, not logged again
        assert svc.late == 2
        late = [r.getMessage() for r in caplog.records if "after their window had closed" in r.getMessage()]
        assert len(late) == 1 and late[0].startswith("trace: 1 reading(s)")
        clock.now = T0 + 30 * M + 6 * S
        svc.step()
        late = [r.getMessage() for r in caplog.records if "after their window had closed" in r.getMessage()]
        assert len(late) == 2 and late[1].startswith("trace: 1 reading(s)") and "(2 since start)" in late[1]
        svc.step()
        assert len([r for r in caplog.records if "after their window had closed" in r.getMessage()]) == 2


def test_scale_config_errors_are_located(tmp_path):
    trace = TRACE.replace("scales: [pack-scale]", "scales: [pack-scal]").replace(
        "    points: [room_temperature]\n", "    points: [room_temperature]\n    scales: [pack-scale]\n", 1)
    with pytest.raises(ConfigErrors) as err:
        _config(tmp_path, trace.replace("scales: [pack-scal]", "scales: [pack-scale, pack-scal]"))
    text = "\n".join(str(e) for e in err.value.errors)
    assert "unknown device 'pack-scal'" in text and "scale 'pack-scale' is already in location 'cold-room-1'" in text
