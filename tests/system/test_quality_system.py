"""The study's minimum quality through real processes: the study file's `min_quality` travels
with every task over gRPC, and the site below it leaves the variable out, saying so."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from protocol.config import StudyConfig
from tests.system.conftest import heart_federation

pytestmark = pytest.mark.system


def test_a_study_minimum_quality_leaves_switzerland_out_of_cholesterol(
    tmp_path: Path, heart_pooled: pd.DataFrame
) -> None:
    federation = heart_federation(tmp_path, "off")
    study = StudyConfig.model_validate(
        {
            "id": "s1",
            "title": "minimum quality",
            "privacy": {"mode": "off"},
            "min_quality": {"chol": 0.5},
        }
    )
    try:
        federation.start(study)
        with federation.researcher() as client:
            mean = client.run("s1", {"analysis": "mean", "params": {"variable": "chol"}})
            age = client.run("s1", {"analysis": "mean", "params": {"variable": "age"}})
            profile = client.run("s1", {"analysis": "quality", "params": {"variables": ["chol"]}})
    finally:
        federation.stop()
    sites = {s["name"]: s for s in mean["sites"]}
    assert sites["switzerland"]["status"] == "refused"
    assert "'chol' (at least 50% required)" in sites["switzerland"]["reason"]
    assert {n for n, s in sites.items() if s["status"] == "ok"} == {"cleveland", "hungarian", "va"}
    # Reference: numpy on the other three hospitals' pooled values.
    kept = heart_pooled.loc[heart_pooled.site != "switzerland", "chol"].dropna()
    assert mean["n"] == kept.size and mean["mean"] == pytest.approx(kept.mean(), rel=1e-12)
    assert all(s["status"] == "ok" for s in age["sites"])  # other variables untouched
    assert profile["profiles"]["switzerland"]["chol"]["out_of_range"] == 123
