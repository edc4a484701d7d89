"""The full path under failures: simulated devices → ``sluice run`` (``delivery: end_to_end``) →
Mosquitto → ``sluice ingest`` → influxd, with the gateway SIGKILLed, the ingest SIGKILLed,
Mosquitto SIGKILLed and influxd stopped at random (seeded: SLUICE_SEED) moments of one run.

After every gateway kill the outbox is snapshotted (as tests/test_kill.py does): those readings
were committed. At the end every committed reading is in influxd exactly once as a point, with
its read time and every field value unchanged; no device's counter has more gaps than the
readings read but not committed before the gateway kills can explain. Short by default;
SLUICE_SOAK=1 runs five times as many events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from e2e_support import counter_servers, device_ports, write_config
from servers import Influxd, Mosquitto, free_port
from support import STOP, until
from test_ingest import Worker, v1
from test_ingest import write_config as write_ingest_config
from test_receipts import _positions

from gateway.outbox import Outbox

LAYOUT = {0: [("a", 1), ("b", 2)], 1: [("c", 1)]}
EVENTS = 40 if os.environ.get("SLUICE_SOAK") == "1" else 8
FIELDS = ("count", "temp", "level", "door")


def _gateway(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL)


def _runs(log: Path) -> int:
    """How many gateway runs got as far as running (before that a SIGTERM is simply fatal)."""
    return log.read_text().count(" running: ") if log.exists() else 0


def _snapshot(path: Path, into: dict[tuple[str, int], dict[str, Any]]) -> None:
    """Add the readings in the outbox now (committed, not yet confirmed) to ``into``."""
    if not path.exists():
        return
    with Outbox(path, ["broker"]) as outbox:
        for entry in outbox.fetch("broker", 10**9, 10**12):
            r = entry.reading
            into[(r.device, r.time_ns)] = {name: r.fields[name] for name in FIELDS}


def _database(influxd: Influxd) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    out: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for series in influxd.query('SELECT "count", "temp", "level", "door" FROM counters GROUP BY device', db="sluice"):
        rows = out.setdefault(series["tags"]["device"], [])  # type: ignore[index]
        for stamp, *values in series["values"]:  # type: ignore[index]
            rows.append((int(stamp), dict(zip(FIELDS, values, strict=True))))
    return out


def _missing(committed: dict[tuple[str, int], dict[str, Any]], db: dict[str, list[tuple[int, dict[str, Any]]]]) -> int:
    have = {(device, stamp): fields for device, rows in db.items() for stamp, fields in rows}
    return sum(1 for key in committed if key not in have)


@pytest.mark.slow
async def test_full_path_survives_every_kind_of_failure(tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd,
                                                        close_default_executor: None) -> None:
    rng = random.Random(os.environ.get("SLUICE_SEED", "20261128"))
    servers = counter_servers(LAYOUT)
    outbox_path = tmp_path / "outbox.db"
    glog = tmp_path / "gateway.log"
    ingest_cfg = write_ingest_config(tmp_path / "ingest.yaml", mosquitto, v1(influxd),
                                     metrics={"listen": f"127.0.0.1:{free_port()}"})
    worker = Worker(ingest_cfg, "ingest-fullpath", tmp_path / "ingest.log")
    committed: dict[tuple[str, int], dict[str, Any]] = {}
    kills = {"gateway": 0, "ingest": 0, "mosquitto": 0, "influxd": 0}
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        config = write_config(tmp_path / "config", devices=device_ports(LAYOUT, servers), broker_port=mosquitto.port,
                              interval="50ms", outbox=outbox_path,
                              sink_extra={"protocol": "5", "delivery": "end_to_end", "receipt_timeout": "2s"})
        worker.start()
        stack.callback(worker.stop)
        await worker.subscribed()
        runs_before = _runs(glog)
        gateway = _gateway(config, glog)
        try:
            for _ in range(EVENTS):
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                what = rng.choice(sorted(kills))
                kills[what] += 1
                if what == "gateway":
                    gateway.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(gateway.wait)
                    _snapshot(outbox_path, committed)
                    await asyncio.sleep(rng.uniform(0.0, 1.0))
                    runs_before = _runs(glog)
                    gateway = _gateway(config, glog)
                elif what == "ingest":
                    await asyncio.to_thread(worker.kill)
                    await asyncio.sleep(rng.uniform(0.0, 1.5))
                    worker.start()
                elif what == "mosquitto":
                    await asyncio.to_thread(mosquitto.kill)
                    await asyncio.sleep(rng.uniform(0.0, 1.5))
                    await asyncio.to_thread(mosquitto.start)
                else:
                    await asyncio.to_thread(influxd.stop)
                    await asyncio.sleep(rng.uniform(0.5, 3.0))
                    await asyncio.to_thread(influxd.start)
            # A clean stop commits what was read; its outbox is the last snapshot. Then one more run
            # delivers it while the devices go on being read. SIGTERM only once it runs: on a busy
            # machine the last restart may still be importing, and then the signal is fatal.
            await until(lambda: _runs(glog) > runs_before, what="the last gateway running",
                        state=lambda: glog.read_text()[-1000:])
            gateway.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(gateway.wait, STOP) == 0, glog.read_text()[-3000:]
            _snapshot(outbox_path, committed)
            gateway = _gateway(config, glog)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            while _missing(committed, await asyncio.to_thread(_database, influxd)):
                assert loop.time() < deadline, (f"{_missing(committed, _database(influxd))} committed readings "
                                                f"not in influxd; positions {_positions(outbox_path)}; kills {kills}")
                await asyncio.sleep(0.5)
        finally:
            if gateway.poll() is None:
                gateway.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(gateway.wait, STOP)
                except subprocess.TimeoutExpired:
                    gateway.kill()  # never leave it behind; the test has failed already or fails now
                    gateway.wait()
                    raise
    db = _database(influxd)
    assert committed, "nothing was ever seen committed: the test exercised nothing"
    gateway_kills = kills["gateway"]
    for device, rows in db.items():
        counts = [fields["count"] for _stamp, fields in rows]
        assert len(counts) == len(set(counts)), f"{device}: a reading stored as more than one point"
        seen = set(counts)
        missing = set(range(1, max(seen) + 1)) - seen
        # Read but killed before their commit: at most a handful per gateway kill.
        assert len(missing) <= 3 * (gateway_kills + 1), f"{device}: {len(missing)} counter values missing"
    by_key = {(device, stamp): fields for device, rows in db.items() for stamp, fields in rows}
    for key, fields in committed.items():
        assert by_key[key] == fields, f"{key}: stored {by_key[key]}, committed {fields}"
    assert "Traceback" not in glog.read_text()
    print(f"full path: {len(committed)} committed readings checked, {sum(map(len, db.values()))} points, "
          f"kills {kills}")
