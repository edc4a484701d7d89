"""Signal generators for simulated points, declared in profiles under a point's ``sim:`` key.

CONTRACT: the models below are fixed (profiles validate against them); generator code follows.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gateway.driver import StrictModel
from gateway.units import Duration


class Constant(StrictModel):
    signal: Literal["constant"]
    value: float | int | bool | str = 0


class Sine(StrictModel):
    signal: Literal["sine"]
    min: float = 0.0
    max: float = 1.0
    period: Duration = Field(default=60.0, gt=0)


class RandomWalk(StrictModel):
    signal: Literal["random_walk"]
    min: float = 0.0
    max: float = 100.0
    step: float = Field(default=1.0, gt=0, description="largest change per second")
    start: float | None = None


class Ramp(StrictModel):
    """Rises by ``step`` every ``every`` and wraps from ``max`` back to ``min``."""

    signal: Literal["ramp"]
    min: float = 0.0
    max: float = 100.0
    step: float = 1.0
    every: Duration = Field(default=1.0, gt=0)


class Counter(StrictModel):
    """Increments by ``step`` on every read of the point: each poll sees the next value."""

    signal: Literal["counter"]
    start: int = 0
    step: int = 1


class Step(StrictModel):
    """Cycles through ``values``, holding each for ``every``."""

    signal: Literal["step"]
    values: list[float | int | bool | str] = Field(min_length=1)
    every: Duration = Field(default=10.0, gt=0)


SignalSpec = Annotated[Constant | Sine | RandomWalk | Ramp | Counter | Step, Field(discriminator="signal")]
