"""Benchmark: checking a site's audit trail as it grows.

    python -m simulations.bench_audit [--replies 1000 10000 50000]

A real site store (SQLite, WAL, synchronous=FULL) is filled through the same commit the site
node uses for every reply (charge, audit entry, signed receipt, stored reply), with each
task signed by a coordinator key. Then, per size: the check a site runs before it serves
(hash chain and ledger against it), ``alliance audit verify`` on the file (also every stored
reply and both signatures on each), and the offline cross-check against the receipts.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from protocol.audit import AuditEntry
from protocol.budget import PureDP
from protocol.crosscheck import announced_keys, cross_check
from protocol.signing import Receipt, SigningKey, reply_digest, sign_task, task_digest
from protocol.wire import alliance_pb2 as pb
from protocol.wire.messages import TaskMessage
from site_node.ledger import Charge, SiteStore


def _signer(
    message: pb.SiteMessage,
    task_id: str,
    asked: str,
    digest: str,
    site_key: SigningKey,
    receipts: list[Receipt],
) -> Callable[[AuditEntry], bytes]:
    """The site runtime's last step: sign the receipt over the reply's own audit entry."""

    def signed(entry: AuditEntry) -> bytes:
        receipt = Receipt(
            "site", task_id, asked, digest, entry.seq, entry.hash, site_key.public_hex
        ).signed(site_key)
        receipts.append(receipt)
        message.reply.audit_seq, message.reply.audit_hash = entry.seq, entry.hash
        message.reply.signature = receipt.signature
        return message.SerializeToString(deterministic=True)

    return signed


def fill(store: SiteStore, replies: int, site_key: SigningKey) -> list[Receipt]:
    """``replies`` signed replies committed as the site commits them; their receipts."""
    coordinator = SigningKey.generate()
    receipts = []
    for i in range(replies):
        wire = pb.Task(
            task_id=f"r{i}.0.site", request_id=f"r{i}", study_id="s1", analysis="count",
            researcher="r.chen", privacy_mode="dp", epsilon=1e-6,
        )  # fmt: skip
        sign_task(wire, coordinator)
        task = TaskMessage.from_proto(wire)
        record = pb.AggregateRecord(
            arrays=[pb.NamedArray(name="n", values=[float(i)], kind="count")]
        )
        message = pb.SiteMessage(reply=pb.Reply(task_id=task.task_id, record=record))
        digest = reply_digest(task.task_id, record)
        asked = task_digest(wire)
        message.reply.receipt, message.reply.request_digest = digest, asked
        charge = Charge("s1", task.request_id, PureDP(1e-6), PureDP(1.0), None)
        detail = {"task": task.task_id, "study": "s1", "receipt": digest,
                  "request_digest": asked, "key": site_key.public_hex}  # fmt: skip

        signed = _signer(message, task.task_id, asked, digest, site_key, receipts)
        store.commit_reply(
            task, charge, signed, digest, detail,
            asked=(wire.SerializeToString(deterministic=True), coordinator.public_hex),
        )  # fmt: skip
    return receipts


def timed(what: str, call: Callable[[], list[str]]) -> float:
    """Seconds ``call`` took; it must find nothing."""
    started = time.perf_counter()
    found = call()
    seconds = time.perf_counter() - started
    assert not found, f"{what}: {found[:3]}"
    return seconds


def _cross(store: SiteStore, receipts: list[Receipt]) -> list[str]:
    entries = store.audit_entries()
    return cross_check("site", entries, receipts, announced_keys(entries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, nargs="+", default=[1000, 10000, 50000])
    args = parser.parse_args()
    print(f"{'replies':>8} {'fill':>9} {'start check':>12} {'verify':>9} {'cross-check':>12}")
    for replies in args.replies:
        with tempfile.TemporaryDirectory() as folder:
            site_key = SigningKey.generate()
            store = SiteStore(Path(folder) / "site.db", "site")
            started = time.perf_counter()
            receipts = fill(store, replies, site_key)
            fill_s = time.perf_counter() - started
            start_s = timed("start check", store.chain_and_ledger_problems)
            verify_s = timed("verify", store.integrity_problems)

            cross_s = timed("cross-check", lambda s=store, r=receipts: _cross(s, r))
            store.close()
        print(f"{replies:>8} {fill_s:>8.1f}s {start_s:>11.2f}s {verify_s:>8.2f}s {cross_s:>11.2f}s")


if __name__ == "__main__":
    main()
