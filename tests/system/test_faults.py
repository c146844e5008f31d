"""Faults: a site that freezes or dies mid-study, wrong certificates, a coordinator that is down."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from coordinator import pki
from coordinator.client import AllianceClient
from protocol.errors import LinkError
from simulations.federation import LocalFederation, child_env
from tests.system.conftest import heart_federation, study

pytestmark = pytest.mark.system


def wait_for_log(path: Path, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} did not appear in {path}:\n{LocalFederation.tail(path)}")


@pytest.fixture(scope="module")
def dp_federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    federation = heart_federation(
        tmp_path_factory.mktemp("faults"), "dp", budget=100.0, epsilon=1.0, task_timeout=4.0
    )
    try:
        federation.start(study("dp", epsilon=1.0, budget=100.0))
        yield federation
    finally:
        federation.stop()


def test_a_frozen_site_is_reported_by_name_after_the_timeout(
    dp_federation: LocalFederation,
) -> None:
    frozen = dp_federation.site_procs["switzerland"]
    frozen.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with dp_federation.researcher() as client:
            result = client.run("s1", {"analysis": "count"})
        elapsed = time.monotonic() - started
    finally:
        frozen.send_signal(signal.SIGCONT)
    statuses = {s["name"]: (s["status"], s["reason"]) for s in result["sites"]}
    assert statuses["switzerland"] == ("timeout", "site switzerland did not answer within 4 s")
    assert all(statuses[n][0] == "ok" for n in ("cleveland", "hungarian", "va"))
    assert elapsed < 30  # the study did not hang
    assert result["n"] > 0


def test_a_killed_site_is_reported_and_comes_back(dp_federation: LocalFederation) -> None:
    dp_federation.stop_site("va", signal.SIGKILL)  # a crash, not a clean stop
    deadline = time.monotonic() + 20
    with dp_federation.researcher() as client:
        while "va" in client.health()["sites"] and time.monotonic() < deadline:
            time.sleep(0.1)
        result = client.run("s1", {"analysis": "mean", "params": {"variable": "age"}})
        va = next(s for s in result["sites"] if s["name"] == "va")
        assert va["status"] == "disconnected"
        assert va["reason"] == "site va is not connected"
        # Restarted, it reconnects with its ledger intact and answers again.
        spent_before = _spent(dp_federation, "va")
        dp_federation.start_site(next(s for s in dp_federation.sites if s.name == "va"), "s1")
        dp_federation.wait_for_sites(["va"])
        again = client.run("s1", {"analysis": "count"})
    assert next(s for s in again["sites"] if s["name"] == "va")["status"] == "ok"
    assert _spent(dp_federation, "va") == pytest.approx(spent_before + 1.0)  # the study's epsilon


def _spent(federation: LocalFederation, site: str) -> float:
    from site_node.ledger import SiteStore

    store = SiteStore(federation.site_dir(site) / "state" / "site.db", site)
    try:
        return sum(row.epsilon for row in store.ledger())
    finally:
        store.close()


def _rogue_site_config(federation: LocalFederation, tmp_path: Path, with_cert: bool) -> Path:
    """A copy of Cleveland's config whose certificate comes from another CA (or is absent)."""
    config = yaml.safe_load((federation.site_dir("cleveland") / "site.yaml").read_text())
    folder = tmp_path / ("rogue" if with_cert else "nocert")
    folder.mkdir()
    if with_cert:
        pki.init_ca(folder / "pki", "rogue")
        issued = pki.issue_site(folder / "pki", "cleveland")
        config["tls"]["cert"], config["tls"]["key"] = str(issued.cert), str(issued.key)
    else:
        config["tls"] = None
        config["insecure"] = True
    config["dictionary"] = str(federation.site_dir("cleveland") / "dictionary.yaml")
    config["state_dir"] = str(folder / "state")
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("with_cert", [True, False], ids=["other-CA", "no-certificate"])
def test_a_site_without_an_alliance_certificate_is_refused(
    dp_federation: LocalFederation, tmp_path: Path, with_cert: bool
) -> None:
    config = _rogue_site_config(dp_federation, tmp_path, with_cert)
    log_path = tmp_path / "rogue.log"
    coordinator_log = dp_federation.coordinator_dir / "coordinator.log"
    offset = coordinator_log.stat().st_size
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "simulations.cli",
                "--log-level",
                "INFO",
                "site",
                "serve",
                "--config",
                str(config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
        try:
            site_log = wait_for_log(log_path, "reconnecting in")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    assert "cannot reach the coordinator at 127.0.0.1:" in site_log  # never connected
    assert "lost the link" not in site_log
    if with_cert:
        assert "during the TLS handshake" in site_log
        assert "not issued by the alliance CA, or is missing" in site_log
    else:
        assert "it probably requires mutual TLS" in site_log
    with AllianceClient(dp_federation.url, dp_federation.lead_token) as client:
        connected = client.health()["sites"]
    assert sorted(connected) == ["cleveland", "hungarian", "switzerland", "va"]
    reason = (
        "its certificate was not issued by the alliance CA"
        if with_cert
        else "it did not speak TLS (a site configured with insecure: true?)"
    )
    expected = f"refused a connection on the site link: TLS handshake failed because {reason}"
    wait_for_log(coordinator_log, expected)
    assert expected in coordinator_log.read_text(errors="replace")[offset:]


def test_a_coordinator_that_is_down_gives_one_clear_line(tmp_path: Path) -> None:
    with (
        pytest.raises(LinkError, match=r"not reachable \(connection refused\)"),
        AllianceClient("http://127.0.0.1:9", "token") as client,
    ):
        client.studies()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.cli",
            "study",
            "list",
            "--url",
            "http://127.0.0.1:9",
            "--token",
            "x",
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: the coordinator at http://127.0.0.1:9 is not reachable (connection refused); "
        "is `alliance coordinator serve` running?"
    ]


