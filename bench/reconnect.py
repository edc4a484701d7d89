"""How soon after a broker outage the gateway is back on the wire: ``sluice run`` (simulated Modbus
devices polled every 100 ms, the MQTT sink with its default reconnect settings: 0.5–30 s backoff)
publishes to a private Mosquitto that is SIGKILLed and started again on the same port after a
random 1–20 s, ten times. For each outage the figure is the delay from the broker accepting
connections again (``Mosquitto.start`` returns once a TCP connect succeeds) to the first data
message a raw paho subscriber (not Sluice's code; it reconnects every 50 ms, clean session, so it
is back before the gateway and holds no old queue) receives.

Prints figures; asserts nothing (tests/test_reconnect.py asserts the mechanism).

    .venv/bin/python bench/reconnect.py            # 10 outages of 1–20 s (about 4 minutes)
    .venv/bin/python bench/reconnect.py --quick    # 3 outages of 1–5 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from e2e_support import counter_servers, device_ports, write_config  # noqa: E402
from simulators.broker import Mosquitto  # noqa: E402

LAYOUT = {0: [("a", 1), ("b", 2)]}


class Subscriber:
    """A plain paho client in its own thread: arrival times (time.time()) of data messages."""

    def __init__(self, port: int, topic: str) -> None:
        self.arrivals: list[float] = []
        self.port, self.topic = port, topic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="subscriber", daemon=True)

    def __enter__(self) -> Subscriber:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}", clean_session=True)
            client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(self.topic, 1)
            client.on_message = lambda _c, _u, m: (None if m.topic.endswith("/status")
                                                   else self.arrivals.append(time.time()))
            try:
                client.connect("127.0.0.1", self.port, keepalive=5)
            except OSError:
                time.sleep(0.05)
                continue
            while not self._stop.is_set() and client.loop(0.05) == paho.MQTT_ERR_SUCCESS:
                pass
            with contextlib.suppress(Exception):
                client.disconnect()
            time.sleep(0.05)


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    outages, longest = (3, 5.0) if args.quick else (10, 20.0)
    with tempfile.TemporaryDirectory(prefix="sluice-reconnect-") as tmp_name:
        tmp = Path(tmp_name)
        broker = Mosquitto(tmp / "mosquitto")
        servers = counter_servers(LAYOUT)
        async with contextlib.AsyncExitStack() as stack:
            for server in servers:
                await stack.enter_async_context(server)
            await asyncio.to_thread(broker.start)
            stack.callback(broker.stop)
            cfg = write_config(tmp / "cfg", devices=device_ports(LAYOUT, servers), broker_port=broker.port,
                               sink_extra={"reconnect_min": "500ms", "reconnect_max": "30s"})
            log = tmp / "gateway.log"
            with log.open("ab") as out:
                gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)], cwd=REPO,
                                           stdout=out, stderr=out, stdin=subprocess.DEVNULL)
            delays: list[float] = []
            try:
                with Subscriber(broker.port, "sluice/lab/gw-test/#") as sub:
                    while not sub.arrivals:  # noqa: ASYNC110 (filled by a thread: polled)
                        await asyncio.sleep(0.1)
                    for n in range(outages):
                        await asyncio.sleep(2.0)
                        down = rng.uniform(1.0, longest)
                        await asyncio.to_thread(broker.kill)
                        await asyncio.sleep(down)
                        await asyncio.to_thread(broker.start)
                        reopened = time.time()
                        deadline = reopened + 60
                        while not any(t > reopened for t in sub.arrivals):
                            if time.time() > deadline:
                                raise RuntimeError(f"nothing delivered within 60 s of outage {n + 1}\n"
                                                   f"{log.read_text()[-3000:]}")
                            await asyncio.sleep(0.01)
                        delay = min(t for t in sub.arrivals if t > reopened) - reopened
                        delays.append(delay)
                        print(f"outage {n + 1:2d}: broker down {down:5.1f} s (SIGKILL), first delivery "
                              f"{delay:5.2f} s after it accepted connections again", flush=True)
            finally:
                gateway.send_signal(signal.SIGTERM)
                gateway.wait(30)
    print(f"{len(delays)} outages: first delivery after the broker's return — min {min(delays):.2f} s, "
          f"median {statistics.median(delays):.2f} s, max {max(delays):.2f} s (goal: ≤ 5 s every time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", default="20261202")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
