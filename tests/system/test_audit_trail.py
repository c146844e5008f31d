"""Tampering with a kept federation's audit trail, and `alliance audit verify | cross-check`.

One `alliance simulate --keep` run (a real coordinator and two real site processes on
loopback, mutual TLS) leaves the folders an auditor receives. Each test copies them and then
does what anyone holding the files could do (drop the append-only triggers first), and checks
that `verify` or `cross-check` exits non-zero and names the entry or the task.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from coordinator.store import Store
from protocol.audit import AuditEntry
from protocol.errors import AllianceError
from protocol.signing import Receipt, SigningKey
from protocol.wire import alliance_pb2 as pb
from simulations.cli import app
from simulations.heart import DICTIONARY_PATH
from site_node.ledger import SiteStore

pytestmark = pytest.mark.system
runner = CliRunner()
SITES = ("cleveland", "hungarian")


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory, heart_frames: dict[str, pd.DataFrame]) -> Path:
    """A federation's folders after three dp requests, the third refused for budget."""
    root = tmp_path_factory.mktemp("kept")
    args = ["simulate", "--dictionary", str(DICTIONARY_PATH)]
    for name in SITES:
        path = root / f"{name}.csv"
        heart_frames[name].to_csv(path, index=False)
        args += ["--site", f"{name}={path}"]
    count = root / "count.yaml"
    count.write_text(yaml.safe_dump({"analysis": "count"}))
    mean = root / "mean.yaml"
    mean.write_text(yaml.safe_dump({"analysis": "mean", "params": {"variable": "age"}}))
    for request in (count, mean, count):
        args += ["--request", str(request)]
    args += ["--epsilon", "0.4", "--budget", "1.0", "--keep", str(root / "federation")]
    args += ["--report", str(root / "federation" / "report")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # the third request is refused for budget
    return root / "federation"


@pytest.fixture
def folders(kept: Path, tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of the kept folders for one test to tamper with."""
    copy = tmp_path / "federation"
    shutil.copytree(kept, copy)
    yield copy


def site_db(folders: Path, name: str = "cleveland") -> sqlite3.Connection:
    """The site's file opened as an attacker would: triggers dropped."""
    db = sqlite3.connect(folders / "sites" / name / "state" / "site.db", isolation_level=None)
    for trigger in (
        "audit_no_update",
        "audit_no_delete",
        "ledger_no_delete",
        "ledger_no_update",
        "replies_no_update",
        "replies_no_delete",
    ):
        db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    return db


def cut_off_newest_reply(db: sqlite3.Connection) -> tuple[str, int]:
    """Cut a site's log from its newest reply entry on, with that reply's ledger row and stored
    reply (a shorter file, consistent in itself); close ``db``; return the reply's task and
    its audit entry's number."""
    try:
        last_reply = reply_seqs(db)[-1]
        task = task_of(db, last_reply)
        db.execute("DELETE FROM audit WHERE seq >= ?", (last_reply,))
        db.execute("DELETE FROM ledger WHERE task_id = ?", (task,))
        db.execute("DELETE FROM replies WHERE task_id = ?", (task,))
    finally:
        db.close()
    return task, last_reply


def delete_a_receipt(folders: Path, site: str = "hungarian") -> str:
    """Delete one of ``site``'s receipts from the coordinator's store, as anyone holding the
    file could (its guard dropped first); return the task it receipted."""
    db = sqlite3.connect(folders / "coordinator" / "coordinator.db", isolation_level=None)
    try:
        db.execute("DROP TRIGGER alliance_receipts_no_delete")
        task = str(
            db.execute(
                "SELECT task_id FROM alliance_receipts WHERE site = ? LIMIT 1", (site,)
            ).fetchone()[0]
        )
        db.execute("DELETE FROM alliance_receipts WHERE task_id = ?", (task,))
    finally:
        db.close()
    return task


def entries(db: sqlite3.Connection) -> list[AuditEntry]:
    rows = db.execute(
        "SELECT seq, time, actor, action, detail, prev_hash, hash FROM audit ORDER BY seq"
    ).fetchall()
    return [AuditEntry(*row) for row in rows]


def write_entries(db: sqlite3.Connection, chain: list[AuditEntry]) -> None:
    db.execute("DELETE FROM audit")
    db.executemany(
        "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(e.seq, e.time, e.actor, e.action, e.detail, e.prev_hash, e.hash) for e in chain],
    )


def rechain(chain: list[AuditEntry]) -> list[AuditEntry]:
    """Renumber and recompute every hash: a chain that verifies on its own."""
    out: list[AuditEntry] = []
    for entry in chain:
        prev = out[-1] if out else None
        fresh = AuditEntry.create(prev, entry.time, entry.actor, entry.action, {})
        digest = AuditEntry.compute_hash(
            fresh.seq, entry.time, entry.actor, entry.action, entry.detail, fresh.prev_hash
        )
        out.append(
            AuditEntry(
                fresh.seq,
                entry.time,
                entry.actor,
                entry.action,
                entry.detail,
                fresh.prev_hash,
                digest,
            )
        )
    return out


def verify(path: Path) -> Result:
    return runner.invoke(app, ["audit", "verify", str(path)])


def cross_check(folders: Path, name: str = "cleveland") -> Result:
    return runner.invoke(
        app, ["audit", "cross-check", str(folders / "coordinator"), str(folders / "sites" / name)]
    )


def reply_seqs(db: sqlite3.Connection) -> list[int]:
    return [e.seq for e in entries(db) if e.action == "reply"]


def task_of(db: sqlite3.Connection, seq: int) -> str:
    [entry] = [e for e in entries(db) if e.seq == seq]
    return str(json.loads(entry.detail)["task"])


# ----------------------------------------------------------------------------- untouched


def test_an_untouched_federation_verifies_and_cross_checks(kept: Path) -> None:
    coordinator = verify(kept / "coordinator")
    assert coordinator.exit_code == 0, coordinator.output
    assert "audit trail intact" in coordinator.stdout
    assert "4 receipts verified" in coordinator.stdout  # 2 replies x 2 sites; refusals none
    for name in SITES:
        site = verify(kept / "sites" / name)
        assert site.exit_code == 0, site.output
        assert "ledger, stored replies and signatures agree" in site.stdout
        checked = runner.invoke(
            app, ["audit", "cross-check", str(kept / "coordinator"), str(kept / "sites" / name)]
        )
        assert checked.exit_code == 0, checked.output
        assert "the coordinator holds 2 receipts from it" in checked.stdout


# ----------------------------------------------------------------------------- verify


def test_an_edited_entry_is_named(folders: Path) -> None:
    db = site_db(folders)
    seq = reply_seqs(db)[0]
    db.execute("UPDATE audit SET detail = replace(detail, '0.4', '0.1') WHERE seq = ?", (seq,))
    result = verify(folders / "sites" / "cleveland")
    assert result.exit_code == 1
    assert f"entry {seq} (reply) was altered after it was written" in result.stdout


@pytest.mark.parametrize(
    "detail", ['{"task": "x", "charge": "lots"}', "not json", '{"charge": {"units": null}}']
)
def test_garbage_in_an_entry_is_named_not_a_crash(folders: Path, detail: str) -> None:
    db = site_db(folders)
    seq = reply_seqs(db)[0]
    db.execute("UPDATE audit SET detail = ? WHERE seq = ?", (detail, seq))
    result = verify(folders / "sites" / "cleveland")
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"entry {seq} (reply) was altered after it was written" in result.stdout


def test_a_deleted_entry_is_named(folders: Path) -> None:
    db = site_db(folders)
    seq = reply_seqs(db)[0]
    db.execute("DELETE FROM audit WHERE seq = ?", (seq,))
    result = verify(folders / "sites" / "cleveland")
    assert result.exit_code == 1
    assert f"entry {seq} is missing (found seq {seq + 1} in its place)" in result.stdout


def test_an_inserted_entry_is_named(folders: Path) -> None:
    db = site_db(folders)
    chain = entries(db)
    seq = reply_seqs(db)[0]
    forged = AuditEntry.create(chain[seq - 2], chain[seq - 1].time, "cleveland", "note", {})
    shifted = [AuditEntry(e.seq + 1, *dataclass_tail(e)) for e in chain[seq - 1 :]]
    write_entries(db, [*chain[: seq - 1], forged, *shifted])
    result = verify(folders / "sites" / "cleveland")
    assert result.exit_code == 1
    assert f"entry {seq + 1} does not link to entry {seq}" in result.stdout


def dataclass_tail(entry: AuditEntry) -> tuple[str, str, str, str, str, str]:
    return (entry.time, entry.actor, entry.action, entry.detail, entry.prev_hash, entry.hash)


def test_reordered_entries_are_named(folders: Path) -> None:
    db = site_db(folders)
    chain = entries(db)
    first, second = reply_seqs(db)[:2]
    a, b = chain[first - 1], chain[second - 1]
    chain[first - 1] = AuditEntry(first, *dataclass_tail(b))
    chain[second - 1] = AuditEntry(second, *dataclass_tail(a))
    write_entries(db, chain)
    result = verify(folders / "sites" / "cleveland")
    assert result.exit_code == 1
    assert f"entry {first} does not link to entry {first - 1}" in result.stdout


def test_a_deleted_ledger_row_is_named_and_the_site_will_not_start(folders: Path) -> None:
    # Deleting a charge would give the spent budget back. The charge is also in the chain.
    db = site_db(folders)
    task = db.execute("SELECT task_id FROM ledger ORDER BY id DESC LIMIT 1").fetchone()[0]
    db.execute("DELETE FROM ledger WHERE task_id = ?", (task,))
    db.close()
    result = verify(folders / "sites" / "cleveland")
    assert result.exit_code == 1
    assert f"the charge for task {task}" in result.stdout
    assert "is missing from the ledger: a ledger row was deleted" in result.stdout
    config = folders / "sites" / "cleveland" / "site.yaml"
    started = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "site", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 2, started.stderr
    assert "will not answer tasks until the file is restored" in started.stderr
    assert f"the charge for task {task}" in started.stderr


def test_an_edited_stored_reply_is_named(folders: Path) -> None:
    db = site_db(folders)
    task = task_of(db, reply_seqs(db)[0])
    payload = db.execute("SELECT payload FROM replies WHERE task_id = ?", (task,)).fetchone()[0]
    message = pb.SiteMessage.FromString(payload)
    message.reply.record.arrays[0].values[0] += 7
    db.execute(
        "UPDATE replies SET payload = ? WHERE task_id = ?",
        (message.SerializeToString(deterministic=True), task),
    )
    result = verify(folders / "sites" / "cleveland")
    assert result.exit_code == 1
    assert f"task {task}): the stored reply's record was changed after it was signed" in (
        result.stdout
    )


def test_a_coordinator_receipt_deleted_is_named(folders: Path) -> None:
    task = delete_a_receipt(folders)
    result = verify(folders / "coordinator")
    assert result.exit_code == 1
    assert f"receipt for task {task} (listed in audit entry" in result.stdout


# ----------------------------------------------------------------------------- cross-check


def test_a_cut_off_tail_passes_verify_but_not_the_cross_check(folders: Path) -> None:
    # Cut the log, the ledger row and the stored reply: a shorter site file, consistent.
    task, last_reply = cut_off_newest_reply(site_db(folders))
    assert verify(folders / "sites" / "cleveland").exit_code == 0  # alone, it looks fine
    result = cross_check(folders)
    assert result.exit_code == 1
    assert (
        f"task {task}: the coordinator holds cleveland's signed receipt for audit entry "
        f"{last_reply}, but the site's log ends at entry {last_reply - 1}: its tail was cut off"
    ) in result.stdout


def test_an_emptied_site_file_is_caught(folders: Path) -> None:
    db = site_db(folders)
    for table in ("audit", "ledger", "replies"):
        db.execute(f"DELETE FROM {table}")
    db.close()
    assert verify(folders / "sites" / "cleveland").exit_code == 0
    result = cross_check(folders)
    assert result.exit_code == 1
    assert "the site's audit log is empty: it was emptied" in result.stdout
    assert result.stdout.count("FOUND") == 2  # both receipted tasks


def test_a_rechained_log_is_caught_by_verify_and_a_resigned_one_by_the_cross_check(
    folders: Path,
) -> None:
    db = site_db(folders)
    chain = entries(db)
    seq = reply_seqs(db)[0]
    task = task_of(db, seq)
    # Remove the first reply's entry entirely, then renumber and re-hash everything after it.
    chain = rechain([e for e in chain if e.seq != seq])
    db.execute("DELETE FROM ledger WHERE task_id = ?", (task,))
    db.execute("DELETE FROM replies WHERE task_id = ?", (task,))
    write_entries(db, chain)
    naive = verify(folders / "sites" / "cleveland")
    assert naive.exit_code == 1
    assert "the log was re-chained" in naive.stdout  # the stored receipts name the old heads
    # The careful attacker holds the site's key too, and re-signs every stored reply.
    key = SigningKey.load(folders / "sites" / "cleveland" / "state" / "signing_key.pem")
    for entry in chain:
        if entry.action != "reply":
            continue
        other = json.loads(entry.detail)["task"]
        (payload,) = db.execute(
            "SELECT payload FROM replies WHERE task_id = ?", (other,)
        ).fetchone()
        message = pb.SiteMessage.FromString(payload)
        reply = message.reply
        receipt = Receipt(
            "cleveland",
            other,
            reply.request_digest,
            reply.receipt,
            entry.seq,
            entry.hash,
            key.public_hex,
        ).signed(key)
        reply.audit_seq, reply.audit_hash, reply.signature = (
            entry.seq,
            entry.hash,
            receipt.signature,
        )
        db.execute(
            "UPDATE replies SET payload = ? WHERE task_id = ?",
            (message.SerializeToString(deterministic=True), other),
        )
    db.close()
    assert verify(folders / "sites" / "cleveland").exit_code == 0  # locally consistent again
    result = cross_check(folders)
    assert result.exit_code == 1
    assert f"task {task}:" in result.stdout
    assert "and re-chained, below a receipted head" in result.stdout


def test_a_task_one_side_lacks_is_listed(folders: Path) -> None:
    task = delete_a_receipt(folders, "hungarian")
    result = cross_check(folders, "hungarian")
    assert result.exit_code == 1
    assert f"task {task}: hungarian answered it" in result.stdout
    assert "but the coordinator holds no receipt for it" in result.stdout


# ----------------------------------------------------------------------------- reports


def test_the_simulate_report_equals_the_sites_own_ledgers(kept: Path) -> None:
    report = json.loads((kept / "report" / "report.json").read_text())
    assert {c["site"] for c in report["contributions"]} == set(SITES)
    for name in SITES:
        store = SiteStore(kept / "sites" / name / "state" / "site.db", "test", read_only=True)
        try:
            ledger = store.ledger()
        finally:
            store.close()
        [mine] = [c for c in report["contributions"] if c["site"] == name]
        assert mine["epsilon"] == pytest.approx(sum(row.epsilon for row in ledger), abs=1e-12)
        assert mine["epsilon"] == pytest.approx(0.8, abs=1e-12)  # two requests at 0.4
        assert report["privacy_spent"]["by_site"][name] == mine["epsilon"]
        by_researcher: dict[str, float] = {}
        for row in ledger:
            by_researcher[row.researcher] = by_researcher.get(row.researcher, 0) + row.epsilon
        for who, spent in by_researcher.items():
            assert report["privacy_spent"]["by_researcher"][who][name] == pytest.approx(spent)
        assert (mine["analyses"], mine["refused"], mine["receipts"]) == (2, 1, 2)
        assert mine["records_noisy"] is True
    assert [r["status"] for r in report["requests"]] == ["done", "done", "failed"]
    assert {(r["site"], r["code"]) for r in report["refusals"]} == {(s, "budget") for s in SITES}
    markdown = (kept / "report" / "report.md").read_text()
    assert "| cleveland | ~" in markdown and "## Refusals and failures" in markdown
    assert "<h2>Contributions</h2>" in (kept / "report" / "report.html").read_text()
    # The same report offline, from the kept folder, through the CLI.
    out = kept.parent / "offline-report"
    made = runner.invoke(
        app,
        [
            "study",
            "report",
            "simulation",
            "--coordinator",
            str(kept / "coordinator"),
            "--out",
            str(out),
        ],
    )
    assert made.exit_code == 0, made.output
    assert json.loads((out / "report.json").read_text()) == report


def test_site_replies_shows_exactly_what_left_the_site(kept: Path) -> None:
    config = kept / "sites" / "cleveland" / "site.yaml"
    shown = runner.invoke(app, ["site", "replies", "--config", str(config), "--json"])
    assert shown.exit_code == 0, shown.output
    replies = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [r["analysis"] for r in replies] == ["count", "mean"]
    store = SiteStore(kept / "sites" / "cleveland" / "state" / "site.db", "t", read_only=True)
    try:
        ledger = store.ledger()
        for reply in replies:  # decoded from the very bytes that were sent
            sent = pb.SiteMessage.FromString(store.stored_reply(reply["task"]) or b"").reply
            assert [a["values"] for a in reply["arrays"]] == [
                list(a.values) for a in sent.record.arrays
            ]
    finally:
        store.close()
    assert sum(r["epsilon"] for r in replies) == pytest.approx(sum(r.epsilon for r in ledger))
    # The noisy count the researcher saw for this site is the count that left it.
    coordinator = Store.open_read_only(kept / "coordinator" / "coordinator.db")
    try:
        [first] = [r for r in coordinator.study_requests("simulation") if r["analysis"] == "count"][
            :1
        ]
    finally:
        coordinator.close()
    [site_entry] = [s for s in first["result"]["sites"] if s["name"] == "cleveland"]
    assert site_entry["records"] == replies[0]["arrays"][0]["values"][0]
    text = runner.invoke(app, ["site", "replies", "--config", str(config)]).stdout
    assert "count for " in text and "(discrete_laplace, scale" in text


# ----------------------------------------------------------------------------- online


def test_the_online_cross_check_asks_each_site_and_catches_a_cut_off_tail(
    tmp_path: Path,
) -> None:
    from simulations.federation import SiteSpec
    from simulations.heart import heart_dictionary, heart_source
    from tests.system.conftest import running_federation, study

    specs = [SiteSpec(name, heart_source(name), mode="dp") for name in SITES]
    with running_federation(specs, heart_dictionary(), tmp_path / "run", study("dp")) as fed:
        with fed.researcher() as client:
            for _ in range(2):
                assert client.submit("s1", {"analysis": "count"})["status"] == "done"
        online = ["audit", "cross-check", "--study", "s1", "--url", fed.url]
        clean = runner.invoke(app, [*online, "--token", fed.lead_token])
        assert clean.exit_code == 0, clean.output
        assert "cleveland: 2 receipts" in clean.stdout and "hungarian: 2 receipts" in clean.stdout
        # Someone cuts the newest reply out of cleveland's file while it is stopped: log,
        # ledger and stored reply together, so the site starts again without complaint.
        fed.stop_site("cleveland")
        task, last_reply = cut_off_newest_reply(site_db(fed.root))
        fed.start_site(specs[0], "s1")
        fed.wait_for_sites(["cleveland"])
        caught = runner.invoke(app, [*online, "--token", fed.lead_token])
        researcher = runner.invoke(app, [*online, "--token", fed.researcher_token])
    assert caught.exit_code == 1, caught.output
    assert f"task {task}: the coordinator holds cleveland's signed receipt for audit entry" in (
        caught.stdout
    )
    # The restarted site wrote new entries from the cut on: the entry now at that number is
    # not the reply it signed.
    assert f"the site's entry {last_reply} is not that reply: the log was cut back" in (
        caught.stdout
    )
    assert "hungarian: 2 receipts" in caught.stdout
    assert caught.stdout.count("FOUND") == 1
    assert isinstance(researcher.exception, AllianceError)
    assert "cannot do this" in str(researcher.exception)  # the lead's check only
