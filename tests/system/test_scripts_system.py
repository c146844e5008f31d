"""Researchers' scripts through real processes: submitted by hash at the coordinator, refused
by every site until its admin approves that hash (with the CLI, while the site runs), then the
exact pooled answer; one changed byte is refused everywhere again."""

from __future__ import annotations

from pathlib import Path

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


def test_a_script_runs_only_where_its_hash_is_approved(tmp_path: Path, heart_pooled: pd.DataFrame):
    federation = heart_federation(tmp_path, "sdc")
    module = (SCRIPTS / "odds_ratio.py").read_text()
    manifest = (SCRIPTS / "odds_ratio.yaml").read_text()
    try:
        federation.start(study("sdc"))
        with federation.researcher() as client:
            digest = client.submit_script("s1", module, manifest)["hash"]
            request = {"analysis": "script", "params": {"hash": digest}}
            before = client.submit("s1", request)
            configs = {s: federation.site_dir(s) / "site.yaml" for s in SITES}
            review = runner.invoke(
                app, ["site", "review-script", digest[:12], "--config", str(configs["va"])]
            )
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
