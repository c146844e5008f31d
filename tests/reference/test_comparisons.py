"""``ttest`` and ``correlation`` on real multi-site data against scipy and pandas.

UCI heart (four hospitals, conformed as their site nodes conform them) and, when the shared
data folder is present, DataSHIELD's CNSIM1/2/3.
"""

from __future__ import annotations

import pandas as pd
import pytest
from scipy import stats

import analyses  # noqa: F401  (registers every analysis)
from analyses.testing import federate
from protocol.config import DataDictionary
from tests.datasets import Split

# ----------------------------------------------------------------------------- ttest


@pytest.mark.parametrize("equal_var", [False, True])
def test_heart_ttest_age_by_disease_equals_scipy(
    equal_var: bool,
    heart: Split,
) -> None:
    params = {"variable": "age", "group": "disease", "equal_var": equal_var}
    result = heart.federate("ttest", params)
    used = heart.pooled.dropna(subset=["age", "disease"])
    diseased, healthy = used.loc[used.disease == 1, "age"], used.loc[used.disease == 0, "age"]
    # scipy 1.17: stats.ttest_ind(diseased, healthy, equal_var=equal_var) and its 95% interval
    reference = stats.ttest_ind(diseased, healthy, equal_var=equal_var)
    interval = reference.confidence_interval(0.95)
    assert result.t == pytest.approx(reference.statistic, rel=1e-10)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-8)
    assert result.dof == pytest.approx(reference.df, rel=1e-10)
    assert result.difference == pytest.approx(diseased.mean() - healthy.mean(), rel=1e-12)
    assert result.ci_lower == pytest.approx(interval.low, rel=1e-10)
    assert result.ci_upper == pytest.approx(interval.high, rel=1e-10)
    # pandas 2.3: per-group count, mean and var(ddof=1)
    for level, values in (("0", healthy), ("1", diseased)):
        group = result.groups[level]
        assert group["n"] == len(values)
        assert group["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert group["variance"] == pytest.approx(values.var(), rel=1e-10)


def test_heart_welch_ttest_chol_by_sex_equals_scipy(heart: Split) -> None:
    result = heart.federate("ttest", {"variable": "chol", "group": "sex"})
    used = heart.pooled.dropna(subset=["chol", "sex"])
    # scipy 1.17: stats.ttest_ind(chol[sex == 1], chol[sex == 0], equal_var=False)
    reference = stats.ttest_ind(
        used.loc[used.sex == 1, "chol"], used.loc[used.sex == 0, "chol"], equal_var=False
    )
    assert result.t == pytest.approx(reference.statistic, rel=1e-10)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-8)
    assert result.dof == pytest.approx(reference.df, rel=1e-10)
    assert result.n == len(used)


# ----------------------------------------------------------------------------- correlation


def test_heart_correlation_equals_pandas_on_complete_cases(heart: Split) -> None:
    names = ["age", "trestbps", "chol", "thalach"]
    result = heart.federate("correlation", {"variables": names})
    complete = heart.pooled[names].dropna()
    # pandas 2.3: DataFrame.corr() (Pearson) on the pooled complete cases
    reference = complete.corr()
    for a in names:
        for b in names:
            assert result.matrix[a][b] == pytest.approx(reference.loc[a, b], rel=1e-10, abs=1e-13)
    assert result.n == len(complete)
    pd.testing.assert_frame_equal(result.summary, reference, rtol=1e-10)


# ----------------------------------------------------------------------------- CNSIM


def test_cnsim_ttest_lab_tsc_by_gender_equals_scipy(
    cnsim: tuple[dict[str, pd.DataFrame], DataDictionary],
) -> None:
    frames, dictionary = cnsim
    pooled = pd.concat(frames.values(), ignore_index=True).dropna(subset=["LAB_TSC"])
    # DataSHIELD (published): 7825 valid values of LAB_TSC, pooled mean 5.85192485623003
    assert len(pooled) == 7825
    assert pooled["LAB_TSC"].mean() == pytest.approx(5.85192485623003, rel=1e-12)
    result = federate("ttest", frames, {"variable": "LAB_TSC", "group": "GENDER"}, dictionary)
    # scipy 1.17: stats.ttest_ind(tsc[GENDER == 1], tsc[GENDER == 0], equal_var=False)
    reference = stats.ttest_ind(
        pooled.loc[pooled.GENDER == 1, "LAB_TSC"],
        pooled.loc[pooled.GENDER == 0, "LAB_TSC"],
        equal_var=False,
    )
    assert result.t == pytest.approx(reference.statistic, rel=1e-10)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-8, abs=1e-300)
    assert result.dof == pytest.approx(reference.df, rel=1e-10)
    assert result.n == 7825


def test_cnsim_correlation_equals_pandas(
    cnsim: tuple[dict[str, pd.DataFrame], DataDictionary],
) -> None:
    frames, dictionary = cnsim
    names = ["LAB_TSC", "LAB_TRIG", "LAB_HDL", "PM_BMI_CONTINUOUS"]
    result = federate("correlation", frames, {"variables": names}, dictionary)
    complete = pd.concat(frames.values(), ignore_index=True)[names].dropna()
    # pandas 2.3: DataFrame.corr() on the pooled complete cases
    reference = complete.corr()
    pd.testing.assert_frame_equal(result.summary, reference, rtol=1e-10)
    assert result.n == len(complete)
