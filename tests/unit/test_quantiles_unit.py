"""Unit tests of ``quantiles``: parameters, the search, its disclosure rule, dp and the result."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pytest

import analyses  # noqa: F401  (registers every analysis)
from analyses.base import AnalysisContext, NextRound
from analyses.driver import RoundTask, SiteAnswer, SiteReply
from analyses.quantile_search import DEPTH, GRID, SiteBoundaries, ValueGrid
from analyses.registry import get_analysis
from analyses.testing import federate
from protocol.config import DataDictionary
from protocol.errors import DisclosureError, ModelError, ValidationError
from protocol.records import AggregateRecord
from tests import dp_noise

matplotlib.use("Agg")

DICTIONARY = DataDictionary.model_validate(
    {
        "variables": {
            "x": {"type": "numeric", "min": -10, "max": 10},
            "g": {"type": "binary"},
        }
    }
)


def frames_of(*arrays: Any) -> dict[str, pd.DataFrame]:
    return {
        f"site{i}": pd.DataFrame({"x": np.asarray(a, dtype=float), "g": 0.0})
        for i, a in enumerate(arrays)
    }


#: The site engine's dp release, emulated with seeded noise (tests/dp_noise.py).
release_dp = functools.partial(dp_noise.release_dp, dictionary=DICTIONARY)


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"variable": "x", "probs": [0.5, 1.0]}, "strictly between 0 and 1"),
        ({"variable": "x", "probs": [0.0]}, "strictly between 0 and 1"),
        ({"variable": "x", "probs": [0.5, 0.5]}, "distinct"),
        ({"variable": "x", "candidates": 10}, "1, 3, 7, 15, 31, 63"),
        ({"variable": "g"}, "quantiles need a numeric variable"),
        ({"variable": "nope"}, "not in the data dictionary"),
    ],
)
def test_bad_parameters_say_what_is_allowed(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        get_analysis("quantiles").parse_params(params, DICTIONARY)


def test_site_rejects_a_malformed_round_state() -> None:
    analysis = get_analysis("quantiles")
    params = analysis.parse_params({"variable": "x"}, DICTIONARY)
    frame = frames_of([1.0, 2.0, 3.0])["site0"]
    bad_states: list[dict[str, Any]] = [
        {"brackets": []},
        {"brackets": [[5, 3, 4, []]]},  # lo > hi
        {"brackets": [[0, GRID, 4, [1]]]},  # 1 is not a point of level 4
        {"brackets": [[0, GRID, 4, [2**48] * 2]]},  # not increasing
        {"brackets": [[0, GRID, 60, []]]},  # no such level
        {"brackets": [[0, GRID, 4, [*range(2**48, GRID, 2**48), GRID]]]},  # too many
    ]
    for state in bad_states:
        ctx = AnalysisContext(DICTIONARY, "off", state=state)
        with pytest.raises(ValidationError, match="quantiles"):
            analysis.local(frame, params, ctx)
        with pytest.raises(ValidationError, match="quantiles"):  # what a site checks first
            analysis.parse_state(state, params, ctx)


def test_declared_shapes_depend_on_the_state_not_the_data() -> None:
    analysis = get_analysis("quantiles")
    params = analysis.parse_params({"variable": "x", "probs": [0.5]}, DICTIONARY)
    ctx = AnalysisContext(DICTIONARY, "off")
    state = analysis.initial_state(params, ctx).state
    ctx = AnalysisContext(DICTIONARY, "off", state=state)
    spec = analysis.declare(params, ctx)
    for values in ([], [1.0], list(np.linspace(-9, 9, 500))):
        AggregateRecord(spec, analysis.local(frames_of(values)["site0"], params, ctx))
    assert spec.arrays["below"].shape == (1, 15)
    dp = analysis.declare(params, AnalysisContext(DICTIONARY, "dp"))
    assert dp.arrays["counts"].shape == (100,)
    assert dp.arrays["counts"].sensitivity == 1.0 and dp.arrays["counts"].integer


# ----------------------------------------------------------------------------- exact search


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_continuous_data_equal_numpy_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sites = [rng.normal(0, 2, size) for size in (1, 37, 400)]
    probs = [0.001, 0.1, 0.25, 0.5, 0.6180339887, 0.9, 0.999]
    result = federate("quantiles", frames_of(*sites), {"variable": "x", "probs": probs}, DICTIONARY)
    # numpy 2.4: np.quantile(pooled, probs) (linear)
    expected = np.quantile(np.concatenate(sites), probs)
    for p, want in zip(probs, expected, strict=True):
        assert result.quantiles[p] == want
        assert result.exact[p]
    assert result.rounds <= 16


def test_ties_values_at_the_bounds_and_missing_values() -> None:
    sites = [[-10, -10, 10, np.nan, 3], [3, 3, 3], [10, 10, -10]]
    probs = [0.1, 0.3, 0.5, 0.7, 0.9]
    result = federate("quantiles", frames_of(*sites), {"variable": "x", "probs": probs}, DICTIONARY)
    pooled = np.array([v for s in sites for v in s], dtype=float)
    expected = np.quantile(pooled[~np.isnan(pooled)], probs)
    assert [result.quantiles[p] for p in probs] == list(expected)
    assert result.n == 10


def test_no_values_anywhere_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="no site has a value of x"):
        federate("quantiles", frames_of([np.nan], []), {"variable": "x"}, DICTIONARY)


def test_data_changing_between_rounds_is_a_model_error() -> None:
    analysis = get_analysis("quantiles")
    params = analysis.parse_params({"variable": "x", "probs": [0.5]}, DICTIONARY)
    frames = frames_of(np.linspace(-5, 5, 50), np.linspace(-3, 3, 30))
    ctx = AnalysisContext(DICTIONARY, "off")
    ctx = AnalysisContext(DICTIONARY, "off", state=analysis.initial_state(params, ctx).state)
    spec = analysis.declare(params, ctx)
    first = {s: AggregateRecord(spec, analysis.local(f, params, ctx)) for s, f in frames.items()}
    step = analysis.combine(first, params, ctx)
    assert isinstance(step, NextRound)
    json.dumps(step.state)  # the state travels as JSON
    assert set(step.state) == {"brackets"}  # the ranks and the pooled n stay in the memo
    ctx = AnalysisContext(DICTIONARY, "off", round=1, state=step.state, memo=step.memo)
    spec = analysis.declare(params, ctx)
    frames["site1"] = frames["site1"].iloc[:10]
    second = {s: AggregateRecord(spec, analysis.local(f, params, ctx)) for s, f in frames.items()}
    with pytest.raises(ModelError, match="changed"):
        analysis.combine(second, params, ctx)


# ----------------------------------------------------------------------------- sdc rule


def released_cells_are_safe(values: np.ndarray, points: set[int], min_cell: int) -> bool:
    """Every cell between consecutive released points holds 0 or >= min_cell values."""
    grid = ValueGrid(-10, 10)
    edges = sorted(points | {0, GRID})
    counts = np.diff([np.searchsorted(values, grid.x(k), side="right") for k in edges])
    return all(c == 0 or c >= min_cell for c in counts)


@pytest.mark.parametrize("seed", [0, 1])
def test_sdc_admitted_points_never_cut_a_small_cell_whatever_is_asked(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Sparse tails, ties and a dense middle.
    values = np.sort(np.concatenate([rng.normal(0, 1, 200).round(2), [-9.5, 8.0, 8.0, 9.9]]))
    site = SiteBoundaries(values, ValueGrid(-10, 10), min_cell=3)
    released: set[int] = set()
    for _ in range(400):  # an adversary's random points at random levels
        level = int(rng.integers(1, DEPTH + 1))
        step = 2 ** (DEPTH - level)
        k = int(rng.integers(1, GRID // step)) * step
        if site.admitted(k, DEPTH):
            released.add(k)
    grid = ValueGrid(-10, 10)
    for v in values[::7]:  # and points just around data values, where cells are smallest
        for k in (grid.ceil(float(v)) - 1, grid.ceil(float(v))):
            if site.admitted(k, DEPTH):
                released.add(k)
    assert len(released) > 50
    assert released_cells_are_safe(values, released, 3)
    # Admission is nested in the level: a point admitted at a level stays admitted below it.
    for k in list(released)[:20]:
        level = DEPTH - (k & -k).bit_length() + 1
        if site.admitted(k, level):
            assert all(site.admitted(k, deeper) for deeper in range(level, DEPTH + 1, 7))


def test_sdc_search_releases_only_safe_cells_and_bounds_the_quantile() -> None:
    rng = np.random.default_rng(7)
    # At least 3 records below the 5% and above the 95% quantile at every site (sdc).
    sites = [np.sort(rng.normal(0, 2, n).round(1)) for n in (70, 120, 300)]
    probs = [0.05, 0.5, 0.95]
    released: list[set[int]] = [set(), set(), set()]

    def watch(step: RoundTask, spec: Any, answers: Mapping[str, SiteAnswer]) -> None:
        for i in range(len(sites)):
            answer = answers[f"s{i}"]
            assert isinstance(answer, SiteReply)
            known = answer.record["known"]
            for b, (lo, hi, _, points) in enumerate(step.state["brackets"]):
                released[i] |= {lo, hi} | {k for j, k in enumerate(points) if known[b, j]}

    frames = {f"s{i}": pd.DataFrame({"x": values}) for i, values in enumerate(sites)}
    out = federate("quantiles", frames, {"variable": "x", "probs": probs}, DICTIONARY, "sdc",
                   on_round=watch)  # fmt: skip
    for values, points in zip(sites, released, strict=True):
        assert released_cells_are_safe(values, points, 3)
    expected = np.quantile(np.concatenate(sites), probs)
    for p, want in zip(probs, expected, strict=True):
        low, high = out.intervals[p]
        assert low <= want <= high
    assert out.intervals[0.5][1] - out.intervals[0.5][0] < 1.0


def test_sdc_values_tied_three_times_per_site_resolve_exactly() -> None:
    rng = np.random.default_rng(9)
    # Integers, each present 0 or at least 3 times at each site (ages in years, say).
    # At least 3 records below the 10% and above the 90% quantile at every site (sdc).
    sites = [np.repeat(rng.integers(-5, 6, size), 3) for size in (12, 20, 50)]
    probs = [0.1, 0.25, 0.5, 0.75, 0.9]
    result = federate(
        "quantiles", frames_of(*sites), {"variable": "x", "probs": probs}, DICTIONARY, mode="sdc"
    )
    # numpy 2.4: np.quantile(pooled, probs)
    expected = np.quantile(np.concatenate(sites).astype(float), probs)
    assert [result.quantiles[p] for p in probs] == list(expected)
    assert all(result.exact.values())


def test_sdc_site_with_too_few_values_refuses() -> None:
    frames = frames_of([1.0, 2.0], np.linspace(-5, 5, 40))
    with pytest.raises(DisclosureError, match="x has fewer than 3 values here"):
        federate("quantiles", frames, {"variable": "x"}, DICTIONARY, mode="sdc")


def test_sdc_unresolved_quantiles_say_so_in_notes() -> None:
    rng = np.random.default_rng(3)
    sites = [rng.normal(0, 1, 40), rng.normal(0, 1, 40)]  # continuous: no ties at all
    result = federate(
        "quantiles", frames_of(*sites), {"variable": "x", "probs": [0.5]}, DICTIONARY, mode="sdc"
    )
    want = float(np.quantile(np.concatenate(sites), 0.5))
    low, high = result.intervals[0.5]
    assert not result.exact[0.5]
    assert low <= want <= high and high - low < 1.0
    assert any("precision reached" in note for note in result.notes)


# ----------------------------------------------------------------------------- dp


def test_dp_expected_error_matches_the_noise() -> None:
    rng = np.random.default_rng(11)
    sites = [rng.normal(0, 2, 2000) for _ in range(4)]
    frames = frames_of(*sites)
    truth = np.quantile(np.concatenate(sites), [0.25, 0.5])
    errors, reported = [], []
    for _ in range(150):
        result = release_dp("quantiles", frames, {"variable": "x", "probs": [0.25, 0.5]}, 0.5, rng)
        errors.append([result.quantiles[p] - t for p, t in zip((0.25, 0.5), truth, strict=True)])
        reported.append([result.expected_error[p] for p in (0.25, 0.5)])
    rmse = np.sqrt(np.mean(np.square(errors), axis=0))
    ratio = rmse / np.mean(reported, axis=0)
    assert np.all((ratio > 0.75) & (ratio < 1.35)), ratio
    assert "noisy histogram" in result.notes[0]
    assert result.rounds == 1


# ----------------------------------------------------------------------------- result object


def test_result_reads_like_a_report_and_plots() -> None:
    rng = np.random.default_rng(5)
    result = federate(
        "quantiles",
        frames_of(rng.normal(0, 1, 50), rng.normal(1, 1, 50)),
        {"variable": "x", "probs": [0.1, 0.5, 0.9]},
        DICTIONARY,
    )
    assert list(result.summary.columns) == ["value", "lower", "upper", "exact"]
    assert list(result.summary.index) == [0.1, 0.5, 0.9]
    text = str(result)
    assert text.startswith("<QuantilesResult 2 sites, n=100, off>")
    assert "quantiles of x" in text
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["quantiles"]["0.5"] == result.quantiles[0.5]
    assert payload["exact"]["0.9"] is True
    ax = result.plot()
    assert ax.get_xlabel() == "x"
    assert len(ax.lines) >= 1
