"""Budgets at three levels, each checked and charged in the reply's one ledger transaction.

The levels: the study's budget at a site, a researcher's budget within the study, and the
site-wide budget per calendar period over all studies (plus the per-request cap). A refusal
names the level that ran out with requested, remaining and the shortfall; concurrent tasks,
threads or processes, never overspend any level.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from protocol.budget import PureDP
from protocol.config import DataDictionary
from protocol.errors import RefusedError
from protocol.wire import alliance_pb2 as pb
from protocol.wire.messages import TaskMessage
from simulations.cli import app
from simulations.heart import DICTIONARY_PATH, heart_source
from site_node.ledger import Charge, SiteStore, period_name, period_start
from site_node.runtime import SiteRuntime
from tests.unit.test_site_runtime import make_site, task


@pytest.fixture
def frame(heart_frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return heart_frames["cleveland"]


def policy(**extra: Any) -> dict[str, Any]:
    studies = extra.pop(
        "studies",
        [{"id": "s1", "budget": 3.0, "epsilon_per_request": 3.0}],
    )
    return {"allowed_analyses": ["count"], "studies": studies, **extra}


def count_task(
    task_id: str, epsilon: float, researcher: str = "r.chen", study: str = "s1"
) -> pb.Task:
    wire = task("count", task_id, epsilon=epsilon, study=study)
    wire.researcher = researcher
    wire.request_id = task_id
    return wire


def test_a_researcher_over_their_budget_is_refused_naming_them_while_others_go_on(
    tmp_path: Path, frame: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    studies = [{"id": "s1", "budget": 3.0, "epsilon_per_request": 3.0, "researcher_budget": 1.0}]
    site = make_site(tmp_path, frame, heart_dict, policy(studies=studies))
    assert site.handle(count_task("a", 0.7)).status == "reply"
    refused = site.handle(count_task("b", 0.5))
    assert refused.message.refusal.code == "budget"
    assert refused.reason == (
        "refused by testsite: researcher r.chen in study s1 has epsilon 0.3 left at this site; "
        "this request needs 0.5 (short by 0.2). Ask the site admin for more budget, or lower "
        "`epsilon` in the request"
    )
    assert site.handle(count_task("c", 0.5, researcher="r.other")).status == "reply"
    assert site.store.spent_by_researcher("s1") == {"r.chen": PureDP(0.7), "r.other": PureDP(0.5)}


def test_the_site_wide_period_budget_spans_studies_and_names_the_period(
    tmp_path: Path, frame: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    studies = [
        {"id": "s1", "budget": 3.0, "epsilon_per_request": 3.0},
        {"id": "s2", "budget": 3.0, "epsilon_per_request": 3.0},
    ]
    site = make_site(
        tmp_path,
        frame,
        heart_dict,
        policy(studies=studies, period_budget={"period": "month", "epsilon": 1.5}),
    )
    assert site.handle(count_task("a", 1.0, study="s1")).status == "reply"
    refused = site.handle(count_task("b", 0.8, study="s2"))
    month = period_name("month", dt.datetime.now(dt.UTC))
    assert refused.message.refusal.code == "budget"
    assert f"this site's budget for {month} (all studies) has epsilon 0.5 left" in refused.reason
    assert "needs 0.8 (short by 0.3)" in refused.reason
    assert site.handle(count_task("c", 0.5, study="s2")).status == "reply"
    assert site.store.spent_in_period("month") == PureDP(1.5)


def test_calendar_periods_start_where_people_expect() -> None:
    at = dt.datetime(2026, 12, 2, 18, 30, tzinfo=dt.UTC)  # a Wednesday
    assert period_start("day", at) == dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
    assert period_start("week", at) == dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    assert period_start("month", at) == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    assert period_start("year", at) == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert period_name("week", at) == "week 49 of 2026"
    assert period_name("month", at) == "December 2026"


@pytest.mark.parametrize("level", ["study", "researcher", "period"])
def test_concurrent_tasks_never_overspend_any_level(
    tmp_path: Path, frame: pd.DataFrame, heart_dict: DataDictionary, level: str
) -> None:
    # 32 threads race 0.1-epsilon tasks against a level that fits 10 of them.
    study: dict[str, Any] = {"id": "s1", "budget": 100.0, "epsilon_per_request": 100.0}
    extra: dict[str, Any] = {}
    if level == "study":
        study["budget"] = 1.0
    elif level == "researcher":
        study["researcher_budget"] = 1.0
    else:
        extra["period_budget"] = {"period": "day", "epsilon": 1.0}
    site = make_site(tmp_path, frame, heart_dict, policy(studies=[study], **extra))
    with ThreadPoolExecutor(max_workers=32) as pool:
        outcomes = list(pool.map(lambda i: site.handle(count_task(f"t{i}", 0.1)), range(32)))
    replied = {o.message.reply.task_id for o in outcomes if o.status == "reply"}
    refused = [o for o in outcomes if o.status == "refused"]
    assert len(replied) == 10
    assert {o.message.refusal.code for o in refused} == {"budget"}
    ledger = site.store.ledger()
    assert {row.task_id for row in ledger} == replied  # one charge per reply, none without
    assert len(ledger) == len(replied)
    assert site.store.spent("s1") == PureDP(1.0)


def _race(path: str, start: int, results: Any) -> None:
    """One OS process's share of a race on one site.db."""
    store = SiteStore(Path(path), actor="racer")
    ok = 0
    for i in range(start, start + 15):
        message = TaskMessage(f"p{i}", f"p{i}", "s1", "count", "r.chen", epsilon=0.1)
        charge = Charge("s1", f"p{i}", PureDP(0.1), PureDP(1.0), None)
        try:
            store.commit_reply(message, charge, b"payload", "receipt", {"task": f"p{i}"})
            ok += 1
        except RefusedError:
            pass
    store.close()
    results.put(ok)


