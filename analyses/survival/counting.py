"""The shared rounds of ``kaplan_meier`` and ``logrank``: event and censoring counts per grid
point (after an sdc probe for the finest safe width)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import pandas as pd
from pydantic import Field

from analyses.base import (
    Analysis,
    AnalysisContext,
    Arrays,
    NextRound,
    rows_used,
)
from analyses.common import pooled, pooled_noise_variance
from analyses.pushdown import AggregateQuery, ColumnOf, Pushdown, Rows, constant, grouped_counts
from analyses.results import AnalysisResult
from analyses.survival.grid import (
    FloatArray,
    GridState,
    SurvivalParams,
    TimeGrid,
    cells_safe,
    check_grid_state,
    check_sdc_horizon,
    check_survival_params,
    choose_width,
    grid_for,
    grid_note,
    sdc_widths,
    time_range,
    time_unit,
    times_events,
)
from protocol.config import DataDictionary
from protocol.errors import ModelError, ValidationError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec


class CountingParams(SurvivalParams):
    group: str | None = Field(default=None, description="a categorical or binary variable")


CP = TypeVar("CP", bound=CountingParams)


class CountingState(GridState):
    """Public state of ``kaplan_meier`` and ``logrank``: the probe, then the counts."""

    phase: Literal["probe", "counts"]


@dataclass(frozen=True)
class PooledCounts(Generic[CP]):
    """What the counting rounds end with: the pooled (levels, 2, grid) event and censoring
    counts, their noise variance per cell, the grid, the request and the notes so far."""

    counts: FloatArray
    noise_var: float
    grid: TimeGrid
    params: CP
    ctx: AnalysisContext
    notes: list[str]


class Counting(Analysis[CP], Generic[CP]):
    """Shared rounds of ``kaplan_meier`` and ``logrank``: per-grid event and censoring counts."""

    state_model = CountingState

    def check_state(self, state: CountingState, params: CP, ctx: AnalysisContext) -> None:
        check_grid_state(state, params, ctx, f"{self.name} round {ctx.round} state")

    def variables(self, params: CP) -> set[str]:
        return {params.time, params.event} | ({params.group} if params.group else set())

    def coarsened_variables(self, params: CP) -> set[str]:
        # Times on the public grid, the event flag and the group's public levels.
        return self.variables(params)

    def _levels(self, params: CP, dictionary: DataDictionary) -> list[int]:
        return dictionary.levels(params.group) if params.group else [0]

    def check_params(self, params: CP, dictionary: DataDictionary) -> None:
        if params.group is not None:
            dictionary.levels(params.group)
            if params.group in (params.time, params.event):
                raise ValidationError(
                    f"group {params.group!r} cannot be the time or event variable"
                )
        check_survival_params(params, dictionary, 2 * len(self._levels(params, dictionary)))

    def initial_state(self, params: CP, ctx: AnalysisContext) -> NextRound:
        return NextRound({"phase": "probe" if ctx.mode == "sdc" else "counts"})

    def declare(self, params: CP, ctx: AnalysisContext) -> RecordSpec:
        if ctx.state.get("phase") == "probe":
            widths = sdc_widths(params, ctx.dictionary)
            return RecordSpec({"safe": ArraySpec((len(widths),), kind="statistic")})
        levels = len(self._levels(params, ctx.dictionary))
        grid = grid_for(params, ctx)
        return RecordSpec(
            {
                "counts": ArraySpec(
                    (levels, 2, grid.size), kind="count", sensitivity=1.0, integer=True
                )
            }
        )

    def _cells(
        self, data: pd.DataFrame, params: CP, dictionary: DataDictionary, grid: TimeGrid
    ) -> FloatArray:
        levels = self._levels(params, dictionary)
        frame = rows_used(data, sorted(self.variables(params)))
        times, events = times_events(frame, params, dictionary)
        if params.group:
            codes = frame[params.group].to_numpy(dtype=np.float64)
            index = np.full(codes.shape, -1, dtype=np.int64)
            for i, level in enumerate(levels):
                index[codes == level] = i
        else:
            index = np.zeros(times.shape, dtype=np.int64)
        keep = index >= 0
        cell = (index[keep] * 2 + (~events[keep]).astype(np.int64)) * grid.size
        cell += grid.index(times[keep])
        counts = np.bincount(cell, minlength=len(levels) * 2 * grid.size)
        return counts.astype(np.float64).reshape(len(levels), 2, grid.size)

    def local(self, data: pd.DataFrame, params: CP, ctx: AnalysisContext) -> Arrays:
        check_sdc_horizon(params, ctx)
        if ctx.state.get("phase") == "probe":
            low, high = time_range(params, ctx.dictionary)
            flags = [
                float(
                    cells_safe(
                        self._cells(data, params, ctx.dictionary, TimeGrid.spanning(low, high, w)),
                        ctx.sdc.min_cell,
                    )
                )
                for w in sdc_widths(params, ctx.dictionary)
            ]
            return {"safe": np.asarray(flags)}
        return {"counts": self._cells(data, params, ctx.dictionary, grid_for(params, ctx))}

    def pushdown(self, params: CP, ctx: AnalysisContext, column: ColumnOf) -> Pushdown | None:
        """The counts round as one grouped count in the source: (group level, censored, grid
        point) as keys, each computed from the conformed values as ``_cells`` computes it
        (the same double arithmetic, so every time lands on the same grid point). The sdc
        probe is never pushed down."""
        if ctx.state.get("phase") != "counts":
            return None
        import sqlalchemy as sa

        grid = grid_for(params, ctx)
        time, event = column(params.time), column(params.event)
        where = [time.is_not(None), event.is_not(None)]
        happened = event > constant(0.5)
        if params.horizon is not None:  # as times_events: censored after the horizon
            horizon = constant(params.horizon)
            happened = sa.and_(happened, time <= horizon)
            time = sa.case((time > horizon, horizon), else_=time)
        # Conformed times lie within the dictionary's bounds, so the clip to them is done.
        point = grid.index_sql(time)
        keys = [sa.case((happened, 0.0), else_=1.0), point]
        index: list[dict[float, int]] = [{0.0: 0, 1.0: 1}, {float(k): k for k in range(grid.size)}]
        levels = self._levels(params, ctx.dictionary)
        if params.group:
            group = column(params.group)
            where.append(group.is_not(None))
            keys.insert(0, group)
            index.insert(0, {float(level): i for i, level in enumerate(levels)})
        shape = (len(levels), 2, grid.size)

        def finish(rows: list[Rows]) -> Arrays:
            counts = grouped_counts(rows[0], shape[-len(index) :], index)["counts"]
            return {"counts": counts.reshape(shape)}

        query = AggregateQuery({"n": sa.func.count()}, where, keys)
        return Pushdown((query,), finish, self.name)

    def site_records(self, record: AggregateRecord) -> float | None:
        return float(record["counts"].sum()) if "counts" in record.arrays else None

    def combine(
        self, records: Mapping[str, AggregateRecord], params: CP, ctx: AnalysisContext
    ) -> Any:
        if not records:
            raise ModelError(f"{self.name}: no site returned records")
        if ctx.state.get("phase") == "probe":
            width = choose_width(records, sdc_widths(params, ctx.dictionary))
            return NextRound({"phase": "counts", "width": width})
        grid = grid_for(params, ctx)
        counts = pooled(records, "counts")
        noise_var = pooled_noise_variance(records, "counts")
        if noise_var > 0:
            counts = np.maximum(counts, 0.0)  # noisy counts: post-processing keeps them >= 0
        note = grid_note(grid, params, ctx, time_unit(ctx.dictionary, params.time))
        return self._finish(PooledCounts(counts, noise_var, grid, params, ctx, [note]))

    @abstractmethod
    def _finish(self, pooled: PooledCounts[CP]) -> AnalysisResult:
        """The result from the pooled counts and their noise per cell."""


def at_risk_counts(deaths: FloatArray, censored: FloatArray) -> FloatArray:
    """Records at risk at each grid point: everybody whose time is at or after it."""
    return np.cumsum((deaths + censored)[..., ::-1], axis=-1)[..., ::-1]
