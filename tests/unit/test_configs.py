"""The example configs validate, and the committed JSON schemas match the models."""

from __future__ import annotations

from pathlib import Path

import pytest

from analyses import get_analysis
from protocol.config import (
    AnalysisRequest,
    CoordinatorConfig,
    DataDictionary,
    SiteConfig,
    SiteMapping,
    StudyConfig,
    load_yaml,
)
from simulations.schemas import FOLDER, SCHEMAS, render

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_example_configs_validate() -> None:
    dictionary = load_yaml(CONFIGS / "dictionary.yaml", DataDictionary)
    load_yaml(CONFIGS / "coordinator.yaml", CoordinatorConfig)
    site = load_yaml(CONFIGS / "site.yaml", SiteConfig)
    assert site.data.path.exists()  # the example points at the shipped UCI file
    study = load_yaml(CONFIGS / "study.yaml", StudyConfig)
    assert site.policy.approval(study.id) is not None
    mapping = load_yaml(CONFIGS / "mapping.yaml", SiteMapping)
    assert mapping.variables["chol"].unit == "mmol/L"  # the example converts to mg/dL
    for path in sorted((CONFIGS / "requests").glob("*.yaml")):
        request = load_yaml(path, AnalysisRequest)
        get_analysis(request.analysis).parse_params(request.params, dictionary)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schema_is_fresh(name: str) -> None:
    committed = (FOLDER / f"{name}.schema.json").read_text()
    assert committed == render(SCHEMAS[name]), "run `python -m simulations.schemas`"
