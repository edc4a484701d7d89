"""Benchmark: drain a 24 h backlog (864,000 readings: 10 devices × 1 reading/s × 86,400 s, 10 float
fields each) from a gateway's outbox through Mosquitto and ``sluice ingest`` into a private influxd
1.x (api v1), and optionally VictoriaMetrics (api v2).

Prints figures; asserts nothing but the count. The backlog is written straight into the outbox
with the Outbox API (big transactions: the gateway was cut off for a day). Then Mosquitto, the
database and ``sluice ingest`` (a child process) start, and the clock starts with ``sluice run``
(a child process; its only device is unreachable, so it forwards the backlog and nothing else).
Done is when the database holds every reading (counted by query). CPU is each process's
utime+stime from /proc; bytes on the wire are counted by a loopback relay between the gateway
and Mosquitto (both directions, MQTT framing and TCP payload, not IP/TCP headers).

    .venv/bin/python bench/backlog.py                          # delivery: end_to_end, influxd
    .venv/bin/python bench/backlog.py --delivery broker --target vm
    .venv/bin/python bench/backlog.py --readings 100000        # a shorter run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import yaml  # noqa: E402

from gateway.outbox import Outbox  # noqa: E402
from gateway.reading import Reading  # noqa: E402
from servers import Influxd, VictoriaMetrics, free_port  # noqa: E402
from simulators.broker import Mosquitto  # noqa: E402

DEVICES = 10
FIELDS = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_outbox(path: Path, readings: int) -> float:
    """``readings`` readings, oldest first, 1 s apart per device, ending now; returns seconds taken."""
    start = time.perf_counter()
    per_device = readings // DEVICES
    t_end = time.time_ns() - 10**9
    t0 = t_end - per_device * 10**9
    with Outbox(path, ["broker"], max_bytes=2 * 1024**3) as outbox:
        chunk: list[Reading] = []
        for i in range(per_device):
            t = t0 + i * 10**9
            for d in range(DEVICES):
                # values as float32 registers give them: a few significant digits
                fields: dict[str, Any] = {f"p{j}": round(200.0 + ((i * 7 + j * 13 + d) % 1000) / 8, 3)
                                          for j in range(FIELDS)}
                chunk.append(Reading(f"meter-{d:02d}", t + d * 1000, fields, {"profile": "meter"},
                                     measurement="energy"))
            if len(chunk) >= 20_000:
                outbox.append(chunk)
                chunk = []
        if chunk:
            outbox.append(chunk)
    return time.perf_counter() - start


class Relay:
    """A counting TCP relay on a free loopback port in front of ``target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.up = self.down = 0  # bytes gateway -> broker, broker -> gateway
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upward: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    if upward:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def write_gateway(directory: Path, outbox: Path, broker_port: int, health_port: int, delivery: str,
                  batch: dict[str, Any], max_inflight: int) -> Path:
    (directory / "profiles").mkdir(parents=True)
    (directory / "devices").mkdir()
    (directory / "profiles" / "meter.yaml").write_text(yaml.safe_dump({
        "protocol": "modbus", "measurement": "energy",
        "points": [{"name": f"p{j}", "kind": "holding", "address": 2 * j, "type": "float32"} for j in range(FIELDS)]}))
    # The only device is unreachable: the gateway forwards its backlog and reads nothing new.
    (directory / "devices" / "meter-00.yaml").write_text(yaml.safe_dump({
        "id": "meter-00", "protocol": "modbus_tcp", "profile": "meter", "host": "127.0.0.1", "port": free_port(),
        "unit_id": 1, "interval": "1h", "timeout": "500ms", "retries": 0, "backoff_max": "1h"}))
    sink: dict[str, Any] = {"type": "mqtt", "host": "127.0.0.1", "port": broker_port, "protocol": "5",
                            "delivery": delivery, "max_inflight": max_inflight, "batch": batch}
    (directory / "gateway.yaml").write_text(yaml.safe_dump({
        "gateway": {"id": "gw-bench", "site": "farm"},
        "buffer": {"path": str(outbox), "max_bytes": "2GiB"},
        "sinks": {"broker": sink},
        "health": {"listen": f"127.0.0.1:{health_port}"},
        "logging": {"level": "warning", "format": "text"}}))
    return directory


