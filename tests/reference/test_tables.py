"""``table`` and ``mantel_haenszel`` on real multi-site data against scipy and statsmodels.

UCI heart (four hospitals, conformed as their site nodes conform them) and, when the shared
data folder is present, DataSHIELD's CNSIM1/2/3.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import StratifiedTable

import analyses  # noqa: F401  (registers every analysis)
from analyses.testing import federate
from protocol.config import DataDictionary
from tests.datasets import Split


def crosstab(frame: pd.DataFrame, rows: str, cols: str, dictionary: DataDictionary) -> np.ndarray:
    """Pooled counts over the dictionary's levels (rows x cols)."""
    table = pd.crosstab(frame[rows], frame[cols]).reindex(
        index=dictionary.levels(rows), columns=dictionary.levels(cols), fill_value=0
    )
    return table.to_numpy(dtype=float)


# ----------------------------------------------------------------------------- table


def test_heart_table_cp_by_disease_equals_scipy(heart: Split) -> None:
    result = heart.federate("table", {"rows": "cp", "cols": "disease"})
    observed = crosstab(heart.pooled, "cp", "disease", heart.dictionary)
    # scipy 1.17: stats.chi2_contingency(observed) (dof 3: no Yates correction)
    reference = stats.chi2_contingency(observed)
    assert result.chi2 == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-9)
    assert result.dof == reference.dof == 3
    assert result.correction is False
    np.testing.assert_allclose(result.expected, reference.expected_freq, rtol=1e-12)
    assert result.counts["4"]["1"] == observed[3, 1]
    np.testing.assert_array_equal(np.array(result.table), observed)
    assert result.n == observed.sum()


@pytest.mark.parametrize("correction", [True, False])
def test_heart_two_by_two_applies_yates_as_scipy(
    correction: bool,
    heart: Split,
) -> None:
    params = {"rows": "sex", "cols": "disease", "correction": correction}
    result = heart.federate("table", params)
    observed = crosstab(heart.pooled, "sex", "disease", heart.dictionary)
    # scipy 1.17: stats.chi2_contingency(observed, correction=correction) (dof 1)
    reference = stats.chi2_contingency(observed, correction=correction)
    assert result.chi2 == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-9)
    assert result.dof == 1
    assert result.correction is correction


def test_heart_one_way_table_tests_uniformity_as_scipy(heart: Split) -> None:
    result = heart.federate("table", {"rows": "restecg"})
    observed = heart.pooled["restecg"].value_counts().reindex([0, 1, 2], fill_value=0)
    # scipy 1.17: stats.chisquare(observed) (uniform expected counts)
    reference = stats.chisquare(observed.to_numpy(dtype=float))
    assert result.chi2 == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-9)
    assert result.dof == 2
    assert result.counts == {str(k): float(v) for k, v in observed.items()}
    assert result.test == "uniformity"


# ----------------------------------------------------------------------------- mantel_haenszel


def assert_equals_stratified(result: Any, reference: StratifiedTable) -> None:
    """Pooled OR, its 95% interval and both tests, to 1e-10 (p-values 1e-8 or 1e-14 absolute)."""
    assert result.odds_ratio == pytest.approx(reference.oddsratio_pooled, rel=1e-12)
    low, high = reference.oddsratio_pooled_confint()
    assert result.ci_lower == pytest.approx(low, rel=1e-10)
    assert result.ci_upper == pytest.approx(high, rel=1e-10)
    assert result.std_error_log == pytest.approx(reference.logodds_pooled_se, rel=1e-10)
    null = reference.test_null_odds()
    assert result.null_statistic == pytest.approx(null.statistic, rel=1e-10)
    assert result.null_p == pytest.approx(null.pvalue, rel=1e-8, abs=1e-14)
    equal = reference.test_equal_odds()
    assert result.equal_statistic == pytest.approx(equal.statistic, rel=1e-10)
    assert result.equal_p == pytest.approx(equal.pvalue, rel=1e-8, abs=1e-14)
    assert result.equal_dof == reference.table.shape[2] - 1


def test_heart_mh_exang_on_disease_by_site_equals_statsmodels(heart: Split) -> None:
    params = {"exposure": "exang", "outcome": "disease"}
    result = heart.federate("mantel_haenszel", params)
    tables = [
        crosstab(frame, "exang", "disease", heart.dictionary) for frame in heart.frames.values()
    ]
    # statsmodels 0.15: StratifiedTable(tables) with one 2x2 table per site
    reference = StratifiedTable(tables)
    assert_equals_stratified(result, reference)
    assert list(result.strata) == list(heart.frames)
    assert result.n == sum(t.sum() for t in tables)


def test_heart_mh_corrections_equal_statsmodels(heart: Split) -> None:
    params = {"exposure": "exang", "outcome": "disease", "correction": True, "tarone": True}
    result = heart.federate("mantel_haenszel", params)
    tables = [
        crosstab(frame, "exang", "disease", heart.dictionary) for frame in heart.frames.values()
    ]
    reference = StratifiedTable(tables)
    # statsmodels 0.15: test_null_odds(correction=True), test_equal_odds(adjust=True)
    null = reference.test_null_odds(correction=True)
    equal = reference.test_equal_odds(adjust=True)
    assert result.null_statistic == pytest.approx(null.statistic, rel=1e-10)
    assert result.equal_statistic == pytest.approx(equal.statistic, rel=1e-10)
    assert result.equal_p == pytest.approx(equal.pvalue, rel=1e-8)


def test_heart_mh_stratified_by_sex_equals_statsmodels(heart: Split) -> None:
    params = {"exposure": "fbs", "outcome": "disease", "stratum": "sex"}
    result = heart.federate("mantel_haenszel", params)
    tables = [
        crosstab(heart.pooled[heart.pooled["sex"] == level], "fbs", "disease", heart.dictionary)
        for level in heart.dictionary.levels("sex")
    ]
    # statsmodels 0.15: StratifiedTable(tables) with one pooled 2x2 table per sex
    assert_equals_stratified(result, StratifiedTable(tables))
    assert list(result.strata) == ["0 (female)", "1 (male)"]


# ----------------------------------------------------------------------------- CNSIM


def test_cnsim_table_bmi_by_gender_equals_scipy(
    cnsim: tuple[dict[str, pd.DataFrame], DataDictionary],
) -> None:
    frames, dictionary = cnsim
    pooled = pd.concat(frames.values(), ignore_index=True)
    result = federate("table", frames, {"rows": "PM_BMI_CATEGORICAL", "cols": "GENDER"}, dictionary)
    observed = crosstab(pooled, "PM_BMI_CATEGORICAL", "GENDER", dictionary)
    # scipy 1.17: stats.chi2_contingency(observed)
    reference = stats.chi2_contingency(observed)
    assert result.chi2 == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-9)
    assert result.n == 8927  # valid PM_BMI_CATEGORICAL (GENDER is complete)


def test_cnsim_mh_lipid_drugs_on_diabetes_by_site_equals_statsmodels(
    cnsim: tuple[dict[str, pd.DataFrame], DataDictionary],
) -> None:
    frames, dictionary = cnsim
    params = {"exposure": "MEDI_LPD", "outcome": "DIS_DIAB"}
    result = federate("mantel_haenszel", frames, params, dictionary)
    tables = [crosstab(f, "MEDI_LPD", "DIS_DIAB", dictionary) for f in frames.values()]
    # statsmodels 0.15: StratifiedTable(tables) with one 2x2 table per CNSIM site
    assert_equals_stratified(result, StratifiedTable(tables))
