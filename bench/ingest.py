"""Benchmark of ``sluice ingest``: a backlog of gateway messages queued in Mosquitto for the ingest's
persistent session, drained into a private influxd 1.x (api v1) and a private VictoriaMetrics
(api v2 through influxdb-client).

Prints figures; asserts nothing. The backlog is published before the clock starts (the ingest
session is created first, so Mosquitto queues every message for it); then CPU is this process's
(paho, the line-protocol checker, batching, gzip, HTTP) from ``time.process_time()`` while the
ingest drains the backlog. Mosquitto and the database run in their own processes and are not
counted. A "point" is one line of line protocol (one reading with 10 float fields); messages
carry ``--per-message`` readings, as a gateway's MQTT sink batches them (≤ 64 KiB).

    .venv/bin/python bench/ingest.py                 # 100,000 points per target
    .venv/bin/python bench/ingest.py --points 20000 --format json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import aiomqtt  # noqa: E402

from gateway.encode import InfluxEncoder, JsonEncoder  # noqa: E402
from gateway.cloud.ingest import Ingest  # noqa: E402
from gateway.cloud.config import IngestConfig  # noqa: E402
from gateway.reading import Reading  # noqa: E402
from servers import Influxd, VictoriaMetrics  # noqa: E402
from simulators.broker import Mosquitto  # noqa: E402

T0 = 1_760_000_000_000_000_000


def messages(points: int, per_message: int, fmt: str) -> list[tuple[str, bytes]]:
    devices = [f"meter-{d:02d}" for d in range(20)]
    encoder: Any = InfluxEncoder() if fmt == "influx" else JsonEncoder("gw1", "farm")
    out = []
    for start in range(0, points, per_message):
        dev = devices[(start // per_message) % 20]
        readings = [Reading(dev, T0 + i * 1_000_000, {f"p{j}": 20.0 + (i * 7 + j) % 1000 / 8 for j in range(10)},
                            {"site": "farm", "gateway": "gw1", "device": dev, "profile": "sdm630"}, measurement="energy")
                    for i in range(start, min(start + per_message, points))]
        out.append((f"sluice/farm/gw1/{dev}", encoder.encode(readings)))
    return out


def config(broker: Mosquitto, influx: dict[str, Any], client_id: str) -> IngestConfig:
    return IngestConfig.model_validate({
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": client_id},
        "influxdb": {**influx, "timeout": "30s"},
        "batch": {"max_points": 5000, "max_bytes": "1MiB", "linger": "200ms", "max_unacked": 1000},
        "logging": {"level": "warning"},
    })


async def run_once(broker: Mosquitto, influx: dict[str, Any], backlog: list[tuple[str, bytes]], client_id: str,
                   points: int) -> tuple[float, float]:
    cfg = config(broker, influx, client_id)
    # 1. create the session (subscription), then leave: Mosquitto queues the backlog for it
    first = Ingest(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop), name="ingest-session")
    while not first.connected:  # noqa: ASYNC110 (polled: a benchmark, not a contract)
        await asyncio.sleep(0.02)
    stop.set()
    await task
    async with aiomqtt.Client(broker.host, broker.port) as pub:
        pub.pending_calls_threshold = 100
        sem = asyncio.Semaphore(50)

        async def one(topic: str, payload: bytes) -> None:
            async with sem:
                await pub.publish(topic, payload, qos=1)

        await asyncio.gather(*(one(t, p) for t, p in backlog))
    # 2. drain it
    ingest = Ingest(cfg)
    stop = asyncio.Event()
    wall, cpu = time.perf_counter(), time.process_time()
    task = asyncio.create_task(ingest.run(stop), name="ingest")
    while ingest.stats.acked < len(backlog):  # noqa: ASYNC110 (polled: 10 ms is far below the run time)
        await asyncio.sleep(0.01)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stop.set()
    await task
    assert ingest.stats.points_written >= points, ingest.stats  # a sanity check of the run, not of speed
    return wall, cpu


def report(label: str, points: int, wall: float, cpu: float) -> None:
    print(f"{label:<44} {points:>8} points  {points / wall:>9,.0f} points/s  "
          f"{points / cpu:>9,.0f} points/CPU-s  {cpu / points * 10_000:.3f} CPU-s per 10k points")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--per-message", type=int, default=400, help="readings per MQTT message (400 ≈ 60 KiB)")
    parser.add_argument("--format", choices=["influx", "json"], default="influx")
    args = parser.parse_args()
    backlog = messages(args.points, args.per_message, args.format)
    size = sum(len(p) for _t, p in backlog) / len(backlog)
    print(f"{len(backlog)} messages of {args.per_message} readings ({size / 1024:.0f} KiB each, {args.format})")
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        base = Path(tmp)
        broker = Mosquitto(base / "mosquitto")
        broker.start()
        try:
            server = Influxd(base / "influxd")
            server.start()
            try:
                server.create_database("sluice")
                for gz in (True, False):
                    wall, cpu = await run_once(broker, {"url": server.url, "api": "v1", "database": "sluice", "gzip": gz},
                                               backlog, f"bench-influxd-{gz}", args.points)
                    report(f"Mosquitto -> ingest -> influxd v1 gzip={gz}", args.points, wall, cpu)
            finally:
                server.stop()
            vm = VictoriaMetrics(base / "vm")
            vm.start()
            try:
                for gz in (True, False):
                    wall, cpu = await run_once(broker, {"url": vm.url, "api": "v2", "bucket": "b", "org": "o", "gzip": gz},
                                               backlog, f"bench-vm-{gz}", args.points)
                    report(f"Mosquitto -> ingest -> VictoriaMetrics v2 gzip={gz}", args.points, wall, cpu)
            finally:
                vm.stop()
        finally:
            broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
