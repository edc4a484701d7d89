"""Back on the wire within about a probe interval of the server's return, whatever the backoff had
reached: the MQTT sink (and so the trace feed's MQTT sink), `sluice ingest` towards the broker, and
`sluice ingest` towards InfluxDB. Outages of random length (seeded: SLUICE_SEED); the backoff is
set to 30 s so that a reconnect paced by it would miss the deadlines below — the probe is what
brings the link back. The delays themselves are measured by bench/reconnect.py, not asserted here.
The MQTT sink goes through 10 outages of 1–3 s (SLUICE_SOAK=1: of 1–20 s), the ingest through 3
(SLUICE_SOAK=1: 10 of 1–20 s); each delay is printed (`pytest -s`)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from pathlib import Path

import pytest
from servers import Influxd, Mosquitto, subscriber
from test_ingest import counter_payloads, publisher, running, stored_counts, v1
from test_ingest import write_config as write_ingest_config
from support import until
from test_mqtt import sink_config, site_for

from gateway.sinks.mqtt import MqttSink

pytestmark = pytest.mark.usefixtures("close_default_executor")

SOAK = os.environ.get("SLUICE_SOAK") == "1"
OUTAGES = 10 if SOAK else 3
SINK_OUTAGES = 10
LONGEST = 20.0 if SOAK else 3.0
DEADLINE = 15.0
"""Seconds after the server's return by which the link must be back: generous for a loaded box,
and half the 30 s backoff, so a reconnect that waited for the backoff fails."""


async def test_mqtt_sink_reconnects_after_each_outage_without_waiting_for_its_backoff(
        mosquitto: Mosquitto, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(os.environ.get("SLUICE_SEED", "20261202"))
    site = site_for(request)
    cfg = sink_config(mosquitto.port, protocol="5", reconnect_min="30s", reconnect_max="30s")
    async with subscriber(mosquitto.host, mosquitto.port, f"sluice/{site}/gw1/data", client_id=f"sub-{site}"[:60]) as sub:
        with caplog.at_level(logging.DEBUG, logger="gateway.mqtt"):
            async with MqttSink("edge", cfg, "gw1", site) as sink:
                await until(lambda: sink.connected, 15, "first connect")
                delays = []
                for n in range(SINK_OUTAGES):
                    await asyncio.to_thread(mosquitto.kill)
                    await until(lambda: not sink.connected, 15, "loss noticed")
                    await asyncio.sleep(rng.uniform(1.0, LONGEST))
                    await asyncio.to_thread(mosquitto.start)  # returns once it accepts connections
                    reopened = time.time()
                    await until(lambda n=n: sink.connects == n + 2, DEADLINE, f"outage {n + 1}: reconnected")
                    # Sent until the subscriber sees it: its session may have died with the broker's
                    # SIGKILL, and it resubscribes on its own schedule.
                    mark = f"after {n + 1}".encode()
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + DEADLINE
                    while not any(m.payload == mark for m in sub.messages):
                        assert loop.time() < deadline, f"outage {n + 1}: nothing delivered"
                        await sink.send([(f"sluice/{site}/gw1/data", mark)])
                        await asyncio.sleep(0.2)
                    delays.append(time.time() - reopened)
                    # The mechanism, from the sink's own log: its connect follows the reopening (no
                    # full connect was made while the broker was down, only probes).
                    back = [r for r in caplog.records if re.search(r"connected to .* after [\d.]+ s without", r.getMessage())]
                    assert len(back) == n + 1 and back[-1].created >= reopened - 0.05
    print("broker back -> delivered, per outage (s):", " ".join(f"{d:.2f}" for d in delays))
    failures = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert all("probing every 1 s" in text for text in failures), failures
    assert len(failures) <= SINK_OUTAGES  # one line per outage at most (the loss itself is the other)


async def test_ingest_reconnects_to_the_broker_and_resumes_writing_to_influxd(
        tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd) -> None:
    rng = random.Random(os.environ.get("SLUICE_SEED", "20261202"))
    cfg = write_ingest_config(tmp_path / "ingest.yaml", mosquitto, v1(influxd),
                              mqtt={"reconnect_min": "30s", "reconnect_max": "30s"})
    text = cfg.read_text().replace("retry_min: 50ms", "retry_min: 30s").replace("retry_max: 300ms", "retry_max: 30s")
    cfg.write_text(text)
    payloads = counter_payloads(2 * OUTAGES, 5, devices=1)
    sent = 0
    async with running(cfg) as ingest:
        for n in range(OUTAGES):
            # the broker goes away and comes back: the ingest's session resumes
            await asyncio.to_thread(mosquitto.kill)
            await until(lambda: not ingest.connected, DEADLINE, "loss noticed")
            await asyncio.sleep(rng.uniform(1.0, LONGEST))
            await asyncio.to_thread(mosquitto.start)
            await until(lambda: ingest.connected, DEADLINE, f"broker outage {n + 1}: reconnected")
            # the database goes away while a message waits, and comes back
            await asyncio.to_thread(influxd.stop)
            async with publisher(mosquitto) as pub:
                for topic, payload in payloads[sent:sent + 2]:
                    await pub.publish(topic, payload, qos=1)
            sent += 2
            retries = ingest.stats.retries
            await until(lambda r=retries: ingest.stats.retries > r, DEADLINE, "a failed write")
            await asyncio.sleep(rng.uniform(1.0, LONGEST))
            await asyncio.to_thread(influxd.start)
            # (acknowledgement counts include messages the killed broker sent again: look in the database)
            await until(lambda s=sent: set(stored_counts(influxd)) >= set(range(s * 5)), DEADLINE,
                        f"database outage {n + 1}: written")
    assert stored_counts(influxd) == list(range(sent * 5))
