"""Run one analysis request across the study's sites, round by round.

Single-round analyses take one round; iterative ones (GLM, Cox, exact quantiles) return
``NextRound`` from ``combine`` until they finish. A site that refuses, drops or times out is
reported by name with its status and reason; the request goes on with the others. If the set
of contributing sites changes after the first round of an iterative analysis, the iteration
restarts without the sites that left, so every round pools the same sites.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from analyses import AnalysisResult, get_analysis
from analyses.driver import (
    RequestFailed,
    RoundDriver,
    RoundTask,
    SiteAnswer,
    SiteFailure,
    SiteReply,
)
from coordinator.link import SiteRegistry, SiteUnavailable
from coordinator.studies import check_request
from protocol.budget import ZCDP, PureDP
from protocol.config import AnalysisRequest, DataDictionary, StudyConfig
from protocol.errors import RecordError
from protocol.wire import alliance_pb2 as pb
from protocol.wire.messages import RefusalMessage, ReplyMessage, TaskMessage

__all__ = ["RequestFailed", "Scheduler"]


def _with_id(wire: pb.Task, task_id: str, study_version: int) -> pb.Task:
    task = pb.Task()
    task.CopyFrom(wire)
    task.task_id = task_id
    task.study_version = study_version
    return task


class Scheduler:
    """Turns requests into tasks and replies into results."""

    def __init__(
        self, registry: SiteRegistry, dictionary: DataDictionary, task_timeout: float
    ) -> None:
        self.registry = registry
        self.dictionary = dictionary
        self.task_timeout = task_timeout

    async def run(
        self,
        study: StudyConfig,
        request: AnalysisRequest,
        researcher: str,
        request_id: str | None = None,
        params: Any = None,
        site_versions: Mapping[str, int] | None = None,
    ) -> AnalysisResult:
        """Run ``request`` in ``study`` and return its result object.

        ``params`` are the parameters ``coordinator.studies.check_request`` returned, when the
        caller checked the request already (the HTTP API does, before it stores the request).
        ``site_versions`` is the study version each site runs it under (the latest it
        approved; ``StudyBook.site_versions``); a site not named gets the current version.

        Raises:
            ValidationError: the request is invalid (nothing was sent to any site).
            RequestFailed: no site contributed; ``sites`` holds each site's reason.
        """
        started = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex[:16]
        analysis = get_analysis(request.analysis)
        if params is None:
            params = check_request(study, request, self.dictionary)
        mode = study.privacy.mode
        epsilon = request.epsilon or study.privacy.epsilon_per_request
        names = study.sites or self.registry.connected()
        rho = request.rho or study.privacy.rho_per_request
        driver = RoundDriver(
            analysis,
            params,
            self.dictionary,
            mode,
            names,
            epsilon if mode == "dp" else None,
            rho=rho if mode == "dp" else None,
        )
        base = TaskMessage(
            task_id="",
            request_id=request_id,
            study_id=study.id,
            analysis=request.analysis,
            researcher=researcher,
            purpose=study.purpose,
            params=request.params,
            min_quality=study.min_quality,
            filter=request.filter or "",
            privacy_mode=mode,
            study_version=study.version,
        )
        # A researcher's script combines in the sandbox, which takes a second or more: in a
        # worker thread, so the site link and other requests go on meanwhile.
        runs_code = analysis.reviewed_code(params) is not None
        versions = dict(site_versions or {})
        while (step := driver.next_round()) is not None:
            answers = await self._dispatch(driver, step, base, versions)
            if runs_code:
                await asyncio.to_thread(driver.receive, answers)
            else:
                driver.receive(answers)
        result = driver.result()
        # Researchers see the coordinator's wall time only: a site's own compute time is exact
        # and depends on its data.
        result.timings = {
            "rounds": driver.rounds_run,
            "total_seconds": time.perf_counter() - started,
        }
        return result

    async def _dispatch(
        self, driver: RoundDriver, step: RoundTask, base: TaskMessage, versions: dict[str, int]
    ) -> dict[str, SiteAnswer]:
        """Send one round's task to every active site and collect the answers."""
        # Numbered by rounds dispatched, not the round number: after a restart round 1 is asked
        # at other coefficients, and must not be answered from round 1's stored reply.
        prefix = f"{base.request_id}.{driver.rounds_run}"
        task = replace(
            base,
            round=step.round,
            state=step.state,
            epsilon=step.epsilon.epsilon if step.epsilon is not None else 0.0,
            rho=step.rho.rho if step.rho is not None else 0.0,
        )
        wire = task.to_proto().task  # serialised once; each site's copy differs by its id
        messages = await asyncio.gather(
            *[
                self._ask(
                    site,
                    _with_id(wire, f"{prefix}.{site}", versions.get(site, base.study_version)),
                )
                for site in step.sites
            ]
        )
        return {
            site: self._collect(driver, message)
            for site, message in zip(step.sites, messages, strict=True)
        }

    @staticmethod
    def _collect(driver: RoundDriver, message: pb.SiteMessage | SiteUnavailable) -> SiteAnswer:
        """One site's answer as the driver's type, its record rebuilt against our declaration."""
        if isinstance(message, SiteUnavailable):
            return SiteFailure(message.status, message.reason)
        if message.HasField("refusal"):
            refusal = RefusalMessage.from_proto(message.refusal)
            return SiteFailure("refused", refusal.reason, refusal.code)
        try:
            reply = ReplyMessage.from_proto(message.reply, driver.spec)
        except RecordError as exc:
            reason = f"reply does not match the declared record: {exc}"
            return SiteFailure("error", reason, "record")
        # The wire carries numbers; from here on they are typed budgets.
        return SiteReply(
            reply.record, reply.privacy_mode, PureDP(reply.epsilon_spent), ZCDP(reply.rho_spent)
        )

    async def _ask(self, site: str, task: pb.Task) -> pb.SiteMessage | SiteUnavailable:
        try:
            return await self.registry.run_task(site, task, self.task_timeout)
        except SiteUnavailable as exc:
            return exc
