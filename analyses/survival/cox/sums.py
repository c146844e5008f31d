"""Cox regression's scaled design and risk-set sums: what a site computes and the coordinator
pools, and the bounds its dp sensitivities use."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field

from analyses.base import AnalysisContext, Arrays, DistinctNames
from analyses.common import packed_index, unpack
from analyses.survival.grid import FloatArray, IntArray, SurvivalParams, TimeGrid
from protocol.config import BinaryVariable, DataDictionary, NumericVariable
from protocol.errors import InternalError
from protocol.records import Release


def cox_key(time: str, event: str, covariates: Iterable[str]) -> str:
    """A cox model's canonical form, ``Surv(time, event) ~ x1 + x2`` with the covariates
    sorted (what an sdc site compares with the models it approved)."""
    return f"Surv({time}, {event}) ~ {' + '.join(sorted(covariates))}"


class CoxParams(SurvivalParams):
    covariates: DistinctNames = Field(min_length=1, max_length=50)
    ties: Literal["efron", "breslow"] = "efron"
    strata_by_site: bool = False
    max_iter: int = Field(default=50, ge=1, le=100)
    tol: float = Field(default=1e-9, gt=0, lt=1)
    ci_level: float = Field(default=0.95, gt=0, lt=1)
    dp_intervals: int = Field(default=10, ge=1, le=1000)
    dp_iterations: int = Field(default=2, ge=1, le=20)
    dp_coef_bound: float = Field(
        default=5.0, gt=0, le=20, description="dp: bound on sum |b_j| of the scaled coefficients"
    )


@dataclass(frozen=True)
class CoxTerm:
    """One column of the Cox design, centred and scaled by public bounds (|x| <= 1)."""

    name: str
    variable: str
    level: int | None  # a treatment dummy's level; None for a numeric column
    centre: float
    scale: float


def cox_terms(dictionary: DataDictionary, covariates: Sequence[str]) -> list[CoxTerm]:
    terms = []
    for name in covariates:
        var = dictionary.variable(name)
        if isinstance(var, (NumericVariable, BinaryVariable)):
            low, high = dictionary.bounds(name)
            terms.append(CoxTerm(name, name, None, (low + high) / 2, (high - low) / 2))
        else:  # treatment coding against the dictionary's first level
            terms.extend(CoxTerm(f"{name}[T.{lv}]", name, lv, 0.0, 1.0) for lv in var.levels[1:])
    return terms


def design_matrix(
    frame: pd.DataFrame, terms: Sequence[CoxTerm], dictionary: DataDictionary
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Scaled design and the rows whose categorical values are dictionary levels."""
    x = np.empty((len(frame), len(terms)))
    valid = np.ones(len(frame), dtype=bool)
    for j, term in enumerate(terms):
        values = frame[term.variable].to_numpy(dtype=np.float64)
        if term.level is None:
            low, high = dictionary.bounds(term.variable)
            x[:, j] = (np.clip(values, low, high) - term.centre) / term.scale
        else:
            x[:, j] = values == term.level
            valid &= np.isin(values, dictionary.levels(term.variable))
    return x, valid


@dataclass
class CoxSums:
    """One stratum's (or the pooled) released sums at the m event times.

    ``s2`` and ``e2`` (the Hessian's sums) are None in dp rounds that do not release them;
    ``e0``, ``e1``, ``e2`` are None with Breslow's ties.
    """

    d: FloatArray
    xsum: FloatArray
    s0: FloatArray
    s1: FloatArray
    s2: FloatArray | None = None
    e0: FloatArray | None = None
    e1: FloatArray | None = None
    e2: FloatArray | None = None

    @classmethod
    def of(cls, arrays: Mapping[str, FloatArray]) -> CoxSums:
        def get(name: str) -> FloatArray | None:
            value = arrays.get(name)
            return None if value is None else np.array(value, dtype=np.float64)

        def need(name: str) -> FloatArray:
            value = get(name)
            if value is None:
                raise InternalError(f"cox: array {name!r} missing from a round's sums")
            return value

        return cls(
            need("d"),
            need("xsum"),
            need("s0"),
            need("s1"),
            get("s2"),
            get("e0"),
            get("e1"),
            get("e2"),
        )

    def cleaned(self) -> CoxSums:
        """Post-processing of noisy sums into a consistent set (dp mode)."""
        d = np.asarray(np.round(np.maximum(self.d, 0.0)), dtype=np.float64)
        s0 = np.maximum(self.s0, 0.0)
        e0 = None if self.e0 is None else np.clip(self.e0, 0.0, None)
        return CoxSums(d, self.xsum, s0, self.s1, self.s2, e0, self.e1, self.e2)


