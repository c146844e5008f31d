"""A dp Cox round's risk-set sums as SQL aggregates (pushdown).

In dp every point of the public grid is an event time (``CoxSite.initial_state``), so an
interval of ``risk_sums`` is one grid point: the sums group by the point each row's time lands
on, computed with the same double arithmetic as ``TimeGrid.index``. Per row the source computes
the scaled design (numeric columns centred and scaled by their public bounds, levels as 0/1
dummies), the weight w = min(exp(x'b), e^B) and then, per grid point, the sums ``risk_sums``
releases: of w, w x and the packed w x x' over every row, and (Efron) over the events; the event
counts and the sum of x over the events. A round whose event points are not the whole grid
(exact modes) is not pushed down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from analyses.base import AnalysisContext, Arrays
from analyses.common import packed_index
from analyses.pushdown import AggregateQuery, ColumnOf, Pushdown, Rows, constant, number
from analyses.survival.cox.sums import (
    CoxParams,
    CoxTerm,
    cox_terms,
    max_weight,
    releases_fixed,
    releases_hessian,
)
from analyses.survival.grid import TimeGrid, grid_for


@dataclass(frozen=True)
class _Sum:
    """One aggregate and where its value goes: ``array[point, slot]`` (``slot`` None: the
    array has one value per point), or, for a total (``n``, ``xsum``), ``array[slot]``
    summed over the points."""

    expression: Any
    array: str
    slot: int | None = None
    total: bool = False


def _first_stage(
    params: CoxParams, terms: list[CoxTerm], grid: TimeGrid, column: ColumnOf
) -> dict[str, Any]:
    """Per row: the scaled design ``x{j}``, the grid ``point`` and the event flag ``ev``."""
    import sqlalchemy as sa

    time, event = column(params.time), column(params.event)
    happened = event > constant(0.5)
    if params.horizon is not None:  # as times_events: censored at the horizon
        horizon = constant(params.horizon)
        happened = sa.and_(happened, time <= horizon)
        time = sa.case((time > horizon, horizon), else_=time)
    stage: dict[str, Any] = {}
    for j, term in enumerate(terms):
        value = column(term.variable)  # within its bounds: design_matrix's clip is done
        if term.level is None:
            stage[f"x{j}"] = (value - constant(term.centre)) / constant(term.scale)
        else:
            stage[f"x{j}"] = sa.case((value == constant(float(term.level)), 1.0), else_=0.0)
    stage["point"] = grid.index_sql(time)  # Conformed times lie within the bounds already.
    stage["ev"] = sa.case((happened, 1.0), else_=0.0)
    return stage


def _sums(p: int, efron: bool, hessian: bool, fixed: bool) -> dict[str, _Sum]:
    """The round's aggregates over the last stage's ``x{j}``, ``w``, ``wx{j}`` and ``ev``."""
    import sqlalchemy as sa

    col = sa.column
    ev: Any = col("ev")
    rows, cols = packed_index(p)
    upper = list(zip(rows.tolist(), cols.tolist(), strict=True))
    out = {"n": _Sum(sa.func.count(), "n", total=True)}
    for prefix, selected in [("s", None), ("e", ev)][: 2 if efron else 1]:

        def add(
            label: str, value: Any, slot: int | None, prefix: str = prefix, selected: Any = selected
        ) -> None:
            value = value if selected is None else selected * value
            out[f"{prefix}{label}"] = _Sum(sa.func.sum(value), f"{prefix}{label[0]}", slot)

        add("0", col("w"), None)
        for j in range(p):
            add(f"1_{j}", col(f"wx{j}"), j)
        if hessian:
            for k, (r, c) in enumerate(upper):
                add(f"2_{r}_{c}", col(f"wx{r}") * col(f"x{c}"), k)
    if fixed:
        out["d"] = _Sum(sa.func.sum(ev), "d")
        for j in range(p):
            out[f"xsum_{j}"] = _Sum(sa.func.sum(ev * col(f"x{j}")), "xsum", j, total=True)
    return out


def cox_pushdown(params: CoxParams, ctx: AnalysisContext, column: ColumnOf) -> Pushdown | None:
    """The round's sums as one query grouped by grid point, or None (not a dp Newton round)."""
    import sqlalchemy as sa

    grid = grid_for(params, ctx)
    if ctx.state.get("phase") != "newton" or list(ctx.state["event_idx"]) != list(range(grid.size)):
        return None
    terms = cox_terms(ctx.dictionary, params.covariates)
    p, m = len(terms), grid.size
    beta = [float(b) for b in ctx.state["beta"]]
    col = sa.column
    # |x'b| <= B over the scaled box (Cox.check_state keeps B <= 700), so exp is finite.
    eta = sum((col(f"x{j}") * constant(b) for j, b in enumerate(beta)), constant(0.0))
    bound = constant(max_weight(beta, terms))
    stages = [
        _first_stage(params, terms, grid, column),
        {"w": sa.case((sa.func.exp(eta) > bound, bound), else_=sa.func.exp(eta))},
        {f"wx{j}": col("w") * col(f"x{j}") for j in range(p)},
    ]
    sums = _sums(p, params.ties == "efron", releases_hessian(ctx), releases_fixed(ctx))
    q = p * (p + 1) // 2
    shapes = {"s0": (m,), "s1": (m, p), "s2": (m, q), "e0": (m,), "e1": (m, p), "e2": (m, q)}
    shapes |= {"d": (m,), "n": (), "xsum": (p,)}

    def finish(results: list[Rows]) -> Arrays:
        arrays = {s.array: np.zeros(shapes[s.array]) for s in sums.values()}
        for row in results[0]:
            point = int(number(row[0]))
            for item, value in zip(sums.values(), row[1:], strict=True):
                target = arrays[item.array]
                if item.total and item.slot is None:
                    arrays[item.array] = target + number(value)
                elif item.total:
                    target[item.slot] += number(value)
                else:
                    target[point if item.slot is None else (point, item.slot)] = number(value)
        return arrays

    where = [column(v).is_not(None) for v in (params.time, params.event, *params.covariates)]
    aggregates = {label: item.expression for label, item in sums.items()}
    query = AggregateQuery(aggregates, where, keys=[col("point")], stages=stages)
    return Pushdown((query,), finish, f"cox round {ctx.round}")
