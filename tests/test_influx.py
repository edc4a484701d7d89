"""The direct InfluxDB sink with real servers: influxd 1.x (v1 API) read back with InfluxQL,
VictoriaMetrics (v2 API through influxdb-client) read back with its export API, dead letters for
data the server refuses, an influxd outage, and 429/503 with Retry-After from a tiny test server."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from servers import Influxd, VictoriaMetrics
from support import DEADLINE, STOP, until

from gateway.outbox import Outbox
from gateway.config import InfluxSinkConfig
import gateway.sinks.engine
from gateway.sinks.influx import InfluxSink, WriteOutcome, classify, retry_after_seconds
from gateway.sinks.readings import Forwarder
from gateway.reading import UNCERTAIN, Reading
import yaml
import gzip
from gateway.sinks.engine import isolate_refused
from gateway.config import load_config
from gateway.app import Gateway
from e2e_support import counter_servers, device_ports, write_config

pytestmark = pytest.mark.usefixtures("close_default_executor")  # asyncio.to_thread stops/starts influxd

T0 = 1_760_000_000_000_000_000
IDENT = SimpleNamespace(gateway_id="gw1", site="farm")


def sink_config(url: str, **overrides: Any) -> InfluxSinkConfig:
    base: dict[str, Any] = {"type": "influxdb", "url": url, "api": "v1", "database": "sluice",
                            "retry_min": "20ms", "retry_max": "100ms", "timeout": "5s",
                            "batch": {"max_readings": 50, "linger": "0ms"}}
    return InfluxSinkConfig.model_validate(base | overrides)


@contextlib.asynccontextmanager
async def forwarding(outbox: Outbox, cfg: InfluxSinkConfig) -> AsyncIterator[tuple[Forwarder, InfluxSink]]:
    async with InfluxSink("db", cfg) as sink:
        fwd = Forwarder("db", outbox, sink, cfg, IDENT)
        task = asyncio.create_task(fwd.run(), name="forward[db]")
        try:
            yield fwd, sink
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
def outbox(tmp_path: Path):  # type: ignore[no-untyped-def]
    with Outbox(tmp_path / "outbox.db", ["db"], synchronous="normal") as box:
        yield box


# --------------------------------------------------------------------------- what must survive the trip
ESCAPES: list[tuple[str, str, dict[str, str], dict[str, Any]]] = [
    # (device, measurement, extra tags, fields)
    ("温室-1号", "env", {"room": "东 区"}, {"temperature": 21.5, "humidity": 40, "ok": True}),
    ("pump 2", "env room", {"loc": "a,b", "eq": "x=y"}, {"temp C": 0.1, "a,b": 1 / 3, "k=v": -1e300}),
    ("C:\\dev", "m,1", {"path": "C:\\temp\\x"}, {"s": 'say "hi", a=b \\ back\\slash', "n": 2**63 - 1}),
    ("冷库", "env", {"note": "温度"}, {"s": "line1\nline2\rend", "neg": -(2**63), "f": 5e-324}),
    ("dev=1", "env", {}, {"s": "", "zero": 0.0, "t": False, "nan": math.nan}),
    ("dev-q", "env", {}, {"v": 3.0}),  # quality uncertain: a `quality` string field
]


def escaping_readings(rounds: int) -> list[Reading]:
    out = []
    for i in range(rounds):
        for n, (device, measurement, tags, fields) in enumerate(ESCAPES):
            values = {k: (v + i if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**62 else v)
                      for k, v in fields.items()}
            quality = UNCERTAIN if device == "dev-q" else "good"
            out.append(Reading(device, T0 + i * 1_000_000 + n, values, {"site": "farm", "device": device, **tags},
                               quality, measurement))
    return out


def expected_row(r: Reading) -> dict[str, Any]:
    """What InfluxQL's SELECT * gives back for a reading (see gateway/encode.py for the rules)."""
    row: dict[str, Any] = {"time": r.time_ns}
    row.update({k: v for k, v in r.tags.items() if v})
    for name, value in r.fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            continue  # NaN/inf cannot be written: left out
        if isinstance(value, str):
            value = value.replace("\n", "\\n").replace("\r", "\\r")  # a newline arrives as backslash-n
        row[name] = value
    if r.quality != "good":
        row["quality"] = r.quality
    return row


