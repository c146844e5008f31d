"""Federated training through real processes: Flower's FedAvg on our own gRPC site link.

Four hospital site processes under mutual TLS, each with a real SQLite ledger; the training
app is submitted by hash and approved by three of the four site admins with the CLI. The
fourth refuses every round by the app's name; the others train, each round charged to their
ledgers in zCDP; a second request runs out of budget part way and returns the model of its
last complete round; a changed app (one byte) is refused everywhere."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from analyses.training.app import builtin_app_paths
from simulations.cli import app
from simulations.federation import LocalFederation, SiteSpec
from simulations.heart import SITES, heart_dictionary, heart_source
from tests.system.conftest import study

pytestmark = pytest.mark.system
runner = CliRunner()

FEATURES = ["age", "sex", "cp", "trestbps", "thalach", "exang", "oldpeak"]
APPROVING = ["cleveland", "hungarian", "switzerland"]


def _rho_charges(site_dir: Path, request_id: str) -> list[float]:
    """Each ledger entry a site wrote for one request (one per round it answered)."""
    with sqlite3.connect(site_dir / "state" / "site.db") as db:
        rows = db.execute(
            "SELECT rho_units FROM ledger WHERE request_id = ? ORDER BY id", (request_id,)
        ).fetchall()
    return [units / 1e9 for (units,) in rows]


def test_training_runs_on_the_governed_path_and_stops_at_the_budget(tmp_path: Path) -> None:
    module_path, manifest_path = builtin_app_paths()
    module, manifest = Path(module_path).read_text(), Path(manifest_path).read_text()
    sites = [
        SiteSpec(name, heart_source(name), mode="dp", approval={"rho_budget": 1.0})
        for name in SITES
    ]
    federation = LocalFederation(sites, heart_dictionary(), tmp_path)
    params = {
        "features": FEATURES,
        "outcome": "disease",
        "rounds": 5,
        "clip": 0.5,
        "learning_rate": 2.0,
    }
    try:
        federation.start(study("dp"))
        with federation.researcher() as client:
            digest = client.submit_script("s1", module, manifest)["hash"]
            request = {"analysis": "train", "params": {"app": digest, **params}, "rho": 0.6}
            for name in APPROVING:
                config = federation.site_dir(name) / "site.yaml"
                done = runner.invoke(
                    app, ["site", "approve-script", digest, "--config", str(config)]
                )
                assert done.exit_code == 0, done.output
            first = client.run(
                "s1", {**request, "params": {**request["params"], "contributions": "leave_one_out"}}
            )
            # 0.6 of each site's 1.0 is spent: 0.1 a round buys four more rounds, not six.
            second = client.run("s1", request)
            changed = client.submit_script("s1", module + "\n", manifest)["hash"]
            again = client.submit(
                "s1", {"analysis": "train", "params": {"app": changed, **params}, "rho": 0.6}
            )
            report = client.study_report("s1")
    finally:
        federation.stop()

    by_site = {s.name: s for s in first.sites}
    assert by_site["va"].status == "refused" and by_site["va"].code == "script"
    assert "training app 'gradient_descent'" in by_site["va"].reason
    assert f"alliance site approve-script {digest}" in by_site["va"].reason
    for name in APPROVING:
        assert by_site[name].status == "ok"
        assert by_site[name].rho == pytest.approx(0.6, rel=1e-6)
    assert first.rounds == 5 and not first.stopped
    assert first.privacy.rho_per_site == pytest.approx(0.6, rel=1e-6)
    assert "rho-zCDP" in first.privacy.guarantee
    # (epsilon, delta) from the zCDP spent: rho + 2 sqrt(rho ln(1/delta)), delta = 1e-5.
    assert first.epsilon == pytest.approx(0.6 + 2 * (0.6 * 11.512925464970229) ** 0.5, rel=1e-6)
    assert len(first.history) == 6  # the initial model and one row per completed round
    # Credit: coalition models trained alongside, rebuilt without va after its refusal.
    assert set(first.contributions["leave_one_out"]) == set(APPROVING)
    assert first.contributions["coalitions"] == 3
    assert any("rebuilt without it" in note for note in first.notes)
    credit = {row["site"]: row for row in report["model_credit"]}
    assert set(credit) == set(APPROVING)
    assert credit["cleveland"]["leave_one_out"] == first.contributions["leave_one_out"]["cleveland"]

    # The ledger was charged per round: five training rounds and the final evaluation.
    request_ids = {}
    for name in APPROVING:
        with sqlite3.connect(federation.site_dir(name) / "state" / "site.db") as db:
            request_ids[name] = [
                r[0]
                for r in db.execute(
                    "SELECT request_id FROM ledger WHERE study_id = 's1' "
                    "GROUP BY request_id ORDER BY MIN(id)"
                )
            ]
        charges = _rho_charges(federation.site_dir(name), request_ids[name][0])
        assert charges == pytest.approx([0.1] * 6, rel=1e-6)

    # The second request: four rounds charged (0.4 left), the fifth refused for budget, and
    # the result is the model after the fourth complete round.
    assert second.stopped.startswith("round 5 lost")
    assert "budget" in second.stopped or "rho" in second.stopped
    assert second.rounds == 4
    for name in APPROVING:
        charges = _rho_charges(federation.site_dir(name), request_ids[name][1])
        assert charges == pytest.approx([0.1] * 4, rel=1e-6)
    assert len(second.weights["coef"]) == 9

    # One changed byte is a different app: refused everywhere, by name.
    assert changed != digest and again["status"] == "failed"
    assert all(s["code"] == "script" and changed in s["reason"] for s in again["result"]["sites"])
