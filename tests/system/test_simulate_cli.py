"""`alliance simulate` through the CLI runner: real processes behind a real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from simulations.cli import app
from simulations.heart import DICTIONARY_PATH, read_raw

pytestmark = pytest.mark.system
runner = CliRunner()


@pytest.fixture
def site_csvs(tmp_path: Path, heart_frames: dict[str, pd.DataFrame]) -> list[str]:
    args = []
    for name in ("cleveland", "hungarian"):
        path = tmp_path / f"{name}.csv"
        heart_frames[name].to_csv(path, index=False)
        args += ["--site", f"{name}={path}"]
    return args


def write(tmp_path: Path, name: str, body: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return str(path)


def simulate(site_csvs: list[str], requests: list[str], *options: str) -> Result:
    """``alliance simulate`` over the sites with the demo dictionary, these request files in
    order, then ``options``."""
    args = ["simulate", *site_csvs, "--dictionary", str(DICTIONARY_PATH)]
    for request in requests:
        args += ["--request", request]
    return runner.invoke(app, [*args, *options])


def test_requests_run_in_order_one_json_line_each_and_the_budget_holds(
    tmp_path: Path, site_csvs: list[str], heart_frames: dict[str, pd.DataFrame]
) -> None:
    count = write(tmp_path, "count.yaml", {"analysis": "count"})
    mean = write(tmp_path, "mean.yaml", {"analysis": "mean", "params": {"variable": "age"}})
    keep = tmp_path / "kept"
    result = simulate(
        site_csvs,
        [count, mean, count],
        *("--privacy", "dp", "--epsilon", "0.4", "--budget", "1.0", "--json"),
        *("--keep", str(keep)),
    )
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [doc["analysis"] for doc in lines] == ["count", "mean", "count"], (
        result.exit_code,
        result.output,
        repr(result.exception),
    )
    assert lines[0]["privacy"]["mode"] == "dp"
    assert lines[0]["privacy"]["epsilon_per_site"] == pytest.approx(0.4)
    true_n = len(heart_frames["cleveland"]) + len(heart_frames["hungarian"])
    assert abs(lines[0]["count"] - true_n) < 60  # discrete Laplace, scale 2.5 per site
    # 0.4 + 0.4 spent of 1.0: the third request needs 0.4 with 0.2 left at both sites.
    assert lines[2]["ok"] is False
    for site in lines[2]["sites"]:
        assert site["status"] == "refused"
        assert "left at this site; this request needs 0.4 (short by 0.2)" in site["reason"]
    assert result.exit_code == 1
    for name in ("cleveland", "hungarian"):
        assert (keep / "sites" / name / "site.yaml").exists()
        assert (keep / "sites" / name / "state" / "site.db").exists()
        verified = runner.invoke(app, ["audit", "verify", str(keep / "sites" / name)])
        assert verified.exit_code == 0 and "audit trail intact" in verified.stdout
    assert (keep / "coordinator" / "coordinator.db").exists()
    before = sorted((p.name, p.stat().st_size) for p in (keep / "coordinator").iterdir())
    verified = runner.invoke(app, ["audit", "verify", str(keep / "coordinator")])
    assert verified.exit_code == 0 and "audit trail intact" in verified.stdout
    # Read through the store class, read-only: not even a -wal or -shm file appears.
    assert sorted((p.name, p.stat().st_size) for p in (keep / "coordinator").iterdir()) == before
    ledger = runner.invoke(
        app, ["site", "ledger", "--config", str(keep / "sites" / "cleveland" / "site.yaml")]
    )
    assert "total simulation: epsilon 0.8 of 1" in ledger.stdout


def test_off_mode_prints_exact_text(
    tmp_path: Path, site_csvs: list[str], heart_frames: dict[str, pd.DataFrame]
) -> None:
    mean = write(tmp_path, "mean.yaml", {"analysis": "mean", "params": {"variable": "age"}})
    result = simulate(site_csvs, [mean], "--privacy", "off")
    assert result.exit_code == 0, result.output
    pooled = pd.concat([heart_frames["cleveland"], heart_frames["hungarian"]]).age
    assert result.stdout.startswith(f"<MeanResult 2 sites, n={len(pooled)}, off>")
    assert f"{pooled.mean():.5f}" in result.stdout  # the exact pooled mean, in the table


def test_the_quality_scorecard_through_real_site_processes(tmp_path: Path) -> None:
    # The raw UCI files, as hospitals hold them: Switzerland codes every cholesterol as 0, which
    # the dictionary's range [50, 700] does not allow.
    sites = []
    raw = {name: read_raw(name) for name in ("switzerland", "va")}
    for name, frame in raw.items():
        path = tmp_path / f"{name}.csv"
        frame.to_csv(path, index=False)
        sites += ["--site", f"{name}={path}"]
    quality = write(tmp_path, "q.yaml", {"analysis": "quality", "params": {"variables": ["chol"]}})
    result = simulate(sites, [quality], "--privacy", "sdc", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    for name, frame in raw.items():
        # Reference: pandas on the raw file.
        chol = frame["chol"]
        profile = doc["profiles"][name]["chol"]
        assert profile["n"] == len(frame)
        assert profile["out_of_range"] == int(((chol < 50) | (chol > 700)).sum())
        assert profile["missing"] == int(chol.isna().sum())
    assert doc["profiles"]["switzerland"]["chol"]["out_of_range"] == 123
    assert doc["profiles"]["va"]["chol"]["out_of_range"] == 49


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--privacy", "exact"],
            "--privacy: 'exact' is not a privacy mode; use one of: dp, sdc, off",
        ),
        (["--site", "broken"], "--site: 'broken' is not NAME=PATH"),
        (["--epsilon", "0"], "--epsilon: 0.0: must be above 0"),
        (["--budget", "-1"], "--budget: -1.0: epsilon must be a finite number >= 0"),
    ],
)
def test_bad_options_are_one_line_errors(
    tmp_path: Path, site_csvs: list[str], args: list[str], message: str
) -> None:
    count = write(tmp_path, "count.yaml", {"analysis": "count"})
    result = simulate(site_csvs, [count], *args)
    assert result.exit_code != 0
    assert message in str(result.exception)


def test_a_bad_request_file_fails_before_anything_starts(
    tmp_path: Path, site_csvs: list[str]
) -> None:
    bad = write(tmp_path, "bad.yaml", {"analysis": "mean", "params": {"variable": "height"}})
    result = simulate(site_csvs, [bad])
    assert "bad.yaml: variable 'height' is not in the data dictionary" in str(result.exception)
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("analysis: [unclosed\n")
    result = simulate(site_csvs, [str(malformed)])
    assert "malformed.yaml: malformed YAML at line 2" in str(result.exception)
