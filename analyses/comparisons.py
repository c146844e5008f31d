"""Comparisons: ``ttest`` (two groups' means) and ``correlation`` (Pearson matrix).

Both pool per-site counts, sums and sums of squares or cross-products of values shifted by the
dictionary's public midpoint (and, for correlations, scaled by the public half-range), which
keeps the sums small and the pooled variances accurate, and bounds each row's contribution for
differential privacy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field

from analyses._lazy import stats
from analyses.base import Analysis, AnalysisContext, Arrays, DistinctNames, Params, rows_used
from analyses.common import (
    level_names,
    one_hot,
    pooled,
    pooled_noise_variance,
    require_levels,
    require_numeric,
)
from analyses.registry import analysis
from analyses.results import AnalysisResult
from protocol.config import DataDictionary
from protocol.errors import DisclosureError, ModelError, ValidationError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec

FloatArray = npt.NDArray[np.float64]

#: A pooled sum of squared deviations at most this fraction of the sum of squares it was taken
#: from is a constant's rounding residue (of either sign, as machines sum in different orders),
#: not a spread: the summation error of up to a million terms stays below it.
_CONSTANT = 1e-10


def _check_subset(n: float, ctx: AnalysisContext, what: str) -> None:
    """sdc: a site releases no statistic of a subset smaller than min_subset (DataSHIELD)."""
    if ctx.mode == "sdc" and 0 < n < ctx.sdc.min_subset:
        raise DisclosureError(
            f"{what} has fewer than {ctx.sdc.min_subset} records here (the smallest subset "
            "this site releases a statistic of); its sums would disclose them"
        )


# ----------------------------------------------------------------------------- ttest


class TTestParams(Params):
    variable: str = Field(description="numeric variable to compare")
    group: str = Field(description="binary or two-level categorical variable")
    equal_var: bool = Field(default=False, description="pooled variance; false: Welch")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="1 - confidence level")


@dataclass
class TTestResult(AnalysisResult):
    """Two-sample t-test of ``variable`` between the two levels of ``group``.

    ``difference`` is the mean of the second level minus the mean of the first (dictionary
    order), so ``t`` equals ``scipy.stats.ttest_ind(x[g == second], x[g == first])``.
    """

    variable: str = ""
    group: str = ""
    equal_var: bool = False
    alpha: float = 0.05
    t: float = float("nan")
    dof: float = float("nan")
    p: float = float("nan")
    difference: float = float("nan")
    std_error: float = float("nan")
    ci_lower: float = float("nan")
    ci_upper: float = float("nan")
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    group_names: list[str] = field(default_factory=list)
    noise_sd: float = 0.0

    def values(self) -> dict[str, Any]:
        return {
            "variable": self.variable,
            "group": self.group,
            "test": "student" if self.equal_var else "welch",
            "equal_var": self.equal_var,
            "alpha": self.alpha,
            "group_names": self.group_names,
            "t": self.t,
            "dof": self.dof,
            "p": self.p,
            "difference": self.difference,
            "std_error": self.std_error,
            "ci_lower": self.ci_lower,
            "ci_upper": self.ci_upper,
            "groups": self.groups,
            "noise_sd": self.noise_sd,
        }

    @property
    def summary(self) -> pd.DataFrame:
        level = f"{100 * (1 - self.alpha):g}"
        rows = []
        for name, g in zip(self.group_names, self.groups.values(), strict=True):
            rows.append(
                {
                    self.group: name,
                    "n": g["n"],
                    "mean": g["mean"],
                    "variance": g["variance"],
                    f"ci_lower_{level}": g["ci_lower"],
                    f"ci_upper_{level}": g["ci_upper"],
                }
            )
        rows.append(
            {
                self.group: "difference",
                "n": self.n,
                "mean": self.difference,
                "variance": float("nan"),
                f"ci_lower_{level}": self.ci_lower,
                f"ci_upper_{level}": self.ci_upper,
            }
        )
        return pd.DataFrame(rows).set_index(self.group)

    def __str__(self) -> str:
        test = "Student (equal variances)" if self.equal_var else "Welch"
        lines = [
            self._header(),
            f"{test} t-test of {self.variable} by {self.group}",
            self._table(),
            f"t = {self.t:.4f}, dof = {self.dof:.2f}, p = {self.p:.4g}",
        ]
        lines.extend(self._footer())
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Each group's mean with its confidence interval."""
        ax = self._axes(ax)
        groups = list(self.groups.values())
        means = np.array([g["mean"] for g in groups])
        lower = means - np.array([g["ci_lower"] for g in groups])
        upper = np.array([g["ci_upper"] for g in groups]) - means
        ax.errorbar(range(len(groups)), means, yerr=[lower, upper], fmt="o", capsize=6)
        ax.set_xticks(range(len(groups)), self.group_names)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_xlabel(self.group)
        ax.set_ylabel(f"mean {self.variable} ({100 * (1 - self.alpha):g}% CI)")
        ax.set_title(f"{self._header()}\np = {self.p:.3g}")
        return ax