def reverse_cumsum(values: FloatArray) -> FloatArray:
    return np.asarray(np.cumsum(values[::-1], axis=0)[::-1], dtype=np.float64)


def cox_fit_terms(sums: CoxSums, beta: FloatArray) -> tuple[float, FloatArray, FloatArray | None]:
    """Partial log-likelihood, gradient and information (None without ``s2``) of one stratum.

    Efron's ties when the sums over tied events (``e0``, ``e1``) are present, else Breslow's.
    """
    p = beta.size
    s0 = reverse_cumsum(sums.s0)
    use = (sums.d > 0) & (s0 > 0)
    d, s0 = sums.d[use], s0[use]
    s1 = reverse_cumsum(sums.s1)[use]
    s2 = None if sums.s2 is None else unpack(reverse_cumsum(sums.s2)[use], p)
    loglik = float(sums.xsum @ beta)
    grad = sums.xsum.copy()
    if sums.e0 is None or sums.e1 is None:
        mean = s1 / s0[:, None]
        loglik -= float(np.sum(d * np.log(s0)))
        grad = grad - d @ mean
        if s2 is None:
            return loglik, grad, None
        info = np.einsum("k,kij->ij", d / s0, s2) - np.einsum("k,ki,kj->ij", d, mean, mean)
        return loglik, grad, info
    e0, e1 = np.minimum(sums.e0[use], s0), sums.e1[use]
    ties = d.astype(np.int64)
    which = np.repeat(np.arange(ties.size), ties)
    # Efron: the l-th of d tied events (l = 0..d-1) sees S0 - (l / d) E0.
    frac = (np.arange(which.size) - np.repeat(np.cumsum(ties) - ties, ties)) / np.repeat(d, ties)
    phi = s0[which] - frac * e0[which]
    if np.any(phi <= 0):
        raise InternalError("cox: an Efron denominator is not positive")

    def by_time(values: FloatArray) -> FloatArray:
        return np.bincount(which, weights=values, minlength=ties.size).astype(
            np.float64, copy=False
        )

    a, b = by_time(1 / phi), by_time(frac / phi)
    loglik -= float(np.sum(np.log(phi)))
    grad = grad - (a @ s1 - b @ e1)
    if s2 is None or sums.e2 is None:
        return loglik, grad, None
    e2 = unpack(sums.e2[use], p)
    c, dd, f = by_time(phi**-2), by_time(frac / phi**2), by_time(frac**2 / phi**2)
    outer = (
        np.einsum("k,ki,kj->ij", c, s1, s1)
        - np.einsum("k,ki,kj->ij", dd, s1, e1)
        - np.einsum("k,ki,kj->ij", dd, e1, s1)
        + np.einsum("k,ki,kj->ij", f, e1, e1)
    )
    info = np.einsum("k,kij->ij", a, s2) - np.einsum("k,kij->ij", b, e2) - outer
    return loglik, grad, info


#: The largest x'b a site accepts: e^700 is finite, e^710 is not.
MAX_ETA = 700.0


def releases_hessian(ctx: AnalysisContext) -> bool:
    """Whether this round releases the Hessian's sums: in dp only the first round does, at
    b = 0 where the sensitivity e^B is smallest; its Hessian steers every later step (measured:
    several times less noise in the estimate than a noisy Hessian at the current b)."""
    return ctx.mode != "dp" or ctx.round == 0


