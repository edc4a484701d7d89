"""The trace feed's figures in the gateway's /metrics (parsed with prometheus_client) and in
`sluice status`: events emitted, chain head, last event time, per-sink delivered/pending/dead."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_health import _running
from test_trace import Clock
from test_trace_sinks import CaptureServer, _config, _lot_a_in_and_one_window

from e2e_support import write_config
from gateway.cli import commands as cli
from gateway.app import Gateway
from gateway.config import load_config
from gateway.health import fetch
from gateway.trace.journal import Journal
from gateway.trace.service import METRICS, TraceService
from servers import free_port
from support import until

pytestmark = pytest.mark.usefixtures("close_default_executor")


@contextlib.asynccontextmanager
async def _gateway(tmp_path: Path, port: int):
    cfg = write_config(tmp_path / "gw", devices={}, broker_port=None)
    data = yaml.safe_load((cfg / "gateway.yaml").read_text())
    data["health"] = {"listen": f"127.0.0.1:{port}"}
    (cfg / "gateway.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    async with _running(Gateway(load_config(cfg))) as gateway:
        yield gateway


async def test_trace_figures_are_in_metrics_and_status(tmp_path, capsys):
    server = CaptureServer()
    server.refuse = {2}
    trace = _config(tmp_path, "  feed: {type: jsonl, path: feed.jsonl}\n"
                              "  stuck: {type: jsonl, path: missing-dir/feed.jsonl}\n"
                              f"  repo: {{type: epcis, url: 'http://127.0.0.1:{server.port}/epcis'}}\n")
    state, clock, port = tmp_path / "state", Clock(), free_port()
    async with server.running(), _gateway(tmp_path, port), TraceService(trace, state, clock=clock) as svc:
        _lot_a_in_and_one_window(svc, clock)
        with Journal(state / "outbox.db") as j:
            await until(lambda: j.position("repo") == 2)
        code, body = await asyncio.to_thread(fetch, "127.0.0.1", port, "/metrics")
        assert code == 200
        samples = [s for f in text_string_to_metric_families(body) for s in f.samples]
        names = {s.name for s in samples}
        assert not [n for n in METRICS if n not in names], body
        value = {(s.name, s.labels.get("sink")): s.value for s in samples}
        assert value[("sluice_trace_events_total", None)] == 2
        assert value[("sluice_trace_chain_seq", None)] == 2
        assert value[("sluice_trace_last_event_timestamp_seconds", None)] == clock.now / 1e9
        assert value[("sluice_trace_late_readings_total", None)] == 0
        assert [value[(f"sluice_trace_sink_{m}", "feed")] for m in ("delivered_total", "pending_events",
                                                                     "dead_letters_total")] == [2, 0, 0]
        assert [value[(f"sluice_trace_sink_{m}", "stuck")] for m in ("delivered_total", "pending_events",
                                                                      "dead_letters_total")] == [0, 2, 0]
        assert [value[(f"sluice_trace_sink_{m}", "repo")] for m in ("delivered_total", "pending_events",
                                                                     "dead_letters_total")] == [1, 0, 1]
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["status", "--url", f"127.0.0.1:{port}"]) == 0
        out = capsys.readouterr().out
        assert "trace: chain at seq 2" in out and "2 events this run" in out
        rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in
                (["feed"], ["stuck"], ["repo"])}
        assert rows == {"feed": ["2", "0", "0"], "stuck": ["0", "2", "0"], "repo": ["1", "0", "1"]}, out
    code, body = await _metrics_after_stop(tmp_path)
    assert "sluice_trace_" not in body  # the feed's provider is removed when it stops


async def _metrics_after_stop(tmp_path: Path) -> tuple[int, str]:
    port = free_port()
    async with _gateway(tmp_path / "again", port):
        return await asyncio.to_thread(fetch, "127.0.0.1", port, "/metrics")
