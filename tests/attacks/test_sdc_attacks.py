"""The known attacks on exact (sdc) releases, replayed by a curious researcher against a site.

Each test is the attack's own short script, run through the site's whole trust boundary
(:class:`tests.attacks.harness.Researcher`: the coordinator's round driver over a real
``SiteRuntime``). On the code before the site privacy engine (commit 1030c74) every one of them
recovered Cleveland's 77-year-old man's cholesterol, 304 mg/dL, or the sample's extremes:

* all-vs-all-but-one differencing: 303 * 246.693 - 302 * 246.503 = 304;
* masking (dsBase issue 250), one query: 7 * 244 - 6 * 234 = 304;
* a GLM whose dummy level holds one record: Intercept + sex[T.1] = 304;
* the refusal oracle: a binary search on ``chol > M`` recovered 304 in 9 queries;
* quantiles at 0.0001 and 0.9999: intervals [125.5, 171.9] and [375, 578.1] hugging the
  smallest (126) and largest (564) values.

Now each is refused at the site, and no refusal carries a count. Two site set-ups are
attacked: the default (``sdc_filters: approved``, the study's populations and models pinned),
and a site that allows free-form filters in sdc, where the differencing guard, the filter rule
and the model checks must hold on their own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from analyses.results import AnalysisResult
from protocol.config import DataDictionary
from tests.attacks.harness import Refused, Researcher, sdc_site

#: The site's approval in the default set-up: the study population is the whole site; two
#: subgroups and two models are approved.
APPROVED: dict[str, Any] = {
    "populations": ["sex == 1", "sex == 0", "age >= 60"],
    "models": ["chol ~ age + sex", "disease ~ age + sex + chol"],
}
#: A site that lets researchers write any filter in sdc.
FREE: dict[str, Any] = {"sdc_filters": "free"}
SETUPS = pytest.mark.parametrize("approval", [APPROVED, FREE], ids=["approved", "free"])
TARGET_CHOL = 304.0  # the cholesterol of Cleveland's one 77-year-old man (row 161)


@pytest.fixture
def cleveland(heart_frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return heart_frames["cleveland"]


def researcher(
    tmp_path: Path, frame: pd.DataFrame, dictionary: DataDictionary, approval: dict[str, Any]
) -> Researcher:
    site = sdc_site(tmp_path, "cleveland", frame, dictionary, approval)
    return Researcher({"cleveland": site}, dictionary)


def refused(outcome: AnalysisResult | Refused) -> bool:
    return isinstance(outcome, Refused)


def assert_no_count(outcome: Refused, *protected: int) -> None:
    """A refusal names no protected count (the sizes the attack is after). What the refusal
    echoes of the request ('quoted') and of the site's approved list is not a count."""
    for reason in outcome.reasons.values():
        own_words = re.sub(r"approved: [^.]*\.", "", re.sub(r"'[^']*'", "", reason))
        numbers = {int(float(n)) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", own_words)}
        assert not numbers & set(protected), reason


# ----------------------------------------------------------------------------- differencing


@SETUPS
@pytest.mark.parametrize("order", ["all first", "all-but-one first"])
def test_all_versus_all_but_one_differencing_is_refused(
    tmp_path: Path,
    cleveland: pd.DataFrame,
    heart_dict: DataDictionary,
    approval: dict[str, Any],
    order: str,
) -> None:
    r = researcher(tmp_path, cleveland, heart_dict, approval)
    queries = [("", "chol"), ("age != 77", "chol")]
    if order != "all first":
        queries.reverse()
    first, second = (r.run("mean", flt, variable=var) for flt, var in queries)
    if not refused(first) and not refused(second):
        whole, part = (first, second) if order == "all first" else (second, first)
        leaked = whole.n * whole.mean - part.n * part.mean  # type: ignore[union-attr]
        pytest.fail(f"both means were released: the difference gives {leaked:.1f}")
    for outcome in (first, second):
        if isinstance(outcome, Refused):
            assert_no_count(outcome, 1, 302, 303)


@SETUPS
def test_differencing_through_a_model_whose_extra_covariate_is_missing_once_is_refused(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary, approval: dict[str, Any]
) -> None:
    # thal is missing for 2 of Cleveland's 303 records: a mean of chol over everyone and a
    # model with thal over the same (whole) population differ by those two records' sums.
    frame = cleveland.copy()
    frame.loc[161, "trestbps"] = float("nan")  # now exactly one record lacks trestbps
    r = researcher(tmp_path, frame, heart_dict, approval | {"models": ["chol ~ trestbps"]})
    whole = r.run("mean", variable="chol")
    assert not refused(whole), whole
    model = r.run("glm", formula="chol ~ trestbps", family="gaussian")
    assert refused(model), "the model's sums over 302 records difference the mean's over 303"


# ----------------------------------------------------------------------------- masking


@SETUPS
def test_masking_with_known_values_in_one_query_is_refused(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary, approval: dict[str, Any]
) -> None:
    # dsBase issue 250: six records known to hold chol 234 mask the target in one query.
    r = researcher(tmp_path, cleveland, heart_dict, approval)
    outcome = r.run("mean", "(age == 77 and trestbps == 125) or chol == 234", variable="chol")
    if not refused(outcome):
        leaked = outcome.n * outcome.mean - (outcome.n - 1) * 234  # type: ignore[union-attr]
        pytest.fail(f"the masked mean was released: it gives {leaked:.1f}")
    assert isinstance(outcome, Refused)
    assert_no_count(outcome, 1, 6, 7)


# ----------------------------------------------------------------------------- models


@SETUPS
def test_a_glm_whose_dummy_level_holds_one_record_is_refused(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary, approval: dict[str, Any]
) -> None:
    r = researcher(tmp_path, cleveland, heart_dict, approval | {"models": ["chol ~ sex"]})
    outcome = r.run("glm", "sex == 0 or (age == 77)", formula="chol ~ sex", family="gaussian")
    if not refused(outcome):
        leaked = float(outcome.summary["estimate"].sum())  # type: ignore[union-attr]
        pytest.fail(f"the model was released: Intercept + sex[T.1] = {leaked:.1f}")
    assert isinstance(outcome, Refused)
    assert_no_count(outcome, 1)


def test_a_model_saturated_at_one_record_is_refused_even_with_full_cells(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    # No categorical cell is small, yet a numeric covariate that is 0 for everyone but the
    # target gives the target a parameter of its own: Intercept + 5 * oldpeak = its chol.
    frame = cleveland.copy()
    frame["oldpeak"] = 0.0
    frame.loc[161, "oldpeak"] = 5.0
    r = researcher(tmp_path, frame, heart_dict, FREE | {"models": ["chol ~ oldpeak"]})
    outcome = r.run("glm", formula="chol ~ oldpeak", family="gaussian")
    if not refused(outcome):
        table = outcome.summary["estimate"]  # type: ignore[union-attr]
        leaked = float(table.iloc[0] + 5 * table.iloc[1])
        pytest.fail(f"the saturated fit was released: it gives {leaked:.1f}")


# ----------------------------------------------------------------------------- refusal oracles


def transcript(
    folder: Path,
    frame: pd.DataFrame,
    dictionary: DataDictionary,
    approval: dict[str, Any],
    queries: list[tuple[str, str, dict[str, Any]]],
) -> list[str]:
    """What a researcher reads from a run of queries: each result's values or refusal."""
    r = researcher(folder, frame, dictionary, approval)
    seen = []
    for analysis, flt, params in queries:
        outcome = r.run(analysis, flt, **params)
        seen.append(str(outcome) if refused(outcome) else repr(outcome.values()))  # type: ignore[union-attr]
    return seen


def with_target_chol(frame: pd.DataFrame, chol: float) -> pd.DataFrame:
    changed = frame.copy()
    changed.loc[161, "chol"] = chol
    return changed


@SETUPS
def test_the_refused_versus_zero_oracle_gives_nothing_to_a_binary_search(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary, approval: dict[str, Any]
) -> None:
    # The attack: "age == 77 and chol > M" was refused (1-2 records: the target is above M)
    # or answered 0 (none), so a binary search on M found 304 in 9 queries. The search's
    # queries are fixed here; what the researcher reads must not depend on the target's chol.
    queries = [("count", f"age == 77 and chol > {m}", {}) for m in (375, 212, 293, 334, 313)]
    real = transcript(tmp_path / "real", cleveland, heart_dict, approval, queries)
    other = with_target_chol(cleveland, 200.0)
    counterfactual = transcript(tmp_path / "other", other, heart_dict, approval, queries)
    assert real == counterfactual
    assert all(line.startswith("cleveland:") for line in real), real


@SETUPS
def test_an_identical_set_reached_by_another_filter_is_no_oracle(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary, approval: dict[str, Any]
) -> None:
    # Release "chol > M or age == 77", then ask "chol > M": the second set is the first, or
    # the first minus the target. If only the identical set were answered, answered-or-refused
    # would say whether the target's chol is above M: a binary search again.
    queries = []
    for m in (250, 280, 330):
        queries += [("count", f"chol > {m} or age == 77", {}), ("count", f"chol > {m}", {})]
    real = transcript(tmp_path / "real", cleveland, heart_dict, approval, queries)
    other = with_target_chol(cleveland, 200.0)
    counterfactual = transcript(tmp_path / "other", other, heart_dict, approval, queries)
    assert real[1::2] == counterfactual[1::2]
    assert all(line.startswith("cleveland:") for line in real[1::2]), real


# ----------------------------------------------------------------------------- quantiles


@SETUPS
def test_extreme_quantiles_that_hug_single_patients_are_refused(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary, approval: dict[str, Any]
) -> None:
    r = researcher(tmp_path, cleveland, heart_dict, approval)
    outcome = r.run("quantiles", variable="chol", probs=[0.0001, 0.9999])
    assert isinstance(outcome, Refused), outcome
    assert_no_count(outcome, 1, 2, 126, 564)
    ordinary = r.run("quantiles", variable="chol", probs=[0.25, 0.5, 0.75])
    assert not refused(ordinary), ordinary


# ----------------------------------------------------------------------------- survival


def test_a_survival_probe_names_no_site_and_the_horizon_cannot_be_searched(
    tmp_path: Path,
) -> None:
    # The attack: a small site next to large ones. The probe named "the sites with too few
    # events"; then a binary search on `horizon` (which censors later times) found the horizon
    # at which the small site's grid became safe, walking up to its event times.
    from simulations.bench_cox import synthetic_dictionary, synthetic_sites

    dictionary = synthetic_dictionary()
    frames = synthetic_sites(2, 400, seed=5)
    frames["small"] = next(iter(frames.values())).iloc[:4]
    sites = {
        name: sdc_site(tmp_path, name, frame, dictionary, FREE) for name, frame in frames.items()
    }
    r = Researcher(sites, dictionary)
    probe = r.run("kaplan_meier", time="time", event="event", time_resolution=1.0)
    if isinstance(probe, Refused):
        assert not any("small" in reason for reason in probe.reasons.values())
    else:
        assert {s.name for s in probe.sites if s.status == "ok"} >= {"site00", "site01"}
    searched = [
        r.run("kaplan_meier", time="time", event="event", horizon=h) for h in (913.0, 456.5)
    ]
    for outcome in searched:  # points between the public grid's are refused at every site
        assert isinstance(outcome, Refused), outcome
        assert all("lies on the public grid" in reason for reason in outcome.reasons.values())
