"""The UCI heart hospitals in sdc under pre-approved terms, through real processes.

The study's approved populations and models are pinned at every site (the default for sdc);
within them the pooled results are exact: equal to statsmodels and scipy on the records of the
sites that contributed. Outside them every site refuses, naming what is approved.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats

from analyses.results import AnalysisResult
from coordinator.client import APIRequestError
from protocol.config import SDCTerms
from simulations.federation import LocalFederation, SiteSpec
from simulations.heart import SITES, heart_dictionary, heart_sites, heart_source
from tests.system.conftest import study

pytestmark = pytest.mark.system

MODEL = "disease ~ age + sex + chol"
# A careless approval: the second population is the first but for the 77-year-olds.
APPROVAL = {"populations": ["age >= 50", "age >= 50 and age != 77"], "models": [MODEL]}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    sites = [SiteSpec(name, heart_source(name), mode="sdc", approval=APPROVAL) for name in SITES]
    federation = LocalFederation(sites, heart_dictionary(), tmp_path_factory.mktemp("sdc"))
    try:
        terms = {"populations": APPROVAL["populations"], "models": APPROVAL["models"]}
        federation.start(study("sdc").model_copy(update={"sdc": SDCTerms(**terms)}))
        yield federation
    finally:
        federation.stop()


def run(federation: LocalFederation, analysis: str, filter: str = "", **params: object) -> Any:
    with federation.researcher() as client:
        request = {"analysis": analysis, "params": params} | ({"filter": filter} if filter else {})
        return client.run("s1", request)


def contributed(result: AnalysisResult) -> pd.DataFrame:
    """The pooled records of the sites that contributed to ``result``."""
    frames = heart_sites()
    names = [s.name for s in result.sites if s.status == "ok"]
    return pd.concat([frames[name] for name in names], ignore_index=True)


def test_the_table_is_exact_under_approved_terms(federation: LocalFederation) -> None:
    result = run(federation, "table", rows="sex", cols="disease", correction=False)
    assert result.privacy.mode == "sdc"
    pooled = contributed(result)
    observed = pd.crosstab(pooled["sex"], pooled["disease"]).to_numpy(dtype=float)
    # scipy 1.17: stats.chi2_contingency(observed, correction=False) (dof 1)
    reference = stats.chi2_contingency(observed, correction=False)
    np.testing.assert_array_equal(np.array(result.table), observed)
    assert result.chi2 == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-9)


def test_the_approved_logistic_glm_is_exact(federation: LocalFederation) -> None:
    result = run(federation, "glm", formula=MODEL, family="binomial")
    pooled = contributed(result)
    # Switzerland has no chol in range: no complete record, so it refuses like a small site.
    assert {s.name for s in result.sites if s.status != "ok"} == {"switzerland"}
    # statsmodels 0.15: smf.glm(MODEL, pooled, family=Binomial()).fit(tol=1e-12), sex as its
    # 0/1 indicator (the same column as our sex[T.1])
    reference = smf.glm(MODEL, pooled, family=sm.families.Binomial()).fit(tol=1e-12)
    names = {"Intercept": "Intercept", "age": "age", "sex[T.1]": "sex", "chol": "chol"}
    for ours, theirs in names.items():
        coef = result["coefficients"][ours]
        assert coef["estimate"] == pytest.approx(reference.params[theirs], rel=1e-7)
        assert coef["std_error"] == pytest.approx(reference.bse[theirs], rel=1e-6)
    assert result["n"] == reference.nobs


def test_the_approved_population_runs_and_a_free_filter_is_refused(
    federation: LocalFederation,
) -> None:
    within = run(federation, "mean", filter="age >= 50", variable="chol")
    pooled = contributed(within)
    # pandas: the mean of chol over the contributing sites' records aged 50 or more
    expected = pooled.loc[pooled["age"] >= 50, "chol"].mean()
    assert within["mean"] == pytest.approx(expected, rel=1e-12)
    # The coordinator refuses it before any task leaves (the study's terms); each site would
    # refuse it again against its own approval.
    with federation.researcher() as client:
        request = {"analysis": "mean", "filter": "age != 77", "params": {"variable": "chol"}}
        with pytest.raises(APIRequestError) as refused:
            client.submit("s1", request, wait=True)
    assert refused.value.status == 400
    assert "filter 'age != 77' is not an approved population of study 's1'" in str(refused.value)


def test_the_differencing_guard_holds_across_real_processes_and_approved_populations(
    federation: LocalFederation,
) -> None:
    # Even between two approved populations, the means over "age >= 50" and over the same
    # but for the 77-year-olds would give those patients' cholesterol: every site refuses the
    # second (a site with no 77-year-old reaches the same set by another population, which is
    # refused too, so that a refusal does not say who is 77).
    first = run(federation, "mean", filter="age >= 50", variable="chol")
    assert first["n"] > 0
    with federation.researcher() as client:
        request = {
            "analysis": "mean",
            "filter": "age >= 50 and age != 77",
            "params": {"variable": "chol"},
        }
        body = client.submit("s1", request, wait=True)
    assert body["status"] == "failed", body
    assert body["error"].count("differs by fewer than 3 from an earlier exact release") >= 3
