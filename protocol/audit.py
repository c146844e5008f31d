"""The hash-chained, append-only audit log both roles keep, and its verification.

Each entry holds its sequence number, time, actor, action and a JSON detail, plus the hash of
the previous entry; its own hash covers all of that. Editing, removing or reordering any entry
breaks every hash after it, so anyone holding the log can verify it without trusting its keeper.
Storage is the keeper's business (the site's SQLite file, the coordinator's store); the chain
rules live here so both sides check them the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

GENESIS_HASH = "0" * 64


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)


@dataclass(frozen=True)
class AuditEntry:
    """One link of the chain."""

    seq: int
    time: str
    actor: str
    action: str
    detail: str  # canonical JSON
    prev_hash: str
    hash: str

    @staticmethod
    def compute_hash(seq: int, time: str, actor: str, action: str, detail: str, prev: str) -> str:
        """SHA-256 over the entry's fields and the previous hash."""
        body = canonical_json([seq, time, actor, action, detail, prev])
        return hashlib.sha256(body.encode()).hexdigest()

    @classmethod
    def create(
        cls, prev: AuditEntry | None, time: str, actor: str, action: str, detail: dict[str, Any]
    ) -> AuditEntry:
        """The entry that follows ``prev`` (``None`` for the first)."""
        seq = 1 if prev is None else prev.seq + 1
        prev_hash = GENESIS_HASH if prev is None else prev.hash
        detail_json = canonical_json(detail)
        digest = cls.compute_hash(seq, time, actor, action, detail_json, prev_hash)
        return cls(seq, time, actor, action, detail_json, prev_hash, digest)


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of verifying a chain."""

    ok: bool
    entries: int
    head: str
    problem: str | None = None

    def __str__(self) -> str:
        if self.ok:
            return f"audit log intact: {self.entries} entries, head {self.head[:16]}"
        return f"audit log BROKEN: {self.problem}"


def verify_chain(entries: Iterable[AuditEntry]) -> VerifyReport:
    """Check sequence numbers, links and hashes; report the first break."""
    prev_hash = GENESIS_HASH
    count = 0
    for expected_seq, entry in enumerate(entries, start=1):
        if entry.seq != expected_seq:
            return VerifyReport(
                False,
                count,
                prev_hash,
                f"entry {expected_seq} is missing (found seq {entry.seq} in its place)",
            )
        if entry.prev_hash != prev_hash:
            return VerifyReport(
                False, count, prev_hash, f"entry {entry.seq} does not link to entry {entry.seq - 1}"
            )
        digest = AuditEntry.compute_hash(
            entry.seq, entry.time, entry.actor, entry.action, entry.detail, entry.prev_hash
        )
        if digest != entry.hash:
            return VerifyReport(
                False,
                count,
                prev_hash,
                f"entry {entry.seq} ({entry.action}) was altered after it was written",
            )
        prev_hash = entry.hash
        count += 1
    return VerifyReport(True, count, prev_hash)
