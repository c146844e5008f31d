"""Result objects: ``.summary`` is a DataFrame, ``.to_dict()`` the JSON contract, ``print()``
reads like statsmodels or lifelines, and ``.plot()`` draws it with matplotlib."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd

from protocol.budget import PureDP


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
        rho: zCDP rho the site charged for this result (releases with Gaussian noise).
    """

    name: str
    status: str
    records: float | None = None
    epsilon: PureDP = field(default_factory=lambda: PureDP(0.0))
    mode: str | None = None
    reason: str | None = None
    code: str | None = None
    rho: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.epsilon, PureDP):  # from JSON: a number
            self.epsilon = PureDP(float(self.epsilon))

    def to_json(self) -> dict[str, Any]:
        """The contribution as the JSON contract holds it (epsilon as a number)."""
        return {**asdict(self), "epsilon": self.epsilon.epsilon}


@dataclass
class PrivacySummary:
    """The noise a result carries and what it cost.

    ``epsilon_per_site`` is the largest epsilon any one site spent: each site's patients are
    distinct, so the guarantee per patient row is that site's epsilon (parallel composition).
    """

    mode: str
    mechanism: str = "none"
    epsilon_per_site: PureDP = field(default_factory=lambda: PureDP(0.0))
    guarantee: str = ""
    rho_per_site: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.epsilon_per_site, PureDP):  # from JSON: a number
            self.epsilon_per_site = PureDP(float(self.epsilon_per_site))

    def to_json(self) -> dict[str, Any]:
        """The summary as the JSON contract holds it (epsilon as a number)."""
        return {**asdict(self), "epsilon_per_site": self.epsilon_per_site.epsilon}


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


def _finite_or_nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def _holds_default(spec: Field[Any], value: Any) -> bool:
    factory = spec.default_factory
    default = spec.default if factory is MISSING else factory()
    if default is None or value is None:
        return value is default
    return bool(value == default)


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
    """Base of every result. Subclasses add their keys through :meth:`values`: by default
    their own fields, in the order they are declared."""

    #: Whether every cell of ``summary`` is a count (a histogram, a contingency table).
    count_table: ClassVar[bool] = False
    #: Fields left out of the JSON contract while they hold their default (a noise figure that
    #: only dp results carry, an optional grouping variable).
    optional_values: ClassVar[frozenset[str]] = frozenset()

    analysis: str
    n: float
    sites: list[SiteContribution] = field(default_factory=list)
    privacy: PrivacySummary = field(default_factory=lambda: PrivacySummary(mode="off"))
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def values(self) -> dict[str, Any]:
        """The analysis-specific keys of the JSON contract: by default the subclass's own
        fields by name, in the order they are declared (what :meth:`fields_from` reads back),
        less the ``optional_values`` that hold their default."""
        base = {f.name for f in fields(AnalysisResult)}
        out: dict[str, Any] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name in base or (
                spec.name in self.optional_values and _holds_default(spec, value)
            ):
                continue
            out[spec.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild the result from its JSON contract (what ``to_dict`` gave, after JSON).

        The common keys are read here; :meth:`fields_from` maps the analysis's own keys back
        to the class's fields. JSON's ``null`` stands for a non-finite number.
        """
        common: dict[str, Any] = {
            "analysis": str(data["analysis"]),
            "n": _finite_or_nan(data.get("n")),
            "sites": [SiteContribution(**s) for s in data.get("sites", [])],
            "privacy": PrivacySummary(**data.get("privacy", {"mode": "off"})),
            "timings": dict(data.get("timings", {})),
            "notes": list(data.get("notes", [])),
        }
        return cls(**common, **cls.fields_from(data))

    @classmethod
    def fields_from(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """The subclass's own fields from the contract: by default, the keys that share a
        field's name (``null`` back to NaN where the field defaults to a float)."""
        base = {f.name for f in fields(AnalysisResult)}
        out: dict[str, Any] = {}
        for spec in fields(cls):
            if spec.name in base or spec.name not in data:
                continue
            value = data[spec.name]
            if value is None and isinstance(spec.default, float):
                value = math.nan
            out[spec.name] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract: analysis, n, the analysis keys, sites, privacy, timings."""
        out: dict[str, Any] = {"analysis": self.analysis, "n": self.n}
        out.update(self.values())
        out["sites"] = [s.to_json() for s in self.sites]
        out["privacy"] = self.privacy.to_json()
        out["timings"] = dict(self.timings)
        out["notes"] = list(self.notes)
        return _jsonable(out)  # type: ignore[no-any-return]

    def __getitem__(self, key: str) -> Any:
        """A key of the JSON contract: ``result["mean"]``, ``result["sites"]``."""
        return self.to_dict()[key]

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
