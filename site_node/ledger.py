"""The site's own SQLite file: stored replies, the privacy-budget ledger and the audit log.

One transaction writes a reply, its ledger charge and its audit entry together, *before* the
reply leaves the site (fail closed): a crash either loses all three (and nothing was sent) or
keeps all three (and a repeated task id gets the stored reply, charged nothing twice).

The ledger keeps charges in whole nano-epsilon units (``protocol.budget``), and every budget
decision, before the work and again inside the commit, goes through the one exact predicate
``protocol.budget.check_budget``: the study's budget at this site, and this approval's cap on
what one request may spend, summed over the request's tasks (rounds).
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
from protocol.budget import PureDP, check_budget, format_epsilon, over_request_cap
from protocol.errors import InternalError, RefusedError
from protocol.storage import connect_read_only
from protocol.wire.messages import TaskMessage

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, time TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    detail TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, study_id TEXT NOT NULL,
    researcher TEXT NOT NULL, task_id TEXT NOT NULL UNIQUE, analysis TEXT NOT NULL,
    epsilon REAL NOT NULL CHECK (epsilon >= 0),
    units INTEGER NOT NULL CHECK (units >= 0), request_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS replies (
    task_id TEXT PRIMARY KEY, time TEXT NOT NULL, study_id TEXT NOT NULL,
    payload BLOB NOT NULL, receipt TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""
LEDGER_NO_UPDATE = """
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE INDEX IF NOT EXISTS ledger_spent ON ledger (study_id, request_id, units);
"""


def now() -> str:
    """UTC time as ISO 8601 with microseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Charge:
    """What one dp task asks of the ledger: ``epsilon`` against the study's ``budget`` at this
    site, and against the approval's ``cap`` on what one request may spend over its rounds."""

    study_id: str
    request_id: str
    epsilon: PureDP
    budget: PureDP
    cap: PureDP | None


@dataclass(frozen=True)
class LedgerRow:
    """One charge to the ledger."""

    time: str
    study_id: str
    researcher: str
    task_id: str
    analysis: str
    epsilon: float
    request_id: str = ""


class SiteStore:
    """The site's SQLite file (``<state_dir>/site.db``)."""

    def __init__(self, path: Path, actor: str, read_only: bool = False) -> None:
        self.path = path
        self.actor = actor
        self._lock = threading.Lock()
        if read_only:  # `alliance site check` and `site ledger`: an existing file, untouched
            self._db = connect_read_only(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a charge must survive a power cut
        self._db.executescript(SCHEMA)
        self._migrate_ledger()
        self._db.executescript(LEDGER_NO_UPDATE)

    def _migrate_ledger(self) -> None:
        """Give a ledger written before integer units its units and request ids, keeping every
        charge (rounded up to a unit, as new charges are) and auditing the migration."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(ledger)")}
        if "units" in columns:
            return
        with self._transaction() as db:
            db.execute("DROP TRIGGER IF EXISTS ledger_no_update")
            db.execute("ALTER TABLE ledger ADD COLUMN units INTEGER NOT NULL DEFAULT 0")
            db.execute("ALTER TABLE ledger ADD COLUMN request_id TEXT NOT NULL DEFAULT ''")
            rows = db.execute("SELECT id, task_id, epsilon FROM ledger").fetchall()
            for row_id, task_id, epsilon in rows:
                db.execute(
                    "UPDATE ledger SET units = ?, request_id = ? WHERE id = ?",
                    (PureDP(float(epsilon)).charge_units(), task_id, row_id),
                )
            self._append_audit(db, "ledger_migrated", {"charges": len(rows), "unit": "1e-9"})

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
        """Epsilon already charged to ``study_id`` at this site (exact ledger units)."""
        with self._lock:
            return PureDP.from_units(self._spent_units(self._db, study_id))

    @staticmethod
    def _spent_units(db: sqlite3.Connection, study_id: str, request_id: str | None = None) -> int:
        query = "SELECT COALESCE(SUM(units), 0) FROM ledger WHERE study_id = ?"
        args: tuple[str, ...] = (study_id,)
        if request_id is not None:
            query += " AND request_id = ?"
            args += (request_id,)
        (total,) = db.execute(query, args).fetchone()
        return int(total)

    def _check_charge(self, db: sqlite3.Connection, charge: Charge) -> None:
        """Refuse ``charge`` unless it fits the study's budget and the per-request cap."""
        study_id, epsilon = charge.study_id, charge.epsilon
        check = check_budget(charge.budget, self._spent_units(db, study_id), epsilon)
        if not check.allowed:
            raise RefusedError(
                f"refused by {self.actor}: study {study_id} has epsilon "
                f"{format_epsilon(check.remaining.epsilon)} left at this site; this request "
                f"needs {format_epsilon(epsilon.epsilon)} (short by "
                f"{format_epsilon(check.short.epsilon)}). Ask the site admin for more budget, "
                "or lower `epsilon` in the request",
                code="budget",
            )
        if charge.cap is None:
            return
        used = self._spent_units(db, study_id, charge.request_id)
        if not check_budget(charge.cap, used, epsilon).allowed:
            asked = PureDP.from_units(used) + epsilon
            raise RefusedError(
                f"refused by {self.actor}: {over_request_cap(study_id, asked, charge.cap)}",
                code="budget",
            )

    def precheck_charge(self, charge: Charge) -> None:
        """The commit's own budget check, run before any work so a refusal costs nothing.

        Raises:
            RefusedError: code ``budget``, saying requested, remaining and the difference.
        """
        with self._lock:
            self._check_charge(self._db, charge)

    def ledger(self, study_id: str | None = None) -> list[LedgerRow]:
        """Ledger rows, oldest first (optionally for one study)."""
        query = (
            "SELECT time, study_id, researcher, task_id, analysis, epsilon, request_id FROM ledger"
        )
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
        task: TaskMessage,
        charge: Charge | None,
        payload: bytes,
        receipt: str,
        detail: dict[str, Any],
    ) -> bytes:
        """Charge, store and audit the reply to ``task`` in one transaction; return what may
        leave the site.

        The budget is checked again inside the transaction with the same predicate as
        :meth:`precheck_charge`, so two tasks racing for the last of a study's budget cannot
        both be charged. A task id committed before gets its stored payload back, never the
        new one: one task id, one answer.

        Raises:
            RefusedError: code ``budget`` when the charge no longer fits; nothing is written.
        """
        task_id, study_id = task.task_id, task.study_id
        with self._transaction() as db:
            row = db.execute("SELECT payload FROM replies WHERE task_id = ?", (task_id,)).fetchone()
            if row is not None:
                return bytes(row[0])
            if charge is not None and charge.epsilon.epsilon > 0:
                if (charge.study_id, charge.request_id) != (study_id, task.request_id):
                    raise InternalError(
                        f"task {task_id} (study {study_id}, request {task.request_id}) carries "
                        f"a charge to study {charge.study_id}, request {charge.request_id}"
                    )
                self._check_charge(db, charge)
                db.execute(
                    "INSERT INTO ledger (time, study_id, researcher, task_id, analysis, epsilon, "
                    "units, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        now(),
                        study_id,
                        task.researcher,
                        task_id,
                        task.analysis,
                        charge.epsilon.epsilon,
                        charge.epsilon.charge_units(),
                        charge.request_id,
                    ),
                )
            db.execute(
                "INSERT INTO replies VALUES (?, ?, ?, ?, ?)",
                (task_id, now(), study_id, payload, receipt),
            )
            self._append_audit(db, "reply", detail)
        return payload
