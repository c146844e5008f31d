"""Signed tasks and signed receipts on the site link, attacked from both ends.

A hostile or buggy coordinator sends tasks it did not sign; a hostile site (or anyone between
the site's process and the coordinator's store) sends replies whose receipt does not match.
Each side must refuse what it cannot attribute. The site runtime and the coordinator's registry
are real; the stream between them is replaced by handing the messages across.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pandas as pd
import pytest

from coordinator.link import SiteRegistry, SiteSession
from protocol.config import DataDictionary
from protocol.signing import (
    Receipt,
    SigningKey,
    reply_digest,
    sign_task,
    task_digest,
    task_signature_valid,
)
from protocol.wire import alliance_pb2 as pb
from site_node.runtime import SiteRuntime
from tests.unit.test_site_runtime import make_site, task

POLICY = {
    "allowed_analyses": ["count", "mean"],
    "studies": [{"id": "s1", "mode": "dp", "budget": 3.0, "epsilon_per_request": 1.0}],
}


@pytest.fixture
def site(
    tmp_path: Path, heart_frames: dict[str, pd.DataFrame], heart_dict: DataDictionary
) -> SiteRuntime:
    return make_site(tmp_path, heart_frames["cleveland"], heart_dict, POLICY)


def test_a_signed_task_verifies_and_any_change_breaks_it() -> None:
    key = SigningKey.generate()
    sent = task("count", "t1", epsilon=0.5)
    sign_task(sent, key)
    assert task_signature_valid(sent, key.public_hex)
    for change in ("epsilon", "study_id", "params_json"):
        altered = pb.Task()
        altered.CopyFrom(sent)
        if change == "epsilon":
            altered.epsilon = 5.0
        else:
            setattr(altered, change, getattr(sent, change) + "x")
        assert not task_signature_valid(altered, key.public_hex), change
    assert not task_signature_valid(sent, SigningKey.generate().public_hex)


def test_the_site_refuses_tasks_its_coordinator_did_not_sign(site: SiteRuntime) -> None:
    coordinator = SigningKey.generate()
    site.coordinator_key = coordinator.public_hex
    unsigned = site.handle(task("count", "u1", epsilon=0.5))
    assert unsigned.message.refusal.code == "signature"
    assert "task u1 carries no signature" in unsigned.reason
    forged = task("count", "f1", epsilon=0.5)
    sign_task(forged, SigningKey.generate())  # someone else's key
    outcome = site.handle(forged)
    assert outcome.message.refusal.code == "signature"
    assert "does not verify under the coordinator's key" in outcome.reason
    assert site.store.ledger() == []  # nothing ran, nothing was charged
    signed = task("count", "s1", epsilon=0.5)
    sign_task(signed, coordinator)
    assert site.handle(signed).status == "reply"
    # The task as asked (with the coordinator's signature) is kept beside the reply.
    assert site.store.reply_problems() == []


def test_a_reply_carries_a_receipt_signed_over_its_audit_head(site: SiteRuntime) -> None:
    sent = task("count", "t1", epsilon=0.5)
    reply = site.handle(sent).message.reply
    head = site.store.audit_entries()[-1]
    assert head.action == "reply"
    receipt = Receipt.from_reply("testsite", site.signing_key.public_hex, reply)
    assert receipt.valid()
    assert (receipt.audit_seq, receipt.audit_hash) == (head.seq, head.hash)
    assert receipt.request_digest == task_digest(sent)
    assert receipt.reply_digest == reply_digest("t1", reply.record)
    # A replayed task id gets the stored reply: the same receipt, charged nothing again.
    again = site.handle(sent)
    assert again.status == "replayed"
    assert again.message.reply.signature == reply.signature
    assert len(site.store.ledger()) == 1


async def _deliver(
    registry: SiteRegistry, site_key: str, sent: pb.Task, answer: pb.SiteMessage
) -> pb.SiteMessage:
    """Send ``sent`` to site ``testsite`` through the registry and deliver ``answer``."""
    session = SiteSession("testsite", pb.Hello(site_id="testsite", signing_key=site_key))
    await registry.attach(session)
    running = asyncio.create_task(registry.run_task("testsite", sent, timeout=5))
    await asyncio.sleep(0)
    registry.deliver("testsite", sent.task_id, answer, site_key)
    return await running


def _answer(
    site: SiteRuntime, registry: SiteRegistry, task_id: str
) -> tuple[pb.Task, pb.SiteMessage]:
    sent = task("count", task_id, epsilon=0.5)
    sign_task(sent, registry.signing_key)  # as run_task will sign it
    site.coordinator_key = registry.signing_key.public_hex
    return sent, site.handle(sent).message


def test_the_coordinator_keeps_a_valid_receipt(site: SiteRuntime) -> None:
    registry = SiteRegistry(None, "0" * 64)
    sent, answer = _answer(site, registry, "t1")
    got = asyncio.run(_deliver(registry, site.signing_key.public_hex, sent, answer))
    assert got.HasField("reply")
    [receipt] = registry.take_receipts(sent.request_id)
    assert receipt.valid() and receipt.site == "testsite" and receipt.task_id == "t1"
    assert registry.take_receipts(sent.request_id) == []  # handed over once


@pytest.mark.parametrize("attack", ["values", "signature", "head", "other_key", "other_task"])
def test_the_coordinator_discards_a_reply_whose_receipt_does_not_hold(
    site: SiteRuntime, attack: str
) -> None:
    registry = SiteRegistry(None, "0" * 64)
    sent, answer = _answer(site, registry, "t1")
    site_key = site.signing_key.public_hex
    reply = answer.reply
    if attack == "values":  # the released count changed after the site signed it
        reply.record.arrays[0].values[0] += 1
    elif attack == "signature":
        reply.signature = "0" * 128
    elif attack == "head":  # claim a shorter log than the one the site signed
        reply.audit_seq -= 1
    elif attack == "other_key":  # a reply signed by someone who is not this site
        site_key = SigningKey.generate().public_hex
    else:  # a reply (validly signed) to a different task, passed off as this one
        _, other = _answer(site, registry, "t2")
        other.reply.task_id = "t1"
        answer = other
    got = asyncio.run(_deliver(registry, site_key, sent, answer))
    assert got.HasField("refusal") and got.refusal.code == "signature"
    assert "the reply of testsite to task t1 was discarded" in got.refusal.reason
    assert registry.take_receipts(sent.request_id) == []
