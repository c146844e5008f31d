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
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from protocol.audit import AuditEntry, VerifyReport, verify_chain
from protocol.budget import (
    ZCDP,
    BudgetCheck,
    PureDP,
    check_budget,
    check_rho,
    format_epsilon,
    over_request_cap,
)
from protocol.config import PeriodBudget, SDCThresholds
from protocol.errors import AllianceError, BudgetError, InternalError, RefusedError
from protocol.signing import (
    Receipt,
    reply_digest,
    study_digest,
    task_digest,
    task_signature_valid,
)
from protocol.storage import connect_read_only
from protocol.wire import alliance_pb2 as pb
from protocol.wire.messages import TaskMessage
from site_node.disclosure import DifferencingGuard, RecordSet

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
CREATE TABLE IF NOT EXISTS scripts (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, module TEXT NOT NULL,
    manifest TEXT NOT NULL, received TEXT NOT NULL, status TEXT NOT NULL
        CHECK (status IN ('pending', 'approved', 'refused')),
    decided TEXT, decided_by TEXT, reason TEXT
);
CREATE TABLE IF NOT EXISTS study_notices (
    seq INTEGER PRIMARY KEY, study_id TEXT NOT NULL, version INTEGER NOT NULL,
    state TEXT NOT NULL, study_json TEXT NOT NULL, received TEXT NOT NULL, message BLOB NOT NULL,
    starts TEXT NOT NULL DEFAULT '', expires TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS study_decisions (
    seq INTEGER PRIMARY KEY, study_id TEXT NOT NULL, version INTEGER NOT NULL,
    study_digest TEXT NOT NULL, decision TEXT NOT NULL CHECK (decision IN ('approved', 'refused')),
    reason TEXT NOT NULL, decided_by TEXT NOT NULL, decided_at TEXT NOT NULL,
    terms_json TEXT NOT NULL, source TEXT NOT NULL, message BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS study_notices_study ON study_notices (study_id, seq);
CREATE INDEX IF NOT EXISTS study_decisions_study ON study_decisions (study_id, seq);
CREATE TRIGGER IF NOT EXISTS study_notices_no_update BEFORE UPDATE ON study_notices
    BEGIN SELECT RAISE(ABORT, 'study notices are append-only'); END;
CREATE TRIGGER IF NOT EXISTS study_notices_no_delete BEFORE DELETE ON study_notices
    BEGIN SELECT RAISE(ABORT, 'study notices are append-only'); END;
CREATE TRIGGER IF NOT EXISTS study_decisions_no_update BEFORE UPDATE ON study_decisions
    BEGIN SELECT RAISE(ABORT, 'study decisions are append-only'); END;
CREATE TRIGGER IF NOT EXISTS study_decisions_no_delete BEFORE DELETE ON study_decisions
    BEGIN SELECT RAISE(ABORT, 'study decisions are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS replies_no_update BEFORE UPDATE ON replies
    BEGIN SELECT RAISE(ABORT, 'stored replies are append-only'); END;
CREATE TRIGGER IF NOT EXISTS replies_no_delete BEFORE DELETE ON replies
    BEGIN SELECT RAISE(ABORT, 'stored replies are append-only'); END;
"""
LEDGER_NO_UPDATE = """
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE INDEX IF NOT EXISTS ledger_spent ON ledger (study_id, request_id, units);
CREATE INDEX IF NOT EXISTS ledger_researcher ON ledger (study_id, researcher, units);
CREATE INDEX IF NOT EXISTS ledger_time ON ledger (time, units);
"""


def now() -> str:
    """UTC time as ISO 8601 with microseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Charge:
    """What one dp task asks of the ledger: ``epsilon`` against every level that applies.

    The levels: the study's ``budget`` at this site; the approval's ``cap`` on what one request
    may spend over its rounds; the researcher's budget within the study
    (``researcher_budget``); and the site-wide budget per calendar period (``period``).

    A release with Gaussian noise spends zCDP ``rho`` instead (``epsilon`` 0), against the
    study's ``rho_budget`` at this site and the approval's ``rho_cap`` per request; the
    researcher and period budgets count epsilon only.
    """

    study_id: str
    request_id: str
    epsilon: PureDP
    budget: PureDP
    cap: PureDP | None
    researcher: str = ""
    researcher_budget: PureDP | None = None
    period: PeriodBudget | None = None
    rho: ZCDP | None = None
    rho_budget: ZCDP | None = None
    rho_cap: ZCDP | None = None


def period_start(period: str, at: dt.datetime) -> dt.datetime:
    """The start (UTC) of the calendar ``period`` (day, week from Monday, month, year) holding
    ``at``."""
    day = dt.datetime(at.year, at.month, at.day, tzinfo=dt.UTC)
    if period == "day":
        return day
    if period == "week":
        return day - dt.timedelta(days=at.weekday())
    if period == "month":
        return day.replace(day=1)
    return day.replace(month=1, day=1)


def period_name(period: str, at: dt.datetime) -> str:
    """The period for people: ``2026-12-02``, ``week 49 of 2026``, ``December 2026``, ``2026``."""
    if period == "day":
        return at.date().isoformat()
    if period == "week":
        year, week, _ = at.isocalendar()
        return f"week {week} of {year}"
    if period == "month":
        return at.strftime("%B %Y")
    return str(at.year)


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
    rho: float = 0.0


@dataclass(frozen=True)
class _LedgerUnits:
    task_id: str
    units: int
    rho_units: int


def _detail(entry: AuditEntry) -> dict[str, Any]:
    """An entry's detail as a dict (an edited detail that is not a JSON object: empty)."""
    try:
        value = json.loads(entry.detail)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _logged_charge(detail: dict[str, Any]) -> tuple[int, int] | None:
    """The (units, rho units) a reply's audit entry records as charged, or None.

    Raises:
        KeyError, TypeError, ValueError, BudgetError: the entry's charge is not readable.
    """
    if "charge" in detail:
        charge = detail["charge"]
        if charge is None:
            return None
        return int(charge["units"]), int(charge["rho_units"])
    # Written before charges were in the log: derived from the epsilon and rho it holds.
    epsilon, rho = float(detail.get("epsilon") or 0), float(detail.get("rho") or 0)
    if epsilon > 0 or rho > 0:
        return PureDP(epsilon).charge_units(), ZCDP(rho).charge_units() if rho else 0
    return None


def _stored_reply_problems(
    where: str, entry: AuditEntry, detail: dict[str, Any], row: tuple[bytes, str, bytes, str]
) -> list[str]:
    """What is wrong with one stored reply against the audit entry that records it."""
    payload, receipt_column, task_bytes, coordinator_key = row
    try:
        message = pb.SiteMessage.FromString(payload)
    except DecodeError:
        return [f"{where}: the stored reply is not a reply message"]
    reply = message.reply
    problems = []
    if receipt_column != detail.get("receipt") or reply.receipt != detail.get("receipt"):
        problems.append(f"{where}: the stored reply's digest differs from the logged one")
    elif reply_digest(reply.task_id, reply.record) != reply.receipt:
        problems.append(f"{where}: the stored reply's record was changed after it was signed")
    if (reply.audit_seq, reply.audit_hash) != (entry.seq, entry.hash):
        problems.append(
            f"{where}: the reply's receipt names audit entry {reply.audit_seq} "
            f"({reply.audit_hash[:16]}), not this entry ({entry.hash[:16]}): the log was "
            "re-chained"
        )
    receipt = Receipt.from_reply("", str(detail["key"]), reply)
    if not receipt.valid():
        problems.append(f"{where}: the receipt's signature does not verify under the site key")
    if task_bytes:
        try:
            task = pb.Task.FromString(task_bytes)
        except DecodeError:
            return [*problems, f"{where}: the task kept beside the reply is not a task"]
        if task_digest(task) != detail.get("request_digest"):
            problems.append(f"{where}: the task kept beside the reply is not the one logged")
        elif coordinator_key and not task_signature_valid(task, coordinator_key):
            problems.append(f"{where}: the coordinator's signature on the task does not verify")
    return problems


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
        self._migrate_replies()
        self._db.executescript(LEDGER_NO_UPDATE)
        self.guard = DifferencingGuard(self._db, self._lock)

    def _migrate_replies(self) -> None:
        """Give a replies table written before signed tasks its columns for the task as asked
        and the coordinator's key (empty for earlier replies)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(replies)")}
        if "task" in columns:
            return
        with self._transaction() as db:
            db.execute("ALTER TABLE replies ADD COLUMN task BLOB NOT NULL DEFAULT x''")
            db.execute("ALTER TABLE replies ADD COLUMN coordinator_key TEXT NOT NULL DEFAULT ''")

    def _migrate_ledger(self) -> None:
        """Give a ledger written before integer units its units and request ids, keeping every
        charge (rounded up to a unit, as new charges are) and auditing the migration; and one
        written before zCDP charges its rho column (every earlier charge spent no rho)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(ledger)")}
        if "rho_units" not in columns:
            with self._transaction() as db:
                db.execute(
                    "ALTER TABLE ledger ADD COLUMN rho_units INTEGER NOT NULL DEFAULT 0 "
                    "CHECK (rho_units >= 0)"
                )
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

    # ------------------------------------------------------------------ scripts
    def receive_script(
        self, digest: str, name: str, version: str, module: str, manifest: str
    ) -> bool:
        """Keep a script a task brought, for its admin to review (audited once per hash).

        Returns:
            Whether it was new here.
        """
        with self._transaction() as db:
            inserted = db.execute(
                "INSERT OR IGNORE INTO scripts (hash, name, version, module, manifest, received, "
                "status) VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                (digest, name, version, module, manifest, now()),
            ).rowcount
            if inserted:
                self._append_audit(
                    db, "script_received", {"hash": digest, "name": name, "version": version}
                )
        return bool(inserted)

    def script_status(self, digest: str) -> str | None:
        """``pending``, ``approved`` or ``refused``; None for a script never seen here."""
        with self._lock:
            row = self._db.execute(
                "SELECT status FROM scripts WHERE hash = ?", (digest,)
            ).fetchone()
        return None if row is None else str(row[0])

    def scripts(self) -> list[dict[str, Any]]:
        """Every script this site has seen, newest first."""
        with self._lock:
            cursor = self._db.execute(
                "SELECT hash, name, version, module, manifest, received, status, decided, "
                "decided_by, reason FROM scripts ORDER BY received DESC, hash"
            )
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def find_script(self, prefix: str) -> dict[str, Any]:
        """The one script whose hash starts with ``prefix`` (8 hex digits at least).

        Raises:
            ValueError: no such script, or several.
        """
        prefix = prefix.strip().lower()
        if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
            raise ValueError(
                f"a script hash is 64 hex digits (8 or more to abbreviate), got {prefix[:70]!r}"
            )
        found = [s for s in self.scripts() if s["hash"].startswith(prefix)]
        if not found:
            raise ValueError(
                f"no script with hash {prefix} has reached this site; a site keeps a script "
                "when the first task that runs it arrives"
            )
        if len(found) > 1:
            raise ValueError(f"hash {prefix} is ambiguous here; give more of its digits")
        return found[0]

    def decide_script(self, digest: str, approve: bool, by: str, reason: str = "") -> None:
        """Approve or refuse a script by its full hash, in force at once (audited)."""
        status = "approved" if approve else "refused"
        with self._transaction() as db:
            row = db.execute(
                "SELECT name, version FROM scripts WHERE hash = ?", (digest,)
            ).fetchone()
            if row is None:
                raise ValueError(f"no script with hash {digest} has reached this site")
            db.execute(
                "UPDATE scripts SET status = ?, decided = ?, decided_by = ?, reason = ? "
                "WHERE hash = ?",
                (status, now(), by, reason, digest),
            )
            self._append_audit(
                db,
                f"script_{status}",
                {"hash": digest, "name": row[0], "version": row[1], "by": by, "reason": reason},
            )

    # ------------------------------------------------------------------ studies
    def receive_notice(self, notice: pb.StudyNotice, starts: str = "", expires: str = "") -> bool:
        """Keep a study notice from the coordinator (its version and state, and the study's
        dates as ISO days, "" for none), audited; a notice equal to the study's latest one is
        not kept again. Returns whether it was new."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT version, state, study_json FROM study_notices WHERE study_id = ? "
                "ORDER BY seq DESC LIMIT 1",
                (notice.study_id,),
            ).fetchone()
            if row is not None and tuple(row) == (
                notice.version,
                notice.state,
                notice.study_json,
            ):
                return False
            db.execute(
                "INSERT INTO study_notices (study_id, version, state, study_json, received, "
                "message, starts, expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    notice.study_id,
                    notice.version,
                    notice.state,
                    notice.study_json,
                    now(),
                    notice.SerializeToString(deterministic=True),
                    starts,
                    expires,
                ),
            )
            self._append_audit(
                db,
                "study_notice",
                {
                    "study": notice.study_id,
                    "version": notice.version,
                    "state": notice.state,
                    "study_digest": study_digest(notice.study_json),
                    "signature": notice.signature,
                },
            )
        return True

    def notices(self, study_id: str | None = None) -> list[dict[str, Any]]:
        """Study notices received (of one study, or all), oldest first."""
        where, args = ("WHERE study_id = ?", (study_id,)) if study_id else ("", ())
        with self._lock:
            cursor = self._db.execute(
                "SELECT seq, study_id, version, state, study_json, received FROM study_notices "
                f"{where} ORDER BY seq",
                args,
            )
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def record_decision(self, decision: pb.StudyDecision, source: str) -> int:
        """Keep a signed decision on a study version, audited; in force from the next task.
        Returns its sequence number."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO study_decisions (study_id, version, study_digest, decision, reason, "
                "decided_by, decided_at, terms_json, source, message) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    decision.study_id,
                    decision.version,
                    decision.study_digest,
                    decision.decision,
                    decision.reason,
                    decision.decided_by,
                    decision.decided_at,
                    decision.terms_json,
                    source,
                    decision.SerializeToString(deterministic=True),
                ),
            )
            self._append_audit(
                db,
                f"study_{decision.decision}",
                {
                    "study": decision.study_id,
                    "version": decision.version,
                    "study_digest": decision.study_digest,
                    "by": decision.decided_by,
                    "reason": decision.reason,
                    "source": source,
                    "signature": decision.signature,
                },
            )
            return int(cursor.lastrowid or 0)

    def decisions(self, after: int = 0) -> list[tuple[int, str, pb.StudyDecision]]:
        """Every decision after sequence number ``after``: (seq, source, the signed message),
        oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, source, message FROM study_decisions WHERE seq > ? ORDER BY seq",
                (after,),
            ).fetchall()
        return [
            (int(seq), str(source), pb.StudyDecision.FromString(raw)) for seq, source, raw in rows
        ]

    def last_decision_seq(self) -> int:
        """The sequence number of the newest decision (0: none)."""
        with self._lock:
            row = self._db.execute("SELECT max(seq) FROM study_decisions").fetchone()
        return int(row[0] or 0)

    def latest_decision(self, study_id: str) -> pb.StudyDecision | None:
        """The decision in force on one study, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT message FROM study_decisions WHERE study_id = ? ORDER BY seq DESC LIMIT 1",
                (study_id,),
            ).fetchone()
        return None if row is None else pb.StudyDecision.FromString(row[0])

    def notice_states(self, study_id: str) -> list[tuple[str, str, str, str]]:
        """(state, received, starts, expires) of every notice of one study, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, received, starts, expires FROM study_notices WHERE study_id = ? "
                "ORDER BY seq",
                (study_id,),
            ).fetchall()
        return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]

    def latest_decisions(self) -> dict[str, pb.StudyDecision]:
        """Each study's latest decision (the one in force)."""
        return {decision.study_id: decision for _, _, decision in self.decisions()}

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

    # ------------------------------------------------------------------ integrity
    def ledger_problems(self, entries: list[AuditEntry] | None = None) -> list[str]:
        """Where the ledger disagrees with the charges the audit log records.

        Every charge is written twice in one transaction: as a ledger row and inside the
        reply's hash-chained audit entry. A ledger row deleted (after dropping its trigger, as
        anyone holding the file can) gives back the budget it spent; here it shows as a charge
        the log has and the ledger lacks, named by task and audit entry.
        """
        entries = self.audit_entries() if entries is None else entries
        problems: list[str] = []
        logged: dict[str, tuple[int, int, int]] = {}  # task -> (entry, units, rho units)
        for entry in entries:
            if entry.action != "reply":
                continue
            detail = _detail(entry)
            task = str(detail.get("task", ""))
            try:
                charged = _logged_charge(detail)
            except (KeyError, TypeError, ValueError, BudgetError):
                problems.append(f"audit entry {entry.seq}: its charge is unreadable")
                continue
            if charged is not None:
                logged[task] = (entry.seq, *charged)
        rows = {row.task_id: row for row in self._ledger_units()}
        for task, (seq, units, rho_units) in logged.items():
            row = rows.get(task)
            if row is None:
                problems.append(
                    f"ledger: the charge for task {task} (audit entry {seq}: epsilon "
                    f"{format_epsilon(PureDP.from_units(units).epsilon)}) is missing from the "
                    "ledger: a ledger row was deleted"
                )
            elif (row.units, row.rho_units) != (units, rho_units):
                problems.append(
                    f"ledger: the charge for task {task} differs from its audit entry {seq} "
                    f"(ledger {row.units} units, log {units}): a ledger row was changed"
                )
        for task in rows.keys() - logged.keys():
            problems.append(
                f"ledger: task {task} has a ledger row but the audit log records no charge "
                "for it: a row was inserted, or the log's entry for it was removed"
            )
        return problems

    def _ledger_units(self) -> list[_LedgerUnits]:
        with self._lock:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(ledger)")}
            rho = "rho_units" if "rho_units" in columns else "0"
            units = "units" if "units" in columns else "0"
            rows = self._db.execute(
                f"SELECT task_id, {units}, {rho} FROM ledger ORDER BY id"
            ).fetchall()
        return [_LedgerUnits(str(r[0]), int(r[1]), int(r[2])) for r in rows]

    def reply_problems(self, entries: list[AuditEntry] | None = None) -> list[str]:
        """Check every stored reply against its audit entry and its signatures.

        For each reply the log records: the stored reply exists, its record still has the
        logged digest, its receipt names this entry (sequence number and hash) and carries a
        valid signature of the site key the entry names, and the task kept beside it has the
        logged digest and, when a coordinator signed it, the coordinator's valid signature.
        """
        entries = self.audit_entries() if entries is None else entries
        stored = self._stored_replies()
        problems: list[str] = []
        logged: set[str] = set()
        for entry in entries:
            if entry.action != "reply":
                continue
            detail = _detail(entry)
            if "key" not in detail:  # written before signed receipts: nothing to check
                logged.add(str(detail.get("task", "")))
                continue
            task_id = str(detail.get("task", ""))
            logged.add(task_id)
            where = f"audit entry {entry.seq} (task {task_id})"
            row = stored.get(task_id)
            if row is None:
                problems.append(f"{where}: the stored reply is missing")
                continue
            problems += _stored_reply_problems(where, entry, detail, row)
        for task_id in stored.keys() - logged:
            problems.append(
                f"stored reply to task {task_id}: no audit entry records it (the entry was "
                "removed, or the reply inserted)"
            )
        return problems

    def _stored_replies(self) -> dict[str, tuple[bytes, str, bytes, str]]:
        with self._lock:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(replies)")}
            extra = "task, coordinator_key" if "task" in columns else "x'', ''"
            rows = self._db.execute(
                f"SELECT task_id, payload, receipt, {extra} FROM replies"
            ).fetchall()
        return {str(r[0]): (bytes(r[1]), str(r[2]), bytes(r[3]), str(r[4])) for r in rows}

    def chain_and_ledger_problems(self) -> list[str]:
        """The hash chain and the ledger against it: what a site checks before it serves."""
        entries = self.audit_entries()
        report = verify_chain(entries)
        problems = [] if report.ok else [f"audit log: {report.problem}"]
        return problems + self.ledger_problems(entries)

    def released(self, study_id: str | None = None) -> list[dict[str, Any]]:
        """Every reply that left the site, decoded, oldest first (optionally one study's):
        time, study, task, analysis, researcher, mode, epsilon, rho and each released array
        (name, shape, values, kind, mechanism, noise scale, epsilon)."""
        logged = {
            str(detail.get("task")): detail
            for entry in self.audit_entries()
            if entry.action == "reply" and (detail := _detail(entry))
        }
        with self._lock:
            query = "SELECT task_id, time, study_id, payload FROM replies"
            args: tuple[str, ...] = ()
            if study_id is not None:
                query += " WHERE study_id = ?"
                args = (study_id,)
            rows = self._db.execute(query + " ORDER BY time, task_id", args).fetchall()
        out = []
        for task_id, time, study, payload in rows:
            try:
                reply = pb.SiteMessage.FromString(bytes(payload)).reply
            except DecodeError:
                raise AllianceError(
                    f"{self.path}: the stored reply to task {task_id} is not a reply message; "
                    "`alliance audit verify` checks the whole file"
                ) from None
            detail = logged.get(str(task_id), {})
            out.append(
                {
                    "time": time,
                    "study": study,
                    "task": task_id,
                    "analysis": detail.get("analysis", ""),
                    "researcher": detail.get("researcher", ""),
                    "mode": reply.privacy_mode,
                    "epsilon": reply.epsilon_spent,
                    "rho": reply.rho_spent,
                    "arrays": [
                        {
                            "name": array.name,
                            "shape": list(array.shape),
                            "values": list(array.values),
                            "kind": array.kind,
                            "mechanism": array.mechanism,
                            "scale": array.scale,
                            "epsilon": array.epsilon,
                        }
                        for array in reply.record.arrays
                    ],
                }
            )
        return out

    def integrity_problems(self) -> list[str]:
        """Everything ``alliance audit verify`` checks in a site's file, one line per finding:
        the hash chain (first bad entry), the ledger against the charges in the chain, and every
        stored reply and signature."""
        entries = self.audit_entries()
        report = verify_chain(entries)
        problems = [] if report.ok else [f"audit log: {report.problem}"]
        return problems + self.ledger_problems(entries) + self.reply_problems(entries)

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

    @staticmethod
    def _researcher_units(db: sqlite3.Connection, study_id: str, researcher: str) -> int:
        (total,) = db.execute(
            "SELECT COALESCE(SUM(units), 0) FROM ledger WHERE study_id = ? AND researcher = ?",
            (study_id, researcher),
        ).fetchone()
        return int(total)

    @staticmethod
    def _units_since(db: sqlite3.Connection, start: dt.datetime) -> int:
        (total,) = db.execute(
            "SELECT COALESCE(SUM(units), 0) FROM ledger WHERE time >= ?",
            (start.isoformat(timespec="microseconds"),),
        ).fetchone()
        return int(total)

    def _refuse(self, check: BudgetCheck, what: str) -> RefusedError:
        return RefusedError(
            f"refused by {self.actor}: {what} has epsilon "
            f"{format_epsilon(check.remaining.epsilon)} left at this site; this request "
            f"needs {format_epsilon(check.requested.epsilon)} (short by "
            f"{format_epsilon(check.short.epsilon)}). Ask the site admin for more budget, "
            "or lower `epsilon` in the request",
            code="budget",
        )

    def _check_charge(self, db: sqlite3.Connection, charge: Charge) -> None:
        """Refuse ``charge`` unless it fits every level: the site's period budget, the study's
        budget, the researcher's budget in the study and the per-request cap."""
        study_id, epsilon = charge.study_id, charge.epsilon
        if charge.period is not None:
            at = dt.datetime.now(dt.UTC)
            start = period_start(charge.period.period, at)
            check = check_budget(charge.period.epsilon, self._units_since(db, start), epsilon)
            if not check.allowed:
                name = period_name(charge.period.period, at)
                raise self._refuse(check, f"this site's budget for {name} (all studies)")
        if charge.rho is not None:
            self._check_rho(db, charge, charge.rho)
        if epsilon.epsilon == 0 and charge.rho is not None:
            return
        check = check_budget(charge.budget, self._spent_units(db, study_id), epsilon)
        if not check.allowed:
            raise self._refuse(check, f"study {study_id}")
        if charge.researcher_budget is not None:
            used = self._researcher_units(db, study_id, charge.researcher)
            check = check_budget(charge.researcher_budget, used, epsilon)
            if not check.allowed:
                raise self._refuse(check, f"researcher {charge.researcher} in study {study_id}")
        if charge.cap is None:
            return
        used = self._spent_units(db, study_id, charge.request_id)
        if not check_budget(charge.cap, used, epsilon).allowed:
            asked = PureDP.from_units(used) + epsilon
            raise RefusedError(
                f"refused by {self.actor}: {over_request_cap(study_id, asked, charge.cap)}",
                code="budget",
            )

    def _check_rho(self, db: sqlite3.Connection, charge: Charge, rho: ZCDP) -> None:
        """Refuse a zCDP charge past the study's rho budget here or the per-request cap."""
        study_id = charge.study_id
        if charge.rho_budget is None:
            raise RefusedError(
                f"refused by {self.actor}: this release adds Gaussian noise (zCDP), and this "
                f"site's approval of study {study_id} sets no rho_budget; ask the site admin",
                code="budget",
            )
        check = check_rho(charge.rho_budget, self._rho_units(db, study_id), rho)
        if not check.allowed:
            raise RefusedError(
                f"refused by {self.actor}: study {study_id} has rho "
                f"{format_epsilon(check.remaining.rho)} left at this site; this request needs "
                f"{format_epsilon(rho.rho)} (short by {format_epsilon(check.short.rho)}). Ask "
                "the site admin for more budget, or lower `rho` in the request",
                code="budget",
            )
        if charge.rho_cap is None:
            return
        used = self._rho_units(db, study_id, charge.request_id)
        if not check_rho(charge.rho_cap, used, rho).allowed:
            raise RefusedError(
                f"refused by {self.actor}: study {study_id} allows rho "
                f"{format_epsilon(charge.rho_cap.rho)} per request at this site; this request "
                f"asks for {format_epsilon((ZCDP.from_units(used) + rho).rho)}",
                code="budget",
            )

    @staticmethod
    def _rho_units(db: sqlite3.Connection, study_id: str, request_id: str | None = None) -> int:
        """Nano-rho charged to a study (one request of it); 0 in a file written before zCDP
        charges (read-only opens do not add the column)."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(ledger)")}
        if "rho_units" not in columns:
            return 0
        query = "SELECT COALESCE(SUM(rho_units), 0) FROM ledger WHERE study_id = ?"
        args: tuple[str, ...] = (study_id,)
        if request_id is not None:
            query += " AND request_id = ?"
            args += (request_id,)
        (total,) = db.execute(query, args).fetchone()
        return int(total)

    def spent_rho(self, study_id: str) -> ZCDP:
        """zCDP rho charged to ``study_id`` at this site."""
        with self._lock:
            return ZCDP.from_units(self._rho_units(self._db, study_id))

    def precheck_charge(self, charge: Charge) -> None:
        """The commit's own budget check, run before any work so a refusal costs nothing.

        Raises:
            RefusedError: code ``budget``, saying requested, remaining and the difference.
        """
        with self._lock:
            self._check_charge(self._db, charge)

    def spent_by_researcher(self, study_id: str) -> dict[str, PureDP]:
        """Epsilon charged to ``study_id`` at this site, per researcher."""
        with self._lock:
            rows = self._db.execute(
                "SELECT researcher, SUM(units) FROM ledger WHERE study_id = ? GROUP BY researcher "
                "ORDER BY researcher",
                (study_id,),
            ).fetchall()
        return {name: PureDP.from_units(int(units)) for name, units in rows}

    def spent_in_period(self, period: str, at: dt.datetime | None = None) -> PureDP:
        """Epsilon charged at this site, over all studies, in the calendar period holding ``at``
        (now by default)."""
        start = period_start(period, at or dt.datetime.now(dt.UTC))
        with self._lock:
            return PureDP.from_units(self._units_since(self._db, start))

    def precheck_release(self, released: RecordSet, thresholds: SDCThresholds) -> None:
        """The differencing guard's check, before any work (the commit checks again).

        Raises:
            DisclosureError: in the guard's one message.
        """
        with self._lock:
            self.guard.check(released, thresholds)

    def ledger(self, study_id: str | None = None) -> list[LedgerRow]:
        """Ledger rows, oldest first (optionally for one study)."""
        with self._lock:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(ledger)")}
            # A file written before zCDP charges has no rho column (read-only opens do not
            # migrate): its charges spent no rho.
            rho = "rho_units" if "rho_units" in columns else "0"
            query = (
                "SELECT time, study_id, researcher, task_id, analysis, epsilon, request_id, "
                f"{rho} FROM ledger"
            )
            args: tuple[str, ...] = ()
            if study_id is not None:
                query += " WHERE study_id = ?"
                args = (study_id,)
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [
            LedgerRow(
                time=row[0],
                study_id=row[1],
                researcher=row[2],
                task_id=row[3],
                analysis=row[4],
                epsilon=row[5],
                request_id=row[6],
                rho=ZCDP.from_units(int(row[7])).rho,
            )
            for row in rows
        ]

    # ------------------------------------------------------------------ replies
    def stored_reply(self, task_id: str) -> bytes | None:
        """The serialised reply already given to ``task_id``, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT payload FROM replies WHERE task_id = ?", (task_id,)
            ).fetchone()
        return bytes(row[0]) if row else None

    def _charge(self, db: sqlite3.Connection, task: TaskMessage, charge: Charge) -> dict[str, int]:
        """Check ``charge`` at every level and write it (inside the reply's transaction);
        return the units written, which the reply's audit entry records."""
        if (charge.study_id, charge.request_id) != (task.study_id, task.request_id):
            raise InternalError(
                f"task {task.task_id} (study {task.study_id}, request {task.request_id}) "
                f"carries a charge to study {charge.study_id}, request {charge.request_id}"
            )
        self._check_charge(db, charge)
        units = {
            "units": charge.epsilon.charge_units(),
            "rho_units": charge.rho.charge_units() if charge.rho is not None else 0,
        }
        db.execute(
            "INSERT INTO ledger (time, study_id, researcher, task_id, analysis, epsilon, "
            "units, request_id, rho_units) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                now(),
                task.study_id,
                task.researcher,
                task.task_id,
                task.analysis,
                charge.epsilon.epsilon,
                units["units"],
                charge.request_id,
                units["rho_units"],
            ),
        )
        return units

    def commit_reply(
        self,
        task: TaskMessage,
        charge: Charge | None,
        payload: bytes | Callable[[AuditEntry], bytes],
        receipt: str,
        detail: dict[str, Any],
        released: RecordSet | None = None,
        thresholds: SDCThresholds | None = None,
        asked: tuple[bytes, str] = (b"", ""),
    ) -> bytes:
        """Charge, store and audit the reply to ``task`` in one transaction; return what may
        leave the site.

        The charge is written twice in the same transaction: as the ledger's row and inside the
        reply's audit entry (``charge``: nano-epsilon and nano-rho units), so a ledger row
        deleted later no longer matches the hash-chained log (:meth:`integrity_problems`).

        ``payload`` is the serialised reply, or a function of the reply's audit entry that
        returns it: the site signs its audit head after the reply (the receipt), which exists
        only once the entry is written. ``asked`` is the task as received (serialised, with the
        coordinator's signature) and the coordinator's public key, kept beside the reply as
        proof of what the site was asked.

        The budget is checked again inside the transaction with the same predicate as
        :meth:`precheck_charge`, so two tasks racing for the last of a study's budget cannot
        both be charged. A task id committed before gets its stored payload back, never the
        new one: one task id, one answer.

        An exact release's record set (``released``) is checked again by the differencing guard
        inside the transaction, so two racing releases cannot both pass it, and remembered in
        the same transaction as the reply.

        Raises:
            RefusedError: code ``budget`` when the charge no longer fits; nothing is written.
            DisclosureError: the guard refuses ``released`` now; nothing is written.
        """
        task_id, study_id = task.task_id, task.study_id
        try:
            with self._transaction() as db:
                row = db.execute(
                    "SELECT payload FROM replies WHERE task_id = ?", (task_id,)
                ).fetchone()
                if row is not None:
                    return bytes(row[0])
                if released is not None:
                    self.guard.check(released, thresholds or SDCThresholds())
                    self.guard.remember(db, released)
                units = None
                if charge is not None and (
                    charge.epsilon.epsilon > 0 or (charge.rho is not None and charge.rho.rho > 0)
                ):
                    units = self._charge(db, task, charge)
                entry = self._append_audit(db, "reply", {**detail, "charge": units})
                body = payload(entry) if callable(payload) else payload
                db.execute(
                    "INSERT INTO replies (task_id, time, study_id, payload, receipt, task, "
                    "coordinator_key) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (task_id, now(), study_id, body, receipt, asked[0], asked[1]),
                )
        except BaseException:
            if released is not None:
                self.guard.forget_cache(released.study_id)  # the file is the truth
            raise
        return body
