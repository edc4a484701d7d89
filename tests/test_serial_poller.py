"""The serial-sensor poller on real pseudo-terminal pairs, against the simulator: every sensor kind
end to end into Readings (and once into a real Outbox), faults that must not poison the next
reading, silence and a port that disappears, each logged once per state change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import serial

from drivers.serial.poller import SerialSensorPoller, make_pollers
from gateway.committer import Committer
from gateway.outbox import Outbox
from gateway.config import load_config
from gateway.driver import Device
from simulators.serial_sensor import SerialSensorSim
from support import STOP, running, until

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "config" / "profiles"
LOGGER = "drivers.serial.poller"


def device(tmp_path: Path, profile: str, **settings: str) -> Device:
    """A device for ``profile`` on the port ``tmp_path/tty`` (a symlink the test points at a pty)."""
    for sub in ("profiles", "devices"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    (tmp_path / "gateway.yaml").write_text("gateway: {id: gw1, site: farm}\n")
    shutil.copy(PROFILES / f"{profile}.yaml", tmp_path / "profiles")
    lines = {"id": "dev1", "protocol": "serial", "profile": profile, "port": str(tmp_path / "tty"),
             "interval": "200ms", "timeout": "1s", "backoff_max": "500ms", **settings}
    (tmp_path / "devices" / "dev1.yaml").write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    return load_config(tmp_path).devices[0]


def plug(tmp_path: Path, sim: SerialSensorSim) -> None:
    link = tmp_path / "tty"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(sim.path)


NMEA_VALUES = {"latitude": 52.1, "longitude": -5.25, "altitude": 3.0, "speed_knots": 1.0, "course": 90.0,
               "fix_quality": 1, "satellites": 7, "hdop": 1.1}
KINDS = [
    ("serial-th-stream", {"temperature": 4.5, "humidity": 80.0}, {"temperature": 4.5, "humidity": 80.0}),
    ("serial-co2-request", {"co2": 420, "temperature": 21.5}, {"co2": 420, "temperature": 21.5}),
    ("gps-nmea", NMEA_VALUES, {"latitude": 52.1, "longitude": -5.25, "altitude": 3.0, "speed_kmh": 1.852,
                               "course": 90.0, "fix_quality": 1, "satellites": 7, "hdop": 1.1}),
    ("scale-continuous", {"weight": 7.25, "stable": True}, {"weight": 7.25, "stable": True, "net": False,
                                                            "unit": "kg", "overload": False}),
    ("pms5003", {"pm1_0": 3, "pm2_5": 12, "pm10": 20, "particles_0_3um": 1500},
     {"pm1_0": 3, "pm2_5": 12, "pm10": 20, "particles_0_3um": 1500}),
    ("barcode-reader", {"code": "4006381333931"}, {"code": "4006381333931"}),
    ("rfid-em4100", {"code": "0F00A1B2C3D4"}, {"code": "0F00A1B2C3D4"}),
]


@pytest.mark.parametrize(("profile", "values", "expected"), KINDS, ids=[k[0] for k in KINDS])
async def test_each_kind_end_to_end(tmp_path: Path, profile: str, values: dict[str, Any],
                                    expected: dict[str, Any]) -> None:
    dev = device(tmp_path, profile)
    async with SerialSensorSim(dev.profile, every=0.05, values=values) as sim:
        plug(tmp_path, sim)
        [poller] = make_pollers([dev])
        async with running(poller) as readings:
            await until(lambda: len(readings) >= 2)
    reading = readings[-1]
    assert reading.fields == pytest.approx(expected) if "code" not in expected else reading.fields == expected
    assert reading.device == "dev1" and reading.quality == "good" and reading.tags["profile"] == profile
    assert abs(reading.time_ns - time.time_ns()) < 5e9
    if "code" in expected:  # every scan is its own reading, not one per interval
        assert len(readings) >= 2 and readings[-1].time_ns != readings[-2].time_ns
    assert not poller.status["dev1"].errors


async def test_streaming_rate_is_one_reading_per_interval(tmp_path: Path) -> None:
    dev = device(tmp_path, "serial-th-stream", interval="300ms")
    async with SerialSensorSim(dev.profile, every=0.03) as sim:
        plug(tmp_path, sim)
        start = time.monotonic()
        async with running(SerialSensorPoller(dev)) as readings:
            await until(lambda: sim.frames >= 20 and len(readings) >= 2, what="20 frames and 2 readings")
            elapsed = time.monotonic() - start
        frames = sim.frames
    # one reading per 300 ms interval, however many frames came (one every 30 ms)
    assert frames >= 20 and 2 <= len(readings) <= elapsed / 0.3 + 2, (frames, len(readings), elapsed)


@pytest.mark.parametrize("profile", ["gps-nmea", "pms5003"])
async def test_checksum_failures_are_rejected_and_counted(tmp_path: Path, profile: str) -> None:
    dev = device(tmp_path, profile)
    async with SerialSensorSim(dev.profile, every=0.05, values=NMEA_VALUES if profile == "gps-nmea" else {}) as sim:
        plug(tmp_path, sim)
        poller = SerialSensorPoller(dev)
        async with running(poller) as readings:
            await until(lambda: readings)
            sim.faults.inject("bad_checksum", 3)
            await until(lambda: poller.status["dev1"].errors.get("checksum", 0) >= 3)
            count = len(readings)
            await until(lambda: len(readings) >= count + 2)
    assert poller.status["dev1"].errors["checksum"] == 3
    assert all(r.quality == "good" for r in readings)


async def test_garbage_partial_and_overlong_lines_do_not_poison_the_next_reading(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    dev = device(tmp_path, "serial-th-stream")
    async with SerialSensorSim(dev.profile, every=0.05, values={"temperature": 1.0, "humidity": 50.0}) as sim:
        plug(tmp_path, sim)
        poller = SerialSensorPoller(dev)
        async with running(poller) as readings:
            await until(lambda: readings)
            sim.send_raw(b"T=9" * 400)  # far longer than max_frame: skipped up to the next delimiter
            await until(lambda: "overlong" in poller.status["dev1"].errors)
            count = len(readings)
            await until(lambda: len(readings) >= count + 2)  # the skip ended at a delimiter
            sim.faults.inject("garbage", 3)  # noise glued to the front of lines: cut off, line kept
            sim.faults.inject("truncate", 2)  # half a line glued to the next: that one line is lost
            await until(lambda: {"garbage", "truncated"} & set(poller.status["dev1"].errors),
                           state=lambda: poller.status["dev1"])
            sim.values.update(temperature=2.0)
            await until(lambda: readings[-1].fields.get("temperature") == 2.0)
    errors = poller.status["dev1"].errors
    assert errors["overlong"] == 1
    assert all(set(r.fields) == {"temperature", "humidity"} and r.fields["humidity"] == 50.0 for r in readings)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith("dev1:")]
    assert warnings and len(warnings) <= len(errors) + 1  # once per state change, not per bad line


async def test_silence_is_logged_once_then_back_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    dev = device(tmp_path, "serial-th-stream", interval="100ms", timeout="300ms")
    async with SerialSensorSim(dev.profile, every=0.03) as sim:
        plug(tmp_path, sim)
        poller = SerialSensorPoller(dev)
        async with running(poller) as readings:
            await until(lambda: readings)
            sim.faults.silent = True
            await until(lambda: not poller.status["dev1"].up)
            await asyncio.sleep(0.5)  # several more silent intervals: no more log lines
            count = len(readings)
            sim.faults.silent = False
            await until(lambda: len(readings) > count and poller.status["dev1"].up)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len([m for m in messages if "no complete frame" in m]) == 1, messages
    assert len([m for m in messages if "answering again" in m]) == 1, messages
    assert poller.status["dev1"].errors["silent"] >= 1


async def test_polled_sensor_slow_reply_then_no_reply_then_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    dev = device(tmp_path, "serial-co2-request", timeout="200ms", retries="0")
    async with SerialSensorSim(dev.profile, values={"co2": 500, "temperature": 20.0}) as sim:
        plug(tmp_path, sim)
        poller = SerialSensorPoller(dev)
        async with running(poller) as readings:
            sim.faults.delay = 0.1  # slow, but within the timeout: still read
            await until(lambda: len(readings) >= 2)
            sim.faults.silent = True  # no reply at all
            await until(lambda: poller.status["dev1"].errors.get("timeout", 0) >= 3)
            sim.faults.silent = False
            count = len(readings)
            await until(lambda: len(readings) > count + 1)
    assert all(r.fields == {"co2": 500, "temperature": 20.0} for r in readings)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len([m for m in messages if "no reply within 200ms" in m]) == 1, messages
    assert sim.requests >= len(readings)


async def test_port_that_disappears_is_reopened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    dev = device(tmp_path, "serial-th-stream")
    poller = SerialSensorPoller(dev)
    sim = SerialSensorSim(dev.profile, every=0.05, values={"temperature": 1.0, "humidity": 40.0})
    async with sim:
        plug(tmp_path, sim)
        async with running(poller) as readings:
            await until(lambda: readings)
            await sim.unplug()  # the adapter is pulled out: the pty and its path are gone
            (tmp_path / "tty").unlink()
            await until(lambda: poller.status["dev1"].errors.get("port", 0) >= 2)
            async with SerialSensorSim(dev.profile, every=0.05, values={"temperature": 2.0, "humidity": 40.0}) as sim2:
                plug(tmp_path, sim2)  # plugged back in
                await until(lambda: readings[-1].fields["temperature"] == 2.0)
                messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len([m for m in messages if "went away" in m]) == 1, messages
    assert len([m for m in messages if "reopened" in m]) == 1, messages
    assert len([m for m in messages if "cannot open" in m]) <= 1, messages


async def test_poll_once_streaming_and_polled(tmp_path: Path) -> None:
    for profile in ("serial-th-stream", "serial-co2-request"):
        dev = device(tmp_path / profile, profile)
        async with SerialSensorSim(dev.profile, every=0.05) as sim:
            plug(tmp_path / profile, sim)
            async with SerialSensorPoller(dev) as poller:
                readings = await poller.poll_once()
        assert len(readings) == 1 and readings[0].fields, profile


async def test_into_a_real_outbox_through_the_committer(tmp_path: Path) -> None:
    dev = device(tmp_path, "scale-continuous")
    with Outbox(tmp_path / "outbox.db", ["mqtt"]) as outbox:
        committer = Committer(outbox, lambda: None, 0.02)
        commit_task = asyncio.create_task(committer.run(), name="commit")
        try:
            async with SerialSensorSim(dev.profile, every=0.05, values={"weight": 512.5, "stable": True}) as sim:
                plug(tmp_path, sim)
                async with running(SerialSensorPoller(dev), emit=committer.emit):
                    await until(lambda: committer.stats.committed >= 2)
        finally:
            commit_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await commit_task
        entries = outbox.fetch("mqtt", 10, 1 << 20)
    assert entries and entries[0].reading.fields["weight"] == 512.5
    assert entries[0].reading.measurement == "weight" and entries[0].reading.tags["device"] == "dev1"


def test_sluice_sim_serial_prints_the_port_and_streams(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "sim", "serial",
                             str(PROFILES / "serial-th-stream.yaml"), "--every", "50ms", "--link", str(tmp_path / "tty")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        port = proc.stdout.readline().strip()
        assert first.startswith("simulating serial-th-stream (lines) on /dev/pts/"), first
        assert port == f"port: {tmp_path / 'tty'}"
        with serial.Serial(str(tmp_path / "tty"), 9600, timeout=10) as line:
            line.reset_input_buffer()
            line.readline()  # the rest of a line that may have been cut by the reset
            assert line.readline().startswith(b"T=")
    finally:
        proc.terminate()
        proc.wait(timeout=STOP)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0
    assert not os.path.lexists(tmp_path / "tty")
