"""Signal generators for simulated points, declared in profiles under a point's ``sim:`` key.

CONTRACT: the models below are fixed (profiles validate against them); generator code follows.

A generator turns one spec into a value source: ``signal.value(now)`` with ``now`` in seconds
(``time.time()``). Every call of ``value`` is one *read* of the point: time-based signals are
pure functions of ``now - origin``; ``counter`` advances on each call, so the simulator calls
``value`` exactly once per request served that covers the point.
"""

from __future__ import annotations

import math
import random
from typing import Annotated, Literal, Protocol

from pydantic import Field

from gateway.driver import StrictModel
from gateway.units import Duration


class Constant(StrictModel):
    signal: Literal["constant"] = Field(description="constant: always value")
    value: float | int | bool | str = Field(default=0, description="the value served")


class Sine(StrictModel):
    signal: Literal["sine"] = Field(description="sine: between min and max, once per period")
    min: float = Field(default=0.0, description="lowest value")
    max: float = Field(default=1.0, description="highest value")
    period: Duration = Field(default=60.0, gt=0)


class RandomWalk(StrictModel):
    signal: Literal["random_walk"] = Field(description="random_walk: wanders between min and max")
    min: float = Field(default=0.0, description="lowest value")
    max: float = Field(default=100.0, description="highest value")
    step: float = Field(default=1.0, gt=0, description="largest change per second")
    start: float | None = Field(default=None, description="first value; default: the middle")


class Ramp(StrictModel):
    """Rises by ``step`` every ``every`` and wraps from ``max`` back to ``min``."""

    signal: Literal["ramp"] = Field(description="ramp: rises by step every every, wraps at max")
    min: float = Field(default=0.0, description="lowest value")
    max: float = Field(default=100.0, description="highest value")
    step: float = Field(default=1.0, description="rise per every")
    every: Duration = Field(default=1.0, gt=0)


class Counter(StrictModel):
    """Increments by ``step`` on every read of the point: each poll sees the next value."""

    signal: Literal["counter"] = Field(description="counter: start, then step more on every read")
    start: int = Field(default=0, description="first value")
    step: int = Field(default=1, description="added on every read")


class Step(StrictModel):
    """Cycles through ``values``, holding each for ``every``."""

    signal: Literal["step"] = Field(description="step: each of values in turn, for every each")
    values: list[float | int | bool | str] = Field(min_length=1, description="the values, in order")
    every: Duration = Field(default=10.0, gt=0)


SignalSpec = Annotated[Constant | Sine | RandomWalk | Ramp | Counter | Step, Field(discriminator="signal")]


Value = float | int | bool | str

DEFAULT_PERIOD = "10m"
"""Period of the default signal of a point without ``sim:``: slow enough to look like a process."""


class Signal(Protocol):
    """A value source for one simulated point. ``value`` is called once per read."""

    def value(self, now: float) -> Value: ...


class _Constant:
    def __init__(self, spec: Constant) -> None:
        self._value = spec.value

    def value(self, now: float) -> Value:
        return self._value


class _Sine:
    def __init__(self, spec: Sine, origin: float) -> None:
        self._spec, self._origin = spec, origin

    def value(self, now: float) -> Value:
        s = self._spec
        phase = 2 * math.pi * (now - self._origin) / s.period
        return s.min + (s.max - s.min) * (0.5 + 0.5 * math.sin(phase))


class _Ramp:
    def __init__(self, spec: Ramp, origin: float) -> None:
        self._spec, self._origin = spec, origin
        span = abs(spec.max - spec.min)
        # Values per cycle: min, min+step, ... up to the last one not above max, then back to min.
        self._count = int(span / abs(spec.step) + 1e-9) + 1 if spec.step else 1

    def value(self, now: float) -> Value:
        s = self._spec
        n = math.floor((now - self._origin) / s.every) % self._count
        start = s.min if s.step >= 0 else s.max  # a negative step falls from max and wraps to max
        return start + n * s.step


class _Step:
    def __init__(self, spec: Step, origin: float) -> None:
        self._spec, self._origin = spec, origin

    def value(self, now: float) -> Value:
        s = self._spec
        return s.values[math.floor((now - self._origin) / s.every) % len(s.values)]


class _Counter:
    def __init__(self, spec: Counter) -> None:
        self._next, self._step = spec.start, spec.step

    def value(self, now: float) -> Value:
        current = self._next
        self._next += self._step
        return current


class _RandomWalk:
    """A walk on a one-second grid: the value at second k depends only on the seed and k.

    Moves of up to ``step`` per second, reflected at ``min``/``max``. Evaluating is incremental
    (one random draw per elapsed second); going back in time replays from the origin, and a jump
    of more than a day restarts the walk at a position derived from the seed and the second.
    """

    _MAX_REPLAY = 86_400

    def __init__(self, spec: RandomWalk, origin: float, seed: int) -> None:
        self._spec, self._origin, self._seed = spec, origin, seed
        self._restart(0, spec.start if spec.start is not None else (spec.min + spec.max) / 2)

    def _restart(self, tick: int, start: float) -> None:
        self._tick = tick
        self._rng = random.Random(f"{self._seed}:{tick}")
        self._value = min(max(start, self._spec.min), self._spec.max)

    def value(self, now: float) -> Value:
        s = self._spec
        tick = math.floor(now - self._origin)
        if tick < self._tick:
            self._restart(0, s.start if s.start is not None else (s.min + s.max) / 2)
        if tick - self._tick > self._MAX_REPLAY:
            self._restart(tick, random.Random(f"{self._seed}:{tick}").uniform(s.min, s.max))
        while self._tick < tick:
            v = self._value + self._rng.uniform(-s.step, s.step)
            if v > s.max:
                v = 2 * s.max - v
            if v < s.min:
                v = 2 * s.min - v
            self._value = min(max(v, s.min), s.max)
            self._tick += 1
        return self._value


def make_signal(spec: Constant | Sine | RandomWalk | Ramp | Counter | Step, *,
                origin: float = 0.0, seed: int = 0) -> Signal:
    """The generator for ``spec``; time-based signals start at ``origin`` (seconds, like ``now``)."""
    if isinstance(spec, Constant):
        return _Constant(spec)
    if isinstance(spec, Sine):
        return _Sine(spec, origin)
    if isinstance(spec, Ramp):
        return _Ramp(spec, origin)
    if isinstance(spec, Step):
        return _Step(spec, origin)
    if isinstance(spec, Counter):
        return _Counter(spec)
    if isinstance(spec, RandomWalk):
        return _RandomWalk(spec, origin, seed)
    raise TypeError(f"no generator for {spec!r}")


def default_spec(name: str, type_: str, valid_min: float | None = None,
                 valid_max: float | None = None) -> Constant | Sine:
    """The signal of a point whose profile declares no ``sim:``.

    A slow sine across the valid range when both bounds are known; otherwise a constant: 0 (or
    the nearest bound), ``false`` for bool points, the point's name for string points.
    """
    if type_ == "string":
        return Constant(signal="constant", value=name)
    if type_ == "bool":
        return Constant(signal="constant", value=False)
    if valid_min is not None and valid_max is not None:
        # validated as a profile's sim: is (the period is a duration with its unit)
        return Sine.model_validate({"signal": "sine", "min": valid_min, "max": valid_max, "period": DEFAULT_PERIOD})
    value = 0.0
    if valid_min is not None:
        value = max(value, valid_min)
    if valid_max is not None:
        value = min(value, valid_max)
    return Constant(signal="constant", value=int(value) if value == int(value) else value)
