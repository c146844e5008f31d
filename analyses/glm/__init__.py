"""Generalised linear models fitted by federated IRLS: ``glm``.

The package is split by concept: ``formula`` (the formula, the model spec and its public
standardisation), ``design`` (the site's design matrix and its sums), ``sensitivity`` (dp
bounds), ``irls`` (the coordinator's rounds and checks) and ``result``.

Model
    ``formula`` (``"disease ~ age + sex + chol"``; interactions ``age*sex`` and ``age:sex``;
    ``- 1`` drops the intercept) is parsed by formulaic. Every factor must be a plain dictionary
    variable: transforms (``np.log(x)``, ``I(x**2)``, ``C(x)``, ``center(x)``) are refused,
    because a stateful transform evaluated at each site would differ from site to site, and
    because differential privacy needs public bounds on every design column. Binary variables
    enter as 0/1 numbers (term ``smoker``, as statsmodels names a 0/1 column); categorical
    variables become pandas Categoricals with the dictionary's levels (the first is the
    reference), so term names are formulaic's (``sex[T.1]``, ``age:sex[T.1]``). Every site
    builds its design with one formulaic ``ModelSpec`` made from a template of the dictionary's
    levels and bounds, never from data, so all sites have the same columns even where a level is
    absent locally. Rows missing any formula variable are dropped (listwise deletion).
    Families use their canonical links: gaussian/identity, binomial/logit, poisson/log.

Rounds
    Round 0: each site returns X'W0X, X'W0z0 and n at the usual starting means (statsmodels'
    (y + 1/2) / 2 for binomial, R's y + 1/10 for poisson, y for gaussian, whose first step is
    already the least-squares solution). Round r >= 1: at the coordinator's coefficients
    (``ctx.state["beta"]``) each site returns X'WX, the score X'(y - mu) (for a canonical link
    X'Wz = X'WX beta + score, so the step is the IRLS step), the deviance and n. The coordinator
    takes the Newton step beta + (X'WX)^-1 score, halving it when the deviance rose, until the
    step is at most ``tol`` x max(1, max |beta|) on the standardised scale below; that step's
    coefficients are reported, with covariance scale x (X'WX)^-1 at the last evaluated
    coefficients (as statsmodels). Gaussian scale is Pearson chi2 / (n - p) = RSS / (n - p),
    binomial and poisson 1; z tests and intervals use the normal distribution (statsmodels'
    GLM default). X'WX travels as its packed upper triangle (p(p+1)/2 cells): symmetric by
    construction, and no cell is released twice.

Standardisation (every mode)
    Each design column is mapped by public constants to x' = (x - c) / h with |x'| <= 1, where
    [c - h, c + h] is the column's range implied by the dictionary's bounds (products of bounds
    for interactions, 0/1 columns kept as they are; without an intercept, h = max |bound| and
    c = 0). The gaussian response is standardised the same way. Sites compute in x', the
    coordinator solves there (better conditioned than raw columns) and maps coefficients and
    covariance back exactly: beta = A beta', cov = A cov' A^T.

Failures
    A site with no complete records returns zeros and is named in the result's notes; a column
    constant at one site is harmless (only the pooled X'WX must be invertible). A singular
    pooled design (a level absent everywhere, a constant or collinear column) raises
    ``ModelError`` naming the collinear terms; so do (quasi-)complete separation (binomial
    deviance near 0, or coefficients growing without bound until ``max_iter``) and
    non-convergence.

Disclosure control (``sdc``)
    ``local`` refuses (``DisclosureError``) when the model's p parameters exceed
    ``ctx.sdc.max_parameter_ratio`` x the site's complete records (DataSHIELD's glm rule).
    Only ``n`` is declared ``kind="count"``, so the generic small-cell rule applies to it alone
    and never to matrix cells that are legitimately small.

Differential privacy (``dp``)
    Sites clamp the formula's variables to their bounds, so |x'_j| <= 1 and a row moves the
    packed X'WX by at most w_max x p(p+1)/2, a p-vector of sums x' v by v_max x p, and so on.
    Per-row bounds, for the add/remove-one-row L1 sensitivity of each array:

    ============  ====================  ======================  ==============================
    family        w (X'WX)              score / X'Wz            deviance
    ============  ====================  ======================  ==============================
    binomial      1/4                   1; start: (1+log 3)/4   2 log(1 + e^B)
    poisson       min(e^B, Ymax);       Ymax; start:            max over the corners of
                  start: Ymax + 0.1     max(M log M - 0.1,      [0, Ymax] x [mu_lo, mu_hi]
                                        1/e + 0.1), M=Ymax+0.1  (d(y, mu) is jointly convex)
    gaussian      1                     1 (y' in [-1, 1]); y'y: 1; solved in one round
    ============  ====================  ======================  ==============================

    B = sum |beta'_j| is public (the round's state) and bounds |eta| because |x'_j| <= 1; Ymax is
    the response's dictionary maximum. In dp mode poisson means are capped at Ymax in the
    weights, score and deviance (so the weight and residual are bounded; this changes the fit
    only where a fitted mean exceeds the largest possible count). ``n`` has sensitivity 1.
    Budget shares per round: X'WX 1, score (or X'Wz) 1, y'y 1/4, n 1/10, deviance 1/4 in the
    last round and 1/50 before (only the last deviance is reported).

    Rounds: binomial and poisson run exactly ``dp_iterations`` rounds (``dp_rounds``), the
    request's epsilon split evenly over them; the gaussian model runs one round (its IRLS
    solution is exact in one step, so more rounds would only spend budget): X'X, X'y, y'y, n.
    The coordinator makes each noisy X'WX symmetric positive definite by raising its
    eigenvalues to at least sd x sqrt(p), sd being the pooled noise sd of one cell (a small,
    noise-sized ridge), and clips coefficients to |beta'_j| <= 30 so the next round's
    sensitivities stay finite.

    Standard errors include the noise, by a parametric bootstrap (B = 1000, fixed seed) of the
    final step: it redraws the sites' Laplace noise at the scales they report in
    ``record.releases``, recomputes the step (positive-definite repair included) and adds the
    covariance of the redrawn coefficients to the sampling covariance (X'WX)^-1 x scale. Noise
    in earlier rounds only moves the point the last step starts from, a second-order effect
    the bootstrap ignores. ``noise_std_error`` reports the noise part per term.

    Accuracy to expect. A simulation (logistic model, intercept and two covariates uniform over
    their public range, standardised coefficients (-0.5, 1, -0.5), 3 equal sites, 4 rounds,
    epsilon per site per request, 40 repetitions) gave this RMSE of the standardised slopes
    (coefficient x half the variable's public range) around the exact pooled fit, next to the
    sampling standard error of the same slopes:

    ===========  ===========  =========  =========  ===========
    n (pooled)   eps = 0.5    eps = 1    eps = 5    sampling SE
    ===========  ===========  =========  =========  ===========
    3,000        0.76         0.38       0.07       0.07
    30,000       0.07         0.03       0.008      0.02
    300,000      0.006        0.004      0.0007     0.007
    ===========  ===========  =========  =========  ===========

    The noise error falls like 1 / (n eps) and the sampling error like 1 / sqrt(n), so noise
    matters less than sampling from roughly n x eps = 30,000 for this 3-parameter model; it
    grows with p (the X'WX sensitivity is quadratic in p, the score's linear) and when
    covariates fill little of their public range. The reported noise sd matched the spread
    across repetitions within 0.75-1.25x, and 95% intervals covered the true coefficients
    91-99% of the time. ``tests/unit/test_glm_unit.py`` re-measures the n = 30,000, eps = 1
    cell. Fewer rounds spend more budget per round (2 rounds roughly halve the error above)
    but stop IRLS early: with noise-free data and standardised coefficients near 4, 2, 3, 4
    rounds leave 23%, 6%, 0.4% relative error, hence the default of 4.

Performance
    A site's ``local`` runs once per round on the same rows, so the built, standardised design
    is kept in the site's own work cache (``AnalysisContext.cache``: one per site node, scoped
    by data frame, bounded in entries and bytes, dropped with its frame), keyed by the model
    and the clamping. Each round then costs one pass in 8192-row chunks over the cached n x p
    matrix (about 0.07 s per million rows and 12 parameters here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from analyses.base import Analysis, AnalysisContext, Arrays, NextRound, RoundState
from analyses.common import (
    FloatArray,
    check_model_cells,
    check_not_saturated,
    zero_one_columns,
)
from analyses.glm.design import Design, build_design, local_arrays
from analyses.glm.formula import (
    GLMModel,
    GLMParams,
    dp_round_count,
    glm_key,
    glm_model,
    parse_formula,
)
from analyses.glm.irls import combine
from analyses.glm.pushdown import glm_pushdown
from analyses.glm.result import GLMResult
from analyses.glm.sensitivity import DP_BETA_LIMIT, sensitivities
from analyses.pushdown import ColumnOf, Pushdown
from analyses.registry import analysis
from protocol.config import DataDictionary
from protocol.errors import DisclosureError, ValidationError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec


class GLMState(RoundState):
    """What a ``glm`` task carries to the sites: the coefficients of this round (rounds >= 1),
    on the standardised scale. Everything else (the previous step, the deviance history,
    halvings, noisy record counts) stays in the coordinator's memo."""

    beta: list[float] | None = None


