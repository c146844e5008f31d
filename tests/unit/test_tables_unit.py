"""Unit tests of ``table`` and ``mantel_haenszel``: parameters, edge cases, dp and results."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import StratifiedTable

import analyses  # noqa: F401  (registers every analysis)
from analyses.base import AnalysisContext
from analyses.registry import get_analysis
from analyses.testing import federate
from protocol.config import DataDictionary
from protocol.errors import ModelError, ValidationError
from protocol.records import Release
from tests import dp_noise

matplotlib.use("Agg")

DICTIONARY = DataDictionary.model_validate(
    {
        "variables": {
            "a": {"type": "categorical", "levels": [1, 2, 3], "labels": ["low", "mid", "high"]},
            "b": {"type": "binary"},
            "e": {"type": "binary"},
            "s": {"type": "categorical", "levels": [0, 1, 2]},
            "x": {"type": "numeric", "min": 0, "max": 1},
        }
    }
)


def frame(**columns: Any) -> pd.DataFrame:
    return pd.DataFrame({k: np.asarray(v, dtype=float) for k, v in columns.items()})


def expand(table: list[list[int]], rows: str, cols: str, levels: tuple[Any, Any]) -> pd.DataFrame:
    """Records whose cross-table over (rows, cols) is ``table``."""
    out = [
        (r, c)
        for i, r in enumerate(levels[0])
        for j, c in enumerate(levels[1])
        for _ in range(table[i][j])
    ]
    return frame(**{rows: [r for r, _ in out], cols: [c for _, c in out]})


#: The site engine's dp release, emulated with seeded noise (tests/dp_noise.py).
release_dp = functools.partial(dp_noise.release_dp, dictionary=DICTIONARY)


# ----------------------------------------------------------------------------- table


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"rows": "x"}, "rows 'x' is numeric"),
        ({"rows": "a", "cols": "x"}, "cols 'x' is numeric"),
        ({"rows": "a", "cols": "a"}, "two variables"),
        ({"rows": "a", "extra": 1}, "not a known field"),
    ],
)
def test_table_bad_parameters(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        get_analysis("table").parse_params(params, DICTIONARY)


def test_table_declares_counts_over_the_dictionary_levels() -> None:
    analysis = get_analysis("table")
    params = analysis.parse_params({"rows": "a", "cols": "b"}, DICTIONARY)
    spec = analysis.declare(params, AnalysisContext(DICTIONARY))
    counts = spec.arrays["counts"]
    assert (counts.shape, counts.kind, counts.sensitivity, counts.integer) == (
        (3, 2),
        "count",
        1.0,
        True,
    )
    # A site whose data lack a level still fills the declared shape.
    out = analysis.local(frame(a=[1, 1, np.nan], b=[0, 1, 1]), params, AnalysisContext(DICTIONARY))
    np.testing.assert_array_equal(out["counts"], [[1, 1], [0, 0], [0, 0]])


def test_table_with_an_empty_level_tests_the_others_and_says_so() -> None:
    frames = {
        "one": frame(a=[1, 1, 1, 3, 3, 1], b=[0, 1, 1, 0, 0, 0]),
        "two": frame(a=[3, 3, 1, 1], b=[1, 0, 0, 1]),
    }
    result = federate("table", frames, {"rows": "a", "cols": "b"}, DICTIONARY)
    # scipy 1.17: chi2_contingency on the non-empty rows [[3, 3], [3, 1]] (Yates: dof 1)
    reference = stats.chi2_contingency(np.array([[3.0, 3.0], [3.0, 1.0]]))
    assert result.chi2 == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-12)
    assert result.dof == 1 and result.correction is True
    assert any("a level(s) [2]" in note for note in result.notes)
    assert result.counts["2"] == {"0": 0.0, "1": 0.0}


def test_table_with_a_single_non_empty_column_gives_no_test_not_nan() -> None:
    frames = {"one": frame(a=[1, 2, 3, 3], b=[1, 1, 1, 1])}
    result = federate("table", frames, {"rows": "a", "cols": "b"}, DICTIONARY)
    assert result.chi2 is None and result.p is None
    assert any("no test of independence" in note for note in result.notes)
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["chi2"] is None
    assert "no test" in str(result)


def test_table_dp_tests_noisy_counts_and_says_so() -> None:
    rng = np.random.default_rng(1)
    frames = {
        f"site{i}": frame(a=rng.integers(1, 4, 500), b=rng.integers(0, 2, 500)) for i in range(4)
    }
    result = release_dp("table", frames, {"rows": "a", "cols": "b"}, 1.0, rng)
    # 4 sites x discrete Laplace(scale 1): variance 2 e^-1 / (1 - e^-1)^2 = 1.84 each
    per_site = Release("discrete_laplace", 1.0).variance()
    assert per_site == pytest.approx(2 * math.exp(-1) / (1 - math.exp(-1)) ** 2)
    assert result.noise_sd == pytest.approx(math.sqrt(4 * per_site))
    assert any("noisy counts" in note for note in result.notes)
    assert math.isfinite(result.chi2) and 0 <= result.p <= 1
    assert result.n == pytest.approx(2000, abs=40)


def test_table_result_reads_and_plots() -> None:
    frames = {"one": frame(a=[1, 2, 3, 3, 2, 1], b=[0, 1, 1, 0, 1, 0])}
    two_way = federate("table", frames, {"rows": "a", "cols": "b"}, DICTIONARY)
    assert list(two_way.summary.index) == ["1 (low)", "2 (mid)", "3 (high)"]
    assert two_way.summary.columns.name == "b"
    assert "independence: chi2 =" in str(two_way)
    assert two_way.plot().get_ylabel() == "a"
    one_way = federate("table", frames, {"rows": "a"}, DICTIONARY)
    assert list(one_way.summary["count"]) == [2.0, 2.0, 2.0]
    assert one_way.chi2 == 0.0 and one_way.p == pytest.approx(1.0)
    assert len(one_way.plot().patches) == 3


# ----------------------------------------------------------------------------- mantel_haenszel


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"exposure": "a", "outcome": "b"}, "has 3 levels"),
        ({"exposure": "x", "outcome": "b"}, "numeric"),
        ({"exposure": "b", "outcome": "b"}, "both 'b'"),
        ({"exposure": "e", "outcome": "b", "stratum": "e"}, "also the exposure"),
        ({"exposure": "e", "outcome": "b", "alpha": 1.5}, "alpha"),
    ],
)
def test_mh_bad_parameters(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        get_analysis("mantel_haenszel").parse_params(params, DICTIONARY)


def test_mh_leaves_out_empty_strata_and_matches_statsmodels_on_the_rest() -> None:
    tables = [[[10, 5], [4, 12]], [[7, 9], [3, 11]], [[20, 6], [8, 9]]]
    frames = {f"site{i}": expand(t, "e", "b", ([0, 1], [0, 1])) for i, t in enumerate(tables)}
    frames["empty"] = frame(e=[np.nan], b=[1])
    result = federate("mantel_haenszel", frames, {"exposure": "e", "outcome": "b"}, DICTIONARY)
    # statsmodels 0.15: StratifiedTable(tables) on the three non-empty sites
    reference = StratifiedTable([np.array(t, dtype=float) for t in tables])
    assert result.odds_ratio == pytest.approx(reference.oddsratio_pooled, rel=1e-12)
    assert result.equal_statistic == pytest.approx(reference.test_equal_odds().statistic, rel=1e-10)
    assert result.equal_dof == 2
    assert any("fewer than 2 records left out: empty" in note for note in result.notes)


def test_mh_strata_with_an_empty_margin_are_left_out_of_breslow_day() -> None:
    tables = [[[10, 5], [4, 12]], [[7, 9], [3, 11]], [[6, 0], [4, 0]]]
    frames = {f"site{i}": expand(t, "e", "b", ([0, 1], [0, 1])) for i, t in enumerate(tables)}
    result = federate("mantel_haenszel", frames, {"exposure": "e", "outcome": "b"}, DICTIONARY)
    # statsmodels 0.15: the third table adds 0 to MH's sums; Breslow-Day uses the first two
    full = StratifiedTable([np.array(t, dtype=float) for t in tables])
    informative = StratifiedTable([np.array(t, dtype=float) for t in tables[:2]])
    assert result.odds_ratio == pytest.approx(full.oddsratio_pooled, rel=1e-12)
    assert result.null_statistic == pytest.approx(full.test_null_odds().statistic, rel=1e-10)
    assert result.equal_statistic == pytest.approx(
        informative.test_equal_odds().statistic, rel=1e-10
    )
    assert result.equal_dof == 1
    assert any("Breslow-Day" in note for note in result.notes)


def test_mh_breslow_day_at_an_odds_ratio_of_exactly_one() -> None:
    tables = [[[10, 10], [10, 10]], [[5, 10], [10, 20]]]  # every stratum has OR 1
    frames = {f"site{i}": expand(t, "e", "b", ([0, 1], [0, 1])) for i, t in enumerate(tables)}
    result = federate("mantel_haenszel", frames, {"exposure": "e", "outcome": "b"}, DICTIONARY)
    assert result.odds_ratio == pytest.approx(1.0)
    assert result.equal_statistic == pytest.approx(0.0, abs=1e-12)
    assert result.equal_p == pytest.approx(1.0)


def test_mh_undefined_odds_ratio_is_a_model_error() -> None:
    frames = {"one": expand([[5, 0], [6, 0]], "e", "b", ([0, 1], [0, 1]))}
    with pytest.raises(ModelError, match="odds ratio is 0"):
        federate("mantel_haenszel", frames, {"exposure": "e", "outcome": "b"}, DICTIONARY)


def test_mh_by_a_stratum_variable_pools_each_level_across_sites() -> None:
    rng = np.random.default_rng(4)
    frames = {
        f"site{i}": frame(
            e=rng.integers(0, 2, 300), b=rng.integers(0, 2, 300), s=rng.integers(0, 3, 300)
        )
        for i in range(3)
    }
    params = {"exposure": "e", "outcome": "b", "stratum": "s"}
    result = federate("mantel_haenszel", frames, params, DICTIONARY)
    pooled = pd.concat(frames.values(), ignore_index=True)
    tables = [
        pd.crosstab(pooled.e[pooled.s == level], pooled.b[pooled.s == level]).to_numpy()
        for level in (0, 1, 2)
    ]
    # statsmodels 0.15: StratifiedTable(tables) with one pooled table per level of s
    reference = StratifiedTable(tables)
    assert result.odds_ratio == pytest.approx(reference.oddsratio_pooled, rel=1e-12)
    low, high = reference.oddsratio_pooled_confint()
    assert (result.ci_lower, result.ci_upper) == (
        pytest.approx(low, rel=1e-10),
        pytest.approx(high, rel=1e-10),
    )
    assert list(result.strata) == ["0", "1", "2"]


def test_mh_dp_interval_includes_the_noise() -> None:
    rng = np.random.default_rng(2)
    frames = {
        f"site{i}": frame(e=rng.integers(0, 2, 200), b=rng.integers(0, 2, 200)) for i in range(4)
    }
    params = {"exposure": "e", "outcome": "b"}
    exact = federate("mantel_haenszel", frames, params, DICTIONARY)
    noisy = release_dp("mantel_haenszel", frames, params, 0.2, rng)
    assert noisy.noise_sd_log > 0
    # Sampling and noise variances add on the log odds ratio.
    sampling = exact.std_error_log
    assert noisy.std_error_log == pytest.approx(
        math.sqrt(sampling**2 + noisy.noise_sd_log**2), rel=0.1
    )
    assert noisy.std_error_log > sampling
    assert any("noisy counts" in note for note in noisy.notes)


def test_mh_result_reads_and_draws_a_forest_plot() -> None:
    tables = [[[10, 5], [4, 12]], [[7, 9], [3, 11]]]
    frames = {f"site{i}": expand(t, "e", "b", ([0, 1], [0, 1])) for i, t in enumerate(tables)}
    result = federate("mantel_haenszel", frames, {"exposure": "e", "outcome": "b"}, DICTIONARY)
    summary = result.summary
    assert list(summary.index) == ["site0", "site1", "pooled (MH)"]
    assert list(summary.columns) == ["n", "odds_ratio", "ci_lower_95", "ci_upper_95"]
    assert summary.loc["site0", "odds_ratio"] == pytest.approx(10 * 12 / (5 * 4))
    text = str(result)
    assert "test of OR = 1 (Mantel-Haenszel)" in text and "Breslow-Day" in text
    ax = result.plot()
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["site0", "site1", "pooled (MH)"]
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["test_equal_odds"]["dof"] == 1
