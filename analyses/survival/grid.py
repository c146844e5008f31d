"""The survival analyses' public time grid, shared parameters and sdc width search."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field

from analyses.base import (
    AnalysisContext,
    Params,
    RoundState,
)
from protocol.config import BinaryVariable, DataDictionary, NumericVariable
from protocol.errors import DisclosureError, InternalError, ValidationError
from protocol.records import MAX_CELLS, AggregateRecord

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Slack when placing a time on the grid, so 0.196 / 0.001 lands on 196, not 197.
GRID_SLACK = 1e-9
#: Candidate grid widths in sdc mode: these multiples of time_resolution, then (10, 12, ..., 80)
#: times powers of ten, so each width is a whole multiple of the requested one.
LADDER_FIRST = (1, 2, 3, 4, 5, 6, 8)
LADDER = (10, 12, 15, 20, 25, 30, 40, 50, 60, 80)


@dataclass(frozen=True)
class TimeGrid:
    """Public time grid: points ``start + k * width`` for k = 0..size-1."""

    start: float
    width: float
    size: int

    @classmethod
    def spanning(cls, low: float, high: float, width: float) -> TimeGrid:
        size = math.ceil((high - low) / width - GRID_SLACK) + 1
        return cls(float(low), float(width), max(int(size), 1))

    def index(self, times: FloatArray) -> IntArray:
        """Grid point of each time: the first point at or after it."""
        k = np.ceil((times - self.start) / self.width - GRID_SLACK)
        return np.clip(k, 0, self.size - 1).astype(np.int64)

    def index_sql(self, times: Any) -> Any:
        """:meth:`index` as a SQL expression (pushdown): the same double arithmetic, so a time
        lands on the same point in the source as in memory; constants are bound parameters."""
        import sqlalchemy as sa

        def bound(value: float) -> Any:
            return sa.bindparam(None, float(value), type_=sa.Double)

        k = sa.func.ceil((times - bound(self.start)) / bound(self.width) - bound(GRID_SLACK))
        last = float(self.size - 1)
        return sa.case((k < bound(0.0), 0.0), (k > bound(last), last), else_=k)

    def points(self) -> FloatArray:
        return self.start + self.width * np.arange(self.size, dtype=np.float64)


def require_time_event(dictionary: DataDictionary, time: str, event: str) -> None:
    if not isinstance(dictionary.variable(time), NumericVariable):
        raise ValidationError(
            f"time variable {time!r} is {dictionary.variable(time).type}; survival analyses need "
            "a numeric time variable"
        )
    if not isinstance(dictionary.variable(event), BinaryVariable):
        raise ValidationError(
            f"event variable {event!r} is {dictionary.variable(event).type}; survival analyses "
            "need a binary event indicator (1 = event, 0 = censored)"
        )
    if time == event:
        raise ValidationError(f"time and event must be different variables, got {time!r} twice")


class SurvivalParams(Params):
    time: str
    event: str
    time_resolution: float = Field(default=1.0, gt=0, description="grid width in time units")
    horizon: float | None = Field(default=None, description="censor every time after this one")
    dp_intervals: int = Field(default=20, ge=1, le=1000, description="public intervals in dp")


#: sdc: a horizon lies on a public grid of the dictionary's bounds of the time variable, with a
#: round step (1, 2 or 5 times a power of ten) of at least 1/HORIZON_STEPS of the range, so that
#: a binary search on the horizon cannot walk up to a small site's event times.
HORIZON_STEPS = 20


def horizon_step(low: float, high: float) -> float:
    """The public grid's step: the smallest 1, 2 or 5 x 10^k at least (high - low) / 20."""
    least = (high - low) / HORIZON_STEPS
    power = 10.0 ** math.floor(math.log10(least))
    for factor in (1, 2, 5, 10):
        if factor * power >= least * (1 - 1e-12):
            return factor * power
    return 10 * power  # pragma: no cover - the loop always returns


def check_sdc_horizon(params: SurvivalParams, ctx: AnalysisContext) -> None:
    """sdc: refuse a horizon off the public grid (the site checks, whatever a coordinator sent).

    Raises:
        DisclosureError: naming the grid.
    """
    if ctx.mode != "sdc" or params.horizon is None:
        return
    low, high = ctx.dictionary.bounds(params.time)
    step = horizon_step(low, high)
    k = (params.horizon - low) / step
    if abs(k - round(k)) > 1e-9 and params.horizon != high:
        raise DisclosureError(
            f"in sdc a horizon lies on the public grid {low:g} + k * {step:g} of {params.time!r} "
            f"(or at its maximum, {high:g}); {params.horizon:g} is not on it"
        )


def time_range(params: SurvivalParams, dictionary: DataDictionary) -> tuple[float, float]:
    low, high = dictionary.bounds(params.time)
    if params.horizon is not None:
        high = min(high, params.horizon)
    return low, high


