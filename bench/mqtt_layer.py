"""CPU per QoS 1 message of the MQTT layer's two possible homes for paho's socket: on the event loop
(gateway/mqtt/client.py: add_reader/add_writer, what Sluice uses) and in a paho network thread
(``loop_start()``, completions handed to the loop with ``call_soon_threadsafe``). Both hand a
batch to paho at once and await one future for its PUBACKs, as the sink does; batches of 1 and of
10 messages of 300 bytes to a private Mosquitto. Prints figures; asserts nothing.

    .venv/bin/python bench/mqtt_layer.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from gateway.mqtt import Client, Settings  # noqa: E402
from simulators.broker import Mosquitto  # noqa: E402

PAYLOAD = b"x" * 300
MESSAGES = 20_000


async def on_loop(port: int, batch: int) -> float:
    async with Client(Settings(who="bench", host="127.0.0.1", port=port, client_id=f"loop{batch}", protocol="3.1.1",
                               max_inflight=20)) as client:
        await asyncio.wait_for(client.wait_connected(), 10)
        messages = [(f"bench/loop/{i}", PAYLOAD) for i in range(batch)]
        for _ in range(100):
            await client.publish(messages, 1)
        t0 = time.process_time()
        for _ in range(MESSAGES // batch):
            await client.publish(messages, 1)
        return (time.process_time() - t0) / MESSAGES


async def in_thread(port: int, batch: int) -> float:
    loop = asyncio.get_running_loop()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"thread{batch}", clean_session=False)
    client.max_inflight_messages_set(20)
    pending: dict[int, asyncio.Future[None]] = {}
    lock = threading.Lock()
    counts: dict[asyncio.Future[None], int] = {}

    def done(fut: asyncio.Future[None]) -> None:
        counts[fut] -= 1
        if counts[fut] == 0 and not fut.done():
            fut.set_result(None)

    early: set[int] = set()  # acknowledged before publish() returned its mid to us

    def published(_c: paho.Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        with lock:
            fut = pending.pop(mid, None)
            if fut is None:
                early.add(mid)
        if fut is not None:
            loop.call_soon_threadsafe(done, fut)

    client.on_publish = published
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        await asyncio.to_thread(connected.wait, 10)

        async def send() -> None:
            fut: asyncio.Future[None] = loop.create_future()
            counts[fut] = batch
            for i in range(batch):
                # Not holding our lock across publish(): paho holds its own while calling on_publish.
                mid = client.publish(f"bench/thread/{i}", PAYLOAD, 1).mid
                with lock:
                    if mid in early:
                        early.discard(mid)
                        counts[fut] -= 1
                    else:
                        pending[mid] = fut
            if counts[fut] == 0:
                fut.set_result(None)
            await fut
            del counts[fut]

        for _ in range(100):
            await send()
        t0 = time.process_time()
        for _ in range(MESSAGES // batch):
            await send()
        return (time.process_time() - t0) / MESSAGES
    finally:
        client.disconnect()
        client.loop_stop()


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sluice-mqtt-layer-") as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto")
        await asyncio.to_thread(broker.start)
        try:
            for batch in (1, 10):
                loop_us = [await on_loop(broker.port, batch) * 1e6 for _ in range(3)]
                thread_us = [await in_thread(broker.port, batch) * 1e6 for _ in range(3)]
                print(f"batches of {batch:2d}: event loop {min(loop_us):5.1f} µs CPU per message (runs "
                      f"{', '.join(f'{x:.1f}' for x in loop_us)}); paho thread {min(thread_us):5.1f} µs (runs "
                      f"{', '.join(f'{x:.1f}' for x in thread_us)})", flush=True)
        finally:
            await asyncio.to_thread(broker.stop)


if __name__ == "__main__":
    asyncio.run(main())