def read_back(server: Influxd, measurements: set[str]) -> list[dict[str, Any]]:
    rows = []
    for measurement in sorted(measurements):
        quoted = measurement.replace("\\", "\\\\").replace('"', '\\"')
        for series in server.query(f'SELECT * FROM "{quoted}"', "sluice"):
            columns = series["columns"]
            for values in series["values"]:  # type: ignore[union-attr]
                rows.append({c: v for c, v in zip(columns, values) if v is not None})  # type: ignore[call-overload]
    return rows


def same(got: dict[str, Any], want: dict[str, Any]) -> bool:
    """Equal values of equal kinds (JSON has one number type: 3.0 comes back as 3)."""
    if got.keys() != want.keys():
        return False
    for key, w in want.items():
        g = got[key]
        if isinstance(w, bool) or isinstance(w, str):
            if g != w or type(g) is not type(w):
                return False
        elif g != w:
            return False
    return True


async def test_every_reading_read_back_exactly_from_influxd(influxd: Influxd, outbox: Outbox) -> None:
    sent = escaping_readings(20)
    async with forwarding(outbox, sink_config(influxd.url)) as (fwd, _sink):
        for i in range(0, len(sent), 25):  # as the committer does: append, then notify
            outbox.append(sent[i:i + 25])
            fwd.notify()
        await until(lambda: outbox.stats().pending["db"] == 0)
    assert fwd.stats.delivered == len(sent) and fwd.stats.dead_lettered == 0
    rows = read_back(influxd, {r.measurement for r in sent})
    by_time = {row["time"]: row for row in rows}
    assert len(rows) == len(by_time) == len(sent)
    for reading in sent:
        want = expected_row(reading)
        got = by_time[reading.time_ns]
        assert same(got, want), f"{reading.device}: sent {want}\n got {got}"


async def test_v2_api_through_influxdb_client_to_victoria_metrics(victoria_metrics: VictoriaMetrics,
                                                                  outbox: Outbox) -> None:
    # VictoriaMetrics keeps numbers (as <measurement>_<field>, milliseconds) and ignores bucket/org.
    sent = [Reading(dev, T0 + i * 1_000_000_000, {"t": 20.0 + i / 8, "n": i, "on": i % 2 == 0},
                    {"site": "farm", "device": dev, "room": "东 区"}, measurement="env")
            for i in range(40) for dev in ("温室-1号", "pump 2")]
    cfg = sink_config(victoria_metrics.url, api="v2", database=None, bucket="sluice", org="farm", token="t0ken")
    async with forwarding(outbox, cfg) as (fwd, sink):
        outbox.append(sent)
        fwd.notify()
        await until(lambda: outbox.stats().pending["db"] == 0)
    assert sink.requests >= 1 and fwd.stats.delivered == len(sent)
    got: dict[tuple[str, str], dict[int, float]] = {}
    for series in victoria_metrics.export('{__name__=~"env_.*"}'):
        metric: dict[str, str] = series["metric"]  # type: ignore[assignment]
        assert metric["room"] == "东 区" and metric["site"] == "farm"
        got[(metric["__name__"], metric["device"])] = dict(zip(series["timestamps"], series["values"]))  # type: ignore[call-overload]
    for r in sent:
        ms = r.time_ns // 1_000_000
        assert got[("env_t", r.device)][ms] == r.fields["t"]
        assert got[("env_n", r.device)][ms] == r.fields["n"]
        assert got[("env_on", r.device)][ms] == (1 if r.fields["on"] else 0)


