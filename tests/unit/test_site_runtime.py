"""The site's trust boundary without the network: default deny, budget, replay, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protocol.budget import PureDP
from protocol.config import DataDictionary, SiteConfig
from protocol.errors import InternalError
from protocol.records import RecordSpec
from protocol.wire import alliance_pb2 as pb
from protocol.wire.messages import TaskMessage, record_from_proto
from site_node.harmonize import conform
from site_node.ledger import Charge, SiteStore
from site_node.runtime import SiteRuntime


def make_site(
    tmp_path: Path, frame: pd.DataFrame, dictionary: DataDictionary, policy: dict | None = None
) -> SiteRuntime:
    config = SiteConfig.model_validate(
        {
            "name": "testsite",
            "coordinator": "127.0.0.1:1",
            "dictionary": str(tmp_path / "dictionary.yaml"),
            "data": {"path": str(tmp_path / "data.csv")},
            "state_dir": str(tmp_path / "state"),
            "insecure": True,
            "policy": policy or {},
        }
    )
    data, report = conform(frame, dictionary)
    return SiteRuntime(config, dictionary, data, report)


def task(
    analysis: str = "mean",
    task_id: str = "t1",
    mode: str = "dp",
    epsilon: float = 0.5,
    study: str = "s1",
    filter: str = "",
    **params: object,
) -> pb.Task:
    return pb.Task(
        task_id=task_id,
        study_id=study,
        analysis=analysis,
        privacy_mode=mode,
        epsilon=epsilon,
        researcher="r.chen",
        filter=filter,
        params_json=json.dumps(params or {"variable": "age"}),
    )


POLICY = {
    "allowed_analyses": ["count", "mean", "histogram"],
    "studies": [{"id": "s1", "mode": "dp", "budget": 1.0, "epsilon_per_request": 1.0}],
}


@pytest.fixture
def frame(heart_frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return heart_frames["cleveland"]


def test_site_without_policy_runs_nothing(tmp_path, frame, heart_dict):
    site = make_site(tmp_path, frame, heart_dict)
    outcome = site.handle(task())
    assert outcome.status == "refused"
    assert outcome.message.refusal.code == "policy"
    assert "no study is approved at this site" in outcome.message.refusal.reason
    assert site.store.ledger() == []


def test_analysis_off_the_allow_list_is_refused(tmp_path, frame, heart_dict):
    policy = {"allowed_analyses": ["count"], "studies": [{"id": "s1"}]}
    site = make_site(tmp_path, frame, heart_dict, policy)
    outcome = site.handle(task("mean"))
    assert outcome.status == "refused"
    assert "'mean' is not on this site's allow-list; allowed: count" in outcome.reason


def test_unapproved_study_and_denied_variable_are_refused(tmp_path, frame, heart_dict):
    policy = dict(POLICY, denied_variables=["chol"])
    site = make_site(tmp_path, frame, heart_dict, policy)
    assert "study 'other' is not approved" in site.handle(task(study="other")).reason
    refused = site.handle(task(variable="chol", task_id="t2"))
    assert "chol are on this site's negative list" in refused.reason
    via_filter = site.handle(task(task_id="t3", filter="chol > 200"))
    assert "negative list" in via_filter.reason


def test_off_mode_needs_the_site_to_name_it(tmp_path, frame, heart_dict):
    site = make_site(tmp_path, frame, heart_dict, POLICY)
    outcome = site.handle(task(mode="off"))
    # The site's approval says dp, so the stricter mode (dp) applies and the ledger is charged.
    assert outcome.status == "reply"
    assert outcome.message.reply.privacy_mode == "dp"
    assert site.store.spent("s1").epsilon == pytest.approx(0.5)


def test_budget_refusal_says_requested_remaining_and_difference(tmp_path, frame, heart_dict):
    site = make_site(tmp_path, frame, heart_dict, POLICY)
    assert site.handle(task(task_id="a", epsilon=0.7)).status == "reply"
    refused = site.handle(task(task_id="b", epsilon=0.5))
    assert refused.message.refusal.code == "budget"
    assert "epsilon 0.3 left at this site; this request needs 0.5 (short by 0.2)" in refused.reason
    assert [row.task_id for row in site.store.ledger()] == ["a"]


def test_repeated_task_id_returns_stored_reply_and_charges_once(tmp_path, frame, heart_dict):
    site = make_site(tmp_path, frame, heart_dict, POLICY)
    first = site.handle(task(task_id="same"))
    again = site.handle(task(task_id="same"))
    assert again.status == "replayed" and again.message.reply.replayed
    assert again.message.reply.record == first.message.reply.record  # the same noisy numbers
    assert len(site.store.ledger()) == 1
    assert site.store.spent("s1").epsilon == pytest.approx(first.message.reply.epsilon_spent)


def test_dp_reply_is_noisy_and_states_its_noise(tmp_path, frame, heart_dict):
    site = make_site(tmp_path, frame, heart_dict, POLICY)
    reply = site.handle(task("count", epsilon=0.9)).message.reply
    record = record_from_proto(
        reply.record,
        RecordSpec(
            {
                "n": __import__("protocol.records", fromlist=["ArraySpec"]).ArraySpec(
                    (), kind="count", sensitivity=1.0, integer=True
                )
            }
        ),
    )
    release = record.releases["n"]
    assert release.mechanism == "discrete_laplace"
    assert release.scale == pytest.approx(1 / 0.9)
    assert reply.epsilon_spent == pytest.approx(0.9)
    assert reply.records_used == -1  # private: the exact count never travels


def test_sdc_refuses_small_histogram_cells(tmp_path, frame, heart_dict):
    policy = {"allowed_analyses": ["histogram", "count"], "studies": [{"id": "s1", "mode": "sdc"}]}
    site = make_site(tmp_path, frame, heart_dict, policy)
    # Cleveland has exactly one patient in his twenties (29), so the first bin holds 1.
    assert int(((frame.age >= 20) & (frame.age < 30)).sum()) in (1, 2)
    outcome = site.handle(task("histogram", mode="sdc", variable="age", edges=[20, 30, 80]))
    assert outcome.message.refusal.code == "disclosure"
    assert "'counts' would hold a count of fewer than 3 records" in outcome.reason
    assert "1" not in outcome.reason.split()  # never the small count itself
    ok = site.handle(
        task("histogram", task_id="t2", mode="sdc", variable="age", edges=[20, 50, 80])
    )
    assert ok.status == "reply" and ok.message.reply.epsilon_spent == 0


def test_bad_parameters_are_typed_refusals(tmp_path, frame, heart_dict):
    site = make_site(tmp_path, frame, heart_dict, POLICY)
    unknown = site.handle(task("median"))
    assert unknown.message.refusal.code == "validation"
    assert "unknown analysis 'median'; known:" in unknown.reason
    wrong = site.handle(task("mean", task_id="t2", variable="height"))
    assert "variable 'height' is not in the data dictionary" in wrong.reason
    categorical = site.handle(task("mean", task_id="t3", variable="cp"))
    assert "'cp' is categorical; this analysis needs a numeric variable" in categorical.reason
    bad_filter = site.handle(task("mean", task_id="t4", filter="__import__('os')"))
    assert "is not allowed here" in bad_filter.reason


def test_crash_inside_the_commit_leaves_no_half_written_entry(
    tmp_path, frame, heart_dict, monkeypatch
):
    site = make_site(tmp_path, frame, heart_dict, POLICY)
    entries_before = len(site.store.audit_entries())

    real = site.store._append_audit
    calls = []

    def fail_first(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")  # inside the reply's transaction
        return real(*args, **kwargs)

    monkeypatch.setattr(site.store, "_append_audit", fail_first)
    outcome = site.handle(task(task_id="crash"))
    assert outcome.status == "refused"
    assert site.store.ledger() == []  # the charge rolled back with the audit entry
    assert site.store.stored_reply("crash") is None
    assert len(site.store.audit_entries()) == entries_before + 1  # only the refusal
    assert site.store.verify_audit().ok


def test_audit_log_is_append_only(tmp_path, frame, heart_dict):
    import sqlite3

    site = make_site(tmp_path, frame, heart_dict, POLICY)
    site.handle(task())
    db = sqlite3.connect(site.store.path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE ledger SET epsilon = 0")
    db.close()
    assert site.store.verify_audit().ok


def test_mean_over_filter_is_exact_in_off_mode(tmp_path, frame, heart_dict):
    policy = {"allowed_analyses": ["mean"], "studies": [{"id": "s1", "mode": "off"}]}
    site = make_site(tmp_path, frame, heart_dict, policy)
    reply = site.handle(task(mode="off", filter="age >= 40 and sex == 1")).message.reply
    values = {a.name: a.values[0] for a in reply.record.arrays}
    chosen = frame.age[(frame.age >= 40) & (frame.sex == 1)].to_numpy()
    assert values["n"] == chosen.size
    assert values["sum"] == pytest.approx(np.sum(chosen - 60.0), rel=1e-12)


def test_a_charge_to_another_request_than_its_task_is_a_bug_and_writes_nothing(
    tmp_path: Path,
) -> None:
    store = SiteStore(tmp_path / "site.db", "testsite")
    wire = TaskMessage("t1", "r1", "s1", "count", "r.chen")
    budget = PureDP(3.0)
    for study, request in (("s2", "r1"), ("s1", "r2")):
        charge = Charge(study, request, PureDP(0.5), budget, None)
        with pytest.raises(InternalError, match=f"charge to study {study}, request {request}"):
            store.commit_reply(wire, charge, b"payload", "receipt", {"task": "t1"})
    assert store.ledger() == []
    assert store.stored_reply("t1") is None
    assert [e.action for e in store.audit_entries()] == []
    charge = Charge("s1", "r1", PureDP(0.5), budget, None)  # the task's own: charged once
    assert store.commit_reply(wire, charge, b"payload", "receipt", {"task": "t1"}) == b"payload"
    assert store.spent("s1") == PureDP(0.5)
    store.close()
