"""Benchmark of a wire-timed Modbus RTU bus: 10 units × 10 holding registers, polled as fast as the
bus allows, at 9600 and 115200 baud (8N1).

The bus simulator (``sluice sim rtu --wire-timing``) runs in its own process and delays every
frame by its transmission time (one deadline from the request's arrival, timed with a timerfd);
the gateway's poller runs here, so this process's CPU time is the gateway's alone: exact from
``time.process_time()`` (the scheduler's run time), and split into user and system from
``os.times()``, which the kernel samples at its clock tick (so that split is coarse). The
physical limit of one transaction is its request (8 bytes) and reply (5 + 20 bytes) on the wire
plus two silences of 3.5 characters: the unit knows the request has ended only after one, and
the master may send the next request only after the other.

Measured on a 2-core VM (10 s per rate, two runs each): before the timerfd silence and the
one-deadline simulator, 9600 baud 93 % and 115200 baud 66-67 % of the limit; after, 97 % and
89-90 %. CPU per transaction (0.39-0.52 ms here, exact) did not change: the RTU framing is ~7 µs
of it (request CRC 2 µs, reply search and CRC 5 µs), the poller's decode/reading/schedule
~90 µs, and the rest is the event loop's iterations and each wake-up from sleep — the same
client costs 0.32 ms per transaction back to back, 0.45 ms at 105/s and 0.57 ms at 22/s.
Real USB adapters add their latency timer (FTDI: 16 ms) unless the port is in low-latency
mode, which the serial link asks for.

    .venv/bin/python bench/rtu_bus.py [--seconds 10]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from drivers.modbus.profile import ProfileModel  # noqa: E402
from drivers.modbus.rtu import DeviceModel, make_pollers  # noqa: E402
from drivers.wire import char_time, inter_frame_silence  # noqa: E402
from gateway.driver import Device  # noqa: E402

UNITS, REGISTERS = 10, 10
PROFILE_YAML = "protocol: modbus\npoints:\n" + "".join(
    f"  - {{name: r{i}, kind: holding, address: {i}, type: uint16}}\n" for i in range(REGISTERS))


def physical_limit(baudrate: int) -> float:
    """Transactions per second a perfect master reaches on this bus."""
    chars = 8 + 5 + 2 * REGISTERS
    return 1.0 / (chars * char_time(baudrate) + 2 * inter_frame_silence(baudrate))


async def measure(port: str, baudrate: int, seconds: float) -> tuple[int, float, tuple[float, float, float]]:
    profile = ProfileModel.model_validate({"protocol": "modbus", "points": [
        {"name": f"r{i}", "kind": "holding", "address": i, "type": "uint16"} for i in range(REGISTERS)]})
    devices = [Device(DeviceModel.model_validate({
        "id": f"u{u}", "protocol": "modbus_rtu", "profile": "p", "port": port, "baudrate": baudrate,
        "unit_id": u, "interval": "1ms", "timeout": "500ms", "retries": 0}), profile, "p", {}, "m", Path("-"))
        for u in range(1, UNITS + 1)]
    (poller,) = make_pollers(devices)
    readings = 0

    def emit(_reading: object) -> None:
        nonlocal readings
        readings += 1

    async with poller:
        task = asyncio.create_task(poller.run(emit), name=f"poll[{port}]")
        await asyncio.sleep(1.0)  # warm up: port open, first round
        start_n, start_t, start_cpu, start_exact = readings, time.perf_counter(), os.times(), time.process_time()
        await asyncio.sleep(seconds)
        end_cpu, end_exact = os.times(), time.process_time()
        n, wall = readings - start_n, time.perf_counter() - start_t
        cpu = (end_cpu.user - start_cpu.user, end_cpu.system - start_cpu.system, end_exact - start_exact)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    errors = sum(sum(s.errors.values()) for s in poller.status.values())
    if errors:
        print(f"  ({errors} failed transactions)")
    return n, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        profiles = Path(tmp) / "profiles"
        profiles.mkdir()
        (profiles / "bench.yaml").write_text(PROFILE_YAML)
        print(f"{UNITS} units × {REGISTERS} holding registers, 8N1, wire-timed simulator; {args.seconds:g} s each")
        print(f"{'baud':>7} {'limit tx/s':>11} {'achieved':>9} {'of limit':>9} "
              f"{'CPU ms/1000 tx':>15} {'(user + sys, tick-sampled)':>27}")
        for baudrate in (9600, 115200):
            link = Path(tmp) / f"tty{baudrate}"
            sim = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "sim", "rtu", "--profiles", str(profiles), "--link", str(link),
                 "--baudrate", str(baudrate), "--wire-timing", "--log-level", "warning",
                 *[a for u in range(1, UNITS + 1) for a in ("--unit", f"{u}=bench")]],
                stdout=subprocess.PIPE, text=True, cwd=REPO)
            try:
                assert sim.stdout is not None
                while not sim.stdout.readline().startswith("port:"):
                    pass
                n, wall, cpu = asyncio.run(measure(str(link), baudrate, args.seconds))
            finally:
                sim.terminate()
                sim.wait(timeout=10)
                if sim.stdout is not None:
                    sim.stdout.close()
            rate, limit = n / wall, physical_limit(baudrate)
            user, system, exact = (1e6 * c / max(n, 1) for c in cpu)
            print(f"{baudrate:>7} {limit:>11.1f} {rate:>9.1f} {rate / limit:>8.0%} "
                  f"{exact:>15.0f} {f'({user:.0f} + {system:.0f})':>27}")


if __name__ == "__main__":
    main()
