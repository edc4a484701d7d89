"""Signal generators: deterministic, pure in time where they should be, counters advance per read."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from drivers.signals import SignalSpec, default_spec, make_signal

SPEC: TypeAdapter[Any] = TypeAdapter(SignalSpec)


def sig(origin: float = 0.0, seed: int = 0, **spec: Any) -> Any:
    return make_signal(SPEC.validate_python(spec), origin=origin, seed=seed)


def test_constant() -> None:
    s = sig(signal="constant", value=21.5)
    assert [s.value(t) for t in (0, 1e9)] == [21.5, 21.5]


def test_sine_spans_min_max_over_one_period() -> None:
    s = sig(origin=1000.0, signal="sine", min=-10, max=30, period="40s")
    assert s.value(1000.0) == pytest.approx(10.0)
    assert s.value(1010.0) == pytest.approx(30.0)
    assert s.value(1030.0) == pytest.approx(-10.0)
    assert s.value(1040.0) == pytest.approx(10.0, abs=1e-9)


@pytest.mark.parametrize(("spec", "expected"), [
    ({"min": 0, "max": 3, "step": 1, "every": "1s"}, [0, 1, 2, 3, 0, 1, 2, 3, 0]),
    ({"min": 0, "max": 10, "step": 3, "every": "1s"}, [0, 3, 6, 9, 0, 3, 6, 9, 0]),
    ({"min": 10, "max": 12, "step": 1, "every": "2s"}, [10, 10, 11, 11, 12, 12, 10, 10, 11]),
    ({"min": 0, "max": 2, "step": -1, "every": "1s"}, [2, 1, 0, 2, 1, 0, 2, 1, 0]),
    ({"min": 0, "max": 1, "step": 0.25, "every": "500ms"}, [0, 0.5, 1.0, 0.25, 0.75, 0, 0.5, 1.0, 0.25]),
])
def test_ramp_rises_and_wraps(spec: dict[str, Any], expected: list[float]) -> None:
    """Sampled once a second from the origin: the value holds for ``every``, wraps past max."""
    s = sig(origin=500.0, signal="ramp", **spec)
    assert [s.value(500.0 + i + 0.01) for i in range(len(expected))] == pytest.approx(expected)


def test_step_cycles_through_values_holding_each() -> None:
    s = sig(origin=100.0, signal="step", values=[1, "two", True], every="10s")
    got = [s.value(100.0 + t) for t in (0, 9.99, 10, 25, 30, 41)]
    assert got == [1, 1, "two", True, 1, "two"]


def test_counter_advances_on_every_read_not_with_time() -> None:
    s = sig(signal="counter", start=5, step=2)
    assert [s.value(0.0) for _ in range(4)] == [5, 7, 9, 11]
    assert s.value(1e9) == 13


def test_random_walk_is_deterministic_and_bounded() -> None:
    spec = {"signal": "random_walk", "min": 0, "max": 10, "step": 3, "start": 9}
    a, b, c = sig(seed=7, **spec), sig(seed=7, **spec), sig(seed=8, **spec)
    times = [0.5, 1.5, 2.0, 7.2, 100.0, 99.0, 3.0, 400.0]
    va = [a.value(t) for t in times]
    # Same seed, same value at a given second, whatever was read before (here: reads in order).
    assert va == [dict((t, b.value(t)) for t in sorted(times))[t] for t in times]
    assert va != [c.value(t) for t in times]
    assert va[0] == 9  # no whole second has passed yet
    assert all(0 <= v <= 10 for v in va)
    moves = [abs(a.value(t + 1.0) - a.value(float(t))) for t in range(200)]
    assert max(moves) <= 3 + 1e-9 and sum(moves) > 0


def test_random_walk_long_gap_is_quick() -> None:
    s = sig(seed=1, signal="random_walk", min=0, max=1, step=0.1)
    v = s.value(1.7e9)  # e.g. origin 0 and a wall-clock now: must not replay 54 years
    assert 0 <= v <= 1 and s.value(1.7e9) == v


@pytest.mark.parametrize(("args", "expected"), [
    (("t", "float32", -10.0, 40.0), {"signal": "sine", "min": -10.0, "max": 40.0, "period": 600.0}),
    (("t", "int16", None, None), {"signal": "constant", "value": 0}),
    (("t", "uint16", 5.0, None), {"signal": "constant", "value": 5}),
    (("t", "int16", None, -3.0), {"signal": "constant", "value": -3}),
    (("alarm", "bool", 0.0, 1.0), {"signal": "constant", "value": False}),
    (("serial", "string", None, None), {"signal": "constant", "value": "serial"}),
])
def test_default_signal(args: tuple[Any, ...], expected: dict[str, Any]) -> None:
    assert default_spec(*args).model_dump() == expected


def test_default_sine_is_slow() -> None:
    s = make_signal(default_spec("t", "float32", 0.0, 100.0), origin=0.0)
    assert abs(s.value(1.0) - s.value(0.0)) < 100 * 2 * math.pi / 600  # < 1.1 units per second


def test_specs_are_strict() -> None:
    with pytest.raises(ValidationError):
        SPEC.validate_python({"signal": "sine", "perod": "1s"})
    with pytest.raises(ValidationError):
        SPEC.validate_python({"signal": "ramp", "every": 5})  # a duration needs its unit
