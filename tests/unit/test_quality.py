"""The ``quality`` analysis: profiles per site and variable, checked against pandas on the raw
data, the sdc rules that withhold small cells, the differencing guard over every row, dp noise,
and the scorecard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pytest

from analyses import AnalysisContext, get_analysis
from analyses.base import DUPLICATE_ID
from analyses.quality import COUNTS, QualityResult
from protocol.config import DataDictionary, SDCThresholds
from simulations.heart import SITES, heart_dictionary, read_raw
from site_node.privacy import privatize
from tests.attacks.harness import Refused, Researcher, sdc_site

matplotlib.use("Agg")

FREE: dict[str, Any] = {"sdc_filters": "free"}


@pytest.fixture(scope="module")
def raw() -> dict[str, pd.DataFrame]:
    return {site: read_raw(site) for site in SITES}


def heart_researcher(tmp_path: Path, raw: dict[str, pd.DataFrame]) -> Researcher:
    d = heart_dictionary()
    return Researcher({s: sdc_site(tmp_path, s, frame, d, FREE) for s, frame in raw.items()}, d)


def test_the_uci_scorecard_shows_switzerland_and_va_cholesterol_out_of_range(
    tmp_path: Path, raw: dict[str, pd.DataFrame]
) -> None:
    result = heart_researcher(tmp_path, raw).run("quality", variables=["chol", "age"])
    assert isinstance(result, QualityResult), result
    d = heart_dictionary()
    low, high = d.bounds("chol")
    for site, frame in raw.items():
        # Reference: pandas on the raw file. chol is declared in [50, 700]; UCI codes an
        # unknown cholesterol as 0, and a "?" is missing.
        chol = frame["chol"]
        expected = {
            "n": len(frame),
            "missing": int(chol.isna().sum()),
            "out_of_range": int(((chol < low) | (chol > high)).sum()),
            "implausible": 0,
            "out_of_order": 0,
        }
        profile = result.profiles[site]["chol"]
        assert {k: profile[k] for k in expected} == expected, site
        usable = (expected["n"] - expected["missing"] - expected["out_of_range"]) / expected["n"]
        assert profile["usable"] == pytest.approx(usable, abs=1e-12)
    # The figures: all 123 of Switzerland's values, and 49 of VA's.
    assert result.profiles["switzerland"]["chol"]["out_of_range"] == 123
    assert result.profiles["switzerland"]["chol"]["n"] == 123
    assert result.profiles["va"]["chol"]["out_of_range"] == 49
    card = result.scorecard
    assert list(card.columns) == ["chol", "age"] and set(card.index) == set(SITES)
    assert card.loc["switzerland", "chol"] == 0.0 and card.loc["cleveland", "chol"] == 1.0
    # The JSON contract: under each site and variable.
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["profiles"]["va"]["chol"]["out_of_range"] == 49
    assert QualityResult.from_dict(doc).profiles == result.profiles
    ax = result.plot()
    assert ax.images and ax.images[0].get_array().shape == (4, 2)


def quality_dictionary() -> DataDictionary:
    return DataDictionary.model_validate(
        {
            "patient_id": "pid",
            "variables": {
                "weight": {"type": "numeric", "min": 20, "max": 300, "plausible": [35, 200]},
                "admitted": {"type": "numeric", "min": 0, "max": 20000},
                "discharged": {"type": "numeric", "min": 0, "max": 20000},
                "sex": {"type": "categorical", "levels": [0, 1]},
            },
            "order_checks": [{"earlier": "admitted", "later": "discharged"}],
        }
    )


def synthetic_raw(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    admitted = rng.integers(0, 15000, rows).astype(float)
    frame = pd.DataFrame(
        {
            "pid": [f"P{i:05d}" for i in range(rows)],
            "weight": rng.normal(80, 30, rows).round(1),
            "admitted": admitted,
            "discharged": admitted + rng.integers(-30, 60, rows),
            "sex": rng.choice([0.0, 1.0, 2.0, np.nan], rows, p=[0.45, 0.45, 0.05, 0.05]),
        }
    )
    frame.loc[rng.random(rows) < 0.07, "weight"] = np.nan
    frame.loc[rng.random(rows) < 0.03, "admitted"] = np.nan
    frame.loc[rows - 40 :, "pid"] = frame.loc[:39, "pid"].to_numpy()  # 40 ids twice
    return frame


def test_implausible_out_of_order_and_duplicated_ids_equal_pandas(tmp_path: Path) -> None:
    d = quality_dictionary()
    raw = synthetic_raw(2000, seed=3)
    site = sdc_site(tmp_path, "s", raw, d, FREE)
    result = Researcher({"s": site}, d).run(
        "quality", variables=["weight", "admitted", "discharged", "sex"]
    )
    assert isinstance(result, QualityResult), result
    # Reference: pandas on the raw frame, with the dictionary's rules written out.
    w = raw["weight"]
    allowed = w.between(20, 300)
    backwards = raw["admitted"] > raw["discharged"]  # NaN compares False
    expected = {
        "weight": (w.isna().sum(), (w.notna() & ~allowed).sum(),
                   (allowed & ~w.between(35, 200)).sum(), 0),
        "admitted": (raw["admitted"].isna().sum(), 0, 0, backwards.sum()),
        "discharged": (0, (raw["discharged"] < 0).sum(), 0, backwards.sum()),
        "sex": (raw["sex"].isna().sum(), (raw["sex"] == 2).sum(), 0, 0),
    }  # fmt: skip
    for variable, counts in expected.items():
        got = tuple(result.profiles["s"][variable][k] for k in COUNTS)
        assert got == tuple(float(c) for c in counts), variable
        assert result.profiles["s"][variable]["n"] == 2000
    assert result.duplicate_ids["s"] == raw["pid"].duplicated().sum() == 40


def test_a_small_cell_withholds_the_variable_without_a_count(tmp_path: Path) -> None:
    d = quality_dictionary()
    raw = synthetic_raw(300, seed=4)
    raw["weight"] = 80.0
    raw.loc[0, "weight"] = np.nan  # one missing weight
    raw["sex"] = 1.0
    raw.loc[[1, 2], "sex"] = 7.0  # two values not allowed
    raw["admitted"] = 10.0
    raw["discharged"] = 20.0
    raw.loc[3, "discharged"] = 5.0  # one record out of order
    raw["pid"] = [f"P{i}" for i in range(300)]
    raw.loc[299, "pid"] = "P0"  # one id twice
    site = sdc_site(tmp_path, "s", raw, d, FREE)
    result = Researcher({"s": site}, d).run(
        "quality", variables=["weight", "sex", "admitted", "discharged"]
    )
    assert isinstance(result, QualityResult), result
    for variable in ("weight", "sex", "admitted", "discharged"):
        assert result.profiles["s"][variable] == {"n": 300.0, "withheld": True}, variable
    assert np.isnan(result.duplicate_ids["s"])
    assert "withheld" in str(result) and "smallest cell" in result.notes[0]
    # The count is nowhere in what the researcher reads.
    text = json.dumps(result.to_dict()["profiles"])
    assert '"missing"' not in text and '"out_of_range"' not in text


def test_a_small_cell_by_difference_is_withheld_too(tmp_path: Path) -> None:
    d = quality_dictionary()
    raw = synthetic_raw(300, seed=5)
    raw["weight"] = np.nan
    raw.loc[[0, 1], "weight"] = 80.0  # 298 missing: n - missing = 2 usable values
    raw["pid"] = [f"P{i}" for i in range(300)]
    site = sdc_site(tmp_path, "s", raw, d, FREE)
    result = Researcher({"s": site}, d).run("quality", variables=["weight"])
    assert isinstance(result, QualityResult), result
    assert result.profiles["s"]["weight"] == {"n": 300.0, "withheld": True}


def test_the_guard_covers_every_row_so_a_missing_value_cannot_be_differenced(
    tmp_path: Path, raw: dict[str, pd.DataFrame]
) -> None:
    # Cleveland's ca is missing for 4 patients. A profile counts them, so its record set is
    # every row of the frame, not ca's complete cases (as a mean's would be): a profile over
    # everyone and one over everyone but one of them differ by that patient's row.
    frame = raw["cleveland"]
    target = frame.loc[frame.index[frame["ca"].isna()][0]]
    who = f"age == {target['age']:g} and chol == {target['chol']:g}"
    assert len(frame.query(who)) == 1  # the researcher's background knowledge: one patient
    d = heart_dictionary()
    r = Researcher({"cleveland": sdc_site(tmp_path, "cleveland", frame, d, FREE)}, d)
    first = r.run("quality", variables=["ca"])
    assert isinstance(first, QualityResult), first
    remembered = [len(rs.rows) for rs in r.sites["cleveland"]._row_sets.values()]
    assert remembered == [len(frame)] and first.profiles["cleveland"]["ca"]["missing"] == 4
    second = r.run("quality", f"not ({who})", variables=["ca"])
    assert isinstance(second, Refused), second
    assert "differ" in second.reasons["cleveland"] or "fewer than" in second.reasons["cleveland"]


def test_dp_profiles_are_noisy_with_the_stated_sd_and_charge_the_ledger(tmp_path: Path) -> None:
    d = quality_dictionary()
    raw = synthetic_raw(1000, seed=6)
    site = sdc_site(tmp_path, "s", raw, d, FREE)
    analysis = get_analysis("quality")
    params = analysis.parse_params({"variables": ["weight", "sex"]}, d)
    ctx = AnalysisContext(d, "dp", SDCThresholds(), source=site.source)
    spec = analysis.declare(params, ctx)
    exact = analysis.local(site.data, params, ctx)
    errors = []
    stated = None
    for _ in range(400):
        record = privatize(spec, exact, "dp", 1.0, SDCThresholds())
        errors.append(np.asarray(record["counts"]) - exact["counts"])
        stated = record.releases["counts"].variance() ** 0.5
    # Reference: the discrete Laplace's sd the record states; observed over stated within
    # 0.85 .. 1.15 over 400 releases of 8 cells.
    observed = float(np.std(np.concatenate([e.ravel() for e in errors])))
    assert stated is not None and stated > 0
    assert 0.85 < observed / stated < 1.15, (observed, stated)
    assert len(site.data) == 1000 and DUPLICATE_ID in site.source.columns
    # Through a site whose approval is dp: the request is charged like any release.
    unique = raw.assign(pid=[f"P{i}" for i in range(len(raw))])
    approval = {"mode": "dp", "budget": 1.0, "epsilon_per_request": 1.0}
    dp_site = sdc_site(tmp_path / "dp", "s", unique, d, approval)
    outcome = Researcher({"s": dp_site}, d, mode="dp").run(
        "quality", epsilon=0.5, variables=["weight"]
    )
    assert isinstance(outcome, QualityResult), outcome
    assert outcome.noise_sd > 0 and outcome.privacy.mode == "dp"
    assert dp_site.store.spent("s1").epsilon == pytest.approx(0.5)
    weight = outcome.profiles["s"]["weight"]
    assert abs(weight["missing"] - unique["weight"].isna().sum()) < 12 * outcome.noise_sd


def test_a_study_minimum_quality_leaves_a_poor_site_out_saying_why(
    tmp_path: Path, raw: dict[str, pd.DataFrame]
) -> None:
    d = heart_dictionary()
    sites = {s: sdc_site(tmp_path, s, frame, d, FREE) for s, frame in raw.items()}
    r = Researcher(sites, d, min_quality={"chol": 0.5})
    result = r.run("mean", variable="chol")
    assert not isinstance(result, Refused), result
    status = {s.name: s for s in result.sites}
    # Switzerland's cholesterol is all 0 (not allowed): 0% usable, below the study's 50%.
    assert status["switzerland"].status == "refused"
    reason = status["switzerland"].reason
    assert "'chol' (at least 50% required)" in reason and "minimum quality" in reason
    assert "0%" not in reason.replace("50%", "")  # the site's own share is never said
    # Reference: pandas on the three other hospitals' allowed values (chol in [50, 700]).
    kept = pd.concat([raw[s]["chol"] for s in ("cleveland", "hungarian", "va")])
    kept = kept[(kept >= 50) & (kept <= 700)]
    assert result.n == len(kept)
    assert result.mean == pytest.approx(kept.mean(), rel=1e-12)  # type: ignore[attr-defined]
    # A filter on the poor variable leaves the site out too; other variables are untouched.
    filtered = r.run("count", "chol > 200")
    assert not isinstance(filtered, Refused)
    assert {s.name for s in filtered.sites if s.status == "refused"} == {"switzerland"}
    everyone = r.run("mean", variable="age")
    assert not isinstance(everyone, Refused) and len(everyone.contributing_sites) == 4
    # The quality profile itself is how a study measures it: never left out.
    profile = r.run("quality", variables=["chol"])
    assert isinstance(profile, QualityResult) and "switzerland" in profile.profiles


def test_the_higher_of_the_study_and_site_minimum_applies(
    tmp_path: Path, raw: dict[str, pd.DataFrame]
) -> None:
    d = heart_dictionary()
    # VA's cholesterol: 49 not allowed and 7 missing of 200, 72% usable. The study asks 50%,
    # the site's own approval 80%: VA leaves chol out.
    strict = {**FREE, "min_quality": {"chol": 0.8}}
    site = sdc_site(tmp_path, "va", raw["va"], d, strict)
    assert site.usable_share("chol") == pytest.approx(
        raw["va"]["chol"].between(50, 700).mean(), abs=1e-12
    )
    outcome = Researcher({"va": site}, d, min_quality={"chol": 0.5}).run("mean", variable="chol")
    assert isinstance(outcome, Refused)
    assert "'chol' (at least 80% required)" in outcome.reasons["va"]
    assert outcome.codes["va"] == "quality"
    lenient = sdc_site(tmp_path / "lenient", "va", raw["va"], d, FREE)
    assert not isinstance(
        Researcher({"va": lenient}, d, min_quality={"chol": 0.5}).run("mean", variable="chol"),
        Refused,
    )


def test_one_patients_row_moves_the_dp_counts_within_the_declared_sensitivity(
    tmp_path: Path,
) -> None:
    # The dp claim, checked on neighbouring data: adding or removing any one row moves n and
    # duplicate_ids by at most 1 and the per-variable counts by at most 2 per variable in L1
    # (what `declare` states), whatever the row holds.
    d = quality_dictionary()
    raw = synthetic_raw(400, seed=12)
    variables = ["weight", "admitted", "discharged", "sex"]
    analysis = get_analysis("quality")
    params = analysis.parse_params({"variables": variables}, d)

    def counts(frame: pd.DataFrame, name: str) -> dict[str, Any]:
        site = sdc_site(tmp_path / name, "s", frame, d, FREE)
        ctx = AnalysisContext(d, "dp", SDCThresholds(), source=site.source)
        out = analysis.local(site.data, params, ctx)
        site.close()
        return out

    spec = analysis.declare(params, AnalysisContext(d, "dp"))
    base = counts(raw, "base")
    rng = np.random.default_rng(0)
    for trial, i in enumerate(rng.choice(len(raw), 12, replace=False)):
        for neighbour in (raw.drop(index=i), pd.concat([raw, raw.iloc[[i]]])):
            moved = counts(neighbour.reset_index(drop=True), f"n{trial}-{len(neighbour)}")
            for name, array in spec.arrays.items():
                change = np.abs(np.asarray(moved[name]) - np.asarray(base[name])).sum()
                assert change <= array.sensitivity + 1e-9, (name, change, array.sensitivity)
