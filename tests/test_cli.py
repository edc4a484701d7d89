"""The `sluice` command as a user runs it: once, run + SIGTERM, demo."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from e2e_support import counter_servers, device_ports, write_config
from support import STOP, until

from gateway.cli.examples import shipped_config
import gateway.cli.demo as demo

SLUICE = [sys.executable, "-m", "gateway.cli"]
LAYOUT = {0: [("a", 1), ("b", 2)]}


async def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [*SLUICE, *args], capture_output=True, text=True, timeout=timeout)


async def test_once_prints_one_reading_per_device_and_publishes_nothing(tmp_path: Path) -> None:
    servers = counter_servers(LAYOUT)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        config = write_config(tmp_path, devices=device_ports(LAYOUT, servers), broker_port=None)
        proc = await _run("once", "-c", str(config), "--json")
    assert proc.returncode == 0, proc.stderr
    readings = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["device"] for r in readings) == ["a", "b"]
    assert all(r["fields"]["count"] == 1 and r["quality"] == "good" for r in readings)
    assert not (tmp_path / "outbox.db").exists(), "`once` must not touch the outbox"
    await asyncio.get_running_loop().shutdown_default_executor()


async def test_once_reports_silent_devices_and_exits_non_zero(tmp_path: Path) -> None:
    config = write_config(tmp_path, devices={"ghost": (1, 1)}, broker_port=None)
    proc = await _run("once", "-c", str(config))
    assert proc.returncode == 1
    assert "ghost: no answer" in proc.stderr and "Traceback" not in proc.stderr
    await asyncio.get_running_loop().shutdown_default_executor()


async def test_run_and_lot_on_an_unusable_state_directory_say_so_without_a_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = write_config(tmp_path, devices={}, broker_port=None, outbox=blocker / "outbox.db")
    (config / "trace.yaml").write_text("locations: {room: {read_point: \"urn:epc:id:sgln:4012345.00001.0\"}}\n")
    for args in (("run",), ("lot", "start", "LOT-1", "room")):
        proc = await _run(*args, "-c", str(config))
        assert proc.returncode == 1, proc.stderr
        assert f"outbox {blocker / 'outbox.db'}" in proc.stderr and "check buffer.path in gateway.yaml" in proc.stderr
        assert "Traceback" not in proc.stderr
    await asyncio.get_running_loop().shutdown_default_executor()


async def test_run_stops_cleanly_on_sigterm_and_keeps_what_it_read(tmp_path: Path) -> None:
    servers = counter_servers(LAYOUT)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        # A sink whose broker is not there: everything read must stay in the outbox.
        config = write_config(tmp_path, devices=device_ports(LAYOUT, servers), broker_port=1)
        proc = subprocess.Popen([*SLUICE, "run", "-c", str(config)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:  # SIGTERM once it polls: before it runs, the signal is simply fatal
            await until(lambda: sum(s.stats.count(function=3) for s in servers) >= 10, what="10 polls by `sluice run`")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.to_thread(proc.communicate, timeout=STOP)
        served = sum(s.stats.count(function=3) for s in servers)
    assert proc.returncode == 0, out
    match = re.search(r"gateway stopped: (\d+) readings committed this run, (\d+) lost .*, (\d+) left in the outbox", out)
    assert match, out
    committed, lost, left = int(match.group(1)), int(match.group(2)), int(match.group(3))
    assert committed == left == served and lost == 0, out
    await asyncio.get_running_loop().shutdown_default_executor()


async def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    # The health endpoint's default port is taken (a gateway running on this box): the demo uses a free one.
    holder = socket.socket()
    with contextlib.suppress(OSError):  # already taken by someone else: just as good
        holder.bind(("127.0.0.1", 9108))
        holder.listen()
    with holder:
        proc = await asyncio.to_thread(subprocess.run, [*SLUICE, "demo", "--duration", "4s"], capture_output=True,
                                       text=True, timeout=90, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "health endpoint" not in proc.stdout + proc.stderr  # no "cannot listen … address already in use"
    final = proc.stdout.rsplit("demo stopped.", 1)[0]
    for device in ("workshop-meter", "greenhouse-1", "greenhouse-2", "coldroom-1"):
        assert re.search(rf"{device}\s+#\d+", final), f"no reading shown for {device}:\n{final}"
    delivered = re.search(r"sink demo-broker: (\d+) readings delivered", final)
    received = re.search(r"a subscriber received (\d+) readings", final)
    assert delivered and int(delivered.group(1)) > 0, final
    assert received and int(received.group(1)) > 0, final
    assert not list(tmp_path.iterdir()), "the demo must leave nothing behind in the working directory"
    await asyncio.get_running_loop().shutdown_default_executor()


async def test_demo_without_mosquitto_still_reads_into_the_outbox(monkeypatch, capsys) -> None:
    monkeypatch.setattr(demo, "find_mosquitto", lambda: None)
    assert await demo.demo(3.0, shipped_config()) == 0
    out = capsys.readouterr().out
    assert "No `mosquitto` binary found" in out and "apt-get install mosquitto" in out
    final = out.rsplit("demo stopped.", 1)[0].rsplit("\n\n", 1)[-1]
    committed = re.search(r"outbox: (\d+) readings committed", final)
    assert committed and int(committed.group(1)) > 0, final
    assert "sink " not in final  # nothing to forward to
