"""Generalised linear models fitted by federated IRLS: ``glm``.

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
    A site's ``local`` runs once per round on the same data, so the built, standardised design
    is cached per (data object identity and shape, formula, family, dictionary, clamping) in a
    small bounded LRU cache: at most 16 designs and 4 GiB (``_DESIGN_CACHE_ENTRIES``,
    ``_DESIGN_CACHE_BYTES``; the newest design is always kept, so a design larger than the cap
    is still reused across rounds). Entries hold only a weak reference to the DataFrame and die
    with it, so a new (say, freshly filtered) frame is a new entry and a design is never served
    for another frame. A frame edited in place keeps its design: sites hand ``local`` frames
    they do not modify afterwards. Each round then costs one pass in 8192-row chunks over the
    cached n x p matrix (about 0.07 s per million rows and 12 parameters here).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field
from scipy import special

from analyses._lazy import stats
from analyses.base import Analysis, AnalysisContext, Arrays, NextRound, Params, RoundState
from analyses.registry import analysis
from analyses.results import AnalysisResult
from protocol.config import BinaryVariable, DataDictionary, NumericVariable
from protocol.errors import DisclosureError, InternalError, ModelError, ValidationError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec

FloatArray = npt.NDArray[np.float64]
Family = Literal["gaussian", "binomial", "poisson"]

_FORMULA_HELP = (
    "write it as 'y ~ x1 + x2' with dictionary variables, interactions 'x1*x2' or 'x1:x2', "
    "and '- 1' to drop the intercept"
)
_CHUNK = 8192  # rows per pass: buffers stay in cache
_DESIGN_CACHE_ENTRIES = 16
_DESIGN_CACHE_BYTES = 4 << 30
_BOOTSTRAP = 1000
_DP_BETA_LIMIT = 30.0
_SEPARATION_BETA = 10.0
_RCOND = 1e-11
_MAX_HALVINGS = 20
_LINKS = {"gaussian": "Identity", "binomial": "Logit", "poisson": "Log"}


class GLMState(RoundState):
    """What a ``glm`` task carries to the sites: the coefficients of this round (rounds >= 1),
    on the standardised scale. Everything else (the previous step, the deviance history,
    halvings, noisy record counts) stays in the coordinator's memo."""

    beta: list[float] | None = None


class GLMParams(Params):
    """Parameters of ``glm``."""

    formula: str = Field(min_length=3, max_length=2000, description="'y ~ x1 + x2*x3'")
    family: Family = "gaussian"
    max_iter: int = Field(default=25, ge=1, le=100, description="IRLS steps before giving up")
    tol: float = Field(default=1e-8, gt=0, le=1e-2, description="largest step at convergence")
    ci_level: float = Field(default=0.95, gt=0, lt=1)
    dp_iterations: int = Field(default=4, ge=2, le=20, description="fixed rounds in dp mode")


# ----------------------------------------------------------------------------- formula


@dataclass(frozen=True)
class _Formula:
    """A parsed formula: its response and right-hand-side variables (formulaic's terms)."""

    text: str
    response: str
    rhs: Any  # formulaic SimpleFormula
    variables: tuple[str, ...]  # right-hand-side variables in order of appearance


@lru_cache(maxsize=256)
def _parse_formula(text: str) -> _Formula:
    """Parse ``text`` with formulaic; only plain variables, ``+ * : - 1`` are accepted."""
    from formulaic import Formula

    try:
        parsed = Formula(text)
        lhs = getattr(parsed, "lhs", None)
        rhs = getattr(parsed, "rhs", None)
        rhs_terms = list(rhs) if rhs is not None else []
        factor_lists = [list(term.factors) for term in rhs_terms]
        lhs_terms = list(lhs) if lhs is not None else []
    except Exception as exc:  # formulaic raises several types; all mean a bad formula
        raise ValidationError(
            f"formula {text!r} cannot be parsed ({exc}); {_FORMULA_HELP}"
        ) from None
    if lhs is None or rhs is None:
        raise ValidationError(f"formula {text!r} has no response; {_FORMULA_HELP}")
    lhs_factors = [f for term in lhs_terms for f in term.factors]
    if len(lhs_terms) != 1 or len(lhs_factors) != 1 or _kind(lhs_factors[0]) != "lookup":
        raise ValidationError(
            f"formula {text!r}: the response must be one dictionary variable, got {str(lhs)!r}"
        )
    response = str(lhs_factors[0].expr)
    variables: list[str] = []
    for factors in factor_lists:
        for factor in factors:
            kind, expr = _kind(factor), str(factor.expr)
            if kind == "literal" and expr == "1":
                continue
            if kind != "lookup":
                hint = " (categorical dictionary variables need no C())" if "C(" in expr else ""
                raise ValidationError(
                    f"formula {text!r}: term {expr!r} is not a dictionary variable{hint}; "
                    f"transforms are not supported; {_FORMULA_HELP}"
                )
            if expr not in variables:
                variables.append(expr)
    if not rhs_terms:
        raise ValidationError(f"formula {text!r} has no terms and no intercept; {_FORMULA_HELP}")
    if response in variables:
        raise ValidationError(f"formula {text!r}: the response {response!r} is also a predictor")
    return _Formula(text=text, response=response, rhs=rhs, variables=tuple(variables))


