"""Shared fixtures of the unit tests: the synthetic survival cohort (``simulations.bench_cox``)."""

from __future__ import annotations

import pandas as pd
import pytest

from protocol.config import DataDictionary
from simulations.bench_cox import synthetic_dictionary, synthetic_sites


@pytest.fixture(scope="module")
def syn_dict() -> DataDictionary:
    """The synthetic cohort's data dictionary."""
    return synthetic_dictionary()


@pytest.fixture(scope="module")
def sites() -> dict[str, pd.DataFrame]:
    """Three synthetic sites of about 400 records each (seed 5)."""
    return synthetic_sites(3, 400, seed=5)
