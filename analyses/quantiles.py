"""Pooled quantiles (``quantiles``): exact by a search on counts, or from a noisy histogram in dp.

The pooled quantile is not the average of the sites' quantiles, and no site can compute it
alone; what sites can release are *counts*, which add up. So the coordinator finds the pooled
order statistics around each target by a search:

Exact modes (``off`` and ``sdc``)
    numpy's default (linear) quantile of n pooled values at probability p is
    ``x[j] + g (x[j+1] - x[j])`` with ``h = (n - 1) p``, ``j = floor(h)``, ``g = h - j`` (x sorted,
    0-based), so it needs the order statistics of rank j and j + 1. Candidate points lie on one
    public grid, ``x(k) = L + (U - L) k / 2^52`` for integers k (``x(0) = -inf``,
    ``x(2^52) = +inf``); the points of level ``l`` are the multiples of ``2^(52 - l)``. Each
    round, for every interval ``(x(lo), x(hi)]`` that holds a target rank, each site releases how
    many of its values fall in it and below each of up to ``candidates`` points of a finer
    level (15 by default: the interval narrows 16-fold a round), and whether its values in the
    interval are all one value (and that value). The coordinator sums the counts, keeps the
    sub-interval holding the target rank, and stops when every site's values in the interval
    are single values: their pooled multiset then gives the order statistic exactly. Round 0
    also gives n. Data recorded to a few decimals resolve in 3 to 5 rounds; continuous data need
    about one round per 4 bits of resolution.

Disclosure control (``sdc``)
    Counts below a point are cumulative, not table cells, but two of them differ by the count of
    a cell, and narrowing an interval until it holds 1 or 2 of a site's records locates them.
    Rule: each site has its own nested sets of admissible boundaries, one per grid level, that
    depend on its values and the public grid alone, never on the queries: level ``l`` keeps the
    boundaries of level ``l - 1`` and, scanning each of their cells from the left, admits a
    point of level ``l`` whenever the cell it closes and the rest of the cell both hold 0 or at
    least ``min_cell`` of the site's values. A site releases a count only at admissible
    boundaries (other points are marked unknown), and the coordinator cuts the pooled interval
    only at points every site admitted. So any count derivable from everything a site ever
    releases, whatever the coordinator asks and across runs on the same data, is a sum of
    cells each holding 0 or at least ``min_cell`` of its records; sparse tails merge into wider
    cells instead of blocking the search. When no point around a target is admitted by every
    site (after one retry one level finer than the last success), the quantile is reported to
    the precision reached: ``intervals`` gives bounds that certainly hold it, the value is
    interpolated within them, and the notes say so. "All one value" (and that value) is
    released only for a cell of at least ``min_cell`` records, as a table cell of that size
    would be. Limits: which points a site did not admit tells that a cell there would hold 1 to
    ``min_cell - 1`` records (what a suppressed table cell tells); sites with fewer than
    ``max(min_subset, min_cell)`` values refuse; tied values (ages in years) resolve exactly
    where every site holds 0 or at least ``min_cell`` records at the quantile's value, and
    continuous values resolve to the width of the cells every site can admit; new data at a
    site changes its boundaries, so repeated runs on changing data are for the site engine's
    differencing checks.

Differential privacy (``dp``)
    One round: each site releases a histogram on a fine public grid of ``bins`` equal bins
    between the dictionary's bounds (L1 sensitivity 1, discrete Laplace); the coordinator sums
    the histograms and interpolates the pooled cumulative counts linearly within the bin where
    they cross ``p N``. Not a per-site exponential mechanism: that releases each site's own
    quantile, and quantiles of parts cannot be pooled into the quantile of the whole, while
    histograms add. Accuracy: with K sites, per-site epsilon e and B bins, the rank error has sd
    about ``sqrt(K B / 2) / e`` records at the median (14 records for K = 4, B = 100, e = 1), so
    the error in probability is that over N (0.14 percentage points at N = 10,000), and the
    error in value is that over the local density of records; add the interpolation error
    within a bin of width (U - L) / B, second order in the width for smooth data but up to a
    bin width for values recorded in whole units or a density that jumps (measured on the
    heart data's ages in years, 100 bins of 1.2 years: about 0.5 years whatever epsilon). The
    result gives each quantile's expected error: the noise propagated through the local
    density, and the interpolation error estimated from the neighbouring bins' slope (it cannot
    see whole-unit values; the notes say so). Fewer bins mean less summed noise but coarser
    interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field, field_validator

from analyses.base import Analysis, AnalysisContext, Arrays, NextRound, Params, RoundState
from analyses.quantile_search import (
    DEPTH,
    GRID,
    MAX_ROUNDS,
    SiteBoundaries,
    ValueGrid,
    checked_brackets,
    lerp,
    levels_per_query,
    multiples,
    new_target,
    next_query,
    order_ranks,
    span,
)
from analyses.registry import analysis
from analyses.results import AnalysisResult
from protocol.config import DataDictionary, NumericVariable
from protocol.errors import DisclosureError, ModelError, ValidationError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec

FloatArray = npt.NDArray[np.float64]

_CANDIDATES = (1, 3, 7, 15, 31, 63)


class QuantilesParams(Params):
    variable: str = Field(description="numeric variable")
    probs: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75], min_length=1, max_length=99
    )
    candidates: int = Field(default=15, description="points per interval per round (exact)")
    bins: int = Field(default=100, ge=2, le=10_000, description="dp: public grid of bins")

    @field_validator("probs")
    @classmethod
    def _probs_valid(cls, probs: list[float]) -> list[float]:
        bad = [p for p in probs if not 0 < p < 1]
        if bad:
            raise ValueError(f"probabilities must lie strictly between 0 and 1, got {bad}")
        if len(set(probs)) != len(probs):
            raise ValueError(f"probabilities must be distinct, got {probs}")
        return probs

    @field_validator("candidates")
    @classmethod
    def _candidates_valid(cls, value: int) -> int:
        if value not in _CANDIDATES:
            raise ValueError(
                f"candidates must be one less than a power of two; use one of: "
                f"{', '.join(map(str, _CANDIDATES))}"
            )
        return value


@dataclass
class QuantilesResult(AnalysisResult):
    """Pooled quantiles of ``variable`` with bounds, and whether each one is exact.

    ``intervals[p]`` certainly holds the pooled quantile in exact modes (a single point when
    ``exact[p]``); in dp mode it is the estimate plus or minus 1.96 expected errors.
    """

    variable: str = ""
    quantiles: dict[float, float] = field(default_factory=dict)
    intervals: dict[float, list[float]] = field(default_factory=dict)
    exact: dict[float, bool] = field(default_factory=dict)
    method: str = ""
    rounds: int = 0
    expected_error: dict[float, float] | None = None

    #: Only dp results have an expected error.
    optional_values = frozenset({"expected_error"})

    @classmethod
    def fields_from(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        out = super().fields_from(data)
        for key in ("quantiles", "intervals", "exact", "expected_error"):
            if out.get(key) is not None:  # JSON turned the probabilities into text
                out[key] = {float(p): v for p, v in out[key].items()}
        return out

    @property
    def summary(self) -> pd.DataFrame:
        rows = []
        for p, value in self.quantiles.items():
            row: dict[str, Any] = {
                "prob": p,
                "value": value,
                "lower": self.intervals[p][0],
                "upper": self.intervals[p][1],
                "exact": self.exact[p],
            }
            if self.expected_error is not None:
                row["expected_error"] = self.expected_error[p]
            rows.append(row)
        return pd.DataFrame(rows).set_index("prob")

    def __str__(self) -> str:
        lines = [
            self._header(),
            f"quantiles of {self.variable} ({self.method}, {self.rounds} round(s))",
            self.summary.to_string(),
        ]
        lines.extend(self._footer())
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Each quantile as a point on the variable's axis (y: its probability), with bounds."""
        ax = self._axes(ax)
        probs = list(self.quantiles)
        values = np.array([self.quantiles[p] for p in probs])
        lower = values - np.array([self.intervals[p][0] for p in probs])
        upper = np.array([self.intervals[p][1] for p in probs]) - values
        ax.errorbar(values, probs, xerr=[lower, upper], fmt="o", capsize=4)
        for p, v in zip(probs, values, strict=True):
            ax.annotate(f"{p:g}", (v, p), textcoords="offset points", xytext=(6, -10))
        ax.set_xlabel(self.variable)
        ax.set_ylabel("probability")
        ax.set_ylim(0, 1)
        ax.set_title(self._header())
        return ax