def test_two_processes_committing_to_one_ledger_never_overspend(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    SiteStore(path, actor="setup").close()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    racers = [context.Process(target=_race, args=(str(path), n * 100, results)) for n in (1, 2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=120)
        assert racer.exitcode == 0
    committed = results.get() + results.get()
    store = SiteStore(path, actor="check")
    assert committed == 10  # 30 attempts of 0.1 against a budget of 1.0
    assert len(store.ledger()) == 10
    assert store.spent("s1") == PureDP(1.0)
    assert store.verify_audit().ok


def test_site_ledger_shows_every_level_with_spent_and_remaining(
    tmp_path: Path, frame: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    studies = [{"id": "s1", "budget": 3.0, "epsilon_per_request": 3.0, "researcher_budget": 1.0}]
    full_policy = policy(studies=studies, period_budget={"period": "month", "epsilon": 10.0})
    config = {
        "name": "va",
        "coordinator": "127.0.0.1:1",
        "dictionary": str(DICTIONARY_PATH),
        "data": heart_source("va").model_dump(mode="json"),
        "state_dir": str(tmp_path / "state"),
        "insecure": True,
        "policy": full_policy,
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    site = SiteRuntime.from_config(_load(path))
    assert site.handle(count_task("a", 0.25)).status == "reply"
    assert site.handle(count_task("b", 0.5, researcher="r.other")).status == "reply"
    site.close()
    result = CliRunner().invoke(app, ["site", "ledger", "--config", str(path)])
    assert result.exit_code == 0, result.output
    month = period_name("month", dt.datetime.now(dt.UTC))
    lines = result.stdout.splitlines()
    assert f"  site-wide, {month}, all studies: spent 0.75 of 10, 9.25 left" in lines
    assert "  study s1: spent 0.75 of 3, 2.25 left" in lines
    assert "    researcher r.chen: spent 0.25 of 1, 0.75 left" in lines
    assert "    researcher r.other: spent 0.5 of 1, 0.5 left" in lines


def _load(path: Path) -> Any:
    from protocol.config import SiteConfig, load_yaml

    return load_yaml(path, SiteConfig)