def test_an_iterative_dp_analysis_spends_exactly_its_epsilon(
    dp_federation: LocalFederation,
) -> None:
    before = _spent(dp_federation, "cleveland")
    with dp_federation.researcher() as client:
        result = client.run(
            "s1",
            {
                "analysis": "glm",
                "epsilon": 0.4,  # below the study's epsilon per request (1.0)
                "params": {
                    "formula": "disease ~ age + sex",
                    "family": "binomial",
                    "dp_iterations": 4,
                },
            },
        )
    ok = [s for s in result["sites"] if s["status"] == "ok"]
    assert ok, result["sites"]
    # The request's epsilon is split evenly over the fixed rounds, each charged before release.
    assert result["timings"]["rounds"] == 4
    for site in ok:
        assert site["epsilon"] == pytest.approx(0.4)
    assert _spent(dp_federation, "cleveland") == pytest.approx(before + 0.4)
    assert result["privacy"]["mode"] == "dp"
    assert result["privacy"]["epsilon_per_site"] == pytest.approx(0.4)
    for term in ("Intercept", "age", "sex[T.1]"):
        coef = result["coefficients"][term]
        assert coef["std_error"] > 0  # includes the noise


def test_a_site_that_crashes_mid_task_gets_the_task_again_when_it_returns(
    tmp_path: Path,
) -> None:
    from protocol.config import StudyConfig
    from simulations.federation import SiteSpec
    from simulations.heart import heart_dictionary, heart_source

    sites = [SiteSpec(n, heart_source(n), mode="off") for n in ("cleveland", "va")]
    federation = LocalFederation(sites, heart_dictionary(), tmp_path, task_timeout=60.0)
    try:
        federation.start(
            StudyConfig.model_validate({"id": "s1", "title": "crash", "privacy": {"mode": "off"}})
        )
        va = federation.site_procs["va"]
        va.send_signal(signal.SIGSTOP)  # the task will arrive while va is frozen ...
        with federation.researcher() as client:
            accepted = client.submit("s1", {"analysis": "count"}, wait=False)
            time.sleep(1.0)
            va.send_signal(signal.SIGKILL)  # ... and va dies before answering it
            va.wait(timeout=30)
            federation.site_procs.pop("va")
            federation.start_site(sites[1], "s1")  # restarted with its state folder intact
            deadline = time.monotonic() + 60
            while (body := client.request(accepted["request_id"]))["status"] == "running":
                assert time.monotonic() < deadline, "the request hung"
                time.sleep(0.2)
        statuses = {s["name"]: s["status"] for s in body["result"]["sites"]}
        assert statuses == {"cleveland": "ok", "va": "ok"}  # the same task id was sent again
        assert body["result"]["count"] == 303 + 200
        log = (federation.coordinator_dir / "coordinator.log").read_text()
        assert "site va reconnected" in log or "site va connected" in log
    finally:
        federation.stop()
