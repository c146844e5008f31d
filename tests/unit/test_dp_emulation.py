"""The seeded dp emulation the accuracy tests use calibrates exactly as the site engine does."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.config import SDCThresholds
from protocol.records import ArraySpec, RecordSpec
from site_node.privacy import privatize
from tests import dp_noise

SPECS = [
    RecordSpec({"n": ArraySpec((), kind="count", sensitivity=1.0, integer=True)}),
    RecordSpec(
        {
            "n": ArraySpec((), kind="count", sensitivity=1.0, integer=True),
            "sum": ArraySpec((), kind="sum", sensitivity=60.0, budget_share=2.0),
            "sumsq": ArraySpec((), kind="sum", sensitivity=3600.0),
        }
    ),
    RecordSpec(
        {
            "counts": ArraySpec((2, 5), kind="count", sensitivity=1.0, integer=True),
            "xwx": ArraySpec((6,), sensitivity=1.5, budget_share=1.0),
            "d": ArraySpec((4,), kind="count", sensitivity=2.5, integer=True, budget_share=0.1),
        }
    ),
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1 / 3])
def test_emulation_uses_the_engines_mechanism_scale_and_share(
    spec: RecordSpec, epsilon: float
) -> None:
    exact = {name: np.zeros(arr.shape) for name, arr in spec.arrays.items()}
    engine = privatize(spec, exact, "dp", epsilon, SDCThresholds())
    emulated = dp_noise.engine_scales(spec, epsilon)
    for name, release in engine.releases.items():
        mechanism, scale, share = emulated[name]
        assert release.mechanism == mechanism
        # OpenDP may widen a scale by a few ulps so its privacy map certifies the share.
        assert release.scale == pytest.approx(scale, rel=1e-9)
        assert release.epsilon == pytest.approx(share, rel=1e-9)
    assert engine.epsilon <= epsilon  # the certified total never exceeds the charge


def test_emulated_noise_has_the_engines_spread() -> None:
    spec = SPECS[1]
    rng = np.random.default_rng(3)
    exact = {"n": np.array(100.0), "sum": np.array(5.0), "sumsq": np.array(50.0)}
    draws = np.array([dp_noise.noisy_record(spec, exact, 1.0, rng)["sum"] for _ in range(4000)])
    _, scale, _ = dp_noise.engine_scales(spec, 1.0)["sum"]
    # Laplace(b) has sd b sqrt(2); 4000 draws estimate it within about 3%.
    assert np.std(draws - 5.0) == pytest.approx(scale * np.sqrt(2), rel=0.08)
