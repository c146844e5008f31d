"""Survival analyses: ``kaplan_meier``, ``logrank`` and an exact federated ``cox``.

Time grid. Sites never release an event time. Every time is placed on a public grid
``start + k * width`` (``start`` is the dictionary's minimum of the time variable, ``width`` the
``time_resolution`` parameter, 1 unit by default) by rounding it *up* to the next grid point, and
sites release aggregates indexed by grid point. Where every observed time lies on the grid
(whole days or weeks at the default width; ``time_resolution: 0.001`` for times given to three
decimals) the results are exactly those of the pooled data; otherwise they are those of the
pooled data with times rounded up to the grid. A note in every result names the grid. Times are
clamped to the dictionary's bounds; ``horizon`` censors every later time at the horizon.

Rounds.

* ``kaplan_meier`` and ``logrank``: one round. Each site releases its event and censoring counts
  per grid point and per level of ``group`` (levels from the dictionary): one array of shape
  (levels, 2, grid points). The coordinator forms the pooled at-risk counts by reverse cumulative
  sums, then lifelines' product-limit estimate, Greenwood variance and log(-log) bands, or the
  (multivariate) log-rank statistic with its hypergeometric variance.
* ``cox``: round 0 releases the event and censoring counts per grid point; the coordinator keeps
  the m grid points where any pooled event occurred (its state, never a site's data). Each later
  round is one Newton-Raphson step at the coordinator's current coefficients b: every site
  releases, per interval between consecutive pooled event times, the sums over its rows there of
  exp(x'b), x exp(x'b) and x x' exp(x'b) (packed upper triangle), its event count at each event
  time, the sum of x over all its events and, for Efron's ties, the same three sums over its
  events at each event time. Reverse cumulative sums over the intervals give the risk-set sums
  S0, S1, S2, so the coordinator forms the exact pooled partial log-likelihood, gradient and
  Hessian; with ``strata_by_site`` each site's sums stay apart and the sites' partial
  likelihoods add. Covariates are centred and scaled by their public bounds (|x_j| <= 1;
  categorical variables become 0/1 treatment dummies against the dictionary's first level,
  ``sex[T.1]``), to which the model is invariant; coefficients are reported on the original
  scale. Step halving guards against a fall of the likelihood; the fit stops when the largest
  Newton step on the scaled covariates is below ``tol``. No events, a singular design (named
  terms) or a diverging fit (monotone likelihood) raise ``ModelError``. Every declared shape
  follows from the parameters, the dictionary and the coordinator's state (grid size, m, p),
  and stays under ``protocol.records.MAX_CELLS`` (checked on the parameters and on m).

Disclosure control (``sdc``). A count per grid point is often 1 or 2 on a fine grid, which the
site engine refuses (``kind="count"``, smallest non-zero cell ``min_cell``). So ``sdc`` runs a
probe round first: each site releases one 0/1 flag per candidate width (``time_resolution``
times 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, ... up to one interval
spanning the range) saying whether all its event and censoring counts (per group) at that width
would be 0 or at least its own ``min_cell``; at-risk counts are sums of those cells, so they
pass too. The coordinator takes the finest width every site accepts, runs the analysis on that
grid and says so in the notes: the result then equals the pooled analysis of times rounded up
to that grid, not of the exact times. In the Cox rounds every interval sum and every sum over
the events at one time then covers 0 or at least ``min_cell`` records for the same reason, and
a site refuses a model with more parameters than ``max_parameter_ratio`` of its records.
Limits: the flags themselves tell a little about a site's data (which widths would give small
cells); one sparse stretch of follow-up at one site coarsens the grid for every site; a site
with 1 or 2 events or censorings in total passes at no width, and the coordinator then stops
with a ``DisclosureError`` naming it. The sparse tail of follow-up is the usual culprit: a
``horizon`` before it (later times censored there, all in one cell) often allows a much finer
grid (synthetic, 3 sites of 300: width 1000 days without, 100 days with a horizon of 1000).

Differential privacy (``dp``). The grid is public and coarse: ``dp_intervals`` equal intervals
over the dictionary's time range (up to ``horizon`` if given), never finer than
``time_resolution``; the estimand is that of the times grouped on it, which a note says.

* ``kaplan_meier`` / ``logrank`` release the count array once; a record lies in one cell, so
  the L1 sensitivity is 1. Noisy counts are clipped at 0. The noise variance (from each
  release's scale) is carried by the delta method into the variance of log S(t), which widens
  the Greenwood bands and is reported as ``noise_sd``; for the log-rank test the noise
  covariance of observed minus expected is added to the hypergeometric variance, which lowers
  chi2. Accuracy, backed by ``tests/unit/test_survival_unit.py``: pooled n = 2,000 over 4
  sites, 20 intervals, epsilon = 1: the noise sd of S(t) stays under 0.01 while 150 or more
  are at risk (about 0.02 with 40 left), S(t) is within 0.02 of the noise-free grouped curve
  over that range in 95% of runs, ``noise_sd`` matches the simulated spread within 25% (up to
  50% conservative at the first points), and the log-rank test keeps its 5% level under the
  null. The error scales as 1 / (epsilon n) and as the square root of the number of sites and
  intervals.
* ``cox`` runs exactly ``dp_iterations`` rounds (default 2) on the public grid, whose every
  point counts as an event time, and ends with one more Newton step from the last round's sums.
  With |x_j| <= 1 and B the largest x'b over the scaled design's box (|b_j| per numeric
  column, the largest of 0 and a categorical variable's dummy coefficients), one record moves
  the interval sums of exp(x'b) by at most e^B, of x exp(x'b) by p e^B and of the packed
  x x' exp(x'b) by p(p+1)/2 e^B (likewise Efron's sums over events), the event counts by 1 and
  the sum of x over events by p. Round 0 (b = 0, so e^B = 1) releases everything; later rounds
  release only the gradient's sums, as the event counts and the sum of x do not depend on b and
  the round-0 Hessian steers every step (measured: several times less noise in the estimate
  than a fresh, noisier Hessian each round). Standard errors therefore use the information at
  b = 0. The coefficients sent to the sites are shrunk to sum |b_j| <= ``dp_coef_bound``
  (default 5) on the scaled covariates, which caps e^B. Noisy counts are rounded and clipped at
  0, and a noisy Hessian's eigenvalues are floored. The noise's effect on each coefficient is
  measured by a parametric bootstrap at the coordinator (re-noising the released sums with
  their known variances and redoing the last step, 200 draws, fixed seed, robust spread: pure
  post-processing), added to the standard errors and reported as ``noise_sd``. Accuracy,
  backed by the unit test: Breslow ties, two covariates, pooled n = 200,000 over 4 sites (about
  half with events), 10 intervals, epsilon = 1: the noise sd is about 0.05 and 0.15 on the
  scale of each covariate's half range (sampling standard errors 0.008 and 0.016), and
  ``noise_sd`` is within a factor of 2 of the simulated spread. At n = 20,000 and epsilon = 1
  the noise swamps the estimate (sd above 1 on that scale; epsilon = 5 brings it to about
  0.1 to 0.3). Efron's ties add two noisy arrays per round: 2 to 3 times the noise of
  Breslow's at these settings, against Breslow's bias toward 0 when grouped times tie heavily.
  The noise grows with e^B, with p and with the number of sites, and falls as 1 / (epsilon n).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field, field_validator

from analyses._lazy import stats
from analyses.base import Analysis, AnalysisContext, Arrays, NextRound, Params, rows_used
from analyses.registry import analysis
from analyses.results import AnalysisResult, show_count, table_text
from protocol.config import BinaryVariable, DataDictionary, NumericVariable
from protocol.errors import DisclosureError, InternalError, ModelError, ValidationError
from protocol.records import MAX_CELLS, AggregateRecord, ArraySpec, RecordSpec, Release

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Slack when placing a time on the grid, so 0.196 / 0.001 lands on 196, not 197.
_GRID_SLACK = 1e-9
#: Candidate grid widths in sdc mode: these multiples of time_resolution, then (10, 12, ..., 80)
#: times powers of ten, so each width is a whole multiple of the requested one.
_LADDER_FIRST = (1, 2, 3, 4, 5, 6, 8)
_LADDER = (10, 12, 15, 20, 25, 30, 40, 50, 60, 80)
#: Parametric bootstrap draws for the dp Cox noise estimate.
_BOOTSTRAP_DRAWS = 200


# ============================================================================ shared helpers


@dataclass(frozen=True)
class _Grid:
    """Public time grid: points ``start + k * width`` for k = 0..size-1."""

    start: float
    width: float
    size: int

    @classmethod
    def spanning(cls, low: float, high: float, width: float) -> _Grid:
        size = math.ceil((high - low) / width - _GRID_SLACK) + 1
        return cls(float(low), float(width), max(int(size), 1))

    def index(self, times: FloatArray) -> IntArray:
        """Grid point of each time: the first point at or after it."""
        k = np.ceil((times - self.start) / self.width - _GRID_SLACK)
        return np.clip(k, 0, self.size - 1).astype(np.int64)

    def points(self) -> FloatArray:
        return self.start + self.width * np.arange(self.size, dtype=np.float64)


def _noise_variance(release: Release) -> float:
    """Variance of the noise one released cell carries (0 when exact)."""
    scale = float(release.scale)
    if scale <= 0 or release.mechanism == "none":
        return 0.0
    if release.mechanism == "discrete_laplace":
        q = math.exp(-1.0 / scale)
        return 2.0 * q / (1.0 - q) ** 2
    if release.mechanism == "gaussian":
        return scale * scale
    return 2.0 * scale * scale  # Laplace


def _pooled_noise_variance(records: Mapping[str, AggregateRecord], name: str) -> float:
    return float(sum(_noise_variance(r.releases[name]) for r in records.values()))


def _sum_arrays(records: Mapping[str, AggregateRecord], name: str) -> FloatArray:
    return np.asarray(np.sum([r[name] for r in records.values()], axis=0), dtype=np.float64)


def _require_time_event(dictionary: DataDictionary, time: str, event: str) -> None:
    if not isinstance(dictionary.variable(time), NumericVariable):
        raise ValidationError(
            f"time variable {time!r} is {dictionary.variable(time).type}; survival analyses need "
            "a numeric time variable"
        )
    if not isinstance(dictionary.variable(event), BinaryVariable):
        raise ValidationError(
            f"event variable {event!r} is {dictionary.variable(event).type}; survival analyses "
            "need a binary event indicator (1 = event, 0 = censored)"
        )
    if time == event:
        raise ValidationError(f"time and event must be different variables, got {time!r} twice")


class _SurvivalParams(Params):
    time: str
    event: str
    time_resolution: float = Field(default=1.0, gt=0, description="grid width in time units")
    horizon: float | None = Field(default=None, description="censor every time after this one")
    dp_intervals: int = Field(default=20, ge=1, le=1000, description="public intervals in dp")


def _time_range(params: _SurvivalParams, dictionary: DataDictionary) -> tuple[float, float]:
    low, high = dictionary.bounds(params.time)
    if params.horizon is not None:
        high = min(high, params.horizon)
    return low, high


def _check_survival_params(
    params: _SurvivalParams, dictionary: DataDictionary, cells_per_point: int
) -> None:
    _require_time_event(dictionary, params.time, params.event)
    low, high = dictionary.bounds(params.time)
    if params.horizon is not None and not low < params.horizon <= high:
        raise ValidationError(
            f"horizon {params.horizon!r} must lie in ({low:g}, {high:g}], the dictionary's range "
            f"of {params.time!r}"
        )
    low, high = _time_range(params, dictionary)
    size = _Grid.spanning(low, high, params.time_resolution).size
    if size * cells_per_point > MAX_CELLS:
        finest = (high - low) * cells_per_point / (MAX_CELLS - cells_per_point)
        raise ValidationError(
            f"time_resolution {params.time_resolution:g} makes a grid of {size} points over "
            f"[{low:g}, {high:g}], {size * cells_per_point} cells per release; at most "
            f"{MAX_CELLS} are allowed: use time_resolution >= {finest:.3g} or a horizon"
        )


def _grid_for(params: _SurvivalParams, ctx: AnalysisContext) -> _Grid:
    """The public grid of this round: dp's coarse one, the sdc width chosen, or the fine one."""
    low, high = _time_range(params, ctx.dictionary)
    if ctx.mode == "dp":
        width = max(params.time_resolution, (high - low) / params.dp_intervals)
    else:
        width = float(ctx.state.get("width", params.time_resolution))
    return _Grid.spanning(low, high, width)