# ----------------------------------------------------------------------------- analysis


class QuantilesState(RoundState):
    """Public state of a quantiles search round: the intervals to count in, each
    ``[lo, hi, level, points]`` on the public grid (see ``checked_brackets``). The pooled count
    and the target ranks stay in the coordinator's memo. dp mode has no state."""

    brackets: list[list[int | list[int]]] | None = None


@analysis("quantiles")
class Quantiles(Analysis[QuantilesParams]):
    """Pooled quantiles of a numeric variable (numpy's and pandas' default, linear).

    Exact in off and sdc modes (within sdc's rule; see the module's notes) by a search on
    counts below candidate points; in dp mode, from one noisy histogram on a public grid.
    """

    result_type = QuantilesResult

    params_model = QuantilesParams
    state_model = QuantilesState

    def variables(self, params: QuantilesParams) -> set[str]:
        return {params.variable}

    def check_state(
        self, state: QuantilesState, params: QuantilesParams, ctx: AnalysisContext
    ) -> None:
        if ctx.mode == "dp":
            if state.brackets is not None:
                raise ValidationError("quantiles state: brackets: dp mode carries no state")
            return
        checked_brackets(state.model_dump(), params.candidates)

    def check_params(self, params: QuantilesParams, dictionary: DataDictionary) -> None:
        var = dictionary.variable(params.variable)
        if not isinstance(var, NumericVariable):
            raise ValidationError(
                f"variable {params.variable!r} is {var.type}; quantiles need a numeric variable"
            )

    def initial_state(self, params: QuantilesParams, ctx: AnalysisContext) -> NextRound:
        if ctx.mode == "dp":
            return NextRound()
        levels = levels_per_query(params.candidates)
        first, final, step = multiples(0, GRID, levels)
        points = list(range(first, final + 1, step))
        return NextRound({"brackets": [[0, GRID, levels, points]]})

    def declare(self, params: QuantilesParams, ctx: AnalysisContext) -> RecordSpec:
        if ctx.mode == "dp":
            counts = ArraySpec((params.bins,), kind="count", sensitivity=1.0, integer=True)
            return RecordSpec({"counts": counts})
        b, m = len(checked_brackets(ctx.state, params.candidates)), params.candidates
        return RecordSpec(
            {
                "n": ArraySpec((), kind="count", sensitivity=1.0, integer=True),
                "inside": ArraySpec((b,), kind="count", integer=True),
                "below": ArraySpec((b, m), kind="count", integer=True),
                "known": ArraySpec((b, m)),
                "single": ArraySpec((b,)),
                "value": ArraySpec((b,)),
                "withheld": ArraySpec((b,)),
            }
        )

    # --------------------------------------------------------------------- site half
    def local(self, data: pd.DataFrame, params: QuantilesParams, ctx: AnalysisContext) -> Arrays:
        low, high = ctx.dictionary.bounds(params.variable)
        values = data[params.variable].to_numpy(dtype=np.float64, na_value=np.nan)
        values = np.sort(np.clip(values[~np.isnan(values)], low, high))
        if ctx.mode == "dp":
            edges = np.linspace(low, high, params.bins + 1)
            counts, _ = np.histogram(values, bins=edges)
            return {"counts": counts.astype(np.float64)}
        n = values.size
        smallest = max(ctx.sdc.min_subset, ctx.sdc.min_cell)
        if ctx.mode == "sdc" and 0 < n < smallest:
            raise DisclosureError(
                f"{params.variable} has fewer than {smallest} values here (the smallest subset "
                "this site releases counts of); quantile counts would disclose them"
            )
        if ctx.mode == "sdc":
            # A quantile with fewer than min_subset records below or above it brackets the
            # site's extreme patients (probs 0.0001 and 0.9999 hugged its smallest and largest
            # values); the coarse-to-fine search cannot help that, the probability can.
            k = ctx.sdc.min_subset
            extreme = [p for p in params.probs if p * n < k or (1 - p) * n < k]
            if extreme:
                raise DisclosureError(
                    f"refused by disclosure control: quantiles at {extreme} would fall among "
                    f"this site's {k} smallest or largest values; a quantile is released only "
                    f"with at least {k} records on each side here. Use less extreme "
                    "probabilities"
                )
        site = SiteBoundaries(
            values, ValueGrid(low, high), ctx.sdc.min_cell if ctx.mode == "sdc" else 0
        )
        brackets = checked_brackets(ctx.state, params.candidates)
        b_count, m = len(brackets), params.candidates
        out = {
            "n": np.array(float(n)),
            "inside": np.zeros(b_count),
            "below": np.zeros((b_count, m)),
            "known": np.zeros((b_count, m)),
            "single": np.zeros(b_count),
            "value": np.zeros(b_count),
            "withheld": np.zeros(b_count),
        }
        for b, (lo, hi, _, points) in enumerate(brackets):
            # Admission is nested in the level, so the deepest level admits the most points.
            if not (site.admitted(lo, DEPTH) and site.admitted(hi, DEPTH)):
                out["withheld"][b] = 1.0  # only a coordinator off the protocol asks this
                continue
            out["inside"][b] = site.count(lo, hi)
            for i, k in enumerate(points):
                if site.admitted(k, DEPTH):
                    out["known"][b, i] = 1.0
                    out["below"][b, i] = site.count(lo, k)
            single, value = site.single(lo, hi)
            out["single"][b], out["value"][b] = float(single), value
        return out

    def site_records(self, record: AggregateRecord) -> float:
        if "n" in record.arrays:
            return float(record["n"])
        return float(record["counts"].sum())

    # --------------------------------------------------------------------- coordinator half
    def combine(
        self, records: Mapping[str, AggregateRecord], params: QuantilesParams, ctx: AnalysisContext
    ) -> QuantilesResult | NextRound:
        if ctx.mode == "dp":
            return self._combine_histogram(records, params, ctx)
        return self._combine_search(records, params, ctx)

    def _combine_search(
        self, records: Mapping[str, AggregateRecord], params: QuantilesParams, ctx: AnalysisContext
    ) -> QuantilesResult | NextRound:
        state = ctx.state
        n = round(sum(float(r["n"]) for r in records.values()))
        targets = self._targets(n, params, ctx)
        for b, (lo, hi, level, points) in enumerate(checked_brackets(state, params.candidates)):
            group = [t for t in targets if t["status"] == "open" and (t["lo"], t["hi"]) == (lo, hi)]
            if group:
                self._advance(group, b, level, points, records, levels_per_query(params.candidates))
        grid = ValueGrid(*ctx.dictionary.bounds(params.variable))
        queries: dict[tuple[int, int], list[Any]] = {}
        for lo, hi in sorted({(t["lo"], t["hi"]) for t in targets if t["status"] == "open"}):
            group = [t for t in targets if t["status"] == "open" and (t["lo"], t["hi"]) == (lo, hi)]
            query = next_query(group, grid, params.candidates)
            if query is None:
                for target in group:
                    target["status"] = "limited"  # the grid's resolution is reached
            else:
                queries[(lo, hi)] = [lo, hi, *query]
        notes: list[str] = []
        if queries and ctx.round + 1 < MAX_ROUNDS:
            return NextRound({"brackets": list(queries.values())}, {"n": n, "targets": targets})
        if queries:
            notes.append(f"the search stopped after {MAX_ROUNDS} rounds")
        for target in targets:
            if target["status"] == "open":
                target["status"] = "limited"
        return self._search_result(n, targets, params, grid, ctx, notes)

    @staticmethod
    def _targets(n: int, params: QuantilesParams, ctx: AnalysisContext) -> list[dict[str, Any]]:
        """The order statistics sought: new ones in round 0, else the memo's, checked against
        this round's pooled count (a site that left or changed its data breaks the search)."""
        if ctx.memo.get("n") is None:
            if n == 0:
                raise ModelError(f"no site has a value of {params.variable}; no quantiles")
            wanted = sorted({r for p in params.probs for r in order_ranks(n, p)[:2]})
            return [new_target(r, n, levels_per_query(params.candidates)) for r in wanted]
        if n != ctx.memo["n"]:
            raise ModelError(
                f"{params.variable} had {ctx.memo['n']} values at the start of the search and "
                f"{n} in round {ctx.round}: a site left or its data changed; run it again"
            )
        return [dict(t) for t in ctx.memo["targets"]]

    @staticmethod
    def _advance(
        group: list[dict[str, Any]],
        b: int,
        level: int,
        points: list[int],
        records: Mapping[str, AggregateRecord],
        levels: int,
    ) -> None:
        """Move the target ranks of one interval on by this round's answers for it."""
        if any(r["withheld"][b] > 0 for r in records.values()):
            for target in group:
                target["status"] = "limited"
            return
        inside = round(sum(float(r["inside"][b]) for r in records.values()))
        if inside != group[0]["count"]:
            raise ModelError(
                f"an interval held {group[0]['count']} values in one round and {inside} in the "
                "next: a site left or its data changed between rounds; run it again"
            )
        holders = [r for r in records.values() if r["inside"][b] > 0]
        if all(r["single"][b] > 0 for r in holders):
            # Every site's values here are one value each: the pooled multiset is known.
            pairs = sorted((float(r["value"][b]), round(float(r["inside"][b]))) for r in holders)
            for target in group:
                seen, local_rank = 0, target["rank"] - target["below"]
                for value, count in pairs:
                    seen += count
                    if seen > local_rank:
                        target["value"], target["status"] = value, "exact"
                        break
            return
        lo, hi = group[0]["lo"], group[0]["hi"]
        # A point cuts the pooled interval only where every site admitted it.
        width = len(points)
        known = np.all([r["known"][b, :width] > 0 for r in records.values()], axis=0)
        below = np.sum([r["below"][b, :width] for r in records.values()], axis=0)
        cut = [(lo, 0)]
        cut += [(k, round(float(c))) for k, c, ok in zip(points, below, known, strict=True) if ok]
        cut.append((hi, inside))
        for target in group:
            if len(cut) == 2:
                # No common boundary: retry once one level below the last success, then stop.
                if target["step"] > 1:
                    target["step"] = 1
                else:
                    target["status"] = "limited"
                continue
            local_rank = target["rank"] - target["below"]
            i = next(i for i in range(1, len(cut)) if cut[i][1] > local_rank)
            target["lo"], target["hi"] = cut[i - 1][0], cut[i][0]
            target["below"] += cut[i - 1][1]
            target["count"] = cut[i][1] - cut[i - 1][1]
            target["level"], target["step"] = level, levels

    def _search_result(
        self,
        n: int,
        targets: list[dict[str, Any]],
        params: QuantilesParams,
        grid: ValueGrid,
        ctx: AnalysisContext,
        notes: list[str],
    ) -> QuantilesResult:
        by_rank: dict[int, tuple[float, float, float]] = {}
        for t in targets:
            if t["status"] == "exact":
                value = float(t["value"])
                by_rank[t["rank"]] = (value, value, value)
            else:
                a, b = span(t, grid)
                position = (t["rank"] - t["below"] + 0.5) / t["count"]
                by_rank[t["rank"]] = (a + position * (b - a), a, b)
        result = QuantilesResult(
            analysis="quantiles",
            n=float(n),
            variable=params.variable,
            method="exact search on counts",
            rounds=ctx.round + 1,
            notes=notes,
        )
        limited = []
        for p in params.probs:
            j, k, g = order_ranks(n, p)
            (vj, lj, uj), (vk, lk, uk) = by_rank[j], by_rank[k]
            result.quantiles[p] = lerp(vj, vk, g)
            result.intervals[p] = [lerp(lj, lk, g), lerp(uj, uk, g)]
            result.exact[p] = lj == uj and lk == uk
            if not result.exact[p]:
                limited.append(p)
        if limited:
            ranges = ", ".join(
                f"{p:g}: [{result.intervals[p][0]:.6g}, {result.intervals[p][1]:.6g}]"
                for p in limited
            )
            result.notes.append(
                "reported to the precision reached, not exactly: no finer boundary was "
                "admitted by every site under its disclosure rule (or the grid's resolution was "
                f"reached); the pooled quantile lies in {ranges}, and the value is interpolated "
                "within that range"
            )
        return result

    def _combine_histogram(
        self, records: Mapping[str, AggregateRecord], params: QuantilesParams, ctx: AnalysisContext
    ) -> QuantilesResult:
        low, high = ctx.dictionary.bounds(params.variable)
        width = (high - low) / params.bins
        counts = np.sum([r["counts"] for r in records.values()], axis=0).reshape(params.bins)
        cell_var = float(sum(r.releases["counts"].variance() for r in records.values()))
        total = float(counts.sum())
        if total <= 0:
            raise ModelError(
                f"the pooled (noisy) count of {params.variable} is {total:.0f}; too few records "
                "for quantiles at this epsilon"
            )
        # Raw noisy counts keep the cumulative sums unbiased; the running maximum makes them
        # monotone so that every probability has one crossing bin.
        cumulative = np.maximum.accumulate(np.cumsum(counts))
        result = QuantilesResult(
            analysis="quantiles",
            n=total,
            variable=params.variable,
            method=f"histogram of {params.bins} bins",
            rounds=1,
        )
        errors: dict[float, float] = {}
        for p in params.probs:
            target = p * total
            i = min(int(np.searchsorted(cumulative, target, side="left")), params.bins - 1)
            before = float(cumulative[i - 1]) if i > 0 else 0.0
            mass = float(cumulative[i]) - before
            share = (target - before) / mass if mass > 0 else 0.5
            value = low + width * (i + min(max(share, 0.0), 1.0))
            rank_var = cell_var * ((1 - p) ** 2 * (i + 1) + p**2 * (params.bins - i - 1))
            density = max(mass, 1.0) / width
            # Linear interpolation assumes a flat density in the bin; with slope f' the error
            # is about f' t (1 - t) w^2 / (2 f), the slope taken from the neighbouring bins.
            t = min(max(share, 0.0), 1.0)
            left, right = counts[max(i - 1, 0)], counts[min(i + 1, params.bins - 1)]
            slope = (right - left) / (2 * width * width)
            bias = abs(slope) * t * (1 - t) * width * width / (2 * density)
            error = math.sqrt(rank_var / density**2 + bias**2)
            result.quantiles[p] = value
            result.intervals[p] = [max(low, value - 1.96 * error), min(high, value + 1.96 * error)]
            result.exact[p] = False
            errors[p] = error
        result.expected_error = errors
        if cell_var > 0:
            result.notes.append(
                f"estimated from a pooled noisy histogram of {params.bins} bins of width "
                f"{width:.4g} (noise sd {math.sqrt(cell_var):.2f} records per pooled bin); "
                "expected_error combines the noise, through the local density, and the "
                "interpolation within a smooth bin; values recorded in whole units (ages in "
                f"years) or a density that jumps within a bin add up to a bin width ({width:.4g})"
            )
        else:
            result.notes.append(
                f"estimated from a pooled histogram of {params.bins} bins of width {width:.4g}; "
                "interpolating within a bin can be off by up to a bin width"
            )
        return result
