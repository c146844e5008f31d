"""Study decisions and notices, attacked: a site's gate (``site_node.studies``) and the
coordinator's study book (``coordinator.studies``) over real SQLite files and real Ed25519
keys."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from coordinator.store import Store
from coordinator.studies import StudyBook, StudyStateError
from protocol.audit import canonical_json
from protocol.config import DataDictionary, StudyApproval, StudyConfig
from protocol.errors import RefusedError
from protocol.signing import SigningKey, sign_message, study_digest
from protocol.wire import alliance_pb2 as pb
from site_node.ledger import SiteStore
from site_node.studies import StudyGate, approval_terms, signed_decision, study_json

STUDY = {"id": "s1", "title": "T", "sites": ["a", "b"], "quorum": 2, "analyses": ["mean"]}


def notice(study: StudyConfig, state: str, key: SigningKey) -> pb.StudyNotice:
    message = pb.StudyNotice(
        study_id=study.id, version=study.version, state=state, study_json=study_json(study)
    )
    sign_message(message, key)
    return message


@pytest.fixture
def gate(tmp_path: Path) -> StudyGate:
    return StudyGate(SiteStore(tmp_path / "site.db", "a"), "a", SigningKey.generate())


def approve(gate: StudyGate, study: StudyConfig, dictionary: DataDictionary) -> None:
    terms = approval_terms(study, dictionary)
    digest = study_digest(study_json(study))
    decision = signed_decision(
        "a", gate.key, study.id, study.version, digest, True, "it", "", terms
    )
    gate.store.record_decision(decision, "command line")


def test_a_site_runs_only_the_version_it_approved(gate: StudyGate, heart_dict) -> None:
    v1 = StudyConfig.model_validate(STUDY)
    with pytest.raises(RefusedError, match="no study is approved at this site"):
        gate.approval("s1", 1)
    approve(gate, v1, heart_dict)
    assert gate.approval("s1", 1).analyses == ["mean"]
    # A coordinator asking under a version the site never approved is refused, by version.
    with pytest.raises(RefusedError, match="at version 2, and this site approved version 1"):
        gate.approval("s1", 2)


def test_a_refusal_overrides_an_approval_from_site_yaml(gate: StudyGate) -> None:
    assert gate.adopt_site_yaml([StudyApproval(id="s1")]) == ["s1"]
    assert gate.adopt_site_yaml([StudyApproval(id="s1")]) == []  # a restart records nothing
    assert gate.approval("s1", 1).id == "s1"
    refusal = signed_decision("a", gate.key, "s1", 1, "", False, "it", "consent withdrawn")
    gate.store.record_decision(refusal, "command line")
    with pytest.raises(RefusedError, match="refused at this site \\(a\\) by its admin"):
        gate.approval("s1", 1)
    assert gate.adopt_site_yaml([StudyApproval(id="s1")]) == []  # still refused after restart
    with pytest.raises(RefusedError, match="consent withdrawn"):
        gate.approval("s1", 1)
    # An edited site.yaml entry is a new decision, and the latest one holds.
    assert gate.adopt_site_yaml([StudyApproval(id="s1", budget=1.0)]) == ["s1"]
    assert gate.approval("s1", 1).budget.epsilon == 1.0


def test_an_approval_taken_out_of_site_yaml_ends(gate: StudyGate) -> None:
    gate.adopt_site_yaml([StudyApproval(id="s1"), StudyApproval(id="s2")])
    assert gate.adopt_site_yaml([StudyApproval(id="s2")]) == ["s1"]  # restarted without s1
    with pytest.raises(RefusedError, match=r"removed from site\.yaml"):
        gate.approval("s1", 1)
    assert gate.approval("s2", 1).id == "s2"
    assert gate.adopt_site_yaml([StudyApproval(id="s2")]) == []  # nothing more to record
    # A study approved from the command line is not the file's to end.
    gate.store.record_decision(
        signed_decision("a", gate.key, "s3", 1, "", True, "it", "", StudyApproval(id="s3")), "cli"
    )
    assert gate.adopt_site_yaml([StudyApproval(id="s2")]) == []
    assert gate.approval("s3", 1).id == "s3"


def test_suspension_and_closing_stop_tasks_at_the_site(gate: StudyGate, heart_dict) -> None:
    coordinator = SigningKey.generate()
    study = StudyConfig.model_validate(STUDY)
    approve(gate, study, heart_dict)
    assert gate.receive_notice(notice(study, "suspended", coordinator)) is None
    with pytest.raises(RefusedError, match="suspended by the alliance lead"):
        gate.approval("s1", 1)
    gate.receive_notice(notice(study, "active", coordinator))
    assert gate.approval("s1", 1).id == "s1"
    gate.receive_notice(notice(study, "closed", coordinator))
    # A hostile or confused coordinator cannot reopen a closed study at the site.
    gate.receive_notice(notice(study, "active", coordinator))
    with pytest.raises(RefusedError, match="closed by the alliance lead"):
        gate.approval("s1", 1)


def test_dates_are_enforced_at_the_site(gate: StudyGate, heart_dict) -> None:
    tomorrow = dt.date.today() + dt.timedelta(days=1)
    study = StudyConfig.model_validate({**STUDY, "starts": str(tomorrow)})
    approve(gate, study, heart_dict)
    with pytest.raises(RefusedError, match=f"starts on {tomorrow}"):
        gate.approval("s1", 1)
    assert gate.approval("s1", 1, today=tomorrow).expires is None


def test_a_forged_or_malformed_notice_is_not_kept(tmp_path: Path, heart_dict, heart_frames) -> None:
    from tests.unit.test_site_runtime import make_site

    site = make_site(tmp_path, heart_frames["cleveland"], heart_dict)
    coordinator, attacker = SigningKey.generate(), SigningKey.generate()
    site.coordinator_key = coordinator.public_hex
    study = StudyConfig.model_validate(STUDY)
    site.receive_notice(notice(study, "suspended", attacker))
    assert site.store.notices() == []
    odd = notice(study, "paused", coordinator)
    site.receive_notice(odd)
    assert site.store.notices() == []
    site.receive_notice(notice(study, "active", coordinator))
    assert [n["state"] for n in site.store.notices()] == ["active"]


# --------------------------------------------------------------------------- coordinator


@pytest.fixture
def book(tmp_path: Path, heart_dict) -> StudyBook:
    return StudyBook(Store(f"sqlite:///{tmp_path / 'c.db'}"), heart_dict)


def decision(site: str, key: SigningKey, study: StudyConfig, approve: bool = True):
    digest = study_digest(canonical_json(study.model_dump(mode="json")))
    return signed_decision(site, key, study.id, study.version, digest, approve, "it")


def test_a_study_becomes_active_at_quorum_and_forgeries_do_not_count(book: StudyBook) -> None:
    keys = {"a": SigningKey.generate(), "b": SigningKey.generate(), "x": SigningKey.generate()}
    study, status = book.create(StudyConfig.model_validate(STUDY), "lead")
    assert status == "proposed"
    # The attacks: a decision signed by another key (a hostile coordinator or a researcher
    # writing one), one naming another site, one from a site the study does not invite, and
    # one approving a text of the study that was never sent.
    forged = decision("a", keys["x"], study)
    assert "does not verify" in book.receive_decision("a", forged, keys["a"].public_hex)[0]
    other = decision("b", keys["a"], study)
    assert "names site 'b'" in book.receive_decision("a", other, keys["a"].public_hex)[0]
    uninvited = decision("x", keys["x"], study)
    assert "not invited" in book.receive_decision("x", uninvited, keys["x"].public_hex)[0]
    altered = study.model_copy(update={"analyses": ["mean", "count"]})
    wrong_text = decision("a", keys["a"], altered)
    assert "never sent" in book.receive_decision("a", wrong_text, keys["a"].public_hex)[0]
    assert book.get("s1")[1] == "proposed" and book.approved_sites(study) == []
    assert book.receive_decision("a", decision("a", keys["a"], study), keys["a"].public_hex) == (
        None,
        None,
    )
    problem, changed = book.receive_decision(
        "b", decision("b", keys["b"], study), keys["b"].public_hex
    )
    assert problem is None and changed is not None and changed[1] == "active"
    assert book.get("s1")[1] == "active"


def test_amendments_are_versions_and_each_site_runs_its_latest_approved(
    book: StudyBook,
) -> None:
    keys = {"a": SigningKey.generate(), "b": SigningKey.generate()}
    v1, _ = book.create(StudyConfig.model_validate(STUDY), "lead")
    for site in ("a", "b"):
        book.receive_decision(site, decision(site, keys[site], v1), keys[site].public_hex)
    v2, status = book.amend(
        StudyConfig.model_validate({**STUDY, "analyses": ["mean", "count"]}), "lead"
    )
    assert (v2.version, status) == (2, "active")
    book.receive_decision("a", decision("a", keys["a"], v2), keys["a"].public_hex)
    assert book.site_versions(v2) == {"a": 2, "b": 1}
    assert [v["version"] for v in book.store.study_versions("s1")] == [1, 2]
    book.close("s1", "lead")
    with pytest.raises(StudyStateError, match="cannot amend study 's1': it is closed"):
        book.amend(v2, "lead")


def test_a_study_past_its_end_date_is_closed(book: StudyBook) -> None:
    yesterday = dt.date.today() - dt.timedelta(days=1)
    book.create(
        StudyConfig.model_validate({**STUDY, "quorum": 0, "expires": str(yesterday)}), "lead"
    )
    assert book.get("s1")[1] == "closed"
    assert [e.action for e in book.store.audit_entries()][-1] == "study_closed"


def test_quorum_and_dates_are_checked_when_the_study_is_written() -> None:
    with pytest.raises(ValueError, match="quorum 3 is more than the 2 invited sites"):
        StudyConfig.model_validate({**STUDY, "quorum": 3})
    with pytest.raises(ValueError, match="is before starts"):
        StudyConfig.model_validate({**STUDY, "starts": "2027-01-02", "expires": "2027-01-01"})


def test_a_site_yaml_approval_ends_with_the_study(gate: StudyGate) -> None:
    """site.yaml names no dates; the study's end date, as the lead's notice gave it, holds."""
    gate.adopt_site_yaml([StudyApproval(id="s1")])
    yesterday = dt.date.today() - dt.timedelta(days=1)
    study = StudyConfig.model_validate({**STUDY, "expires": str(yesterday)})
    gate.receive_notice(notice(study, "active", SigningKey.generate()))
    with pytest.raises(RefusedError, match=f"ended on {yesterday}"):
        gate.approval("s1", 1)
    assert gate.approval("s1", 1, today=yesterday).id == "s1"


# --------------------------------------------------------------------------- the site's CLI


def test_the_site_admin_commands_say_what_is_wrong_and_decide(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app
    from site_node.runtime import SIGNING_KEY_FILE
    from tests.unit.test_site_cli import write_site

    runner = CliRunner()
    config = write_site(tmp_path)
    args = ["--config", str(config)]
    early = runner.invoke(app, ["site", "review", "s1", *args])
    assert early.exit_code == 1 and "no study has reached site va yet" in early.output
    # The coordinator's notice arrives (as the link keeps it); then review, approve, refuse.
    store = SiteStore(tmp_path / "state" / "site.db", "va")
    key = SigningKey.load_or_create(tmp_path / "state" / SIGNING_KEY_FILE)
    gate = StudyGate(store, "va", key)
    study = StudyConfig.model_validate({**STUDY, "sites": ["va"], "quorum": 1})
    gate.receive_notice(notice(study, "proposed", SigningKey.generate()))
    missing = runner.invoke(app, ["site", "approve", "other", *args])
    assert missing.exit_code == 1 and "study 'other' has not reached this site" in missing.output
    greedy = runner.invoke(app, ["site", "approve", "s1", "--budget", "9", *args])
    assert greedy.exit_code == 1
    assert "--budget 9: must be above 0 and at most the study's 3" in greedy.output
    blank = runner.invoke(app, ["site", "refuse", "s1", "--reason", " ", *args])
    assert blank.exit_code == 1 and "--reason must say why" in blank.output
    review = runner.invoke(app, ["site", "review", "s1", *args])
    assert review.exit_code == 0, review.output
    assert "here:         no decision yet" in review.output
    approved = runner.invoke(app, ["site", "approve", "s1", "--budget", "1", *args])
    assert approved.exit_code == 0, approved.output
    assert gate.approval("s1", 1).budget.epsilon == 1.0  # in force, with the lower budget
    decision = store.latest_decision("s1")
    assert decision is not None and decision.signature
    from protocol.signing import message_signature_valid

    assert message_signature_valid(decision, key.public_hex)  # signed with the site's own key
    check = runner.invoke(app, ["site", "check", *args])
    assert "study s1: approved version 1 on" in check.output
    assert "the lead says: proposed, version 1" in check.output
    store.close()
