"""Unit tests of ``ttest`` and ``correlation``: parameters, edge cases, sdc, dp and results."""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import analyses  # noqa: F401  (registers every analysis)
from analyses.base import AnalysisContext
from analyses.registry import get_analysis
from analyses.testing import federate
from protocol.config import DataDictionary
from protocol.errors import DisclosureError, ModelError, ValidationError
from tests import dp_noise
from tests.rounding import federate_perturbed

matplotlib.use("Agg")

DICTIONARY = DataDictionary.model_validate(
    {
        "variables": {
            "x": {"type": "numeric", "min": 0, "max": 100},
            "y": {"type": "numeric", "min": -50, "max": 50},
            "z": {"type": "numeric", "min": 0, "max": 1},
            "g": {"type": "categorical", "levels": [1, 2], "labels": ["control", "treated"]},
            "c": {"type": "categorical", "levels": [1, 2, 3]},
        }
    }
)


#: The site engine's dp release, emulated with seeded noise (tests/dp_noise.py).
release_dp = functools.partial(dp_noise.release_dp, dictionary=DICTIONARY)


def two_groups(rng: np.random.Generator, n: int, shift: float = 5.0) -> pd.DataFrame:
    g = rng.integers(1, 3, n).astype(float)
    return pd.DataFrame({"x": np.clip(rng.normal(50 + shift * (g - 1), 10), 0, 100), "g": g})


# ----------------------------------------------------------------------------- ttest


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"variable": "x", "group": "c"}, "has 3 levels"),
        ({"variable": "x", "group": "y"}, "group 'y' is numeric"),
        ({"variable": "g", "group": "g"}, "needs a numeric variable"),
        ({"variable": "x", "group": "g", "alpha": 0}, "alpha"),
    ],
)
def test_ttest_bad_parameters(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        get_analysis("ttest").parse_params(params, DICTIONARY)


def test_ttest_declares_sensitivities_from_the_bounds() -> None:
    spec = dp_noise.declared("ttest", {"variable": "x", "group": "g"}, DICTIONARY)
    assert spec.arrays["n"].sensitivity == 1.0
    assert spec.arrays["sum"].sensitivity == 50.0  # (100 - 0) / 2
    assert spec.arrays["sumsq"].sensitivity == 2500.0


def test_ttest_equals_scipy_with_a_missing_group_at_one_site() -> None:
    rng = np.random.default_rng(0)
    frames = {"a": two_groups(rng, 80), "b": two_groups(rng, 30)}
    frames["b"]["g"] = 2.0  # site b holds only the treated group
    frames["b"].loc[3, "x"] = np.nan
    result = federate("ttest", frames, {"variable": "x", "group": "g"}, DICTIONARY)
    pooled = pd.concat(frames.values(), ignore_index=True).dropna()
    # scipy 1.17: stats.ttest_ind(x[g == 2], x[g == 1], equal_var=False)
    reference = stats.ttest_ind(pooled.x[pooled.g == 2], pooled.x[pooled.g == 1], equal_var=False)
    assert result.t == pytest.approx(reference.statistic, rel=1e-10)
    assert result.dof == pytest.approx(reference.df, rel=1e-10)
    assert result.n == len(pooled)


def test_ttest_group_with_one_record_is_a_model_error() -> None:
    frames = {"a": pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "g": [1.0, 1.0, 1.0, 2.0]})}
    with pytest.raises(ModelError, match="g = 2 \\(treated\\) has fewer than 2 records"):
        federate("ttest", frames, {"variable": "x", "group": "g"}, DICTIONARY)


def test_ttest_constant_values_are_a_model_error() -> None:
    frames = {"a": pd.DataFrame({"x": [5.0] * 6, "g": [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]})}
    with pytest.raises(ModelError, match="constant"):
        federate("ttest", frames, {"variable": "x", "group": "g"}, DICTIONARY)


