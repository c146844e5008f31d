"""The site's own SQLite file: stored replies, the privacy-budget ledger and the audit log.

One transaction writes a reply, its ledger charge and its audit entry together, *before* the
reply leaves the site (fail closed): a crash either loses all three (and nothing was sent) or
keeps all three (and a repeated task id gets the stored reply, charged nothing twice).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.audit import AuditEntry, VerifyReport, verify_chain
from protocol.budget import PureDP

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, time TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    detail TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, study_id TEXT NOT NULL,
    researcher TEXT NOT NULL, task_id TEXT NOT NULL UNIQUE, analysis TEXT NOT NULL,
    epsilon REAL NOT NULL CHECK (epsilon >= 0)
);
CREATE TABLE IF NOT EXISTS replies (
    task_id TEXT PRIMARY KEY, time TEXT NOT NULL, study_id TEXT NOT NULL,
    payload BLOB NOT NULL, receipt TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""


def now() -> str:
    """UTC time as ISO 8601 with microseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """Open ``path`` read-only (``mode=ro``), creating no file next to it.

    A WAL database opened with ``mode=ro`` alone gets new ``-wal`` and ``-shm`` files when none
    exist. No ``-wal`` file means no site process has the file open (a clean close checkpoints
    and removes it), so the file is complete and is opened ``immutable``, which creates nothing.
    """
    uri = path.resolve().as_uri() + "?mode=ro"
    if not path.with_name(path.name + "-wal").exists():
        uri += "&immutable=1"
    return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)


@dataclass(frozen=True)
class LedgerRow:
    """One charge to the ledger."""

    time: str
    study_id: str
    researcher: str
    task_id: str
    analysis: str
    epsilon: float


class SiteStore:
    """The site's SQLite file (``<state_dir>/site.db``)."""

    def __init__(self, path: Path, actor: str, read_only: bool = False) -> None:
        self.path = path
        self.actor = actor
        self._lock = threading.Lock()
        if read_only:  # `alliance site check` and `site ledger`: an existing file, untouched
            self._db = _connect_read_only(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a charge must survive a power cut
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ audit
    def _append_audit(
        self, db: sqlite3.Connection, action: str, detail: dict[str, Any]
    ) -> AuditEntry:
        row = db.execute(
            "SELECT seq, time, actor, action, detail, prev_hash, hash FROM audit "
            "ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        prev = AuditEntry(*row) if row else None
        entry = AuditEntry.create(prev, now(), self.actor, action, detail)
        db.execute(
            "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                entry.seq,
                entry.time,
                entry.actor,
                entry.action,
                entry.detail,
                entry.prev_hash,
                entry.hash,
            ),
        )
        return entry

    def audit(self, action: str, detail: dict[str, Any]) -> AuditEntry:
        """Append one entry in its own transaction."""
        with self._transaction() as db:
            return self._append_audit(db, action, detail)

    def audit_entries(self) -> list[AuditEntry]:
        """Every audit entry, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, time, actor, action, detail, prev_hash, hash FROM audit ORDER BY seq"
            ).fetchall()
        return [AuditEntry(*row) for row in rows]

    def verify_audit(self) -> VerifyReport:
        """Verify the hash chain of this site's audit log."""
        return verify_chain(self.audit_entries())

    # ------------------------------------------------------------------ ledger
    def spent(self, study_id: str) -> PureDP:
        """Epsilon already charged to ``study_id`` at this site."""
        with self._lock:
            (total,) = self._db.execute(
                "SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE study_id = ?", (study_id,)
            ).fetchone()
        return PureDP(float(total))

    def ledger(self, study_id: str | None = None) -> list[LedgerRow]:
        """Ledger rows, oldest first (optionally for one study)."""
        query = "SELECT time, study_id, researcher, task_id, analysis, epsilon FROM ledger"
        args: tuple[str, ...] = ()
        if study_id is not None:
            query += " WHERE study_id = ?"
            args = (study_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [LedgerRow(*row) for row in rows]

    # ------------------------------------------------------------------ replies
    def stored_reply(self, task_id: str) -> bytes | None:
        """The serialised reply already given to ``task_id``, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT payload FROM replies WHERE task_id = ?", (task_id,)
            ).fetchone()
        return bytes(row[0]) if row else None

    def commit_reply(
        self,
        *,
        task_id: str,
        study_id: str,
        researcher: str,
        analysis: str,
        epsilon: float,
        budget: PureDP | None,
        payload: bytes,
        receipt: str,
        detail: dict[str, Any],
    ) -> bool:
        """Charge, store and audit a reply in one transaction; False if the budget ran out.

        The budget is checked again inside the transaction, so two tasks racing for the last
        of a study's budget cannot both be charged.
        """
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM replies WHERE task_id = ?", (task_id,)).fetchone():
                return True  # already committed by an earlier delivery of the same task
            if budget is not None and epsilon > 0:
                (total,) = db.execute(
                    "SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE study_id = ?", (study_id,)
                ).fetchone()
                if not budget.covers(PureDP(float(total) + epsilon)):
                    return False
            if epsilon > 0:
                db.execute(
                    "INSERT INTO ledger (time, study_id, researcher, task_id, analysis, epsilon) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (now(), study_id, researcher, task_id, analysis, epsilon),
                )
            db.execute(
                "INSERT INTO replies VALUES (?, ?, ?, ?, ?)",
                (task_id, now(), study_id, payload, receipt),
            )
            self._append_audit(db, "reply", detail)
        return True
