"""Iterative analyses through real processes: federated equals pooled (mode off)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from lifelines import CoxPHFitter, KaplanMeierFitter

from analyses.results import AnalysisResult
from protocol.config import DataSource
from simulations.federation import LocalFederation, SiteSpec
from simulations.synthetic import generate_sites, synthetic_dictionary, write_sites
from tests.system.conftest import running_federation, study

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def synthetic(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalFederation, pd.DataFrame]]:
    folder = tmp_path_factory.mktemp("synthetic")
    files = write_sites(folder / "data", generate_sites(3, 1500, seed=11))
    pooled = pd.concat([pd.read_csv(p) for p in files.sites.values()], ignore_index=True)
    sites = [
        SiteSpec(name, DataSource(path=path), mode="off") for name, path in files.sites.items()
    ]
    with running_federation(
        sites, synthetic_dictionary(), folder / "run", study("off")
    ) as federation:
        yield federation, pooled


def run(federation: LocalFederation, analysis: str, **params: Any) -> AnalysisResult:
    """One request in study s1, by the researcher, through the coordinator's API."""
    with federation.researcher() as client:
        return client.run("s1", {"analysis": analysis, "params": params})


def test_logistic_glm_equals_pooled_statsmodels(
    synthetic: tuple[LocalFederation, pd.DataFrame],
) -> None:
    federation, pooled = synthetic
    formula = "outcome ~ age + C(sex) + bmi + smoker + C(stage)"
    result = run(
        federation, "glm", formula="outcome ~ age + sex + bmi + smoker + stage", family="binomial"
    )
    # statsmodels 0.15: smf.glm(formula, pooled, family=Binomial()).fit(tol=1e-12)
    reference = smf.glm(formula, pooled, family=sm.families.Binomial()).fit(tol=1e-12)
    names = {
        "Intercept": "Intercept",
        "age": "age",
        "sex[T.1]": "C(sex)[T.1]",
        "bmi": "bmi",
        "smoker": "smoker",
        "stage[T.2]": "C(stage)[T.2]",
        "stage[T.3]": "C(stage)[T.3]",
    }
    assert set(result["coefficients"]) == set(names)
    for ours, theirs in names.items():
        coef = result["coefficients"][ours]
        assert coef["estimate"] == pytest.approx(reference.params[theirs], rel=1e-8)
        assert coef["std_error"] == pytest.approx(reference.bse[theirs], rel=1e-6)
    assert result["deviance"] == pytest.approx(reference.deviance, rel=1e-8)
    assert result["n"] == reference.nobs
    assert result["timings"]["rounds"] >= 3  # iterative: several task rounds over the link


def test_cox_and_kaplan_meier_equal_pooled_lifelines(
    synthetic: tuple[LocalFederation, pd.DataFrame],
) -> None:
    federation, pooled = synthetic
    cox = run(
        federation, "cox", time="time", event="event", covariates=["age", "smoker"], ties="efron"
    )
    km = run(federation, "kaplan_meier", time="time", event="event")
    data = pooled[["time", "event", "age", "smoker"]].dropna()
    # lifelines 0.30: CoxPHFitter().fit(data, "time", "event", fit_options={"precision": 1e-12})
    reference = CoxPHFitter().fit(data, "time", "event", fit_options={"precision": 1e-12})
    for term in ("age", "smoker"):
        coef = cox["coefficients"][term]
        assert coef["estimate"] == pytest.approx(reference.params_[term], rel=1e-6)
        assert coef["std_error"] == pytest.approx(reference.standard_errors_[term], rel=1e-6)
    assert cox["log_likelihood"] == pytest.approx(reference.log_likelihood_, rel=1e-8)
    # lifelines 0.30: KaplanMeierFitter().fit(pooled.time, pooled.event)
    complete = pooled[["time", "event"]].dropna()
    kmf = KaplanMeierFitter().fit(complete.time, complete.event)
    expected = kmf.survival_function_at_times(km["times"]).to_numpy()
    assert km["survival"] == pytest.approx(list(expected), abs=1e-12)
