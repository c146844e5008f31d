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

from analyses.base import AnalysisContext, Arrays
from analyses.testing import federate
from protocol.budget import PureDP
from protocol.config import DataDictionary
from protocol.records import AggregateRecord, RecordSpec

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

    def perturbed(
        site: str, spec: RecordSpec, arrays: Arrays, ctx: AnalysisContext, eps: PureDP | None
    ) -> AggregateRecord:
        out = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
        if rng is not None:
            for key, array_spec in spec.arrays.items():
                if not array_spec.integer and array_spec.kind != "count":
                    out[key] = out[key] * (1 + rel * rng.standard_normal(out[key].shape))
        return AggregateRecord(spec, out)

    return federate(name, frames, params, dictionary, "off", release=perturbed)
