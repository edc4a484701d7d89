"""What the feed's events say: outages covered up to the first good reading, readings on an
unsynchronised clock flagged, CO₂ as a VolumeFraction, alarms naming their limit, dispositions, the
event time zone. Checked on the pure engine; GS1's schema and hash are checked by test_trace.py."""

from __future__ import annotations

import json
import time

import pytest
from test_trace import T0, TRACE_YAML, M, S, _iso, _schema, trace_config

from gateway.reading import CLOCK_UNSYNCED, UNCERTAIN, Reading, quality
from gateway.trace.engine import CONTEXT, Command, TraceCore
from gateway.trace.hashing import event_hash
import jsonschema  # test dependencies: missing is a failure, never a skip
from epcis_event_hash_generator import hash_generator, json_to_py

DEV = "urn:sluice:device:gw-1:coldroom-1"


def _run(core: TraceCore, readings: list[Reading], until: int) -> list[dict]:
    events = core.command(Command("start", "LOT-A", "cold-room-1", T0))
    for r in readings:
        events += core.feed(r)
    return events + core.tick(until)


def _errors(events: list[dict]) -> list[tuple[str, str]]:
    return [(el["sensorMetadata"]["startTime"], el["sensorMetadata"]["endTime"])
            for e in events for el in e.get("sensorElementList", ())
            if el["sensorReport"][0].get("exception") == "ERROR_CONDITION"]