def releases_fixed(ctx: AnalysisContext) -> bool:
    """Whether this round releases the event counts and sums of x (in dp: the first round only,
    as they do not depend on the coefficients; exact modes: every round, nothing kept)."""
    return ctx.mode != "dp" or ctx.round == 0


def max_eta(beta: FloatArray, terms: Sequence[CoxTerm]) -> float:
    """The largest x'b over the scaled design's box: |b_j| per numeric column, and per
    categorical variable the largest of 0 and its dummies' coefficients (one dummy is 1)."""
    total = 0.0
    best: dict[str, float] = {}
    for coef, term in zip(beta, terms, strict=True):
        if term.level is None:
            total += abs(float(coef))
        else:
            best[term.variable] = max(best.get(term.variable, 0.0), float(coef))
    return total + sum(best.values())


def max_weight(beta: Sequence[float], terms: Sequence[CoxTerm]) -> float:
    """The largest exp(x'b) over the scaled design's box (finite: states above e^700 are
    refused by ``Cox.check_state``)."""
    return math.exp(min(max_eta(np.asarray(beta, dtype=np.float64), terms), MAX_ETA))


EFRON_NAMES = ("e0", "e1", "e2")


SUM_NAMES = ("s0", "s1", "s2")


def risk_sums(
    times: FloatArray,
    events: npt.NDArray[np.bool_],
    x: FloatArray,
    grid: TimeGrid,
    event_idx: Sequence[int],
    beta: Sequence[float],
    efron: bool,
    hessian: bool,
    weight_bound: float = math.inf,
) -> Arrays:
    """One site's sums per interval between consecutive pooled event times (see the module doc).

    Interval k holds the rows whose grid point lies in [t_k, t_{k+1}); a reverse cumulative sum
    over intervals gives the risk-set sums at t_k. Events are summed at their own event time.
    """
    n, p = x.shape
    m = len(event_idx)
    rows, cols = packed_index(p)
    points = np.asarray(event_idx, dtype=np.int64)
    interval_of = np.searchsorted(points, np.arange(grid.size), side="right") - 1
    at_point = np.zeros(grid.size, dtype=bool)
    at_point[points] = True
    point = grid.index(times)
    interval = interval_of[point]
    keep = interval >= 0  # rows before the first event time are in no risk set
    # |x_j| <= 1 bounds x'b by the box maximum; the clip keeps every weight within the bound
    # the declared sensitivity assumes even if that ever failed.
    w = np.minimum(np.exp(x @ np.asarray(beta, dtype=np.float64)), weight_bound)

    def sums(idx: IntArray, weights: FloatArray) -> FloatArray:
        return np.bincount(idx, weights=weights, minlength=m).astype(np.float64, copy=False)

    def weighted(sel: npt.NDArray[np.bool_], prefix: str) -> Arrays:
        """Sums of w, w x and the packed w x x' per interval over the selected rows."""
        idx, ws, xs = interval[sel], w[sel], x[sel]
        wx = xs * ws[:, None]
        out = {
            f"{prefix}0": sums(idx, ws),
            f"{prefix}1": np.column_stack([sums(idx, wx[:, j]) for j in range(p)]).reshape(m, p),
        }
        if hessian:
            out[f"{prefix}2"] = np.column_stack(
                [sums(idx, wx[:, r] * xs[:, c]) for r, c in zip(rows, cols, strict=True)]
            ).reshape(m, len(rows))
        return out

    ev = events & keep & at_point[point]
    out: Arrays = {
        "n": np.array(float(n)),
        "d": np.bincount(interval[ev], minlength=m).astype(np.float64, copy=False),
        "xsum": x[ev].sum(axis=0),
        **weighted(keep, "s"),
    }
    if efron:
        out.update(weighted(ev, "e"))
    return out


@dataclass
class Stratum:
    """One stratum's sums (``pooled``, or a site's when stratified) and the releases whose
    noise they carry (one per contributing site)."""

    key: str
    sums: CoxSums
    releases: dict[str, list[Release]]

    @property
    def variances(self) -> dict[str, float]:
        """Noise variance of one cell of each sum."""
        return {k: sum(r.variance() for r in rels) for k, rels in self.releases.items()}
