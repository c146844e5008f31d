"""One result type end to end: every analysis's result rebuilds from its JSON contract."""

from __future__ import annotations

import json
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import analyses  # noqa: F401  (registers every analysis)
from analyses import get_analysis, registered_analyses
from analyses.testing import federate
from protocol.config import DataDictionary, SDCThresholds
from protocol.records import RecordSpec
from site_node.privacy import privatize
from tests import dp_noise
from tests.unit.test_round_state import REQUESTS

matplotlib.use("Agg")


@pytest.mark.parametrize("mode", ["off", "dp"])
@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_a_result_rebuilt_from_its_json_is_the_same_result(
    name: str, mode: str, sites: dict[str, pd.DataFrame], syn_dict: DataDictionary
) -> None:
    if name == "train" and mode == "dp":  # Gaussian releases: the site engine, rho a round
        rounds = REQUESTS[name]["rounds"] + 1

        def gaussian(site: str, spec: RecordSpec, arrays: Any, ctx: Any, eps: Any) -> Any:
            return privatize(spec, arrays, "dp", 0.0, SDCThresholds(), 2.0 / rounds)

        result = federate(name, sites, REQUESTS[name], syn_dict, mode, rho=2.0, release=gaussian)
        assert result.privacy.rho_per_site == pytest.approx(2.0) and result.epsilon > 2.0
    else:
        result = federate(
            name, sites, REQUESTS[name], syn_dict, mode,
            epsilon=5.0 if mode == "dp" else None,
            release=dp_noise.seeded_release(np.random.default_rng(3)),
        )  # fmt: skip
    assert type(result) is get_analysis(name).result_type
    wire: dict[str, Any] = json.loads(json.dumps(result.to_dict()))
    rebuilt = get_analysis(name).result_type.from_dict(wire)
    assert type(rebuilt) is type(result)
    assert rebuilt.to_dict() == result.to_dict()
    assert str(rebuilt) == str(result)
    pd.testing.assert_frame_equal(rebuilt.summary, result.summary, check_dtype=False)
    rebuilt.plot()  # draws from the rebuilt fields
    plt.close("all")


def test_every_analysis_names_its_result_type() -> None:
    for name in registered_analyses():
        assert get_analysis(name).result_type.__name__.endswith("Result")
