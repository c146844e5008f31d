"""count, mean and histogram equal numpy on the pooled data, and DataSHIELD's published mean."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analyses.testing import federate
from protocol.config import DataDictionary
from tests.datasets import Split


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


def test_heart_count_mean_histogram_equal_numpy(heart: Split) -> None:
    count = heart.federate("count", {"variable": "chol"})
    # numpy: heart.pooled.chol.notna().sum() (chol == 0 at Switzerland and VA is missing)
    assert count.count == heart.pooled.chol.notna().sum() == 920 - 123 - 49 - 7 - 23
    mean = heart.federate("mean", {"variable": "thalach"})
    thalach = heart.pooled.thalach.dropna()
    # numpy: thalach.mean(), thalach.var(ddof=1)
    assert mean.mean == pytest.approx(thalach.mean(), rel=1e-12)
    assert mean.variance == pytest.approx(thalach.var(ddof=1), rel=1e-10)
    edges = [60, 100, 140, 180, 220]
    hist = heart.federate("histogram", {"variable": "thalach", "edges": edges})
    # numpy: np.histogram(thalach, bins=edges)
    assert hist.counts == np.histogram(thalach, bins=edges)[0].tolist()
