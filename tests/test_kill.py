"""SIGKILL the gateway process at random moments under load: nothing committed is ever lost.

After every kill the outbox file must pass SQLite's integrity check, and every reading that was
committed (it is either still in the outbox, or was acknowledged by the broker and so already
reached the subscriber) must reach the subscriber once the gateway is back. Some kills happen
while the broker is down. SLUICE_SOAK=1 runs 100 kills instead of 20.

The traceability feed runs too, in the same outbox file: `sluice lot move` commands are queued
from this (other) process while the gateway runs; after every kill the trace chain in the outbox
verifies (hash chain and signatures), and at the end every command was applied exactly once and
the JSON Lines feed holds exactly the journal's events, in order, no duplicate, no gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_support import counter_servers, counts_by_device, device_ports, write_config
from gateway.buffer import Outbox
from gateway.trace.journal import Journal
from gateway.trace.seal import load_public_key, verify_lines
from servers import subscriber
from support import STOP, until

LAYOUT = {0: [("a", 1), ("b", 2)], 1: [("c", 1)], 2: [("d", 1)]}
KILLS = 100 if os.environ.get("SLUICE_SOAK") == "1" else 20
TRACE = """\
locations:
  room-a: {read_point: "urn:epc:id:sgln:4012345.00001.0"}
  room-b: {read_point: "urn:epc:id:sgln:4012345.00002.0"}
lots:
  LOT-1: {location: room-a, producer: FARM-1}
sinks:
  feed: {type: jsonl, path: feed.jsonl}
"""


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                env={**os.environ, "STATE_DIRECTORY": str(config.parent / "state")})
    finally:
        out.close()


def _config_start_queued(path: Path) -> bool:
    """The gateway has queued LOT-1's configured placement: moves queued from now on come after it."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        return "trace_commands" in tables and bool(
            conn.execute("SELECT count(*) FROM trace_commands WHERE source='config'").fetchone()[0])
    finally:
        conn.close()


def _committed(path: Path) -> dict[str, set[int]]:
    """Counter values in the outbox right now (committed, not yet acknowledged)."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    out: dict[str, set[int]] = {}
    with Outbox(path, ["broker"]) as outbox:
        for entry in outbox.fetch("broker", 10**9, 10**12):
            out.setdefault(entry.reading.device, set()).add(int(entry.reading.fields["count"]))
    return out


@pytest.mark.slow
async def test_sigkill_loses_nothing_committed(tmp_path: Path, mosquitto, close_default_executor) -> None:
    rng = random.Random(os.environ.get("SLUICE_SEED", "20261128"))
    servers = counter_servers(LAYOUT)
    outbox_path = tmp_path / "outbox.db"
    log = tmp_path / "gateway.log"
    committed: dict[str, set[int]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        config = write_config(tmp_path / "config", devices=device_ports(LAYOUT, servers),
                              broker_port=mosquitto.port, interval="50ms", outbox=outbox_path)
        (config / "trace.yaml").write_text(TRACE)
        state = config.parent / "state"
        moves: list[int] = []  # trace command ids queued, in order
        collector = await stack.enter_async_context(
            subscriber(mosquitto.host, mosquitto.port, "sluice/lab/gw-test/#", client_id="kill-watcher"))
        for cycle in range(KILLS):
            broker_down = cycle % 4 == 2  # every fourth cycle runs (and dies) with the broker stopped
            if broker_down:
                await asyncio.to_thread(mosquitto.stop)
            proc = _start(config, log)
            try:
                first = rng.uniform(0.4, 1.2)
                await asyncio.sleep(first)
                if _config_start_queued(outbox_path):  # as `sluice lot move` does, while the gateway commits
                    with Journal(outbox_path) as cli:
                        moves.append(cli.queue("move", "LOT-1", "room-b" if len(moves) % 2 == 0 else "room-a"))
                await asyncio.sleep(rng.uniform(0.8, 2.5) - first)
            finally:
                proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
            if broker_down:
                await asyncio.to_thread(mosquitto.start)
            for device, values in _committed(outbox_path).items():
                committed.setdefault(device, set()).update(values)
            if (state / "trace-ed25519.key").exists():  # the chain in the outbox survived the kill intact
                with Journal(outbox_path) as j:
                    lines = j.all_lines()
                assert verify_lines(lines, load_public_key(state / "trace-ed25519.key")) == (len(lines), None)
        # One last clean run delivers whatever the kills left behind.
        runs_before = log.read_text().count(" running: ")
        proc = _start(config, log)
        try:
            # SIGTERM only once it is up: before that it is simply fatal
            await until(lambda: log.read_text().count(" running: ") > runs_before, what="the last run up")
            def delivered_all(_messages: object) -> bool:
                got = counts_by_device([m.payload for m in collector.messages if "/status" not in m.topic])
                return all(values <= set(got.get(device, ())) for device, values in committed.items())
            await collector.wait_until(delivered_all, timeout=90)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, STOP) == 0, log.read_text()[-3000:]
    received = counts_by_device([m.payload for m in collector.messages if "/status" not in m.topic])
    assert committed, "no reading was ever seen committed: the test did not exercise anything"
    assert sum(len(v) for v in committed.values()) > KILLS
    for device, values in received.items():
        seen = set(values)
        # Values read but killed before their commit may be missing: at most a handful per kill.
        missing = set(range(1, max(seen) + 1)) - seen
        assert len(missing) <= 3 * (KILLS + 1), f"{device}: {len(missing)} values missing"
    for device, values in committed.items():
        assert values <= set(received[device]), f"{device}: committed readings never delivered"
    assert "Traceback" not in log.read_text()
    # the trace feed: every move queued was applied once, and delivered once, in order
    assert len(moves) >= KILLS // 2, "too few trace commands were queued to exercise anything"
    with Journal(outbox_path) as j:
        assert [j.command_status(cid) for cid in moves] == ["done"] * len(moves)
        lines = j.all_lines()
    events = [json.loads(line)["epcisBody"]["eventList"][0] for line in lines]
    # the configured placement, then per move: leave the old room, enter the new one
    assert [(e["sluice:reason"], e["sluice:location"]) for e in events] == [("enter", "room-a")] + [
        pair for i in range(len(moves))
        for pair in ((("leave", "room-a"), ("enter", "room-b")) if i % 2 == 0 else (("leave", "room-b"), ("enter", "room-a")))]
    assert verify_lines(lines, load_public_key(state / "trace-ed25519.key")) == (len(lines), None)
    assert (state / "feed.jsonl").read_text().splitlines() == lines
