"""An in-process federation whose released sums carry rounding-sized perturbations.

Two machines with the same numpy and scipy still sum in different orders (OpenBLAS picks its
kernels by CPU and splits work across threads; numpy dispatches SIMD loops by CPU), so the
same site data give sums that differ in the last bits. A numerical decision (separation,
singularity, convergence) that flips under such differences flips between machines. These
helpers rerun an analysis with every non-integer released cell multiplied by
``1 + rel * N(0, 1)`` (``rel`` about 1e-15, a few units in the last place), seeded, so a test can
demand the same outcome under many such draws.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from analyses.base import AnalysisContext, NextRound
from analyses.registry import get_analysis
from protocol.config import DataDictionary, SDCThresholds
from protocol.records import AggregateRecord

#: Relative size of the perturbation: about 5 units in the last place of a double.
ROUNDING = 1e-15


def federate_perturbed(
    name: str,
    frames: Mapping[str, pd.DataFrame],
    params: Mapping[str, Any],
    dictionary: DataDictionary,
    rng: np.random.Generator | None,
    rel: float = ROUNDING,
) -> Any:
    """``analyses.testing.federate`` (mode ``off``) with each site's non-integer arrays
    perturbed by ``rel`` (relative, Gaussian, from ``rng``); ``rng=None`` perturbs nothing."""
    analysis = get_analysis(name)
    parsed = analysis.parse_params(params, dictionary)
    state = analysis.initial_state(parsed, AnalysisContext(dictionary, "off", SDCThresholds()))
    for round_no in range(200):
        ctx = AnalysisContext(dictionary, "off", SDCThresholds(), round_no, state)
        spec = analysis.declare(parsed, ctx)
        records = {}
        for site, frame in frames.items():
            arrays = {
                k: np.asarray(v, dtype=np.float64)
                for k, v in analysis.local(frame, parsed, ctx).items()
            }
            if rng is not None:
                for key, array_spec in spec.arrays.items():
                    if not array_spec.integer and array_spec.kind != "count":
                        value = arrays[key]
                        arrays[key] = value * (1 + rel * rng.standard_normal(value.shape))
            records[site] = AggregateRecord(spec, arrays)
        out = analysis.combine(records, parsed, ctx)
        if isinstance(out, NextRound):
            state = out.state
            continue
        return out
    raise AssertionError(f"{name} did not finish in 200 rounds")