def test_constant_values_are_named_constant_whatever_the_rounding() -> None:
    # A constant's pooled sum of squared deviations is a rounding residue of either sign (BLAS
    # sums in a machine-dependent order). Before the fix, 3.7 at 3 x 50 records gave t = 0.0
    # instead of "constant", 59.9 at 3 x 301 gave t = -4e-07, and 0.1 a correlation of -6e-11.
    messages = []
    for value, n, draw in itertools.product((0.1, 3.7, 12.3, 59.9, 77.7), (50, 301), (None, 1)):
        g = np.tile([1.0, 2.0], n)[:n]
        frames = {s: pd.DataFrame({"x": np.full(n, value), "y": g * 10, "g": g}) for s in "abc"}
        for name, params in (
            ("ttest", {"variable": "x", "group": "g"}),
            ("correlation", {"variables": ["x", "y"]}),
        ):
            rng = None if draw is None else np.random.default_rng(draw)
            try:
                result = federate_perturbed(name, frames, params, DICTIONARY, rng)
                messages.append(f"{name} of {value} x {n}: a result {result.values()}")
            except ModelError as err:
                messages.append(str(err))
    wrong = [m for m in messages if "constant" not in m]
    assert not wrong, f"{len(wrong)} of {len(messages)} runs: {wrong[:3]}"


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # scipy's, on 59.9s
def test_ttest_with_one_constant_group_equals_scipy() -> None:
    # One group constant (its variance exactly 0, not a residue), the other not: Welch's test.
    rng = np.random.default_rng(5)
    frames = {
        s: pd.DataFrame({"x": np.r_[np.full(40, 59.9), rng.uniform(40, 80, 40)],
                         "g": np.r_[np.ones(40), np.full(40, 2.0)]})
        for s in "abc"
    }  # fmt: skip
    pooled = pd.concat(frames.values())
    # scipy 1.17: stats.ttest_ind(x[g == 2], x[g == 1], equal_var=False)
    ref = stats.ttest_ind(pooled.x[pooled.g == 2], pooled.x[pooled.g == 1], equal_var=False)
    for draw in (None, 1, 2):
        rng_draw = None if draw is None else np.random.default_rng(draw)
        res = federate_perturbed("ttest", frames, {"variable": "x", "group": "g"}, DICTIONARY,
                                 rng_draw)  # fmt: skip
        assert res.t == pytest.approx(ref.statistic, rel=1e-9)
        assert res.dof == pytest.approx(ref.df, rel=1e-9)


def test_ttest_sdc_refuses_a_group_of_two_at_a_site() -> None:
    rng = np.random.default_rng(1)
    frames = {"a": two_groups(rng, 50), "b": pd.DataFrame({"x": [1.0, 2.0, 3.0], "g": [1, 1, 2]})}
    with pytest.raises(DisclosureError, match="g = 1 \\(control\\) has fewer than 3 records here"):
        federate("ttest", frames, {"variable": "x", "group": "g"}, DICTIONARY, mode="sdc")
    # The same data without sdc run (an empty group at a site is fine in any mode).
    federate("ttest", frames, {"variable": "x", "group": "g"}, DICTIONARY, mode="off")


def test_ttest_dp_noise_sd_matches_the_noise_and_widens_the_interval() -> None:
    rng = np.random.default_rng(2)
    frames = {f"s{i}": two_groups(rng, 500) for i in range(4)}
    params = {"variable": "x", "group": "g"}
    exact = federate("ttest", frames, params, DICTIONARY)
    draws = [release_dp("ttest", frames, params, 1.0, rng) for _ in range(300)]
    empirical = np.std([d.difference for d in draws])
    reported = np.mean([d.noise_sd for d in draws])
    assert empirical / reported == pytest.approx(1.0, abs=0.2)
    widths = [d.ci_upper - d.ci_lower for d in draws]
    assert np.median(widths) > exact.ci_upper - exact.ci_lower
    assert any("noise adds sd" in note for note in draws[0].notes)


def test_ttest_dp_says_when_noise_swamps_the_variances() -> None:
    rng = np.random.default_rng(7)
    frames = {"s0": two_groups(rng, 200)}  # far too few records for epsilon 0.2
    with pytest.raises(ModelError, match=r"noise on the sums of squares .* swamps"):
        for _ in range(20):  # some draws may leave both variances positive by chance
            release_dp("ttest", frames, {"variable": "x", "group": "g"}, 0.2, rng)


def test_ttest_result_reads_and_plots() -> None:
    rng = np.random.default_rng(3)
    result = federate(
        "ttest", {"a": two_groups(rng, 60)}, {"variable": "x", "group": "g"}, DICTIONARY
    )
    summary = result.summary
    assert list(summary.index) == ["1 (control)", "2 (treated)", "difference"]
    assert summary.loc["difference", "mean"] == pytest.approx(result.difference)
    assert "Welch t-test of x by g" in str(result)
    ax = result.plot()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1 (control)", "2 (treated)"]
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["test"] == "welch" and set(payload["groups"]) == {"1", "2"}


