"""``proportion`` equals statsmodels' proportion_confint on the pooled heart hospitals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from coordinator.client import result_from_json
from tests import dp_noise
from tests.datasets import Split


@pytest.mark.parametrize("method", ["wilson", "normal"])
def test_pooled_proportion_equals_statsmodels(
    method: str,
    heart: Split,
) -> None:
    result = heart.federate("proportion", {"variable": "disease", "method": method})
    known = heart.pooled["disease"].dropna()
    count, nobs = int(known.sum()), len(known)
    # statsmodels 0.15: proportion_confint(count, nobs, alpha=0.05, method=method)
    low, high = proportion_confint(count, nobs, alpha=0.05, method=method)
    assert result.n == nobs and result.successes == count
    assert result.proportion == pytest.approx(count / nobs, rel=1e-15)
    assert result.ci_lower == pytest.approx(low, rel=1e-12)
    assert result.ci_upper == pytest.approx(high, rel=1e-12)
    again = result_from_json(json.loads(json.dumps(result.to_dict())))
    assert str(again) == str(result) and again.to_dict() == result.to_dict()


def test_dp_proportion_states_its_noise_and_it_matches_the_spread(heart: Split) -> None:
    rng = np.random.default_rng(12)
    runs = [
        dp_noise.release_dp(
            "proportion", heart.frames, {"variable": "disease"}, 0.5, rng, heart.dictionary
        )
        for _ in range(400)
    ]
    truth = heart.pooled["disease"].dropna().mean()
    estimates = np.array([r.proportion for r in runs])
    stated = np.median([r.noise_sd for r in runs])
    # Discrete Laplace of scale 2 in each of 2 cells at 4 sites, through the delta method:
    # about 0.0055 here; the spread of 400 runs estimates it within about 10%.
    assert np.std(estimates) == pytest.approx(stated, rel=0.15)
    assert abs(np.mean(estimates) - truth) < 4 * stated / np.sqrt(400) + 1e-3
