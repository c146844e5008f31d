"""A curious researcher's view of real site runtimes: the coordinator's round driver, in process.

:class:`Researcher` does what the coordinator's scheduler does for a request (the same
:class:`~analyses.driver.RoundDriver`, the same task messages, each reply rebuilt against the
coordinator's own declaration), minus the network: every task goes through
``SiteRuntime.handle``, the site's whole trust boundary (policy, ledger, disclosure control,
privacy engine). A refused request comes back as :class:`Refused` with each site's reason, as
the researcher would read it.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.driver import RequestFailed, RoundDriver, SiteAnswer, SiteFailure, SiteReply
from analyses.registry import get_analysis
from analyses.results import AnalysisResult
from protocol.budget import PureDP
from protocol.config import DataDictionary, SiteConfig
from protocol.errors import AllianceError, RecordError
from protocol.wire.messages import RefusalMessage, ReplyMessage, TaskMessage
from site_node.harmonize import conform, patient_ids
from site_node.runtime import SiteRuntime

ALL_ANALYSES = [
    "count",
    "mean",
    "histogram",
    "table",
    "quantiles",
    "glm",
    "cox",
    "kaplan_meier",
    "logrank",
    "ttest",
    "proportion",
    "correlation",
    "quality",
]


def sdc_site(
    folder: Path,
    name: str,
    frame: pd.DataFrame,
    dictionary: DataDictionary,
    approval: Mapping[str, Any] | None = None,
    sdc: Mapping[str, Any] | None = None,
) -> SiteRuntime:
    """A site whose policy approves study ``s1`` in sdc for every analysis.

    ``approval`` adds fields to the study's approval (free filters, populations, models ...);
    ``sdc`` sets the site's thresholds.
    """
    policy: dict[str, Any] = {
        "allowed_analyses": ALL_ANALYSES,
        "studies": [{"id": "s1", "mode": "sdc", **(approval or {})}],
    }
    if sdc is not None:
        policy["sdc"] = dict(sdc)
    config = SiteConfig.model_validate(
        {
            "name": name,
            "coordinator": "127.0.0.1:1",
            "dictionary": str(folder / "dictionary.yaml"),
            "data": {"path": str(folder / "data.csv")},
            "state_dir": str(folder / name / "state"),
            "insecure": True,
            "policy": policy,
        }
    )
    data, report = conform(frame, dictionary)
    return SiteRuntime(config, dictionary, data, report, patient_ids(frame, dictionary))


@dataclass(frozen=True)
class Refused:
    """A request no site contributed to: each site's reason, as the researcher reads it."""

    reasons: dict[str, str]
    codes: dict[str, str | None]

    def __str__(self) -> str:
        return "; ".join(f"{site}: {reason}" for site, reason in self.reasons.items())


class Researcher:
    """Runs requests of study ``s1`` against site runtimes, as the coordinator would."""

    def __init__(
        self,
        sites: Mapping[str, SiteRuntime],
        dictionary: DataDictionary,
        mode: str = "sdc",
        name: str = "r.curious",
        min_quality: Mapping[str, float] | None = None,
    ) -> None:
        self.sites = dict(sites)
        self.dictionary = dictionary
        self.mode = mode
        self.name = name
        self.min_quality = dict(min_quality or {})  # the study file's, sent with every task
        self.asked = 0

    def run(
        self, analysis: str, filter: str = "", epsilon: float | None = None, **params: Any
    ) -> AnalysisResult | Refused:
        """One request: its result, or :class:`Refused` when no site contributed."""
        self.asked += 1
        chosen = get_analysis(analysis)
        parsed = chosen.parse_params(params, self.dictionary)
        driver = RoundDriver(
            chosen,
            parsed,
            self.dictionary,
            self.mode,
            list(self.sites),
            PureDP(epsilon) if epsilon is not None and self.mode == "dp" else None,
        )
        request_id = uuid.uuid4().hex[:16]
        base = TaskMessage(
            task_id="",
            request_id=request_id,
            study_id="s1",
            analysis=analysis,
            researcher=self.name,
            purpose="research",
            params=params,
            filter=filter,
            privacy_mode=self.mode,
            min_quality=self.min_quality,
        )
        numbers = itertools.count()
        try:
            while (step := driver.next_round()) is not None:
                task = replace(
                    base,
                    round=step.round,
                    state=step.state,
                    epsilon=step.epsilon.epsilon if step.epsilon is not None else 0.0,
                )
                answers: dict[str, SiteAnswer] = {}
                for site in step.sites:
                    wire = replace(task, task_id=f"{request_id}.{next(numbers)}.{site}")
                    answers[site] = self._answer(driver, wire)
                driver.receive(answers)
        except RequestFailed as failed:
            return Refused(
                {s.name: s.reason for s in failed.sites if s.status != "ok"},
                {s.name: s.code for s in failed.sites if s.status != "ok"},
            )
        except AllianceError as exc:  # the coordinator's half refused (an sdc survival probe)
            return Refused({"coordinator": str(exc)}, {"coordinator": "disclosure"})
        return driver.result()

    def _answer(self, driver: RoundDriver, task: TaskMessage) -> SiteAnswer:
        site = task.task_id.rsplit(".", 1)[1]
        message = self.sites[site].handle(task.to_proto().task).message
        if message.HasField("refusal"):
            refusal = RefusalMessage.from_proto(message.refusal)
            return SiteFailure("refused", refusal.reason, refusal.code)
        try:
            reply = ReplyMessage.from_proto(message.reply, driver.spec)
        except RecordError as exc:  # pragma: no cover - a bug, shown in the failure
            return SiteFailure("error", str(exc), "record")
        return SiteReply(reply.record, reply.privacy_mode, PureDP(reply.epsilon_spent))
