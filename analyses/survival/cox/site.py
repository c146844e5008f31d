"""The site's half of ``cox`` and what both halves share: parameters, the public round state
and its bounds, the declared record, and the site's risk-set sums."""

from __future__ import annotations

import itertools
import math

import numpy as np
import numpy.typing as npt
import pandas as pd

from analyses.base import (
    Analysis,
    AnalysisContext,
    Arrays,
    NextRound,
    rows_used,
)
from analyses.common import check_model_cells, check_not_saturated, zero_one_columns
from analyses.pushdown import ColumnOf, Pushdown
from analyses.survival.cox.pushdown import cox_pushdown
from analyses.survival.cox.sums import (
    MAX_ETA,
    CoxParams,
    cox_key,
    cox_terms,
    design_matrix,
    max_eta,
    max_weight,
    releases_fixed,
    releases_hessian,
    risk_sums,
)
from analyses.survival.grid import (
    FloatArray,
    GridState,
    TimeGrid,
    cells_safe,
    check_grid_state,
    check_sdc_horizon,
    check_survival_params,
    grid_for,
    sdc_widths,
    time_range,
    times_events,
)
from protocol.config import DataDictionary
from protocol.errors import DisclosureError, ValidationError
from protocol.records import MAX_CELLS, ArraySpec, RecordSpec


class CoxState(GridState):
    """Public state of a ``cox`` round: the phase, the sdc width, and in the Newton rounds the
    pooled event points (grid indices) and the coefficients on the scaled covariates. The
    released sums kept from earlier rounds and the step history stay in the coordinator's
    memo."""

    event_idx: list[int] | None = None
    beta: list[float] | None = None