def check_survival_params(
    params: SurvivalParams, dictionary: DataDictionary, cells_per_point: int
) -> None:
    require_time_event(dictionary, params.time, params.event)
    low, high = dictionary.bounds(params.time)
    if params.horizon is not None and not low < params.horizon <= high:
        raise ValidationError(
            f"horizon {params.horizon!r} must lie in ({low:g}, {high:g}], the dictionary's range "
            f"of {params.time!r}"
        )
    low, high = time_range(params, dictionary)
    size = TimeGrid.spanning(low, high, params.time_resolution).size
    if size * cells_per_point > MAX_CELLS:
        finest = (high - low) * cells_per_point / (MAX_CELLS - cells_per_point)
        raise ValidationError(
            f"time_resolution {params.time_resolution:g} makes a grid of {size} points over "
            f"[{low:g}, {high:g}], {size * cells_per_point} cells per release; at most "
            f"{MAX_CELLS} are allowed: use time_resolution >= {finest:.3g} or a horizon"
        )


def grid_for(params: SurvivalParams, ctx: AnalysisContext) -> TimeGrid:
    """The public grid of this round: dp's coarse one, the sdc width chosen, or the fine one."""
    low, high = time_range(params, ctx.dictionary)
    if ctx.mode == "dp":
        width = max(params.time_resolution, (high - low) / params.dp_intervals)
    else:
        width = float(ctx.state.get("width", params.time_resolution))
    return TimeGrid.spanning(low, high, width)


class GridState(RoundState):
    """The public state of the survival analyses' rounds: the phase, and in exact modes the
    grid width the sdc probe chose (one of the public candidate widths)."""

    phase: Literal["probe", "counts", "newton"]
    width: float | None = None


def check_grid_state(
    state: GridState, params: SurvivalParams, ctx: AnalysisContext, where: str
) -> None:
    if ctx.mode == "dp" and state.width is not None:
        raise ValidationError(f"{where}: width: dp uses its public grid; no width is sent")
    if ctx.mode == "dp" and state.phase == "probe":
        raise ValidationError(f"{where}: phase: dp has no probe round")
    if state.width is not None:
        widths = sdc_widths(params, ctx.dictionary)
        if not any(math.isclose(state.width, w, rel_tol=1e-12) for w in widths):
            raise ValidationError(
                f"{where}: width: {state.width!r} is not one of the public candidate widths "
                f"({widths[0]:g}, {widths[1] if len(widths) > 1 else widths[0]:g}, ... "
                f"{widths[-1]:g})"
            )


def sdc_widths(params: SurvivalParams, dictionary: DataDictionary) -> list[float]:
    """Candidate widths, finest first, ending with one interval spanning the whole range."""
    low, high = time_range(params, dictionary)
    widths: list[float] = []
    for multiple in width_ladder():
        widths.append(params.time_resolution * multiple)
        if widths[-1] >= high - low:
            return widths
    raise InternalError("the width ladder ended")  # width_ladder() never ends


def width_ladder() -> Iterator[int]:
    yield from LADDER_FIRST
    power = 1
    while True:
        yield from (step * power for step in LADDER)
        power *= 10


def times_events(
    frame: pd.DataFrame, params: SurvivalParams, dictionary: DataDictionary
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Times clamped to the dictionary's bounds and event flags (censored after ``horizon``)."""
    low, high = dictionary.bounds(params.time)
    times = np.clip(frame[params.time].to_numpy(dtype=np.float64), low, high)
    events = frame[params.event].to_numpy(dtype=np.float64) > 0.5
    if params.horizon is not None:
        events &= times <= params.horizon
        times = np.minimum(times, params.horizon)
    return times, events


def cells_safe(cells: FloatArray, min_cell: int) -> bool:
    return bool(np.all((cells == 0) | (cells >= min_cell)))


def choose_width(records: Mapping[str, AggregateRecord], widths: Sequence[float]) -> float:
    """The finest candidate width that every site accepted in the sdc probe round."""
    flags = np.array([np.asarray(r["safe"]) for r in records.values()]) > 0.5
    accepted = flags.all(axis=0)
    if not accepted.any():
        # Which sites fell short is a fact about their small counts: not named.
        raise DisclosureError(
            "no candidate time grid lets every site release event and censoring counts that "
            "are 0 or at least its disclosure threshold. Set a horizon on the public grid, a "
            "coarser time_resolution, or use dp mode"
        )
    return float(widths[int(np.argmax(accepted))])


def grid_note(grid: TimeGrid, params: SurvivalParams, ctx: AnalysisContext, unit: str) -> str:
    if ctx.mode == "dp":
        return (
            f"dp: times grouped on the public grid {grid.start:g} + k * {grid.width:g}{unit} "
            f"({grid.size} points, rounded up); the estimate is that of the grouped times"
        )
    if grid.width > params.time_resolution * (1 + 1e-12):
        return (
            f"sdc: event times coarsened to a grid of width {grid.width:g}{unit} (requested "
            f"{params.time_resolution:g}), the finest on which every site's event and censoring "
            "counts are 0 or at least its disclosure threshold; results equal the pooled "
            f"analysis of times rounded up to {grid.start:g} + k * {grid.width:g}; a horizon "
            "before the sparse tail of follow-up often allows a finer grid"
        )
    return (
        f"times placed on the grid {grid.start:g} + k * {grid.width:g}{unit} (rounded up); exact "
        "whenever every observed time lies on this grid"
    )


def time_unit(dictionary: DataDictionary, time: str) -> str:
    var = dictionary.variable(time)
    return f" {var.unit}" if isinstance(var, NumericVariable) and var.unit else ""
