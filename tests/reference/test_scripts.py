"""Known statistics written as researchers' scripts: exact pooled answers in sdc, and in dp
noise that matches the sd the release states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.contingency_tables import Table2x2

from analyses import AnalysisContext, get_analysis
from analyses.scripts import ScriptBundle
from analyses.testing import federate
from protocol.config import DataDictionary, SDCThresholds
from protocol.records import AggregateRecord, RecordSpec
from site_node.privacy import privatize

SCRIPTS = Path(__file__).resolve().parents[2] / "configs" / "scripts"


def params(name: str) -> dict[str, str]:
    b = ScriptBundle((SCRIPTS / f"{name}.py").read_text(), (SCRIPTS / f"{name}.yaml").read_text())
    return {"hash": b.hash, "module": b.module, "manifest": b.manifest_text}


def sdc_release(
    site: str, spec: RecordSpec, arrays: dict, ctx: AnalysisContext, epsilon: object
) -> AggregateRecord:
    """The site engine's sdc release (counts under min_cell refused)."""
    return privatize(spec, arrays, "sdc", 0.0, SDCThresholds())


@pytest.fixture(scope="module")
def results(heart_frames: dict[str, pd.DataFrame], heart_dict: DataDictionary) -> dict:
    return {
        name: federate(
            "script", heart_frames, params(name), heart_dict, mode="sdc", release=sdc_release
        )
        for name in ("weighted_mean", "odds_ratio")
    }


def test_a_weighted_mean_script_gives_the_exact_pooled_answer_in_sdc(results, heart_pooled):
    # Reference: numpy.average(chol, weights=age) over the pooled complete cases.
    rows = heart_pooled.dropna(subset=["age", "chol"])
    expected = np.average(rows.chol, weights=rows.age)
    result = results["weighted_mean"]
    assert result.estimates["weighted_mean"] == pytest.approx(expected, rel=1e-12)
    assert result.n == len(rows)


def test_an_odds_ratio_script_gives_the_exact_pooled_answer_in_sdc(results, heart_pooled):
    # Reference: statsmodels Table2x2([[male & disease, male & none],
    #                                  [female & disease, female & none]]) on the pooled rows.
    rows = heart_pooled.dropna(subset=["sex", "num"])
    male, disease = rows.sex == 1, rows.num > 0
    table = Table2x2(
        np.array(
            [
                [(male & disease).sum(), (male & ~disease).sum()],
                [(~male & disease).sum(), (~male & ~disease).sum()],
            ],
            dtype=float,
        )
    )
    low, high = table.oddsratio_confint(alpha=0.05)
    result = results["odds_ratio"].estimates
    assert result["odds_ratio"] == pytest.approx(table.oddsratio, rel=1e-12)
    assert result["ci_lower"] == pytest.approx(low, rel=1e-9)
    assert result["ci_upper"] == pytest.approx(high, rel=1e-9)


@pytest.mark.parametrize("name", ["weighted_mean", "odds_ratio"])
def test_dp_noise_on_a_script_total_matches_the_stated_sd_over_500_releases(
    name, heart_frames, heart_dict
):
    """The site engine (OpenDP Laplace) releases each site's clipped total 500 times; the
    observed sd of the noise over the stated sd (sqrt of the release's variance) lies in
    0.8 .. 1.25 for every coordinate."""
    analysis = get_analysis("script")
    parsed = analysis.parse_params(params(name), heart_dict)
    ctx = AnalysisContext(heart_dict, "dp")
    spec = analysis.declare(parsed, ctx)
    arrays = analysis.local(heart_frames["cleveland"], parsed, ctx)
    noise, stated = [], set()
    for _ in range(500):
        record = privatize(spec, arrays, "dp", 1.0, SDCThresholds())
        noise.append(record["total"] - arrays["total"])
        stated.add(round(np.sqrt(record.releases["total"].variance()), 9))
    assert len(stated) == 1
    ratio = np.std(np.array(noise), axis=0, ddof=1) / stated.pop()
    assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio


def test_an_iterative_script_fits_the_pooled_logistic_regression_over_public_rounds(
    heart_frames, heart_dict, heart_pooled
):
    """Newton's method as a script: each round's coefficients are the only state the sites
    see; in sdc the fit is the pooled maximum-likelihood fit."""
    seen: list[dict] = []
    result = federate(
        "script",
        heart_frames,
        params("logistic_newton"),
        heart_dict,
        mode="sdc",
        release=sdc_release,
        on_round=lambda step, spec, answers: seen.append(step.state),
    )
    # Reference: statsmodels Logit(num > 0 ~ 1 + age / 100) on the pooled complete cases.
    import statsmodels.api as sm

    rows = heart_pooled.dropna(subset=["age", "num"])
    fit = sm.Logit((rows.num > 0).astype(float), sm.add_constant(rows.age / 100.0)).fit(disp=0)
    estimates = result.estimates
    assert estimates["intercept"] == pytest.approx(fit.params.iloc[0], rel=1e-8)
    assert estimates["age_per_100_years"] == pytest.approx(fit.params.iloc[1], rel=1e-8)
    assert 2 <= estimates["iterations"] <= 10
    assert all(set(state) == {"state"} for state in seen)
    assert all(set(state["state"]) == {"beta", "iteration"} for state in seen)
