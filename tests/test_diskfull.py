"""Disk full: a small tmpfs holds the outbox and another process fills it. The gateway stays up,
reports unhealthy, keeps what it read in memory, recovers by itself when space returns, and
every reading read is accounted for (committed, held or lost)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from e2e_support import counter_servers, device_ports, write_config
from gateway.app import Gateway
from gateway.config import load_config
from gateway.health import fetch
from servers import free_port
from support import DEADLINE, STOP, unavailable, until

LAYOUT = {0: [("tank-a", 1), ("tank-b", 2)]}


@pytest.fixture
def small_disk(tmp_path: Path):
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    if result.returncode != 0:
        unavailable(
            f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


async def test_disk_full_survives_reports_and_recovers(tmp_path: Path, small_disk: Path, close_default_executor) -> None:
    servers = counter_servers(LAYOUT)
    health_port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        for s in servers:
            await stack.enter_async_context(s)
        cfg = write_config(tmp_path / "cfg", devices=device_ports(LAYOUT, servers), broker_port=None,
                           outbox=small_disk / "outbox.db", buffer_extra={"max_bytes": "1MiB"}, health_port=health_port)
        gw = Gateway(load_config(cfg))
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop), name="gateway-under-test")
        try:
            await asyncio.wait_for(gw.ready.wait(), DEADLINE)
            await until(lambda: gw.committer is not None and gw.committer.stats.commits >= 3)
            committer = gw.committer
            assert committer is not None

            # Another process fills the disk.
            filler = small_disk / "filler"
            dd = await asyncio.create_subprocess_exec("dd", "if=/dev/zero", f"of={filler}", "bs=64k",
                                                      stdout=asyncio.subprocess.DEVNULL,
                                                      stderr=asyncio.subprocess.PIPE)
            _out, err = await dd.communicate()
            assert dd.returncode != 0 and b"No space left" in err

            await until(lambda: committer.failing and committer.pending > 0)
            assert not task.done()  # still up
            code, body = await asyncio.to_thread(fetch, "127.0.0.1", health_port, "/healthz")
            state = json.loads(body)
            assert code == 503 and not state["ready"] and state["live"], state
            assert any("outbox not writable" in r for r in state["reasons"])
            _code, metrics = await asyncio.to_thread(fetch, "127.0.0.1", health_port, "/metrics")
            assert "sluice_outbox_commit_failures_total 0\n" not in metrics
            held = committer.pending

            # Space returns: the gateway recovers by itself and stores what it held.
            filler.unlink()
            await until(lambda: not committer.failing and committer.pending < held)
            code, _body = await asyncio.to_thread(fetch, "127.0.0.1", health_port, "/healthz")
            assert code == 200
        finally:
            stop.set()
            await asyncio.wait_for(task, STOP)
    stats = committer.stats
    assert stats.failed_commits > 0
    assert stats.received == stats.committed + committer.pending + stats.lost
    assert committer.pending == 0 and stats.lost == 0  # held readings all went in after recovery
    with contextlib.closing(sqlite3.connect(small_disk / "outbox.db")) as db:
        rows, dropped = db.execute("SELECT rows, dropped FROM state").fetchone()
        assert db.execute("SELECT count(*) FROM readings").fetchone()[0] == rows
    assert rows + dropped == stats.committed
