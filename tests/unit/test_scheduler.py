"""The scheduler's round logic, with the site link stubbed by in-process sites."""

from __future__ import annotations

import asyncio
import json

import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf

from analyses import AnalysisContext, get_analysis
from coordinator.link import SiteUnavailable
from coordinator.scheduler import RequestFailed, Scheduler
from coordinator.studies import check_request
from protocol.config import AnalysisRequest, DataDictionary, StudyConfig
from protocol.records import AggregateRecord
from protocol.wire import alliance_pb2 as pb
from protocol.wire.messages import record_to_proto


class InProcessSites:
    """Answers tasks like exact (mode off) site nodes; ``drop`` makes a site vanish at a round."""

    def __init__(self, frames: dict[str, pd.DataFrame], dictionary: DataDictionary) -> None:
        self.frames = frames
        self.dictionary = dictionary
        self.drop: dict[str, int] = {}
        self.tasks: list[pb.Task] = []

    def connected(self) -> list[str]:
        return sorted(self.frames)

    async def run_task(self, site: str, task: pb.Task, timeout: float) -> pb.SiteMessage:
        self.tasks.append(task)
        if site in self.drop and task.round >= self.drop[site]:
            raise SiteUnavailable("disconnected", f"site {site} is not connected")
        analysis = get_analysis(task.analysis)
        params = analysis.parse_params(json.loads(task.params_json), self.dictionary)
        ctx = AnalysisContext(
            self.dictionary, "off", round=task.round, state=json.loads(task.state_json)
        )
        record = AggregateRecord(
            analysis.declare(params, ctx), analysis.local(self.frames[site], params, ctx)
        )
        return pb.SiteMessage(
            reply=pb.Reply(task_id=task.task_id, record=record_to_proto(record), privacy_mode="off")
        )


STUDY = StudyConfig.model_validate({"id": "s1", "title": "t", "privacy": {"mode": "off"}})
GLM = AnalysisRequest.model_validate(
    {"analysis": "glm", "params": {"formula": "disease ~ age + thalach", "family": "binomial"}}
)


def test_a_site_leaving_mid_iteration_restarts_the_fit_without_it(heart_frames, heart_dict):
    sites = InProcessSites(heart_frames, heart_dict)
    sites.drop["va"] = 2  # va answers rounds 0 and 1, then vanishes
    scheduler = Scheduler(sites, heart_dict, task_timeout=1.0)  # type: ignore[arg-type]
    result = asyncio.run(scheduler.run(STUDY, GLM, "r.chen"))
    remaining = pd.concat([f for s, f in heart_frames.items() if s != "va"])
    # statsmodels 0.15: smf.glm("disease ~ age + thalach", remaining, Binomial()).fit(tol=1e-12)
    reference = smf.glm("disease ~ age + thalach", remaining, family=sm.families.Binomial()).fit(
        tol=1e-12
    )
    for term in ("Intercept", "age", "thalach"):
        assert result.coef(term) == pytest.approx(reference.params[term], rel=1e-8)
    va = next(s for s in result.sites if s.name == "va")
    assert (va.status, va.reason) == ("disconnected", "site va is not connected")
    assert any("restarted 1 time(s)" in note for note in result.notes)
    # After the restart no task went to va, and every round pooled the same three sites.
    restart_at = max(i for i, t in enumerate(sites.tasks) if t.task_id.endswith(".va"))
    assert all(not t.task_id.endswith(".va") for t in sites.tasks[restart_at + 1 :])


def test_a_restarted_fit_never_reuses_a_task_id_for_other_work(heart_frames, heart_dict):
    # A real site answers a repeated task id from its store. Before the fix, the rounds after a
    # restart reused the ids of the first attempt's rounds (request.round.site), so round 1
    # at the new coefficients would have got the reply computed at the old ones.
    sites = InProcessSites(heart_frames, heart_dict)
    sites.drop["va"] = 2
    scheduler = Scheduler(sites, heart_dict, task_timeout=1.0)  # type: ignore[arg-type]
    asyncio.run(scheduler.run(STUDY, GLM, "r.chen"))
    ids = [t.task_id for t in sites.tasks]
    assert len(ids) == len(set(ids))


def test_every_site_refusing_is_a_typed_failure_naming_each(heart_frames, heart_dict):
    sites = InProcessSites(heart_frames, heart_dict)
    sites.drop = {name: 0 for name in heart_frames}
    scheduler = Scheduler(sites, heart_dict, task_timeout=1.0)  # type: ignore[arg-type]
    with pytest.raises(RequestFailed) as failure:
        asyncio.run(scheduler.run(STUDY, GLM, "r.chen"))
    assert str(failure.value).startswith("no site contributed (cleveland: site cleveland is not")
    assert {s.name: s.status for s in failure.value.sites} == dict.fromkeys(
        heart_frames, "disconnected"
    )


def test_researchers_see_only_the_coordinators_wall_time_and_rounds(heart_frames, heart_dict):
    sites = InProcessSites(heart_frames, heart_dict)
    scheduler = Scheduler(sites, heart_dict, task_timeout=1.0)  # type: ignore[arg-type]
    result = asyncio.run(scheduler.run(STUDY, GLM, "r.chen"))
    # No site's compute time, no time spent waiting for sites: they depend on the data.
    assert set(result.timings) == {"total_seconds", "rounds"}
    assert result.timings["rounds"] >= 2  # IRLS: several rounds over the link


@pytest.mark.parametrize("epsilon", [1.8, 1.200000000001, 0.5000000001])
def test_a_request_over_the_epsilon_cap_is_refused_before_any_task_leaves(
    heart_frames, heart_dict, epsilon
):
    from protocol.budget import PureDP, over_request_cap
    from protocol.errors import ValidationError

    study = StudyConfig.model_validate(
        {"id": "s1", "title": "t", "privacy": {"epsilon_per_request": 0.5, "budget": 1.8}}
    )
    sites = InProcessSites(heart_frames, heart_dict)
    scheduler = Scheduler(sites, heart_dict, task_timeout=1.0)  # type: ignore[arg-type]
    request = AnalysisRequest.model_validate({"analysis": "count", "epsilon": epsilon})
    with pytest.raises(ValidationError) as refused:
        asyncio.run(scheduler.run(study, request, "r.chen"))
    assert str(refused.value) == over_request_cap("s1", PureDP(epsilon), PureDP(0.5))
    assert sites.tasks == []
    lower = AnalysisRequest.model_validate({"analysis": "count", "epsilon": 0.5})
    assert check_request(study, lower, heart_dict) is not None
