"""``kaplan_meier``: pooled product-limit curves with Greenwood bands (and dp noise)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from analyses._lazy import stats
from analyses.registry import analysis
from analyses.results import AnalysisResult, table_text
from analyses.survival.counting import Counting, CountingParams, PooledCounts, at_risk_counts
from analyses.survival.grid import FloatArray


class KaplanMeierParams(CountingParams):
    ci_level: float = Field(default=0.95, gt=0, lt=1)


#: The per-time arrays of a curve, as the JSON contract holds them.
_CURVE_KEYS = ("times", "survival", "at_risk", "events", "ci_lower", "ci_upper", "noise_sd")


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
        out: dict[str, Any] = {key: self._key(key) for key in _CURVE_KEYS if key != "noise_sd"}
        if any("noise_sd" in c for c in self.curves.values()):
            out["noise_sd"] = self._key("noise_sd")
        out["median"] = self.medians()["all"] if self.group is None else self.medians()
        out["ci_level"] = self.ci_level
        out["time"] = self.time
        if self.group:
            out["group"] = self.group
        return out

    @classmethod
    def fields_from(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        out = super().fields_from(data)
        keys = [k for k in _CURVE_KEYS if k in data]
        if data.get("group"):
            levels = list(data["times"])
            out["curves"] = {lv: {k: list(data[k][lv]) for k in keys} for lv in levels}
        else:
            out["curves"] = {"all": {k: list(data[k]) for k in keys}}
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


def km_curve(
    deaths: FloatArray,
    censored: FloatArray,
    points: FloatArray,
    noise_var: float,
    ci_level: float,
) -> dict[str, list[float]]:
    """Product-limit estimate, Greenwood variance and log(-log) bands, as lifelines forms them."""
    at_risk = at_risk_counts(deaths, censored)
    deaths = np.minimum(deaths, at_risk)
    with np.errstate(divide="ignore", invalid="ignore"):
        # lifelines: cumsum(log(n - d) - log(n)) and cumsum(d / (n (n - d))) with inf -> 0.
        step = np.where(at_risk > 0, np.log(at_risk - deaths) - np.log(at_risk), 0.0)
        green = deaths / (at_risk * (at_risk - deaths))
    green = np.where(np.isfinite(green), green, 0.0)
    log_s = np.cumsum(step)
    variance = np.cumsum(green)
    if noise_var > 0:
        variance = variance + noise_var * km_noise_factor(deaths, at_risk)
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
            survival[shown] * np.sqrt(noise_var * km_noise_factor(deaths, at_risk)[shown])
        ).tolist()
    return curve


def km_noise_factor(deaths: FloatArray, at_risk: FloatArray) -> FloatArray:
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
class KaplanMeier(Counting[KaplanMeierParams]):
    """Pooled Kaplan-Meier curves with Greenwood log(-log) bands, optionally by group."""

    result_type = KaplanMeierResult

    params_model = KaplanMeierParams

    def _finish(self, pooled: PooledCounts[KaplanMeierParams]) -> KaplanMeierResult:
        params, counts, noise_var = pooled.params, pooled.counts, pooled.noise_var
        points, notes = pooled.grid.points(), pooled.notes
        labels = [str(level) for level in self._levels(params, pooled.ctx.dictionary)]
        curves = {
            (label if params.group else "all"): km_curve(
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
