"""Aggregate pushdown through real processes: four heart hospitals, each a Parquet file that its
site node scans with DuckDB (`data.pushdown: true`), answer dp requests over gRPC; the results
agree with the pooled data within their own stated noise, and no site read its records."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf

from analyses.results import AnalysisResult
from protocol.config import DataSource
from simulations.federation import LocalFederation, SiteSpec
from simulations.heart import DERIVE, SITES, heart_dictionary, read_raw
from tests.system.conftest import running_federation, study

pytestmark = pytest.mark.system

#: A large epsilon, so that noise is small next to the tolerances; the noise is still real.
EPSILON = 200.0


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    folder = tmp_path_factory.mktemp("pushdown")
    sites = []
    for name in SITES:
        path = folder / f"{name}.parquet"
        frame = read_raw(name)  # the shipped file; the site conforms it in SQL
        con = duckdb.connect(":memory:")
        con.register("frame", frame)
        con.execute(f"COPY frame TO '{path}' (FORMAT PARQUET)")
        con.close()
        source = DataSource(connector="parquet", path=path, derive=DERIVE, pushdown=True)
        sites.append(
            SiteSpec(name, source, mode="dp", budget=10 * EPSILON, epsilon_per_request=EPSILON)
        )
    terms = study("dp", epsilon=EPSILON, budget=10 * EPSILON)
    with running_federation(sites, heart_dictionary(), folder / "run", terms) as federation:
        yield federation


def run(federation: LocalFederation, analysis: str, **params: Any) -> AnalysisResult:
    with federation.researcher() as client:
        return client.run("s1", {"analysis": analysis, "params": params})


def test_every_site_computes_in_parquet_and_never_reads_its_records(
    federation: LocalFederation, heart_pooled: pd.DataFrame
) -> None:
    mean = run(federation, "mean", variable="chol")
    assert [s["status"] for s in mean["sites"]] == ["ok"] * 4
    # Reference: numpy on the pooled conformed values (chol == 0 is missing at two sites).
    chol = heart_pooled["chol"].dropna()
    assert mean.noise_sd > 0  # a dp release: noise was added
    assert abs(mean.mean - chol.mean()) <= 6 * mean.noise_sd
    assert abs(mean.n - chol.size) <= 6 * np.sqrt(2 * 4) / (EPSILON / 3) + 1

    table = run(federation, "table", rows="sex", cols="disease")
    # Reference: pd.crosstab on the pooled records; each cell within 6 noise sd.
    expected = pd.crosstab(heart_pooled["sex"], heart_pooled["disease"]).to_numpy()
    assert np.all(np.abs(np.asarray(table.table) - expected) <= 6 * table.noise_sd + 1e-9)

    for name in SITES:
        log = (federation.site_dir(name) / "site.log").read_text()
        assert "data.pushdown: aggregates are computed in" in log, log[-2000:]
        assert "reads its records into memory" not in log


def test_a_logistic_glm_computed_in_the_sources_matches_pooled_statsmodels(
    federation: LocalFederation, heart_pooled: pd.DataFrame
) -> None:
    result = run(federation, "glm", formula="disease ~ age + sex + chol", family="binomial")
    # statsmodels 0.15: smf.glm("disease ~ age + C(sex) + chol", pooled.dropna(...),
    # family=Binomial()).fit(tol=1e-12); tolerance: 6 noise standard errors plus 1% of the
    # sampling standard error (the federated fit runs a fixed number of rounds).
    pooled = heart_pooled.dropna(subset=["disease", "age", "sex", "chol"])
    pooled = pooled.assign(sex=pooled["sex"].astype(int))  # levels named 0 and 1
    reference = smf.glm("disease ~ age + C(sex) + chol", pooled, family=sm.families.Binomial()).fit(
        tol=1e-12
    )
    names = {"Intercept": "Intercept", "age": "age", "sex[T.1]": "C(sex)[T.1]", "chol": "chol"}
    assert result.n == pytest.approx(len(pooled), abs=6 * np.sqrt(8) / EPSILON + 1)
    for ours, theirs in names.items():
        tolerance = 6 * result.noise_std_error[ours] + 0.01 * reference.bse[theirs]
        assert abs(result.coefficients[ours]["estimate"] - reference.params[theirs]) <= tolerance
