"""The hash-chained audit log: an intact chain verifies; any edit, deletion or reordering is
detected and the report names the entry where the chain breaks."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Any

import pytest

from protocol.audit import GENESIS_HASH, AuditEntry, canonical_json, verify_chain

ACTIONS = ["study.approve", "task.receive", "release", "task.receive", "release", "study.close"]


@pytest.fixture
def chain() -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    prev = None
    for i, action in enumerate(ACTIONS, start=1):
        detail = {"study": "cardio-2026", "epsilon": 0.1 * i, "task": f"t{i}"}
        prev = AuditEntry.create(prev, f"2026-03-0{i}T10:00:00Z", "cleveland", action, detail)
        entries.append(prev)
    return entries


def test_intact_chain_verifies(chain: list[AuditEntry]) -> None:
    report = verify_chain(chain)
    assert report.ok and report.problem is None
    assert report.entries == len(ACTIONS)
    assert report.head == chain[-1].hash
    assert str(report) == f"audit log intact: 6 entries, head {chain[-1].hash[:16]}"


def test_entries_link_and_hash_as_documented(chain: list[AuditEntry]) -> None:
    assert [e.seq for e in chain] == [1, 2, 3, 4, 5, 6]
    assert chain[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(chain))
    first = chain[0]
    # SHA-256 over canonical JSON of [seq, time, actor, action, detail, prev].
    body = (
        f'[1,"{first.time}","cleveland","study.approve",'
        f"{canonical_json(first.detail)},"
        f'"{GENESIS_HASH}"]'
    )
    assert first.hash == hashlib.sha256(body.encode()).hexdigest()
    assert first.detail == '{"epsilon":0.1,"study":"cardio-2026","task":"t1"}'


def test_empty_chain_verifies_to_genesis() -> None:
    report = verify_chain([])
    assert report.ok and report.entries == 0 and report.head == GENESIS_HASH


@pytest.mark.parametrize("field", ["detail", "time", "actor", "action"])
def test_editing_an_entry_is_detected(chain: list[AuditEntry], field: str) -> None:
    value: dict[str, Any] = {
        "detail": '{"epsilon":0.0}',
        "time": "2026-01-01",
        "actor": "x",
        "action": "noop",
    }
    chain[2] = dataclasses.replace(chain[2], **{field: value[field]})
    report = verify_chain(chain)
    assert not report.ok
    action = value["action"] if field == "action" else "release"
    assert report.problem == f"entry 3 ({action}) was altered after it was written"
    assert report.entries == 2 and report.head == chain[1].hash
    assert str(report) == f"audit log BROKEN: {report.problem}"


def test_editing_and_rehashing_an_entry_breaks_the_next_link(chain: list[AuditEntry]) -> None:
    # A careful forger recomputes the edited entry's own hash; the next entry still points to
    # the original.
    old = chain[2]
    detail = canonical_json({"study": "cardio-2026", "epsilon": 0.0, "task": "t3"})
    forged = AuditEntry.compute_hash(
        old.seq, old.time, old.actor, old.action, detail, old.prev_hash
    )
    chain[2] = dataclasses.replace(old, detail=detail, hash=forged)
    report = verify_chain(chain)
    assert not report.ok
    assert report.problem == "entry 4 does not link to entry 3"


def test_deleting_an_entry_is_detected(chain: list[AuditEntry]) -> None:
    del chain[2]
    report = verify_chain(chain)
    assert not report.ok
    assert report.problem == "entry 3 is missing (found seq 4 in its place)"


def test_deleting_and_renumbering_is_detected(chain: list[AuditEntry]) -> None:
    del chain[2]
    chain[2:] = [dataclasses.replace(e, seq=e.seq - 1) for e in chain[2:]]
    report = verify_chain(chain)
    assert not report.ok
    assert report.problem == "entry 3 does not link to entry 2"


def test_deleting_the_first_entry_is_detected(chain: list[AuditEntry]) -> None:
    report = verify_chain(chain[1:])
    assert not report.ok and report.problem == "entry 1 is missing (found seq 2 in its place)"


def test_reordering_entries_is_detected(chain: list[AuditEntry]) -> None:
    chain[3], chain[4] = chain[4], chain[3]
    report = verify_chain(chain)
    assert not report.ok
    assert report.problem == "entry 4 is missing (found seq 5 in its place)"
    assert report.entries == 3


def test_reordering_with_swapped_numbers_is_detected(chain: list[AuditEntry]) -> None:
    fourth, fifth = chain[3], chain[4]
    chain[3], chain[4] = dataclasses.replace(fifth, seq=4), dataclasses.replace(fourth, seq=5)
    report = verify_chain(chain)
    assert not report.ok
    assert report.problem == "entry 4 does not link to entry 3"


def test_truncation_is_visible_only_through_the_head(chain: list[AuditEntry]) -> None:
    # Dropping the newest entries leaves a valid shorter chain: verifying it alone cannot tell.
    # Whoever kept the head (a signed receipt, the other side's log) sees it changed.
    report = verify_chain(chain[:-2])
    assert report.ok and report.entries == 4
    assert report.head != verify_chain(chain).head


def test_detail_must_be_json_without_nan() -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        AuditEntry.create(None, "t", "a", "b", {"epsilon": float("nan")})
