"""The coordinator's half of ``glm``: pooled IRLS steps with step halving (exact), the dp
rounds with their noise bootstrap, and the rank and separation checks."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from analyses.base import AnalysisContext, NextRound
from analyses.common import unpack
from analyses.glm.design import state_beta
from analyses.glm.formula import FloatArray, GLMModel, GLMParams, dp_round_count, glm_model
from analyses.glm.result import BOOTSTRAP, GLMResult, GLMRound, glm_result
from analyses.glm.sensitivity import DP_BETA_LIMIT
from protocol.errors import ModelError
from protocol.records import AggregateRecord

SEPARATION_BETA = 10.0

RCOND = 1e-11

MAX_HALVINGS = 20


def make_pd(h: FloatArray, floor: float) -> FloatArray:
    """Symmetrise ``h`` (one matrix or a stack) and raise its eigenvalues to >= ``floor``."""
    sym = (h + np.swapaxes(h, -1, -2)) / 2
    vals, vecs = np.linalg.eigh(sym)
    top = np.abs(vals).max(axis=-1, keepdims=True)
    low = np.maximum(floor, 1e-12 * np.maximum(top, 1.0))
    clipped = np.maximum(vals, low)
    return (vecs * clipped[..., None, :]) @ np.swapaxes(vecs, -1, -2)  # type: ignore[no-any-return]


def inverse(h: FloatArray) -> FloatArray:
    return np.asarray(np.linalg.inv(h), dtype=np.float64)


def check_rank(
    h: FloatArray,
    model: GLMModel,
    params: GLMParams,
    separation: bool,
    beta: FloatArray | None = None,
) -> None:
    """Raise ModelError when the pooled X'WX is singular, naming the collinear terms."""
    diag = np.diag(h).copy()
    zero = [model.columns[j] for j in range(model.p) if not diag[j] > 0]
    if zero and not separation:
        raise ModelError(
            f"glm {params.formula!r}: singular design: column(s) {', '.join(zero)} are zero in "
            "every site's complete records (a level absent everywhere?); drop or merge them"
        )
    if not zero:
        d = 1.0 / np.sqrt(diag)
        vals, vecs = np.linalg.eigh(h * d[:, None] * d[None, :])
        if vals[0] > RCOND * vals[-1]:
            return
        weights = np.abs(vecs[:, 0])
        zero = [model.columns[j] for j in range(model.p) if weights[j] > 0.05]
    if separation and beta is not None and float(np.abs(beta).max()) > SEPARATION_BETA:
        raise ModelError(separation_message(params, model, beta, complete=False))
    raise ModelError(
        f"glm {params.formula!r}: singular design: the pooled X'WX has no inverse; these "
        f"terms are collinear: {', '.join(zero)} (a level absent everywhere, a constant "
        "column, or a term that is a combination of others); drop one of them"
    )


def separation_message(params: GLMParams, model: GLMModel, beta: FloatArray, complete: bool) -> str:
    big = [model.columns[j] for j in np.argsort(-np.abs(beta)) if abs(beta[j]) > SEPARATION_BETA]
    what = "complete separation" if complete else "(quasi-)complete separation"
    terms = f" (coefficients growing without bound: {', '.join(big)})" if big else ""
    fitted = "probabilities reach 0 or 1" if model.family == "binomial" else "means reach 0"
    return (
        f"glm {params.formula!r}: {what}{terms}: fitted {fitted} for some "
        "combination of terms, so the maximum-likelihood estimate does not exist; drop or merge "
        "the separating terms"
    )


def combine(
    records: Mapping[str, AggregateRecord], params: GLMParams, ctx: AnalysisContext
) -> GLMResult | NextRound:
    if not records:
        raise ModelError(f"glm {params.formula!r}: no site returned records to fit")
    model = glm_model(params, ctx.dictionary)
    p = model.p
    pooled = {
        name: np.sum([r[name] for r in records.values()], axis=0)
        for name in next(iter(records.values())).arrays
    }
    noisy = ctx.mode == "dp" or any(
        rel.scale > 0 for r in records.values() for rel in r.releases.values()
    )
    n_total = float(pooled["n"])
    n_history = [*ctx.memo.get("n_history", []), n_total]
    h = unpack(pooled["xwx"], p)
    # A noisy n says little (n gets a tenth of a dp round's budget): only exact counts decide.
    if ctx.round == 0 and n_total <= p and not noisy:
        raise ModelError(
            f"glm {params.formula!r}: {n_total:.0f} complete records for {p} parameters; "
            "a model needs more records than parameters"
        )
    step = GLMRound(records, pooled, h, model, params, ctx)
    if noisy:
        return dp_round(step, n_history)
    if ctx.round == 0:
        check_rank(h, model, params, separation=False)
        beta = np.linalg.solve(h, pooled["xwz"])
        return NextRound(
            {"beta": beta.tolist()}, {"iteration": 1, "halvings": 0, "n_history": n_history}
        )
    return exact_round(step, n_total)


