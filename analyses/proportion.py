"""``proportion``: the pooled share of records with a binary variable equal to 1, with an interval.

Each site releases one array of two counts, its records with the variable at 0 and at 1 (a
record is in exactly one cell, so the L1 sensitivity is 1, and in sdc both cells must hold 0
or at least ``min_cell`` records: releasing the total instead would give away a cell of 1 or 2
by subtraction). The coordinator pools them and gives the proportion with a Wilson or a normal
(Wald) interval, as ``statsmodels.stats.proportion.proportion_confint`` computes them on the
pooled records. In dp mode the counts carry discrete Laplace noise; its variance, carried by the
delta method, is added to the normal interval's and reported as ``noise_sd`` (the Wilson
interval is then widened by the same amount).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from analyses._lazy import stats
from analyses.base import Analysis, AnalysisContext, Arrays, Params
from analyses.common import column, pooled, pooled_noise_variance
from analyses.registry import analysis
from analyses.results import AnalysisResult, show_count
from protocol.config import BinaryVariable, DataDictionary
from protocol.errors import ModelError, ValidationError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec


class ProportionParams(Params):
    variable: str = Field(description="a binary variable")
    method: Literal["wilson", "normal"] = "wilson"
    ci_level: float = Field(default=0.95, gt=0, lt=1)


@dataclass
class ProportionResult(AnalysisResult):
    """The pooled proportion of ``variable == 1`` among the records where it is known."""

    variable: str = ""
    successes: float = 0.0
    proportion: float = float("nan")
    std_error: float = float("nan")
    ci_lower: float = float("nan")
    ci_upper: float = float("nan")
    ci_level: float = 0.95
    method: str = "wilson"
    noise_sd: float = 0.0

    @property
    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([self.values()]).drop(columns=["variable"]).set_index("method")

    def __str__(self) -> str:
        noisy = self.privacy.mode == "dp"
        lines = [
            self._header(),
            f"{self.variable} = 1 in {show_count(self.successes, noisy)} of "
            f"{show_count(self.n, noisy)} records: {self.proportion:.4f} "
            f"({self.ci_level * 100:g}% {self.method} interval {self.ci_lower:.4f} to "
            f"{self.ci_upper:.4f})",
        ]
        if self.noise_sd:
            lines.append(f"  dp noise sd of the proportion: {self.noise_sd:.4f} (in the interval)")
        return "\n".join(lines + self._footer())

    def plot(self, ax: Any = None) -> Any:
        """The proportion with its interval."""
        ax = self._axes(ax)
        low, high = self.proportion - self.ci_lower, self.ci_upper - self.proportion
        ax.errorbar([self.proportion], [0], xerr=[[low], [high]], fmt="o", capsize=4)
        ax.set_xlim(0, 1)
        ax.set_yticks([])
        ax.set_xlabel(f"proportion of {self.variable} = 1")
        ax.set_title(self._header())
        return ax


@analysis("proportion")
class Proportion(Analysis[ProportionParams]):
    """Pooled proportion of a binary variable, with a Wilson or normal interval."""

    params_model = ProportionParams
    result_type = ProportionResult

    def variables(self, params: ProportionParams) -> set[str]:
        return {params.variable}

    def coarsened_variables(self, params: ProportionParams) -> set[str]:
        return {params.variable}  # a count of one public level

    def check_params(self, params: ProportionParams, dictionary: DataDictionary) -> None:
        if not isinstance(dictionary.variable(params.variable), BinaryVariable):
            raise ValidationError(
                f"variable {params.variable!r} is {dictionary.variable(params.variable).type}; "
                "a proportion needs a binary variable"
            )

    def declare(self, params: ProportionParams, ctx: AnalysisContext) -> RecordSpec:
        return RecordSpec({"counts": ArraySpec((2,), kind="count", sensitivity=1.0, integer=True)})

    def local(self, data: pd.DataFrame, params: ProportionParams, ctx: AnalysisContext) -> Arrays:
        values = column(data, params.variable)
        return {"counts": np.array([np.sum(values == 0), np.sum(values == 1)], dtype=np.float64)}

    def site_records(self, record: AggregateRecord) -> float:
        return float(np.sum(record["counts"]))

    def combine(
        self,
        records: Mapping[str, AggregateRecord],
        params: ProportionParams,
        ctx: AnalysisContext,
    ) -> ProportionResult:
        failures, successes = (max(0.0, float(c)) for c in pooled(records, "counts"))
        n = failures + successes
        if n <= 0:
            raise ModelError(f"no site has a value of {params.variable}; no proportion")
        p = successes / n
        z = float(stats.norm.ppf(1 - (1 - params.ci_level) / 2))
        # Noise: var(s) and var(f) each; p = s / (s + f), so by the delta method
        # var(p) ~ (f^2 var(s) + s^2 var(f)) / n^4, with var(s) = var(f) = the cell's variance.
        cell_var = pooled_noise_variance(records, "counts")
        noise_sd = math.sqrt(cell_var * (failures**2 + successes**2)) / n**2
        sampling = p * (1 - p) / n
        if params.method == "normal":
            half = z * math.sqrt(sampling + noise_sd**2)
            low, high = p - half, p + half
        else:  # Wilson's score interval, widened by the noise's share
            centre = (p + z * z / (2 * n)) / (1 + z * z / n)
            spread = z * math.sqrt(sampling + z * z / (4 * n * n)) / (1 + z * z / n)
            spread = math.hypot(spread, z * noise_sd)
            low, high = centre - spread, centre + spread
        return ProportionResult(
            analysis="proportion",
            n=n,
            variable=params.variable,
            successes=successes,
            proportion=p,
            std_error=math.sqrt(sampling + noise_sd**2),
            ci_lower=max(0.0, low),
            ci_upper=min(1.0, high),
            ci_level=params.ci_level,
            method=params.method,
            noise_sd=noise_sd,
        )