async def test_only_the_refused_readings_of_a_batch_become_a_dead_letter(influxd: Influxd, outbox: Outbox) -> None:
    """One batch of 20 readings, 3 of them with a field type conflict (v is a float in this series;
    these send a string and a bool): real influxd answers "partial write" for the whole request; the
    forwarder splits until the three stand alone, they are the dead letter, the 17 others are stored."""
    bad_at = {3, 11, 19}
    first = Reading("boiler", T0, {"v": 0.5}, {"device": "boiler"}, measurement="m")
    batch = [Reading("boiler", T0 + i * 1000, {"v": ("oops" if i == 3 else i % 2 == 0) if i in bad_at else i / 4},
                     {"device": "boiler"}, measurement="m") for i in range(1, 21)]
    async with forwarding(outbox, sink_config(influxd.url)) as (fwd, sink):
        outbox.append([first])
        fwd.notify()
        await until(lambda: outbox.stats().pending["db"] == 0)
        outbox.append(batch)
        fwd.notify()
        await until(lambda: outbox.stats().pending["db"] == 0)
    (letter,) = outbox.dead_letters(with_readings=True)
    assert list(letter.readings) == [batch[i - 1] for i in sorted(bad_at)]
    assert "type conflict" in letter.message
    assert fwd.stats.dead_lettered == 3 and fwd.stats.delivered == 18
    rows = read_back(influxd, {"m"})
    assert [row["time"] for row in rows] == [T0] + [T0 + i * 1000 for i in range(1, 21) if i not in bad_at]
    assert [row["v"] for row in rows[1:]] == [i / 4 for i in range(1, 21) if i not in bad_at]
    assert sink.requests + sink.failures < 2 * len(batch)  # bisection, not one request per reading


async def test_isolate_refused_finds_every_refused_item_and_keeps_to_its_budget() -> None:
    written: list[int] = []
    requests = 0

    async def send(part: Any) -> str | None:
        nonlocal requests
        requests += 1
        bad = [i for i in part if i % 17 == 5]
        if bad:
            return f"bad {bad[0]}"  # refused as data, with the far end's reason
        written.extend(part)
        return None

    items = list(range(100))
    refused = await isolate_refused(items, "bad", send)
    assert [part for part, _m in refused] == [[5], [22], [39], [56], [73], [90]]
    assert [m for _p, m in refused] == [f"bad {i}" for i in (5, 22, 39, 56, 73, 90)]
    assert sorted(written) == [i for i in items if i % 17 != 5]
    written.clear()
    refused = await isolate_refused(items, "bad", send, budget=4)  # then refused parts stay whole
    assert sorted([i for part, _m in refused for i in part] + written) == items
    assert all(i % 17 != 5 for i in written) and len(refused) < 6


