"""``mantel_haenszel``: the pooled odds ratio over strata (the sites by default), its interval,
the test of a common odds ratio of 1 and Breslow-Day's test of homogeneity, as statsmodels'
``StratifiedTable`` computes them on the pooled 2 x 2 tables.

Each site releases its 2 x 2 table (per level of ``stratum`` when given): one record falls in
one cell, so the L1 sensitivity is 1 (discrete Laplace noise of scale ``1 / epsilon`` in dp).
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
from analyses.base import Analysis, AnalysisContext, Arrays, Params
from analyses.common import column, level_names, one_hot, require_levels
from analyses.registry import analysis
from analyses.results import AnalysisResult
from protocol.config import DataDictionary
from protocol.errors import ModelError, ValidationError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec

FloatArray = npt.NDArray[np.float64]


class MantelHaenszelParams(Params):
    exposure: str = Field(description="binary (or two-level categorical) exposure")
    outcome: str = Field(description="binary (or two-level categorical) outcome")
    stratum: str | None = Field(default=None, description="strata variable; default: the sites")
    correction: bool = Field(default=False, description="continuity correction in the MH test")
    tarone: bool = Field(default=False, description="Tarone's adjustment of Breslow-Day")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="1 - confidence level")


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


@dataclass
class MantelHaenszelResult(AnalysisResult):
    """Mantel-Haenszel pooled odds ratio over strata, its test and Breslow-Day's test.

    Each stratum's table is ``[[n(e0, o0), n(e0, o1)], [n(e1, o0), n(e1, o1)]]`` over the
    exposure's (rows) and outcome's (columns) levels in dictionary order, as statsmodels'
    ``StratifiedTable`` takes them; the odds ratio is that of the second levels against the
    first.
    """

    exposure: str = ""
    outcome: str = ""
    stratum: str | None = None
    odds_ratio: float = float("nan")
    ci_lower: float = float("nan")
    ci_upper: float = float("nan")
    std_error_log: float = float("nan")
    alpha: float = 0.05
    null_statistic: float = float("nan")
    null_p: float = float("nan")
    equal_statistic: float | None = None
    equal_p: float | None = None
    equal_dof: int = 0
    strata: dict[str, list[list[float]]] = field(default_factory=dict)
    noise_sd_log: float = 0.0

    def values(self) -> dict[str, Any]:
        return {
            "exposure": self.exposure,
            "outcome": self.outcome,
            "stratum": self.stratum if self.stratum else "site",
            "odds_ratio": self.odds_ratio,
            "ci_lower": self.ci_lower,
            "ci_upper": self.ci_upper,
            "std_error_log": self.std_error_log,
            "test_null_odds": {"statistic": self.null_statistic, "p": self.null_p, "dof": 1},
            "test_equal_odds": {
                "statistic": self.equal_statistic,
                "p": self.equal_p,
                "dof": self.equal_dof,
            },
            "strata": self.strata,
            "noise_sd_log": self.noise_sd_log,
            "alpha": self.alpha,
        }

    @classmethod
    def fields_from(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        out = super().fields_from(data)
        null, equal = data["test_null_odds"], data["test_equal_odds"]
        out.update(
            null_statistic=_nan(null["statistic"]),
            null_p=_nan(null["p"]),
            equal_statistic=equal["statistic"],
            equal_p=equal["p"],
            equal_dof=int(equal["dof"]),
        )
        return out

    def stratum_odds_ratios(self) -> pd.DataFrame:
        """Per-stratum odds ratios with Woolf intervals (0.5 added to tables with a zero)."""
        z = stats.norm.ppf(1 - self.alpha / 2)
        rows = []
        for name, table in self.strata.items():
            t = np.asarray(table, dtype=np.float64)
            if t.sum() == 0:
                continue
            if (t == 0).any():
                t = t + 0.5
            log_or = math.log(t[0, 0] * t[1, 1] / (t[0, 1] * t[1, 0]))
            se = math.sqrt(float(np.sum(1.0 / t)))
            rows.append(
                {
                    "stratum": name,
                    "n": float(np.sum(table)),
                    "odds_ratio": math.exp(log_or),
                    "ci_lower": math.exp(log_or - z * se),
                    "ci_upper": math.exp(log_or + z * se),
                }
            )
        return pd.DataFrame(rows).set_index("stratum") if rows else pd.DataFrame()

    @property
    def summary(self) -> pd.DataFrame:
        level = 100 * (1 - self.alpha)
        frame = self.stratum_odds_ratios()
        pooled = pd.DataFrame(
            [
                {
                    "stratum": "pooled (MH)",
                    "n": self.n,
                    "odds_ratio": self.odds_ratio,
                    "ci_lower": self.ci_lower,
                    "ci_upper": self.ci_upper,
                }
            ]
        ).set_index("stratum")
        frame = pd.concat([frame, pooled]) if not frame.empty else pooled
        return frame.rename(
            columns={"ci_lower": f"ci_lower_{level:g}", "ci_upper": f"ci_upper_{level:g}"}
        )

    def __str__(self) -> str:
        by = self.stratum or "site"
        lines = [
            self._header(),
            f"exposure {self.exposure}, outcome {self.outcome}, strata: {by} ({len(self.strata)})",
            self._table(),
            f"test of OR = 1 (Mantel-Haenszel): chi2 = {self.null_statistic:.4f}, dof = 1, "
            f"p = {self.null_p:.4g}",
        ]
        if self.equal_statistic is None:
            lines.append("test of equal odds ratios (Breslow-Day): not possible")
        else:
            lines.append(
                f"test of equal odds ratios (Breslow-Day): chi2 = {self.equal_statistic:.4f}, "
                f"dof = {self.equal_dof}, p = {self.equal_p:.4g}"
            )
        lines.extend(self._footer())
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Forest plot: per-stratum odds ratios and the pooled one, on a log axis."""
        import matplotlib.pyplot as plt

        frame = self.summary
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 1 + 0.4 * len(frame)))
        y = np.arange(len(frame))[::-1]
        lower, upper = frame.iloc[:, 2].to_numpy(), frame.iloc[:, 3].to_numpy()
        estimate = frame["odds_ratio"].to_numpy()
        colours = ["C0"] * (len(frame) - 1) + ["C3"]
        for yi, est, lo, hi, colour in zip(y, estimate, lower, upper, colours, strict=True):
            ax.plot([lo, hi], [yi, yi], color=colour)
            ax.plot([est], [yi], "D" if colour == "C3" else "s", color=colour)
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yticks(y, list(frame.index))
        ax.set_xlabel(f"odds ratio of {self.outcome} for {self.exposure}")
        ax.set_title(self._header())
        return ax


