"""`alliance site check` and `alliance site ledger` through the CLI runner."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml
from typer.testing import CliRunner

from simulations.cli import app
from simulations.heart import DICTIONARY_PATH, heart_source

runner = CliRunner()


def write_site(tmp_path: Path, policy: dict | None = None) -> Path:
    source = heart_source("va").model_dump(mode="json")
    config = {
        "name": "va",
        "coordinator": "127.0.0.1:1",
        "dictionary": str(DICTIONARY_PATH),
        "data": source,
        "state_dir": str(tmp_path / "state"),
        "insecure": True,
        "policy": policy or {},
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_check_reports_counts_never_values_and_changes_nothing(tmp_path: Path) -> None:
    config = write_site(tmp_path)
    result = runner.invoke(app, ["site", "check", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "data: 200 records loaded" in result.stdout
    assert "data: chol: 49 values below the dictionary minimum (set missing)" in result.stdout
    assert "data: trestbps: 1 values below the dictionary minimum (set missing)" in result.stdout
    assert "allowed analyses: none (deny all)" in result.stdout
    db = tmp_path / "state" / "site.db"
    assert f"audit log: none yet ({db} is created by `alliance site serve`)" in result.stdout
    assert not (tmp_path / "state").exists()  # a check writes nothing


def test_ledger_of_a_fresh_site_is_empty(tmp_path: Path) -> None:
    config = write_site(tmp_path, {"allowed_analyses": ["count"], "studies": [{"id": "s1"}]})
    result = runner.invoke(app, ["site", "ledger", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "the ledger is empty"


def test_a_bad_site_config_is_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(
        "name: va\ncoordinator: x:1\ndictionary: d.yaml\ndata: {path: a.csv}\n"
        "insecure: true\npolicy: {studies: [{id: s1, mode: exact}]}\n"
    )
    result = runner.invoke(app, ["site", "check", "--config", str(path)])
    assert result.exit_code != 0
    assert str(result.exception) == (
        f"{path}: policy.studies[0].mode: 'exact' is not allowed; use one of: dp, sdc, off"
    )


def test_check_shows_classes_sdc_terms_patient_ids_and_consent(tmp_path: Path) -> None:
    dictionary = yaml.safe_load(DICTIONARY_PATH.read_text())
    dictionary["variables"]["age"]["sensitivity"] = "quasi-identifier"
    dictionary["variables"]["thal"]["sensitivity"] = "sensitive"
    dictionary["patient_id"] = "pid"
    (tmp_path / "dictionary.yaml").write_text(yaml.safe_dump(dictionary))
    data = tmp_path / "va.csv"
    frame = pd.read_csv(heart_source("va").path, header=None, names=heart_source("va").column_names)
    frame.insert(0, "pid", [f"V{i // 2}" if i < 4 else f"V{i}" for i in range(len(frame))])
    frame.to_csv(data, index=False)
    consent = tmp_path / "consent.csv"
    consent.write_text("patient_id,purpose,status,date\nV0,research,granted,2026-01-01\n")
    config = {
        "name": "va",
        "coordinator": "127.0.0.1:1",
        "dictionary": str(tmp_path / "dictionary.yaml"),
        "data": {"path": str(data), "derive": {"disease": "num > 0"}},
        "consent": {"kind": "csv", "path": str(consent)},
        "state_dir": str(tmp_path / "state"),
        "insecure": True,
        "policy": {
            "allowed_analyses": ["count"],
            "consent": {"research": "opt-in"},
            "studies": [{"id": "s1", "mode": "sdc", "populations": ["age >= 50"]}],
        },
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["site", "check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "variables identifier: none (never analysed, filtered on or released)" in lines
    assert (
        "variables quasi-identifier: age (sdc: only on public bins or levels; never in a "
        "free-form filter)"
    ) in lines
    assert "patient ids: column 'pid', 2 repeated rows (duplicate_patients: refuse)" in lines
    assert f"consent: csv {consent}; rules: research opt-in" in lines
    assert "  sdc terms: approved populations: age >= 50; approved models: none" in lines
    assert "data: pid" not in result.stdout  # the id column is not reported as unknown


def test_check_shows_each_approvals_minimum_quality_against_the_sites_share(
    tmp_path: Path,
) -> None:
    studies = [{"id": "s1", "min_quality": {"chol": 0.8, "age": 0.95}}]
    config = write_site(tmp_path, {"allowed_analyses": ["mean"], "studies": studies})
    result = runner.invoke(app, ["site", "check", "--config", str(config)])
    assert result.exit_code == 0, result.output
    # Reference: pandas on VA's raw file (chol in [50, 700] is allowed; "?" is missing).
    source = heart_source("va")
    raw = pd.read_csv(source.path, header=None, names=source.column_names, na_values=["?"])
    share = raw["chol"].between(50, 700).mean()
    assert share < 0.8
    assert (
        f"  min_quality chol: at least 80% usable; this site {share:.0%}: left out of this study"
        in result.stdout.splitlines()
    )
    assert "  min_quality age: at least 95% usable; this site 100%: served" in result.stdout
