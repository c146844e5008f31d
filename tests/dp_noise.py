"""The one seeded emulation of the site engine's dp releases, for accuracy tests of the
coordinator's noise accounting.

OpenDP's own sampler cannot be seeded, so these tests draw the same distributions from numpy at
exactly the scales ``site_node.privacy.privatize`` uses: the task's epsilon split over the
arrays by budget share (a hair under the whole, as the engine does), Laplace noise of scale
sensitivity / share for float arrays, and discrete Laplace (a difference of geometrics) of scale
ceil(sensitivity) / share for integer arrays. ``tests/unit/test_dp_emulation.py`` checks that
the emulation and the engine agree; ``tests/unit/test_site_runtime.py`` checks the engine.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from analyses import AnalysisContext, get_analysis
from analyses.testing import Release, federate
from protocol.budget import PureDP
from protocol.config import DataDictionary
from protocol.records import AggregateRecord, RecordSpec
from protocol.records import Release as ArrayRelease

#: The engine's margin: shares add up to a hair under the task's epsilon.
SHARE_MARGIN = 1 + 1e-12


def engine_scales(spec: RecordSpec, epsilon: float) -> dict[str, tuple[str, float, float]]:
    """Per array: (mechanism, scale, epsilon share), as the site engine calibrates them."""
    total = sum(s.budget_share for s in spec.arrays.values()) * SHARE_MARGIN
    out = {}
    for key, s in spec.arrays.items():
        share = epsilon * s.budget_share / total
        if not s.sensitivity:
            out[key] = ("none", 0.0, 0.0)
        elif s.integer:
            out[key] = ("discrete_laplace", math.ceil(s.sensitivity) / share, share)
        else:
            out[key] = ("laplace", s.sensitivity / share, share)
    return out


def noisy_record(
    spec: RecordSpec, exact: dict[str, Any], epsilon: float, rng: np.random.Generator
) -> AggregateRecord:
    """One site's exact arrays with the noise the engine adds for ``epsilon``."""
    noisy, releases = {}, {}
    for key, (mechanism, scale, share) in engine_scales(spec, epsilon).items():
        value = np.asarray(exact[key], dtype=np.float64)
        shape = spec.arrays[key].shape
        if mechanism == "discrete_laplace":
            q = 1 - math.exp(-1 / scale)
            noise = (rng.geometric(q, shape) - rng.geometric(q, shape)).astype(np.float64)
            value = np.rint(value)
        elif mechanism == "laplace":
            noise = rng.laplace(0, scale, shape)
        else:
            noise = np.zeros(shape)
        noisy[key] = value + noise
        releases[key] = ArrayRelease(mechanism, scale, share)
    return AggregateRecord(spec, exact).with_values(noisy, releases)


def seeded_release(rng: np.random.Generator) -> Release:
    """A ``federate`` release that adds the engine's noise from ``rng`` in dp mode (exact
    otherwise)."""

    def release(
        site: str,
        spec: RecordSpec,
        arrays: dict[str, Any],
        ctx: AnalysisContext,
        epsilon: PureDP | None,
    ) -> AggregateRecord:
        if ctx.mode != "dp" or epsilon is None:
            return AggregateRecord(spec, arrays)
        return noisy_record(spec, arrays, epsilon.epsilon, rng)

    return release


def release_dp(
    name: str,
    frames: dict[str, pd.DataFrame],
    raw: dict[str, Any],
    epsilon: float,
    rng: np.random.Generator,
    dictionary: DataDictionary,
) -> Any:
    """Analysis ``name`` in dp mode with each site's arrays noised as the engine does."""
    return federate(
        name, frames, raw, dictionary, "dp", epsilon=epsilon, release=seeded_release(rng)
    )


def declared(name: str, raw: dict[str, Any], dictionary: DataDictionary) -> RecordSpec:
    """The record a single-round analysis declares in dp mode."""
    analysis = get_analysis(name)
    return analysis.declare(
        analysis.parse_params(raw, dictionary), AnalysisContext(dictionary, "dp")
    )
