"""``kaplan_meier``, ``logrank`` and ``cox`` on multi-site data against lifelines / statsmodels
on the pooled data.

Data: lifelines' bundled NCCTG lung data split by institution (``inst``; the one record without
an institution becomes site ``inst_unknown``), lifelines' Rossi recidivism data split into three
sites by age at release, and, when the shared data folder is present, DataSHIELD's three
simulated survival studies (read from /work/shared/data/ds_survival, never copied). Times are
whole days or weeks (``time_resolution`` 1) or three decimals (``time_resolution`` 0.001), so
the federated results are those of the exact pooled times.

lifelines' Cox fits use ``fit_options={"precision": 1e-12}``: its default stopping rule (1e-7)
leaves coefficients about 3e-6 from the optimum, while the federation converges to 1e-9.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.datasets import load_lung, load_rossi
from lifelines.statistics import logrank_test, multivariate_logrank_test

import analyses  # noqa: F401  (registers every analysis)
from analyses.survival import CoxResult, KaplanMeierResult
from protocol.config import DataDictionary, load_yaml
from site_node.harmonize import conform
from tests.datasets import Split

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "simulations" / "configs"
DS_SURVIVAL_DIR = REPO.parent / "shared" / "data" / "ds_survival"
TIGHT = {"precision": 1e-12}


# ----------------------------------------------------------------------------- data


def _split(raw: pd.DataFrame, site: pd.Series, dictionary_file: str) -> Split:
    """``raw`` split into sites by ``site``, conformed to the dictionary in ``configs``."""
    dictionary = load_yaml(CONFIGS / dictionary_file, DataDictionary)
    frames = {
        str(name): conform(rows.reset_index(drop=True), dictionary)[0]
        for name, rows in raw.groupby(site, sort=True)
    }
    return Split.of(frames, dictionary)


@pytest.fixture(scope="module")
def lung() -> Split:
    raw = load_lung()
    raw.columns = [c.replace(".", "_") for c in raw.columns]
    site = raw["inst"].map(lambda v: "inst_unknown" if pd.isna(v) else f"inst{int(v):02d}")
    return _split(raw.drop(columns="inst"), site, "lung_dictionary.yaml")


@pytest.fixture(scope="module")
def rossi() -> Split:
    raw = load_rossi()
    # Three sites by age at release: a rule that makes the sites differ, as hospitals do.
    site = pd.cut(raw["age"], [0, 20, 25, 100], labels=["young", "middle", "older"])
    return _split(raw, site.astype(str), "rossi_dictionary.yaml")


ROSSI_COVARIATES = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]


def _rossi_design(pooled: pd.DataFrame) -> pd.DataFrame:
    """Pooled Rossi rows with fin as the treatment dummy fin[T.1] (dictionary levels 0, 1)."""
    design = pooled[["week", "arrest", *ROSSI_COVARIATES, "site"]].copy()
    return design.rename(columns={"fin": "fin[T.1]"})


def _assert_cox(result: CoxResult, reference: CoxPHFitter) -> None:
    """Coefficients, standard errors and the partial log-likelihood to 1e-8 (absolute)."""
    assert set(result.coefficients) == set(reference.params_.index)
    for term in reference.params_.index:
        row = result.coefficients[term]
        assert row["estimate"] == pytest.approx(reference.params_[term], abs=1e-8), term
        assert row["std_error"] == pytest.approx(reference.standard_errors_[term], abs=1e-8)
        assert row["hazard_ratio"] == pytest.approx(np.exp(reference.params_[term]), rel=1e-8)
        assert row["p"] == pytest.approx(reference.summary.loc[term, "p"], rel=1e-6, abs=1e-12)
        assert row["ci_lower"] == pytest.approx(
            reference.confidence_intervals_.loc[term].iloc[0], abs=1e-8
        )
    assert result.log_likelihood == pytest.approx(reference.log_likelihood_, abs=1e-8)
    assert result.converged


def _assert_km(curve: dict[str, list[float]], reference: KaplanMeierFitter) -> None:
    """Survival to float precision, bands to 1e-8, at-risk and event counts exactly."""
    times = curve["times"]
    table = reference.event_table.loc[times]
    np.testing.assert_allclose(
        curve["survival"], reference.survival_function_.loc[times].iloc[:, 0], rtol=1e-14
    )
    bands = reference.confidence_interval_.loc[times]
    np.testing.assert_allclose(curve["ci_lower"], bands.iloc[:, 0], atol=1e-8)
    np.testing.assert_allclose(curve["ci_upper"], bands.iloc[:, 1], atol=1e-8)
    np.testing.assert_array_equal(curve["at_risk"], table["at_risk"])
    np.testing.assert_array_equal(curve["events"], table["observed"])
    # Every time lifelines lists (except its added 0) is one of ours.
    assert set(reference.event_table.index) - {0} == set(times)


# ----------------------------------------------------------------------------- lung


def test_lung_km_by_sex_equals_lifelines(lung: Split) -> None:
    result = lung.federate("kaplan_meier", {"time": "time", "event": "status", "group": "sex"})
    assert isinstance(result, KaplanMeierResult)
    assert len(result.contributing_sites) == 19
    for level in (1, 2):
        rows = lung.pooled[lung.pooled["sex"] == level]
        # lifelines 0.30: KaplanMeierFitter().fit(time, status) on the pooled rows of one sex
        reference = KaplanMeierFitter().fit(rows["time"], rows["status"])
        _assert_km(result.curves[str(level)], reference)
    assert result.medians()["1"] == reference_median(lung.pooled, 1)


def reference_median(pooled: pd.DataFrame, sex: int) -> float:
    rows = pooled[pooled["sex"] == sex]
    # lifelines 0.30: KaplanMeierFitter().fit(...).median_survival_time_
    return float(KaplanMeierFitter().fit(rows["time"], rows["status"]).median_survival_time_)


def test_lung_km_ungrouped_with_90_percent_bands(lung: Split) -> None:
    params = {"time": "time", "event": "status", "ci_level": 0.9}
    result = lung.federate("kaplan_meier", params)
    # lifelines 0.30: KaplanMeierFitter(alpha=0.1).fit(time, status) on the pooled rows
    reference = KaplanMeierFitter(alpha=0.1).fit(lung.pooled["time"], lung.pooled["status"])
    _assert_km(result.curves["all"], reference)
    assert result.values()["survival"] == result.curves["all"]["survival"]
    assert result.n == len(lung.pooled)


def test_lung_logrank_by_sex_equals_lifelines(lung: Split) -> None:
    result = lung.federate("logrank", {"time": "time", "event": "status", "group": "sex"})
    men, women = (lung.pooled[lung.pooled["sex"] == s] for s in (1, 2))
    # lifelines 0.30: logrank_test(T_men, T_women, E_men, E_women)
    reference = logrank_test(men["time"], women["time"], men["status"], women["status"])
    assert result.chi2 == pytest.approx(reference.test_statistic, rel=1e-10)
    assert result.p == pytest.approx(reference.p_value, rel=1e-8)
    assert result.dof == 1


def test_lung_multivariate_logrank_by_ecog_drops_empty_level(lung: Split) -> None:
    result = lung.federate("logrank", {"time": "time", "event": "status", "group": "ph_ecog"})
    rows = lung.pooled.dropna(subset=["ph_ecog"])
    # lifelines 0.30: multivariate_logrank_test(time, ph_ecog, status) on the pooled rows
    reference = multivariate_logrank_test(rows["time"], rows["ph_ecog"], rows["status"])
    assert result.chi2 == pytest.approx(reference.test_statistic, rel=1e-10)
    assert result.p == pytest.approx(reference.p_value, rel=1e-8)
    assert result.dof == reference.degrees_of_freedom == 3  # level 4 (bedbound) has no records
    assert any("levels without records left out: 4" in note for note in result.notes)
    assert sum(result.observed.values()) == rows["status"].sum()


LUNG_COX = ["age", "sex", "ph_karno", "wt_loss"]


def _lung_design(pooled: pd.DataFrame) -> pd.DataFrame:
    design = pooled[["time", "status", *LUNG_COX, "site"]].dropna().copy()
    design["sex[T.2]"] = (design.pop("sex") == 2).astype(float)
    return design


def test_lung_cox_efron_equals_lifelines(lung: Split) -> None:
    params = {"time": "time", "event": "status", "covariates": LUNG_COX}
    result = lung.federate("cox", params)
    design = _lung_design(lung.pooled).drop(columns="site")
    # lifelines 0.30: CoxPHFitter().fit(pooled complete cases, "time", "status",
    #                                   fit_options={"precision": 1e-12})  (Efron ties)
    reference = CoxPHFitter().fit(design, "time", "status", fit_options=TIGHT)
    _assert_cox(result, reference)
    assert result.n == len(design)
    assert result.events == design["status"].sum()


def test_lung_cox_stratified_by_site_equals_lifelines_strata(lung: Split) -> None:
    params = {"time": "time", "event": "status", "covariates": LUNG_COX, "strata_by_site": True}
    result = lung.federate("cox", params)
    # lifelines 0.30: CoxPHFitter().fit(pooled, "time", "status", strata=["site"],
    #                                   fit_options={"precision": 1e-12})
    reference = CoxPHFitter().fit(
        _lung_design(lung.pooled), "time", "status", strata=["site"], fit_options=TIGHT
    )
    _assert_cox(result, reference)


@pytest.mark.parametrize("strata_by_site", [False, True])
def test_lung_cox_breslow_equals_statsmodels(
    lung: Split,
    strata_by_site: bool,
) -> None:
    params = {
        "time": "time",
        "event": "status",
        "covariates": LUNG_COX,
        "ties": "breslow",
        "strata_by_site": strata_by_site,
    }
    result = lung.federate("cox", params)
    design = _lung_design(lung.pooled)
    exog = design[["age", "sex[T.2]", "ph_karno", "wt_loss"]]
    # statsmodels 0.15: PHReg(time, exog, status=status, ties="breslow",
    #                         strata=site if stratified).fit()
    reference = sm.PHReg(
        design["time"],
        exog,
        status=design["status"],
        ties="breslow",
        strata=design["site"] if strata_by_site else None,
    ).fit()
    for term, estimate, se in zip(exog.columns, reference.params, reference.bse, strict=True):
        assert result.coef(term) == pytest.approx(estimate, rel=1e-9), term
        assert result.coefficients[term]["std_error"] == pytest.approx(se, rel=1e-9), term
    assert result.log_likelihood == pytest.approx(reference.llf, rel=1e-12)


# ----------------------------------------------------------------------------- rossi


def test_rossi_cox_all_covariates_equals_lifelines(rossi: Split) -> None:
    params = {"time": "week", "event": "arrest", "covariates": ROSSI_COVARIATES}
    result = rossi.federate("cox", params)
    # lifelines 0.30: CoxPHFitter().fit(load_rossi(), "week", "arrest",
    #                                   fit_options={"precision": 1e-12})
    reference = CoxPHFitter().fit(
        _rossi_design(rossi.pooled).drop(columns="site"), "week", "arrest", fit_options=TIGHT
    )
    _assert_cox(result, reference)
    # lifelines' documented Rossi example: prio 0.09, exp(coef) 1.10 (a sanity anchor).
    assert result.coefficients["prio"]["hazard_ratio"] == pytest.approx(1.0960, abs=5e-4)


def test_rossi_cox_stratified_equals_lifelines_strata(rossi: Split) -> None:
    covariates = ["fin", "race", "wexp", "prio"]
    params = {"time": "week", "event": "arrest", "covariates": covariates, "strata_by_site": True}
    result = rossi.federate("cox", params)
    design = _rossi_design(rossi.pooled)[["week", "arrest", "fin[T.1]", "race", "wexp", "prio"]]
    # lifelines 0.30: CoxPHFitter().fit(pooled, "week", "arrest", strata=["site"],
    #                                   fit_options={"precision": 1e-12})
    reference = CoxPHFitter().fit(
        design.assign(site=rossi.pooled["site"]),
        "week",
        "arrest",
        strata=["site"],
        fit_options=TIGHT,
    )
    _assert_cox(result, reference)


def test_rossi_km_and_logrank_by_financial_aid(rossi: Split) -> None:
    params = {"time": "week", "event": "arrest", "group": "fin"}
    km = rossi.federate("kaplan_meier", params)
    test = rossi.federate("logrank", params)
    for level in (0, 1):
        rows = rossi.pooled[rossi.pooled["fin"] == level]
        # lifelines 0.30: KaplanMeierFitter().fit(week, arrest) on one arm
        _assert_km(km.curves[str(level)], KaplanMeierFitter().fit(rows["week"], rows["arrest"]))
    # lifelines 0.30: multivariate_logrank_test(week, fin, arrest)
    reference = multivariate_logrank_test(
        rossi.pooled["week"], rossi.pooled["fin"], rossi.pooled["arrest"]
    )
    assert test.chi2 == pytest.approx(reference.test_statistic, rel=1e-10)
    assert test.p == pytest.approx(reference.p_value, rel=1e-8)


def _coarsened(pooled: pd.DataFrame, time: str, width: float) -> pd.DataFrame:
    """The pooled rows with times rounded up to the grid 0 + k * width (as the sdc note says)."""
    return pooled.assign(**{time: np.ceil(pooled[time] / width - 1e-9) * width})


def _sdc_width(notes: list[str]) -> float:
    note = next(n for n in notes if n.startswith("sdc: event times coarsened"))
    return float(note.split("grid of width ")[1].split()[0])


def test_rossi_sdc_km_and_cox_equal_lifelines_on_the_coarsened_grid(rossi: Split) -> None:
    km = rossi.federate(
        "kaplan_meier", {"time": "week", "event": "arrest", "group": "fin"}, mode="sdc"
    )
    width = _sdc_width(km.notes)
    assert width > 1  # weekly counts of 1 or 2 at some site force a coarser grid
    coarse = _coarsened(rossi.pooled, "week", width)
    for level in (0, 1):
        rows = coarse[coarse["fin"] == level]
        # lifelines 0.30: KaplanMeierFitter().fit(coarsened week, arrest) on one arm
        _assert_km(km.curves[str(level)], KaplanMeierFitter().fit(rows["week"], rows["arrest"]))

    params = {"time": "week", "event": "arrest", "covariates": ROSSI_COVARIATES}
    cox = rossi.federate("cox", params, mode="sdc")
    cox_width = _sdc_width(cox.notes)
    design = _rossi_design(_coarsened(rossi.pooled, "week", cox_width)).drop(columns="site")
    # lifelines 0.30: CoxPHFitter().fit(coarsened pooled, "week", "arrest",
    #                                   fit_options={"precision": 1e-12})
    _assert_cox(cox, CoxPHFitter().fit(design, "week", "arrest", fit_options=TIGHT))


# ----------------------------------------------------------------------------- DataSHIELD


@pytest.fixture(scope="module")
def ds_survival() -> Split:
    if not DS_SURVIVAL_DIR.is_dir():
        pytest.skip(f"DataSHIELD survival studies not present at {DS_SURVIVAL_DIR}")
    dictionary = load_yaml(CONFIGS / "ds_survival_dictionary.yaml", DataDictionary)
    frames = {}
    for study in (1, 2, 3):
        raw = pd.read_csv(DS_SURVIVAL_DIR / f"collapse_no_missing_study{study}.csv")
        raw = raw.rename(columns={"SURVTIME": "survtime", "CENS": "cens"})
        raw.columns = [c.replace(".", "_") for c in raw.columns]
        frames[f"study{study}"] = conform(raw, dictionary)[0]
    return Split.of(frames, dictionary)


DS_COVARIATES = ["age_60", "female", "noise_56", "pm10_16", "bmi_26"]


def test_ds_survival_cox_and_km_equal_lifelines(
    ds_survival: Split,
) -> None:
    pooled = ds_survival.pooled
    # Times are given to three decimals: a 0.001 grid holds them exactly.
    base = {"time": "survtime", "event": "cens", "time_resolution": 0.001}
    result = ds_survival.federate("cox", base | {"covariates": DS_COVARIATES})
    design = pooled[["survtime", "cens", *DS_COVARIATES]].rename(columns={"female": "female[T.1]"})
    # lifelines 0.30: CoxPHFitter().fit(pooled studies, "survtime", "cens",
    #                                   fit_options={"precision": 1e-12})
    _assert_cox(result, CoxPHFitter().fit(design, "survtime", "cens", fit_options=TIGHT))

    km = ds_survival.federate("kaplan_meier", base)
    # lifelines 0.30: KaplanMeierFitter().fit(survtime, cens) on the pooled studies
    reference = KaplanMeierFitter().fit(pooled["survtime"], pooled["cens"])
    curve = km.curves["all"]
    # Our times are grid points k * 0.001; lifelines' are the parsed decimals.
    ours = pd.Series(curve["survival"], index=np.round(curve["times"], 6))
    theirs = reference.survival_function_.iloc[:, 0]
    theirs = theirs[theirs.index > 0]
    np.testing.assert_array_equal(ours.index, np.round(theirs.index, 6))
    np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), rtol=1e-14)
