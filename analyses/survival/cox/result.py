"""``CoxResult``: coefficients, hazard ratios and noise, read like lifelines' output."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analyses._lazy import stats
from analyses.base import AnalysisContext
from analyses.common import pooled, wald_row
from analyses.results import AnalysisResult, show_count
from analyses.survival.cox.sums import CoxParams, CoxTerm, Stratum
from analyses.survival.grid import FloatArray, grid_for, grid_note, time_unit
from protocol.errors import ModelError
from protocol.records import AggregateRecord

#: Parametric bootstrap draws for the dp Cox noise estimate.
BOOTSTRAP_DRAWS = 200


@dataclass
class CoxResult(AnalysisResult):
    """A federated Cox proportional hazards model."""

    time: str = ""
    event: str = ""
    coefficients: dict[str, dict[str, float]] = field(default_factory=dict)
    log_likelihood: float = float("nan")
    iterations: int = 0
    converged: bool = False
    ties: str = "efron"
    strata_by_site: bool = False
    events: float = 0.0
    ci_level: float = 0.95

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


def cox_result(
    records: Mapping[str, AggregateRecord],
    params: CoxParams,
    ctx: AnalysisContext,
    terms: Sequence[CoxTerm],
    beta: FloatArray,
    info: FloatArray,
    loglik: float,
    iteration: int,
    strata: Sequence[Stratum],
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
        entry = wald_row(estimate[j], se[j], z_crit)
        entry["hazard_ratio"] = float(np.exp(estimate[j]))
        if noise_var is not None:
            entry["noise_sd"] = float(np.sqrt(noise[j]))
        coefficients[term.name] = entry
    grid = grid_for(params, ctx)
    notes = [grid_note(grid, params, ctx, time_unit(ctx.dictionary, params.time))]
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
            f"bootstrap of {BOOTSTRAP_DRAWS} draws); log_likelihood is that of the noisy sums"
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
        n=float(pooled(records, "n")),
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
