"""The site's half of ``glm``: the standardised design matrix and its IRLS sums per round."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import special

from analyses.base import AnalysisContext, Arrays
from analyses.glm.formula import FloatArray, GLMModel
from protocol.errors import InternalError

CHUNK = 8192  # rows per pass: buffers stay in cache


@dataclass
class Design:
    """A site's standardised design and response for one model."""

    x: FloatArray
    y: FloatArray
    #: each categorical variable's values in the model's rows (sdc checks its levels' cells)
    levels: dict[str, FloatArray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(self.x.nbytes + self.y.nbytes + sum(v.nbytes for v in self.levels.values()))


def build_design(data: pd.DataFrame, model: GLMModel, clamp: bool) -> Design:
    formula = model.formula
    names = [formula.response, *formula.variables]
    values = {name: data[name].to_numpy(dtype=np.float64, na_value=np.nan) for name in names}
    keep = np.ones(len(data), dtype=bool)
    for name in names:
        keep &= ~np.isnan(values[name])
    for name, levels in model.levels.items():
        keep &= np.isin(values[name], levels)  # a level outside the dictionary is missing
    n = int(keep.sum())
    y = values[formula.response][keep]
    if clamp:
        y = np.clip(y, *model.y_bounds)
    y = (y - model.y_centre) / model.y_half
    level_values = {name: values[name][keep] for name in model.levels}
    if n == 0:
        return Design(np.zeros((0, model.p)), y, level_values)
    frame: dict[str, Any] = {}
    for name in formula.variables:
        column = values[name][keep]
        if name in model.levels:
            public = np.asarray(model.levels[name], dtype=np.float64)
            order = np.argsort(public)
            codes = order[np.searchsorted(public[order], column)]
            frame[name] = pd.Categorical.from_codes(codes, categories=model.levels[name])
        else:
            frame[name] = np.clip(column, *model.numeric[name]) if clamp else column
    matrix = model.spec.get_model_matrix(pd.DataFrame(frame, index=pd.RangeIndex(n)))
    if tuple(str(c) for c in matrix.columns) != model.columns:
        raise InternalError(
            f"site design columns {list(matrix.columns)} differ from the declared {model.columns}"
        )
    x = np.empty((n, model.p))  # row-major, filled column by column: no mixed-dtype copy
    for j, column in enumerate(matrix.columns):
        values_j = np.asarray(matrix[column], dtype=np.float64)
        np.divide(values_j - model.centre[j], model.half[j], out=x[:, j])
    return Design(x, np.ascontiguousarray(y), level_values)


def start_values(family: str, y: FloatArray) -> tuple[FloatArray, FloatArray]:
    """IRLS weights and working responses times weights at the starting means."""
    if family == "binomial":
        mu = (y + 0.5) / 2
        w = mu * (1 - mu)
        return w, w * special.logit(mu) + (y - mu)
    if family == "poisson":
        mu = y + 0.1
        return mu, mu * np.log(mu) + (y - mu)
    return np.ones_like(y), y


def step_values(
    family: str, y: FloatArray, eta: FloatArray, dp: bool, y_max: float
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Weights, score residuals y - mu and deviance contributions at linear predictor eta."""
    if family == "binomial":
        mu = special.expit(eta)
        ent = special.xlogy(y, y) + special.xlogy(1 - y, 1 - y)
        return mu * (1 - mu), y - mu, 2 * (np.logaddexp(0.0, eta) - y * eta + ent)
    if family == "poisson":
        mu = np.exp(np.minimum(eta, 700.0))
        log_mu = eta
        if dp:  # cap the mean at the largest count so weight and residual stay bounded
            mu = np.minimum(mu, y_max)
            log_mu = np.log(mu)
        return mu, y - mu, 2 * (special.xlogy(y, y) - y * log_mu - (y - mu))
    resid = y - eta
    return np.ones_like(y), resid, resid * resid


def local_arrays(design: Design, model: GLMModel, ctx: AnalysisContext) -> Arrays:
    p = model.p
    upper = np.triu_indices(p)
    x, y = design.x, design.y
    xwx = np.zeros((p, p))
    vec = np.zeros(p)
    deviance = 0.0
    dp = ctx.mode == "dp"
    beta = state_beta(ctx, p) if ctx.round > 0 else None
    work = np.empty((min(CHUNK, y.size), p))  # reused: no fresh pages per chunk
    for start in range(0, y.size, CHUNK):
        xc = x[start : start + CHUNK]
        yc = y[start : start + CHUNK]
        if beta is None:
            w, v = start_values(model.family, yc)
        else:
            w, v, d = step_values(model.family, yc, xc @ beta, dp, model.y_bounds[1])
            deviance += float(d.sum())
        xw = np.multiply(xc, w[:, None], out=work[: yc.size])
        xwx += xw.T @ xc
        vec += xc.T @ v
    out: Arrays = {"xwx": xwx[upper], "n": np.array(float(y.size))}
    if beta is None:
        out["xwz"] = vec
        if model.family == "gaussian":
            out["yy"] = np.array(float(y @ y))
    else:
        out["score"] = vec
        out["deviance"] = np.array(deviance)
    return out


def state_beta(ctx: AnalysisContext, p: int) -> FloatArray:
    beta = np.asarray(ctx.state.get("beta", []), dtype=np.float64)
    if beta.shape != (p,):
        raise InternalError(f"glm round {ctx.round} state has {beta.size} coefficients, not {p}")
    return beta


# ----------------------------------------------------------------------------- dp bounds
