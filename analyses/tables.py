"""Contingency tables: ``table`` (one- and two-way, with scipy's chi-squared test).

Every site releases cell counts over the dictionary's levels (never levels seen in its data), so
the pooled table is the sum of the sites' tables and every statistic is computed on it exactly as
scipy computes it on the pooled records (``mantel_haenszel`` lives in its own module).

DP calibration (add/remove one patient row at one site): the row falls in exactly one cell, so
a table of counts has L1 sensitivity 1 and each cell gets discrete Laplace noise of scale
``1 / epsilon``. With K sites each pooled cell carries noise of standard deviation about
``sqrt(2 K) / epsilon`` (about 2.8 records for four sites at epsilon 1), whatever the number of
records, so the relative error of a cell falls as ``1 / n`` and the tests are reliable when the
cells hold a few hundred records. Results computed on noisy counts say so in their notes.
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
from analyses.pushdown import AggregateQuery, ColumnOf, Pushdown, grouped_counts
from analyses.registry import analysis
from analyses.results import AnalysisResult
from protocol.config import DataDictionary
from protocol.errors import ValidationError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec

FloatArray = npt.NDArray[np.float64]


# ----------------------------------------------------------------------------- shared helpers


def _noise_notes(records: Mapping[str, AggregateRecord], name: str) -> tuple[float, bool]:
    """Summed noise variance of one pooled cell, and whether any site added noise."""
    variances = [r.releases[name].variance() for r in records.values()]
    return float(sum(variances)), any(v > 0 for v in variances)


# ----------------------------------------------------------------------------- table


class TableParams(Params):
    rows: str = Field(description="categorical or binary variable of the rows")
    cols: str | None = Field(default=None, description="categorical or binary variable")
    correction: bool = Field(
        default=True, description="Yates' continuity correction when dof == 1 (as scipy)"
    )


@dataclass
class TableResult(AnalysisResult):
    """A pooled one- or two-way table with its chi-squared test.

    A one-way table is tested for uniformity over the dictionary's levels
    (``scipy.stats.chisquare``); a two-way table for independence
    (``scipy.stats.chi2_contingency``). ``chi2`` and ``p`` are ``None`` when no test is possible
    (the notes say why).
    """

    count_table = True

    rows: str = ""
    counts: dict[str, Any] = field(default_factory=dict)
    chi2: float | None = None
    dof: int = 0
    p: float | None = None
    correction: bool = False
    test: str = ""
    row_names: list[str] = field(default_factory=list)
    col_names: list[str] = field(default_factory=list)
    table: list[Any] = field(default_factory=list)
    expected: list[Any] | None = None
    cols: str | None = None
    noise_sd: float = 0.0

    #: A one-way table has no ``cols``; only a noisy one has ``noise_sd``.
    optional_values = frozenset({"cols", "noise_sd"})

    @property
    def summary(self) -> pd.DataFrame:
        if self.cols is None:
            frame = pd.DataFrame({"count": self.table}, index=self.row_names)
        else:
            frame = pd.DataFrame(self.table, index=self.row_names, columns=self.col_names)
            frame.columns.name = self.cols
        frame.index.name = self.rows
        return frame

    def __str__(self) -> str:
        lines = [self._header(), self._table()]
        if self.chi2 is None:
            lines.append(f"{self.test}: no test")
        else:
            yates = ", Yates' correction" if self.correction else ""
            lines.append(
                f"{self.test}: chi2 = {self.chi2:.4f}, dof = {self.dof}, p = {self.p:.4g}{yates}"
            )
        lines.extend(self._footer())
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Heatmap of a two-way table; bars for a one-way table."""
        ax = self._axes(ax)
        table = np.asarray(self.table, dtype=np.float64)
        if self.cols is None:
            ax.bar(range(len(table)), table)
            ax.set_xticks(range(len(table)), self.row_names, rotation=30, ha="right")
            ax.set_xlabel(self.rows)
            ax.set_ylabel("records")
        else:
            image = ax.imshow(table, cmap="Blues", aspect="auto")
            ax.figure.colorbar(image, ax=ax, label="records")
            ax.set_xticks(range(table.shape[1]), self.col_names, rotation=30, ha="right")
            ax.set_yticks(range(table.shape[0]), self.row_names)
            ax.set_xlabel(self.cols)
            ax.set_ylabel(self.rows)
            threshold = table.max() / 2 if table.size else 0
            for (i, j), count in np.ndenumerate(table):
                colour = "white" if count > threshold else "black"
                ax.text(j, i, f"{count:.0f}", ha="center", va="center", color=colour)
        ax.set_title(self._header())
        return ax


