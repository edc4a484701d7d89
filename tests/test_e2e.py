"""End to end with real parts: simulator -> gateway -> outbox -> real Mosquitto -> subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from e2e_support import counter_servers, counts_by_device, device_ports, write_config
from gateway.app import Gateway
from gateway.config import load_config
from servers import subscriber
from support import DEADLINE, STOP

# Two connections: two units behind one TCP gateway, one device on its own port.
LAYOUT = {0: [("tank-a", 1), ("tank-b", 2)], 1: [("press", 1)]}
TOPIC = "sluice/lab/gw-test/#"
# How long the broker is away: long enough for many polls and failed reconnects; SLUICE_SOAK=1
# makes it the 30 s it once was by default.
OUTAGE = 30.0 if os.environ.get("SLUICE_SOAK") == "1" else 5.0


@contextlib.asynccontextmanager
async def running_gateway(config_dir: Path):
    stop = asyncio.Event()
    gateway = Gateway(load_config(config_dir))
    task = asyncio.create_task(gateway.run(stop), name="gateway-under-test")
    try:
        await asyncio.wait_for(gateway.ready.wait(), DEADLINE)
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, STOP)


def _data(collector) -> list[bytes]:
    return [m.payload for m in collector.messages if not m.topic.endswith("/status")]


def _statuses(gateway: Gateway) -> dict:
    """Each device's poll status (live objects: they keep counting until the pollers stop)."""
    return {device: status for poller in gateway.pollers for device, status in poller.status.items()}


def _failed(statuses: dict) -> dict[str, int]:
    """Failed requests per device: a read the simulator served but the gateway gave up on (a timeout
    on a busy machine) leaves a gap in the counter that is not a loss."""
    return {device: sum(status.errors.values()) for device, status in statuses.items()}


def _gaps(values: list[int]) -> int:
    """Counter values missing from 1 to the highest one received."""
    return len(set(range(1, max(values) + 1)) - set(values))


def _received(collector) -> int:
    """Distinct counter values received, over all devices."""
    return sum(len(set(v)) for v in counts_by_device(_data(collector)).values())


@pytest.mark.parametrize("fmt", ["influx"])
async def test_every_counter_value_arrives_once_in_order(tmp_path: Path, mosquitto, close_default_executor, fmt: str) -> None:
    servers = counter_servers(LAYOUT)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        config = write_config(tmp_path, devices=device_ports(LAYOUT, servers), broker_port=mosquitto.port, fmt=fmt)
        collector = await stack.enter_async_context(subscriber(mosquitto.host, mosquitto.port, TOPIC))
        async with running_gateway(config) as gateway:
            await collector.wait_until(
                lambda _m: all(len(v) >= 30 for v in counts_by_device(_data(collector)).values())
                and len(counts_by_device(_data(collector))) == 3, timeout=60)
            statuses = _statuses(gateway)
        stats = gateway.final_stats
        assert stats is not None
        failed = _failed(statuses)
        # The clean stop committed what was read; the subscriber may still be receiving the tail.
        served = sum(s.stats.count(function=3) for s in servers)
        await collector.wait_until(lambda _m: _received(collector) + stats.rows + sum(failed.values()) >= served,
                                   timeout=DEADLINE)
    counts = counts_by_device(_data(collector))
    assert sorted(counts) == ["press", "tank-a", "tank-b"]
    for device, values in counts.items():
        assert values == sorted(set(values)), f"{device}: duplicate or disorder in {values}"
        assert _gaps(values) <= failed[device], f"{device}: gap in {values} beyond its {failed[device]} failed polls"
    # Every read the simulator served was delivered or is still in the outbox (a batch cancelled
    # by the stop after its PUBACK but before its ack is both: it will be sent again).
    delivered = sum(len(v) for v in counts.values())
    assert delivered <= served <= delivered + stats.rows + sum(failed.values())


async def test_broker_outage_loses_nothing_and_delivers_oldest_first(tmp_path: Path, mosquitto, close_default_executor) -> None:
    outage = OUTAGE
    servers = counter_servers(LAYOUT)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        config = write_config(tmp_path, devices=device_ports(LAYOUT, servers), broker_port=mosquitto.port,
                              interval="200ms")
        collector = await stack.enter_async_context(
            subscriber(mosquitto.host, mosquitto.port, TOPIC, client_id="outage-watcher"))
        async with running_gateway(config) as gateway:
            await collector.wait_until(lambda _m: len(counts_by_device(_data(collector))) == 3, timeout=30)
            await asyncio.to_thread(mosquitto.stop)
            before = {d: len(v) for d, v in counts_by_device(_data(collector)).items()}
            await asyncio.sleep(outage)
            during = gateway.outbox.stats().rows  # type: ignore[union-attr]
            await asyncio.to_thread(mosquitto.start)
            read_during = {s: None for s in servers}
            del read_during
            await collector.wait_until(lambda _m: gateway.outbox.stats().rows == 0, timeout=60)  # type: ignore[union-attr]
            statuses = _statuses(gateway)
        stats = gateway.final_stats
        assert stats is not None
        failed = _failed(statuses)
        served = sum(s.stats.count(function=3) for s in servers)  # the tail may still be on its way
        await collector.wait_until(lambda _m: _received(collector) + stats.rows + sum(failed.values()) >= served,
                                   timeout=DEADLINE)
    # Polling went on during the outage (≈ 3 devices × 5/s × 30 s) and everything was kept.
    assert during >= 3 * 4 * outage * 0.8
    counts = counts_by_device(_data(collector))
    for device, values in counts.items():
        assert _gaps(values) <= failed[device], f"{device}: lost values beyond its {failed[device]} failed polls"
        # Oldest first: the backlog arrived in read order after the broker returned.
        after = values[before[device]:]
        assert after == sorted(after), f"{device}: backlog out of order"
        assert len(values) - len(set(values)) <= 5, f"{device}: more than a failed batch was sent twice"
