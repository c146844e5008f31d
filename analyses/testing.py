"""An in-process federation for tests and benchmarks: the real round driver, no network.

:func:`federate` runs the same :class:`~analyses.driver.RoundDriver` as the coordinator's
scheduler, and each site's half on an in-memory frame. By default sites release their exact
aggregates (modes ``off`` and ``sdc`` without the site engine's thresholds); pass ``release`` to
emulate the site engine (``tests/dp_noise.py`` has the seeded dp emulation). The public round
state goes through ``parse_state`` exactly as at a real site. System tests drive real processes
instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import pandas as pd

from analyses.base import AnalysisContext, Arrays, WorkCache
from analyses.driver import RoundDriver, RoundTask, SiteAnswer, SiteReply
from analyses.registry import get_analysis
from protocol.budget import ZCDP, PureDP
from protocol.config import DataDictionary, SDCThresholds
from protocol.records import AggregateRecord, RecordSpec

#: How a site turns its exact arrays into the record it releases (site, spec, arrays, context,
#: epsilon of this round or None).
Release = Callable[[str, RecordSpec, Arrays, AnalysisContext, PureDP | None], AggregateRecord]
#: Called after every round with the round, its declared spec and the sites' answers.
RoundHook = Callable[[RoundTask, RecordSpec, Mapping[str, SiteAnswer]], None]


def exact_release(
    site: str, spec: RecordSpec, arrays: Arrays, ctx: AnalysisContext, epsilon: PureDP | None
) -> AggregateRecord:
    """Release the exact arrays (no noise, no thresholds)."""
    return AggregateRecord(spec, arrays)


def federate(
    name: str,
    frames: Mapping[str, pd.DataFrame],
    params: Mapping[str, Any],
    dictionary: DataDictionary,
    mode: str = "off",
    *,
    epsilon: float | None = None,
    release: Release = exact_release,
    sdc: SDCThresholds | None = None,
    on_round: RoundHook | None = None,
    profile: list[dict[str, Any]] | None = None,
    rho: float | None = None,
) -> Any:
    """Run analysis ``name`` over in-memory site frames and return its result object.

    Args:
        name: the registered analysis.
        frames: each site's conformed records.
        params: the analysis parameters (validated as at the coordinator).
        dictionary: the data dictionary.
        mode: the privacy mode every site applies.
        epsilon: the request's epsilon per site (dp mode), split over ``dp_rounds`` rounds.
        release: how a site releases its arrays (default: exactly).
        sdc: disclosure-control thresholds (default: DataSHIELD's).
        on_round: called after every round (tests inspect tasks and records with it).
        profile: if given, gets one entry per round: each site's seconds in ``local``
            (``"sites"``) and the coordinator's seconds in ``combine`` (``"combine"``).
        rho: the request's zCDP rho per site (dp mode, Gaussian releases), split over
            ``dp_rounds``; ``release`` gets the round's epsilon only, so a release that adds
            Gaussian noise takes its round's rho from the caller.
    """
    analysis = get_analysis(name)
    parsed = analysis.parse_params(params, dictionary)
    thresholds = sdc or SDCThresholds()
    driver = RoundDriver(
        analysis,
        parsed,
        dictionary,
        mode,
        list(frames),
        PureDP(epsilon) if epsilon is not None else None,
        thresholds,
        ZCDP(rho) if rho is not None else None,
    )
    work = WorkCache()  # one per run: each site keeps its design between rounds, as sites do
    while (step := driver.next_round()) is not None:
        base = AnalysisContext(dictionary, mode, thresholds, step.round)
        state = analysis.parse_state(step.state, parsed, base)  # as a real site does
        ctx = AnalysisContext(dictionary, mode, thresholds, step.round, state)
        spec = analysis.declare(parsed, ctx)
        answers: dict[str, SiteAnswer] = {}
        seconds: dict[str, float] = {}
        for site in step.sites:
            site_ctx = replace(ctx, cache=work.scope(site), site=site)
            started = time.perf_counter()
            arrays = analysis.local(frames[site], parsed, site_ctx)
            seconds[site] = time.perf_counter() - started
            record = release(site, spec, arrays, site_ctx, step.epsilon)
            answers[site] = SiteReply(
                record, mode, step.epsilon or PureDP(0.0), step.rho or ZCDP(0.0)
            )
        if on_round is not None:
            on_round(step, spec, answers)
        started = time.perf_counter()
        driver.receive(answers)
        if profile is not None:
            profile.append({"sites": seconds, "combine": time.perf_counter() - started})
    return driver.result()
