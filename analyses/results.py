"""Result objects: ``.summary`` is a DataFrame, ``.to_dict()`` the JSON contract, ``print()``
reads like statsmodels or lifelines, and ``.plot()`` draws it with matplotlib."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

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


#: Columns that hold counts of records, events or people: printed as whole numbers.
COUNT_COLUMNS = frozenset(
    {"n", "count", "records", "at_risk", "events", "observed", "at risk at start"}
)


def show_count(value: Any, noisy: bool = False) -> str:
    """A count as a person reads it: ``599``, or ``~599`` when it carries dp noise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "?"
    if not math.isfinite(number):
        return "?"
    return f"{'~' if noisy else ''}{round(number) + 0:d}"  # + 0: never "-0"


def table_text(
    frame: pd.DataFrame, counts: Iterable[str] = COUNT_COLUMNS, all_counts: bool = False
) -> str:
    """``frame.to_string()`` with its count columns (or every column) as whole numbers.

    Only the printed text is rounded; ``.summary`` keeps the values as computed (a dp count is
    a noisy real number, and rounding it is for reading, not for further arithmetic).
    """
    names = set(counts)
    shown = frame.copy()
    for position, column in enumerate(frame.columns):
        if not (all_counts or str(column) in names):
            continue
        values = pd.to_numeric(frame.iloc[:, position], errors="coerce")
        if values.notna().any():
            shown.isetitem(position, values.round().astype("Int64"))
    return str(shown.to_string())


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

    #: Whether every cell of ``summary`` is a count (a histogram, a contingency table).
    count_table: ClassVar[bool] = False

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
        n = show_count(self.n, self.privacy.mode == "dp")
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

    def _table(self) -> str:
        """The summary as printed: counts as whole numbers."""
        return table_text(self.summary, all_counts=self.count_table)

    def __str__(self) -> str:
        return "\n".join([self._header(), self._table(), *self._footer()])

    def plot(self, ax: Any = None) -> Any:
        """Draw the result; returns the matplotlib Axes."""
        ax = self._axes(ax)
        self.summary.plot(kind="bar", ax=ax, legend=False)
        ax.set_title(self._header())
        return ax


class ResultView(Mapping[str, Any]):
    """A result received as JSON (from the HTTP API), with the result objects' conveniences.

    It is a read-only mapping of the JSON contract (``view["coefficients"]``), and adds
    ``.summary`` (a DataFrame of the analysis's main table), ``print()`` and ``.plot()``, so a
    researcher at the far end of the API reads results as they would in process.
    """

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract, as received."""
        return dict(self._data)

    @property
    def analysis(self) -> str:
        """The analysis's name."""
        return str(self._data.get("analysis", ""))

    def coef(self, term: str) -> float:
        """A model term's estimate (``glm``, ``cox``)."""
        return float(self._data["coefficients"][term]["estimate"])

    @property
    def summary(self) -> pd.DataFrame:
        """The main table: coefficients, counts, a correlation matrix, a survival curve, or the
        scalar results."""
        data = self._data
        if "coefficients" in data:
            return pd.DataFrame(data["coefficients"]).T.rename_axis("term")
        if "matrix" in data:
            return pd.DataFrame(data["matrix"])
        if "survival" in data and isinstance(data["survival"], list):
            keys = ("times", "survival", "ci_lower", "ci_upper", "at_risk", "events")
            return pd.DataFrame({k: data[k] for k in keys if k in data}).set_index("times")
        if "survival" in data:  # grouped curves: one block per level
            frames = {}
            for level, curve in data["survival"].items():
                frames[level] = pd.Series(curve, index=data["times"][level], name="survival")
            return pd.concat(frames, names=["group", "time"]).to_frame()
        if "counts" in data and "edges" in data:  # a histogram: one row per bin
            labels = [f"[{a:g}, {b:g})" for a, b in itertools.pairwise(data["edges"])]
            if labels:
                labels[-1] = labels[-1][:-1] + "]"
            counts = data["counts"]
            if isinstance(counts, dict):
                group = data.get("group") or "group"
                frame = pd.DataFrame({f"{group}={k}": v for k, v in counts.items()})
            else:
                frame = pd.DataFrame({"count": counts})
            frame.index = pd.Index(labels or None, name=data.get("variable"))
            return frame
        if "counts" in data and isinstance(data["counts"], dict):
            return pd.DataFrame(data["counts"]).T.rename_axis(data.get("rows") or "level")
        if "counts" in data:
            return pd.DataFrame({"count": data["counts"]})
        if "quantiles" in data:
            return pd.DataFrame({"quantile": data["quantiles"]}).rename_axis("prob")
        skip = {"sites", "privacy", "timings", "notes", "analysis"}
        scalars = {
            k: v for k, v in data.items() if k not in skip and not isinstance(v, dict | list)
        }
        return pd.DataFrame([scalars])

    def __str__(self) -> str:
        privacy = self._data.get("privacy", {})
        mode = privacy.get("mode", "?")
        sites = [s for s in self._data.get("sites", []) if s.get("status") == "ok"]
        n = show_count(self._data.get("n"), mode == "dp")
        head = f"<{self.analysis} result {len(sites)} sites, n={n}, {mode}>"
        all_counts = "counts" in self._data  # a histogram or a contingency table
        lines = [head, table_text(self.summary, all_counts=all_counts)]
        lines += [
            f"  {s['name']}: {s['status']}: {s.get('reason')}"
            for s in self._data.get("sites", [])
            if s.get("status") != "ok"
        ]
        lines += [f"  note: {note}" for note in self._data.get("notes", [])]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self).splitlines()[0]

    def plot(self, ax: Any = None) -> Any:
        """A forest plot of coefficients, a survival curve, or bars of the main table."""
        ax = AnalysisResult._axes(ax)
        data = self._data
        if "coefficients" in data:
            table = self.summary
            y = np.arange(len(table))
            est = table["estimate"].astype(float)
            ax.errorbar(
                est,
                y,
                xerr=[est - table["ci_lower"].astype(float), table["ci_upper"].astype(float) - est],
                fmt="o",
            )
            ax.axvline(0.0, color="grey", linewidth=0.8)
            ax.set_yticks(y, table.index)
        elif "survival" in data and isinstance(data["survival"], list):
            ax.step(data["times"], data["survival"], where="post")
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("time")
            ax.set_ylabel("survival")
        else:
            self.summary.select_dtypes("number").plot(kind="bar", ax=ax)
        ax.set_title(repr(self))
        return ax