def exact_round(step: GLMRound, n_total: float) -> GLMResult | NextRound:
    """One IRLS step on the exact pooled sums, halving it while the deviance grows."""
    pooled, h, model, params, ctx = step.pooled, step.h, step.model, step.params, step.ctx
    memo = dict(ctx.memo)
    beta = state_beta(ctx, model.p)
    deviance = float(pooled["deviance"])
    prev_dev = memo.get("prev_deviance")
    if prev_dev is not None and (
        not math.isfinite(deviance) or deviance > prev_dev + 1e-10 * (abs(prev_dev) + 1)
    ):
        if memo["halvings"] >= MAX_HALVINGS:
            raise ModelError(
                f"glm {params.formula!r}: the deviance does not decrease even after "
                f"{MAX_HALVINGS} step halvings (last {deviance:.6g}, before "
                f"{prev_dev:.6g}); the model is not estimable from these data"
            )
        trial = (np.asarray(memo["prev_beta"]) + beta) / 2
        return NextRound({"beta": trial.tolist()}, {**memo, "halvings": memo["halvings"] + 1})
    if model.family == "binomial" and deviance <= 1e-8 * max(n_total, 1.0):
        raise ModelError(separation_message(params, model, beta, complete=True))
    check_rank(h, model, params, separation=model.family != "gaussian", beta=beta)
    delta = np.linalg.solve(h, pooled["score"])
    new = beta + delta
    iteration = int(memo["iteration"]) + 1
    change = float(np.abs(delta).max()) / max(1.0, float(np.abs(beta).max()))
    if not math.isfinite(change):
        raise ModelError(f"glm {params.formula!r}: the IRLS step is not finite")
    if change <= params.tol:
        return glm_result(step, new, inverse(h), deviance, n_total, iteration, converged=True)
    if iteration >= params.max_iter:
        if model.family != "gaussian" and float(np.abs(new).max()) > SEPARATION_BETA:
            raise ModelError(separation_message(params, model, new, complete=False))
        raise ModelError(
            f"glm {params.formula!r} did not converge in {params.max_iter} iterations "
            f"(last relative step {change:.3g} > tol {params.tol:g}); raise max_iter or "
            "simplify the model"
        )
    return NextRound(
        {"beta": new.tolist()},
        {**memo, "prev_beta": beta.tolist(), "prev_deviance": deviance, "iteration": iteration},
    )


def dp_round(step: GLMRound, n_history: list[float]) -> GLMResult | NextRound:
    """One of the fixed dp rounds: a Newton step on the noisy sums; the last one bootstraps
    the sites' noise into the standard errors."""
    records, pooled, h, model = step.records, step.pooled, step.h, step.model
    params, ctx = step.params, step.ctx
    p = model.p
    upper = np.triu_indices(p)
    cell_sd = math.sqrt(sum(r.releases["xwx"].variance() for r in records.values()))
    floor = cell_sd * math.sqrt(p)
    h_pd = make_pd(h, floor)
    rounds = dp_round_count(params)
    start = ctx.round == 0
    base = np.zeros(p) if start else state_beta(ctx, p)
    vec_name = "xwz" if start else "score"
    vec = pooled[vec_name]
    new = base + np.linalg.solve(h_pd, vec)
    last = model.family == "gaussian" or ctx.round >= rounds - 1
    if not last:
        new = np.clip(new, -DP_BETA_LIMIT, DP_BETA_LIMIT)
        return NextRound({"beta": new.tolist()}, {"n_history": n_history})
    n_total = float(np.mean(n_history))
    if model.family == "gaussian":
        rss = float(pooled["yy"] - 2 * new @ vec + new @ h @ new)
        deviance = max(rss, 0.0)
    else:
        deviance = max(float(pooled["deviance"]), 0.0)
    # Parametric bootstrap of the final step: redraw each site's noise as it was released.
    rng = np.random.default_rng(20260511)
    h_noise = np.zeros((BOOTSTRAP, upper[0].size))
    v_noise = np.zeros((BOOTSTRAP, p))
    for record in records.values():
        h_noise += record.releases["xwx"].redraw(rng, h_noise.shape)
        v_noise += record.releases[vec_name].redraw(rng, v_noise.shape)
    full = np.zeros((BOOTSTRAP, p, p))
    full[:, upper[0], upper[1]] = h_noise
    full[:, upper[1], upper[0]] = h_noise
    hb = make_pd(h[None, :, :] + full, floor)
    draws = base + np.linalg.solve(hb, (vec + v_noise)[:, :, None])[:, :, 0]
    noise_cov = np.zeros((p, p))
    if any(r.releases[k].noisy for r in records.values() for k in ("xwx", vec_name)):
        noise_cov = np.atleast_2d(np.cov(draws, rowvar=False))
    return glm_result(step, new, inverse(h_pd), deviance, n_total, ctx.round + 1, False, noise_cov)
