"""One of each waiting and building helper the tests share: poll a condition until a generous
deadline (``until`` in async tests, ``wait_for`` in blocking ones), run pollers as the gateway
does (``running``), build a driver ``Device`` from its settings (``device``), and fail under
``CI=true`` but skip elsewhere when a server or tool is missing (``unavailable``).

Why deadlines and not sleeps: the suite runs on busy 2-core machines (other suites, other
helpers). A fixed sleep followed by a count measures the machine, not the code. Wait for the
state the test needs with a deadline of tens of seconds — on a quiet machine it returns as soon
as the state is reached, so a generous deadline costs nothing. A test that must let time pass to
show that something does *not* happen sleeps a bounded, commented time instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import pytest
from gateway.driver import Device

__all__ = ["DEADLINE", "STOP", "device", "running", "unavailable", "until", "wait_for"]

DEADLINE = 30.0
"""Seconds a test waits for a state before failing: long enough for a loaded machine."""

STOP = 60.0
"""Seconds a process or task gets to stop cleanly (``wait``, ``communicate``, ``wait_for(task)``)."""

T = TypeVar("T")


def _failure(what: str, timeout: float, last: object, state: Callable[[], object] | None) -> AssertionError:
    observed = repr(last)
    if state is not None:
        try:
            observed = repr(state())
        except Exception as exc:  # the state is only for the message: never hide the timeout behind it
            observed = f"<state() raised {exc!r}>"
    return AssertionError(f"{what}: not reached within {timeout:g} s; last observed: {observed}")


async def until(condition: Callable[[], T], timeout: float = DEADLINE, what: str = "condition", *,
                state: Callable[[], object] | None = None, interval: float = 0.02) -> T:
    """Poll ``condition`` every ``interval`` s until it returns something truthy, and return that.

    After ``timeout`` seconds fail with an AssertionError naming ``what`` and the last observed
    state (``state()`` if given, else the condition's last value). For states another task,
    thread or process changes when there is no event to await."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if loop.time() > deadline:
            raise _failure(what, timeout, value, state)
        await asyncio.sleep(interval)


def wait_for(condition: Callable[[], T], timeout: float = DEADLINE, what: str = "condition", *,
             state: Callable[[], object] | None = None, interval: float = 0.05) -> T:
    """:func:`until` for blocking code (fixtures, tests that drive processes without a loop)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _failure(what, timeout, value, state)
        time.sleep(interval)


def unavailable(message: str) -> NoReturn:
    """A server, tool or privilege the test needs is missing: under ``CI=true`` that is a failure
    (CI must exercise everything), elsewhere a skip that says what to install."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


class _Poller(Protocol):
    name: str

    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: object) -> Any: ...
    async def run(self, emit: Callable[[Any], None]) -> None: ...


@contextlib.asynccontextmanager
async def running(*pollers: _Poller, emit: Callable[[Any], None] | None = None) -> AsyncIterator[list[Any]]:
    """Open ``pollers`` and run each in its own task (``poll[name]``) as the gateway does; yields
    the list readings arrive in (or hands them to ``emit``). On leaving, every task is cancelled
    and must not have ended on its own (a poller that dies quietly is a bug)."""
    readings: list[Any] = []
    async with contextlib.AsyncExitStack() as stack:
        for poller in pollers:
            await stack.enter_async_context(poller)
        tasks = [asyncio.create_task(p.run(emit or readings.append), name=f"poll[{p.name}]") for p in pollers]
        try:
            yield readings
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                assert task.cancelled(), f"{task.get_name()} ended on its own: {task.exception()!r}"


def device(model: Any, profile: Any, settings: dict[str, Any], **overrides: Any) -> Any:
    """A driver ``Device`` as the config loader builds it: ``model`` (a driver's DeviceModel)
    validates ``settings`` updated with ``overrides``; profile name ``p``, measurement ``m``, the
    tag ``device=<id>``, and a source file named after the device."""

    cfg = model.model_validate({**settings, **overrides})
    return Device(cfg, profile, "p", {"device": cfg.id}, "m", Path(f"{cfg.id}.yaml"))

