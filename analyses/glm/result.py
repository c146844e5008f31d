"""``GLMResult``: coefficients and fit statistics on the formula's own scale, read like
statsmodels' output."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analyses._lazy import stats
from analyses.base import AnalysisContext
from analyses.common import wald_row
from analyses.glm.formula import FloatArray, GLMModel, GLMParams
from analyses.results import AnalysisResult
from protocol.errors import ValidationError
from protocol.records import AggregateRecord

#: Parametric bootstrap draws for the dp noise in the standard errors.
BOOTSTRAP = 1000

LINKS = {"gaussian": "Identity", "binomial": "Logit", "poisson": "Log"}


@dataclass
class GLMResult(AnalysisResult):
    """A fitted generalised linear model, on the original scale of the formula's variables."""

    family: str = "gaussian"
    formula: str = ""
    response: str = ""
    terms: list[str] = field(default_factory=list)
    cov_params: list[list[float]] = field(default_factory=list)
    coefficients: dict[str, dict[str, float]] = field(default_factory=dict)
    deviance: float = float("nan")
    scale: float = 1.0
    df_resid: float = float("nan")
    iterations: int = 0
    rounds: int = 0
    converged: bool = False
    ci_level: float = 0.95
    noise_std_error: dict[str, float] = field(default_factory=dict)
    noise_method: str = ""

    #: Only a result with dp noise has these.
    optional_values = frozenset({"noise_std_error", "noise_method"})

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
            ("Link Function:", LINKS.get(self.family, "")),
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


@dataclass(frozen=True)
class GLMRound:
    """What the coordinator holds in one round of ``glm``: the sites' records, their pooled
    sums with X'WX unpacked (``h``), the model, its parameters and the round's context."""

    records: Mapping[str, AggregateRecord]
    pooled: dict[str, FloatArray]
    h: FloatArray
    model: GLMModel
    params: GLMParams
    ctx: AnalysisContext


def glm_result(
    step: GLMRound,
    beta_std: FloatArray,
    h_inv: FloatArray,
    deviance_std: float,
    n_total: float,
    iterations: int,
    converged: bool,
    noise_cov: FloatArray | None = None,
) -> GLMResult:
    records, model, params, ctx = step.records, step.model, step.params, step.ctx
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
    coefficients = {term: wald_row(beta[j], se[j], crit) for j, term in enumerate(model.columns)}
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
            f"parametric bootstrap (B={BOOTSTRAP}) of the last IRLS step over the "
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
