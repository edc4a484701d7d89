"""Shared test plumbing: server fixtures (see servers.py) and the leak check every test gets."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import pytest_asyncio

pytest_plugins = ["servers"]

REPO = Path(__file__).resolve().parent.parent


def _children() -> set[int]:
    me = str(os.getpid())
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[1] == me and fields[0] != "Z":
            found.add(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def _no_leaked_threads_or_processes(request: pytest.FixtureRequest):
    """Fail any test that leaves threads or child processes behind (after a short grace)."""
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + 3.0
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        children = _children() - children_before
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pytest.fail(f"test left behind threads {[t.name for t in threads]} and child processes {sorted(children)}")


@pytest_asyncio.fixture(autouse=True)
async def _no_leaked_tasks():
    """Fail any test that leaves asyncio tasks running."""
    before = asyncio.all_tasks()
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()]
        if not leaked or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    for task in leaked:
        task.cancel()
    # The loop's default executor (the MQTT layer and aiomqtt connect through it; asyncio.to_thread uses it) is
    # the loop's own: shut it down here, before the thread check runs.
    await asyncio.get_running_loop().shutdown_default_executor()
    assert not leaked, f"test left asyncio tasks running: {[t.get_name() for t in leaked]}"