@analysis("table")
class Table(Analysis[TableParams]):
    """One-way or two-way counts over the dictionary's levels, with a chi-squared test.

    Equal to ``scipy.stats.chi2_contingency(table, correction=...)`` on the pooled two-way table
    (Yates' correction applied only when dof == 1, as scipy) and to ``scipy.stats.chisquare`` on
    a pooled one-way table. Levels empty at every site are left out of the test and named in
    the notes (scipy would fail on their zero expected counts).

    Privacy: one count array (kind ``count``: the site engine's small-cell rule applies in sdc
    mode), L1 sensitivity 1 in dp mode. In dp mode chi2 and p are computed on the noisy counts
    (negative ones set to 0), and the notes give the noise per cell and the chi2 it adds on
    average (about the number of cells times ``2 K / epsilon^2`` over the mean expected count).
    """

    result_type = TableResult

    params_model = TableParams

    def variables(self, params: TableParams) -> set[str]:
        return {params.rows} | ({params.cols} if params.cols else set())

    def coarsened_variables(self, params: TableParams) -> set[str]:
        return self.variables(params)

    def check_params(self, params: TableParams, dictionary: DataDictionary) -> None:
        require_levels(dictionary, params.rows, "rows")
        if params.cols is not None:
            require_levels(dictionary, params.cols, "cols")
            if params.cols == params.rows:
                raise ValidationError(
                    f"rows and cols are both {params.rows!r}; a two-way table needs two variables"
                )

    def _shape(self, params: TableParams, dictionary: DataDictionary) -> tuple[int, ...]:
        rows = len(dictionary.levels(params.rows))
        if params.cols is None:
            return (rows,)
        return (rows, len(dictionary.levels(params.cols)))

    def declare(self, params: TableParams, ctx: AnalysisContext) -> RecordSpec:
        shape = self._shape(params, ctx.dictionary)
        return RecordSpec({"counts": ArraySpec(shape, kind="count", sensitivity=1.0, integer=True)})

    def local(self, data: pd.DataFrame, params: TableParams, ctx: AnalysisContext) -> Arrays:
        rows = one_hot(column(data, params.rows), ctx.dictionary.levels(params.rows))
        if params.cols is None:
            return {"counts": rows.sum(axis=0)}
        cols = one_hot(column(data, params.cols), ctx.dictionary.levels(params.cols))
        return {"counts": rows.T @ cols}

    def pushdown(self, params: TableParams, ctx: AnalysisContext, column: ColumnOf) -> Pushdown:
        import sqlalchemy as sa

        # A conformed categorical value is a dictionary level or NULL; rows with a NULL in
        # either key fall in no cell, as in ``local``.
        names = [params.rows] if params.cols is None else [params.rows, params.cols]
        keys = [column(name) for name in names]
        index = [
            {float(level): i for i, level in enumerate(ctx.dictionary.levels(name))}
            for name in names
        ]
        shape = self._shape(params, ctx.dictionary)
        query = AggregateQuery({"n": sa.func.count()}, [k.is_not(None) for k in keys], keys)
        return Pushdown((query,), lambda rows: grouped_counts(rows[0], shape, index), "table")

    def site_records(self, record: AggregateRecord) -> float:
        return float(record["counts"].sum())

    def combine(
        self, records: Mapping[str, AggregateRecord], params: TableParams, ctx: AnalysisContext
    ) -> TableResult:
        shape = self._shape(params, ctx.dictionary)
        pooled = np.zeros(shape)
        for record in records.values():
            pooled = pooled + record["counts"]
        notes: list[str] = []
        noise_var, noisy = _noise_notes(records, "counts")
        if noisy:
            if (pooled < 0).any():
                notes.append("negative noisy counts were set to 0 before testing")
            pooled = np.maximum(pooled, 0.0)
        row_levels = ctx.dictionary.levels(params.rows)
        result = TableResult(
            analysis="table",
            n=float(pooled.sum()),
            rows=params.rows,
            cols=params.cols,
            row_names=level_names(ctx.dictionary, params.rows),
            table=pooled.tolist(),
            notes=notes,
            noise_sd=math.sqrt(noise_var),
        )
        if params.cols is None:
            result.counts = {str(lv): float(c) for lv, c in zip(row_levels, pooled, strict=True)}
            self._test_one_way(pooled, params, result)
        else:
            col_levels = ctx.dictionary.levels(params.cols)
            result.col_names = level_names(ctx.dictionary, params.cols)
            result.counts = {
                str(r): {str(c): float(pooled[i, j]) for j, c in enumerate(col_levels)}
                for i, r in enumerate(row_levels)
            }
            self._test_two_way(pooled, (params.rows, params.cols), params, ctx.dictionary, result)
        if noisy and result.chi2 is not None:
            result.notes.append(self._noise_note(result, noise_var))
        return result

    @staticmethod
    def _test_one_way(pooled: FloatArray, params: TableParams, result: TableResult) -> None:
        result.test = "uniformity"
        result.dof = pooled.size - 1
        if pooled.sum() <= 0:
            result.notes.append(f"no records have a value of {params.rows!r}; no test")
            return
        chi2, p = stats.chisquare(pooled)
        result.chi2, result.p = float(chi2), float(p)
        result.expected = np.full(pooled.shape, pooled.sum() / pooled.size).tolist()

    @staticmethod
    def _test_two_way(
        pooled: FloatArray,
        names: tuple[str, str],
        params: TableParams,
        dictionary: DataDictionary,
        result: TableResult,
    ) -> None:
        result.test = "independence"
        keep_rows = pooled.sum(axis=1) > 0
        keep_cols = pooled.sum(axis=0) > 0
        for name, keep in zip(names, (keep_rows, keep_cols), strict=True):
            if not keep.all():
                empty = [lv for lv, k in zip(dictionary.levels(name), keep, strict=True) if not k]
                result.notes.append(
                    f"{name} level(s) {empty} have no records at any site; the test uses the "
                    "other levels"
                )
        if keep_rows.sum() < 2 or keep_cols.sum() < 2:
            result.notes.append(
                "fewer than two non-empty levels in the rows or the columns; no test of "
                "independence is possible"
            )
            return
        reduced = pooled[np.ix_(keep_rows, keep_cols)]
        test = stats.chi2_contingency(reduced, correction=params.correction)
        result.chi2, result.p, result.dof = float(test.statistic), float(test.pvalue), int(test.dof)
        result.correction = bool(params.correction and test.dof == 1)
        full = np.zeros(pooled.shape)
        full[np.ix_(keep_rows, keep_cols)] = test.expected_freq
        result.expected = [[float(v) for v in row] for row in full]

    @staticmethod
    def _noise_note(result: TableResult, noise_var: float) -> str:
        expected = np.asarray(result.expected, dtype=np.float64)
        positive = expected[expected > 0]
        inflation = float(np.sum(noise_var / positive)) if positive.size else float("nan")
        return (
            f"chi2 and p are computed on noisy counts (noise sd {math.sqrt(noise_var):.2f} "
            f"records per pooled cell); noise alone adds about {inflation:.2f} to chi2 on average"
        )
