"""Run one analysis request across the study's sites, round by round.

Single-round analyses take one round; iterative ones (GLM, Cox, exact quantiles) return
``NextRound`` from ``combine`` until they finish. A site that refuses, drops or times out is
reported by name with its status and reason; the request goes on with the others. If the set
of contributing sites changes after the first round of an iterative analysis, the iteration
restarts without the sites that left, so every round pools the same sites.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from analyses import AnalysisContext, AnalysisResult, NextRound, get_analysis
from analyses.model_size import COLUMN_COUNT_CAP, model_columns
from analyses.results import PrivacySummary, SiteContribution
from coordinator.link import SiteRegistry, SiteUnavailable
from protocol.budget import PureDP, over_request_cap
from protocol.config import (
    AnalysisRequest,
    DataDictionary,
    SDCThresholds,
    StudyConfig,
    stricter_mode,
)
from protocol.errors import AllianceError, RecordError, ValidationError
from protocol.filters import parse_filter
from protocol.records import AggregateRecord
from protocol.wire import alliance_pb2 as pb
from protocol.wire.messages import record_from_proto

MAX_ROUNDS = 200


class RequestFailed(AllianceError):
    """No result could be formed; ``sites`` says what each site did."""

    def __init__(self, message: str, sites: list[SiteContribution]) -> None:
        super().__init__(message)
        self.sites = sites


@dataclass
class _SiteState:
    contribution: SiteContribution
    active: bool = True


def _guarantee(mode: str, epsilon: float) -> str:
    if mode == "dp":
        return (
            f"epsilon-DP per patient row at each site, epsilon <= {epsilon:.4g} for this "
            "result (add/remove one row; the dictionary's public bounds; OpenDP Laplace)"
        )
    if mode == "sdc":
        return (
            "statistical disclosure control (exact releases, small cells refused); no "
            "formal differential-privacy guarantee"
        )
    return "none: exact releases (dummy data or one institution only)"


class Scheduler:
    """Turns requests into tasks and replies into results."""

    def __init__(
        self, registry: SiteRegistry, dictionary: DataDictionary, task_timeout: float
    ) -> None:
        self.registry = registry
        self.dictionary = dictionary
        self.task_timeout = task_timeout

    def validate(self, study: StudyConfig, request: AnalysisRequest) -> Any:
        """Check a request before any task leaves; return its parsed parameters.

        It can take a while (a model's design is built from the dictionary), so the HTTP API
        runs it in a worker thread. The cheap refusals come first: an analysis outside the
        study, an epsilon above the study's cap, a model wider than ``max_model_columns``
        (counted from the formula, before formulaic expands it).
        """
        if study.analyses and request.analysis not in study.analyses:
            raise ValidationError(
                f"analysis {request.analysis!r} is not part of study {study.id!r}; the study "
                f"allows: {', '.join(study.analyses)}"
            )
        cap = study.privacy.epsilon_per_request
        if request.epsilon is not None and request.epsilon > cap:
            # Sites refuse it too, in the same words; refusing here sends no task at all.
            raise ValidationError(over_request_cap(study.id, PureDP(request.epsilon), PureDP(cap)))
        analysis = get_analysis(request.analysis)
        size = model_columns(request.analysis, request.params, self.dictionary)
        if size is not None and size[0] > study.max_model_columns:
            count, what = size
            shown = f"more than {COLUMN_COUNT_CAP:,}" if count > COLUMN_COUNT_CAP else f"{count:,}"
            raise ValidationError(
                f"{what} {shown} model columns; study {study.id} allows at most "
                f"{study.max_model_columns} (max_model_columns). Use fewer interactions or "
                "categorical levels, or ask the alliance lead to raise the study's limit"
            )
        params = analysis.parse_params(request.params, self.dictionary)
        variables = set(analysis.variables(params))
        if request.filter:
            variables |= parse_filter(request.filter, set(self.dictionary.variables)).variables
        if study.variables:
            outside = sorted(variables - set(study.variables))
            if outside:
                raise ValidationError(
                    f"variables {', '.join(outside)} are outside study {study.id!r}'s scope; "
                    f"in scope: {', '.join(study.variables)}"
                )
        return params

    async def run(
        self,
        study: StudyConfig,
        request: AnalysisRequest,
        researcher: str,
        request_id: str | None = None,
        params: Any = None,
    ) -> AnalysisResult:
        """Run ``request`` in ``study`` and return its result object.

        ``params`` are the parameters :meth:`validate` returned, when the caller validated
        the request already (the HTTP API does, before it stores the request).

        Raises:
            ValidationError: the request is invalid (nothing was sent to any site).
            RequestFailed: no site contributed; ``sites`` holds each site's reason.
        """
        started = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex[:16]
        analysis = get_analysis(request.analysis)
        if params is None:
            params = self.validate(study, request)
        mode = study.privacy.mode
        epsilon = request.epsilon or study.privacy.epsilon_per_request
        ctx = AnalysisContext(self.dictionary, mode, SDCThresholds())
        rounds_budgeted = analysis.dp_rounds(params, ctx) if mode == "dp" else 1
        epsilon_round = epsilon / rounds_budgeted if mode == "dp" else 0.0
        names = study.sites or self.registry.connected()
        if not names:
            raise RequestFailed("no site is connected to the coordinator", [])
        sites = {n: _SiteState(SiteContribution(n, "ok")) for n in names}
        # Researchers see the coordinator's wall time and the round count, never a site's own
        # compute time: it depends on the data and would leak it.
        timings: dict[str, float] = {"rounds": 0}
        restarts = 0
        state = analysis.initial_state(params, ctx)
        round_no = 0
        while True:
            if round_no >= MAX_ROUNDS:
                raise RequestFailed(
                    f"analysis did not finish in {MAX_ROUNDS} rounds",
                    [s.contribution for s in sites.values()],
                )
            active = [n for n, s in sites.items() if s.active]
            ctx = AnalysisContext(self.dictionary, mode, SDCThresholds(), round_no, state)
            task_base: dict[str, Any] = {
                "study_id": study.id,
                "purpose": study.purpose,
                "analysis": request.analysis,
                "params_json": json.dumps(request.params),
                "filter": request.filter or "",
                "privacy_mode": mode,
                "epsilon": epsilon_round,
                "researcher": researcher,
                "round": round_no,
                "state_json": json.dumps(state),
                "request_id": request_id,
            }
            answers = await asyncio.gather(
                *[
                    self._ask(site, pb.Task(task_id=f"{request_id}.{round_no}.{site}", **task_base))
                    for site in active
                ]
            )
            timings["rounds"] += 1
            records: dict[str, AggregateRecord] = {}
            modes: list[str] = []
            for site, answer in zip(active, answers, strict=True):
                entry = sites[site].contribution
                if isinstance(answer, SiteUnavailable):
                    entry.status, entry.reason = answer.status, answer.reason
                    sites[site].active = False
                    continue
                if answer.HasField("refusal"):
                    entry.status, entry.reason = "refused", answer.refusal.reason
                    entry.code = answer.refusal.code
                    sites[site].active = False
                    continue
                reply = answer.reply
                site_ctx = AnalysisContext(
                    self.dictionary, reply.privacy_mode or mode, SDCThresholds(), round_no, state
                )
                try:
                    record = record_from_proto(reply.record, analysis.declare(params, site_ctx))
                except RecordError as exc:
                    entry.status, entry.code = "error", "record"
                    entry.reason = f"reply does not match the declared record: {exc}"
                    sites[site].active = False
                    continue
                records[site] = record
                entry.epsilon += reply.epsilon_spent
                entry.mode = reply.privacy_mode
                entry.records = analysis.site_records(record)
                modes.append(reply.privacy_mode)
            if not records:
                reasons = "; ".join(
                    f"{s.contribution.name}: {s.contribution.reason}" for s in sites.values()
                )
                raise RequestFailed(
                    f"no site contributed ({reasons})", [s.contribution for s in sites.values()]
                )
            if round_no > 0 and len(records) < len(active):
                # The pooled sums changed under the iteration: start again without the site(s)
                # that left. Each restart drops at least one site, so restarts are bounded.
                restarts += 1
                state, round_no = analysis.initial_state(params, ctx), 0
                continue
            effective = modes[0]
            for m in modes[1:]:
                effective = stricter_mode(effective, m)
            combine_ctx = AnalysisContext(
                self.dictionary, effective, SDCThresholds(), round_no, state
            )
            outcome = analysis.combine(records, params, combine_ctx)
            if isinstance(outcome, NextRound):
                state = outcome.state
                round_no += 1
                continue
            result: AnalysisResult = outcome
            result.sites = [s.contribution for s in sites.values()]
            for entry in result.sites:
                if entry.status != "ok":
                    entry.records = None
            spent = max((s.epsilon for s in result.sites), default=0.0)
            mechanisms = sorted(
                {rel.mechanism for r in records.values() for rel in r.releases.values()} - {"none"}
            )
            result.privacy = PrivacySummary(
                mode=effective,
                mechanism=", ".join(mechanisms) or "none",
                epsilon_per_site=spent,
                guarantee=_guarantee(effective, spent),
            )
            if restarts:
                result.notes.append(
                    f"sites left during the iteration; it restarted {restarts} time(s) without "
                    "them, so every round pooled the same sites (in dp mode the restarted rounds "
                    "were charged too)"
                )
            timings["total_seconds"] = time.perf_counter() - started
            result.timings = timings
            return result

    async def _ask(self, site: str, task: pb.Task) -> pb.SiteMessage | SiteUnavailable:
        try:
            return await self.registry.run_task(site, task, self.task_timeout)
        except SiteUnavailable as exc:
            return exc
