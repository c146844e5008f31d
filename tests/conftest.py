"""Shared fixtures: the UCI heart hospitals conformed to the demo dictionary."""

from __future__ import annotations

import pandas as pd
import pytest

from protocol.config import DataDictionary
from simulations.heart import heart_dictionary, heart_sites
from tests.datasets import Split


@pytest.fixture(scope="session")
def heart_dict() -> DataDictionary:
    """The demo's data dictionary."""
    return heart_dictionary()


@pytest.fixture(scope="session")
def heart_frames() -> dict[str, pd.DataFrame]:
    """Four hospitals' records, conformed exactly as their site nodes conform them."""
    return heart_sites()


@pytest.fixture(scope="session")
def heart_pooled(heart_frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The four hospitals pooled, with a `site` column (the reference peers' input)."""
    return pd.concat(
        [frame.assign(site=name) for name, frame in heart_frames.items()], ignore_index=True
    )


@pytest.fixture(scope="session")
def heart(heart_dict: DataDictionary, heart_frames: dict[str, pd.DataFrame]) -> Split:
    """The four hospitals as one :class:`~tests.datasets.Split` (frames, pooled, dictionary)."""
    return Split.of(heart_frames, heart_dict)
