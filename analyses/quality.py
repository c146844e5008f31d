"""Data quality: ``quality``, a profile per site and variable, and the cross-site scorecard.

Each site counts, over the rows of its frame (consented, filtered; every row, missing values
included) and for each requested variable:

* ``missing``: no value at the source;
* ``out_of_range``: a value the dictionary does not allow (below ``min``, above ``max``, a level
  it does not list, or text where a number belongs), which the site set missing when it loaded
  its data;
* ``implausible``: an allowed value outside the variable's ``plausible`` range (still analysed);
* ``out_of_order``: the value breaks one of the dictionary's ``order_checks`` (both values
  present and ``earlier > later``);

and once per site ``duplicate_ids``: patient ids with several rows at the source.

Privacy. dp: one patient's row adds 1 to ``n``, to at most one of missing / out_of_range /
implausible (they exclude each other) and to ``out_of_order``, so the per-variable counts have
L1 sensitivity 2 per variable; ``n`` and ``duplicate_ids`` have sensitivity 1 (one patient).
The counts get discrete Laplace noise and are charged like any release. sdc: the counts are
exact. A variable whose profile holds a cell of 1 .. ``min_cell - 1`` records, directly or by
difference (``n`` minus the others, ``n`` minus ``out_of_order``), is withheld as a whole, as a
table with such a cell is refused: the result names the variable and the rule, never the count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field, field_validator

from analyses.base import DUPLICATE_ID, Analysis, AnalysisContext, Arrays, Params
from analyses.common import FloatArray
from analyses.registry import analysis
from analyses.results import AnalysisResult, show_count
from protocol.config import DataDictionary, NumericVariable
from protocol.errors import InternalError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec

#: the per-variable counts, in the order of the released array's columns
COUNTS = ("missing", "out_of_range", "implausible", "out_of_order")
#: a value's state at the source (the site's conform step): see ``site_node.harmonize``
_MISSING, _NOT_ALLOWED = 1, 2
MAX_VARIABLES = 200


class QualityParams(Params):
    variables: list[str] = Field(min_length=1, max_length=MAX_VARIABLES)

    @field_validator("variables")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"variables must be distinct; given more than once: {repeated}")
        return names


@dataclass
class QualityResult(AnalysisResult):
    """Quality profiles per site and variable, and the cross-site scorecard.

    ``profiles[site][variable]`` holds ``n``, ``missing``, ``out_of_range``, ``implausible``,
    ``out_of_order`` and ``usable`` (the share of records with an allowed, plausible value:
    ``(n - missing - out_of_range - implausible) / n``); a variable withheld by disclosure
    control holds ``withheld: true`` instead. ``duplicate_ids[site]`` counts patient ids with
    several rows. In dp every count is noisy (``noise_sd`` per count).
    """

    variables: list[str] = field(default_factory=list)
    profiles: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    duplicate_ids: dict[str, float] = field(default_factory=dict)
    noise_sd: float = 0.0

    optional_values = frozenset({"noise_sd"})

    @property
    def summary(self) -> pd.DataFrame:
        """One row per site and variable: the counts and the usable share."""
        rows = []
        for site, by_variable in self.profiles.items():
            for variable, profile in by_variable.items():
                rows.append({"site": site, "variable": variable, **profile})
        columns = ["site", "variable", "n", *COUNTS, "usable", "withheld"]
        frame = pd.DataFrame(rows, columns=columns)
        frame["withheld"] = [row.get("withheld") is True for row in rows]
        return frame.set_index(["site", "variable"])

    @property
    def scorecard(self) -> pd.DataFrame:
        """Sites by variables: each cell the usable share (NaN where withheld)."""
        table = self.summary["usable"].unstack("variable")
        return table.reindex(columns=self.variables)

    def __str__(self) -> str:
        noisy = self.privacy.mode == "dp"
        lines = [self._header()]
        for site, by_variable in self.profiles.items():
            duplicated = self.duplicate_ids.get(site, 0.0)
            shown = "withheld" if np.isnan(duplicated) else show_count(duplicated, noisy)
            lines.append(f"  {site} (duplicated patient ids: {shown})")
            for variable, p in by_variable.items():
                if p.get("withheld"):
                    lines.append(f"    {variable}: withheld by disclosure control")
                    continue
                counts = ", ".join(
                    f"{key.replace('_', ' ')} {show_count(p[key], noisy)}" for key in COUNTS
                )
                lines.append(
                    f"    {variable}: {show_count(p['n'], noisy)} records, {counts}; usable "
                    f"{p['usable']:.0%}"
                )
        return "\n".join([*lines, *self._footer()])

    def plot(self, ax: Any = None) -> Any:
        """A heat map of the scorecard: sites by variables, the usable share in each cell."""
        ax = self._axes(ax)
        table = self.scorecard
        values = table.to_numpy(dtype=np.float64)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(table.shape[1]), table.columns, rotation=30, ha="right")
        ax.set_yticks(range(table.shape[0]), table.index)
        for (i, j), share in np.ndenumerate(values):
            label = "withheld" if np.isnan(share) else f"{share:.0%}"
            ax.text(j, i, label, ha="center", va="center", fontsize=8)
        ax.figure.colorbar(image, ax=ax, label="usable share of records")
        ax.set_title(f"data quality: {self._header()}")
        return ax


def _usable(n: float, profile: Mapping[str, float]) -> float:
    if n <= 0:
        return float("nan")
    bad = profile["missing"] + profile["out_of_range"] + profile["implausible"]
    return float(min(1.0, max(0.0, (n - bad) / n)))


@analysis("quality")
class Quality(Analysis[QualityParams]):
    """Data-quality profiles (missing, out of range, implausible, out of order, duplicated
    ids) per site and variable, and their scorecard."""

    result_type = QualityResult
    params_model = QualityParams
    reads_source = True

    def variables(self, params: QualityParams) -> set[str]:
        return set(params.variables)

    def coarsened_variables(self, params: QualityParams) -> set[str]:
        return set(params.variables)  # only states against public ranges, never values

    def complete_case_variables(self, params: QualityParams) -> set[str]:
        return set()  # missing values are what it counts: every row of the frame

    def declare(self, params: QualityParams, ctx: AnalysisContext) -> RecordSpec:
        v = len(params.variables)
        arrays = {
            "n": ArraySpec((), kind="count", sensitivity=1.0, integer=True, budget_share=0.5),
            "counts": ArraySpec(
                (v, len(COUNTS)), kind="count", sensitivity=2.0 * v, integer=True, budget_share=2.0
            ),
            "duplicate_ids": ArraySpec(
                (), kind="count", sensitivity=1.0, integer=True, budget_share=0.5
            ),
        }
        if ctx.mode != "dp":
            arrays["withheld"] = ArraySpec((v + 1,), kind="statistic")
        return RecordSpec(arrays)

    def local(self, data: pd.DataFrame, params: QualityParams, ctx: AnalysisContext) -> Arrays:
        source = ctx.source
        if source is None:
            # In process (analyses.testing.federate) on conformed frames: missing is all that
            # can be told; nothing was set missing on load, and no patient ids are known.
            source = pd.DataFrame(
                {name: data[name].isna().to_numpy().astype(np.int8) for name in params.variables}
                | {DUPLICATE_ID: np.zeros(len(data), dtype=bool)},
                index=data.index,
            )
        if len(source) != len(data):
            raise InternalError("the quality analysis got source states for other rows")
        n = float(len(data))
        # Each order check's broken rows, once: both of its variables count them.
        broken = {}
        for check in ctx.dictionary.order_checks:
            earlier = data[check.earlier].to_numpy(dtype=np.float64, na_value=np.nan)
            later = data[check.later].to_numpy(dtype=np.float64, na_value=np.nan)
            with np.errstate(invalid="ignore"):
                broken[check] = earlier > later  # NaN compares False: both must be present
        counts = np.zeros((len(params.variables), len(COUNTS)))
        for i, name in enumerate(params.variables):
            backwards = np.zeros(len(data), dtype=bool)
            for check, rows in broken.items():
                if name in (check.earlier, check.later):
                    backwards |= rows
            counts[i] = self._profile(data, source, name, ctx.dictionary, backwards)
        duplicates = float(np.count_nonzero(source[DUPLICATE_ID].to_numpy()))
        arrays: Arrays = {"n": np.array(n), "counts": counts, "duplicate_ids": np.array(duplicates)}
        if ctx.mode == "dp":
            return arrays
        withheld = np.zeros(len(params.variables) + 1)
        arrays["withheld"] = withheld
        if ctx.mode != "sdc":
            return arrays  # off: no thresholds
        small = ctx.sdc.min_cell
        # One flag per variable, then one for duplicate_ids: withheld as a whole.
        for i, row in enumerate(counts):
            # Every count, and every one a reader can derive from n: the records with an
            # allowed, plausible value, and those not out of order.
            derived = [*row, n - row[0] - row[1] - row[2], n - row[3]]
            if any(0 < c < small for c in derived):
                withheld[i] = 1.0
                counts[i] = 0.0
        if 0 < duplicates < small:
            withheld[-1] = 1.0
            arrays["duplicate_ids"] = np.array(0.0)
        return arrays

    @staticmethod
    def _profile(
        data: pd.DataFrame,
        source: pd.DataFrame,
        name: str,
        dictionary: DataDictionary,
        backwards: npt.NDArray[np.bool_],
    ) -> FloatArray:
        state = source[name].to_numpy()
        values = data[name].to_numpy(dtype=np.float64, na_value=np.nan)
        missing = float(np.count_nonzero(state == _MISSING))
        not_allowed = float(np.count_nonzero(state == _NOT_ALLOWED))
        var = dictionary.variable(name)
        implausible = 0.0
        if isinstance(var, NumericVariable) and var.plausible is not None:
            low, high = var.plausible
            present = ~np.isnan(values)
            implausible = float(np.count_nonzero(present & ((values < low) | (values > high))))
        return np.array([missing, not_allowed, implausible, float(np.count_nonzero(backwards))])

    def combine(
        self, records: Mapping[str, AggregateRecord], params: QualityParams, ctx: AnalysisContext
    ) -> QualityResult:
        profiles: dict[str, dict[str, dict[str, Any]]] = {}
        duplicates: dict[str, float] = {}
        noise_var = 0.0
        for site, record in records.items():
            n = float(record["n"])
            counts = np.asarray(record["counts"], dtype=np.float64).reshape(-1, len(COUNTS))
            withheld = (
                np.asarray(record["withheld"]).reshape(-1)
                if "withheld" in record.arrays
                else np.zeros(len(params.variables) + 1)
            )
            by_variable: dict[str, dict[str, Any]] = {}
            for i, name in enumerate(params.variables):
                if withheld[i]:
                    by_variable[name] = {"n": n, "withheld": True}
                    continue
                profile: dict[str, Any] = {"n": n}
                profile.update(zip(COUNTS, map(float, counts[i]), strict=True))
                profile["usable"] = _usable(n, profile)
                by_variable[name] = profile
            profiles[site] = by_variable
            duplicates[site] = float("nan") if withheld[-1] else float(record["duplicate_ids"])
            noise_var = max(noise_var, record.releases["counts"].variance())
        n_total = float(sum(float(r["n"]) for r in records.values()))
        result = QualityResult(
            analysis="quality",
            n=n_total,
            variables=list(params.variables),
            profiles=profiles,
            duplicate_ids=duplicates,
            noise_sd=float(np.sqrt(noise_var)),
        )
        if any(p.get("withheld") for by in profiles.values() for p in by.values()):
            result.notes.append(
                "a withheld variable's profile would disclose a count below the site's "
                "smallest cell (directly or by difference); ask for a wider population"
            )
        return result
