"""Result objects: ``.summary`` is a DataFrame, ``.to_dict()`` the JSON contract, ``print()``
reads like statsmodels or lifelines, and ``.plot()`` draws it with matplotlib."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class SiteContribution:
    """One site's part in a result (for the contribution report).

    Attributes:
        name: the site id.
        status: ``ok``, ``refused``, ``timeout``, ``error`` or ``disconnected``.
        records: records used (noisy in dp mode; ``None`` when the site gave nothing).
        epsilon: epsilon the site charged to its ledger for this result.
        mode: the privacy mode the site applied.
        reason: why the site refused or failed, in its own words.
        replayed: the site returned a stored reply to a repeated task (charged nothing again).
    """

    name: str
    status: str
    records: float | None = None
    epsilon: float = 0.0
    mode: str | None = None
    reason: str | None = None
    code: str | None = None


@dataclass
class PrivacySummary:
    """The noise a result carries and what it cost.

    ``epsilon_per_site`` is the largest epsilon any one site spent: each site's patients are
    distinct, so the guarantee per patient row is that site's epsilon (parallel composition).
    """

    mode: str
    mechanism: str = "none"
    epsilon_per_site: float = 0.0
    guarantee: str = ""


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


@dataclass
class AnalysisResult:
    """Base of every result. Subclasses add their keys through :meth:`values`."""

    analysis: str
    n: float
    sites: list[SiteContribution] = field(default_factory=list)
    privacy: PrivacySummary = field(default_factory=lambda: PrivacySummary(mode="off"))
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def values(self) -> dict[str, Any]:
        """The analysis-specific keys of the JSON contract."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract: analysis, n, the analysis keys, sites, privacy, timings."""
        out: dict[str, Any] = {"analysis": self.analysis, "n": self.n}
        out.update(self.values())
        out["sites"] = [asdict(s) for s in self.sites]
        out["privacy"] = asdict(self.privacy)
        out["timings"] = dict(self.timings)
        out["notes"] = list(self.notes)
        return _jsonable(out)  # type: ignore[no-any-return]

    @property
    def summary(self) -> pd.DataFrame:
        """The main table of the result."""
        return pd.DataFrame([self.values()])

    @property
    def contributing_sites(self) -> list[str]:
        """Names of the sites whose records are in the result."""
        return [s.name for s in self.sites if s.status == "ok"]

    def _header(self) -> str:
        sites = len(self.contributing_sites)
        n = f"{self.n:.0f}" if self.privacy.mode != "dp" else f"~{self.n:.0f}"
        return f"<{type(self).__name__} {sites} sites, n={n}, {self.privacy.mode}>"

    def _footer(self) -> list[str]:
        """Lines for the sites that gave nothing and the result's notes."""
        lines = [f"  {s.name}: {s.status}: {s.reason}" for s in self.sites if s.status != "ok"]
        lines.extend(f"  note: {note}" for note in self.notes)
        return lines

    @staticmethod
    def _axes(ax: Any) -> Any:
        """``ax``, or a new matplotlib Axes when none is given."""
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots()
        return ax

    def __str__(self) -> str:
        return "\n".join([self._header(), self.summary.to_string(), *self._footer()])

    def plot(self, ax: Any = None) -> Any:
        """Draw the result; returns the matplotlib Axes."""
        ax = self._axes(ax)
        self.summary.plot(kind="bar", ax=ax, legend=False)
        ax.set_title(self._header())
        return ax
