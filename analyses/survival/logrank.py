"""``logrank``: the (multivariate) log-rank test on pooled counts (and dp noise)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from analyses._lazy import stats
from analyses.registry import analysis
from analyses.results import AnalysisResult
from analyses.survival.counting import Counting, CountingParams, PooledCounts, at_risk_counts
from analyses.survival.grid import FloatArray
from protocol.errors import ModelError


class LogrankParams(CountingParams):
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


def logrank_noise_cov(deaths: FloatArray, at_risk: FloatArray, cell_var: float) -> FloatArray:
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
class Logrank(Counting[LogrankParams]):
    """Log-rank test (lifelines' multivariate form) over the levels of ``group``."""

    result_type = LogrankResult

    params_model = LogrankParams

    def _finish(self, pooled: PooledCounts[LogrankParams]) -> LogrankResult:
        counts, noise_var = pooled.counts, pooled.noise_var
        params, notes = pooled.params, pooled.notes
        levels = [str(level) for level in self._levels(params, pooled.ctx.dictionary)]
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
        at_risk = at_risk_counts(deaths, censored)
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
            var = var + logrank_noise_cov(deaths, at_risk, noise_var)
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
