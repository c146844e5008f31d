"""Researchers' scripts through real processes: submitted by hash at the coordinator, refused
by every site until its admin approves that hash (with the CLI, while the site runs), then the
exact pooled answer; one changed byte is refused everywhere again."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.contingency_tables import Table2x2
from typer.testing import CliRunner

from simulations.cli import app
from simulations.heart import SITES
from tests.system.conftest import heart_federation, study

pytestmark = pytest.mark.system

SCRIPTS = Path(__file__).resolve().parents[2] / "configs" / "scripts"
runner = CliRunner()


def review_when_offered(digest: str, config: Path, seconds: float = 20.0) -> Any:
    """``alliance site review-script`` once the site has the script (offers travel over the
    site link, so it may take a moment)."""
    deadline = time.monotonic() + seconds
    while True:
        review = runner.invoke(app, ["site", "review-script", digest[:12], "--config", str(config)])
        if review.exit_code == 0 or time.monotonic() > deadline:
            return review
        time.sleep(0.2)


def test_a_script_runs_only_where_its_hash_is_approved(tmp_path: Path, heart_pooled: pd.DataFrame):
    federation = heart_federation(tmp_path, "sdc")
    module = (SCRIPTS / "odds_ratio.py").read_text()
    manifest = (SCRIPTS / "odds_ratio.yaml").read_text()
    try:
        federation.start(study("sdc"))
        with federation.researcher() as client:
            submitted = client.submit_script("s1", module, manifest)
            digest = submitted["hash"]
            configs = {s: federation.site_dir(s) / "site.yaml" for s in SITES}
            # The coordinator sends the script to every site: its admin can review it before
            # any request runs it.
            review = review_when_offered(digest, configs["va"])
            request = {"analysis": "script", "params": {"hash": digest}}
            before = client.submit("s1", request)
            for config in configs.values():
                approved = runner.invoke(
                    app, ["site", "approve-script", digest, "--config", str(config), "--by", "it"]
                )
                assert approved.exit_code == 0, approved.output
            after = client.run("s1", request)
            changed = client.submit_script("s1", module + "\n", manifest)["hash"]
            again = client.submit("s1", {"analysis": "script", "params": {"hash": changed}})
    finally:
        federation.stop()
    assert sorted(submitted["offered_to"]) == sorted(SITES)
    assert before["status"] == "failed"
    refusals = {s["name"]: s for s in before["result"]["sites"]}
    assert set(refusals) == set(SITES)
    for site in refusals.values():
        assert site["status"] == "refused" and site["code"] == "script"
        assert f"alliance site approve-script {digest}" in site["reason"]
    assert review.exit_code == 0, review.output
    assert "reads sex (categorical)" in review.output and "def per_record" in review.output
    # Reference: statsmodels Table2x2 on the pooled 2x2 table of the four hospitals.
    rows = heart_pooled.dropna(subset=["sex", "num"])
    male, disease = rows.sex == 1, rows.num > 0
    cells = [
        (male & disease).sum(),
        (male & ~disease).sum(),
        (~male & disease).sum(),
        (~male & ~disease).sum(),
    ]
    reference = Table2x2(np.array(cells, dtype=float).reshape(2, 2))
    assert after["estimates"]["odds_ratio"] == pytest.approx(reference.oddsratio, rel=1e-12)
    assert after["estimates"]["cells"] == [float(c) for c in cells]
    assert {s["name"] for s in after["sites"] if s["status"] == "ok"} == set(SITES)
    assert changed != digest and again["status"] == "failed"
    assert all(s["code"] == "script" and changed in s["reason"] for s in again["result"]["sites"])


L2_MODULE = (
    "import numpy as np\n\n\ndef per_record(frame):\n"
    "    return np.column_stack([frame.age.to_numpy(), np.ones(len(frame))])\n\n\n"
    "def combine(total, n):\n    return {'mean_age': total[0] / total[1]}\n"
)
L2_MANIFEST = (
    "name: mean_age\nversion: '1'\nvariables: [age]\nk: 2\n"
    "bound: {norm: l2, value: 121}\nmode: dp\n"
)


def test_an_l2_script_spends_rho_over_grpc_and_stops_at_the_sites_rho_budget(tmp_path: Path):
    """Gaussian releases travel with their rho (Task.rho, Reply.rho_spent), each site charges
    its zCDP budget for the study, and refuses, by name, past it."""
    from simulations.federation import LocalFederation, SiteSpec
    from simulations.heart import heart_dictionary, heart_source

    sites = [
        SiteSpec(name, heart_source(name), mode="dp", approval={"rho_budget": 0.8})
        for name in SITES
    ]
    federation = LocalFederation(sites, heart_dictionary(), tmp_path)
    try:
        federation.start(study("dp"))
        with federation.researcher() as client:
            digest = client.submit_script("s1", L2_MODULE, L2_MANIFEST)["hash"]
            request = {"analysis": "script", "params": {"hash": digest}, "rho": 0.5}
            client.submit("s1", request)  # brings the script to every site
            for name in SITES:
                config = federation.site_dir(name) / "site.yaml"
                done = runner.invoke(
                    app, ["site", "approve-script", digest, "--config", str(config)]
                )
                assert done.exit_code == 0, done.output
            result = client.run("s1", request)
            over = client.submit("s1", request)
    finally:
        federation.stop()
    assert result.privacy.rho_per_site == pytest.approx(0.5)
    assert result.privacy.epsilon_per_site.epsilon == 0.0
    assert "rho-zCDP per patient row at each site" in result.privacy.guarantee
    assert result.privacy.mechanism == "gaussian"
    assert all(s.rho == pytest.approx(0.5) for s in result.sites)
    # The stated noise: each site's total carries Gaussian noise of sd 121 / sqrt(2 * 0.25)
    # (the L2 bound; half the rho, the other half is n's), four sites pooled.
    expected_sd = math.sqrt(4) * 121 / math.sqrt(2 * 0.25)
    assert result["total_sd"] == pytest.approx([expected_sd, expected_sd], rel=1e-6)
    assert over["status"] == "failed"
    for site in over["result"]["sites"]:
        assert site["code"] == "budget"
        assert (
            "has rho 0.3 left at this site; this request needs 0.5 (short by 0.2)"
            in (site["reason"])
        )
