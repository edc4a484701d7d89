"""Clock sanity: readings taken while the clock is not synchronised are flagged; jumps are detected."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import re
import sqlite3
import json

import pytest
import yaml
from pathlib import Path

from e2e_support import counter_servers, device_ports, write_config
from gateway.app import Gateway
from gateway.clock import ClockWatch, kernel_clock_synced
from gateway.config import load_config
from gateway.reading import CLOCK_UNSYNCED, GOOD
from support import DEADLINE, STOP
from gateway.outbox import Outbox
from gateway.encode import InfluxEncoder, JsonEncoder
from gateway.cloud.lineproto import json_to_lines, parse_lines
from gateway.reading import UNCERTAIN, quality, quality_flags


def test_kernel_state_is_readable() -> None:
    assert kernel_clock_synced() in (True, False, None)


def test_jumps_are_detected_and_counted(caplog) -> None:
    now = {"wall": 1000.0, "mono": 5.0}
    watch = ClockWatch(check_sync=lambda: True, wall=lambda: now["wall"], mono=lambda: now["mono"])
    watch.poll()
    now["wall"] += 1.0
    now["mono"] += 1.0
    watch.poll()
    assert watch.jumps == 0
    now["wall"] += 3600.0 + 1.0  # NTP corrected a clock that was an hour behind
    now["mono"] += 1.0
    watch.poll()
    now["wall"] -= 30.0
    watch.poll()
    assert watch.jumps == 2 and watch.last_jump == -30.0
    assert "jumped +3600.0 s" in caplog.text and "jumped -30.0 s" in caplog.text


def test_sync_changes_are_logged_once_each(caplog) -> None:
    caplog.set_level(logging.INFO)
    states = iter([False, False, False, True, True])
    watch = ClockWatch(check_sync=lambda: next(states))
    for _ in range(5):
        watch.poll()
    assert caplog.text.count("not synchronised") == 1
    assert caplog.text.count("is synchronised") == 1
    assert watch.synced is True


async def test_readings_are_flagged_until_the_clock_is_synchronised(tmp_path: Path) -> None:
    layout = {0: [("tank-a", 1)]}
    servers = counter_servers(layout)
    synced = {"now": False}
    async with contextlib.AsyncExitStack() as stack:
        for s in servers:
            await stack.enter_async_context(s)
        cfg = write_config(tmp_path / "cfg", devices=device_ports(layout, servers), broker_port=None)
        text = (cfg / "gateway.yaml").read_text()
        (cfg / "gateway.yaml").write_text(re.sub(r"(?m)^health:.*\n(  .*\n)*", "health: {enabled: false}\n", text))
        gw = Gateway(load_config(cfg), clock=ClockWatch(check_sync=lambda: synced["now"], period=0.2))
        seen: list[str] = []
        changed = asyncio.Event()

        def observe(reading) -> None:
            seen.append(reading.quality)
            changed.set()

        async def until(condition) -> None:
            while not condition():
                changed.clear()
                await changed.wait()

        gw.on_reading = observe
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop), name="gateway-under-test")
        try:
            async with asyncio.timeout(DEADLINE):
                await until(lambda: len(seen) >= 3)
                synced["now"] = True
                await until(lambda: GOOD in seen)
        finally:
            stop.set()
            await asyncio.wait_for(task, STOP)
    with contextlib.closing(sqlite3.connect(tmp_path / "cfg" / "outbox.db")) as db:
        stored = [marshal.loads(row[0])[1] for row in db.execute("SELECT data FROM readings ORDER BY seq")]
    assert stored == seen
    first_good = stored.index(GOOD)
    assert first_good >= 3 and set(stored[:first_good]) == {CLOCK_UNSYNCED}
    assert set(stored[first_good:]) == {GOOD}


async def test_an_out_of_range_value_on_an_unsynchronised_clock_keeps_both_flags_end_to_end(tmp_path: Path) -> None:
    """A broken probe on a box with no RTC: `uncertain` (value outside its valid range) and
    `clock_unsynced` both survive the outbox, the line-protocol and JSON encoders and the ingest's checker."""

    layout = {0: [("probe", 1)]}
    servers = counter_servers(layout)
    async with contextlib.AsyncExitStack() as stack:
        for s in servers:
            await stack.enter_async_context(s)
        cfg = write_config(tmp_path / "cfg", devices=device_ports(layout, servers), broker_port=None)
        profile = cfg / "profiles" / "counter.yaml"  # the sine runs -5..5: every value is out of this range
        profile.write_text(profile.read_text().replace("unit: CEL,", "unit: CEL, valid: {min: 10, max: 20},"))
        data = yaml.safe_load((cfg / "gateway.yaml").read_text())
        data["health"] = {"enabled": False}
        (cfg / "gateway.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        gw = Gateway(load_config(cfg), clock=ClockWatch(check_sync=lambda: False))
        seen: list[str] = []
        got = asyncio.Event()

        def observe(reading) -> None:
            seen.append(reading.quality)
            got.set()

        gw.on_reading = observe
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop), name="gateway-under-test")
        try:
            async with asyncio.timeout(20):
                while len(seen) < 2:
                    got.clear()
                    await got.wait()
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
    both = quality(CLOCK_UNSYNCED, UNCERTAIN)
    assert both == "clock_unsynced,uncertain" and quality_flags(both) == {CLOCK_UNSYNCED, UNCERTAIN}
    assert set(seen) == {both}
    with Outbox(tmp_path / "cfg" / "outbox.db", ["x"]) as outbox:
        entries = outbox.fetch("x", 10, 1 << 20)
    assert entries and {e.reading.quality for e in entries} == {both}
    reading = entries[0].reading
    assert 'quality="clock_unsynced,uncertain"' in InfluxEncoder().line(reading)
    payload = JsonEncoder("gw-test", "lab").encode([reading])
    assert json.loads(payload)["readings"][0]["quality"] == both
    assert 'quality="clock_unsynced,uncertain"' in json_to_lines(payload, InfluxEncoder()).data.decode()
    parse_lines(InfluxEncoder().encode([reading]))  # the ingest's strict checker accepts the line
    # a consumer may write the flags in any order; an unknown flag is refused with its name
    swapped = payload.replace(b'"clock_unsynced,uncertain"', b'"uncertain, clock_unsynced"')
    assert 'quality="clock_unsynced,uncertain"' in json_to_lines(swapped, InfluxEncoder()).data.decode()
    with pytest.raises(ValueError, match="unknown quality flag"):
        json_to_lines(payload.replace(b'"clock_unsynced,uncertain"', b'"smoky"'), InfluxEncoder())