def write_ingest(path: Path, broker_port: int, influx: dict[str, Any], metrics_port: int,
                 batch: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "client_id": "ingest-bench"},
        "influxdb": {**influx, "timeout": "60s"},
        "batch": batch,
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "logging": {"level": "warning"}}))
    return path


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    total = None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def count_influxd(server: Influxd) -> int:
    series = server.query("SELECT count(p0) FROM energy", db="sluice")
    return int(series[0]["values"][0][1]) if series else 0  # type: ignore[index]


def count_vm(server: VictoriaMetrics) -> int:
    return sum(len(series["values"]) for series in server.export('{__name__="energy_p0"}'))  # type: ignore[arg-type]


async def drain(args: argparse.Namespace, base: Path, outbox: Path, broker: Mosquitto, influx: dict[str, Any],
                count: Any) -> dict[str, float]:
    relay = Relay(broker.port)
    await relay.start()
    metrics_port, health_port = free_port(), free_port()
    ingest_batch = {"max_points": args.ingest_points, "linger": args.ingest_linger,
                    "max_unacked": args.ingest_unacked}
    ingest_cfg = write_ingest(base / "ingest.yaml", broker.port, influx, metrics_port, ingest_batch)
    with (base / "ingest.log").open("ab") as log:
        ingest = subprocess.Popen([sys.executable, "-m", "gateway.cli.ingest", "run", "-c", str(ingest_cfg)],
                                  stdout=log, stderr=log, cwd=REPO)
    try:
        while metric(metrics_port, "sluice_ingest_connected") != 1:  # noqa: ASYNC110 (another process)
            await asyncio.sleep(0.05)
        batch = {"max_readings": args.max_readings, "max_bytes": args.max_bytes, "linger": "200ms"}
        config = write_gateway(base / "config", outbox, broker.port if args.no_relay else relay.port, health_port, args.delivery, batch,
                               args.max_inflight)
        ingest_cpu0 = cpu_seconds(ingest.pid)
        broker_cpu0 = cpu_seconds(broker.proc.pid)  # type: ignore[union-attr]
        wall0 = time.perf_counter()
        with (base / "gateway.log").open("ab") as log:
            gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(config / "gateway.yaml")],
                                       stdout=log, stderr=log, cwd=REPO)
        try:
            gw_cpu = 0.0
            while True:
                await asyncio.sleep(0.5)
                gw_cpu = cpu_seconds(gateway.pid)
                written = metric(metrics_port, "sluice_ingest_points_written_total") or 0
                if args.verbose:
                    print(f"  {time.perf_counter() - wall0:6.1f} s: gateway delivered "
                          f"{metric(health_port, 'sluice_sink_delivered_total')}, ingest wrote {written:.0f}, "
                          f"CPU gateway {gw_cpu:.1f} s ingest {cpu_seconds(ingest.pid) - ingest_cpu0:.1f} s")
                if written >= args.readings and await asyncio.to_thread(count, args.readings) >= args.readings:
                    break
                if gateway.poll() is not None or ingest.poll() is not None:
                    raise SystemExit(f"a process ended: see {base}/gateway.log and ingest.log")
            wall = time.perf_counter() - wall0
            ingest_cpu = cpu_seconds(ingest.pid) - ingest_cpu0
            broker_cpu = cpu_seconds(broker.proc.pid) - broker_cpu0  # type: ignore[union-attr]
            # end_to_end: the outbox empties when the last receipt arrives (after the write)
            while (metric(health_port, "sluice_outbox_rows") or 0) > 0:  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.2)
            acked_wall = time.perf_counter() - wall0
        finally:
            gateway.terminate()
            await asyncio.to_thread(gateway.wait, 30)
        return {"wall": wall, "acked_wall": acked_wall, "gateway_cpu": gw_cpu, "ingest_cpu": ingest_cpu,
                "broker_cpu": broker_cpu, "up": relay.up, "down": relay.down,
                "requests": metric(metrics_port, "sluice_ingest_write_requests_total") or 0,
                "written": metric(metrics_port, "sluice_ingest_points_written_total") or 0}
    finally:
        ingest.terminate()
        await asyncio.to_thread(ingest.wait, 30)
        await relay.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=864_000)
    parser.add_argument("--delivery", choices=["end_to_end", "broker"], default="end_to_end")
    parser.add_argument("--target", choices=["influxd", "vm"], default="influxd")
    parser.add_argument("--max-readings", type=int, default=500, help="gateway batch.max_readings")
    parser.add_argument("--max-bytes", default="64KiB", help="gateway batch.max_bytes")
    parser.add_argument("--max-inflight", type=int, default=8, help="gateway max_inflight")
    parser.add_argument("--ingest-points", type=int, default=5000, help="ingest batch.max_points")
    parser.add_argument("--ingest-linger", default="200ms")
    parser.add_argument("--ingest-unacked", type=int, default=1000)
    parser.add_argument("--broker-nagle", action="store_true", help="mosquitto without set_tcp_nodelay (its default)")
    parser.add_argument("--no-relay", action="store_true", help="no byte counting relay (no wire figures)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print progress every 0.5 s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sluice-backlog-"))
    outbox = base / "outbox.db"
    took = build_outbox(outbox, args.readings)
    print(f"backlog: {args.readings:,} readings ({DEVICES} devices × {FIELDS} float fields) in the outbox "
          f"({outbox.stat().st_size / 1e6:.0f} MB) in {took:.1f} s")
    broker = Mosquitto(base / "mosquitto", tcp_nodelay=not args.broker_nagle)
    broker.start()
    try:
        if args.target == "influxd":
            server: Any = Influxd(base / "influxd")
            server.start()
            server.create_database("sluice")
            influx = {"url": server.url, "api": "v1", "database": "sluice"}
            count = lambda _n: count_influxd(server)  # noqa: E731
        else:
            server = VictoriaMetrics(base / "vm")
            server.start()
            influx = {"url": server.url, "api": "v2", "bucket": "b", "org": "o"}
            count = lambda _n: count_vm(server)  # noqa: E731
        try:
            r = await drain(args, base, outbox, broker, influx, count)
        finally:
            server.stop()
    finally:
        broker.stop()
    n = args.readings
    print(f"delivery={args.delivery} target={args.target} gateway batch {args.max_readings} readings/"
          f"{args.max_bytes}, max_inflight {args.max_inflight}; ingest {args.ingest_points} points, "
          f"linger {args.ingest_linger}, max_unacked {args.ingest_unacked}")
    print(f"  every reading in the database after {r['wall']:.1f} s ({n / r['wall']:,.0f} readings/s); "
          f"outbox empty after {r['acked_wall']:.1f} s")
    print(f"  CPU: gateway {r['gateway_cpu']:.1f} s ({r['gateway_cpu'] / n * 1e4:.3f} per 10k), ingest "
          f"{r['ingest_cpu']:.1f} s ({r['ingest_cpu'] / n * 1e4:.3f} per 10k), mosquitto {r['broker_cpu']:.1f} s")
    print(f"  wire gateway<->broker: {r['up'] / n:.1f} bytes/reading up, {r['down'] / n:.1f} down "
          f"({r['up'] / 1e6:.0f} MB up); ingest {r['requests']:.0f} write requests, {r['written']:,.0f} points written")
    if args.keep:
        print(f"  kept {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