def _kind(factor: Any) -> str:
    method = factor.eval_method
    return str(getattr(method, "value", method))


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class _Model:
    """A formula bound to the dictionary: columns, public scaling, formulaic's ModelSpec."""

    formula: _Formula
    family: str
    spec: Any  # formulaic ModelSpec built from a template of public levels and bounds
    columns: tuple[str, ...]
    intercept: int | None
    centre: FloatArray
    half: FloatArray
    y_centre: float
    y_half: float
    y_bounds: tuple[float, float]
    numeric: dict[str, tuple[float, float]]
    levels: dict[str, list[int]]
    key: tuple[str, str, str]

    @property
    def p(self) -> int:
        """Number of model parameters."""
        return len(self.columns)

    def transform(self) -> FloatArray:
        """A with beta = A beta'' (beta'' on the original response scale, see ``to_original``)."""
        a = np.diag(1.0 / self.half)
        if self.intercept is not None:
            for j in range(self.p):
                if j != self.intercept:
                    a[self.intercept, j] = -self.centre[j] / self.half[j]
        return a

    def to_original(self, beta: FloatArray, cov: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Coefficients and covariance from the standardised scale to the original one."""
        beta = beta * self.y_half
        cov = cov * self.y_half**2
        if self.y_centre != 0.0 and self.intercept is not None:
            beta = beta.copy()
            beta[self.intercept] += self.y_centre
        a = self.transform()
        return a @ beta, a @ cov @ a.T


_MODELS: OrderedDict[tuple[str, str, str], _Model] = OrderedDict()
_MODELS_LOCK = threading.Lock()


def _model(params: GLMParams, dictionary: DataDictionary) -> _Model:
    """The model of ``params`` over ``dictionary`` (cached: it depends on no data)."""
    key = (params.formula, params.family, dictionary.digest())
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
    model = _build_model(params, dictionary, key)
    with _MODELS_LOCK:
        _MODELS[key] = model
        while len(_MODELS) > 64:
            _MODELS.popitem(last=False)
    return model


def _interval_product(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    corners = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    return (min(corners), max(corners))


def _build_model(
    params: GLMParams, dictionary: DataDictionary, key: tuple[str, str, str]
) -> _Model:
    from formulaic import model_matrix

    formula = _parse_formula(params.formula)
    numeric: dict[str, tuple[float, float]] = {}
    levels: dict[str, list[int]] = {}
    for name in formula.variables:
        var = dictionary.variable(name)
        if isinstance(var, (NumericVariable, BinaryVariable)):
            # A 0/1 variable enters as the number it is, as in statsmodels on pooled data.
            numeric[name] = dictionary.bounds(name)
        else:
            levels[name] = list(var.levels)
    rows = max([2] + [len(v) for v in levels.values()])
    template: dict[str, Any] = {}
    for name in formula.variables:
        if name in levels:
            codes = [i % len(levels[name]) for i in range(rows)]
            template[name] = pd.Categorical.from_codes(codes, categories=levels[name])
        else:
            low, high = numeric[name]
            template[name] = np.array([low if i % 2 == 0 else high for i in range(rows)])
    try:
        matrix = model_matrix(formula.rhs, pd.DataFrame(template, index=range(rows)))
    except Exception as exc:
        raise ValidationError(f"formula {params.formula!r} cannot be built: {exc}") from None
    spec = matrix.model_spec
    columns = tuple(str(c) for c in spec.column_names)
    bounds: dict[str, tuple[float, float]] = {}
    intercept: int | None = None
    for structure in spec.structure:
        names = [str(f.expr) for f in structure.term.factors if _kind(f) == "lookup"]
        interval = (1.0, 1.0)
        indicator = False
        for name in names:
            if name in numeric:
                interval = _interval_product(interval, numeric[name])
            else:
                indicator = True  # treatment-coded levels: each column is 0 or 1 per factor
        if indicator:
            interval = (min(interval[0], 0.0), max(interval[1], 0.0))
        for column in structure.columns:
            bounds[str(column)] = interval
            if not names:
                intercept = columns.index(str(column))
    values = np.asarray(matrix, dtype=np.float64)
    centre = np.zeros(len(columns))
    half = np.ones(len(columns))
    for j, column in enumerate(columns):
        low, high = bounds[column]
        if values[:, j].min() < low - 1e-9 or values[:, j].max() > high + 1e-9:
            raise InternalError(f"column {column!r} leaves its derived bounds [{low}, {high}]")
        if j == intercept or (low >= 0.0 and high <= 1.0):
            continue
        if intercept is not None:
            centre[j], half[j] = (low + high) / 2, (high - low) / 2
        else:
            half[j] = max(abs(low), abs(high))
        if half[j] <= 0:
            centre[j], half[j] = 0.0, 1.0
    y_low, y_high = dictionary.bounds(formula.response)
    y_centre, y_half = 0.0, 1.0
    if params.family == "gaussian":
        if intercept is not None:
            y_centre, y_half = (y_low + y_high) / 2, (y_high - y_low) / 2
        else:
            y_half = max(abs(y_low), abs(y_high)) or 1.0
    return _Model(
        formula=formula,
        family=params.family,
        spec=spec,
        columns=columns,
        intercept=intercept,
        centre=centre,
        half=half,
        y_centre=y_centre,
        y_half=y_half,
        y_bounds=(y_low, y_high),
        numeric=numeric,
        levels=levels,
        key=key,
    )


# ----------------------------------------------------------------------------- site design


@dataclass
class _Design:
    """A site's standardised design and response for one model."""

    ref: Callable[[], object]
    x: FloatArray
    y: FloatArray

    @property
    def nbytes(self) -> int:
        return int(self.x.nbytes + self.y.nbytes)


class _DesignCache:
    """Bounded LRU cache of built designs per (data object, model, clamping).

    ``local`` runs once per round on the same DataFrame; building the design with formulaic
    each time would dominate a round on large data. Entries keep a weak reference to the frame
    and are served only while that very object is alive (identity and shape checked), so a new
    or garbage-collected frame never gets a stale design.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[Any, ...], _Design] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, data: pd.DataFrame, model: _Model, clamp: bool, build: Callable[[], _Design]
    ) -> _Design:
        key = (id(data), data.shape, model.key, clamp)
        with self._lock:
            self._purge()
            entry = self._entries.get(key)
            if entry is not None and entry.ref() is data:
                self._entries.move_to_end(key)
                return entry
        design = build()
        with self._lock:
            self._entries[key] = design
            self._entries.move_to_end(key)
            while len(self._entries) > 1 and (
                len(self._entries) > self.max_entries
                or sum(e.nbytes for e in self._entries.values()) > self.max_bytes
            ):
                self._entries.popitem(last=False)
        return design

    def clear(self) -> None:
        """Drop every cached design."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._entries)

    def _purge(self) -> None:
        for key in [k for k, e in self._entries.items() if e.ref() is None]:
            del self._entries[key]


_DESIGNS = _DesignCache(_DESIGN_CACHE_ENTRIES, _DESIGN_CACHE_BYTES)


def _build_design(data: pd.DataFrame, model: _Model, clamp: bool) -> _Design:
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
    if n == 0:
        return _Design(weakref.ref(data), np.zeros((0, model.p)), y)
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
    return _Design(weakref.ref(data), x, np.ascontiguousarray(y))


def _start_values(family: str, y: FloatArray) -> tuple[FloatArray, FloatArray]:
    """IRLS weights and working responses times weights at the starting means."""
    if family == "binomial":
        mu = (y + 0.5) / 2
        w = mu * (1 - mu)
        return w, w * special.logit(mu) + (y - mu)
    if family == "poisson":
        mu = y + 0.1
        return mu, mu * np.log(mu) + (y - mu)
    return np.ones_like(y), y


def _step_values(
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


def _local_arrays(design: _Design, model: _Model, ctx: AnalysisContext) -> Arrays:
    p = model.p
    upper = np.triu_indices(p)
    x, y = design.x, design.y
    xwx = np.zeros((p, p))
    vec = np.zeros(p)
    deviance = 0.0
    dp = ctx.mode == "dp"
    beta = _state_beta(ctx, p) if ctx.round > 0 else None
    work = np.empty((min(_CHUNK, y.size), p))  # reused: no fresh pages per chunk
    for start in range(0, y.size, _CHUNK):
        xc = x[start : start + _CHUNK]
        yc = y[start : start + _CHUNK]
        if beta is None:
            w, v = _start_values(model.family, yc)
        else:
            w, v, d = _step_values(model.family, yc, xc @ beta, dp, model.y_bounds[1])
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


def _state_beta(ctx: AnalysisContext, p: int) -> FloatArray:
    beta = np.asarray(ctx.state.get("beta", []), dtype=np.float64)
    if beta.shape != (p,):
        raise InternalError(f"glm round {ctx.round} state has {beta.size} coefficients, not {p}")
    return beta


# ----------------------------------------------------------------------------- dp bounds


def _sensitivities(model: _Model, ctx: AnalysisContext) -> dict[str, float]:
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
    b = float(np.abs(_state_beta(ctx, p)).sum())
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


def _make_pd(h: FloatArray, floor: float) -> FloatArray:
    """Symmetrise ``h`` (one matrix or a stack) and raise its eigenvalues to >= ``floor``."""
    sym = (h + np.swapaxes(h, -1, -2)) / 2
    vals, vecs = np.linalg.eigh(sym)
    top = np.abs(vals).max(axis=-1, keepdims=True)
    low = np.maximum(floor, 1e-12 * np.maximum(top, 1.0))
    clipped = np.maximum(vals, low)
    return (vecs * clipped[..., None, :]) @ np.swapaxes(vecs, -1, -2)  # type: ignore[no-any-return]


def _inverse(h: FloatArray) -> FloatArray:
    return np.asarray(np.linalg.inv(h), dtype=np.float64)


def _unpack(packed: FloatArray, p: int) -> FloatArray:
    out = np.zeros((p, p))
    out[np.triu_indices(p)] = packed
    return out + out.T - np.diag(np.diag(out))


# ----------------------------------------------------------------------------- result


@dataclass
class GLMResult(AnalysisResult):
    """A fitted generalised linear model, on the original scale of the formula's variables."""

    family: str = "gaussian"
    formula: str = ""
    response: str = ""
    terms: list[str] = field(default_factory=list)
    coefficients: dict[str, dict[str, float]] = field(default_factory=dict)
    cov_params: list[list[float]] = field(default_factory=list)
    deviance: float = float("nan")
    scale: float = 1.0
    df_resid: float = float("nan")
    iterations: int = 0
    rounds: int = 0
    converged: bool = False
    ci_level: float = 0.95
    noise_std_error: dict[str, float] = field(default_factory=dict)
    noise_method: str = ""

    def values(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "family": self.family,
            "formula": self.formula,
            "terms": list(self.terms),
            "coefficients": self.coefficients,
            "deviance": self.deviance,
            "scale": self.scale,
            "df_resid": self.df_resid,
            "iterations": self.iterations,
            "rounds": self.rounds,
            "converged": self.converged,
            "ci_level": self.ci_level,
        }
        if self.noise_method:
            out["noise_std_error"] = dict(self.noise_std_error)
            out["noise_method"] = self.noise_method
        return out

    @property
    def _pct(self) -> str:
        return f"{self.ci_level * 100:g}".replace(".", "_")

    @property
    def summary(self) -> pd.DataFrame:
        """estimate, std_error, z, p, ci_lower_95, ci_upper_95 per term (95: the ci_level)."""
        rows = {
            term: {
                "estimate": c["estimate"],
                "std_error": c["std_error"],
                "z": c["z"],
                "p": c["p"],
                f"ci_lower_{self._pct}": c["ci_lower"],
                f"ci_upper_{self._pct}": c["ci_upper"],
            }
            for term, c in self.coefficients.items()
        }
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index.name = "term"
        return frame

    def coef(self, term: str) -> float:
        """The estimate of ``term`` (formulaic's name, e.g. ``sex[T.1]``)."""
        if term not in self.coefficients:
            raise ValidationError(f"no term {term!r} in this model; terms: {', '.join(self.terms)}")
        return float(self.coefficients[term]["estimate"])

    def _header(self) -> str:
        sites = len(self.contributing_sites)
        n = f"~{self.n:.0f}" if self.privacy.mode == "dp" else f"{self.n:.0f}"
        return (
            f"<GLMResult {self.family}, {sites} sites, n={n}, {self.iterations} iterations, "
            f"{self.privacy.mode}>"
        )

    def __str__(self) -> str:
        width = 78
        left = [
            ("Dep. Variable:", self.response),
            ("Model Family:", self.family.capitalize()),
            ("Link Function:", _LINKS.get(self.family, "")),
            ("Method:", "federated IRLS"),
            ("No. Iterations:", str(self.iterations)),
            ("Converged:", str(self.converged)),
        ]
        right = [
            ("No. Observations:", f"{self.n:.0f}"),
            ("Df Residuals:", f"{self.df_resid:.0f}"),
            ("Df Model:", str(max(len(self.terms) - 1, 0))),
            ("Scale:", f"{self.scale:.6g}"),
            ("Deviance:", f"{self.deviance:.6g}"),
            ("Sites:", str(len(self.contributing_sites))),
        ]
        lines = [self._header(), "Generalized Linear Model Regression Results".center(width)]
        lines.append("=" * width)
        for (lk, lv), (rk, rv) in zip(left, right, strict=True):
            lines.append(f"{lk:<16}{lv:>22}   {rk:<18}{rv:>19}")
        lines.append("=" * width)
        name_width = max([len(t) for t in self.terms] + [10])
        lo = f"[{(1 - self.ci_level) / 2:.3g}"
        hi = f"{(1 + self.ci_level) / 2:.3g}]"
        head = ["coef", "std err", "z", "P>|z|", lo, hi]
        lines.append(" " * name_width + "".join(f"{h:>11}" for h in head))
        lines.append("-" * (name_width + 66))
        for term, c in self.coefficients.items():
            cells = [c["estimate"], c["std_error"], c["z"], c["p"], c["ci_lower"], c["ci_upper"]]
            lines.append(f"{term:<{name_width}}" + "".join(f"{v:>11.4g}" for v in cells))
        lines.append("=" * (name_width + 66))
        if self.noise_method:
            lines.append(f"  standard errors include privacy noise: {self.noise_method}")
        for site in self.sites:
            if site.status != "ok":
                lines.append(f"  {site.name}: {site.status}: {site.reason}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def plot(self, ax: Any = None, intercept: bool = False) -> Any:
        """Forest plot of estimates with their intervals; returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        terms = [t for t in self.terms if intercept or t != "Intercept"]
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 0.45 * len(terms) + 1.5))
        est = np.array([self.coefficients[t]["estimate"] for t in terms])
        low = np.array([self.coefficients[t]["ci_lower"] for t in terms])
        high = np.array([self.coefficients[t]["ci_upper"] for t in terms])
        ypos = np.arange(len(terms))[::-1]
        ax.errorbar(est, ypos, xerr=[est - low, high - est], fmt="o", capsize=3, color="C0")
        ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks(ypos)
        ax.set_yticklabels(terms)
        scale = {"binomial": "log odds", "poisson": "log rate"}.get(self.family, "coefficient")
        ax.set_xlabel(f"{scale} ({self.ci_level * 100:g}% interval)")
        ax.set_title(self._header())
        return ax


# ----------------------------------------------------------------------------- analysis


@analysis("glm")
class GLM(Analysis[GLMParams]):
    """Generalised linear model (gaussian, binomial, poisson; canonical links) by IRLS."""

    params_model = GLMParams
    state_model = GLMState

    def variables(self, params: GLMParams) -> set[str]:
        formula = _parse_formula(params.formula)
        return {formula.response, *formula.variables}

    def check_params(self, params: GLMParams, dictionary: DataDictionary) -> None:
        formula = _parse_formula(params.formula)
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
        _model(params, dictionary)

    def dp_rounds(self, params: GLMParams, ctx: AnalysisContext) -> int:
        return 1 if params.family == "gaussian" else params.dp_iterations

    def check_state(self, state: GLMState, params: GLMParams, ctx: AnalysisContext) -> None:
        """Round 0 carries no coefficients; later rounds exactly p, finite, and in dp within
        the public bound the sensitivities assume (|beta'_j| <= 30 on the standardised scale)."""
        where = f"glm round {ctx.round} state: beta"
        if ctx.round == 0:
            if state.beta is not None:
                raise ValidationError(f"{where}: round 0 carries no coefficients")
            return
        p = _model(params, ctx.dictionary).p
        if state.beta is None or len(state.beta) != p:
            given = "none" if state.beta is None else f"{len(state.beta)}"
            raise ValidationError(f"{where}: needs {p} coefficients for this formula, got {given}")
        if ctx.mode == "dp":
            worst = max(abs(b) for b in state.beta)
            if worst > _DP_BETA_LIMIT:
                raise ValidationError(
                    f"{where}: |{worst:g}| is above the dp bound {_DP_BETA_LIMIT:g} on the "
                    "standardised scale, which the release's sensitivity assumes"
                )

    def declare(self, params: GLMParams, ctx: AnalysisContext) -> RecordSpec:
        model = _model(params, ctx.dictionary)
        p = model.p
        sens = _sensitivities(model, ctx)
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

    def local(self, data: pd.DataFrame, params: GLMParams, ctx: AnalysisContext) -> Arrays:
        model = _model(params, ctx.dictionary)
        clamp = ctx.mode == "dp"
        design = _DESIGNS.get(data, model, clamp, lambda: _build_design(data, model, clamp))
        n = design.y.size
        if ctx.mode == "sdc" and model.p > ctx.sdc.max_parameter_ratio * n:
            ratio = ctx.sdc.max_parameter_ratio
            raise DisclosureError(
                f"glm {params.formula!r} has {model.p} parameters but this site has fewer than "
                f"{math.ceil(model.p / ratio)} complete records, the least that disclosure "
                f"control allows for {model.p} parameters (parameters at most {ratio:g} of the "
                "records)"
            )
        return _local_arrays(design, model, ctx)

    # ------------------------------------------------------------------ coordinator

    def combine(
        self, records: Mapping[str, AggregateRecord], params: GLMParams, ctx: AnalysisContext
    ) -> GLMResult | NextRound:
        if not records:
            raise ModelError(f"glm {params.formula!r}: no site returned records to fit")
        model = _model(params, ctx.dictionary)
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
        h = _unpack(pooled["xwx"], p)
        if ctx.round == 0 and n_total <= p:
            raise ModelError(
                f"glm {params.formula!r}: {n_total:.0f} complete records for {p} parameters; "
                "a model needs more records than parameters"
            )
        if noisy:
            return self._dp_round(records, pooled, h, model, params, ctx, n_history)
        if ctx.round == 0:
            _check_rank(h, model, params, separation=False)
            beta = np.linalg.solve(h, pooled["xwz"])
            return NextRound(
                {"beta": beta.tolist()}, {"iteration": 1, "halvings": 0, "n_history": n_history}
            )
        return self._exact_round(records, pooled, h, model, params, ctx, n_total)

    def _exact_round(
        self,
        records: Mapping[str, AggregateRecord],
        pooled: dict[str, FloatArray],
        h: FloatArray,
        model: _Model,
        params: GLMParams,
        ctx: AnalysisContext,
        n_total: float,
    ) -> GLMResult | NextRound:
        memo = dict(ctx.memo)
        beta = _state_beta(ctx, model.p)
        deviance = float(pooled["deviance"])
        prev_dev = memo.get("prev_deviance")
        if prev_dev is not None and (
            not math.isfinite(deviance) or deviance > prev_dev + 1e-10 * (abs(prev_dev) + 1)
        ):
            if memo["halvings"] >= _MAX_HALVINGS:
                raise ModelError(
                    f"glm {params.formula!r}: the deviance does not decrease even after "
                    f"{_MAX_HALVINGS} step halvings (last {deviance:.6g}, before "
                    f"{prev_dev:.6g}); the model is not estimable from these data"
                )
            trial = (np.asarray(memo["prev_beta"]) + beta) / 2
            return NextRound({"beta": trial.tolist()}, {**memo, "halvings": memo["halvings"] + 1})
        if model.family == "binomial" and deviance <= 1e-8 * max(n_total, 1.0):
            raise ModelError(_separation_message(params, model, beta, complete=True))
        _check_rank(h, model, params, separation=model.family != "gaussian", beta=beta)
        step = np.linalg.solve(h, pooled["score"])
        new = beta + step
        iteration = int(memo["iteration"]) + 1
        change = float(np.abs(step).max()) / max(1.0, float(np.abs(beta).max()))
        if not math.isfinite(change):
            raise ModelError(f"glm {params.formula!r}: the IRLS step is not finite")
        if change <= params.tol:
            return self._result(
                records, model, params, ctx, new, _inverse(h), deviance, n_total,
                iteration, converged=True,
            )  # fmt: skip
        if iteration >= params.max_iter:
            if model.family != "gaussian" and float(np.abs(new).max()) > _SEPARATION_BETA:
                raise ModelError(_separation_message(params, model, new, complete=False))
            raise ModelError(
                f"glm {params.formula!r} did not converge in {params.max_iter} iterations "
                f"(last relative step {change:.3g} > tol {params.tol:g}); raise max_iter or "
                "simplify the model"
            )
        return NextRound(
            {"beta": new.tolist()},
            {**memo, "prev_beta": beta.tolist(), "prev_deviance": deviance, "iteration": iteration},
        )

    def _dp_round(
        self,
        records: Mapping[str, AggregateRecord],
        pooled: dict[str, FloatArray],
        h: FloatArray,
        model: _Model,
        params: GLMParams,
        ctx: AnalysisContext,
        n_history: list[float],
    ) -> GLMResult | NextRound:
        p = model.p
        upper = np.triu_indices(p)
        cell_sd = math.sqrt(sum(r.releases["xwx"].variance() for r in records.values()))
        floor = cell_sd * math.sqrt(p)
        h_pd = _make_pd(h, floor)
        rounds = self.dp_rounds(params, ctx)
        start = ctx.round == 0
        base = np.zeros(p) if start else _state_beta(ctx, p)
        vec_name = "xwz" if start else "score"
        vec = pooled[vec_name]
        new = base + np.linalg.solve(h_pd, vec)
        last = model.family == "gaussian" or ctx.round >= rounds - 1
        if not last:
            new = np.clip(new, -_DP_BETA_LIMIT, _DP_BETA_LIMIT)
            return NextRound({"beta": new.tolist()}, {"n_history": n_history})
        n_total = float(np.mean(n_history))
        if model.family == "gaussian":
            rss = float(pooled["yy"] - 2 * new @ vec + new @ h @ new)
            deviance = max(rss, 0.0)
        else:
            deviance = max(float(pooled["deviance"]), 0.0)
        # Parametric bootstrap of the final step: redraw each site's noise as it was released.
        rng = np.random.default_rng(20260511)
        h_noise = np.zeros((_BOOTSTRAP, upper[0].size))
        v_noise = np.zeros((_BOOTSTRAP, p))
        for record in records.values():
            h_noise += record.releases["xwx"].redraw(rng, h_noise.shape)
            v_noise += record.releases[vec_name].redraw(rng, v_noise.shape)
        full = np.zeros((_BOOTSTRAP, p, p))
        full[:, upper[0], upper[1]] = h_noise
        full[:, upper[1], upper[0]] = h_noise
        hb = _make_pd(h[None, :, :] + full, floor)
        draws = base + np.linalg.solve(hb, (vec + v_noise)[:, :, None])[:, :, 0]
        noise_cov = np.zeros((p, p))
        if any(r.releases[k].noisy for r in records.values() for k in ("xwx", vec_name)):
            noise_cov = np.atleast_2d(np.cov(draws, rowvar=False))
        return self._result(
            records, model, params, ctx, new, _inverse(h_pd), deviance, n_total,
            ctx.round + 1, converged=False, noise_cov=noise_cov,
        )  # fmt: skip

    def _result(
        self,
        records: Mapping[str, AggregateRecord],
        model: _Model,
        params: GLMParams,
        ctx: AnalysisContext,
        beta_std: FloatArray,
        h_inv: FloatArray,
        deviance_std: float,
        n_total: float,
        iterations: int,
        converged: bool,
        noise_cov: FloatArray | None = None,
    ) -> GLMResult:
        p = model.p
        df_resid = n_total - p
        scale_std = 1.0
        if model.family == "gaussian":
            scale_std = deviance_std / max(df_resid, 1.0)
        cov_std = scale_std * h_inv
        if noise_cov is not None:
            cov_std = cov_std + noise_cov
        beta, cov = model.to_original(beta_std, cov_std)
        se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        noise_se: dict[str, float] = {}
        if noise_cov is not None:
            _, noise_orig = model.to_original(beta_std, noise_cov)
            noise_se = {
                t: float(math.sqrt(max(v, 0.0)))
                for t, v in zip(model.columns, np.diag(noise_orig), strict=True)
            }
        crit = float(stats.norm.ppf(0.5 + params.ci_level / 2))
        coefficients: dict[str, dict[str, float]] = {}
        for j, term in enumerate(model.columns):
            z = float(beta[j] / se[j]) if se[j] > 0 else float("nan")
            coefficients[term] = {
                "estimate": float(beta[j]),
                "std_error": float(se[j]),
                "z": z,
                "p": float(2 * stats.norm.sf(abs(z))),
                "ci_lower": float(beta[j] - crit * se[j]),
                "ci_upper": float(beta[j] + crit * se[j]),
            }
        result = GLMResult(
            analysis="glm",
            n=n_total,
            family=model.family,
            formula=params.formula,
            response=model.formula.response,
            terms=list(model.columns),
            coefficients=coefficients,
            cov_params=cov.tolist(),
            deviance=deviance_std * model.y_half**2,
            scale=scale_std * model.y_half**2,
            df_resid=df_resid,
            iterations=iterations,
            rounds=ctx.round + 1,
            converged=converged,
            ci_level=params.ci_level,
        )
        if noise_cov is not None:
            result.noise_std_error = noise_se
            result.noise_method = (
                f"parametric bootstrap (B={_BOOTSTRAP}) of the last IRLS step over the "
                "sites' released Laplace scales, added to the sampling covariance"
            )
            result.notes.append(
                f"dp: {ctx.round + 1} fixed rounds; coefficients are the last noisy IRLS step, "
                "n is noisy"
            )
        else:
            empty = [site for site, r in records.items() if float(r["n"]) == 0]
            if empty:
                result.notes.append(
                    f"no complete records for this model at: {', '.join(sorted(empty))}"
                )
        return result


def _check_rank(
    h: FloatArray,
    model: _Model,
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
        if vals[0] > _RCOND * vals[-1]:
            return
        weights = np.abs(vecs[:, 0])
        zero = [model.columns[j] for j in range(model.p) if weights[j] > 0.05]
    if separation and beta is not None and float(np.abs(beta).max()) > _SEPARATION_BETA:
        raise ModelError(_separation_message(params, model, beta, complete=False))
    raise ModelError(
        f"glm {params.formula!r}: singular design: the pooled X'WX has no inverse; these "
        f"terms are collinear: {', '.join(zero)} (a level absent everywhere, a constant "
        "column, or a term that is a combination of others); drop one of them"
    )


def _separation_message(params: GLMParams, model: _Model, beta: FloatArray, complete: bool) -> str:
    big = [model.columns[j] for j in np.argsort(-np.abs(beta)) if abs(beta[j]) > _SEPARATION_BETA]
    what = "complete separation" if complete else "(quasi-)complete separation"
    terms = f" (coefficients growing without bound: {', '.join(big)})" if big else ""
    fitted = "probabilities reach 0 or 1" if model.family == "binomial" else "means reach 0"
    return (
        f"glm {params.formula!r}: {what}{terms}: fitted {fitted} for some "
        "combination of terms, so the maximum-likelihood estimate does not exist; drop or merge "
        "the separating terms"
    )
