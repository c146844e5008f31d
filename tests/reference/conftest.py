"""DataSHIELD's CNSIM studies, read from ../shared (GPL-3: never copied into the project)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from protocol.config import DataDictionary, load_yaml
from site_node.harmonize import conform

REPO = Path(__file__).resolve().parents[2]
CNSIM_DIR = REPO.parent / "shared" / "data" / "cnsim"
CNSIM_DICTIONARY = REPO / "simulations" / "configs" / "cnsim_dictionary.yaml"


@pytest.fixture(scope="session")
def cnsim() -> tuple[dict[str, pd.DataFrame], DataDictionary]:
    """The three CNSIM studies conformed to our CNSIM dictionary, as three sites."""
    paths = [CNSIM_DIR / f"CNSIM{i}.csv" for i in (1, 2, 3)]
    if not all(p.exists() for p in paths):
        pytest.skip(f"DataSHIELD's CNSIM data not found in {CNSIM_DIR} (GPL-3, not shipped)")
    dictionary = load_yaml(CNSIM_DICTIONARY, DataDictionary)
    frames = {}
    for i, path in enumerate(paths, start=1):
        raw = pd.read_csv(path, index_col=0)  # first column: row names
        raw.columns = [c.strip() for c in raw.columns]  # header names carry trailing blanks
        frame, report = conform(raw, dictionary)
        # The dictionary's bounds must hold every record, or published results would shift.
        assert not (report.below_min or report.above_max or report.unknown_levels)
        assert not report.unknown_columns and not report.missing_columns
        frames[f"study{i}"] = frame
    return frames, dictionary