async def test_type_conflict_goes_to_a_dead_letter_and_the_queue_flows_on(influxd: Influxd, outbox: Outbox,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Dead letters marked for re-sending are looked for every 2 s, and an idle forwarder looks at the
    # outbox every 5 s (another process marks them, nobody wakes it): 0.1 s each here.
    monkeypatch.setattr(gateway.sinks.engine, "RESEND_CHECK_INTERVAL", 0.1)
    monkeypatch.setattr(gateway.sinks.engine, "RECHECK_INTERVAL", 0.1)

    def batch(start: int, value: Any) -> list[Reading]:
        return [Reading("boiler", T0 + (start + i) * 1000, {"v": value}, {"device": "boiler"}, measurement="m")
                for i in range(5)]

    async with forwarding(outbox, sink_config(influxd.url)) as (fwd, _sink):
        for start, value in ((0, 1.5), (10, "oops"), (20, 2.5)):  # v is a float; then a string
            outbox.append(batch(start, value))
            fwd.notify()
            await until(lambda: outbox.stats().pending["db"] == 0)
        (letter,) = outbox.dead_letters(with_readings=True)
        assert letter.count == 5 and list(letter.readings) == batch(10, "oops")
        assert "type conflict" in letter.message and outbox.stats().dead_letters == 1
        assert fwd.stats.dead_lettered == 5 and fwd.stats.delivered == 10
        times = [row["time"] for row in read_back(influxd, {"m"})]
        assert times == [T0 + i * 1000 for i in (*range(5), *range(20, 25))]

        # Re-sent as is: refused again, stays (attempt 2). After the conflict is gone, delivered.
        outbox.mark_resend([letter.id])
        fwd.notify()
        await until(lambda: outbox.dead_letters()[0].attempts == 2)
        assert not outbox.dead_letters()[0].resend
        await asyncio.to_thread(influxd.query, 'DROP MEASUREMENT "m"', "sluice")
        outbox.mark_resend()
        fwd.notify()
        await until(lambda: not outbox.dead_letters())
    assert fwd.stats.resent == 5
    assert [row["v"] for row in read_back(influxd, {"m"})] == ["oops"] * 5


async def test_influxd_stopped_for_a_while_loses_nothing(influxd: Influxd, outbox: Outbox) -> None:
    before, during, after = (escaping_readings(30)[i * 60:(i + 1) * 60] for i in range(3))
    async with forwarding(outbox, sink_config(influxd.url)) as (fwd, sink):
        outbox.append(before)
        fwd.notify()
        await until(lambda: outbox.stats().pending["db"] == 0)
        await asyncio.to_thread(influxd.stop)
        for i in range(0, len(during), 20):
            outbox.append(during[i:i + 20])
            fwd.notify()
            await asyncio.sleep(0.05)  # readings arrive over time while the server is away
        await until(lambda: fwd.stats.retries >= 3)  # it kept trying, and acknowledged nothing
        assert outbox.stats().pending["db"] == len(during) and sink.last_error is not None
        await asyncio.to_thread(influxd.start)
        outbox.append(after)
        fwd.notify()
        await until(lambda: outbox.stats().pending["db"] == 0, timeout=30)
    everything = before + during + after
    rows = {row["time"]: row for row in read_back(influxd, {r.measurement for r in everything})}
    assert len(rows) == len(everything)
    for reading in everything:
        assert same(rows[reading.time_ns], expected_row(reading))
    assert fwd.stats.dead_lettered == 0


# --------------------------------------------------------------------------- 429/503 + Retry-After
class Flaky:
    """A tiny /write endpoint: answers ``answers`` in turn (status, headers), then 204; keeps bodies."""

    def __init__(self, answers: list[tuple[int, dict[str, str]]]) -> None:
        self.answers = list(answers)
        self.bodies: list[bytes] = []
        self.encodings: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.encodings.append(request.headers.get("Content-Encoding", ""))
        self.bodies.append(await request.read())  # aiohttp has undone the gzip
        if self.answers:
            status, headers = self.answers.pop(0)
            return web.json_response({"error": "busy"}, status=status, headers=headers)
        return web.Response(status=204)

    async def __aenter__(self) -> Flaky:
        app = web.Application()
        app.router.add_post("/write", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.mark.parametrize("status", [429, 503])
async def test_busy_server_retry_after_is_honoured(status: int, outbox: Outbox) -> None:
    async with Flaky([(status, {"Retry-After": "1"}), (status, {})]) as server:
        # retry_max is far below Retry-After: only the header can explain a longer wait.
        async with forwarding(outbox, sink_config(server.url, retry_min="10ms", retry_max="20ms")) as (fwd, sink):
            outbox.append(escaping_readings(2))
            fwd.notify()
            await until(lambda: len(server.bodies) == 1)
            loop = asyncio.get_running_loop()
            await until(lambda: sink.last_error is not None)
            assert sink.retry_at - loop.time() > 0.5  # the server's 1 s, not our 20 ms backoff
            assert not sink.connected
            await until(lambda: outbox.stats().pending["db"] == 0)
    assert len(server.bodies) == 3 and server.bodies[0] == server.bodies[1] == server.bodies[2]
    assert server.encodings == ["gzip"] * 3
    assert fwd.stats.retries == 2 and fwd.stats.dead_lettered == 0


@pytest.mark.parametrize(("status", "message", "outcome"), [
    (400, 'partial write: field type conflict: input field "v" on measurement "m" is type string', WriteOutcome.REJECT),
    (400, "unable to parse 'm v=': missing field value", WriteOutcome.REJECT),
    (422, "failure writing points to database: partial write: points beyond retention policy dropped=1",
     WriteOutcome.REJECT),
    (413, "Request Entity Too Large", WriteOutcome.REJECT),
    (400, "organization name \"x\" not found", WriteOutcome.RETRY),  # configuration, not data
    (401, "unable to parse authentication credentials", WriteOutcome.RETRY),
    (404, "database not found: \"sluice\"", WriteOutcome.RETRY),
    (429, "too many requests", WriteOutcome.RETRY),
    (500, "timeout", WriteOutcome.RETRY),
    (503, "", WriteOutcome.RETRY),
])
def test_what_is_refused_data_and_what_is_retried(status: int, message: str, outcome: str) -> None:
    assert classify(status, message) == outcome


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("7", now) == 7.0
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:30 GMT", now) == 10.0
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:00 GMT", now) == 0.0  # in the past
    assert retry_after_seconds("999999", now) == 3600.0
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None) is None


# --------------------------------------------------------------------------- the whole gateway
async def test_gateway_with_an_influxdb_sink_writes_every_counter_value(tmp_path: Path, influxd: Influxd) -> None:

    layout = {0: [("tank-a", 1), ("tank-b", 2)]}
    servers = counter_servers(layout)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        config_dir = write_config(tmp_path / "config", devices=device_ports(layout, servers), broker_port=None)
        gateway_yaml = config_dir / "gateway.yaml"
        doc = yaml.safe_load(gateway_yaml.read_text())
        doc["sinks"]["db"] = {"type": "influxdb", "url": influxd.url, "api": "v1", "database": "sluice",
                              "batch": {"linger": "50ms"}}
        doc["health"] = {"enabled": False}
        gateway_yaml.write_text(yaml.safe_dump(doc, allow_unicode=True))
        stop = asyncio.Event()
        gateway = Gateway(load_config(config_dir))
        task = asyncio.create_task(gateway.run(stop), name="gateway-under-test")

        def counts() -> dict[str, list[int]]:
            out: dict[str, list[int]] = {}
            for series in influxd.query('SELECT "count" FROM "counters" GROUP BY "device"', "sluice"):
                out[series["tags"]["device"]] = [v[1] for v in series["values"]]  # type: ignore[index]
            return out

        try:
            await asyncio.wait_for(gateway.ready.wait(), DEADLINE)
            await until(lambda: len(counts()) == 2 and all(len(v) >= 10 for v in counts().values()), timeout=30)
        finally:
            stop.set()
            await asyncio.wait_for(task, STOP)
    final = counts()
    for device, values in final.items():
        assert values == list(range(1, len(values) + 1)), f"{device}: gap or duplicate in {values}"
    served = sum(s.stats.count(function=3) for s in servers)
    assert gateway.final_stats is not None
    # Served but not stored: rows still in the outbox, or the one transaction per connection that the
    # stop cancelled in flight (the request was served, its reply never read: no reading to lose).
    assert sum(map(len, final.values())) <= served <= (sum(map(len, final.values())) + gateway.final_stats.rows
                                                       + len(servers))


async def test_a_batch_too_large_for_the_server_is_taken_in_halves(outbox: Outbox) -> None:
    """413 for the whole batch, 2xx for its halves: nothing becomes a dead letter."""
    async with Flaky([(413, {})]) as server:
        async with forwarding(outbox, sink_config(server.url)) as (fwd, _sink):
            outbox.append(escaping_readings(2))
            fwd.notify()
            await until(lambda: outbox.stats().pending["db"] == 0)
    assert len(server.bodies) == 3 and server.bodies[0] == server.bodies[1] + server.bodies[2]
    assert not outbox.dead_letters() and fwd.stats.dead_lettered == 0
    assert fwd.stats.delivered == len(escaping_readings(2))


async def test_v2_bodies_are_gzipped_at_our_level_not_the_clients_level_9() -> None:
    cfg = sink_config("http://127.0.0.1:9", api="v2", database=None, bucket="b", org="o", token="t")
    body = b"m,device=a v=1.5 1\n" * 100
    async with InfluxSink("db", cfg) as sink:
        conf = sink._client.conf  # type: ignore[union-attr]  # noqa: SLF001 - the client's gzip level, which no public API shows
        packed = conf.update_request_body("/api/v2/write", body)
        assert gzip.decompress(packed) == body and packed[8] == 4  # XFL 4: the fastest level
        assert conf.update_request_body("/api/v2/query", "q") == "q"
