"""The public round state: the only thing a task carries, declared per analysis, validated.

Before the split, the scheduler sent the coordinator's whole memory to every site each round:
in dp Cox stratified by site, site B received site A's released event counts, sums of x and
the Hessian built from everyone's sums.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import analyses  # noqa: F401  (registers every analysis)
from analyses import get_analysis, registered_analyses
from analyses.base import AnalysisContext, NoState
from analyses.driver import RoundTask, SiteAnswer, SiteReply
from analyses.scripts import ScriptBundle
from analyses.testing import federate
from analyses.training.app import TrainingApp, builtin_app_paths
from protocol.config import DataDictionary
from protocol.errors import ValidationError
from tests import dp_noise

_TRAINING_APP = TrainingApp(*(Path(path).read_text() for path in builtin_app_paths()))
_AGE_SCRIPT = ScriptBundle(
    "import numpy as np\n\n\ndef per_record(frame):\n"
    "    return np.column_stack([frame.age.to_numpy(), np.ones(len(frame))])\n\n\n"
    "def combine(total, n):\n    return {'mean': total[0] / total[1]}\n",
    "name: age\nversion: '1'\nvariables: [age]\nk: 2\n"
    "bound: {norm: per_coordinate, value: [120, 1]}\nmode: dp\n",
)

#: One request per analysis, over the synthetic cohort's dictionary.
REQUESTS: dict[str, dict[str, Any]] = {
    "train": {
        "app": _TRAINING_APP.hash,
        "module": _TRAINING_APP.module,
        "manifest": _TRAINING_APP.manifest_text,
        "features": ["age", "sex", "stage"],
        "outcome": "event",
        "rounds": 3,
        "contributions": "shapley",
    },
    "script": {
        "hash": _AGE_SCRIPT.hash,
        "module": _AGE_SCRIPT.module,
        "manifest": _AGE_SCRIPT.manifest_text,
    },
    "count": {},
    "proportion": {"variable": "event"},
    "mean": {"variable": "age"},
    "histogram": {"variable": "age", "edges": [18, 50, 70, 100]},
    "quantiles": {"variable": "age", "probs": [0.25, 0.5]},
    "table": {"rows": "sex", "cols": "stage"},
    "mantel_haenszel": {"exposure": "sex", "outcome": "event"},
    "ttest": {"variable": "age", "group": "sex"},
    "correlation": {"variables": ["age", "biomarker"]},
    "quality": {"variables": ["age", "biomarker"]},
    "glm": {"formula": "event ~ age + sex", "family": "binomial"},
    "kaplan_meier": {"time": "time", "event": "event", "group": "sex", "horizon": 1000.0},
    "logrank": {"time": "time", "event": "event", "group": "sex", "horizon": 1000.0},
    "cox": {"time": "time", "event": "event", "covariates": ["age", "sex"], "horizon": 1000.0},
}


def test_every_registered_analysis_has_a_request_here() -> None:
    assert set(REQUESTS) == set(registered_analyses())


@pytest.mark.parametrize("mode", ["off", "sdc", "dp"])
@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_no_task_carries_a_key_the_analysis_did_not_declare_public(
    name: str, mode: str, sites: dict[str, pd.DataFrame], syn_dict: DataDictionary
) -> None:
    declared = set(get_analysis(name).state_model.model_fields)
    seen: list[dict[str, Any]] = []
    if name == "train" and mode != "off":
        # Training refuses sdc (no rule protects weights) and spends rho, not epsilon, in dp.
        refusal = "no disclosure-control rule" if mode == "sdc" else "spends zCDP rho"
        with pytest.raises(ValidationError, match=refusal):
            federate(name, sites, REQUESTS[name], syn_dict, mode, epsilon=5.0)
        return
    federate(
        name,
        sites,
        REQUESTS[name],
        syn_dict,
        mode,
        epsilon=5.0 if mode == "dp" else None,
        release=dp_noise.seeded_release(np.random.default_rng(1)),
        on_round=lambda step, spec, answers: seen.append(step.state),
    )
    assert seen
    for state in seen:
        assert set(state) <= declared, (name, mode, sorted(set(state) - declared))
        json.dumps(state, allow_nan=False)  # it travels as JSON, finite


def test_no_task_carries_another_sites_release_in_stratified_dp_cox(
    sites: dict[str, pd.DataFrame], syn_dict: DataDictionary
) -> None:
    released: list[np.ndarray] = []
    states: list[dict[str, Any]] = []

    def watch(step: RoundTask, spec: Any, answers: Mapping[str, SiteAnswer]) -> None:
        states.append(step.state)
        for answer in answers.values():
            assert isinstance(answer, SiteReply)
            released.extend(
                np.asarray(a, dtype=np.float64).ravel() for a in answer.record.arrays.values()
            )

    params = dict(REQUESTS["cox"], strata_by_site=True, dp_iterations=3)
    params.pop("horizon")
    federate(
        "cox", sites, params, syn_dict, "dp", epsilon=3.0,
        release=dp_noise.seeded_release(np.random.default_rng(2)), on_round=watch,
    )  # fmt: skip
    assert len(states) == 3
    for state in states:
        assert set(state) == {"phase", "event_idx", "beta"}
        carried = np.asarray(state["beta"], dtype=np.float64)
        for values in released:  # no released number (noisy, so distinctive) is in a task
            assert not np.isin(values[np.abs(values) > 1e-6], carried).any()


def test_a_site_refuses_an_undeclared_key_or_a_non_finite_value(
    syn_dict: DataDictionary,
) -> None:
    glm = get_analysis("glm")
    params = glm.parse_params(REQUESTS["glm"], syn_dict)
    ctx = AnalysisContext(syn_dict, "off", round=1)
    assert glm.parse_state({"beta": [0.1, 0.2, 0.3]}, params, ctx) == {"beta": [0.1, 0.2, 0.3]}
    with pytest.raises(ValidationError, match="glm round 1 state: hessian: is not a known field"):
        glm.parse_state({"beta": [0.1, 0.2, 0.3], "hessian": [[1.0]]}, params, ctx)
    with pytest.raises(ValidationError, match=r"glm round 1 state: beta\[0\]"):
        glm.parse_state(json.loads('{"beta": [NaN, 0, 0]}'), params, ctx)
    with pytest.raises(ValidationError, match="must be a JSON object"):
        glm.parse_state([1, 2], params, ctx)
    count = get_analysis("count")
    assert count.state_model is NoState
    with pytest.raises(ValidationError, match="count round 0 state: beta: is not a known field"):
        count.parse_state(
            {"beta": [1.0]}, count.parse_params({}, syn_dict), AnalysisContext(syn_dict)
        )
