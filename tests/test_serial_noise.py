"""Serial sensors on a noisy line, on real pseudo-terminals: one log line per change of state with
counters (not one per bad frame), the counters in /metrics, and a scale whose overload line does
not carry the weight before it."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from drivers.serial import poller as serial_poller
from drivers.serial.poller import SerialSensorPoller
from simulators.broker import free_port
from simulators.serial_sensor import Faults, SerialSensorSim, render_frame
from support import running, until
from test_serial_poller import NMEA_VALUES, device, plug

LOGGER = "drivers.serial.poller"


def _said(caplog: pytest.LogCaptureFixture, level: int, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == level and r.getMessage().startswith(start)]


async def test_a_noisy_line_logs_once_with_counters_then_once_when_clean(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(serial_poller, "NOISE_SETTLE", 0.5)  # clean after 10 intervals (5 s) without a bad frame
    dev = device(tmp_path, "gps-nmea", interval="500ms", timeout="10s")  # a stall under load is not silence
    faults = Faults(rates={"garbage": 0.25, "bad_checksum": 0.25})
    async with SerialSensorSim(dev.profile, every=0.03, faults=faults, values=NMEA_VALUES) as sim:
        plug(tmp_path, sim)
        poller = SerialSensorPoller(dev)
        errors = poller.status["dev1"].errors
        async with running(poller) as readings:
            await until(lambda: errors.get("checksum", 0) >= 15 and errors.get("garbage", 0) >= 15, timeout=60,
                           state=lambda: errors)
            noisy = _said(caplog, logging.WARNING, "dev1:")
            again = _said(caplog, logging.INFO, "dev1: reading every point again")
            faults.rates.clear()
            await until(lambda: _said(caplog, logging.INFO, "dev1: reading every point again"), timeout=60)
    assert len(noisy) == 1 and not again, noisy + again  # dozens of bad frames, several windows: one line
    assert "bad frames between good ones" in noisy[0] and "bad: " in noisy[0] and "good" in noisy[0]
    (clean,) = _said(caplog, logging.INFO, "dev1: reading every point again")
    assert "(bad_frames: " in clean and "checksum" in clean and "garbage" in clean
    assert len(_said(caplog, logging.WARNING, "dev1:")) == 1
    assert readings and all(r.fields["latitude"] == pytest.approx(52.1) for r in readings)


async def test_an_overload_line_does_not_carry_the_last_weight(tmp_path: Path) -> None:
    dev = device(tmp_path, "scale-continuous", interval="1s", timeout="5s")
    async with SerialSensorSim(dev.profile, every=3600) as sim:
        plug(tmp_path, sim)
        async with running(SerialSensorPoller(dev)) as readings:
            weight = render_frame(dev.profile, {"weight": 174.5, "stable": True, "unit": "kg"})
            overload = render_frame(dev.profile, {"status": "OL", "weight": 0.0, "unit": "kg"})
            deadline = time.monotonic() + 30
            for _ in range(2):  # the second new reading marks an interval that just began
                count = len(readings)
                while len(readings) == count:
                    assert time.monotonic() < deadline
                    sim.send_raw(weight)
                    await asyncio.sleep(0.05)
            count = len(readings)
            sim.send_raw(weight + overload)  # both in the same interval, the overload last
            await until(lambda: len(readings) > count, timeout=30)
    last = readings[-1].fields
    assert last["overload"] is True and "weight" not in last, last
    assert any(r.fields.get("weight") == 174.5 for r in readings)


async def test_three_noisy_sensors_under_sluice_run_log_a_line_each_and_count_in_metrics(tmp_path: Path) -> None:
    health = free_port()
    sims = []
    for i in range(3):
        dev = device(tmp_path / f"d{i}", "gps-nmea")  # writes a profile; the config below is built by hand
        sims.append(SerialSensorSim(dev.profile, every=0.03, values=NMEA_VALUES,
                                    faults=Faults(rates={"garbage": 0.2, "bad_checksum": 0.2})))
    config = tmp_path / "config"
    (config / "devices").mkdir(parents=True)
    (config / "profiles").mkdir()
    (config / "profiles" / "gps-nmea.yaml").write_text((tmp_path / "d0" / "profiles" / "gps-nmea.yaml").read_text())
    (config / "gateway.yaml").write_text(
        "gateway: {id: gw, site: farm}\n"
        f"buffer: {{path: {tmp_path / 'outbox.db'}}}\n"
        f"health: {{listen: '127.0.0.1:{health}'}}\n"
        "logging: {level: info, format: text}\n")
    for sim in sims:
        await sim.__aenter__()
    try:
        for i, sim in enumerate(sims):
            (config / "devices" / f"gps{i}.yaml").write_text(
                f"id: gps{i}\nprotocol: serial\nprofile: gps-nmea\nport: {sim.path}\ninterval: 200ms\ntimeout: 10s\n")
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            errors: dict[str, float] = {}
            deadline = time.monotonic() + 60
            while not (len(errors) == 6 and min(errors.values()) >= 10):  # 3 sensors × (garbage, checksum)
                assert time.monotonic() < deadline, errors
                await asyncio.sleep(0.2)
                try:
                    text = await asyncio.to_thread(
                        lambda: urllib.request.urlopen(f"http://127.0.0.1:{health}/metrics", timeout=2).read().decode())
                except OSError:
                    continue
                errors = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith("sluice_device_errors_total{")}
        finally:
            proc.send_signal(signal.SIGTERM)
            _out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        for sim in sims:
            await sim.__aexit__(None, None, None)
    await asyncio.get_running_loop().shutdown_default_executor()
    assert {key for key in errors} == {f'device="gps{i}",kind="{k}"' for i in range(3) for k in ("checksum", "garbage")}
    about = [line for line in err.splitlines() if " gps" in line and ("WARNING" in line or "INFO" in line)]
    warnings = [line for line in about if "WARNING" in line]
    assert len(warnings) == 3, "\n".join(about)  # one per sensor, however many bad frames
    assert not [line for line in about if "reading every point again" in line], "\n".join(about)


async def test_a_polled_sensor_on_a_noisy_line_is_one_state_not_up_and_down(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    dev = device(tmp_path, "serial-co2-request", interval="200ms", timeout="300ms", retries="0")
    faults = Faults(rates={"truncate": 0.5})
    async with SerialSensorSim(dev.profile, faults=faults) as sim:
        plug(tmp_path, sim)
        poller = SerialSensorPoller(dev)
        errors = poller.status["dev1"].errors
        async with running(poller) as readings:
            await until(lambda: errors.get("truncated", 0) >= 6 and len(readings) >= 6, timeout=60,
                           state=lambda: (errors, len(readings)))
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("dev1:")]
    # The first poll may be spoilt too (then: down, answering again); once it has answered, one line.
    first = next(i for i, m in enumerate(said) if m.startswith("dev1: answering"))
    after = said[first + 1:]
    assert len(after) == 1 and "bad frames between good ones" in after[0] and "truncated" in after[0], said
