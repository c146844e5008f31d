"""An in-process federation for unit tests of analysis maths: no network, no noise.

It runs the same declare / local / record / combine loop as the coordinator and site nodes,
including the rounds of iterative analyses, but releases exact aggregates (modes ``off`` and
``sdc`` without the site engine's thresholds). System tests drive the real processes instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from analyses.base import AnalysisContext, NextRound
from analyses.registry import get_analysis
from analyses.results import AnalysisResult, PrivacySummary, SiteContribution
from protocol.config import DataDictionary, SDCThresholds
from protocol.errors import InternalError
from protocol.records import AggregateRecord

MAX_ROUNDS = 200


def federate(
    name: str,
    frames: Mapping[str, pd.DataFrame],
    params: Mapping[str, Any],
    dictionary: DataDictionary,
    mode: str = "off",
) -> Any:
    """Run analysis ``name`` over in-memory site frames and return its result object."""
    analysis = get_analysis(name)
    parsed = analysis.parse_params(params, dictionary)
    ctx = AnalysisContext(dictionary=dictionary, mode=mode, sdc=SDCThresholds())
    state = analysis.initial_state(parsed, ctx)
    for round_no in range(MAX_ROUNDS):
        ctx = AnalysisContext(dictionary, mode, SDCThresholds(), round_no, state)
        spec = analysis.declare(parsed, ctx)
        records = {
            site: AggregateRecord(spec, analysis.local(frame, parsed, ctx))
            for site, frame in frames.items()
        }
        out = analysis.combine(records, parsed, ctx)
        if isinstance(out, NextRound):
            state = out.state
            continue
        if isinstance(out, AnalysisResult):
            out.sites = [
                SiteContribution(s, "ok", analysis.site_records(r), 0.0, mode)
                for s, r in records.items()
            ]
            out.privacy = PrivacySummary(mode=mode)
        return out
    raise InternalError(f"analysis {name!r} did not finish in {MAX_ROUNDS} rounds")
