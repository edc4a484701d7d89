"""Benchmark of the direct InfluxDB sink: a backlog in the outbox drained by one forwarder into a
private influxd 1.x (api v1) and a private VictoriaMetrics (api v2 through influxdb-client).

Prints figures; asserts nothing. CPU is this process's (the forwarder, the outbox reads, the
encoder, gzip, HTTP) from ``time.process_time()``; the database servers run in their own
processes and are not counted. A "point" is one line of line protocol (one reading, here with
10 float fields).

    .venv/bin/python bench/influx_sink.py                 # 100,000 readings per target
    .venv/bin/python bench/influx_sink.py --readings 20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from gateway.outbox import Outbox  # noqa: E402
from gateway.config import InfluxSinkConfig  # noqa: E402
from gateway.sinks.influx import InfluxSink  # noqa: E402
from gateway.sinks.readings import Forwarder  # noqa: E402
from gateway.reading import Reading  # noqa: E402
from servers import Influxd, VictoriaMetrics  # noqa: E402

T0 = 1_760_000_000_000_000_000


def backlog(n: int) -> list[Reading]:
    devices = [f"meter-{d:02d}" for d in range(20)]
    return [Reading(devices[i % 20], T0 + i * 1_000_000, {f"p{j}": 20.0 + (i * 7 + j) % 1000 / 8 for j in range(10)},
                    {"site": "farm", "gateway": "gw1", "device": devices[i % 20], "profile": "sdm630"},
                    measurement="energy") for i in range(n)]


async def drain(directory: Path, cfg: InfluxSinkConfig, readings: list[Reading]) -> tuple[float, float]:
    with Outbox(directory / "outbox.db", ["db"], synchronous="normal", max_bytes=2 * 1024**3) as outbox:
        for i in range(0, len(readings), 10_000):
            outbox.append(readings[i:i + 10_000])
        async with InfluxSink("db", cfg) as sink:
            fwd = Forwarder("db", outbox, sink, cfg, SimpleNamespace(gateway_id="gw1", site="farm"))
            wall, cpu = time.perf_counter(), time.process_time()
            task = asyncio.create_task(fwd.run(), name="forward[db]")
            while True:  # polled: the outbox has no "drained" event, and 10 ms is far below the run time
                if not outbox.stats().pending["db"]:
                    break
                await asyncio.sleep(0.01)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert fwd.stats.delivered == len(readings) and fwd.stats.dead_lettered == 0
    return wall, cpu


def report(name: str, n: int, wall: float, cpu: float) -> None:
    print(f"{name:<34} {n:>8} points  {n / wall:>9,.0f} points/s  {cpu / n * 10_000:.3f} CPU-s per 10k points "
          f"({cpu / n * 1e6:.1f} µs/point, wall {wall:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=100_000)
    args = parser.parse_args()
    readings = backlog(args.readings)
    batch = {"max_readings": 5000, "max_bytes": "1MiB", "linger": "0ms"}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        server = Influxd(base / "influxd")
        server.start()
        try:
            server.create_database("sluice")
            for gz in (True, False):
                cfg = InfluxSinkConfig.model_validate({"type": "influxdb", "url": server.url, "api": "v1",
                                                       "database": "sluice", "gzip": gz, "batch": batch})
                wall, cpu = asyncio.run(drain(base / f"v1-{gz}", cfg, readings))
                report(f"influxd 1.6 api v1 gzip={gz}", len(readings), wall, cpu)
        finally:
            server.stop()
        vm = VictoriaMetrics(base / "vm")
        vm.start()
        try:
            for gz in (True, False):
                cfg = InfluxSinkConfig.model_validate({"type": "influxdb", "url": vm.url, "api": "v2", "bucket": "b",
                                                       "org": "o", "token": "t", "gzip": gz, "batch": batch})
                wall, cpu = asyncio.run(drain(base / f"v2-{gz}", cfg, readings))
                report(f"VictoriaMetrics api v2 gzip={gz}", len(readings), wall, cpu)
        finally:
            vm.stop()


if __name__ == "__main__":
    main()
