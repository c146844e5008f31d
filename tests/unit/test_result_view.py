"""Results received over the API are the analysis's own result objects, rebuilt from JSON."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import json

import pandas as pd
import pytest

from analyses.testing import federate
from coordinator.client import result_from_json


def received(local):
    """What the researcher's client returns for ``local`` after the HTTP API's JSON."""
    return result_from_json(json.loads(json.dumps(local.to_dict())))


CASES = [
    ("count", {}),
    ("mean", {"variable": "chol"}),
    ("histogram", {"variable": "age", "edges": [20, 40, 60, 80]}),
    ("quantiles", {"variable": "age", "probs": [0.25, 0.5]}),
    ("table", {"rows": "cp", "cols": "disease"}),
    ("mantel_haenszel", {"exposure": "exang", "outcome": "disease"}),
    ("ttest", {"variable": "age", "group": "disease"}),
    ("correlation", {"variables": ["age", "thalach"]}),
    ("glm", {"formula": "disease ~ age + sex", "family": "binomial"}),
]


@pytest.mark.parametrize(("name", "params"), CASES, ids=[c[0] for c in CASES])
def test_a_received_result_has_summary_print_and_plot(name, params, heart_frames, heart_dict):
    local = federate(name, heart_frames, params, heart_dict)
    view = received(local)
    assert type(view) is type(local)
    assert view.to_dict() == local.to_dict()
    assert view["analysis"] == name
    summary = view.summary
    assert isinstance(summary, pd.DataFrame) and not summary.empty
    assert str(view) == str(local)
    assert str(view).startswith(f"<{type(local).__name__} ")
    assert view.plot() is not None


def test_glm_view_matches_the_object(heart_frames, heart_dict):
    params = {"formula": "disease ~ age + sex", "family": "binomial"}
    local = federate("glm", heart_frames, params, heart_dict)
    view = received(local)
    assert view.coef("age") == local.coef("age")
    assert set(view.summary.index) == {"Intercept", "sex[T.1]", "age"}
    assert (
        view.summary.loc["age", "std_error"] == local.to_dict()["coefficients"]["age"]["std_error"]
    )


def test_kaplan_meier_view_is_a_curve(tmp_path):
    import numpy as np

    from protocol.config import DataDictionary

    dictionary = DataDictionary.model_validate(
        {
            "variables": {
                "time": {"type": "numeric", "min": 0, "max": 100},
                "event": {"type": "binary"},
            }
        }
    )
    rng = np.random.default_rng(3)
    frames = {
        f"s{i}": pd.DataFrame(
            {
                "time": rng.integers(1, 90, 200).astype(float),
                "event": rng.integers(0, 2, 200).astype(float),
            }
        )
        for i in range(2)
    }
    local = federate("kaplan_meier", frames, {"time": "time", "event": "event"}, dictionary)
    view = received(local)
    assert list(view.summary["survival"]) == local.to_dict()["survival"]
    assert view.plot() is not None


@pytest.mark.parametrize(
    ("name", "params", "counts"),
    [
        ("count", {}, ["920"]),
        ("mean", {"variable": "chol"}, ["718"]),
        ("histogram", {"variable": "age", "edges": [20, 40, 60, 80], "group": "disease"}, ["54"]),
        ("table", {"rows": "cp", "cols": "disease"}, ["26", "392"]),
        ("mantel_haenszel", {"exposure": "exang", "outcome": "disease"}, ["865"]),
        ("ttest", {"variable": "age", "group": "disease"}, ["920"]),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_counts_print_as_whole_numbers(name, params, counts, heart_frames, heart_dict):
    local = federate(name, heart_frames, params, heart_dict)
    for printed in (str(local), str(received(local))):
        header = printed.splitlines()[0]
        assert f"n={local.n:.0f}," in header, header
        for count in counts:
            assert f" {count}\n" in printed + "\n" or f" {count} " in printed, printed
            assert f"{count}.0" not in printed, printed


def test_a_noisy_count_prints_as_an_approximate_whole_number():
    view = result_from_json(
        {
            "analysis": "count",
            "n": 598.73,
            "count": 598.73,
            "per_site": {"a": 598.73},
            "sites": [{"name": "a", "status": "ok", "records": 300.2}],
            "privacy": {"mode": "dp"},
            "notes": [],
        }
    )
    printed = str(view)
    assert printed.splitlines()[0] == "<CountResult 1 sites, n=~599, dp>"
    assert "598.73" not in printed and " 599" in printed
    assert view.summary["count"].iloc[0] == 598.73  # the data keeps what was released


def test_show_count_never_prints_minus_zero():
    from analyses.results import show_count

    assert [show_count(v) for v in (-0.4, 0.5, 1.5, 599.0)] == ["0", "0", "2", "599"]
    assert show_count(-0.2, noisy=True) == "~0" and show_count(None) == "?"
