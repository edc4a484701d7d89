"""Benchmark of the spine: simulated Modbus TCP units -> gateway -> outbox (FULL) -> Mosquitto, QoS 1.

Prints figures; asserts nothing. The gateway runs as its own process and is measured alone
(CPU from /proc/PID/task/*/schedstat, peak RSS from /proc/PID/status VmHWM); the simulator runs in another
process and the broker is a private Mosquitto. Workload as in the issue: units of 10 float32
points (20 holding registers each).

    .venv/bin/python bench/spine.py            # everything (about 8 minutes)
    .venv/bin/python bench/spine.py --quick    # shorter windows, one run each
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.mqtt import watch  # noqa: E402
from simulators.broker import Mosquitto, free_port  # noqa: E402
import sqlite3  # noqa: E402
import marshal  # noqa: E402
from pymodbus.client import AsyncModbusTcpClient  # noqa: E402
from gateway.mqtt import Client, Settings  # noqa: E402
from drivers.modbus.client import ModbusTcpClient  # noqa: E402



def profile(points: int) -> dict:
    return {"protocol": "modbus", "measurement": "bench", "points": [
        {"name": f"p{i}", "kind": "holding", "address": 2 * i, "type": "float32",
         "sim": {"signal": "sine", "min": 0, "max": 100, "period": "60s"}} for i in range(points)]}


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` in ns precision (/proc/PID/task/*/schedstat: time on
    the CPU), not the 10 ms ticks of /proc/PID/stat, so that a 0.5 %-of-a-core process can be
    measured in a short window."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Setup:
    units: int
    points: int
    interval: str
    units_per_port: int = 10
    linger: str = "200ms"
    topic: str | None = None


class Rig:
    """Broker + simulator process + gateway config in a temp dir; the gateway is started per run."""

    def __init__(self, tmp: Path, setup: Setup, broker: Mosquitto) -> None:
        self.tmp, self.setup, self.broker = tmp, setup, broker
        self.cfg = tmp / "config"
        self.sim_proc: subprocess.Popen[bytes] | None = None

    def write(self) -> None:
        s = self.setup
        (self.cfg / "profiles").mkdir(parents=True, exist_ok=True)
        (self.cfg / "devices").mkdir(exist_ok=True)
        (self.cfg / "profiles" / "bench.yaml").write_text(yaml.safe_dump(profile(s.points)))
        ports = [free_port() for _ in range((s.units + s.units_per_port - 1) // s.units_per_port)]
        sim = {"profiles_dir": str(self.cfg / "profiles"), "devices": []}
        for u in range(s.units):
            port, unit = ports[u // s.units_per_port], u % s.units_per_port + 1
            sim["devices"].append({"profile": "bench", "port": port, "unit_id": unit})
            (self.cfg / "devices" / f"u{u:03d}.yaml").write_text(yaml.safe_dump({
                "id": f"u{u:03d}", "protocol": "modbus_tcp", "profile": "bench", "host": "127.0.0.1",
                "port": port, "unit_id": unit, "interval": s.interval, "timeout": "1s", "retries": 0}))
        (self.tmp / "sim.yaml").write_text(yaml.safe_dump(sim))
        sink = {"type": "mqtt", "host": "127.0.0.1", "port": self.broker.port, "qos": 1,
                "batch": {"linger": s.linger}, "reconnect_min": "100ms", "reconnect_max": "1s"}
        if s.topic:
            sink["topic"] = s.topic
        (self.cfg / "gateway.yaml").write_text(yaml.safe_dump({
            "gateway": {"id": "bench", "site": "lab"},
            "buffer": {"path": str(self.tmp / "outbox.db"), "synchronous": "full"},
            "sinks": {"broker": sink}, "logging": {"level": "warning", "format": "text"}}))

    def start_sim(self) -> None:
        self.sim_proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "sim", str(self.tmp / "sim.yaml"),
                                          "--log-level", "warning"], stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, cwd=REPO)
        assert self.sim_proc.stdout is not None
        servers = (self.setup.units + self.setup.units_per_port - 1) // self.setup.units_per_port
        for _ in range(servers):
            line = self.sim_proc.stdout.readline().decode()
            if "simulating" not in line:
                raise RuntimeError(f"simulator did not start: {line}")

    def stop_sim(self) -> None:
        if self.sim_proc:
            self.sim_proc.terminate()
            self.sim_proc.wait(10)

    def start_gateway(self) -> subprocess.Popen[bytes]:
        with contextlib.suppress(FileNotFoundError):
            for suffix in ("", "-wal", "-shm"):
                (self.tmp / f"outbox.db{suffix}").unlink()
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(self.cfg)],
                                stdout=subprocess.DEVNULL, stderr=(self.tmp / "gateway.log").open("ab"), cwd=REPO)


class Counter:
    def __init__(self) -> None:
        self.readings = 0
        self.first_at: float | None = None
        self.last_at: float | None = None

    def feed(self, payload: bytes) -> None:
        now = time.monotonic()
        self.readings += payload.count(b"\n") + (0 if payload.endswith(b"\n") else 1)
        self.first_at = self.first_at or now
        self.last_at = now


async def subscribe(port: int, counter: Counter, ready: asyncio.Event) -> None:
    ready.set()
    async for topic, payload in watch("127.0.0.1", port, "sluice/lab/bench/#"):
        if not topic.endswith("/status"):
            counter.feed(payload)


async def steady_run(rig: Rig, warmup: float, window: float) -> dict:
    counter = Counter()
    ready = asyncio.Event()
    sub = asyncio.create_task(subscribe(rig.broker.port, counter, ready))
    await ready.wait()
    await asyncio.sleep(0.5)
    started = time.monotonic()
    gw = rig.start_gateway()
    try:
        while counter.first_at is None and time.monotonic() - started < 30:  # noqa: ASYNC110 - polling a counter
            await asyncio.sleep(0.005)
        first_value = (counter.first_at or float("nan")) - started
        await asyncio.sleep(max(0.0, warmup - (time.monotonic() - started)))
        cpu0, n0, t0 = cpu_seconds(gw.pid), counter.readings, time.monotonic()
        await asyncio.sleep(window)
        cpu1, n1, t1 = cpu_seconds(gw.pid), counter.readings, time.monotonic()
        rss = peak_rss_mb(gw.pid)
    finally:
        gw.terminate()
        await asyncio.to_thread(gw.wait, 30)
        sub.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sub
    s = rig.setup
    values = (n1 - n0) * s.points
    interval = float(s.interval.rstrip("ms")) / (1000 if s.interval.endswith("ms") else 1)
    expected = s.units / interval * (t1 - t0)
    return {"cpu_per_10k": (cpu1 - cpu0) / values * 10_000 if values else float("nan"),
            "values_per_s": values / (t1 - t0), "delivered_ratio": (n1 - n0) / expected,
            "cpu_share": (cpu1 - cpu0) / (t1 - t0), "rss_mb": rss, "first_value_s": first_value}


async def outage_run(rig: Rig, outage: float) -> dict:
    counter = Counter()
    ready = asyncio.Event()
    sub_task = asyncio.create_task(subscribe(rig.broker.port, counter, ready))
    await ready.wait()
    gw = rig.start_gateway()
    try:
        await asyncio.sleep(3)
        sub_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sub_task
        await asyncio.to_thread(rig.broker.stop)
        await asyncio.sleep(outage)
        counter = Counter()
        await asyncio.to_thread(rig.broker.start)
        back = time.monotonic()
        ready = asyncio.Event()
        sub_task = asyncio.create_task(subscribe(rig.broker.port, counter, ready))
        while counter.first_at is None and time.monotonic() - back < 60:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        resumed = (counter.first_at or float("nan")) - back
        await asyncio.sleep(3)
    finally:
        gw.terminate()
        await asyncio.to_thread(gw.wait, 30)
        sub_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sub_task
    return {"resumed_s": resumed, "backlog_readings_seen": counter.readings}


@contextlib.asynccontextmanager
async def mqtt_client(broker: Mosquitto, client_id: str):
    """A connected client of the one MQTT layer (gateway/mqtt/client.py), persistent session, MQTT 3.1.1."""

    async with Client(Settings(who=client_id, host="127.0.0.1", port=broker.port, client_id=client_id,
                               protocol="3.1.1", max_inflight=20)) as mqtt:
        await asyncio.wait_for(mqtt.wait_connected(), 10)
        yield mqtt


async def calibrate(broker: Mosquitto, tmp: Path) -> dict:
    """The libraries' own costs on this machine, measured in this run: the floor the issue's
    target is derived from (10 Modbus transactions + 1 publish + 1 commit per second)."""


    rig = Rig(tmp / "calibrate", Setup(1, 10, "1s"), broker)
    rig.tmp.mkdir()
    rig.write()
    rig.start_sim()
    try:
        port = yaml.safe_load((rig.cfg / "devices" / "u000.yaml").read_text())["port"]
        client = AsyncModbusTcpClient("127.0.0.1", port=port)
        await client.connect()
        for _ in range(50):
            await client.read_holding_registers(0, count=20, device_id=1)
        t0 = time.process_time()
        for _ in range(1000):
            await client.read_holding_registers(0, count=20, device_id=1)
        modbus = (time.process_time() - t0) / 1000
        client.close()
    finally:
        rig.stop_sim()
    async with mqtt_client(broker, "calibrate") as mqtt:
        for _ in range(50):
            await mqtt.publish([("calibrate", b"x" * 300)], 1)
        t0 = time.process_time()
        for _ in range(500):
            await mqtt.publish([("calibrate", b"x" * 300)], 1)
        publish = (time.process_time() - t0) / 500
    db = sqlite3.connect(tmp / "calibrate.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (x BLOB)")
    t0 = time.process_time()
    for _ in range(500):
        db.execute("BEGIN")
        db.execute("INSERT INTO t VALUES (?)", (b"x" * 100,))
        db.execute("COMMIT")
    commit = (time.process_time() - t0) / 500
    db.close()
    floor = (10 * modbus + publish + commit) * 100  # CPU-s per 10k values at 100 values/s
    return {"modbus_us": modbus * 1e6, "publish_us": publish * 1e6, "commit_us": commit * 1e6, "floor": floor}


async def bare_work(broker: Mosquitto, tmp: Path, topics: int, seconds: int) -> float:
    """CPU-s per 10k values of the work the workload requires and nothing else, in this process:
    every wall-clock second, 10 reads of 20 registers with our Modbus client (one connection, in
    turn), one FULL commit of 10 rows, and ``topics`` QoS 1 messages handed to paho at once with
    one future for their PUBACKs (gateway/mqtt/client.py, what the MQTT sink uses). No gateway: no decoding, no outbox
    bookkeeping, no forwarder, no health endpoint. The same machine's bound on any gateway built
    on these libraries."""


    rig = Rig(tmp / f"bare{topics}", Setup(10, 10, "1s"), broker)
    rig.tmp.mkdir()
    rig.write()
    rig.start_sim()
    db = sqlite3.connect(tmp / f"bare{topics}.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE r (seq INTEGER PRIMARY KEY, data BLOB)")
    try:
        port = yaml.safe_load((rig.cfg / "devices" / "u000.yaml").read_text())["port"]
        modbus = ModbusTcpClient("127.0.0.1", port)
        await modbus.connect(1.0)
        async with mqtt_client(broker, f"bare{topics}") as mqtt:
            async def one_second() -> None:
                rows = [(marshal.dumps([time.time_ns(), await modbus.read(u, 3, 0, 20, 1.0)]),) for u in range(1, 11)]
                db.execute("BEGIN")
                db.executemany("INSERT INTO r (data) VALUES (?)", rows)
                db.execute("COMMIT")
                await mqtt.publish([(f"sluice/lab/bare/u{t:03d}", b"x" * 300) for t in range(topics)], 1)

            for _ in range(3):
                await one_second()
            t0 = time.process_time()
            for _ in range(seconds):
                await asyncio.sleep(1 - time.time() % 1)
                await one_second()
            cpu = time.process_time() - t0
        await modbus.close()
    finally:
        db.close()
        rig.stop_sim()
    return cpu / (seconds * 100) * 1e4


async def bench(args: argparse.Namespace) -> None:
    runs = 1 if args.quick else 3
    window = 20.0 if args.quick else 60.0
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp_s:
        tmp = Path(tmp_s)
        async with Mosquitto(tmp / "broker") as broker:
            print(f"# Sluice spine benchmark — python {sys.version.split()[0]}, {os.cpu_count()} cores, "
                  f"{runs} run(s) per figure, {window:.0f} s windows")
            cal = await calibrate(broker, tmp)
            print(f"calibration (library costs on this machine, this run): pymodbus client {cal['modbus_us']:.0f} µs "
                  f"CPU per 20-register read, awaited QoS 1 publish {cal['publish_us']:.0f} µs, SQLite FULL "
                  f"single-row commit {cal['commit_us']:.0f} µs -> floor for 10 units x 10 values at 1 s: "
                  f"{cal['floor']:.3f} CPU-s per 10k values (LIBRARY-NOTES' costs give ~0.1)")
            seconds = 10 if args.quick else 30
            bare = {n: await bare_work(broker, tmp, n, seconds) for n in (10, 1)}
            print(f"bare required work, no gateway (10 reads + 1 FULL commit + N QoS 1 messages per second, "
                  f"{seconds} s): {bare[10]:.3f} CPU-s per 10k values with a topic per device (N=10), "
                  f"{bare[1]:.3f} with one topic (N=1)")
            for label, setup in [
                ("default config (one topic per gateway, linger 200ms)", Setup(10, 10, "1s")),
                ("metered link (one topic per gateway, linger 5s)", Setup(10, 10, "1s", linger="5s")),
                ("topic per device (linger 200ms)", Setup(10, 10, "1s", topic="sluice/{site}/{gateway}/{device}")),
            ]:
                rig = Rig(tmp / f"r{abs(hash(label))}", setup, broker)
                rig.tmp.mkdir()
                rig.write()
                rig.start_sim()
                try:
                    results = [await steady_run(rig, 5.0, window) for _ in range(runs)]
                finally:
                    rig.stop_sim()
                med = {k: statistics.median(r[k] for r in results) for k in results[0]}
                # the bare work sends 10 or 1 messages a second: comparable to the 200 ms linger configs only
                own = bare[10] if "per device" in label else bare[1]
                versus = f", {med['cpu_per_10k'] / own:.1f} x the bare required work" if "200ms" in label else ""
                print(f"10 units x 10 float32 at 1 s, {label}:\n"
                      f"  CPU-s per 10k values: {med['cpu_per_10k']:.3f} = {med['cpu_per_10k'] / cal['floor']:.1f} x the "
                      f"library floor{versus} (runs: "
                      f"{', '.join(format(r['cpu_per_10k'], '.3f') for r in results)})\n"
                      f"  delivered/expected: {med['delivered_ratio']:.3f}; peak RSS {med['rss_mb']:.1f} MB; "
                      f"first value at the broker {med['first_value_s']:.2f} s after start")
            for units, points, interval in [(100, 100, "1s"), (100, 100, "500ms"), (100, 100, "250ms")]:
                setup = Setup(units, points, interval, units_per_port=25)
                rig = Rig(tmp / f"t{units}-{interval}", setup, broker)
                rig.tmp.mkdir()
                rig.write()
                rig.start_sim()
                try:
                    r = await steady_run(rig, 5.0, window / 2)
                finally:
                    rig.stop_sim()
                print(f"{units} units x {points} float32 at {interval}: {r['values_per_s']:.0f} values/s delivered "
                      f"({r['delivered_ratio']:.3f} of the polls due), gateway CPU {r['cpu_share'] * 100:.0f}% of a core, "
                      f"{r['cpu_per_10k']:.3f} CPU-s per 10k values, peak RSS {r['rss_mb']:.1f} MB")
            rig = Rig(tmp / "outage", Setup(10, 10, "1s"), broker)
            rig.tmp.mkdir()
            rig.write()
            rig.start_sim()
            try:
                outage = 20.0 if args.quick else 60.0
                r = await outage_run(rig, outage)
            finally:
                rig.stop_sim()
            print(f"broker outage of {outage:.0f} s: first delivery {r['resumed_s']:.2f} s after the broker returned; "
                  f"{r['backlog_readings_seen']} readings seen in the 3 s after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