@analysis("ttest")
class TTest(Analysis[TTestParams]):
    """Two-sample t-test (Welch by default, Student with ``equal_var``) from pooled sums.

    Each site releases, per level of ``group``, its count, the sum of values shifted by the
    dictionary midpoint c and the sum of their squares. The pooled means, (n - 1) variances,
    t, dof, p and the interval of the difference are those of
    ``scipy.stats.ttest_ind(x[g == second], x[g == first], equal_var=...)`` on the pooled data.

    Privacy: counts (L1 sensitivity 1: one row is in one group), sums (values clamped to
    [L, U]: (U - L) / 2) and sums of squares (((U - L) / 2)^2); the sums get half of epsilon,
    the counts and sums of squares a quarter each. In sdc mode a site refuses when a group holds
    1 or 2 of its records. In dp mode each group mean carries noise of sd about
    ``sqrt(2 K) (U - L) / (epsilon n_g)`` over K sites (Laplace on the sums dominates): for age
    in [0, 120], four sites, epsilon 1 and 400 records a group, 0.85 years a group mean and 1.2
    years on the difference; it falls as 1 / n. The noise variance is added to the sampling
    variance, so the interval widens and t shrinks accordingly. The variances come from noisy
    sums of squares, whose noise sd is about ``sqrt(2 K) ((U - L) / 2)^2 / epsilon_sumsq``
    (41,000 for age in [0, 120], four sites, epsilon 1): a group's ``records x variance`` must
    be well above that (age with variance 80: thousands of records a group), else the result
    says the variance came out <= 0 and refuses; the notes give each variance's relative noise.
    """

    result_type = TTestResult

    params_model = TTestParams

    def variables(self, params: TTestParams) -> set[str]:
        return {params.variable, params.group}

    def coarsened_variables(self, params: TTestParams) -> set[str]:
        return {params.group}  # its public levels

    def magnitude_cells(
        self, data: pd.DataFrame, params: TTestParams, ctx: AnalysisContext
    ) -> list[FloatArray]:
        used = rows_used(data, [params.variable, params.group])
        values = used[params.variable].to_numpy(dtype=np.float64)
        groups = used[params.group].to_numpy(dtype=np.float64)
        return [values[groups == level] for level in np.unique(groups)]

    def check_params(self, params: TTestParams, dictionary: DataDictionary) -> None:
        require_numeric(dictionary, params.variable)
        levels = require_levels(dictionary, params.group, "group")
        if len(levels) != 2:
            raise ValidationError(
                f"group {params.group!r} has {len(levels)} levels {levels}; a t-test compares "
                "exactly 2 (use a binary or two-level categorical variable)"
            )

    def declare(self, params: TTestParams, ctx: AnalysisContext) -> RecordSpec:
        low, high = ctx.dictionary.bounds(params.variable)
        half = (high - low) / 2
        return RecordSpec(
            {
                "n": ArraySpec((2,), kind="count", sensitivity=1.0, integer=True),
                # The sums carry the difference, so they get half the budget.
                "sum": ArraySpec((2,), kind="sum", sensitivity=half, budget_share=2.0),
                "sumsq": ArraySpec((2,), kind="sum", sensitivity=half * half),
            }
        )

    def local(self, data: pd.DataFrame, params: TTestParams, ctx: AnalysisContext) -> Arrays:
        low, high = ctx.dictionary.bounds(params.variable)
        used = rows_used(data, [params.variable, params.group])
        values = np.clip(used[params.variable].to_numpy(dtype=np.float64), low, high)
        shifted = values - (low + high) / 2
        groups = one_hot(
            used[params.group].to_numpy(dtype=np.float64), ctx.dictionary.levels(params.group)
        )
        n = groups.sum(axis=0)
        for count, name in zip(n, level_names(ctx.dictionary, params.group), strict=True):
            _check_subset(float(count), ctx, f"group {params.group} = {name}")
        return {"n": n, "sum": shifted @ groups, "sumsq": (shifted * shifted) @ groups}

    def site_records(self, record: AggregateRecord) -> float:
        return float(record["n"].sum())

    def combine(
        self, records: Mapping[str, AggregateRecord], params: TTestParams, ctx: AnalysisContext
    ) -> TTestResult:
        low, high = ctx.dictionary.bounds(params.variable)
        centre = (low + high) / 2
        n = pooled(records, "n").reshape(2)
        total = pooled(records, "sum").reshape(2)
        total_sq = pooled(records, "sumsq").reshape(2)
        names = level_names(ctx.dictionary, params.group)
        var_sum, var_n = pooled_noise_variance(records, "sum"), pooled_noise_variance(records, "n")
        noisy = " (a noisy count: too few records for this epsilon)" if var_n > 0 else ""
        for count, name in zip(n, names, strict=True):
            if count < 2:
                raise ModelError(
                    f"group {params.group} = {name} has fewer than 2 records with "
                    f"{params.variable} at all sites{noisy}; a t-test needs at least 2 per group"
                )
        shifted_mean = total / n
        spread = total_sq - total * shifted_mean
        spread = np.where(spread <= _CONSTANT * np.abs(total_sq), 0.0, spread)
        variance = np.maximum(spread / (n - 1), 0.0)
        sumsq_noise = math.sqrt(pooled_noise_variance(records, "sumsq"))
        if sumsq_noise > 0 and np.any(variance <= 0):
            raise ModelError(
                f"in dp mode the noise on the sums of squares (sd {sumsq_noise:.3g}) swamps "
                f"them: a group's variance of {params.variable} came out <= 0, so no t-test is "
                "possible at this epsilon; it needs each group's sum of squared deviations "
                "(records x variance) well above that sd: use a larger epsilon, more records or "
                "narrower dictionary bounds"
            )
        if not np.any(variance > 0):
            raise ModelError(
                f"{params.variable} is constant in both groups; the t statistic is undefined"
            )
        # Noise of each group's mean (delta method on c + S / N) from the released scales.
        noise_var = var_sum / n**2 + (total / n**2) ** 2 * var_n
        se2 = variance / n
        difference = float(shifted_mean[1] - shifted_mean[0])
        if params.equal_var:
            dof = float(n.sum() - 2)
            pooled_var = float(np.sum((n - 1) * variance)) / dof
            sampling = pooled_var * float(np.sum(1 / n))
        else:
            sampling = float(se2.sum())
            dof = sampling**2 / float(np.sum(se2**2 / (n - 1)))
        std_error = math.sqrt(sampling + float(noise_var.sum()))
        t = difference / std_error
        quantile = float(stats.t.ppf(1 - params.alpha / 2, dof))
        result = TTestResult(
            analysis="ttest",
            n=float(n.sum()),
            variable=params.variable,
            group=params.group,
            equal_var=params.equal_var,
            alpha=params.alpha,
            t=t,
            dof=dof,
            p=float(2 * stats.t.sf(abs(t), dof)),
            difference=difference,
            std_error=std_error,
            ci_lower=difference - quantile * std_error,
            ci_upper=difference + quantile * std_error,
            group_names=names,
            noise_sd=math.sqrt(float(noise_var.sum())),
        )
        levels = ctx.dictionary.levels(params.group)
        for i, level in enumerate(levels):
            se_g = math.sqrt(se2[i] + noise_var[i])
            q_g = float(stats.t.ppf(1 - params.alpha / 2, n[i] - 1))
            mean = centre + float(shifted_mean[i])
            result.groups[str(level)] = {
                "n": float(n[i]),
                "mean": mean,
                "variance": float(variance[i]),
                "ci_lower": mean - q_g * se_g,
                "ci_upper": mean + q_g * se_g,
            }
        if result.noise_sd > 0:
            result.notes.append(
                f"noise adds sd {result.noise_sd:.4g} to the difference; it is included in the "
                "standard error, interval, t and p"
            )
        if sumsq_noise > 0:
            relative = ", ".join(
                f"{sumsq_noise / (k - 1) / v:.0%}" for k, v in zip(n, variance, strict=True)
            )
            result.notes.append(
                f"the group variances are estimated from noisy sums of squares (noise sd "
                f"{relative} of each variance), so the standard error is approximate"
            )
        return result


