"""Compare a site's audit log with the receipts the coordinator holds from that site.

A site's log verified alone cannot show that its newest entries were cut off, that it was
emptied, or that someone rewrote an entry and recomputed every hash after it (re-chained): each
of those leaves a valid chain. The coordinator's receipts can: each is the site's own signature
over the sequence number and hash of the audit entry that recorded a reply. So every receipt
must find, in the site's log, an entry with that number and that hash.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from protocol.audit import AuditEntry, canonical_json
from protocol.signing import Receipt, fingerprint


def _replies_in(entries: Iterable[AuditEntry]) -> dict[str, int]:
    """Task id -> the sequence number of the site's audit entry for its reply."""
    answered: dict[str, int] = {}
    for entry in entries:
        if entry.action != "reply":
            continue
        try:
            detail = json.loads(entry.detail)
        except ValueError:
            continue
        if isinstance(detail, dict) and "task" in detail:
            answered[str(detail["task"])] = entry.seq
    return answered


def cross_check(
    site: str,
    entries: list[AuditEntry],
    receipts: list[Receipt],
    site_keys: set[str],
    head_seq: int | None = None,
) -> list[str]:
    """Findings, one line each (empty when the two sides agree).

    Args:
        site: the site's name.
        entries: the site's audit log, in order (or, online, its reply entries only).
        receipts: the coordinator's receipts from this site.
        site_keys: the public keys the site holds or has announced in its log (a receipt
            signed by another key is not the site's).
        head_seq: the sequence number of the log's last entry, when ``entries`` is not the
            whole log (default: the last of ``entries``).
    """
    problems: list[str] = []
    by_seq = {entry.seq: entry for entry in entries}
    last = max(by_seq, default=0) if head_seq is None else head_seq
    answered = _replies_in(entries)
    reported: set[str] = set()
    for receipt in sorted(receipts, key=lambda r: (r.audit_seq, r.task_id)):
        task = receipt.task_id
        if not receipt.valid():
            problems.append(f"task {task}: the coordinator's receipt does not verify")
            reported.add(task)
            continue
        if receipt.public_key not in site_keys:
            problems.append(
                f"task {task}: its receipt is signed by key {fingerprint(receipt.public_key)}, "
                f"which site {site} does not hold"
            )
            reported.add(task)
            continue
        entry = by_seq.get(receipt.audit_seq)
        if entry is None:
            if last == 0:
                why = "the site's audit log is empty: it was emptied"
            elif receipt.audit_seq > last:
                why = f"the site's log ends at entry {last}: its tail was cut off"
            elif head_seq is not None:  # online: the site showed its reply entries only
                why = (
                    f"the site's entry {receipt.audit_seq} is not that reply: the log was cut "
                    "back or rewritten below a receipted head"
                )
            else:
                why = "that entry is missing from the site's log"
            problems.append(
                f"task {task}: the coordinator holds {site}'s signed receipt for audit entry "
                f"{receipt.audit_seq}, but {why}"
            )
            reported.add(task)
        elif entry.hash != receipt.audit_hash:
            problems.append(
                f"task {task}: {site}'s audit entry {receipt.audit_seq} is not the entry it "
                f"signed (hash {entry.hash[:16]}, receipt {receipt.audit_hash[:16]}): the log "
                "was cut back or rewritten, and re-chained, below a receipted head"
            )
            reported.add(task)
    receipted = {r.task_id for r in receipts}
    for task in sorted(receipted - answered.keys() - reported):
        problems.append(
            f"task {task}: the coordinator holds {site}'s receipt, but the site's log records "
            "no reply to it"
        )
    for task in sorted(answered.keys() - receipted):
        problems.append(
            f"task {task}: {site} answered it (audit entry {answered[task]}), but the "
            "coordinator holds no receipt for it"
        )
    return problems


def announced_keys(entries: Iterable[AuditEntry]) -> set[str]:
    """The signing keys a site's log names (at start, and in each signed reply)."""
    keys: set[str] = set()
    for entry in entries:
        if entry.action not in ("site_started", "reply"):
            continue
        try:
            detail = json.loads(entry.detail)
        except ValueError:
            continue
        if isinstance(detail, dict):
            for field in ("signing_key", "key"):
                if isinstance(detail.get(field), str):
                    keys.add(detail[field])
    return keys


def entries_from_answer(site: str, records: list[tuple[int, str, str, str]]) -> list[AuditEntry]:
    """A site's online answer (seq, hash, action, task) as entries :func:`cross_check` reads
    (time and links are not sent: the site verifies its own chain, ``alliance audit verify``)."""
    return [
        AuditEntry(
            seq, "", site, action, canonical_json({"task": task} if task else {}), "", digest
        )
        for seq, digest, action, task in records
    ]
