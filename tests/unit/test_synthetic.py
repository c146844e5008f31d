"""The synthetic cohorts: reproducible, heterogeneous across sites, missing at the asked rates,
inside the dictionary's bounds, and generated from models that pooled fits recover."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from lifelines import CoxPHFitter
from scipy import stats

from protocol.config import DataDictionary, NumericVariable, load_yaml
from protocol.errors import ValidationError
from simulations.synthetic import (
    COX_COVARIATES,
    FOLLOW_UP_DAYS,
    TRUE_COEFS,
    TRUE_LOG_HR,
    SiteDraw,
    generate_sites,
    site_profiles,
    synthetic_dictionary,
    write_sites,
)
from site_node.harmonize import conform

MODEL_COLUMNS = ["outcome", "age", "sex", "bmi", "sbp", "smoker", "stage"]
#: Our term names -> statsmodels' for C() on float columns.
STATSMODELS_TERMS = {
    "Intercept": "Intercept",
    "age": "age",
    "sex[T.1]": "C(sex)[T.1.0]",
    "bmi": "bmi",
    "sbp": "sbp",
    "smoker": "smoker",
    "stage[T.2]": "C(stage)[T.2.0]",
    "stage[T.3]": "C(stage)[T.3.0]",
}
# Recovery tolerance: |estimate - truth| <= 4 standard errors. Under a correct model the
# estimate is asymptotically normal around the truth, so each check fails by chance with
# probability 6e-5 (about 1e-3 over all 15 coefficients); the seeds are fixed anyway. A wrong
# generator (a sign, a scale, a misnamed level) is off by tens or hundreds of standard errors.
Z_TOLERANCE = 4.0


def pooled(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames.values(), ignore_index=True)


def test_reproducible_by_seed() -> None:
    first = generate_sites(3, 2000, seed=7)
    again = generate_sites(3, 2000, seed=7)
    assert list(first) == ["site01", "site02", "site03"]
    for name in first:
        pd.testing.assert_frame_equal(first[name], again[name])
    other = generate_sites(3, 2000, seed=8)
    assert not first["site01"].equals(other["site01"])
    # Each site has its own stream: adding sites does not change the first ones.
    more = generate_sites(5, 2000, seed=7)
    for name in first:
        pd.testing.assert_frame_equal(first[name], more[name])


def test_columns_fit_the_dictionary() -> None:
    dictionary = synthetic_dictionary()
    frames = generate_sites(4, 5000, seed=1)
    for frame in frames.values():
        assert list(frame.columns) == list(dictionary.variables)
        assert all(dtype == np.float64 for dtype in frame.dtypes)
        for name, var in dictionary.variables.items():
            values = frame[name].dropna().to_numpy()
            if isinstance(var, NumericVariable):
                assert var.min <= values.min() and values.max() <= var.max, name
            else:
                assert set(np.unique(values)) == set(map(float, var.levels)), name
        # A site node's own check finds nothing to set missing.
        conformed, report = conform(frame, dictionary)
        assert not report.below_min and not report.above_max and not report.unknown_levels
        pd.testing.assert_frame_equal(conformed, frame)
        time = frame["time"].dropna()
        assert (time == np.round(time)).all() and time.min() >= 1
        assert time.max() <= FOLLOW_UP_DAYS[1]
        # Censored patients were followed at least to the start of the censoring window.
        censored = frame.loc[frame["event"] == 0, "time"]
        assert censored.min() >= FOLLOW_UP_DAYS[0]


def test_site_sizes_vary_within_the_spread() -> None:
    frames = generate_sites(8, 1000, seed=3, size_spread=0.5)
    sizes = [len(f) for f in frames.values()]
    assert all(500 <= n <= 1500 for n in sizes)
    assert max(sizes) / min(sizes) > 1.3
    exact = generate_sites(3, [10, 200, 3000], seed=3)
    assert [len(f) for f in exact.values()] == [10, 200, 3000]
    assert [p.rows for p in site_profiles(SiteDraw(8, 1000, seed=3)).values()] == sizes


def test_heterogeneity_is_visible_and_can_be_turned_off() -> None:
    def tests(heterogeneity: float) -> tuple[float, float, float]:
        frames = generate_sites(6, 5000, seed=11, heterogeneity=heterogeneity, missing={})
        ages = [f["age"].to_numpy() for f in frames.values()]
        stage = pd.crosstab(pooled({k: f.assign(site=k) for k, f in frames.items()})["site"],
                            pooled(frames)["stage"])  # fmt: skip
        smoker = np.array([[f["smoker"].sum(), (1 - f["smoker"]).sum()] for f in frames.values()])
        return (
            stats.f_oneway(*ages).pvalue,
            stats.chi2_contingency(stage).pvalue,
            stats.chi2_contingency(smoker).pvalue,
        )

    # Sites differ far beyond sampling error in age, case mix (stage) and smoking.
    assert max(tests(1.0)) < 1e-12
    # With heterogeneity 0 every site draws from one population: no test rejects.
    assert min(tests(0.0)) > 1e-3


@pytest.mark.parametrize(
    "rates",
    [{"bmi": 0.1, "sbp": 0.25, "outcome": 0.05}, None],
    ids=["given", "default"],
)
def test_missingness_rates(rates: dict[str, float] | None) -> None:
    frames = generate_sites(4, 20_000, seed=5, missing=rates)
    data = pooled(frames)
    n = len(data)
    expected = rates if rates is not None else {"bmi": 0.08, "sbp": 0.05, "smoker": 0.03}
    for name in data.columns:
        rate = expected.get(name, 0.0)
        observed = data[name].isna().mean()
        # Binomial: 5 standard deviations of the observed share.
        assert abs(observed - rate) <= 5 * np.sqrt(rate * (1 - rate) / n), (name, observed)
    # MCAR: a column's holes are unrelated to the other columns.
    holes = data["sbp"].isna()
    assert abs(data.loc[holes, "age"].mean() - data.loc[~holes, "age"].mean()) < 0.5
    none = pooled(generate_sites(2, 1000, seed=5, missing={}))
    assert not none.isna().any().any()


def test_pooled_logit_recovers_true_coefs() -> None:
    data = pooled(generate_sites(8, 25_000, seed=2026)).dropna(subset=MODEL_COLUMNS)
    # statsmodels 0.15: smf.logit("outcome ~ age + C(sex) + bmi + sbp + smoker + C(stage)",
    #                             pooled complete cases).fit()
    fit = smf.logit("outcome ~ age + C(sex) + bmi + sbp + smoker + C(stage)", data).fit(disp=0)
    assert fit.mle_retvals["converged"]
    for term, truth in TRUE_COEFS.items():
        estimate, se = fit.params[STATSMODELS_TERMS[term]], fit.bse[STATSMODELS_TERMS[term]]
        assert abs(estimate - truth) <= Z_TOLERANCE * se, (term, estimate, truth, se)
        # The check has power: the tolerance is a small fraction of the effect.
        assert Z_TOLERANCE * se < 0.5 * abs(truth), (term, se)


def test_pooled_cox_recovers_true_log_hr() -> None:
    data = pooled(generate_sites(6, 10_000, seed=2027))
    data = data.dropna(subset=["time", "event", *COX_COVARIATES])
    design = pd.DataFrame(
        {
            "time": data["time"],
            "event": data["event"],
            "age": data["age"],
            "sex[T.1]": (data["sex"] == 1).astype(float),
            "bmi": data["bmi"],
            "sbp": data["sbp"],
            "smoker": data["smoker"],
            "stage[T.2]": (data["stage"] == 2).astype(float),
            "stage[T.3]": (data["stage"] == 3).astype(float),
        }
    )
    # lifelines 0.30: CoxPHFitter().fit(design, "time", "event")  (Efron ties; the whole-day
    # times tie often, which Efron handles without visible bias here)
    cph = CoxPHFitter().fit(design, "time", "event")
    for term, truth in TRUE_LOG_HR.items():
        estimate, se = cph.params_[term], cph.standard_errors_[term]
        assert abs(estimate - truth) <= Z_TOLERANCE * se, (term, estimate, truth, se)
        assert Z_TOLERANCE * se < 0.5 * abs(truth), (term, se)


def test_write_sites_round_trips(tmp_path: Path) -> None:
    frames = generate_sites(3, 500, seed=9)
    files = write_sites(tmp_path / "out", frames)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "dictionary.yaml",
        "site01.csv",
        "site02.csv",
        "site03.csv",
    ]
    assert load_yaml(files.dictionary, DataDictionary) == synthetic_dictionary()
    for name, path in files.sites.items():
        back = pd.read_csv(path, dtype=np.float64)
        pd.testing.assert_frame_equal(back, frames[name])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_sites": 0}, "n_sites must be a whole number from 1 to 9999, got 0"),
        ({"rows_per_site": 0}, "rows per site must be whole numbers >= 1, got 0"),
        ({"rows_per_site": [5, 5]}, "lists 2 sizes for 3 sites"),
        ({"missing": {"bmi": 1.0}}, "missing rate for 'bmi' must be in [0, 1), got 1.0"),
        ({"missing": {"weight": 0.1}}, "missing names 'weight', not a synthetic column"),
        ({"heterogeneity": -1.0}, "heterogeneity must be a finite number >= 0"),
        ({"size_spread": 1.0}, "size_spread must be in [0, 1), got 1.0"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"n_sites": 3, "rows_per_site": 100, "seed": 1, **kwargs}
    with pytest.raises(ValidationError) as info:
        generate_sites(**args)  # type: ignore[arg-type]
    assert message in str(info.value)
