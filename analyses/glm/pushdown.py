"""A GLM round's sums as SQL aggregates (pushdown): X'WX, X'Wz or the score, the deviance, n.

The same per-row arithmetic as ``design.local_arrays`` (standardised design columns, the
family's weights and residuals at the round's coefficients), written as SQL so that a site's
source computes the sums. Models whose design columns are products of numeric variables and
treatment-coded levels are supported; anything else returns None and the site computes
``local`` on its rows. ``exp`` arguments are kept within [-700, 700]: PostgreSQL raises on
overflow and underflow where numpy returns inf or 0, and the clamped values round to the same
doubles in every place they are used.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from analyses.base import AnalysisContext, Arrays
from analyses.glm.design import state_beta
from analyses.glm.formula import GLMModel
from analyses.pushdown import AggregateQuery, ColumnOf, Pushdown, Rows, clamp, constant, number

_LEVEL = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)\[T\.(?P<level>[^\]]+)\]")
EXP_LIMIT = 700.0


def _exp(expression: Any) -> Any:
    import sqlalchemy as sa

    return sa.func.exp(clamp(expression, -EXP_LIMIT, EXP_LIMIT))


def _xlogx(expression: Any) -> Any:
    """x log x with 0 log 0 = 0 (scipy's xlogy(x, x))."""
    import sqlalchemy as sa

    return sa.case((expression > constant(0.0), expression * sa.func.ln(expression)), else_=0.0)


def _design_column(name: str, model: GLMModel, column: ColumnOf) -> Any | None:
    """A design column's raw value: the product of its factors (None: not supported)."""
    import sqlalchemy as sa

    if name == "Intercept":
        return constant(1.0)
    value: Any = None
    for part in name.split(":"):
        found = _LEVEL.fullmatch(part)
        if found is not None:
            variable = found["name"]
            levels = {str(level): level for level in model.levels.get(variable, [])}
            if found["level"] not in levels:
                return None
            level = constant(float(levels[found["level"]]))
            factor = sa.case((column(variable) == level, 1.0), else_=0.0)
        elif part in model.numeric:
            factor = column(part)  # within its dictionary bounds: dp's clamp is done
        else:
            return None
        value = factor if value is None else value * factor
    return value


def _start_stages(family: str) -> list[dict[str, Any]]:
    """Round 0: weights w and w z (as ``design.start_values``) at the starting means."""
    import sqlalchemy as sa

    col = sa.column
    y: Any = col("y")
    mu: Any = col("mu")
    if family == "binomial":
        return [
            {"mu": (y + constant(0.5)) / constant(2.0)},
            {"w": mu * (1.0 - mu), "r": y - mu, "logit": sa.func.ln(mu / (1.0 - mu))},
            {"v": col("w") * col("logit") + col("r")},
        ]
    if family == "poisson":
        return [{"mu": y + constant(0.1)}, {"w": mu, "v": mu * sa.func.ln(mu) + (y - mu)}]
    return [{"w": sa.literal(1.0, sa.Double), "v": y}]


def _step_stages(model: GLMModel, beta: Any, dp: bool) -> list[dict[str, Any]]:
    """Rounds >= 1: weights, residuals y - mu and deviance terms (``design.step_values``)."""
    import sqlalchemy as sa

    col = sa.column
    y: Any = col("y")
    mu: Any = col("mu")
    eta: Any = col("eta")
    terms = (col(f"x{j}") * constant(float(b)) for j, b in enumerate(beta))
    stages: list[dict[str, Any]] = [{"eta": sum(terms, constant(0.0))}]
    if model.family == "binomial":
        expit = sa.case(
            (eta >= constant(0.0), 1.0 / (1.0 + _exp(-eta))),
            else_=_exp(eta) / (1.0 + _exp(eta)),
        )
        positive = sa.case((eta > constant(0.0), eta), else_=constant(0.0))
        softplus = positive + sa.func.ln(1.0 + _exp(-sa.func.abs(eta)))  # log(1 + e^eta)
        entropy = _xlogx(y) + _xlogx(1.0 - y)
        deviance = 2.0 * (col("softplus") - y * eta + entropy)
        stages.append({"mu": expit, "softplus": softplus})
        stages.append({"w": mu * (1.0 - mu), "v": y - mu, "d": deviance})
    elif model.family == "poisson":
        mean = _exp(sa.case((eta > constant(EXP_LIMIT), constant(EXP_LIMIT)), else_=eta))
        log_mu: Any = eta
        if dp:  # capped at the largest count, as design.step_values
            y_max = constant(model.y_bounds[1])
            mean = sa.case((mean > y_max, y_max), else_=mean)
            log_mu = sa.func.ln(mu)
        stages.append({"mu": mean})
        stages.append({"w": mu, "v": y - mu, "d": 2.0 * (_xlogx(y) - y * log_mu - (y - mu))})
    else:
        stages.append({"w": sa.literal(1.0, sa.Double), "v": y - eta, "d": (y - eta) * (y - eta)})
    return stages


def glm_pushdown(model: GLMModel, ctx: AnalysisContext, column: ColumnOf) -> Pushdown | None:
    """The round's sums as one aggregate query, or None when a design column is unsupported."""
    import sqlalchemy as sa

    dp = ctx.mode == "dp"
    p = model.p
    first: dict[str, Any] = {}
    for j, name in enumerate(model.columns):
        raw = _design_column(name, model, column)
        if raw is None:
            return None
        first[f"x{j}"] = (raw - constant(model.centre[j])) / constant(model.half[j])
    response = column(model.formula.response)  # within y_bounds, as dp's clamp makes it
    first["y"] = (response - constant(model.y_centre)) / constant(model.y_half)
    where = [column(v).is_not(None) for v in (model.formula.response, *model.formula.variables)]
    beta = None if ctx.round == 0 else state_beta(ctx, p)
    stages = [
        first,
        *(_start_stages(model.family) if beta is None else _step_stages(model, beta, dp)),
    ]
    col = sa.column
    stages.append({f"w{j}": col("w") * col(f"x{j}") for j in range(p)})
    aggregates: dict[str, Any] = {"n": sa.func.count()}
    upper = [(int(i), int(j)) for i, j in zip(*np.triu_indices(p), strict=True)]
    for i, j in upper:
        aggregates[f"xwx_{i}_{j}"] = sa.func.sum(col(f"w{i}") * col(f"x{j}"))
    for j in range(p):
        aggregates[f"vec_{j}"] = sa.func.sum(col(f"x{j}") * col("v"))
    if beta is not None:
        aggregates["deviance"] = sa.func.sum(col("d"))
    elif model.family == "gaussian":
        aggregates["yy"] = sa.func.sum(col("y") * col("y"))

    def finish(rows: list[Rows]) -> Arrays:
        values = [number(v) for v in rows[0][0]]
        cells = len(upper)
        out: Arrays = {"xwx": np.array(values[1 : 1 + cells]), "n": np.array(values[0])}
        vec = np.array(values[1 + cells : 1 + cells + p])
        if beta is None:
            out["xwz"] = vec
            if model.family == "gaussian":
                out["yy"] = np.array(values[-1])
        else:
            out["score"] = vec
            out["deviance"] = np.array(values[-1])
        return out

    query = AggregateQuery(aggregates, where, stages=stages)
    return Pushdown((query,), finish, f"glm {model.family} round {ctx.round}")
