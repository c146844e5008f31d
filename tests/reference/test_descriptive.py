"""count, mean and histogram equal numpy on the pooled data, and DataSHIELD's published mean."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analyses.testing import federate
from protocol.config import DataDictionary


def test_cnsim_mean_matches_datashield(
    cnsim: tuple[dict[str, pd.DataFrame], DataDictionary],
) -> None:
    frames, dictionary = cnsim
    result = federate("mean", frames, {"variable": "LAB_TSC"}, dictionary)
    # DataSHIELD (published): ds.mean("D$LAB_TSC", type="combine") = 5.85192485623003, 7825 valid
    assert result.n == 7825
    assert result.mean == pytest.approx(5.85192485623003, rel=1e-12)
    pooled = pd.concat(frames.values())["LAB_TSC"].dropna()
    # numpy: pooled.var(ddof=1)
    assert result.variance == pytest.approx(pooled.var(ddof=1), rel=1e-10)


def test_heart_count_mean_histogram_equal_numpy(
    heart_frames: dict[str, pd.DataFrame], heart_pooled: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    count = federate("count", heart_frames, {"variable": "chol"}, heart_dict)
    # numpy: heart_pooled.chol.notna().sum() (chol == 0 at Switzerland and VA is missing)
    assert count.count == heart_pooled.chol.notna().sum() == 920 - 123 - 49 - 7 - 23
    mean = federate("mean", heart_frames, {"variable": "thalach"}, heart_dict)
    thalach = heart_pooled.thalach.dropna()
    # numpy: thalach.mean(), thalach.var(ddof=1)
    assert mean.mean == pytest.approx(thalach.mean(), rel=1e-12)
    assert mean.variance == pytest.approx(thalach.var(ddof=1), rel=1e-10)
    edges = [60, 100, 140, 180, 220]
    hist = federate("histogram", heart_frames, {"variable": "thalach", "edges": edges}, heart_dict)
    # numpy: np.histogram(thalach, bins=edges)
    assert hist.counts == np.histogram(thalach, bins=edges)[0].tolist()
