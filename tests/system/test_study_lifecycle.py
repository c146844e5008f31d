"""The study lifecycle through real processes (coordinator and two site nodes on loopback,
mutual TLS, SQLite files): proposed, approved by each site admin from the command line while
the site runs (no restart), active at quorum, amended (a site that has not approved the new
version answers under the old one, or refuses), refused, suspended and closed, with the sites
enforcing each step themselves."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from coordinator.client import AllianceClient, APIRequestError
from protocol.config import StudyConfig
from simulations.cli import app
from simulations.federation import LocalFederation, SiteSpec
from simulations.heart import heart_dictionary, heart_source

pytestmark = pytest.mark.system

runner = CliRunner()
SITES = ("cleveland", "hungarian")


def wait_for(check: Callable[[], Any], what: str, seconds: float = 20.0) -> Any:
    """Poll ``check`` until it returns something truthy (decisions and notices travel over
    the site link)."""
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def site_cli(federation: LocalFederation, site: str, *args: str) -> Any:
    config = str(federation.site_dir(site) / "site.yaml")
    return runner.invoke(app, ["site", *args, "--config", config])


def lifecycle_study(analyses: list[str], version_title: str = "v1") -> StudyConfig:
    return StudyConfig.model_validate(
        {
            "id": "s1",
            "title": f"lifecycle {version_title}",
            "lead": "Cleveland Clinic",
            "agreement": "DSA-2026-17",
            "sites": list(SITES),
            "researchers": ["researcher"],
            "analyses": analyses,
            "quorum": 2,
            "privacy": {"mode": "sdc"},
        }
    )


def status(lead: AllianceClient) -> str:
    return str(lead.study("s1")["status"])


def test_sites_approve_from_the_command_line_and_the_study_follows_its_lifecycle(
    tmp_path: Path, heart_pooled: pd.DataFrame
) -> None:
    sites = [SiteSpec(name, heart_source(name), approves=False) for name in SITES]
    federation = LocalFederation(sites, heart_dictionary(), tmp_path)
    seen: dict[str, Any] = {}
    try:
        federation.start(lifecycle_study(["mean"]))
        pids = {name: proc.pid for name, proc in federation.site_procs.items()}
        with (
            AllianceClient(federation.url, federation.lead_token) as lead,
            federation.researcher() as researcher,
        ):
            seen["created"] = status(lead)
            mean_age = {"analysis": "mean", "params": {"variable": "age"}}
            with pytest.raises(APIRequestError) as early:
                researcher.submit("s1", mean_age)
            seen["early"] = early.value
            seen["review"] = wait_for(
                lambda: (
                    (r := site_cli(federation, "cleveland", "review", "s1")).exit_code == 0 and r
                ),
                "the study to reach cleveland",
            )
            approved = site_cli(federation, "cleveland", "approve", "s1", "--by", "dr.it")
            assert approved.exit_code == 0, approved.output
            seen["one_approval"] = wait_for(
                lambda: [a["site"] for a in lead.study("s1")["approvals"]], "the decision"
            )
            seen["after_one"] = status(lead)
            assert site_cli(federation, "hungarian", "approve", "s1").exit_code == 0
            seen["active"] = wait_for(lambda: status(lead) == "active", "quorum")
            seen["mean_v1"] = researcher.run("s1", mean_age)

            # Amendment: version 2 adds a count; only cleveland approves it.
            amended = lifecycle_study(["mean", "count"], "v2").model_dump(mode="json")
            seen["amended"] = lead.amend_study(amended)
            wait_for(
                lambda: "version 2" in site_cli(federation, "cleveland", "review", "s1").output,
                "the amendment to reach cleveland",
            )
            seen["review_v2"] = site_cli(federation, "hungarian", "review", "s1")
            assert site_cli(federation, "cleveland", "approve", "s1").exit_code == 0
            wait_for(
                lambda: any(a["version"] == 2 for a in lead.study("s1")["approvals"]),
                "cleveland's approval of version 2",
            )
            seen["count_v2"] = researcher.submit("s1", {"analysis": "count"})
            seen["mean_mixed"] = researcher.submit("s1", mean_age)

            # Hungarian withdraws: in force at its next task.
            refused = site_cli(
                federation, "hungarian", "refuse", "s1", "--reason", "ethics board withdrew"
            )
            assert refused.exit_code == 0, refused.output
            seen["after_refusal"] = researcher.submit("s1", mean_age)
            wait_for(
                lambda: any(a["decision"] == "refused" for a in lead.study("s1")["approvals"]),
                "hungarian's refusal to reach the coordinator",
            )

            # Suspension: the coordinator stops requests, and each site learns of it.
            seen["suspended"] = lead.study_step("s1", "suspend", "data breach review")
            with pytest.raises(APIRequestError) as while_suspended:
                researcher.submit("s1", mean_age)
            seen["while_suspended"] = while_suspended.value
            seen["site_knows"] = wait_for(
                lambda: (
                    "suspended" in (o := site_cli(federation, "cleveland", "review", "s1")).output
                    and o
                ),
                "the suspension notice",
            )
            seen["resumed"] = lead.study_step("s1", "resume")
            seen["closed"] = lead.study_step("s1", "close")
            seen["report"] = lead.study_report("s1")
        seen["alive"] = {
            name: proc.poll() is None and proc.pid == pids[name]
            for name, proc in federation.site_procs.items()
        }
    finally:
        federation.stop()

    assert seen["created"] == "proposed"
    assert seen["early"].status == 409
    assert "0 of the 2 site approvals it needs" in str(seen["early"])
    review = seen["review"].output
    assert "study s1 version 1: lifecycle v1" in review
    assert "state:        proposed" in review and "analyses:     mean" in review
    assert "agreement: DSA-2026-17" in review
    assert seen["one_approval"] == ["cleveland"] and seen["after_one"] == "proposed"
    # No site restarted: the same processes answered throughout.
    assert seen["alive"] == {"cleveland": True, "hungarian": True}

    # Reference: scipy.stats.describe over the two hospitals' pooled ages (exact in sdc).
    pooled = heart_pooled[heart_pooled.site.isin(SITES)].age.dropna()
    reference = stats.describe(pooled.to_numpy(dtype=float))
    assert seen["mean_v1"]["mean"] == pytest.approx(reference.mean, rel=1e-12)
    assert {s["name"] for s in seen["mean_v1"]["sites"] if s["status"] == "ok"} == set(SITES)

    assert seen["amended"]["version"] == 2 and seen["amended"]["status"] == "active"
    changes = seen["review_v2"].output
    assert "changed since version 1, the one approved here:" in changes
    assert 'analyses: ["mean"] -> ["mean", "count"]' in changes
    # The amendment's new analysis: cleveland (approved v2) answers; hungarian answers under
    # version 1, which has no count, and refuses.
    count_sites = {s["name"]: s for s in seen["count_v2"]["result"]["sites"]}
    assert count_sites["cleveland"]["status"] == "ok"
    assert count_sites["hungarian"]["status"] == "refused"
    assert (
        "analysis 'count' is not approved for study 's1' here"
        in (count_sites["hungarian"]["reason"])
    )
    assert {s["name"] for s in seen["mean_mixed"]["result"]["sites"] if s["status"] == "ok"} == {
        "cleveland",
        "hungarian",
    }
    withdrawn = {s["name"]: s for s in seen["after_refusal"]["result"]["sites"]}
    assert withdrawn["hungarian"]["status"] == "refused"
    assert "refused at this site (hungarian) by its admin" in withdrawn["hungarian"]["reason"]
    assert "ethics board withdrew" in withdrawn["hungarian"]["reason"]
    assert withdrawn["cleveland"]["status"] == "ok"

    assert seen["suspended"]["status"] == "suspended"
    assert sorted(seen["suspended"]["told"]) == sorted(SITES)
    assert seen["while_suspended"].status == 409
    assert "state:        suspended" in seen["site_knows"].output
    # Resumed, the study is counted again: with hungarian's approval withdrawn only one of the
    # two approvals it needs holds, so it waits as proposed.
    assert seen["resumed"]["status"] == "proposed" and seen["closed"]["status"] == "closed"

    approvals = seen["report"]["approvals"]
    assert [(a["site"], a["version"], a["decision"]) for a in approvals] == [
        ("cleveland", 1, "approved"),
        ("hungarian", 1, "approved"),
        ("cleveland", 2, "approved"),
        ("hungarian", 2, "refused"),
    ]
