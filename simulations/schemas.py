"""Write the JSON schemas of the YAML files people write: ``python -m simulations.schemas``."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from protocol.config import (
    AnalysisRequest,
    CoordinatorConfig,
    DataDictionary,
    SiteConfig,
    SiteMapping,
    StudyConfig,
)

SCHEMAS: dict[str, type[BaseModel]] = {
    "coordinator": CoordinatorConfig,
    "site": SiteConfig,
    "study": StudyConfig,
    "dictionary": DataDictionary,
    "request": AnalysisRequest,
    "mapping": SiteMapping,
}
FOLDER = Path(__file__).resolve().parent.parent / "configs" / "schema"


def render(model: type[BaseModel]) -> str:
    """A model's JSON schema, as committed."""
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    """Write every schema under configs/schema/."""
    FOLDER.mkdir(parents=True, exist_ok=True)
    for name, model in SCHEMAS.items():
        (FOLDER / f"{name}.schema.json").write_text(render(model))
        print(f"wrote configs/schema/{name}.schema.json")


if __name__ == "__main__":
    main()