def _valid_and_hashed_as_gs1_does(events: list[dict]) -> None:
    """GS1's schema accepts the events and GS1's reference generator hashes them as Sluice does."""

    validator = jsonschema.Draft7Validator(_schema(), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    for event in events:
        doc = {"@context": CONTEXT, "type": "EPCISDocument", "schemaVersion": "2.0", "creationDate": event["eventTime"],
               "epcisBody": {"eventList": [event]}}
        assert not [e.message for e in validator.iter_errors(doc)]
        reference = hash_generator.epcis_hashes_from_events(json_to_py.event_list_from_epcis_document_json(
            json.loads(json.dumps(doc))))
        assert reference == [event_hash(event, CONTEXT)]


def _cold(t: int, q: str = "good") -> Reading:
    return Reading("coldroom-1", t, {"room_temperature": 2.0}, quality=q)


@pytest.mark.parametrize(("last", "first"), [
    (T0 + 13 * M + 30 * S, T0 + 15 * M + 20 * S),  # reported at the first window's end, then 20 s more in the next
    (T0 + 14 * M, T0 + 15 * M + 40 * S),  # no outage yet when the first window closes: the next window has it all
], ids=["begun-in-the-first-window", "seen-only-in-the-second"])
def test_an_outage_across_a_window_end_is_reported_up_to_the_first_good_reading(tmp_path, last, first):
    core = TraceCore(trace_config(tmp_path))  # outage_after: 1m, window: 15m
    readings = [_cold(t) for t in range(T0, last + 1, 30 * S)] + [_cold(t) for t in range(first, T0 + 30 * M, 30 * S)]
    events = _run(core, readings, T0 + 31 * M)
    windows = [e for e in events if e["sluice:reason"] == "window"]
    assert [e["eventTime"] for e in windows] == [_iso(T0 + 15 * M), _iso(T0 + 30 * M)]
    errors = _errors(events)
    # the outage is reported with its whole span, from the last reading before it to the first after it
    assert (_iso(last), _iso(first)) in errors, errors
    # and nothing else: every report of it starts at the last good reading
    assert all(start == _iso(last) for start, _end in errors), errors


def test_events_say_when_their_readings_were_taken_on_an_unsynchronised_clock(tmp_path):
    core = TraceCore(trace_config(tmp_path))
    unsynced_and_broken = quality(CLOCK_UNSYNCED, UNCERTAIN)
    readings = [_cold(t) for t in range(T0, T0 + 15 * M, 30 * S)]
    readings += [_cold(t, CLOCK_UNSYNCED if t < T0 + 20 * M else unsynced_and_broken)
                 for t in range(T0 + 15 * M, T0 + 30 * M, 30 * S)]
    events = _run(core, readings, T0 + 46 * M)
    reasons = [(e["sluice:reason"], e["eventTime"], e.get("sluice:quality")) for e in events]
    assert reasons[:3] == [
        ("enter", _iso(T0), None),
        ("window", _iso(T0 + 15 * M), None),  # synchronised clock: no flag
        ("window", _iso(T0 + 30 * M), "clock_unsynced,uncertain"),  # the union of the readings' flags
    ]
    _valid_and_hashed_as_gs1_does(events)
    # a scan (a reading taken on an unsynchronised clock) moves a lot: its enter event says so
    scanned = TraceCore(trace_config(tmp_path / "scan")).feed(
        Reading("door-scanner", T0 + M, {"code": "(01)04012345123456(10)A1"}, quality=CLOCK_UNSYNCED))
    assert [(e["sluice:reason"], e.get("sluice:quality")) for e in scanned] == [("enter", "clock_unsynced")]


def test_co2_in_ppm_is_a_volume_fraction(tmp_path):
    trace = TRACE_YAML.replace("points: [temperature]", "points: [temperature, co2]").replace(
        "thresholds: {temperature: {min: 0, max: 4}}", "thresholds: {temperature: {min: 0, max: 4}, co2: {max: 5000}}")
    cfg = trace_config(tmp_path, trace)
    co2 = [p for p in cfg.points["truck-7"] if p.field == "co2"]
    assert [(p.type, p.uom) for p in co2] == [("VolumeFraction", "59")]  # 59: part per million (UN/ECE Rec 20)
    core = TraceCore(cfg)
    events = core.command(Command("start", "LOT-A", "truck-7", T0))
    for t in range(T0, T0 + 15 * M, 30 * S):
        events += core.feed(Reading("truck-th", t, {"temperature": 3.0, "co2": 6000 if t == T0 + 5 * M else 900}))
    events += core.tick(T0 + 16 * M)
    reports = [r for e in events for el in e.get("sensorElementList", ()) for r in el["sensorReport"]]
    assert {r["type"] for r in reports if r["sluice:point"] == "co2"} == {"VolumeFraction"}
    (alarm,) = [el for e in events for el in e.get("sensorElementList", ())
                if el["sensorReport"][0].get("exception") == "ALARM_CONDITION"]
    assert alarm["sensorMetadata"]["bizRules"] == "urn:sluice:threshold:product:strawberries:co2"
    assert alarm["sensorReport"][0]["sluice:limitMax"] == 5000 and "sluice:limitMin" not in alarm["sensorReport"][0]
    _valid_and_hashed_as_gs1_does(events)


def test_an_alarm_names_a_configured_rule_and_a_location_its_disposition(tmp_path):
    trace = TRACE_YAML.replace("thresholds: {temperature: {min: 0, max: 4}}",
                               "thresholds: {temperature: {min: 0, max: 4, biz_rules: 'https://spec.example/strawberry#cold'}}")
    trace = trace.replace("    biz_step: storing\n", "    biz_step: storing\n    disposition: sellable_accessible\n")
    core = TraceCore(trace_config(tmp_path, trace))
    events = _run(core, [_cold(T0 + M), Reading("coldroom-1", T0 + 2 * M, {"room_temperature": 9.0})], T0 + 16 * M)
    window = events[-1]
    assert window["disposition"] == "sellable_accessible"
    (alarm,) = [el for el in window["sensorElementList"] if el["sensorReport"][0].get("exception") == "ALARM_CONDITION"]
    assert alarm["sensorMetadata"]["bizRules"] == "https://spec.example/strawberry#cold"
    assert (alarm["sensorReport"][0]["sluice:limitMin"], alarm["sensorReport"][0]["sluice:limitMax"]) == (0, 4)
    _valid_and_hashed_as_gs1_does(events)


@pytest.fixture
def berlin(monkeypatch):
    """The system's zone is Central European Time (a POSIX TZ rule: no tzdata needed)."""
    monkeypatch.setenv("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_the_event_time_zone_is_the_systems_at_the_events_time(tmp_path, berlin):
    core = TraceCore(trace_config(tmp_path))
    summer = core.command(Command("start", "LOT-A", "cold-room-1", T0))  # 1 May: CEST
    winter = core.command(Command("move", "LOT-A", "truck-7", T0 - 120 * 86400 * S))  # early January: CET
    assert summer[0]["eventTimeZoneOffset"] == "+02:00"
    assert {e["eventTimeZoneOffset"] for e in winter} == {"+01:00"}
    _valid_and_hashed_as_gs1_does(summer + winter)
    fixed = TraceCore(trace_config(tmp_path / "fixed", "timezone_offset: '-05:00'\n" + TRACE_YAML))
    assert fixed.command(Command("start", "LOT-A", "cold-room-1", T0))[0]["eventTimeZoneOffset"] == "-05:00"