@analysis("mantel_haenszel")
class MantelHaenszel(Analysis[MantelHaenszelParams]):
    """Mantel-Haenszel pooled odds ratio of a binary exposure on a binary outcome over strata.

    The strata are the levels of ``stratum`` (each site releases one 2x2 table per level,
    pooled per level) or, when no stratum is given, the sites (each site's own 2x2 table is a
    stratum), which adjusts for site. Equal to statsmodels'
    ``StratifiedTable(tables)``: ``oddsratio_pooled``, ``oddsratio_pooled_confint`` (Robins,
    Breslow and Greenland's variance), ``test_null_odds(correction)`` and
    ``test_equal_odds(adjust=tarone)``. Strata with fewer than 2 records are left out (their
    terms are 0/0); strata with an empty row or column carry no information on the odds ratio
    and are left out of Breslow-Day's test (statsmodels gives NaN there); both are noted.

    Privacy: counts (kind ``count``, L1 sensitivity 1). In dp mode the odds ratio and tests
    are computed on the noisy counts (negative ones set to 0) and the noise's variance on the
    log odds ratio (first-order, from each cell's noise) is added to the sampling variance, so
    the interval is wider; the notes say how much. With K sites at epsilon e, each pooled cell
    has noise sd about ``sqrt(2 K) / e`` records, which moves the log odds ratio by about that
    over the smallest cells: negligible when every cell of a stratum holds hundreds of records,
    dominant when cells hold tens.
    """

    result_type = MantelHaenszelResult

    params_model = MantelHaenszelParams

    def variables(self, params: MantelHaenszelParams) -> set[str]:
        names = {params.exposure, params.outcome}
        return names | ({params.stratum} if params.stratum else set())

    def coarsened_variables(self, params: MantelHaenszelParams) -> set[str]:
        return self.variables(params)

    def check_params(self, params: MantelHaenszelParams, dictionary: DataDictionary) -> None:
        for what, name in (("exposure", params.exposure), ("outcome", params.outcome)):
            levels = require_levels(dictionary, name, what)
            if len(levels) != 2:
                raise ValidationError(
                    f"{what} {name!r} has {len(levels)} levels {levels}; it must have 2 "
                    "(binary or a two-level categorical)"
                )
        if params.exposure == params.outcome:
            raise ValidationError(f"exposure and outcome are both {params.exposure!r}")
        if params.stratum is not None:
            require_levels(dictionary, params.stratum, "stratum")
            if params.stratum in (params.exposure, params.outcome):
                raise ValidationError(
                    f"stratum {params.stratum!r} is also the exposure or the outcome"
                )

    def _shape(self, params: MantelHaenszelParams, dictionary: DataDictionary) -> tuple[int, ...]:
        if params.stratum is None:
            return (2, 2)
        return (len(dictionary.levels(params.stratum)), 2, 2)

    def declare(self, params: MantelHaenszelParams, ctx: AnalysisContext) -> RecordSpec:
        shape = self._shape(params, ctx.dictionary)
        return RecordSpec({"tables": ArraySpec(shape, kind="count", sensitivity=1.0, integer=True)})

    def local(
        self, data: pd.DataFrame, params: MantelHaenszelParams, ctx: AnalysisContext
    ) -> Arrays:
        levels = ctx.dictionary.levels
        exposure = one_hot(column(data, params.exposure), levels(params.exposure))
        outcome = one_hot(column(data, params.outcome), levels(params.outcome))
        if params.stratum is None:
            return {"tables": exposure.T @ outcome}
        strata = one_hot(column(data, params.stratum), levels(params.stratum))
        tables = np.einsum("ns,ne,no->seo", strata, exposure, outcome)
        return {"tables": tables}

    def site_records(self, record: AggregateRecord) -> float:
        return float(record["tables"].sum())

    def combine(
        self,
        records: Mapping[str, AggregateRecord],
        params: MantelHaenszelParams,
        ctx: AnalysisContext,
    ) -> MantelHaenszelResult:
        names, tables, cell_var = self._strata(records, params, ctx.dictionary)
        notes: list[str] = []
        noisy = bool(np.any(cell_var > 0))
        if noisy and (tables < 0).any():
            notes.append("negative noisy counts were set to 0")
        tables = np.maximum(tables, 0.0)
        totals = tables.sum(axis=(1, 2))
        small = totals < 2
        if small.any():
            dropped = [n for n, s in zip(names, small, strict=True) if s]
            notes.append(f"strata with fewer than 2 records left out: {', '.join(dropped)}")
        result = MantelHaenszelResult(
            analysis="mantel_haenszel",
            n=float(totals.sum()),
            exposure=params.exposure,
            outcome=params.outcome,
            stratum=params.stratum,
            alpha=params.alpha,
            strata={n: t.tolist() for n, t in zip(names, tables, strict=True)},
            notes=notes,
        )
        keep = ~small
        used, used_var = tables[keep], cell_var[keep]
        if used.shape[0] == 0:
            raise ModelError(
                "no stratum has 2 or more records with both exposure and outcome; the "
                "Mantel-Haenszel odds ratio is undefined"
            )
        self._fit(used, used_var, params, result)
        if noisy:
            result.notes.append(
                "odds ratio and tests are computed on noisy counts; the interval includes the "
                f"noise (sd {result.noise_sd_log:.3f} on the log odds ratio)"
            )
        return result

    def _strata(
        self,
        records: Mapping[str, AggregateRecord],
        params: MantelHaenszelParams,
        dictionary: DataDictionary,
    ) -> tuple[list[str], FloatArray, FloatArray]:
        """Stratum names, their 2x2 tables (K x 2 x 2) and each cell's noise variance."""
        if params.stratum is None:
            names = list(records)
            tables = np.array([r["tables"] for r in records.values()]).reshape(-1, 2, 2)
            var = np.array([r.releases["tables"].variance() for r in records.values()])
            return names, tables, np.broadcast_to(var[:, None, None], tables.shape).copy()
        shape = self._shape(params, dictionary)
        tables = np.zeros(shape)
        variance = 0.0
        for record in records.values():
            tables = tables + record["tables"]
            variance += record.releases["tables"].variance()
        names = level_names(dictionary, params.stratum)
        return names, tables, np.full(shape, variance)

    @staticmethod
    def _fit(
        tables: FloatArray,
        cell_var: FloatArray,
        params: MantelHaenszelParams,
        result: MantelHaenszelResult,
    ) -> None:
        a, b = tables[:, 0, 0], tables[:, 0, 1]
        c, d = tables[:, 1, 0], tables[:, 1, 1]
        n = a + b + c + d
        r_num = float(np.sum(a * d / n))
        s_den = float(np.sum(b * c / n))
        if r_num <= 0 or s_den <= 0:
            raise ModelError(
                "the Mantel-Haenszel odds ratio is "
                + ("0" if r_num <= 0 else "infinite")
                + ": no stratum has records in both "
                + ("diagonal" if r_num <= 0 else "off-diagonal")
                + " cells of its table"
            )
        odds = r_num / s_den
        # Robins, Breslow and Greenland (1986), as statsmodels' logodds_pooled_se.
        apd, ad, bc = a + d, a * d, b * c
        var_log = float(np.sum(apd * ad / n**2)) / r_num**2
        var_log += float(np.sum(apd * bc / n**2 + (1 - apd / n) * ad / n)) / (r_num * s_den)
        var_log += float(np.sum((1 - apd / n) * bc / n)) / s_den**2
        var_log /= 2
        # First-order noise variance of log OR from each cell's noise.
        d_r = np.stack([d / n - ad / n**2, -ad / n**2, -ad / n**2, a / n - ad / n**2], axis=1)
        d_s = np.stack([-bc / n**2, c / n - bc / n**2, b / n - bc / n**2, -bc / n**2], axis=1)
        gradient = d_r / r_num - d_s / s_den
        noise_var = float(np.sum(gradient**2 * cell_var.reshape(-1, 4)))
        se = math.sqrt(var_log + noise_var)
        z = float(stats.norm.ppf(1 - params.alpha / 2))
        result.odds_ratio = odds
        result.std_error_log = se
        result.noise_sd_log = math.sqrt(noise_var)
        result.ci_lower = math.exp(math.log(odds) - z * se)
        result.ci_upper = math.exp(math.log(odds) + z * se)

        # Mantel-Haenszel test of OR = 1 (statsmodels' test_null_odds).
        apb, apc, bpd, cpd = a + b, a + c, b + d, c + d
        deviation = abs(float(np.sum(a - apb * apc / n)))
        if params.correction:
            deviation -= 0.5
        denom = float(np.sum(apb * apc * bpd * cpd / (n**2 * (n - 1))))
        if denom <= 0:
            raise ModelError("every stratum has an empty row or column; no test of OR = 1")
        result.null_statistic = deviation**2 / denom
        result.null_p = float(stats.chi2.sf(result.null_statistic, 1))

        # Breslow-Day test of equal odds ratios, on strata with all margins non-empty.
        informative = (apb > 0) & (apc > 0) & (bpd > 0) & (cpd > 0)
        if (~informative).any():
            result.notes.append(
                f"{int((~informative).sum())} stratum/strata with an empty row or column left "
                "out of the Breslow-Day test"
            )
        k = int(informative.sum())
        if k < 2:
            result.notes.append("fewer than two informative strata; no Breslow-Day test")
            return
        a_, apb_, apc_ = a[informative], apb[informative], apc[informative]
        dma = (d - a)[informative]
        qa = 1 - odds
        qb = odds * (apb_ + apc_) + dma
        qc = -odds * apb_ * apc_
        root = np.sqrt(qb**2 - 4 * qa * qc)
        # The root statsmodels takes, in the form that avoids cancellation.
        with np.errstate(divide="ignore", invalid="ignore"):
            e11 = np.where(qb >= 0, 2 * qc / (-qb - root), (-qb + root) / (2 * qa))
        v11 = 1 / (1 / e11 + 1 / (apc_ - e11) + 1 / (apb_ - e11) + 1 / (dma + e11))
        statistic = float(np.sum((a_ - e11) ** 2 / v11))
        if params.tarone:
            statistic -= float(np.sum(a_ - e11)) ** 2 / float(np.sum(v11))
        result.equal_statistic = statistic
        result.equal_dof = k - 1
        result.equal_p = float(stats.chi2.sf(statistic, k - 1))
