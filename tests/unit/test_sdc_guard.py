"""The differencing guard's memory and rule, the dominance rule and the careless admin's cases.

The attacks themselves are in ``tests/attacks/``; these pin the guard's own behaviour: what it
remembers, across restarts and across the rounds of one request, and that its words never
depend on the sizes it protects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from protocol.config import DataDictionary, SDCThresholds
from protocol.errors import DisclosureError
from site_node.disclosure import RecordSet, check_dominance, guard_message
from site_node.ledger import SiteStore
from tests.attacks.harness import Refused, Researcher, sdc_site

FREE: dict[str, Any] = {"sdc_filters": "free"}


@pytest.fixture
def cleveland(heart_frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return heart_frames["cleveland"]


def researcher(
    tmp_path: Path, frame: pd.DataFrame, d: DataDictionary, **approval: Any
) -> Researcher:
    return Researcher({"cleveland": sdc_site(tmp_path, "cleveland", frame, d, FREE | approval)}, d)


def test_the_memory_survives_a_restart(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    first = researcher(tmp_path, cleveland, heart_dict)
    assert not isinstance(first.run("mean", variable="chol"), Refused)
    first.sites["cleveland"].close()
    again = researcher(tmp_path, cleveland, heart_dict)  # same state_dir: a restarted site
    assert isinstance(again.run("mean", "age != 77", variable="chol"), Refused)


def test_the_rounds_of_an_iterative_request_and_repeats_of_one_population_pass(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    r = researcher(tmp_path, cleveland, heart_dict)
    for _ in range(2):  # a count, a mean, a model over one population, twice
        assert not isinstance(r.run("count", "age >= 50"), Refused)
        assert not isinstance(r.run("mean", "age >= 50", variable="trestbps"), Refused)
        model = r.run("glm", "age >= 50", formula="disease ~ thalach + trestbps", family="binomial")
        assert not isinstance(model, Refused), model
        assert model.iterations >= 3  # type: ignore[union-attr]


def test_the_refusal_is_the_same_words_whatever_the_sizes(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    r = researcher(tmp_path, cleveland, heart_dict)
    r.run("count")
    reasons = set()
    for flt in ("age != 77", "age != 77 and age != 29", "age > 200", "age == 77"):
        outcome = r.run("count", flt)  # differ by 1 and 2; empty; a single record
        assert isinstance(outcome, Refused)
        reasons.add(outcome.reasons["cleveland"])
    assert reasons == {guard_message(SDCThresholds())}


def test_concurrent_differencing_releases_cannot_both_pass(tmp_path: Path) -> None:
    # Both pass the pre-check (nothing remembered yet); the commit checks again inside its
    # transaction, so only the first is released.
    store = SiteStore(tmp_path / "site.db", actor="site")
    whole = RecordSet.of("s1", "", np.arange(100))
    but_one = RecordSet.of("s1", "age != 77", np.arange(99))
    thresholds = SDCThresholds()
    store.precheck_release(whole, thresholds)
    store.precheck_release(but_one, thresholds)
    from protocol.wire.messages import TaskMessage

    store.commit_reply(
        TaskMessage("t1", "r1", "s1", "count", "r"), None, b"a", "x", {}, whole, thresholds
    )
    with pytest.raises(DisclosureError):
        store.commit_reply(
            TaskMessage("t2", "r2", "s1", "count", "r"), None, b"b", "y", {}, but_one, thresholds
        )
    assert store.stored_reply("t2") is None


def test_the_p_percent_rule_refuses_a_dominated_sum_and_passes_ordinary_ones(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    rule = SDCThresholds()
    check_dominance([np.array([120.0, 130.0, 250.0, 300.0])], rule)  # ordinary
    with pytest.raises(DisclosureError, match="p% rule"):
        # One cost of 10,000 among small ones: the second largest (8) and the rest (2) add up to
        # less than 10% of it, so the second largest contributor learns it nearly exactly.
        check_dominance([np.array([10_000.0, 8.0, 1.0, 1.0])], rule)
    frame = cleveland.copy()
    frame.loc[frame.index[:10], "oldpeak"] = 0.0
    frame.loc[frame.index[10:], "oldpeak"] = float("nan")
    frame.loc[frame.index[0], "oldpeak"] = 9.9
    r = researcher(tmp_path, frame, heart_dict)
    outcome = r.run("mean", variable="oldpeak")  # one value of 9.9 among nine zeros
    assert isinstance(outcome, Refused)
    assert "p% rule" in outcome.reasons["cleveland"]
    for variable in ("chol", "age", "trestbps"):
        assert not isinstance(r.run("mean", "sex == 0", variable=variable), Refused)
    # The t-test's sums are per group: the dominated group refuses it.
    ttest = r.run("ttest", variable="oldpeak", group="sex")
    assert isinstance(ttest, Refused)
    assert "p% rule" in ttest.reasons["cleveland"]
    assert not isinstance(r.run("ttest", variable="chol", group="sex"), Refused)
    # A gaussian GLM releases the same sum (X'y's intercept cell): `oldpeak ~ 1` is the mean
    # by another name, and `oldpeak ~ sex` sums it per level. Before the GLM had cells, both
    # passed and released 9.9 within the other records' (zero) total.
    for formula in ("oldpeak ~ 1", "oldpeak ~ sex"):
        model = r.run("glm", formula=formula, family="gaussian")
        assert isinstance(model, Refused), (formula, model)
        assert "p% rule" in model.reasons["cleveland"]
    assert not isinstance(r.run("glm", formula="chol ~ sex", family="gaussian"), Refused)
    # A correlation releases each variable's shifted sum, so it too is a mean by another name.
    correlation = r.run("correlation", variables=["oldpeak", "age"])
    assert isinstance(correlation, Refused), correlation
    assert "p% rule" in correlation.reasons["cleveland"]


def test_a_cox_covariate_dominated_within_the_model_or_a_grid_cell_is_refused(
    syn_dict: DataDictionary, sites: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    d = syn_dict
    frame = next(iter(sites.values())).copy()
    site = sdc_site(tmp_path / "ordinary", "s", frame, d, FREE)
    ordinary = Researcher({"s": site}, d).run(
        "cox", time="time", event="event", covariates=["biomarker", "age"]
    )
    assert not isinstance(ordinary, Refused), ordinary
    # One record's value among zeros in the first 500 days: on any public grid of width up to
    # 500, its cell's sum is nearly that record's value, which the differences of the risk-set
    # sums at beta 0 release. Overall the covariate is ordinary, so the fit is not saturated.
    early = frame.index[frame["time"] < 500]
    frame.loc[early, "biomarker"] = 0.0
    frame.loc[frame["time"].idxmin(), "biomarker"] = 4.5  # in the first cell of any width
    site = sdc_site(tmp_path / "dominated", "s", frame, d, FREE)
    outcome = Researcher({"s": site}, d).run(
        "cox", time="time", event="event", covariates=["biomarker", "age"]
    )
    assert isinstance(outcome, Refused), outcome
    assert "p% rule" in outcome.reasons["s"]


def test_a_careless_admin_approving_an_attack_population_is_still_protected(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    # The site approves the attack's filter and model itself: the model check holds alone.
    site = sdc_site(
        tmp_path,
        "cleveland",
        cleveland,
        heart_dict,
        {"populations": ["sex == 0 or (age == 77)"], "models": ["chol ~ sex"]},
    )
    r = Researcher({"cleveland": site}, heart_dict)
    outcome = r.run("glm", "sex == 0 or (age == 77)", formula="chol ~ sex", family="gaussian")
    assert isinstance(outcome, Refused)
    assert (
        "a level, an interaction cell or a value of a 0/1 term holds fewer than 3"
        in (outcome.reasons["cleveland"])
    )


def test_a_cox_dummy_level_holding_one_record_is_refused(
    syn_dict: DataDictionary, sites: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    frame = next(iter(sites.values())).copy()
    frame["sex"] = 0.0
    frame.loc[frame.index[0], "sex"] = 1.0  # one record holds the level 1
    site = sdc_site(tmp_path, "s", frame, syn_dict, FREE)
    r = Researcher({"s": site}, syn_dict)
    outcome = r.run("cox", time="time", event="event", covariates=["sex", "age"])
    assert isinstance(outcome, Refused), outcome
    assert (
        "a level, an interaction cell or a value of a 0/1 term holds fewer than 3"
        in (outcome.reasons["s"])
    )