# ----------------------------------------------------------------------------- correlation


class CorrelationParams(Params):
    variables: DistinctNames = Field(min_length=2, max_length=50)


@dataclass
class CorrelationResult(AnalysisResult):
    """Pearson correlation matrix over the pooled complete cases."""

    variables: list[str] = field(default_factory=list)
    matrix: dict[str, dict[str, float]] = field(default_factory=dict)
    noise_sd: dict[str, dict[str, float]] | None = None

    #: Only a noisy matrix has one.
    optional_values = frozenset({"noise_sd"})

    @property
    def summary(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.matrix).loc[self.variables, self.variables]
        return frame.astype(float)

    def __str__(self) -> str:
        lines = [
            self._header(),
            f"Pearson correlations, {self.n:.0f} complete cases",
            self.summary.round(4).to_string(),
        ]
        lines.extend(self._footer())
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Heatmap of the matrix, annotated."""
        ax = self._axes(ax)
        matrix = self.summary.to_numpy()
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.figure.colorbar(image, ax=ax, label="r")
        ticks = range(len(self.variables))
        ax.set_xticks(ticks, self.variables, rotation=30, ha="right")
        ax.set_yticks(ticks, self.variables)
        for (i, j), r in np.ndenumerate(matrix):
            ax.text(j, i, f"{r:.2f}", ha="center", va="center")
        ax.set_title(self._header())
        return ax


@analysis("correlation")
class Correlation(Analysis[CorrelationParams]):
    """Pearson correlations over the complete cases of ``variables``.

    Each site standardises every value by the dictionary's public bounds,
    ``z = (x - (L + U) / 2) / ((U - L) / 2)`` in [-1, 1], and releases its count, the sums of z
    and the upper triangle of the cross-products of z. Correlations do not depend on the shift
    and scale, so the pooled matrix equals ``pandas.DataFrame.corr()`` on the pooled complete
    cases; the shift keeps the sums small for accuracy.

    Privacy: count (sensitivity 1), sums (p for p variables), cross-products
    (p (p + 1) / 2), which get two thirds of epsilon (the count and the sums a sixth each). In
    sdc mode a site refuses with 1 or 2 complete cases. In dp mode the noise on each pooled
    cross-product has sd about ``sqrt(2 K) p (p + 1) / (2 epsilon_cross)``, against a signal of
    n times the variance of z: with four sites and four variables at epsilon 1 that is about 42,
    so a correlation over n records moves by roughly 42 / (n var(z)): 0.05 for n = 20,000 when
    sd(z) = 0.2, so dp correlations need tens of thousands of records or a larger epsilon.
    The result reports each correlation's noise sd, found by re-drawing the released noise 200
    times around the released sums (a parametric bootstrap of the mechanism, not of the data).
    """

    result_type = CorrelationResult

    params_model = CorrelationParams

    def variables(self, params: CorrelationParams) -> set[str]:
        return set(params.variables)

    def check_params(self, params: CorrelationParams, dictionary: DataDictionary) -> None:
        for name in params.variables:
            require_numeric(dictionary, name)

    def declare(self, params: CorrelationParams, ctx: AnalysisContext) -> RecordSpec:
        p = len(params.variables)
        cells = p * (p + 1) // 2
        return RecordSpec(
            {
                "n": ArraySpec((), kind="count", sensitivity=1.0, integer=True),
                "sum": ArraySpec((p,), kind="sum", sensitivity=float(p)),
                # The cross-products carry the correlations: two thirds of the budget.
                "cross": ArraySpec(
                    (cells,), kind="sum", sensitivity=float(cells), budget_share=4.0
                ),
            }
        )

    def magnitude_cells(
        self, data: pd.DataFrame, params: CorrelationParams, ctx: AnalysisContext
    ) -> list[FloatArray]:
        """Each variable's values over the complete cases: ``sum`` shifted back by the public
        centre is their total, so a dominated variable is a dominated mean."""
        x = rows_used(data, params.variables).to_numpy(dtype=np.float64)
        return [x[:, j] for j in range(x.shape[1])]

    def _scale(self, params: CorrelationParams, ctx: AnalysisContext) -> tuple[FloatArray, ...]:
        bounds = np.array([ctx.dictionary.bounds(v) for v in params.variables])
        return (bounds[:, 0] + bounds[:, 1]) / 2, (bounds[:, 1] - bounds[:, 0]) / 2

    def local(self, data: pd.DataFrame, params: CorrelationParams, ctx: AnalysisContext) -> Arrays:
        centre, half = self._scale(params, ctx)
        x = rows_used(data, params.variables).to_numpy(dtype=np.float64)
        _check_subset(float(x.shape[0]), ctx, "the complete cases")
        z = (np.clip(x, centre - half, centre + half) - centre) / half
        upper = np.triu_indices(len(params.variables))
        return {
            "n": np.array(float(x.shape[0])),
            "sum": z.sum(axis=0),
            "cross": (z.T @ z)[upper],
        }

    def combine(
        self,
        records: Mapping[str, AggregateRecord],
        params: CorrelationParams,
        ctx: AnalysisContext,
    ) -> CorrelationResult:
        p = len(params.variables)
        n = float(pooled(records, "n"))
        total = pooled(records, "sum").reshape(p)
        cross = pooled(records, "cross").reshape(-1)
        if n < 3:
            raise ModelError(
                f"only {n:.0f} complete case(s) of {', '.join(params.variables)} at all sites; "
                "correlations need at least 3"
            )
        matrix = _correlations(n, total, cross, p)
        if matrix is None and pooled_noise_variance(records, "cross") > 0:
            raise ModelError(
                "in dp mode the noise on the cross-products swamps them: a variable's variance "
                "came out <= 0, so no correlation is possible at this epsilon; use a larger "
                "epsilon or more records (see the analysis's notes on accuracy)"
            )
        if matrix is None:
            raise ModelError(
                "a variable is constant over the complete cases; its correlations are undefined"
            )
        names = params.variables
        result = CorrelationResult(
            analysis="correlation",
            n=n,
            variables=list(names),
            matrix=_nested(matrix, names),
        )
        noise = self._noise_sd(records, n, total, cross, p)
        if noise is not None:
            result.noise_sd = _nested(noise, names)
            result.notes.append(
                f"correlations carry noise (largest sd {float(noise.max()):.3g}); see noise_sd"
            )
        return result

    @staticmethod
    def _noise_sd(
        records: Mapping[str, AggregateRecord],
        n: float,
        total: FloatArray,
        cross: FloatArray,
        p: float,
        draws: int = 200,
    ) -> FloatArray | None:
        """Sd of each correlation under the released noise, by re-drawing it ``draws`` times."""
        if not any(r.releases[k].noisy for r in records.values() for k in ("n", "sum", "cross")):
            return None
        rng = np.random.default_rng(20240601)

        def noise(name: str, shape: tuple[int, ...]) -> FloatArray:
            out = np.zeros((draws, *shape))
            for record in records.values():
                out += record.releases[name].redraw(rng, (draws, *shape))
            return out

        dn, ds, dc = noise("n", ()), noise("sum", total.shape), noise("cross", cross.shape)
        samples = []
        for k in range(draws):
            m = _correlations(n + dn[k], total + ds[k], cross + dc[k], int(p))
            if m is not None:
                samples.append(m)
        if len(samples) < 2:
            return np.full((int(p), int(p)), np.inf)
        return np.asarray(np.std(samples, axis=0, ddof=1), dtype=np.float64)


def _nested(matrix: FloatArray, names: list[str]) -> dict[str, dict[str, float]]:
    return {a: {b: float(matrix[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)}


def _correlations(n: float, total: FloatArray, cross: FloatArray, p: int) -> FloatArray | None:
    """Correlation matrix from pooled n, sums and upper-triangle cross-products (None if a
    variance is not positive)."""
    products = np.zeros((p, p))
    products[np.triu_indices(p)] = cross
    products = products + np.triu(products, 1).T
    scatter = products - np.outer(total, total) / n
    diagonal = np.diag(scatter)
    if n < 2 or not np.all(diagonal > _CONSTANT * np.abs(np.diag(products))):
        return None
    matrix = scatter / np.sqrt(np.outer(diagonal, diagonal))
    matrix = np.clip(matrix, -1.0, 1.0)
    np.fill_diagonal(matrix, 1.0)
    return np.asarray(matrix, dtype=np.float64)
