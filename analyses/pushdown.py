"""Aggregates an analysis can have computed where the data lives (pushdown).

An analysis that supports it returns, from :meth:`Analysis.pushdown`, a :class:`Pushdown`:
SQL aggregate queries over the site's dictionary variables and a function that turns their
rows into the same arrays :meth:`Analysis.local` would compute from a frame. The analysis
writes SQLAlchemy expressions over ``column(name)``: a dictionary variable as the site's
source holds it after conforming (a double, NULL where missing or not allowed by the
dictionary). A value is therefore always within the dictionary's bounds or among its levels,
so the clamping ``local`` does in dp is already done. Every constant (edges, centres,
coefficients) is a bound parameter.

The site runs the queries on the rows a task may use (its row restriction and the task's
filter applied in the same query), so only aggregates leave the source. The site's privacy
engine then treats the arrays exactly as it treats ``local``'s: this module changes where the
sums are computed, never what is released.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analyses.base import Arrays

#: A dictionary variable as a SQL expression (double precision, NULL when missing).
ColumnOf = Callable[[str], Any]


@dataclass(frozen=True)
class AggregateQuery:
    """One ``SELECT keys..., aggregates... WHERE ... GROUP BY keys`` over the task's rows.

    Attributes:
        aggregates: label -> a SQL aggregate expression (``sa.func.sum(...)``, ``count()``).
        where: conditions on the rows besides the task's (complete cases, say).
        keys: grouping expressions (empty: one row).
        stages: per-row values computed once before aggregating, each stage a mapping of
            name -> expression over the previous stage's names (``sa.column(name)``), the
            first over ``column(variable)``. With stages, ``keys`` and ``aggregates`` read
            the last stage's names; each stage keeps the earlier stages' names.
    """

    aggregates: Mapping[str, Any]
    where: Sequence[Any] = ()
    keys: Sequence[Any] = ()
    stages: Sequence[Mapping[str, Any]] = ()

    @property
    def width(self) -> int:
        """The most columns one SELECT of the compiled query holds (each stage carries the
        earlier stages' names)."""
        carried = sum(len(stage) for stage in self.stages) + len(self.keys)
        return max(len(self.aggregates) + len(self.keys), carried)


#: The widest SELECT a site sends to its source: PostgreSQL allows 1,664 columns, SQLite 2,000
#: by default. A wider query (a GLM round with more than 43 design columns, a Cox round with
#: Efron's ties and more than 29) is computed in memory instead.
MAX_COLUMNS = 1000

#: One query's result: a row per group, its keys then its aggregates in order.
Rows = list[tuple[Any, ...]]


@dataclass(frozen=True)
class Pushdown:
    """What an analysis asks of a SQL source and how the answers make its arrays."""

    queries: tuple[AggregateQuery, ...]
    finish: Callable[[list[Rows]], Arrays]
    #: a short name for logs and benchmarks
    label: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


def number(value: Any) -> float:
    """A SQL aggregate's value as a float: NULL (a sum over no rows) is 0."""
    return 0.0 if value is None else float(value)


def clamp(expression: Any, low: float, high: float) -> Any:
    """``expression`` limited to [low, high], the bounds bound as parameters."""
    import sqlalchemy as sa

    low_value = sa.bindparam(None, float(low), type_=sa.Double)
    high_value = sa.bindparam(None, float(high), type_=sa.Double)
    return sa.case(
        (expression < low_value, low_value),
        (expression > high_value, high_value),
        else_=expression,
    )


def constant(value: float) -> Any:
    """A public number as a bound parameter."""
    import sqlalchemy as sa

    return sa.bindparam(None, float(value), type_=sa.Double)


def grouped_counts(
    rows: Rows, shape: tuple[int, ...], index: Sequence[Mapping[float, int]]
) -> Arrays:
    """Counts from grouped rows (keys then a count) into an array of ``shape``; ``index`` maps
    each key's value to its position (rows whose key is not listed are dropped)."""
    counts = np.zeros(shape)
    for row in rows:
        keys, count = row[:-1], row[-1]
        try:
            position = tuple(index[i][float(k)] for i, k in enumerate(keys))
        except (KeyError, TypeError):
            continue
        counts[position] += number(count)
    return {"counts": counts}