class CoxSite(Analysis[CoxParams]):
    """The parts of ``cox`` both sides use (parameters, state, declaration) and the site's half;
    ``analyses.survival.cox.Cox`` adds the coordinator's half."""

    params_model = CoxParams
    state_model = CoxState

    def check_state(self, state: CoxState, params: CoxParams, ctx: AnalysisContext) -> None:
        """Phase and width as for every survival analysis; in the Newton rounds, event points
        strictly increasing within the grid, exactly p coefficients whose largest x'b keeps
        e^(x'b) finite, and in dp a coefficient norm within ``dp_coef_bound`` (the bound the
        release's sensitivity assumes)."""
        where = f"cox round {ctx.round} state"
        check_grid_state(state, params, ctx, where)
        if ctx.mode == "dp" and state.phase != "newton":
            raise ValidationError(f"{where}: phase: dp runs Newton rounds only")
        if state.phase != "newton":
            if state.event_idx is not None or state.beta is not None:
                raise ValidationError(f"{where}: event_idx and beta belong to Newton rounds only")
            return
        grid = grid_for(params, ctx)
        idx = state.event_idx
        if not idx or idx[0] < 0 or idx[-1] >= grid.size:
            raise ValidationError(
                f"{where}: event_idx: needs 1 or more grid indices in 0..{grid.size - 1}"
            )
        if any(b <= a for a, b in itertools.pairwise(idx)):
            raise ValidationError(f"{where}: event_idx: indices must be strictly increasing")
        terms = cox_terms(ctx.dictionary, params.covariates)
        p = len(terms)
        if len(idx) * (2 + 2 * p + p * (p + 1)) > MAX_CELLS:
            raise ValidationError(f"{where}: event_idx: {len(idx)} event points are too many")
        if state.beta is None or len(state.beta) != p:
            given = "none" if state.beta is None else str(len(state.beta))
            raise ValidationError(f"{where}: beta: needs {p} coefficients, got {given}")
        beta = np.asarray(state.beta, dtype=np.float64)
        if max_eta(beta, terms) > MAX_ETA:
            raise ValidationError(
                f"{where}: beta: the largest x'b over the scaled design is "
                f"{max_eta(beta, terms):.4g}, above {MAX_ETA:g} (e^x'b would overflow)"
            )
        norm = float(np.abs(beta).sum())
        if ctx.mode == "dp" and norm > params.dp_coef_bound * (1 + 1e-9):
            raise ValidationError(
                f"{where}: beta: sum |b_j| = {norm:.4g} is above dp_coef_bound "
                f"{params.dp_coef_bound:g}, which the release's sensitivity assumes"
            )

    def variables(self, params: CoxParams) -> set[str]:
        return {params.time, params.event, *params.covariates}

    def check_params(self, params: CoxParams, dictionary: DataDictionary) -> None:
        for name in params.covariates:
            if name in (params.time, params.event):
                raise ValidationError(f"covariate {name!r} is the time or event variable")
        check_survival_params(params, dictionary, 2)
        p = len(cox_terms(dictionary, params.covariates))
        per_time = 2 + 2 * p + p * (p + 1) // 2
        if per_time > MAX_CELLS:
            raise ValidationError(f"{p} design columns are too many for one release")

    # ------------------------------------------------------------------ rounds and shapes

    def initial_state(self, params: CoxParams, ctx: AnalysisContext) -> NextRound:
        if ctx.mode == "sdc":
            return NextRound({"phase": "probe"})
        if ctx.mode != "dp":
            return NextRound({"phase": "counts"})
        grid = grid_for(params, ctx)
        p = len(cox_terms(ctx.dictionary, params.covariates))
        return NextRound(
            {"phase": "newton", "event_idx": list(range(grid.size)), "beta": [0.0] * p}
        )

    def dp_rounds(self, params: CoxParams, ctx: AnalysisContext) -> int:
        return params.dp_iterations

    def declare(self, params: CoxParams, ctx: AnalysisContext) -> RecordSpec:
        phase = ctx.state.get("phase")
        if phase == "probe":
            widths = sdc_widths(params, ctx.dictionary)
            return RecordSpec({"safe": ArraySpec((len(widths),), kind="statistic")})
        grid = grid_for(params, ctx)
        if phase == "counts":
            return RecordSpec(
                {"counts": ArraySpec((2, grid.size), kind="count", sensitivity=1.0, integer=True)}
            )
        m = len(ctx.state["event_idx"])
        terms = cox_terms(ctx.dictionary, params.covariates)
        p = len(terms)
        q = p * (p + 1) // 2
        # max exp(x'b) over the scaled design's box; the site refuses states that exceed e^700.
        bound = max_weight(ctx.state["beta"], terms)
        arrays = {
            "n": ArraySpec((), kind="count", sensitivity=1.0, integer=True, budget_share=0.1),
            "s0": ArraySpec((m,), kind="sum", sensitivity=bound),
            "s1": ArraySpec((m, p), kind="sum", sensitivity=p * bound),
        }
        efron = params.ties == "efron"
        if efron:
            arrays["e0"] = ArraySpec((m,), kind="sum", sensitivity=bound)
            arrays["e1"] = ArraySpec((m, p), kind="sum", sensitivity=p * bound)
        if releases_hessian(ctx):
            arrays["s2"] = ArraySpec((m, q), kind="sum", sensitivity=q * bound)
            if efron:
                arrays["e2"] = ArraySpec((m, q), kind="sum", sensitivity=q * bound)
        if releases_fixed(ctx):
            arrays["d"] = ArraySpec((m,), kind="count", sensitivity=1.0, integer=True)
            arrays["xsum"] = ArraySpec((p,), kind="sum", sensitivity=float(p))
        return RecordSpec(arrays)

    # ------------------------------------------------------------------ site half

    def _rows(
        self, data: pd.DataFrame, params: CoxParams, ctx: AnalysisContext
    ) -> tuple[FloatArray, npt.NDArray[np.bool_], FloatArray]:
        """Times, events and the scaled design of the model's rows; built once per frame (the
        dominance cells and the round's sums read the same rows)."""

        def build() -> tuple[FloatArray, npt.NDArray[np.bool_], FloatArray]:
            frame = rows_used(data, [params.time, params.event, *params.covariates])
            terms = cox_terms(ctx.dictionary, params.covariates)
            x, valid = design_matrix(frame, terms, ctx.dictionary)
            times, events = times_events(frame, params, ctx.dictionary)
            return times[valid], events[valid], x[valid]

        if ctx.cache is None:
            return build()
        key = ("cox-rows", params.time, params.event, tuple(params.covariates))
        return ctx.cache.get(key, build, lambda rows: sum(a.nbytes for a in rows))

    @staticmethod
    def _check_model(x: FloatArray, params: CoxParams, ctx: AnalysisContext) -> None:
        """sdc: every 0/1 covariate column holds at least min_cell records at each value, and
        no record is fitted exactly (leverage 1 in the design with a constant: the baseline
        hazard absorbs one). Checked once per model and frame."""

        def check() -> bool:
            what = f"cox {cox_key(params.time, params.event, params.covariates)!r}"
            terms = cox_terms(ctx.dictionary, params.covariates)
            raw = (
                np.column_stack(
                    [
                        x[:, j] if t.level is not None else x[:, j] * t.scale + t.centre
                        for j, t in enumerate(terms)
                    ]
                )
                if terms
                else x
            )
            names = [f"{t.variable}[{t.level}]" for t in terms]
            cells = zero_one_columns(raw, names)
            for variable in {t.variable for t in terms if t.level is not None}:
                dummies = [j for j, t in enumerate(terms) if t.variable == variable]
                cells[f"{variable}[reference]"] = 1.0 - raw[:, dummies].sum(axis=1)
            check_model_cells(cells, ctx.sdc.min_cell, what)
            check_not_saturated(np.column_stack([np.ones(x.shape[0]), x]), what)
            return True

        key = ("cox-sdc", tuple(params.covariates), params.time, params.event, ctx.sdc.min_cell)
        if ctx.cache is None:
            check()
        else:
            ctx.cache.get(key, check, lambda _: 0)

    def magnitude_cells(
        self, data: pd.DataFrame, params: CoxParams, ctx: AnalysisContext
    ) -> list[FloatArray]:
        """A numeric covariate's values, summed over the model's rows (``xsum`` at the events)
        and per grid cell: at beta = 0 the differences of the risk-set sums between event
        times, and Efron's sums over tied events, are the sums of x over one cell's events,
        censorings or both. 0/1 columns sum to counts, which the model's cell checks cover."""
        if ctx.state.get("phase") in ("probe", "counts"):
            return []
        times, events, x = self._rows(data, params, ctx)
        terms = cox_terms(ctx.dictionary, params.covariates)
        numeric = [
            x[:, j] * t.scale + t.centre
            for j, t in enumerate(terms)
            if t.level is None and not np.all(np.isin(x[:, j] * t.scale + t.centre, (0.0, 1.0)))
        ]
        if not numeric:
            return []
        grid = grid_for(params, ctx)
        slot = grid.index(times)
        groups = [events, ~events] + [slot == c for c in np.unique(slot)]
        groups += [(slot == c) & events for c in np.unique(slot[events])]
        return [values[rows] for values in numeric for rows in [np.ones_like(events), *groups]]

    def pushdown(
        self, params: CoxParams, ctx: AnalysisContext, column: ColumnOf
    ) -> Pushdown | None:
        return cox_pushdown(params, ctx, column)

    def local(self, data: pd.DataFrame, params: CoxParams, ctx: AnalysisContext) -> Arrays:
        check_sdc_horizon(params, ctx)
        phase = ctx.state.get("phase")
        times, events, x = self._rows(data, params, ctx)
        if phase == "probe":
            low, high = time_range(params, ctx.dictionary)
            flags = []
            for width in sdc_widths(params, ctx.dictionary):
                grid = TimeGrid.spanning(low, high, width)
                cells = np.bincount(
                    (~events).astype(np.int64) * grid.size + grid.index(times),
                    minlength=2 * grid.size,
                )
                flags.append(float(cells_safe(cells.astype(np.float64), ctx.sdc.min_cell)))
            return {"safe": np.asarray(flags)}
        grid = grid_for(params, ctx)
        if phase == "counts":
            cells = np.bincount(
                (~events).astype(np.int64) * grid.size + grid.index(times), minlength=2 * grid.size
            )
            return {"counts": cells.astype(np.float64).reshape(2, grid.size)}
        n, p = x.shape
        if ctx.mode == "sdc" and p > ctx.sdc.max_parameter_ratio * n:
            raise DisclosureError(
                f"a Cox model with {p} parameters needs at least "
                f"{math.ceil(p / ctx.sdc.max_parameter_ratio)} records at this site (parameters "
                f"at most {ctx.sdc.max_parameter_ratio} of the records); it has fewer"
            )
        if ctx.mode == "sdc":
            self._check_model(x, params, ctx)
            # The risk-set sums are sums over grid cells: release them only on a grid whose
            # every cell of this site's holds 0 or at least min_cell records, whatever width a
            # coordinator sends (an honest one sends the width the probe chose).
            cells = np.bincount(
                (~events).astype(np.int64) * grid.size + grid.index(times), minlength=2 * grid.size
            )
            if not cells_safe(cells.astype(np.float64), ctx.sdc.min_cell):
                raise DisclosureError(
                    f"on a time grid of width {grid.width:g} some of this site's event or "
                    f"censoring counts are below {ctx.sdc.min_cell}, so its risk-set sums would "
                    "disclose fewer than that many records; a coarser grid is needed"
                )
        out = risk_sums(
            times,
            events,
            x,
            grid,
            ctx.state["event_idx"],
            ctx.state["beta"],
            efron=params.ties == "efron",
            hessian=releases_hessian(ctx),
            weight_bound=max_weight(
                ctx.state["beta"], cox_terms(ctx.dictionary, params.covariates)
            ),
        )
        if not releases_fixed(ctx):
            del out["d"], out["xsum"]
        return out
