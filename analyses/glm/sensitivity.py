"""The L1 sensitivity of each array a ``glm`` round releases, from public bounds and the
round's public coefficients (see the package docstring's table)."""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from analyses.base import AnalysisContext
from analyses.glm.design import state_beta
from analyses.glm.formula import GLMModel

DP_BETA_LIMIT = 30.0


def sensitivities(model: GLMModel, ctx: AnalysisContext) -> dict[str, float]:
    """Per-array L1 sensitivity to one row, from public bounds and the public state."""
    p = model.p
    cells = p * (p + 1) / 2
    y_max = max(model.y_bounds[1], 0.0)
    out = {"n": 1.0}
    if ctx.round == 0:
        if model.family == "binomial":
            w_max, v_max = 0.25, (1 + math.log(3)) / 4
        elif model.family == "poisson":
            m = y_max + 0.1
            w_max, v_max = m, max(m * math.log(m) - 0.1, 1 / math.e + 0.1)
        else:
            w_max, v_max = 1.0, 1.0
            out["yy"] = 1.0
        out["xwx"], out["xwz"] = w_max * cells, v_max * p
        return out
    b = float(np.abs(state_beta(ctx, p)).sum())
    if model.family == "binomial":
        w_max, v_max, d_max = 0.25, 1.0, 2 * float(np.logaddexp(0.0, b))
    elif model.family == "poisson":
        mu_hi = y_max if b >= math.log(max(y_max, 1e-300)) else math.exp(b)
        mu_lo = min(math.exp(-b), mu_hi)
        corners = [
            2 * (float(special.xlogy(yv, yv)) - yv * math.log(m) - (yv - m))
            for yv in (0.0, y_max)
            for m in (mu_lo, mu_hi)
        ]
        w_max, v_max, d_max = mu_hi, y_max, max(corners)
    else:
        w_max, v_max, d_max = 1.0, 1.0 + b, (1.0 + b) ** 2
    out["xwx"], out["score"], out["deviance"] = w_max * cells, v_max * p, d_max
    return out