def _sdc_widths(params: _SurvivalParams, dictionary: DataDictionary) -> list[float]:
    """Candidate widths, finest first, ending with one interval spanning the whole range."""
    low, high = _time_range(params, dictionary)
    widths: list[float] = []
    for multiple in _ladder():
        widths.append(params.time_resolution * multiple)
        if widths[-1] >= high - low:
            return widths
    raise InternalError("the width ladder ended")  # _ladder() never ends


def _ladder() -> Iterator[int]:
    yield from _LADDER_FIRST
    power = 1
    while True:
        yield from (step * power for step in _LADDER)
        power *= 10


def _times_events(
    frame: pd.DataFrame, params: _SurvivalParams, dictionary: DataDictionary
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Times clamped to the dictionary's bounds and event flags (censored after ``horizon``)."""
    low, high = dictionary.bounds(params.time)
    times = np.clip(frame[params.time].to_numpy(dtype=np.float64), low, high)
    events = frame[params.event].to_numpy(dtype=np.float64) > 0.5
    if params.horizon is not None:
        events &= times <= params.horizon
        times = np.minimum(times, params.horizon)
    return times, events


def _cells_safe(cells: FloatArray, min_cell: int) -> bool:
    return bool(np.all((cells == 0) | (cells >= min_cell)))


def _choose_width(records: Mapping[str, AggregateRecord], widths: Sequence[float]) -> float:
    """The finest candidate width that every site accepted in the sdc probe round."""
    flags = np.array([np.asarray(r["safe"]) for r in records.values()]) > 0.5
    accepted = flags.all(axis=0)
    if not accepted.any():
        never = [site for site, r in records.items() if not np.any(np.asarray(r["safe"]) > 0.5)]
        which = (
            f"sites {', '.join(never)} have too few events or censorings for any grid"
            if never
            else "the sites accept different widths only"
        )
        raise DisclosureError(
            "no time grid lets every site release event and censoring counts that are 0 or at "
            f"least its disclosure threshold; {which}. Run without them, set a horizon, or use "
            "dp mode"
        )
    return float(widths[int(np.argmax(accepted))])


def _grid_note(grid: _Grid, params: _SurvivalParams, ctx: AnalysisContext, unit: str) -> str:
    if ctx.mode == "dp":
        return (
            f"dp: times grouped on the public grid {grid.start:g} + k * {grid.width:g}{unit} "
            f"({grid.size} points, rounded up); the estimate is that of the grouped times"
        )
    if grid.width > params.time_resolution * (1 + 1e-12):
        return (
            f"sdc: event times coarsened to a grid of width {grid.width:g}{unit} (requested "
            f"{params.time_resolution:g}), the finest on which every site's event and censoring "
            "counts are 0 or at least its disclosure threshold; results equal the pooled "
            f"analysis of times rounded up to {grid.start:g} + k * {grid.width:g}; a horizon "
            "before the sparse tail of follow-up often allows a finer grid"
        )
    return (
        f"times placed on the grid {grid.start:g} + k * {grid.width:g}{unit} (rounded up); exact "
        "whenever every observed time lies on this grid"
    )


def _unit(dictionary: DataDictionary, time: str) -> str:
    var = dictionary.variable(time)
    return f" {var.unit}" if isinstance(var, NumericVariable) and var.unit else ""


# ============================================================================ counting analyses


class _CountingParams(_SurvivalParams):
    group: str | None = Field(default=None, description="a categorical or binary variable")


CP = TypeVar("CP", bound=_CountingParams)


class _Counting(Analysis[CP], Generic[CP]):
    """Shared rounds of ``kaplan_meier`` and ``logrank``: per-grid event and censoring counts."""

    def variables(self, params: CP) -> set[str]:
        return {params.time, params.event} | ({params.group} if params.group else set())

    def _levels(self, params: CP, dictionary: DataDictionary) -> list[int]:
        return dictionary.levels(params.group) if params.group else [0]

    def check_params(self, params: CP, dictionary: DataDictionary) -> None:
        if params.group is not None:
            dictionary.levels(params.group)
            if params.group in (params.time, params.event):
                raise ValidationError(
                    f"group {params.group!r} cannot be the time or event variable"
                )
        _check_survival_params(params, dictionary, 2 * len(self._levels(params, dictionary)))

    def initial_state(self, params: CP, ctx: AnalysisContext) -> dict[str, Any]:
        return {"phase": "probe"} if ctx.mode == "sdc" else {"phase": "counts"}

    def declare(self, params: CP, ctx: AnalysisContext) -> RecordSpec:
        if ctx.state.get("phase") == "probe":
            widths = _sdc_widths(params, ctx.dictionary)
            return RecordSpec({"safe": ArraySpec((len(widths),), kind="statistic")})
        levels = len(self._levels(params, ctx.dictionary))
        grid = _grid_for(params, ctx)
        return RecordSpec(
            {
                "counts": ArraySpec(
                    (levels, 2, grid.size), kind="count", sensitivity=1.0, integer=True
                )
            }
        )

    def _cells(
        self, data: pd.DataFrame, params: CP, dictionary: DataDictionary, grid: _Grid
    ) -> FloatArray:
        levels = self._levels(params, dictionary)
        frame = rows_used(data, sorted(self.variables(params)))
        times, events = _times_events(frame, params, dictionary)
        if params.group:
            codes = frame[params.group].to_numpy(dtype=np.float64)
            index = np.full(codes.shape, -1, dtype=np.int64)
            for i, level in enumerate(levels):
                index[codes == level] = i
        else:
            index = np.zeros(times.shape, dtype=np.int64)
        keep = index >= 0
        cell = (index[keep] * 2 + (~events[keep]).astype(np.int64)) * grid.size
        cell += grid.index(times[keep])
        counts = np.bincount(cell, minlength=len(levels) * 2 * grid.size)
        return counts.astype(np.float64).reshape(len(levels), 2, grid.size)

    def local(self, data: pd.DataFrame, params: CP, ctx: AnalysisContext) -> Arrays:
        if ctx.state.get("phase") == "probe":
            low, high = _time_range(params, ctx.dictionary)
            flags = [
                float(
                    _cells_safe(
                        self._cells(data, params, ctx.dictionary, _Grid.spanning(low, high, w)),
                        ctx.sdc.min_cell,
                    )
                )
                for w in _sdc_widths(params, ctx.dictionary)
            ]
            return {"safe": np.asarray(flags)}
        return {"counts": self._cells(data, params, ctx.dictionary, _grid_for(params, ctx))}

    def site_records(self, record: AggregateRecord) -> float | None:
        return float(record["counts"].sum()) if "counts" in record.arrays else None

    def combine(
        self, records: Mapping[str, AggregateRecord], params: CP, ctx: AnalysisContext
    ) -> Any:
        if not records:
            raise ModelError(f"{self.name}: no site returned records")
        if ctx.state.get("phase") == "probe":
            width = _choose_width(records, _sdc_widths(params, ctx.dictionary))
            return NextRound({"phase": "counts", "width": width})
        grid = _grid_for(params, ctx)
        counts = _sum_arrays(records, "counts")
        noise_var = _pooled_noise_variance(records, "counts")
        if noise_var > 0:
            counts = np.maximum(counts, 0.0)  # noisy counts: post-processing keeps them >= 0
        note = _grid_note(grid, params, ctx, _unit(ctx.dictionary, params.time))
        return self._finish(counts, noise_var, grid, params, ctx, [note])

    @abstractmethod
    def _finish(
        self,
        counts: FloatArray,
        noise_var: float,
        grid: _Grid,
        params: CP,
        ctx: AnalysisContext,
        notes: list[str],
    ) -> AnalysisResult:
        """The result from the pooled (levels, 2, grid) counts and their noise per cell."""


def _at_risk(deaths: FloatArray, censored: FloatArray) -> FloatArray:
    """Records at risk at each grid point: everybody whose time is at or after it."""
    return np.cumsum((deaths + censored)[..., ::-1], axis=-1)[..., ::-1]


# ----------------------------------------------------------------------------- kaplan_meier


class KaplanMeierParams(_CountingParams):
    ci_level: float = Field(default=0.95, gt=0, lt=1)


@dataclass
class KaplanMeierResult(AnalysisResult):
    """Pooled product-limit estimates (per level of ``group`` when grouped)."""

    time: str = ""
    group: str | None = None
    ci_level: float = 0.95
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def _key(self, key: str) -> Any:
        if self.group is None:
            return self.curves["all"][key]
        return {level: curve[key] for level, curve in self.curves.items()}

    def values(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            key: self._key(key)
            for key in ("times", "survival", "at_risk", "events", "ci_lower", "ci_upper")
        }
        if any("noise_sd" in c for c in self.curves.values()):
            out["noise_sd"] = self._key("noise_sd")
        out["median"] = self.medians()["all"] if self.group is None else self.medians()
        out["ci_level"] = self.ci_level
        if self.group:
            out["group"] = self.group
        return out

    def medians(self) -> dict[str, float | None]:
        """Median survival per curve: the first time S(t) <= 0.5 (None if never)."""
        out: dict[str, float | None] = {}
        for level, curve in self.curves.items():
            below = [t for t, s in zip(curve["times"], curve["survival"], strict=True) if s <= 0.5]
            out[level] = below[0] if below else None
        return out

    @property
    def summary(self) -> pd.DataFrame:
        frames = []
        for level, curve in self.curves.items():
            frame = pd.DataFrame({k: v for k, v in curve.items() if k != "times"})
            frame.index = pd.Index(curve["times"], name=self.time)
            if self.group is not None:
                frame.insert(0, self.group, level)
            frames.append(frame)
        return pd.concat(frames) if frames else pd.DataFrame()

    def __str__(self) -> str:
        lines = [self._header()]
        rows = []
        medians = self.medians()
        for level, curve in self.curves.items():
            at_risk = curve["at_risk"][0] if curve["at_risk"] else 0.0
            rows.append(
                {
                    "curve": level if self.group is None else f"{self.group}={level}",
                    "at risk at start": at_risk,
                    "events": float(np.sum(curve["events"])),
                    "median survival": medians[level],
                }
            )
        lines.append(table_text(pd.DataFrame(rows).set_index("curve")))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Step curves with their confidence bands, one per group level."""
        ax = self._axes(ax)
        for level, curve in self.curves.items():
            if not curve["times"]:
                continue
            times = [curve["times"][0], *curve["times"]]
            label = "all" if self.group is None else f"{self.group}={level}"
            (line,) = ax.step(times, [1.0, *curve["survival"]], where="post", label=label)
            ax.fill_between(
                times,
                [1.0, *curve["ci_lower"]],
                [1.0, *curve["ci_upper"]],
                step="post",
                alpha=0.25,
                color=line.get_color(),
            )
        ax.set_xlabel(self.time)
        ax.set_ylabel("survival probability")
        ax.set_ylim(0, 1.05)
        if self.group is not None:
            ax.legend()
        ax.set_title(self._header())
        return ax


def _km_curve(
    deaths: FloatArray,
    censored: FloatArray,
    points: FloatArray,
    noise_var: float,
    ci_level: float,
) -> dict[str, list[float]]:
    """Product-limit estimate, Greenwood variance and log(-log) bands, as lifelines forms them."""
    at_risk = _at_risk(deaths, censored)
    deaths = np.minimum(deaths, at_risk)
    with np.errstate(divide="ignore", invalid="ignore"):
        # lifelines: cumsum(log(n - d) - log(n)) and cumsum(d / (n (n - d))) with inf -> 0.
        step = np.where(at_risk > 0, np.log(at_risk - deaths) - np.log(at_risk), 0.0)
        green = deaths / (at_risk * (at_risk - deaths))
    green = np.where(np.isfinite(green), green, 0.0)
    log_s = np.cumsum(step)
    variance = np.cumsum(green)
    if noise_var > 0:
        variance = variance + noise_var * _km_noise_factor(deaths, at_risk)
    if noise_var > 0:
        shown = np.flatnonzero(at_risk >= 1)
        shown = np.arange(shown[-1] + 1) if shown.size else shown
    else:
        shown = np.flatnonzero(deaths + censored > 0)
    survival = np.exp(log_s)
    z = float(stats.norm.ppf(1 - (1 - ci_level) / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = z * np.sqrt(variance) / log_s
        lower = np.exp(-np.exp(np.log(-log_s) - spread))
        upper = np.exp(-np.exp(np.log(-log_s) + spread))
    curve = {
        "times": points[shown].tolist(),
        "survival": survival[shown].tolist(),
        "at_risk": at_risk[shown].tolist(),
        "events": deaths[shown].tolist(),
        "ci_lower": np.nan_to_num(lower[shown], nan=1.0).tolist(),
        "ci_upper": np.nan_to_num(upper[shown], nan=1.0).tolist(),
    }
    if noise_var > 0:
        curve["noise_sd"] = (
            survival[shown] * np.sqrt(noise_var * _km_noise_factor(deaths, at_risk)[shown])
        ).tolist()
    return curve


def _km_noise_factor(deaths: FloatArray, at_risk: FloatArray) -> FloatArray:
    """Delta-method variance of log S(t_K) per unit of cell noise variance, for every K.

    log S(t_K) = sum_{k <= K} log(1 - d_k / n_k) with n_k = sum_{j >= k} (d_j + c_j); its
    derivative is H_j - 1 / (n_j - d_j) for d_j and H_j for c_j when j <= K (H the running sum of
    d_k / (n_k (n_k - d_k))), and H_K for either cell when j > K.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_left = np.where(at_risk - deaths > 0, 1.0 / (at_risk - deaths), 0.0)
        hazard = np.where(at_risk - deaths > 0, deaths / (at_risk * (at_risk - deaths)), 0.0)
    running = np.cumsum(hazard)
    before = np.cumsum((running - inv_left) ** 2 + running**2)
    after = 2.0 * (deaths.size - 1 - np.arange(deaths.size)) * running**2
    return np.asarray(before + after, dtype=np.float64)


@analysis("kaplan_meier")
class KaplanMeier(_Counting[KaplanMeierParams]):
    """Pooled Kaplan-Meier curves with Greenwood log(-log) bands, optionally by group."""

    params_model = KaplanMeierParams

    def _finish(
        self,
        counts: FloatArray,
        noise_var: float,
        grid: _Grid,
        params: KaplanMeierParams,
        ctx: AnalysisContext,
        notes: list[str],
    ) -> KaplanMeierResult:
        points = grid.points()
        labels = [str(level) for level in self._levels(params, ctx.dictionary)]
        curves = {
            (label if params.group else "all"): _km_curve(
                counts[i, 0], counts[i, 1], points, noise_var, params.ci_level
            )
            for i, label in enumerate(labels)
        }
        if noise_var > 0:
            notes.append(
                f"dp: counts carry noise of variance {noise_var:.3g} per cell (pooled over "
                "sites); the bands include it (delta method), see noise_sd"
            )
        return KaplanMeierResult(
            analysis="kaplan_meier",
            n=float(counts.sum()),
            notes=notes,
            time=params.time,
            group=params.group,
            ci_level=params.ci_level,
            curves=curves,
        )


# ----------------------------------------------------------------------------- logrank


class LogrankParams(_CountingParams):
    group: str = Field(description="a categorical or binary variable")


@dataclass
class LogrankResult(AnalysisResult):
    """Pooled log-rank test of equal survival across the levels of ``group``."""

    group: str = ""
    chi2: float = float("nan")
    dof: int = 0
    p: float = float("nan")
    observed: dict[str, float] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)

    def values(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "chi2": self.chi2,
            "dof": self.dof,
            "p": self.p,
            "observed": self.observed,
            "expected": self.expected,
        }

    @property
    def summary(self) -> pd.DataFrame:
        frame = pd.DataFrame({"observed": self.observed, "expected": self.expected})
        frame.index.name = self.group
        return frame

    def __str__(self) -> str:
        lines = [
            self._header(),
            f"  test_name = logrank_test, null_distribution = chi squared, "
            f"degrees_of_freedom = {self.dof}",
            f"  test_statistic = {self.chi2:.4f}, p = {self.p:.4g}",
            self._table(),
        ]
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Observed and expected events per group level."""
        ax = self._axes(ax)
        self.summary.plot(kind="bar", ax=ax)
        ax.set_ylabel("events")
        ax.set_title(f"log-rank chi2={self.chi2:.2f}, dof={self.dof}, p={self.p:.3g}")
        return ax


def _logrank_noise_cov(deaths: FloatArray, at_risk: FloatArray, cell_var: float) -> FloatArray:
    """Noise covariance of observed minus expected (delta method over every count cell).

    U_g = sum_k d_gk - d_k n_gk / n_k. With P(j) = sum_{k<=j} d_k / n_k and
    Q_g(j) = sum_{k<=j} d_k n_gk / n_k^2: dU_g/dc_hj = -[g=h] P(j) + Q_g(j) and
    dU_g/dd_hj = [g=h] - n_gj / n_j + dU_g/dc_hj.
    """
    groups = deaths.shape[0]
    d_tot = deaths.sum(axis=0)
    n_tot = at_risk.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(n_tot > 0, d_tot / n_tot, 0.0)
        share = np.where(n_tot > 0, at_risk / n_tot, 0.0)
        weight = np.where(n_tot > 0, d_tot / n_tot**2, 0.0)
    p_run = np.cumsum(ratio)
    q_run = np.cumsum(at_risk * weight, axis=1)
    cov = np.zeros((groups, groups))
    eye = np.eye(groups)
    for h in range(groups):
        d_c = -eye[:, h, None] * p_run + q_run  # (g, j)
        d_d = eye[:, h, None] - share + d_c
        cov += d_c @ d_c.T + d_d @ d_d.T
    return np.asarray(cell_var * cov, dtype=np.float64)


@analysis("logrank")
class Logrank(_Counting[LogrankParams]):
    """Log-rank test (lifelines' multivariate form) over the levels of ``group``."""

    params_model = LogrankParams

    def _finish(
        self,
        counts: FloatArray,
        noise_var: float,
        grid: _Grid,
        params: LogrankParams,
        ctx: AnalysisContext,
        notes: list[str],
    ) -> LogrankResult:
        levels = [str(level) for level in self._levels(params, ctx.dictionary)]
        present = counts.sum(axis=(1, 2)) > 0
        if present.sum() < 2:
            raise ModelError(
                f"logrank needs records in at least two levels of {params.group!r}; found "
                f"{int(present.sum())} (levels {', '.join(levels)})"
            )
        if not present.all():
            absent = [lv for lv, ok in zip(levels, present, strict=True) if not ok]
            notes.append(f"levels without records left out: {', '.join(absent)}")
        counts = counts[present]
        kept = [lv for lv, ok in zip(levels, present, strict=True) if ok]
        deaths, censored = counts[:, 0], counts[:, 1]
        at_risk = _at_risk(deaths, censored)
        deaths = np.minimum(deaths, at_risk)
        d_tot, n_tot = deaths.sum(axis=0), at_risk.sum(axis=0)
        if d_tot.sum() <= 0:
            raise ModelError("logrank: no events among the records; the test is undefined")
        use = (d_tot > 0) & (n_tot > 0)
        d_tot, n_tot = d_tot[use], n_tot[use]
        d_g, n_g = deaths[:, use], at_risk[:, use]
        expected = n_g * (d_tot / n_tot)
        u = d_g.sum(axis=1) - expected.sum(axis=1)
        factor = np.where(n_tot > 1, (n_tot - d_tot) / np.maximum(n_tot - 1, 1), 1.0)
        factor = factor * d_tot / n_tot**2
        weighted = n_g * np.sqrt(factor)
        var = np.diag((n_g * factor * n_tot).sum(axis=1)) - weighted @ weighted.T
        if noise_var > 0:
            var = var + _logrank_noise_cov(deaths, at_risk, noise_var)
            notes.append(
                f"dp: counts carry noise of variance {noise_var:.3g} per cell; its covariance is "
                "added to the test's variance (delta method), so chi2 is conservative"
            )
        chi2 = float(u[:-1] @ np.linalg.pinv(var[:-1, :-1]) @ u[:-1])
        dof = len(kept) - 1
        return LogrankResult(
            analysis="logrank",
            n=float(counts.sum()),
            notes=notes,
            group=params.group,
            chi2=chi2,
            dof=dof,
            p=float(stats.chi2.sf(chi2, dof)),
            observed=dict(zip(kept, d_g.sum(axis=1).tolist(), strict=True)),
            expected=dict(zip(kept, expected.sum(axis=1).tolist(), strict=True)),
        )


# ============================================================================ cox


class CoxParams(_SurvivalParams):
    covariates: list[str] = Field(min_length=1, max_length=50)
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

    @field_validator("covariates")
    @classmethod
    def _distinct(cls, covariates: list[str]) -> list[str]:
        if len(set(covariates)) != len(covariates):
            raise ValueError(f"covariates must be distinct, got {covariates}")
        return covariates


@dataclass(frozen=True)
class _Term:
    """One column of the Cox design, centred and scaled by public bounds (|x| <= 1)."""

    name: str
    variable: str
    level: int | None  # a treatment dummy's level; None for a numeric column
    centre: float
    scale: float


def _design(dictionary: DataDictionary, covariates: Sequence[str]) -> list[_Term]:
    terms = []
    for name in covariates:
        var = dictionary.variable(name)
        if isinstance(var, (NumericVariable, BinaryVariable)):
            low, high = dictionary.bounds(name)
            terms.append(_Term(name, name, None, (low + high) / 2, (high - low) / 2))
        else:  # treatment coding against the dictionary's first level
            terms.extend(_Term(f"{name}[T.{lv}]", name, lv, 0.0, 1.0) for lv in var.levels[1:])
    return terms


def _design_matrix(
    frame: pd.DataFrame, terms: Sequence[_Term], dictionary: DataDictionary
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


def _packed(p: int) -> tuple[IntArray, IntArray]:
    rows, cols = np.triu_indices(p)
    return rows.astype(np.int64), cols.astype(np.int64)


def _unpack(packed: FloatArray, p: int) -> FloatArray:
    """(..., p(p+1)/2) upper triangles -> (..., p, p) symmetric matrices."""
    rows, cols = _packed(p)
    out = np.zeros((*packed.shape[:-1], p, p))
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out


@dataclass
class _CoxSums:
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
    def of(cls, arrays: Mapping[str, FloatArray]) -> _CoxSums:
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

    def cleaned(self) -> _CoxSums:
        """Post-processing of noisy sums into a consistent set (dp mode)."""
        d = np.asarray(np.round(np.maximum(self.d, 0.0)), dtype=np.float64)
        s0 = np.maximum(self.s0, 0.0)
        e0 = None if self.e0 is None else np.clip(self.e0, 0.0, None)
        return _CoxSums(d, self.xsum, s0, self.s1, self.s2, e0, self.e1, self.e2)


def _reverse_cumsum(values: FloatArray) -> FloatArray:
    return np.asarray(np.cumsum(values[::-1], axis=0)[::-1], dtype=np.float64)


def _cox_fit_terms(sums: _CoxSums, beta: FloatArray) -> tuple[float, FloatArray, FloatArray | None]:
    """Partial log-likelihood, gradient and information (None without ``s2``) of one stratum.

    Efron's ties when the sums over tied events (``e0``, ``e1``) are present, else Breslow's.
    """
    p = beta.size
    s0 = _reverse_cumsum(sums.s0)
    use = (sums.d > 0) & (s0 > 0)
    d, s0 = sums.d[use], s0[use]
    s1 = _reverse_cumsum(sums.s1)[use]
    s2 = None if sums.s2 is None else _unpack(_reverse_cumsum(sums.s2)[use], p)
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
    e2 = _unpack(sums.e2[use], p)
    c, dd, f = by_time(phi**-2), by_time(frac / phi**2), by_time(frac**2 / phi**2)
    outer = (
        np.einsum("k,ki,kj->ij", c, s1, s1)
        - np.einsum("k,ki,kj->ij", dd, s1, e1)
        - np.einsum("k,ki,kj->ij", dd, e1, s1)
        + np.einsum("k,ki,kj->ij", f, e1, e1)
    )
    info = np.einsum("k,kij->ij", a, s2) - np.einsum("k,kij->ij", b, e2) - outer
    return loglik, grad, info


@dataclass
class CoxResult(AnalysisResult):
    """A federated Cox proportional hazards model."""

    time: str = ""
    event: str = ""
    ties: str = "efron"
    strata_by_site: bool = False
    ci_level: float = 0.95
    coefficients: dict[str, dict[str, float]] = field(default_factory=dict)
    log_likelihood: float = float("nan")
    iterations: int = 0
    converged: bool = False
    events: float = 0.0

    def values(self) -> dict[str, Any]:
        return {
            "coefficients": self.coefficients,
            "log_likelihood": self.log_likelihood,
            "iterations": self.iterations,
            "converged": self.converged,
            "ties": self.ties,
            "strata_by_site": self.strata_by_site,
            "events": self.events,
            "ci_level": self.ci_level,
        }

    @property
    def terms(self) -> list[str]:
        """Term names, in the design's order."""
        return list(self.coefficients)

    def coef(self, term: str) -> float:
        """The estimate of one term."""
        return self.coefficients[term]["estimate"]

    @property
    def summary(self) -> pd.DataFrame:
        frame = pd.DataFrame.from_dict(self.coefficients, orient="index")
        frame.index.name = "covariate"
        return frame

    def __str__(self) -> str:
        level = f"{100 * self.ci_level:g}%"
        head = [
            self._header(),
            f"             model = federated Cox proportional hazards ({self.ties} ties)",
            f"      duration col = {self.time!r}",
            f"         event col = {self.event!r}",
        ]
        if self.strata_by_site:
            head.append("            strata = site")
        head += [
            f"  number of records = {show_count(self.n, self.privacy.mode == 'dp')}",
            f"  number of events  = {show_count(self.events, self.privacy.mode == 'dp')}",
            f"  partial log-likelihood = {self.log_likelihood:.4f}",
            f"  iterations = {self.iterations}, converged = {self.converged}",
            "---",
        ]
        table = self.summary.rename(
            columns={
                "estimate": "coef",
                "hazard_ratio": "exp(coef)",
                "std_error": "se(coef)",
                "ci_lower": f"coef lower {level}",
                "ci_upper": f"coef upper {level}",
            }
        )
        lines = [*head, table.to_string(float_format=lambda v: f"{v:.4g}")]
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Forest plot of the log hazard ratios with their confidence intervals."""
        ax = self._axes(ax)
        frame = self.summary.iloc[::-1]
        ypos = np.arange(len(frame))
        ax.errorbar(
            frame["estimate"],
            ypos,
            xerr=[frame["estimate"] - frame["ci_lower"], frame["ci_upper"] - frame["estimate"]],
            fmt="s",
            capsize=3,
        )
        ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks(ypos)
        ax.set_yticklabels(list(frame.index))
        ax.set_xlabel(f"log(HR) ({100 * self.ci_level:g}% CI)")
        ax.set_title(self._header())
        return ax


_SUM_NAMES = ("s0", "s1", "s2")


@dataclass
class _Stratum:
    """One stratum's sums (``pooled``, or a site's when stratified) and noise per cell."""

    key: str
    sums: _CoxSums
    variances: dict[str, float]


def _releases_hessian(ctx: AnalysisContext) -> bool:
    """Whether this round releases the Hessian's sums: in dp only the first round does, at
    b = 0 where the sensitivity e^B is smallest; its Hessian steers every later step (measured:
    several times less noise in the estimate than a noisy Hessian at the current b)."""
    return ctx.mode != "dp" or ctx.round == 0


def _max_eta(beta: FloatArray, terms: Sequence[_Term]) -> float:
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


def _shrink(beta: FloatArray, bound: float) -> FloatArray:
    """``beta`` scaled down to sum |b_j| <= bound (dp: the public bound on the coefficients)."""
    norm = float(np.sum(np.abs(beta)))
    return beta * (bound / norm) if norm > bound else beta


def _newton_step(info: FloatArray, grad: FloatArray) -> FloatArray:
    try:
        return np.asarray(np.linalg.solve(info, grad), dtype=np.float64)
    except np.linalg.LinAlgError:
        raise ModelError(
            "cox: the information matrix is singular at the current estimate; a covariate may "
            "separate events from the risk set"
        ) from None


def _releases_fixed(ctx: AnalysisContext) -> bool:
    """Whether this round releases the event counts and sums of x (in dp: the first round only,
    as they do not depend on the coefficients; exact modes: every round, nothing kept)."""
    return ctx.mode != "dp" or ctx.round == 0


_EFRON_NAMES = ("e0", "e1", "e2")


@analysis("cox")
class Cox(Analysis[CoxParams]):
    """Exact federated Cox regression by Newton-Raphson over pooled risk-set sums."""

    params_model = CoxParams

    def variables(self, params: CoxParams) -> set[str]:
        return {params.time, params.event, *params.covariates}

    def check_params(self, params: CoxParams, dictionary: DataDictionary) -> None:
        for name in params.covariates:
            if name in (params.time, params.event):
                raise ValidationError(f"covariate {name!r} is the time or event variable")
        _check_survival_params(params, dictionary, 2)
        p = len(_design(dictionary, params.covariates))
        per_time = 2 + 2 * p + p * (p + 1) // 2
        if per_time > MAX_CELLS:
            raise ValidationError(f"{p} design columns are too many for one release")

    # ------------------------------------------------------------------ rounds and shapes

    def initial_state(self, params: CoxParams, ctx: AnalysisContext) -> dict[str, Any]:
        if ctx.mode == "sdc":
            return {"phase": "probe"}
        if ctx.mode != "dp":
            return {"phase": "counts"}
        grid = _grid_for(params, ctx)
        p = len(_design(ctx.dictionary, params.covariates))
        return {"phase": "newton", "event_idx": list(range(grid.size)), "beta": [0.0] * p}

    def dp_rounds(self, params: CoxParams, ctx: AnalysisContext) -> int:
        return params.dp_iterations

    def declare(self, params: CoxParams, ctx: AnalysisContext) -> RecordSpec:
        phase = ctx.state.get("phase")
        if phase == "probe":
            widths = _sdc_widths(params, ctx.dictionary)
            return RecordSpec({"safe": ArraySpec((len(widths),), kind="statistic")})
        grid = _grid_for(params, ctx)
        if phase == "counts":
            return RecordSpec(
                {"counts": ArraySpec((2, grid.size), kind="count", sensitivity=1.0, integer=True)}
            )
        m = len(ctx.state["event_idx"])
        terms = _design(ctx.dictionary, params.covariates)
        p = len(terms)
        q = p * (p + 1) // 2
        # max exp(x'b); only dp uses it, where dp_coef_bound keeps it small.
        bound = math.exp(min(_max_eta(np.asarray(ctx.state["beta"], dtype=np.float64), terms), 700))
        arrays = {
            "n": ArraySpec((), kind="count", sensitivity=1.0, integer=True, budget_share=0.1),
            "s0": ArraySpec((m,), kind="sum", sensitivity=bound),
            "s1": ArraySpec((m, p), kind="sum", sensitivity=p * bound),
        }
        efron = params.ties == "efron"
        if efron:
            arrays["e0"] = ArraySpec((m,), kind="sum", sensitivity=bound)
            arrays["e1"] = ArraySpec((m, p), kind="sum", sensitivity=p * bound)
        if _releases_hessian(ctx):
            arrays["s2"] = ArraySpec((m, q), kind="sum", sensitivity=q * bound)
            if efron:
                arrays["e2"] = ArraySpec((m, q), kind="sum", sensitivity=q * bound)
        if _releases_fixed(ctx):
            arrays["d"] = ArraySpec((m,), kind="count", sensitivity=1.0, integer=True)
            arrays["xsum"] = ArraySpec((p,), kind="sum", sensitivity=float(p))
        return RecordSpec(arrays)

    # ------------------------------------------------------------------ site half

    def _rows(
        self, data: pd.DataFrame, params: CoxParams, dictionary: DataDictionary
    ) -> tuple[FloatArray, npt.NDArray[np.bool_], FloatArray]:
        frame = rows_used(data, [params.time, params.event, *params.covariates])
        x, valid = _design_matrix(frame, _design(dictionary, params.covariates), dictionary)
        times, events = _times_events(frame, params, dictionary)
        return times[valid], events[valid], x[valid]

    def local(self, data: pd.DataFrame, params: CoxParams, ctx: AnalysisContext) -> Arrays:
        phase = ctx.state.get("phase")
        times, events, x = self._rows(data, params, ctx.dictionary)
        if phase == "probe":
            low, high = _time_range(params, ctx.dictionary)
            flags = []
            for width in _sdc_widths(params, ctx.dictionary):
                grid = _Grid.spanning(low, high, width)
                cells = np.bincount(
                    (~events).astype(np.int64) * grid.size + grid.index(times),
                    minlength=2 * grid.size,
                )
                flags.append(float(_cells_safe(cells.astype(np.float64), ctx.sdc.min_cell)))
            return {"safe": np.asarray(flags)}
        grid = _grid_for(params, ctx)
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
        out = _risk_sums(
            times,
            events,
            x,
            grid,
            ctx.state["event_idx"],
            ctx.state["beta"],
            efron=params.ties == "efron",
            hessian=_releases_hessian(ctx),
        )
        if not _releases_fixed(ctx):
            del out["d"], out["xsum"]
        return out

    # ------------------------------------------------------------------ coordinator half

    def combine(
        self, records: Mapping[str, AggregateRecord], params: CoxParams, ctx: AnalysisContext
    ) -> Any:
        if not records:
            raise ModelError("cox: no site returned records")
        phase = ctx.state.get("phase")
        if phase == "probe":
            width = _choose_width(records, _sdc_widths(params, ctx.dictionary))
            return NextRound({"phase": "counts", "width": width})
        if phase == "counts":
            counts = _sum_arrays(records, "counts")
            event_idx = np.flatnonzero(counts[0] > 0)
            if event_idx.size == 0:
                raise ModelError(
                    f"cox: no events among {counts.sum():.0f} records ({params.event!r} is never "
                    "1); a proportional hazards model cannot be fitted"
                )
            p = len(_design(ctx.dictionary, params.covariates))
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
            return NextRound(state)
        return self._newton(records, params, ctx)

    def _strata(
        self, records: Mapping[str, AggregateRecord], params: CoxParams, ctx: AnalysisContext
    ) -> list[_Stratum]:
        """The pooled sums (or each site's, stratified), with their noise variances per cell."""
        names = list(records[next(iter(records))].arrays)
        names.remove("n")
        arrays: dict[str, dict[str, FloatArray]] = {}
        variances: dict[str, dict[str, float]] = {}
        if params.strata_by_site:
            for site, record in records.items():
                arrays[site] = {k: np.asarray(record[k], dtype=np.float64) for k in names}
                variances[site] = {k: _noise_variance(record.releases[k]) for k in names}
        else:
            arrays["pooled"] = {k: _sum_arrays(records, k) for k in names}
            variances["pooled"] = {k: _pooled_noise_variance(records, k) for k in names}
        if not _releases_fixed(ctx):  # dp: event counts and sums of x came in the first round
            stored = ctx.state["fixed"]
            missing = sorted(set(arrays) - set(stored))
            if missing:
                raise ModelError(
                    f"cox: {', '.join(missing)} did not answer the first dp round, so its event "
                    "counts are unknown; rerun the request"
                )
            for key in arrays:
                arrays[key]["d"] = np.asarray(stored[key]["d"], dtype=np.float64)
                arrays[key]["xsum"] = np.asarray(stored[key]["xsum"], dtype=np.float64)
                variances[key]["d"] = float(stored[key]["var_d"])
                variances[key]["xsum"] = float(stored[key]["var_xsum"])
        strata = []
        for key, values in arrays.items():
            sums = _CoxSums.of(values)
            strata.append(
                _Stratum(key, sums.cleaned() if ctx.mode == "dp" else sums, variances[key])
            )
        return strata

    @staticmethod
    def _evaluate(
        strata: Sequence[_CoxSums], beta: FloatArray
    ) -> tuple[float, FloatArray, FloatArray | None]:
        loglik, grad = 0.0, np.zeros(beta.size)
        info: FloatArray | None = np.zeros((beta.size, beta.size))
        for sums in strata:
            part_ll, part_grad, part_info = _cox_fit_terms(sums, beta)
            loglik, grad = loglik + part_ll, grad + part_grad
            info = None if info is None or part_info is None else info + part_info
        return loglik, grad, info

    def _newton(
        self, records: Mapping[str, AggregateRecord], params: CoxParams, ctx: AnalysisContext
    ) -> Any:
        terms = _design(ctx.dictionary, params.covariates)
        state = dict(ctx.state)
        beta = np.asarray(state["beta"], dtype=np.float64)
        iteration = int(state.get("iteration", 0)) + 1
        strata = self._strata(records, params, ctx)
        loglik, grad, info = self._evaluate([s.sums for s in strata], beta)
        if ctx.mode == "dp":
            return self._newton_dp(records, params, ctx, terms, strata, loglik, grad, info)
        if info is None:
            raise InternalError("cox: an exact round came without the Hessian's sums")
        if iteration == 1:
            _check_identifiable(info, terms)
        prev = state.get("prev_loglik")
        if prev is None and not math.isfinite(loglik):
            raise ModelError("cox: the partial likelihood is not finite at the starting values")
        if not math.isfinite(loglik) or (prev is not None and loglik < prev - 1e-10 * abs(prev)):
            halvings = int(state.get("halvings", 0)) + 1
            if halvings > 40:
                raise ModelError("cox: step halving failed to increase the partial likelihood")
            back = np.asarray(state["prev_beta"])
            state.update(beta=((beta + back) / 2).tolist(), halvings=halvings, iteration=iteration)
            return NextRound(state)
        step = _newton_step(info, grad)
        if np.max(np.abs(step)) < params.tol:
            _check_finite_optimum(beta, info, terms, iteration)
            return self._result(
                records, params, ctx, terms, beta, info, loglik, iteration, strata, None, True
            )
        if iteration >= params.max_iter:
            order = np.argsort(-np.abs(beta))
            worst = [terms[j].name for j in order if abs(beta[j]) > 5] or [terms[order[0]].name]
            raise ModelError(
                f"cox: no convergence in {params.max_iter} Newton-Raphson iterations (last step "
                f"{np.max(np.abs(step)):.3g}, tol {params.tol:g}); the coefficients of "
                f"{', '.join(worst)} keep growing, which suggests monotone likelihood (a "
                "covariate separating events from the risk set). Drop or merge it, or raise "
                "max_iter"
            )
        # A step of more than 5 on the scaled covariates (a hazard ratio of e^5 across half the
        # public range) is cut to 5: far from the optimum, Newton can overshoot into overflow.
        step *= min(1.0, 5.0 / float(np.max(np.abs(step))))
        state.update(
            beta=(beta + step).tolist(),
            prev_beta=beta.tolist(),
            prev_loglik=loglik,
            iteration=iteration,
            halvings=0,
        )
        return NextRound(state)

    def _newton_dp(
        self,
        records: Mapping[str, AggregateRecord],
        params: CoxParams,
        ctx: AnalysisContext,
        terms: Sequence[_Term],
        strata: Sequence[_Stratum],
        loglik: float,
        grad: FloatArray,
        info: FloatArray | None,
    ) -> Any:
        """A dp round: a fixed number of them, every step with the first round's Hessian."""
        state = dict(ctx.state)
        beta = np.asarray(state["beta"], dtype=np.float64)
        first = None if ctx.round == 0 else np.asarray(state["hessian"], dtype=np.float64)
        info = _dp_information(info, first)
        step = _newton_step(info, grad)
        if ctx.round == 0:  # keep the once-released event counts, sums of x and Hessian
            state["fixed"] = {
                s.key: {
                    "d": s.sums.d.tolist(),
                    "xsum": s.sums.xsum.tolist(),
                    "var_d": s.variances["d"],
                    "var_xsum": s.variances["xsum"],
                }
                for s in strata
            }
            state["hessian"] = info.tolist()
        if ctx.round + 1 < params.dp_iterations:
            state.update(
                beta=_shrink(beta + step, params.dp_coef_bound).tolist(), iteration=ctx.round + 1
            )
            return NextRound(state)
        noise = self._bootstrap_noise(strata, beta, first)
        final = _shrink(beta + step, params.dp_coef_bound)
        return self._result(
            records, params, ctx, terms, final, info, loglik, ctx.round + 1, strata, noise,
            converged=bool(np.max(np.abs(step)) < params.tol),
            shrunk=bool(np.any(final != beta + step)),
        )  # fmt: skip

    def _bootstrap_noise(
        self, strata: Sequence[_Stratum], beta: FloatArray, first: FloatArray | None
    ) -> FloatArray:
        """Variance of each final coefficient due to the release noise (parametric bootstrap:
        re-noise the released sums with their known variances and redo the last step; a robust
        spread, as a noisy Hessian makes a few draws wild)."""
        if not any(v > 0 for stratum in strata for v in stratum.variances.values()):
            return np.zeros(beta.size)
        rng = np.random.default_rng(0)
        draws = []
        for _ in range(_BOOTSTRAP_DRAWS):
            noisy = []
            for stratum in strata:
                fresh = {}
                for k, var in stratum.variances.items():
                    value = np.asarray(getattr(stratum.sums, k), dtype=np.float64)
                    fresh[k] = value + rng.normal(0.0, math.sqrt(var), value.shape)
                noisy.append(_CoxSums.of(fresh).cleaned())
            _, grad, info = self._evaluate(noisy, beta)
            draws.append(beta + _newton_step(_dp_information(info, first), grad))
        spread = np.asarray(draws)
        mad = np.median(np.abs(spread - np.median(spread, axis=0)), axis=0)
        return np.asarray((1.4826 * mad) ** 2, dtype=np.float64)

    def _result(
        self,
        records: Mapping[str, AggregateRecord],
        params: CoxParams,
        ctx: AnalysisContext,
        terms: Sequence[_Term],
        beta: FloatArray,
        info: FloatArray,
        loglik: float,
        iteration: int,
        strata: Sequence[_Stratum],
        noise_var: FloatArray | None,
        converged: bool,
        shrunk: bool = False,
    ) -> CoxResult:
        try:
            cov = np.linalg.inv(info)
        except np.linalg.LinAlgError:
            raise ModelError("cox: the information matrix is singular at the estimate") from None
        scale = np.array([t.scale for t in terms])
        z_crit = float(stats.norm.ppf(1 - (1 - params.ci_level) / 2))
        estimate = beta / scale
        sampling = np.diag(cov) / scale**2
        noise = np.zeros_like(sampling) if noise_var is None else noise_var / scale**2
        se = np.sqrt(sampling + noise)
        coefficients: dict[str, dict[str, float]] = {}
        for j, term in enumerate(terms):
            z = estimate[j] / se[j]
            entry = {
                "estimate": float(estimate[j]),
                "std_error": float(se[j]),
                "z": float(z),
                "p": float(2 * stats.norm.sf(abs(z))),
                "ci_lower": float(estimate[j] - z_crit * se[j]),
                "ci_upper": float(estimate[j] + z_crit * se[j]),
                "hazard_ratio": float(np.exp(estimate[j])),
            }
            if noise_var is not None:
                entry["noise_sd"] = float(np.sqrt(noise[j]))
            coefficients[term.name] = entry
        grid = _grid_for(params, ctx)
        notes = [_grid_note(grid, params, ctx, _unit(ctx.dictionary, params.time))]
        if noise_var is not None and params.ties == "efron":
            notes.append(
                "dp: Efron's ties release two more noisy arrays per round (2 to 3 times the "
                "noise of ties: breslow on grouped times, which is biased toward 0 instead)"
            )
        if shrunk:
            notes.append(
                f"dp: the estimate was shrunk to sum |b_j| = {params.dp_coef_bound:g} on the "
                "scaled covariates (dp_coef_bound)"
            )
        if noise_var is not None:
            notes.append(
                f"dp: {params.dp_iterations} Newton rounds on noisy sums, then one last step, "
                "all with the information at b = 0 (round 0), which also gives the sampling "
                f"part of std_error; std_error includes the noise (noise_sd, parametric "
                f"bootstrap of {_BOOTSTRAP_DRAWS} draws); log_likelihood is that of the noisy sums"
            )
            swamped = [t.name for t, n, v in zip(terms, noise, sampling, strict=True) if n > 9 * v]
            if swamped:
                notes.append(
                    f"dp: the noise is over 3 times the sampling error for {', '.join(swamped)}; "
                    "those estimates say little at this epsilon and number of records"
                )
        events = float(sum(float(np.sum(s.sums.d)) for s in strata))
        return CoxResult(
            analysis="cox",
            n=float(_sum_arrays(records, "n")),
            notes=notes,
            time=params.time,
            event=params.event,
            ties=params.ties,
            strata_by_site=params.strata_by_site,
            ci_level=params.ci_level,
            coefficients=coefficients,
            log_likelihood=loglik,
            iterations=iteration,
            converged=converged,
            events=events,
        )


def _risk_sums(
    times: FloatArray,
    events: npt.NDArray[np.bool_],
    x: FloatArray,
    grid: _Grid,
    event_idx: Sequence[int],
    beta: Sequence[float],
    efron: bool,
    hessian: bool,
) -> Arrays:
    """One site's sums per interval between consecutive pooled event times (see the module doc).

    Interval k holds the rows whose grid point lies in [t_k, t_{k+1}); a reverse cumulative sum
    over intervals gives the risk-set sums at t_k. Events are summed at their own event time.
    """
    n, p = x.shape
    m = len(event_idx)
    rows, cols = _packed(p)
    points = np.asarray(event_idx, dtype=np.int64)
    interval_of = np.searchsorted(points, np.arange(grid.size), side="right") - 1
    at_point = np.zeros(grid.size, dtype=bool)
    at_point[points] = True
    point = grid.index(times)
    interval = interval_of[point]
    keep = interval >= 0  # rows before the first event time are in no risk set
    w = np.exp(x @ np.asarray(beta, dtype=np.float64))

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


def _check_finite_optimum(
    beta: FloatArray, info: FloatArray, terms: Sequence[_Term], iteration: int
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
        names = ", ".join(terms[j].name for j in bad)
        raise ModelError(
            f"cox: the coefficient of {names} grows without bound (scaled estimate "
            f"{beta[bad[0]]:.3g}, standard error {se[bad[0]]:.3g} after {iteration} iterations): "
            "monotone likelihood, as a covariate separates events from the risk set. Drop or "
            "merge it"
        )


def _check_identifiable(info: FloatArray, terms: Sequence[_Term]) -> None:
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


def _dp_information(info: FloatArray | None, first: FloatArray | None) -> FloatArray:
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
