"""The shared test helpers keep their contracts: a wait returns as soon as its condition holds and
fails naming what it waited for and the last state it saw; a missing tool fails under CI=true."""

from __future__ import annotations

import pytest
from support import unavailable, until, wait_for


async def test_until_returns_the_conditions_value_as_soon_as_it_holds() -> None:
    calls = []

    def ready() -> list[int] | None:
        calls.append(1)
        return calls if len(calls) >= 3 else None

    assert await until(ready, interval=0.001) == [1, 1, 1]
    assert len(calls) == 3


async def test_until_fails_with_what_and_the_last_state() -> None:
    state = {"acked": 2}
    with pytest.raises(AssertionError, match=r"3 acknowledged: not reached within 0\.05 s; last observed: \{'acked': 2\}"):
        await until(lambda: state["acked"] == 3, 0.05, "3 acknowledged", state=lambda: state)
    with pytest.raises(AssertionError, match=r"condition: not reached within 0\.05 s; last observed: \[\]"):
        await until(list, 0.05)  # without state(): the condition's last value


def test_wait_for_is_the_same_for_blocking_code() -> None:
    assert wait_for(lambda: "up", 0.05) == "up"
    with pytest.raises(AssertionError, match=r"the port: not reached .* last observed: <state\(\) raised ZeroDivisionError"):
        wait_for(lambda: False, 0.05, "the port", state=lambda: 1 / 0)


def test_unavailable_fails_under_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="socat is not installed"):
        unavailable("socat is not installed")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="socat is not installed"):
        unavailable("socat is not installed")
