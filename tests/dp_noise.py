"""Seeded emulation of the site engine's dp releases, for accuracy tests of the coordinator's
noise accounting. OpenDP's own sampler cannot be seeded, so these tests draw the same
distributions (Laplace, or discrete Laplace as a difference of geometrics) from numpy at the
scales the engine uses; `tests/unit/test_site_runtime.py` checks the engine itself."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from analyses import AnalysisContext, get_analysis
from protocol.config import DataDictionary
from protocol.records import AggregateRecord, RecordSpec, Release


def noisy_record(
    spec: RecordSpec, exact: dict[str, Any], epsilon: float, rng: np.random.Generator
) -> AggregateRecord:
    """One site's exact arrays with the noise the engine adds for ``epsilon``: per array,
    scale = sensitivity / (epsilon x share / total share), discrete for integer arrays."""
    shares = sum(s.budget_share for s in spec.arrays.values())
    noisy, releases = {}, {}
    for key, s in spec.arrays.items():
        eps = epsilon * s.budget_share / shares
        scale = s.sensitivity / eps
        if s.integer:
            q = 1 - math.exp(-1 / scale)
            noise = rng.geometric(q, s.shape) - rng.geometric(q, s.shape)
            releases[key] = Release("discrete_laplace", scale, eps)
        else:
            noise = rng.laplace(0, scale, s.shape)
            releases[key] = Release("laplace", scale, eps)
        noisy[key] = exact[key] + noise
    return AggregateRecord(spec, exact).with_values(noisy, releases)


def release_dp(
    name: str,
    frames: dict[str, pd.DataFrame],
    raw: dict[str, Any],
    epsilon: float,
    rng: np.random.Generator,
    dictionary: DataDictionary,
) -> Any:
    """One round of analysis ``name`` with each site's arrays noised as the engine does:
    scale = sensitivity / (epsilon x share / total share), discrete for integer arrays."""
    analysis = get_analysis(name)
    params = analysis.parse_params(raw, dictionary)
    ctx = AnalysisContext(dictionary, "dp")
    spec = analysis.declare(params, ctx)
    records = {
        site: noisy_record(spec, analysis.local(frame, params, ctx), epsilon, rng)
        for site, frame in frames.items()
    }
    return analysis.combine(records, params, ctx)
