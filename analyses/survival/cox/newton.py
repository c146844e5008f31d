"""The coordinator's half of ``cox``: pooling, Newton-Raphson steps (exact and dp), the
monotone-likelihood and identifiability checks, and the dp bootstrap of the noise."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from analyses.base import (
    AnalysisContext,
    NextRound,
)
from analyses.common import pooled
from analyses.survival.cox.result import BOOTSTRAP_DRAWS, cox_result
from analyses.survival.cox.sums import (
    MAX_ETA,
    CoxParams,
    CoxSums,
    CoxTerm,
    Stratum,
    cox_fit_terms,
    cox_terms,
    max_eta,
    releases_fixed,
)
from analyses.survival.grid import FloatArray, choose_width, sdc_widths
from protocol.errors import InternalError, ModelError, ValidationError
from protocol.records import MAX_CELLS, AggregateRecord, Release

#: Monotone likelihood (``check_monotone``): scaled coefficients beyond this together (a
#: hazard ratio of e^5 across half the public range), each still moved outward by at least
#: ``RUNAWAY_STEP`` by a step that raised the partial log-likelihood by at most ``PLATEAU`` of
#: its size (R's coxph convergence eps), are running off to infinity.
RUNAWAY_BETA = 5.0
RUNAWAY_STEP = 0.1
PLATEAU = 1e-9


def shrink_to_bound(beta: FloatArray, bound: float) -> FloatArray:
    """``beta`` scaled down to sum |b_j| <= bound (dp: the public bound on the coefficients)."""
    norm = float(np.sum(np.abs(beta)))
    return beta * (bound / norm) if norm > bound else beta


def newton_step(
    info: FloatArray,
    grad: FloatArray,
    beta: FloatArray | None = None,
    terms: Sequence[CoxTerm] | None = None,
) -> FloatArray:
    """The Newton step I^-1 U; ModelError when I is singular (monotone likelihood when the
    exact fit's ``beta`` has run off along ``terms``, as the information vanishes there)."""
    try:
        return np.asarray(np.linalg.solve(info, grad), dtype=np.float64)
    except np.linalg.LinAlgError:
        # Whether solve raises, or returns a huge or a tiny step, on a nearly singular I is a
        # matter of rounding; check_monotone decides long before. This is the fallback.
        running = [] if beta is None else np.flatnonzero(np.abs(beta) > RUNAWAY_BETA).tolist()
        if terms is not None and beta is not None and running:
            raise ModelError(
                monotone_message(terms, beta, running, "the information matrix became singular")
            ) from None
        raise ModelError(
            "cox: the information matrix is singular at the current estimate; a covariate may "
            "separate events from the risk set"
        ) from None


def combine(records: Mapping[str, AggregateRecord], params: CoxParams, ctx: AnalysisContext) -> Any:
    if not records:
        raise ModelError("cox: no site returned records")
    phase = ctx.state.get("phase")
    if phase == "probe":
        width = choose_width(records, sdc_widths(params, ctx.dictionary))
        return NextRound({"phase": "counts", "width": width})
    if phase == "counts":
        counts = pooled(records, "counts")
        event_idx = np.flatnonzero(counts[0] > 0)
        if event_idx.size == 0:
            raise ModelError(
                f"cox: no events among {counts.sum():.0f} records ({params.event!r} is never "
                "1); a proportional hazards model cannot be fitted"
            )
        p = len(cox_terms(ctx.dictionary, params.covariates))
        if event_idx.size * p * (p + 1) // 2 > MAX_CELLS:
            raise ValidationError(
                f"cox: {event_idx.size} distinct event times with {p} design columns need "
                f"more than {MAX_CELLS} cells per release; raise time_resolution"
            )
        state: dict[str, Any] = {
            "phase": "newton",
            "event_idx": event_idx.tolist(),
            "beta": [0.0] * p,
        }
        if "width" in ctx.state:
            state["width"] = ctx.state["width"]
        return NextRound(state, {})
    return newton_round(records, params, ctx)


def pooled_strata(
    records: Mapping[str, AggregateRecord], params: CoxParams, ctx: AnalysisContext
) -> list[Stratum]:
    """The pooled sums (or each site's, stratified), with their noise variances per cell."""
    names = list(records[next(iter(records))].arrays)
    names.remove("n")
    arrays: dict[str, dict[str, FloatArray]] = {}
    releases: dict[str, dict[str, list[Release]]] = {}
    if params.strata_by_site:
        for site, record in records.items():
            arrays[site] = {k: np.asarray(record[k], dtype=np.float64) for k in names}
            releases[site] = {k: [record.releases[k]] for k in names}
    else:
        arrays["pooled"] = {k: pooled(records, k) for k in names}
        releases["pooled"] = {k: [r.releases[k] for r in records.values()] for k in names}
    if not releases_fixed(ctx):  # dp: event counts and sums of x came in the first round
        stored = ctx.memo["fixed"]
        missing = sorted(set(arrays) - set(stored))
        if missing:
            raise ModelError(
                f"cox: {', '.join(missing)} did not answer the first dp round, so its event "
                "counts are unknown; rerun the request"
            )
        for key in arrays:
            arrays[key]["d"] = np.asarray(stored[key]["d"], dtype=np.float64)
            arrays[key]["xsum"] = np.asarray(stored[key]["xsum"], dtype=np.float64)
            releases[key]["d"] = list(stored[key]["releases_d"])
            releases[key]["xsum"] = list(stored[key]["releases_xsum"])
    strata = []
    for key, values in arrays.items():
        sums = CoxSums.of(values)
        strata.append(Stratum(key, sums.cleaned() if ctx.mode == "dp" else sums, releases[key]))
    return strata


def evaluate_strata(
    strata: Sequence[CoxSums], beta: FloatArray
) -> tuple[float, FloatArray, FloatArray | None]:
    loglik, grad = 0.0, np.zeros(beta.size)
    info: FloatArray | None = np.zeros((beta.size, beta.size))
    for sums in strata:
        part_ll, part_grad, part_info = cox_fit_terms(sums, beta)
        loglik, grad = loglik + part_ll, grad + part_grad
        info = None if info is None or part_info is None else info + part_info
    return loglik, grad, info


def newton_round(
    records: Mapping[str, AggregateRecord], params: CoxParams, ctx: AnalysisContext
) -> Any:
    terms = cox_terms(ctx.dictionary, params.covariates)
    state, memo = dict(ctx.state), dict(ctx.memo)
    beta = np.asarray(state["beta"], dtype=np.float64)
    iteration = int(memo.get("iteration", 0)) + 1
    strata = pooled_strata(records, params, ctx)
    loglik, grad, info = evaluate_strata([s.sums for s in strata], beta)
    if ctx.mode == "dp":
        return newton_round_dp(records, params, ctx, terms, strata, loglik, grad, info)
    if info is None:
        raise InternalError("cox: an exact round came without the Hessian's sums")
    if iteration == 1:
        check_identifiable(info, terms)
    prev = memo.get("prev_loglik")
    if prev is None and not math.isfinite(loglik):
        raise ModelError("cox: the partial likelihood is not finite at the starting values")
    if not math.isfinite(loglik) or (prev is not None and loglik < prev - 1e-10 * abs(prev)):
        halvings = int(memo.get("halvings", 0)) + 1
        if halvings > 40:
            raise ModelError("cox: step halving failed to increase the partial likelihood")
        back = np.asarray(memo["prev_beta"])
        state["beta"] = ((beta + back) / 2).tolist()
        memo.update(halvings=halvings, iteration=iteration)
        return NextRound(state, memo)
    check_monotone(beta, grad, loglik, memo, terms, iteration)
    step = newton_step(info, grad, beta, terms)
    if np.max(np.abs(step)) < params.tol:
        check_finite_optimum(beta, info, terms, iteration)
        return cox_result(
            records, params, ctx, terms, beta, info, loglik, iteration, strata, None, True
        )
    if iteration >= params.max_iter:
        raise ModelError(no_convergence_message(beta, step, terms, params))
    # A step of more than 5 on the scaled covariates (a hazard ratio of e^5 across half the
    # public range) is cut to 5: far from the optimum, Newton can overshoot into overflow.
    step *= min(1.0, 5.0 / float(np.max(np.abs(step))))
    if max_eta(beta + step, terms) > MAX_ETA:
        # e^(x'b) would overflow at the sites: only a diverging (monotone) fit gets here.
        runaway = terms[int(np.argmax(np.abs(beta + step)))].name
        raise ModelError(
            f"cox: the coefficient of {runaway} keeps growing (the largest x'b over the "
            f"design passes {MAX_ETA:g} after {iteration} iterations): monotone "
            "likelihood, as a covariate separates events from the risk set. Drop or merge it"
        )
    state["beta"] = (beta + step).tolist()
    memo.update(prev_beta=beta.tolist(), prev_loglik=loglik, iteration=iteration, halvings=0)
    return NextRound(state, memo)


def newton_round_dp(
    records: Mapping[str, AggregateRecord],
    params: CoxParams,
    ctx: AnalysisContext,
    terms: Sequence[CoxTerm],
    strata: Sequence[Stratum],
    loglik: float,
    grad: FloatArray,
    info: FloatArray | None,
) -> Any:
    """A dp round: a fixed number of them, every step with the first round's Hessian."""
    state, memo = dict(ctx.state), dict(ctx.memo)
    beta = np.asarray(state["beta"], dtype=np.float64)
    first = None if ctx.round == 0 else np.asarray(memo["hessian"], dtype=np.float64)
    info = dp_information(info, first)
    step = newton_step(info, grad)
    if ctx.round == 0:  # keep the once-released event counts, sums of x and Hessian
        memo["fixed"] = {
            s.key: {
                "d": s.sums.d.tolist(),
                "xsum": s.sums.xsum.tolist(),
                "releases_d": s.releases["d"],
                "releases_xsum": s.releases["xsum"],
            }
            for s in strata
        }
        memo["hessian"] = info.tolist()
    if ctx.round + 1 < params.dp_iterations:
        state["beta"] = shrink_to_bound(beta + step, params.dp_coef_bound).tolist()
        memo["iteration"] = ctx.round + 1
        return NextRound(state, memo)
    noise = bootstrap_noise(strata, beta, first)
    final = shrink_to_bound(beta + step, params.dp_coef_bound)
    return cox_result(
        records, params, ctx, terms, final, info, loglik, ctx.round + 1, strata, noise,
        converged=bool(np.max(np.abs(step)) < params.tol),
        shrunk=bool(np.any(final != beta + step)),
    )  # fmt: skip


def bootstrap_noise(
    strata: Sequence[Stratum], beta: FloatArray, first: FloatArray | None
) -> FloatArray:
    """Variance of each final coefficient due to the release noise (parametric bootstrap:
    redraw each site's noise on the released sums with its own mechanism and scale and redo
    the last step; a robust spread, as a noisy Hessian makes a few draws wild)."""
    if not any(v > 0 for stratum in strata for v in stratum.variances.values()):
        return np.zeros(beta.size)
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(BOOTSTRAP_DRAWS):
        noisy = []
        for stratum in strata:
            fresh = {}
            for k, rels in stratum.releases.items():
                value = np.asarray(getattr(stratum.sums, k), dtype=np.float64)
                fresh[k] = value + sum(
                    (r.redraw(rng, value.shape) for r in rels), np.zeros(value.shape)
                )
            noisy.append(CoxSums.of(fresh).cleaned())
        _, grad, info = evaluate_strata(noisy, beta)
        draws.append(beta + newton_step(dp_information(info, first), grad))
    spread = np.asarray(draws)
    mad = np.median(np.abs(spread - np.median(spread, axis=0)), axis=0)
    return np.asarray((1.4826 * mad) ** 2, dtype=np.float64)


def check_finite_optimum(
    beta: FloatArray, info: FloatArray, terms: Sequence[CoxTerm], iteration: int
) -> None:
    """ModelError when the steps died out only because the likelihood flattened at infinity.

    Under monotone likelihood the gradient and the information both vanish as a coefficient
    grows, so Newton's steps shrink below ``tol`` at an estimate that is really infinite: a
    scaled coefficient beyond 10 (a hazard ratio over e^10 across half the public range) with
    a Wald z under 1 is that signature.
    """
    try:
        se = np.sqrt(np.abs(np.diag(np.linalg.inv(info))))
    except np.linalg.LinAlgError:
        se = np.full(beta.size, np.inf)
    bad = [j for j in range(beta.size) if abs(beta[j]) > 10 and abs(beta[j]) < se[j]]
    if bad:
        detail = f"standard error {se[bad[0]]:.3g} after {iteration} iterations"
        raise ModelError(monotone_message(terms, beta, bad, detail))


def check_monotone(
    beta: FloatArray,
    grad: FloatArray,
    loglik: float,
    memo: Mapping[str, Any],
    terms: Sequence[CoxTerm],
    iteration: int,
) -> None:
    """ModelError when coefficients run off to infinity (monotone likelihood), decided early.

    Under monotone likelihood (in some direction of the covariates every event has the largest
    value in its risk set) the partial likelihood rises toward a finite limit as the
    coefficients go to infinity along that direction. Newton's step there stays about the same
    size (one over the gap in x'v between an event and the rest of its risk set), while the
    gain, the score and the information along it all shrink by a constant factor a step. Left
    alone, they reach the rounding level of the sums, where whether the information is singular,
    the step huge or below ``tol`` depends on how the machine rounds (BLAS kernels, threads).

    So the decision is taken while those numbers are still far above rounding, by the signature
    R's coxph reports as "Loglik converged before variable ...; coefficient may be infinite": the
    last step raised the log-likelihood by at most ``PLATEAU`` of its size (coxph's own
    convergence criterion; the rounding of that difference is about 1e-16 of it), yet moved
    some coefficients further outward by at least ``RUNAWAY_STEP`` each, with the score still
    pushing them outward, and together (sum of |b_j|, which bounds half the spread of their
    x'b on the scaled design) they exceed ``RUNAWAY_BETA``: one coefficient, or several when
    a combination of covariates separates. At a finite optimum a step that gains so little is
    tiny (Newton converges quadratically), so a well-posed fit never meets all of these. Uses
    the ``prev_beta`` and ``prev_loglik`` of the previous full step, kept in the coordinator's
    memo.
    """
    prev_loglik, prev_beta = memo.get("prev_loglik"), memo.get("prev_beta")
    if prev_loglik is None or prev_beta is None:
        return
    if loglik - float(prev_loglik) > PLATEAU * max(1.0, abs(loglik)):
        return
    outward = (beta - np.asarray(prev_beta, dtype=np.float64)) * np.sign(beta)
    running = np.flatnonzero((outward >= RUNAWAY_STEP) & (grad * beta > 0)).tolist()
    if running and float(np.sum(np.abs(beta[running]))) > RUNAWAY_BETA:
        detail = f"the partial log-likelihood stopped rising after {iteration} iterations"
        raise ModelError(monotone_message(terms, beta, running, detail))


def monotone_message(
    terms: Sequence[CoxTerm], beta: FloatArray, running: Sequence[int], detail: str
) -> str:
    names = ", ".join(terms[j].name for j in running)
    grows = "coefficient of {} grows" if len(running) == 1 else "coefficients of {} grow"
    return (
        f"cox: the {grows.format(names)} without bound (scaled estimate "
        f"{beta[running[0]]:.3g}; {detail}): monotone likelihood, as a covariate separates "
        "events from the risk set, so the estimate is infinite. Drop or merge it"
    )


def no_convergence_message(
    beta: FloatArray, step: FloatArray, terms: Sequence[CoxTerm], params: CoxParams
) -> str:
    """Why the exact fit stopped at ``max_iter``, naming the coefficients beyond
    ``RUNAWAY_BETA`` (monotone likelihood not yet confirmed by the plateau) if any."""
    order = np.argsort(-np.abs(beta))
    worst = [terms[j].name for j in order if abs(beta[j]) > RUNAWAY_BETA]
    head = (
        f"cox: no convergence in {params.max_iter} Newton-Raphson iterations (last step "
        f"{np.max(np.abs(step)):.3g}, tol {params.tol:g})"
    )
    if not worst:
        return f"{head}; raise max_iter, or check the covariates' coding and bounds"
    return (
        f"{head}; the coefficients of {', '.join(worst)} keep growing, which suggests monotone "
        "likelihood (a covariate separating events from the risk set). Drop or merge it, or "
        "raise max_iter"
    )


def check_identifiable(info: FloatArray, terms: Sequence[CoxTerm]) -> None:
    """ModelError naming the terms when the information at b = 0 is singular."""
    diag = np.diag(info)
    constant = [
        t.name for t, v in zip(terms, diag, strict=True) if v <= 1e-12 * max(1.0, diag.max())
    ]
    if constant:
        raise ModelError(
            f"cox: the design is singular: {', '.join(constant)} does not vary among the records "
            "at risk (a constant column or a level with no records); drop it or merge levels"
        )
    scaled = info / np.sqrt(np.outer(diag, diag))
    values, vectors = np.linalg.eigh(scaled)
    if values[0] < 1e-10:
        involved = [t.name for t, v in zip(terms, vectors[:, 0], strict=True) if abs(v) > 0.1]
        raise ModelError(
            f"cox: the design is singular: {', '.join(involved)} are collinear among the records "
            "at risk; drop one of them"
        )


def dp_information(info: FloatArray | None, first: FloatArray | None) -> FloatArray:
    """A noisy information matrix made symmetric positive definite (dp post-processing).

    Rounds without the Hessian's sums use the first round's. Eigenvalues are floored (at a
    tenth of the first round's smallest when there is one), so a noise-dominated direction
    cannot send a step far away.
    """
    if info is None:
        if first is None:
            raise InternalError("cox: the first dp round came without the Hessian's sums")
        return first
    sym = (info + info.T) / 2
    values, vectors = np.linalg.eigh(sym)
    floor = max(float(values.max()), 1e-12) * 1e-6
    if first is not None:
        floor = max(floor, 0.1 * float(np.linalg.eigvalsh(first).min()))
    return np.asarray((vectors * np.maximum(values, floor)) @ vectors.T, dtype=np.float64)
