"""Trace feed over the network: the MQTT sink and command topic against a real Mosquitto, the EPCIS
2.0 capture sink against a small aiohttp capture server (outage with Retry-After, a refused
document becomes a dead letter), and `sluice trace verify URL` on what the servers hold."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path

import aiomqtt
import pytest
from aiohttp import web
from servers import free_port, subscriber
from support import unavailable, until
from test_trace import REPO, TRACE_YAML, T0, M, S, Clock, _cold, _device

from gateway.config import load_config
from gateway.reading import Reading
from gateway.trace.config import load_trace_config
from gateway.trace.journal import Journal
from gateway.trace.seal import load_public_key, verify_lines
from gateway.trace.service import TraceService
import os
from test_trace import _scenario
from gateway.trace.schema import cached_schema
from gateway.cli.commands import main

pytestmark = pytest.mark.usefixtures("close_default_executor")


def _config(tmp_path: Path, sinks: str):
    cfg = tmp_path / "config"
    (cfg / "devices").mkdir(parents=True)
    shutil.copytree(REPO / "config" / "profiles", cfg / "profiles")
    (cfg / "gateway.yaml").write_text("gateway: {id: gw-1, site: farm-1}\n")
    (cfg / "devices" / "coldroom-1.yaml").write_text(_device("coldroom-1", "coldroom-controller", 5021))
    (cfg / "devices" / "truck-th.yaml").write_text(_device("truck-th", "greenhouse-th", 5022))
    (cfg / "devices" / "door-scanner.yaml").write_text(_device("door-scanner", "greenhouse-th", 5023))
    (cfg / "trace.yaml").write_text(TRACE_YAML.split("sinks:")[0] + "sinks:\n" + sinks)
    return load_trace_config(load_config(cfg))


def _lot_a_in_and_one_window(svc: TraceService, clock: Clock) -> None:
    """Two events: LOT-A scanned into cold-room-1 (seq 1), its first window closed (seq 2)."""
    svc.observe(Reading("door-scanner", T0 + M, {"code": "LOT-A"}))
    svc.observe(_cold(T0 + 2 * M, 3.0))
    clock.now = T0 + 15 * M + 6 * S
    svc.step()


# --------------------------------------------------------------------------- MQTT
async def test_mqtt_sink_delivers_each_event_after_puback_and_survives_a_broker_outage(mosquitto, tmp_path):
    trace = _config(tmp_path, f"  bus: {{type: mqtt, host: 127.0.0.1, port: {mosquitto.port}, reconnect_max: 0.5s}}\n")
    state, clock = tmp_path / "state", Clock()
    topic = "sluice/farm-1/gw-1/trace/events"
    async with subscriber(mosquitto.host, mosquitto.port, topic, client_id="platform") as sub:
        async with TraceService(trace, state, clock=clock) as svc:
            svc.observe(Reading("door-scanner", T0 + M, {"code": "LOT-A"}))
            svc.step()
            await sub.wait_until(lambda ms: len(ms) == 1)
            with Journal(state / "outbox.db") as j:
                await until(lambda: j.position("bus") == 1)
            mosquitto.stop()  # outage: events are sealed and kept, not acknowledged
            svc.observe(_cold(T0 + 2 * M, 3.0))
            clock.now = T0 + 15 * M + 6 * S
            svc.step()
            with Journal(state / "outbox.db") as cli:
                cli.queue("end", "LOT-A", None, time_ns=T0 + 16 * M)
            clock.now = T0 + 16 * M + S
            svc.step()
            await asyncio.sleep(0.3)  # the sink tries meanwhile and must acknowledge nothing: a bounded negative
            with Journal(state / "outbox.db") as j:
                assert len(j.all_lines()) == 3 and j.position("bus") == 1
            mosquitto.start()
            await sub.wait_until(lambda ms: len(ms) >= 3, timeout=20)
            with Journal(state / "outbox.db") as j:
                await until(lambda: j.position("bus") == 3)
                stored = j.all_lines()
    lines = [m.payload.decode() for m in sub.messages]
    assert lines == stored  # byte for byte the sealed lines, in order, each once
    assert verify_lines(lines, load_public_key(state / "trace-ed25519.key")) == (3, None)


async def test_mqtt_commands_are_applied_recorded_and_answered(mosquitto, tmp_path):
    trace = _config(tmp_path, f"  bus: {{type: mqtt, host: 127.0.0.1, port: {mosquitto.port}}}\n")
    state, clock = tmp_path / "state", Clock()
    base = "sluice/farm-1/gw-1/trace"
    async with subscriber(mosquitto.host, mosquitto.port, f"{base}/cmd/reply") as replies, \
            TraceService(trace, state, clock=clock) as svc:
        await asyncio.wait_for(svc.sinks["bus"].mqtt.wait_connected(), 10)
        commands = [
            {"id": 1, "op": "start", "lot": "LOT-A", "location": "cold-room-1"},
            {"id": 2, "op": "move", "lot": "LOT-A", "location": "truck-7"},
            {"id": 3, "op": "move", "lot": "LOT-A", "location": "moon"},
            {"id": 4, "op": "fly", "lot": "LOT-A"},
            {"id": 5, "op": "end", "lot": "LOT-Z"},
            "not an object",
            {"id": 7, "op": "end", "lot": "LOT-A", "colour": "red"},
        ]
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            for cmd in commands:
                await client.publish(f"{base}/cmd", json.dumps(cmd), qos=1)
            await client.publish(f"{base}/cmd", b"{broken", qos=1)
        await replies.wait_until(lambda ms: len(ms) == 8)
        got = [json.loads(m.payload) for m in replies.messages]
        assert [(r["id"], r["ok"]) for r in got] == [(1, True), (2, True), (3, False), (4, False), (5, False),
                                                      (None, False), (7, False), (None, False)]
        assert got[1]["status"] == "done" and "unknown" in got[2]["status"] and "use start, move or end" in got[3]["status"]
        assert got[4]["status"].startswith("refused: lot 'LOT-Z' is in no location")
        assert "colour" in got[6]["status"] and got[7]["status"].startswith("invalid: not JSON")
        assert svc.core is not None and svc.core.lots["LOT-A"].location == "truck-7"  # the gateway is still fine
    with Journal(state / "outbox.db") as j:
        events = [json.loads(x)["epcisBody"]["eventList"][0] for x in j.all_lines()]
    assert [(e["sluice:reason"], e["sluice:location"], e.get("sluice:source")) for e in events] == [
        ("enter", "cold-room-1", "mqtt"), ("leave", "cold-room-1", "mqtt"), ("enter", "truck-7", "mqtt")]


# --------------------------------------------------------------------------- EPCIS capture
class CaptureServer:
    """A minimal EPCIS 2.0 capture interface: records documents; can answer 503 for a while and
    refuse documents of chosen seqs with 400; serves GET /events as an EPCISQueryDocument."""

    def __init__(self) -> None:
        self.documents: list[dict] = []
        self.requests: list[tuple[str, str, str | None]] = []  # path, content type, auth
        self.unavailable = 0
        self.refuse: set[int] = set()
        self.port = free_port()

    async def capture(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, request.content_type, request.headers.get("Authorization")))
        doc = json.loads(await request.text())
        seq = doc["epcisBody"]["eventList"][0]["sluice:seq"]
        if self.unavailable > 0:
            self.unavailable -= 1
            return web.Response(status=503, headers={"Retry-After": "1"}, text="maintenance")
        if seq in self.refuse:
            return web.json_response({"type": "epcisException:ValidationException", "title": "bad document"},
                                     status=400)
        if any(d["epcisBody"]["eventList"][0]["eventID"] == doc["epcisBody"]["eventList"][0]["eventID"]
               for d in self.documents):
            return web.Response(status=409)
        self.documents.append(doc)
        return web.Response(status=202, headers={"Location": f"/capture/{len(self.documents)}"})

    async def query(self, request: web.Request) -> web.Response:
        events = [dict(d["epcisBody"]["eventList"][0], recordTime="2024-05-01T07:00:00.000Z") for d in self.documents]
        events.reverse()  # a repository promises no order
        return web.json_response({"@context": ["https://ref.gs1.org/standards/epcis/2.0.0/epcis-context.jsonld"],
                                  "type": "EPCISQueryDocument", "schemaVersion": "2.0",
                                  "creationDate": "2024-05-01T07:00:00.000Z",
                                  "epcisBody": {"queryResults": {"queryName": "all",
                                                                 "resultsBody": {"eventList": events}}}})

    async def feed(self, request: web.Request) -> web.Response:
        return web.Response(text="".join(json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
                                         for d in self.documents))

    @contextlib.asynccontextmanager
    async def running(self):
        app = web.Application()
        app.router.add_post("/epcis/capture", self.capture)
        app.router.add_get("/epcis/events", self.query)
        app.router.add_get("/feed.jsonl", self.feed)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        try:
            yield self
        finally:
            await runner.cleanup()


async def test_epcis_capture_outage_retry_after_and_dead_letter(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EPCIS_TOKEN", "Bearer s3cret")
    server = CaptureServer()
    trace = _config(tmp_path, f"  repo: {{type: epcis, url: 'http://127.0.0.1:{server.port}/epcis', "
                              "auth: '${EPCIS_TOKEN}', retry_min: 0.1s, retry_max: 0.2s}\n")
    state, clock = tmp_path / "state", Clock()
    server.unavailable = 2
    server.refuse = {2}
    async with server.running(), TraceService(trace, state, clock=clock) as svc:
        _lot_a_in_and_one_window(svc, clock)
        with Journal(state / "outbox.db") as cli:
            cli.queue("end", "LOT-A", None, time_ns=T0 + 16 * M)
        clock.now = T0 + 16 * M + S
        svc.step()
        with Journal(state / "outbox.db") as j:
            await until(lambda: j.position("repo") == 3)
    # two 503s (Retry-After: 1 honoured), then seq 1, seq 2 refused -> dead letter, seq 3 delivered
    assert [d["epcisBody"]["eventList"][0]["sluice:seq"] for d in server.documents] == [1, 3]
    assert len(server.requests) == 5
    assert set(server.requests) == {("/epcis/capture", "application/ld+json", "Bearer s3cret")}
    with Journal(state / "outbox.db") as j:
        (letter,) = j.dead_letters()
        assert letter[1:3] == ("repo", 2) and "HTTP 400" in letter[4] and "bad document" in letter[4]
        assert len(j.all_lines()) == 3  # the refused event stays in the local record: the chain is whole
    monkeypatch.setenv("STATE_DIRECTORY", str(state))

    capsys.readouterr()
    assert main(["trace", "deadletters", "-c", str(tmp_path / "config"), "--json"]) == 0
    item = json.loads(capsys.readouterr().out)
    assert item["seq"] == 2 and item["event"]["epcisBody"]["eventList"][0]["sluice:seq"] == 2


async def test_verify_url_reads_an_epcis_query_answer_and_a_jsonl_url(tmp_path, capsys):
    server = CaptureServer()
    trace = _config(tmp_path, f"  repo: {{type: epcis, url: 'http://127.0.0.1:{server.port}/epcis'}}\n")
    state, clock = tmp_path / "state", Clock()
    async with server.running():
        async with TraceService(trace, state, clock=clock) as svc:
            _lot_a_in_and_one_window(svc, clock)
            with Journal(state / "outbox.db") as j:
                await until(lambda: j.position("repo") == 2)

        pem = state / "trace-ed25519.key"
        base = f"http://127.0.0.1:{server.port}"
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["trace", "verify", f"{base}/epcis/events"]) == 0
        assert "OK — 2 events" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["trace", "verify", f"{base}/epcis/events", "--pubkey", str(pem)]) == 0
        assert "OK — 2 events" in (out := capsys.readouterr().out) and "every event's signature valid" in out
        assert await asyncio.to_thread(main, ["trace", "verify", f"{base}/feed.jsonl", "--pubkey", str(pem)]) == 0
        assert "every signature valid" in capsys.readouterr().out
        server.documents[1]["epcisBody"]["eventList"][0]["sensorElementList"][0]["sensorReport"][0]["maxValue"] = 1.0
        assert await asyncio.to_thread(main, ["trace", "verify", f"{base}/epcis/events"]) == 1
        assert "seq 2" in capsys.readouterr().err
        del server.documents[0]
        assert await asyncio.to_thread(main, ["trace", "verify", f"{base}/epcis/events"]) == 1
        assert "expected seq 1" in capsys.readouterr().err


async def test_verify_schema_auto_fetches_and_caches_the_gs1_schema(tmp_path, monkeypatch, capsys):

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sluice-test" / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))

    try:
        cached_schema()
    except OSError as exc:
        unavailable(str(exc))
    trace = _config(tmp_path, "  feed: {type: jsonl, path: out/feed.jsonl}\n")
    (tmp_path / "state" / "out").mkdir(parents=True)
    _docs, feed = await _scenario(trace, tmp_path)

    pem = tmp_path / "state" / "trace-ed25519.key"
    assert main(["trace", "verify", str(feed), "--pubkey", str(pem), "--schema"]) == 0
    out = capsys.readouterr().out
    assert "OK — 5 events" in out and "schema not checked" not in out