# ----------------------------------------------------------------------------- correlation


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"variables": ["x"]}, "at least 2"),
        ({"variables": ["x", "x"]}, "distinct"),
        ({"variables": ["x", "g"]}, "needs a numeric variable"),
    ],
)
def test_correlation_bad_parameters(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        get_analysis("correlation").parse_params(params, DICTIONARY)


def test_correlation_declares_sensitivities_of_standardised_values() -> None:
    analysis = get_analysis("correlation")
    params = analysis.parse_params({"variables": ["x", "y", "z"]}, DICTIONARY)
    spec = analysis.declare(params, AnalysisContext(DICTIONARY))
    assert spec.arrays["sum"].shape == (3,) and spec.arrays["sum"].sensitivity == 3.0
    assert spec.arrays["cross"].shape == (6,) and spec.arrays["cross"].sensitivity == 6.0


def test_correlation_uses_complete_cases_across_sites() -> None:
    rng = np.random.default_rng(4)
    frames = {}
    for name, n in (("a", 40), ("b", 90)):
        x = rng.uniform(0, 100, n)
        frames[name] = pd.DataFrame(
            {
                "x": x,
                "y": np.clip(0.4 * x - 20 + rng.normal(0, 5, n), -50, 50),
                "z": rng.uniform(0, 1, n),
            }
        )
        frames[name].loc[::7, "y"] = np.nan
    result = federate("correlation", frames, {"variables": ["x", "y", "z"]}, DICTIONARY)
    complete = pd.concat(frames.values(), ignore_index=True).dropna()
    # pandas 2.3: DataFrame.corr() on the pooled complete cases
    pd.testing.assert_frame_equal(result.summary, complete.corr(), rtol=1e-10)
    assert result.n == len(complete)
    assert result.noise_sd is None


def test_correlation_degenerate_inputs_are_model_errors() -> None:
    constant = {"a": pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "y": [5.0] * 4})}
    with pytest.raises(ModelError, match="constant"):
        federate("correlation", constant, {"variables": ["x", "y"]}, DICTIONARY)
    tiny = {"a": pd.DataFrame({"x": [1.0, 2.0, np.nan], "y": [5.0, 6.0, 7.0]})}
    with pytest.raises(ModelError, match="at least 3"):
        federate("correlation", tiny, {"variables": ["x", "y"]}, DICTIONARY)


def test_correlation_sdc_refuses_two_complete_cases() -> None:
    frames = {"a": pd.DataFrame({"x": [1.0, 2.0], "y": [3.0, 1.0]})}
    with pytest.raises(DisclosureError, match="complete cases has fewer than 3 records"):
        federate("correlation", frames, {"variables": ["x", "y"]}, DICTIONARY, mode="sdc")


def test_correlation_dp_noise_sd_matches_the_noise() -> None:
    rng = np.random.default_rng(5)
    frames = {}
    for i in range(3):
        x = rng.uniform(0, 100, 3000)
        frames[f"s{i}"] = pd.DataFrame({"x": x, "y": np.clip(0.5 * x - 25, -50, 50)})
        frames[f"s{i}"]["y"] += rng.normal(0, 10, 3000).clip(-20, 20)
    params = {"variables": ["x", "y"]}
    draws = [release_dp("correlation", frames, params, 1.0, rng) for _ in range(100)]
    empirical = np.std([d.matrix["x"]["y"] for d in draws])
    reported = np.mean([d.noise_sd["x"]["y"] for d in draws])
    assert empirical / reported == pytest.approx(1.0, abs=0.3)
    assert draws[0].noise_sd["x"]["x"] == 0.0
    assert any("noise" in note for note in draws[0].notes)


def test_correlation_dp_says_when_noise_swamps_the_cross_products() -> None:
    rng = np.random.default_rng(8)
    frames = {"s0": pd.DataFrame({"x": rng.uniform(40, 60, 30), "y": rng.uniform(-5, 5, 30)})}
    with pytest.raises(ModelError, match="noise on the cross-products swamps"):
        for _ in range(20):
            release_dp("correlation", frames, {"variables": ["x", "y"]}, 0.1, rng)


def test_correlation_result_reads_and_plots() -> None:
    rng = np.random.default_rng(6)
    data = pd.DataFrame({"x": rng.uniform(0, 100, 30), "y": rng.uniform(-50, 50, 30)})
    result = federate("correlation", {"a": data}, {"variables": ["y", "x"]}, DICTIONARY)
    assert list(result.summary.columns) == ["y", "x"]
    assert result.matrix["x"]["x"] == 1.0
    assert result.matrix["x"]["y"] == result.matrix["y"]["x"]
    assert "Pearson correlations, 30 complete cases" in str(result)
    ax = result.plot()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["y", "x"]
    assert json.loads(json.dumps(result.to_dict()))["matrix"]["y"]["x"] == result.matrix["y"]["x"]
