"""Real processes, real gRPC with mutual TLS, real SQLite: the whole path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from simulations.federation import LocalFederation

pytestmark = pytest.mark.system


def test_off_mode_count_mean_histogram_equal_pooled_numpy(
    off_federation: LocalFederation, heart_pooled: pd.DataFrame
) -> None:
    with off_federation.researcher() as client:
        count = client.run("s1", {"analysis": "count"})
        mean = client.run("s1", {"analysis": "mean", "params": {"variable": "chol"}})
        hist = client.run(
            "s1",
            {
                "analysis": "histogram",
                "params": {"variable": "age", "edges": [20, 40, 60, 80], "group": "disease"},
            },
        )
    assert count["count"] == len(heart_pooled) == 920
    chol = heart_pooled.chol.dropna()
    # numpy on the pooled rows: chol.mean(), chol.var(ddof=1)
    assert mean["n"] == chol.size
    assert mean["mean"] == pytest.approx(chol.mean(), rel=1e-12)
    assert mean["variance"] == pytest.approx(chol.var(ddof=1), rel=1e-10)
    for level in ("0", "1"):
        ages = heart_pooled.age[heart_pooled.disease == int(level)]
        expected, _ = np.histogram(ages, bins=[20, 40, 60, 80])
        assert hist["counts"][level] == expected.tolist()
    assert {s["name"]: s["status"] for s in mean["sites"]} == {
        "cleveland": "ok",
        "hungarian": "ok",
        "switzerland": "ok",
        "va": "ok",
    }
    # Switzerland's chol is 0 (missing) in every row: it contributes no record, and says so.
    assert {s["name"]: s["records"] for s in mean["sites"]}["switzerland"] == 0
    assert mean["privacy"]["mode"] == "off"
    assert mean["timings"]["rounds"] == 1


def test_filter_is_applied_at_every_site(
    off_federation: LocalFederation, heart_pooled: pd.DataFrame
) -> None:
    with off_federation.researcher() as client:
        mean = client.run(
            "s1",
            {
                "analysis": "mean",
                "filter": "age >= 40 and sex == 1",
                "params": {"variable": "thalach"},
            },
        )
    chosen = heart_pooled[(heart_pooled.age >= 40) & (heart_pooled.sex == 1)].thalach.dropna()
    assert mean["n"] == chosen.size
    assert mean["mean"] == pytest.approx(chosen.mean(), rel=1e-12)


def test_site_stores_reply_ledger_and_audit(off_federation: LocalFederation) -> None:
    from site_node.ledger import SiteStore

    store = SiteStore(off_federation.site_dir("cleveland") / "state" / "site.db", "cleveland")
    try:
        actions = [entry.action for entry in store.audit_entries()]
        assert actions[0] == "site_started"
        assert "reply" in actions
        assert store.verify_audit().ok
    finally:
        store.close()


def test_invalid_request_is_refused_before_any_task_leaves(
    off_federation: LocalFederation,
) -> None:
    from coordinator.client import APIRequestError

    with off_federation.researcher() as client:
        with pytest.raises(APIRequestError, match="variable 'height' is not in the data"):
            client.run("s1", {"analysis": "mean", "params": {"variable": "height"}})
        with pytest.raises(APIRequestError, match="unknown analysis 'median'"):
            client.run("s1", {"analysis": "median"})
        with pytest.raises(APIRequestError, match="filter"):
            client.run("s1", {"analysis": "count", "filter": "age > (lambda: 1)()"})


def test_exact_site_sizes_are_not_published(off_federation: LocalFederation) -> None:
    # Before the fix, Hello.records (each site's exact number of rows) reached the coordinator's
    # store, its log and GET /api/sites, which researchers can read.
    from coordinator.client import AllianceClient
    from simulations.heart import heart_sites

    sizes = {name: len(frame) for name, frame in heart_sites().items()}
    with AllianceClient(off_federation.url, off_federation.lead_token) as lead:
        listed = lead.sites()
    assert {s["name"] for s in listed} == set(sizes)
    assert all("records" not in s for s in listed)
    log = (off_federation.coordinator_dir / "coordinator.log").read_text()
    assert "records" not in log
    for name, size in sizes.items():
        lines = [line for line in log.splitlines() if f"site {name} connected" in line]
        assert lines and all(str(size) not in line for line in lines)
