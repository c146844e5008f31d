"""``quantiles`` on real multi-site data against numpy and pandas on the pooled data.

UCI heart (four hospitals, conformed as their site nodes conform them) and, when the shared
data folder is present, DataSHIELD's CNSIM1/2/3 (LAB_TSC: 7825 valid values, published pooled
mean 5.85192485623003).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import analyses  # noqa: F401  (registers every analysis)
from analyses.testing import federate
from protocol.config import DataDictionary
from tests.datasets import Split

PROBS = [0.01, 0.05, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.9, 0.95, 0.99]


# ----------------------------------------------------------------------------- UCI heart


@pytest.mark.parametrize("variable", ["age", "chol", "oldpeak", "thalach"])
def test_heart_quantiles_equal_pooled_numpy_and_pandas(
    variable: str,
    heart: Split,
) -> None:
    result = heart.federate("quantiles", {"variable": variable, "probs": PROBS})
    values = heart.pooled[variable].dropna()
    # numpy 2.4: np.quantile(values, PROBS) (method="linear"); pandas 2.3: Series.quantile(PROBS)
    expected = np.quantile(values, PROBS)
    expected_pandas = values.quantile(PROBS).to_numpy()
    for p, want, want_pandas in zip(PROBS, expected, expected_pandas, strict=True):
        assert result.quantiles[p] == pytest.approx(want, rel=1e-12, abs=1e-12), p
        assert result.quantiles[p] == pytest.approx(want_pandas, rel=1e-12, abs=1e-12), p
        assert result.exact[p]
        assert result.intervals[p] == [result.quantiles[p], result.quantiles[p]]
    assert result.n == len(values)
    assert result.rounds <= 6  # values recorded to a decimal or two resolve in a few rounds
    assert not result.notes


def test_heart_quantiles_sdc_bounds_hold_the_pooled_quantile(heart: Split) -> None:
    probs = [0.05, 0.25, 0.5, 0.75, 0.95]
    for variable in ("age", "chol", "thalach"):
        # Switzerland has no chol (all its values are out of range): a site with no values
        # refuses in sdc as one with too few does, so the federation pools the other three.
        split = heart
        if variable == "chol":
            split = Split.of(
                {s: f for s, f in heart.frames.items() if s != "switzerland"}, heart.dictionary
            )
        result = split.federate("quantiles", {"variable": variable, "probs": probs}, mode="sdc")
        # numpy 2.4: np.quantile(pooled[variable].dropna(), probs)
        expected = np.quantile(split.pooled[variable].dropna(), probs)
        for p, want in zip(probs, expected, strict=True):
            low, high = result.intervals[p]
            assert low - 1e-9 <= want <= high + 1e-9, (variable, p)
            assert low <= result.quantiles[p] <= high
            if result.exact[p]:
                assert result.quantiles[p] == pytest.approx(want, rel=1e-12)
        if not all(result.exact.values()):
            assert any("precision reached" in note for note in result.notes)
    # Every site holds 0 or >= 3 patients aged 53, 54 and 55, so the median resolves exactly.
    age = heart.federate("quantiles", {"variable": "age", "probs": [0.5]}, mode="sdc")
    assert age.exact[0.5]
    assert age.quantiles[0.5] == np.quantile(heart.pooled["age"].dropna(), 0.5)


def test_heart_quantiles_dp_path_without_noise_is_within_one_bin(heart: Split) -> None:
    # federate releases exact counts, so this checks the histogram estimator alone.
    probs = [0.1, 0.5, 0.9]
    result = federate(
        "quantiles",
        heart.frames,
        {"variable": "age", "probs": probs, "bins": 120},
        heart.dictionary,
        "dp",
        epsilon=1.0,  # split and charged as at a site; the exact release adds no noise
    )
    # numpy 2.4: np.quantile(pooled.age.dropna(), probs); bins of 1 year over [0, 120]
    expected = np.quantile(heart.pooled["age"].dropna(), probs)
    for p, want in zip(probs, expected, strict=True):
        assert abs(result.quantiles[p] - want) <= 1.0
        assert not result.exact[p]
    assert result.rounds == 1


# ----------------------------------------------------------------------------- CNSIM


def test_cnsim_lab_tsc_quantiles_equal_pooled_numpy(
    cnsim: tuple[dict[str, pd.DataFrame], DataDictionary],
) -> None:
    frames, dictionary = cnsim
    pooled = pd.concat(frames.values(), ignore_index=True)["LAB_TSC"].dropna()
    # DataSHIELD (published): 7825 valid values of LAB_TSC, pooled mean 5.85192485623003
    assert len(pooled) == 7825
    assert pooled.mean() == pytest.approx(5.85192485623003, rel=1e-12)
    result = federate("quantiles", frames, {"variable": "LAB_TSC", "probs": PROBS}, dictionary)
    # numpy 2.4: np.quantile(pooled, PROBS)
    expected = np.quantile(pooled, PROBS)
    for p, want in zip(PROBS, expected, strict=True):
        assert result.quantiles[p] == pytest.approx(want, rel=1e-12), p
        assert result.exact[p]
    assert result.n == 7825
    assert result.rounds <= 8


def test_cnsim_lab_tsc_sdc_quantiles_are_bounded_tightly(
    cnsim: tuple[dict[str, pd.DataFrame], DataDictionary],
) -> None:
    frames, dictionary = cnsim
    pooled = pd.concat(frames.values(), ignore_index=True)["LAB_TSC"].dropna()
    probs = [0.25, 0.5, 0.75]
    result = federate(
        "quantiles", frames, {"variable": "LAB_TSC", "probs": probs}, dictionary, mode="sdc"
    )
    # numpy 2.4: np.quantile(pooled, probs)
    for p, want in zip(probs, np.quantile(pooled, probs), strict=True):
        low, high = result.intervals[p]
        assert low <= want <= high
        # Three sites of 2000 to 4000 records: cells of 3 records are a few thousandths wide.
        assert high - low < 0.02
        assert result.quantiles[p] == pytest.approx(want, abs=0.02)