def _design_bytes(design: Design) -> int:
    return design.nbytes


@analysis("glm")
class GLM(Analysis[GLMParams]):
    """Generalised linear model (gaussian, binomial, poisson; canonical links) by IRLS."""

    result_type = GLMResult

    params_model = GLMParams
    state_model = GLMState

    def variables(self, params: GLMParams) -> set[str]:
        formula = parse_formula(params.formula)
        return {formula.response, *formula.variables}

    def model_key(self, params: GLMParams) -> str:
        return glm_key(params.formula)

    def coarsened_variables(self, params: GLMParams) -> set[str]:
        return set()  # even a categorical term's indicator can isolate records: see local

    def check_params(self, params: GLMParams, dictionary: DataDictionary) -> None:
        formula = parse_formula(params.formula)
        low, high = dictionary.bounds(formula.response)
        if params.family == "binomial" and (low < 0 or high > 1):
            raise ValidationError(
                f"family 'binomial' needs a 0/1 response; {formula.response!r} has bounds "
                f"[{low:g}, {high:g}]; use a binary variable or family 'gaussian'"
            )
        if params.family == "poisson" and low < 0:
            raise ValidationError(
                f"family 'poisson' needs a count response >= 0; {formula.response!r} has "
                f"minimum {low:g}"
            )
        glm_model(params, dictionary)

    def dp_rounds(self, params: GLMParams, ctx: AnalysisContext) -> int:
        return dp_round_count(params)

    def check_state(self, state: GLMState, params: GLMParams, ctx: AnalysisContext) -> None:
        """Round 0 carries no coefficients; later rounds exactly p, finite, and in dp within
        the public bound the sensitivities assume (|beta'_j| <= 30 on the standardised scale)."""
        where = f"glm round {ctx.round} state: beta"
        if ctx.round == 0:
            if state.beta is not None:
                raise ValidationError(f"{where}: round 0 carries no coefficients")
            return
        p = glm_model(params, ctx.dictionary).p
        if state.beta is None or len(state.beta) != p:
            given = "none" if state.beta is None else f"{len(state.beta)}"
            raise ValidationError(f"{where}: needs {p} coefficients for this formula, got {given}")
        if ctx.mode == "dp":
            worst = max(abs(b) for b in state.beta)
            if worst > DP_BETA_LIMIT:
                raise ValidationError(
                    f"{where}: |{worst:g}| is above the dp bound {DP_BETA_LIMIT:g} on the "
                    "standardised scale, which the release's sensitivity assumes"
                )

    def declare(self, params: GLMParams, ctx: AnalysisContext) -> RecordSpec:
        model = glm_model(params, ctx.dictionary)
        p = model.p
        sens = sensitivities(model, ctx)
        cells = p * (p + 1) // 2
        arrays = {
            "xwx": ArraySpec((cells,), "statistic", sens["xwx"], budget_share=1.0),
            "n": ArraySpec((), "count", 1.0, integer=True, budget_share=0.1),
        }
        if ctx.round == 0:
            arrays["xwz"] = ArraySpec((p,), "statistic", sens["xwz"], budget_share=1.0)
            if model.family == "gaussian":
                arrays["yy"] = ArraySpec((), "statistic", sens["yy"], budget_share=0.25)
        else:
            last = ctx.round >= self.dp_rounds(params, ctx) - 1
            arrays["score"] = ArraySpec((p,), "statistic", sens["score"], budget_share=1.0)
            arrays["deviance"] = ArraySpec(
                (), "statistic", sens["deviance"], budget_share=0.25 if last else 0.02
            )
        return RecordSpec(arrays)

    @staticmethod
    def _design(data: pd.DataFrame, model: GLMModel, ctx: AnalysisContext) -> Design:
        clamp = ctx.mode == "dp"

        def build() -> Design:
            return build_design(data, model, clamp)

        key = ("glm", model.key, clamp)
        return build() if ctx.cache is None else ctx.cache.get(key, build, _design_bytes)

    def magnitude_cells(
        self, data: pd.DataFrame, params: GLMParams, ctx: AnalysisContext
    ) -> list[FloatArray]:
        """A gaussian or poisson GLM releases the response's sums (X'y at round 0): over the
        model's rows, and over each 0/1 column's and each level's rows. A binomial response
        sums to counts, which the model's cell checks cover."""
        if params.family == "binomial":
            return []
        model = glm_model(params, ctx.dictionary)
        design = self._design(data, model, ctx)
        y = design.y * model.y_half + model.y_centre
        raw = design.x * model.half[None, :] + model.centre[None, :]
        cells = [y]
        cells.extend(y[column == 1] for column in zero_one_columns(raw, model.columns).values())
        for name, levels in model.levels.items():
            cells.extend(y[design.levels[name] == level] for level in levels)
        return cells

    def local(self, data: pd.DataFrame, params: GLMParams, ctx: AnalysisContext) -> Arrays:
        model = glm_model(params, ctx.dictionary)
        design = self._design(data, model, ctx)
        n = design.y.size
        if ctx.mode == "sdc" and model.p > ctx.sdc.max_parameter_ratio * n:
            ratio = ctx.sdc.max_parameter_ratio
            raise DisclosureError(
                f"glm {params.formula!r} has {model.p} parameters but this site has fewer than "
                f"{math.ceil(model.p / ratio)} complete records, the least that disclosure "
                f"control allows for {model.p} parameters (parameters at most {ratio:g} of the "
                "records)"
            )
        if ctx.mode == "sdc":
            self._check_disclosure(design, model, params, ctx)
        return local_arrays(design, model, ctx)

    def pushdown(
        self, params: GLMParams, ctx: AnalysisContext, column: ColumnOf
    ) -> Pushdown | None:
        return glm_pushdown(glm_model(params, ctx.dictionary), ctx, column)

    @staticmethod
    def _check_disclosure(
        design: Design, model: GLMModel, params: GLMParams, ctx: AnalysisContext
    ) -> None:
        """sdc: every 0/1 column's values and the binomial response's hold at least min_cell
        records, and no record is fitted exactly (checked once per design and frame)."""

        def check() -> bool:
            raw = design.x * model.half[None, :] + model.centre[None, :]
            cells = zero_one_columns(raw, model.columns)
            for name, levels in model.levels.items():  # each level, the reference one too
                codes = design.levels[name]
                for level in levels:
                    cells[f"{name}[{level}]"] = (codes == level).astype(np.float64)
            if params.family == "binomial":
                cells[model.formula.response] = design.y * model.y_half + model.y_centre
            what = f"glm {params.formula!r}"
            check_model_cells(cells, ctx.sdc.min_cell, what)
            check_not_saturated(design.x, what)
            return True

        key = ("glm-sdc", model.key, ctx.sdc.min_cell)
        if ctx.cache is None:
            check()
        else:
            ctx.cache.get(key, check, lambda _: 0)

    def combine(
        self, records: Mapping[str, AggregateRecord], params: GLMParams, ctx: AnalysisContext
    ) -> GLMResult | NextRound:
        return combine(records, params, ctx)
