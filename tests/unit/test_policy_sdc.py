"""The site's policy for exact releases and sensitive variables: default deny, in plain words.

* sdc runs only the approval's populations and models (``sdc_filters: approved``, the default),
  compared in canonical form; ``free`` filters may not pin a released variable.
* Sensitivity classes: identifiers never, quasi-identifiers in sdc only coarsened, sensitive
  variables only where the approval names them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from coordinator.studies import check_request, check_study_terms
from protocol.config import (
    AnalysisRequest,
    DataDictionary,
    StudyApproval,
    StudyConfig,
    load_yaml,
)
from protocol.errors import ConfigError, ValidationError
from tests.attacks.harness import Refused, Researcher, sdc_site


@pytest.fixture
def cleveland(heart_frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return heart_frames["cleveland"]


def classed(dictionary: DataDictionary, **classes: str) -> DataDictionary:
    """The dictionary with some variables given a sensitivity class."""
    variables = {
        name: var.model_copy(update={"sensitivity": classes[name]}) if name in classes else var
        for name, var in dictionary.variables.items()
    }
    return dictionary.model_copy(update={"variables": variables})


def ask(
    tmp_path: Path,
    frame: pd.DataFrame,
    dictionary: DataDictionary,
    approval: dict[str, Any],
    analysis: str,
    filter: str = "",
    mode: str = "sdc",
    **params: Any,
) -> Any:
    site = sdc_site(tmp_path, "cleveland", frame, dictionary, {"mode": mode, **approval})
    r = Researcher({"cleveland": site}, dictionary, mode=mode)
    return r.run(analysis, filter, epsilon=0.5 if mode == "dp" else None, **params)


def reason(outcome: Any) -> str:
    assert isinstance(outcome, Refused), outcome
    return outcome.reasons["cleveland"]


def test_a_new_approval_pins_sdc_to_its_populations_and_models() -> None:
    approval = StudyApproval(id="s1", mode="sdc")
    assert approval.sdc_filters == "approved"
    assert approval.populations == [] and approval.models == []


def test_an_unapproved_filter_is_refused_naming_what_is_approved(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    approval = {"populations": ["sex == 1", "age >= 60"]}
    text = reason(ask(tmp_path, cleveland, heart_dict, approval, "count", "age >= 61"))
    assert text == (
        "filter 'age >= 61' is not an approved population of study 's1' for exact (sdc) "
        "releases here; approved: sex == 1; age >= 60. Free-form filters are available in dp"
    )
    # The same population written differently is the approved one.
    for spelling in ("(age>=60)", "((age >= 60))"):
        outcome = ask(tmp_path / spelling, cleveland, heart_dict, approval, "count", spelling)
        assert not isinstance(outcome, Refused), outcome
    # dp: free-form filters are fine.
    dp = ask(tmp_path / "dp", cleveland, heart_dict, approval, "count", "age >= 61", mode="dp")
    assert not isinstance(dp, Refused), dp


def test_an_unapproved_model_is_refused_and_term_order_does_not_matter(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    approval = {"models": ["chol ~ age + sex", "disease ~ age*sex"]}
    text = reason(ask(tmp_path, cleveland, heart_dict, approval, "glm", formula="chol ~ age + cp"))
    assert "model 'chol ~ 1 + age + cp' is not an approved model of study 's1'" in text
    assert "approved: chol ~ age + sex; disease ~ age*sex" in text
    for formula in ("chol ~ sex + age", "disease ~ sex:age + sex + age"):
        folder = tmp_path / formula.replace(" ", "")
        family = "binomial" if formula.startswith("disease") else "gaussian"
        outcome = ask(
            folder, cleveland, heart_dict, approval, "glm", formula=formula, family=family
        )
        assert not isinstance(outcome, Refused), outcome


def test_a_free_filter_may_not_read_a_released_variable(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    free = {"sdc_filters": "free"}
    text = reason(ask(tmp_path, cleveland, heart_dict, free, "mean", "chol > 200", variable="chol"))
    assert "a free-form sdc filter may not read chol" in text
    fine = ask(tmp_path / "ok", cleveland, heart_dict, free, "mean", "chol > 200", variable="age")
    assert not isinstance(fine, Refused), fine


def test_invalid_approved_populations_and_models_fail_at_load(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    with pytest.raises(ConfigError, match=r"population 'weight > 3'.*not in the data dictionary"):
        sdc_site(tmp_path, "x", cleveland, heart_dict, {"populations": ["weight > 3"]})
    with pytest.raises(ConfigError, match="model 'chol ~ log\\(age\\)'"):
        sdc_site(tmp_path, "y", cleveland, heart_dict, {"models": ["chol ~ log(age)"]})


@pytest.mark.parametrize("mode", ["sdc", "dp"])
def test_an_identifier_is_never_analysed_or_filtered_on(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary, mode: str
) -> None:
    dictionary = classed(heart_dict, thalach="identifier")
    free = {"sdc_filters": "free"}
    for analysis, flt, params in (
        ("mean", "", {"variable": "thalach"}),
        ("count", "thalach > 100", {}),
        ("histogram", "", {"variable": "thalach", "edges": [50, 150, 250]}),
    ):
        folder = tmp_path / f"{analysis}{bool(flt)}"
        text = reason(ask(folder, cleveland, dictionary, free, analysis, flt, mode, **params))
        assert text.startswith("thalach: an identifier in the data dictionary"), text


def test_a_quasi_identifier_is_released_in_sdc_only_on_public_bins(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    dictionary = classed(heart_dict, age="quasi-identifier")
    free = {"sdc_filters": "free"}
    exact = reason(ask(tmp_path / "m", cleveland, dictionary, free, "mean", variable="age"))
    assert "age: a quasi-identifier, which sdc releases only on public bins or levels" in exact
    filtered = reason(
        ask(tmp_path / "f", cleveland, dictionary, free, "mean", "age > 60", variable="chol")
    )
    assert "a free-form sdc filter may not read age" in filtered
    binned = ask(tmp_path / "h", cleveland, dictionary, free, "histogram", variable="age",
                 edges=[0, 40, 50, 60, 70, 120])  # fmt: skip
    assert not isinstance(binned, Refused), binned
    approved = ask(tmp_path / "a", cleveland, dictionary, {"populations": ["age > 60"]}, "mean",
                   "age > 60", variable="chol")  # fmt: skip
    assert not isinstance(approved, Refused), approved  # a population the site reviewed
    dp = ask(tmp_path / "dp", cleveland, dictionary, free, "mean", mode="dp", variable="age")
    assert not isinstance(dp, Refused), dp


def test_a_sensitive_variable_needs_the_approval_to_name_it(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    dictionary = classed(heart_dict, thal="sensitive")
    free = {"sdc_filters": "free"}
    text = reason(ask(tmp_path / "no", cleveland, dictionary, free, "table", rows="thal"))
    assert text == (
        "thal: sensitive in the data dictionary, and this site's approval of study 's1' does "
        "not name it (sensitive_variables); ask the site admin"
    )
    named = free | {"sensitive_variables": ["thal"]}
    outcome = ask(tmp_path / "yes", cleveland, dictionary, named, "table", rows="thal")
    assert not isinstance(outcome, Refused), outcome


def sdc_study(**terms: Any) -> StudyConfig:
    return StudyConfig.model_validate(
        {"id": "s1", "title": "t", "privacy": {"mode": "sdc"}, "sdc": terms}
    )


def test_the_coordinator_refuses_a_request_outside_the_studys_sdc_terms_before_any_task(
    heart_dict: DataDictionary,
) -> None:
    study = sdc_study(populations=["age >= 60"], models=["chol ~ age + sex"])
    fine = [
        AnalysisRequest(analysis="count", filter="(age>=60)"),
        AnalysisRequest(analysis="glm", params={"formula": "chol ~ sex + age"}),
        AnalysisRequest(analysis="mean", params={"variable": "chol"}),
    ]
    for request in fine:
        check_request(study, request, heart_dict)
    with pytest.raises(ValidationError, match="filter 'age > 60' is not an approved population"):
        check_request(study, AnalysisRequest(analysis="count", filter="age > 60"), heart_dict)
    with pytest.raises(ValidationError, match="model 'chol ~ 1 \\+ age' is not an approved"):
        request = AnalysisRequest(analysis="glm", params={"formula": "chol ~ age"})
        check_request(study, request, heart_dict)
    # A dp study, or one without terms, leaves filters to the sites.
    dp = study.model_copy(update={"privacy": study.privacy.model_copy(update={"mode": "dp"})})
    check_request(dp, AnalysisRequest(analysis="count", filter="age > 60"), heart_dict)


def test_a_study_with_an_invalid_sdc_term_is_refused_when_created(
    heart_dict: DataDictionary,
) -> None:
    with pytest.raises(ValidationError, match="study s1: sdc population 'weight > 3'"):
        check_study_terms(sdc_study(populations=["weight > 3"]), heart_dict)
    with pytest.raises(ValidationError, match=r"study s1: sdc model 'chol ~ log\(age\)'"):
        check_study_terms(sdc_study(models=["chol ~ log(age)"]), heart_dict)


def test_a_study_minimum_quality_is_checked_when_the_study_is_written(
    heart_dict: DataDictionary, tmp_path: Path
) -> None:
    path = tmp_path / "study.yaml"
    path.write_text("id: s1\ntitle: t\nmin_quality: {chol: 0.52}\n")
    with pytest.raises(ConfigError, match=r"min_quality.chol: 0.52 is not a share in \(0, 1\]"):
        load_yaml(path, StudyConfig)
    study = StudyConfig.model_validate({"id": "s1", "title": "t", "min_quality": {"weight": 0.5}})
    with pytest.raises(ValidationError, match=r"study s1: min_quality names \['weight'\]"):
        check_study_terms(study, heart_dict)
