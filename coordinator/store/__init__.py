"""The coordinator's store: studies, requests, results, sites and the audit log.

Every write that matters is audited in the same transaction, so the audit log and the data it
describes cannot disagree after a crash. The head of the audit chain is kept in memory (the
coordinator is the store's one writer) and moves only when a transaction commits. A request is
written once, when it finishes: its row, its result and its two audit entries (submitted, with
the submission's time, and finished) in one transaction; a request still running lives in the
API's memory. On SQLite that transaction goes through a plain sqlite3 connection: SQLAlchemy
costs about ten times more per statement on this, the hot path of every request.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from coordinator.store import models
from protocol.audit import AuditEntry, VerifyReport, canonical_json, verify_chain
from protocol.errors import ConfigError
from protocol.signing import Receipt, fingerprint
from protocol.storage import connect_read_only

RECEIPT_COLUMNS = (
    "task_id",
    "request_id",
    "site",
    "request_digest",
    "reply_digest",
    "audit_seq",
    "audit_hash",
    "public_key",
    "signature",
    "received",
)


def receipt_digest(receipt: Receipt) -> str:
    """SHA-256 of a receipt's fields (what the coordinator's audit chain records of it)."""
    return hashlib.sha256(canonical_json(receipt.to_json()).encode()).hexdigest()


def _receipt(row: Any) -> Receipt:
    """A stored receipt row as a :class:`Receipt`."""
    return Receipt(
        site=row["site"],
        task_id=row["task_id"],
        request_digest=row["request_digest"],
        reply_digest=row["reply_digest"],
        audit_seq=int(row["audit_seq"]),
        audit_hash=row["audit_hash"],
        public_key=row["public_key"],
        signature=row["signature"],
    )


def _receipts_and_keys_in(
    entries: list[AuditEntry],
) -> tuple[dict[str, tuple[int, str]], dict[str, set[str]]]:
    """From the chain: each receipt's digest by task (with the entry listing it), and the
    signing keys each site presented."""
    listed: dict[str, tuple[int, str]] = {}
    keys: dict[str, set[str]] = {}
    for entry in entries:
        if entry.action not in ("request_finished", "site_key"):
            continue
        try:
            detail = json.loads(entry.detail)
        except ValueError:
            continue
        if not isinstance(detail, dict):
            continue
        if entry.action == "request_finished":
            receipts = detail.get("receipts") or {}
            if isinstance(receipts, dict):  # anything else was edited: the chain says where
                for task_id, digest in receipts.items():
                    listed[str(task_id)] = (entry.seq, str(digest))
        else:
            keys.setdefault(str(detail.get("site")), set()).add(str(detail.get("key")))
    return listed, keys


def now() -> str:
    """UTC time as ISO 8601 with microseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    """SQLAlchemy over SQLite or PostgreSQL; the same code for both."""

    def __init__(self, url: str, actor: str = "coordinator") -> None:
        try:
            self.engine: Engine = create_engine(url, future=True)
        except (SQLAlchemyError, ModuleNotFoundError, ValueError) as exc:
            raise ConfigError(f"store: {url!r} is not a usable database URL ({exc})") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.actor = actor
        self.read_only = False
        self._lock = threading.Lock()
        try:
            models.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"store: cannot open {self.engine.url!r}: {first}") from None
        self._guard_tables()
        self._head = self._last_entry()
        self._fast: sqlite3.Connection | None = None
        database = self.engine.url.database
        if self.dialect == "sqlite" and database and database != ":memory:":
            self._fast = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
            self._fast.execute("PRAGMA synchronous=NORMAL")

    def _guard_tables(self) -> None:
        """Refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL) on the tables written once:
        a mistaken or casual edit fails loudly. Anyone who can drop a trigger can still edit
        the file; the hash chain and the sites' receipts catch that (``alliance audit``)."""
        statements = []
        if self.dialect == "sqlite":
            for table in models.APPEND_ONLY:
                for verb in ("UPDATE", "DELETE"):
                    statements.append(
                        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{verb.lower()} BEFORE {verb} "
                        f"ON {table} BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                    )
        elif self.dialect == "postgresql":
            statements.append(
                "CREATE OR REPLACE FUNCTION alliance_append_only() RETURNS trigger "
                "LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION USING MESSAGE = TG_TABLE_NAME || ' is append-only'; END $$"
            )
            for table in models.APPEND_ONLY:
                statements.append(
                    f"CREATE OR REPLACE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE "
                    f"ON {table} FOR EACH ROW EXECUTE FUNCTION alliance_append_only()"
                )
                statements.append(
                    f"CREATE OR REPLACE TRIGGER {table}_no_truncate BEFORE TRUNCATE "
                    f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION alliance_append_only()"
                )
        try:
            with self.engine.begin() as conn:
                for statement in statements:
                    conn.exec_driver_sql(statement)
        except SQLAlchemyError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(
                f"store: cannot guard the audit tables of {self.engine.url!r}: {first}"
            ) from None

    @classmethod
    def open_read_only(cls, path: Path, actor: str = "coordinator") -> Store:
        """A coordinator's SQLite file opened read-only: nothing created, nothing written
        (``alliance audit verify`` and the demo's report read it this way)."""
        if not path.is_file():
            raise ConfigError(f"store: {path} does not exist")
        store = cls.__new__(cls)
        store.engine = create_engine(
            "sqlite://", creator=lambda: connect_read_only(path), poolclass=NullPool
        )
        store.actor = actor
        store.read_only = True
        store._lock = threading.Lock()
        store._fast = None
        store._head = None
        return store

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def close(self) -> None:
        """Release the connection pool."""
        if self._fast is not None:
            self._fast.close()
        self.engine.dispose()

    def _last_entry(self) -> AuditEntry | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(models.audit).order_by(models.audit.c.seq.desc()).limit(1)
            ).first()
        return AuditEntry(*row) if row else None

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One SQLAlchemy transaction; the chain head moves only if it commits."""
        with self._lock:
            head = self._head
            try:
                with self.engine.begin() as conn:
                    yield conn
            except BaseException:
                self._head = head
                raise

    # ------------------------------------------------------------------ audit
    def _next_entry(
        self, action: str, detail: dict[str, Any], actor: str | None, time: str | None = None
    ) -> AuditEntry:
        """The entry that follows the chain head (which then points at it)."""
        entry = AuditEntry.create(self._head, time or now(), actor or self.actor, action, detail)
        self._head = entry
        return entry

    def _append_audit(
        self, conn: Connection, action: str, detail: dict[str, Any], actor: str | None = None
    ) -> AuditEntry:
        entry = self._next_entry(action, detail, actor)
        conn.execute(
            insert(models.audit).values(
                seq=entry.seq,
                time=entry.time,
                actor=entry.actor,
                action=entry.action,
                detail=entry.detail,
                prev_hash=entry.prev_hash,
                hash=entry.hash,
            )
        )
        return entry

    def audit(self, action: str, detail: dict[str, Any], actor: str | None = None) -> AuditEntry:
        """Append one audit entry on its own."""
        with self._transaction() as conn:
            return self._append_audit(conn, action, detail, actor)

    def audit_entries(self) -> list[AuditEntry]:
        """The whole audit log, in order."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(models.audit).order_by(models.audit.c.seq)).all()
        return [AuditEntry(*row) for row in rows]

    def verify_audit(self) -> VerifyReport:
        """Verify the coordinator's audit chain."""
        return verify_chain(self.audit_entries())

    # ------------------------------------------------------------------ studies
    def create_study(self, study: dict[str, Any], actor: str, status: str = "active") -> None:
        """Store a new study (its id must be new) and its first version."""
        from protocol.errors import ValidationError

        with self._transaction() as conn:
            if conn.execute(
                select(models.studies.c.id).where(models.studies.c.id == study["id"])
            ).first():
                raise ValidationError(f"study {study['id']!r} exists already; choose another id")
            conn.execute(
                insert(models.studies).values(
                    id=study["id"],
                    title=study["title"],
                    purpose=study["purpose"],
                    config_json=json.dumps(study, default=str),
                    status=status,
                    created=now(),
                )
            )
            self._insert_version(conn, study, actor)
            self._append_audit(conn, "study_created", {"study": study, "status": status}, actor)

    def _insert_version(self, conn: Connection, study: dict[str, Any], actor: str) -> None:
        conn.execute(
            insert(models.study_versions).values(
                study_id=study["id"],
                version=int(study.get("version", 1)),
                config_json=json.dumps(study, default=str),
                created=now(),
                actor=actor,
            )
        )

    def amend_study(self, study: dict[str, Any], actor: str) -> None:
        """Keep a new version of a study (its ``version`` one more than the current's)."""
        with self._transaction() as conn:
            conn.execute(
                update(models.studies)
                .where(models.studies.c.id == study["id"])
                .values(
                    title=study["title"],
                    purpose=study["purpose"],
                    config_json=json.dumps(study, default=str),
                )
            )
            self._insert_version(conn, study, actor)
            self._append_audit(
                conn,
                "study_amended",
                {"study": study, "version": int(study.get("version", 1))},
                actor,
            )

    def study_versions(self, study_id: str) -> list[dict[str, Any]]:
        """Every version of a study, oldest first: version, config, created, actor."""
        table = models.study_versions
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(table).where(table.c.study_id == study_id).order_by(table.c.version)
                )
                .mappings()
                .all()
            )
        return [
            {
                "version": int(r["version"]),
                "config": json.loads(r["config_json"]),
                "created": r["created"],
                "actor": r["actor"],
            }
            for r in rows
        ]

    def set_study_status(
        self, study_id: str, status: str, actor: str, detail: dict[str, Any] | None = None
    ) -> None:
        """Change a study's state (audited as ``study_<status>``)."""
        with self._transaction() as conn:
            conn.execute(
                update(models.studies).where(models.studies.c.id == study_id).values(status=status)
            )
            self._append_audit(
                conn, f"study_{status}", {"study": study_id, **(detail or {})}, actor
            )

    def record_study_decision(self, row: dict[str, Any]) -> bool:
        """Keep a site's verified decision (once per signature, audited); whether it was new."""
        table = models.study_decisions
        with self._transaction() as conn:
            if conn.execute(
                select(table.c.signature).where(table.c.signature == row["signature"])
            ).first():
                return False
            conn.execute(insert(table).values(**row, received=now()))
            detail = {k: row[k] for k in ("site", "study_id", "version", "decision", "reason")}
            self._append_audit(
                conn, "study_decision", {**detail, "signature": row["signature"]}, row["site"]
            )
        return True

    def study_decisions(self, study_id: str) -> list[dict[str, Any]]:
        """Every decision the sites sent on a study, in the order they were made."""
        table = models.study_decisions
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(table)
                    .where(table.c.study_id == study_id)
                    .order_by(table.c.decided_at, table.c.received)
                )
                .mappings()
                .all()
            )
        return [{k: v for k, v in r.items() if k != "message"} for r in rows]

    # ------------------------------------------------------------------ scripts
    def submit_script(
        self,
        study_id: str,
        digest: str,
        name: str,
        version: str,
        module: str,
        manifest: str,
        actor: str,
    ) -> bool:
        """Keep a researcher's script for a study, by its hash (audited once).

        Returns:
            Whether it was new for the study.
        """
        table = models.scripts
        with self._transaction() as conn:
            found = conn.execute(
                select(table.c.hash).where(table.c.hash == digest, table.c.study_id == study_id)
            ).first()
            if found:
                return False
            conn.execute(
                insert(table).values(
                    hash=digest,
                    study_id=study_id,
                    name=name,
                    version=version,
                    module=module,
                    manifest=manifest,
                    submitted_by=actor,
                    submitted=now(),
                )
            )
            self._append_audit(
                conn,
                "script_submitted",
                {"study": study_id, "hash": digest, "name": name, "version": version},
                actor,
            )
        return True

    def offered_scripts(self, site: str) -> list[dict[str, Any]]:
        """The scripts of open studies that ``site`` takes part in (a study that names no
        sites takes every connected site), oldest first: what a site is offered on connecting."""
        studies = models.studies
        scripts = models.scripts
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(scripts, studies.c.config_json)
                    .join(studies, studies.c.id == scripts.c.study_id)
                    .where(studies.c.status.in_(("open", "proposed", "active")))
                    .order_by(scripts.c.submitted)
                )
                .mappings()
                .all()
            )
        out = []
        for row in rows:
            invited = json.loads(row["config_json"]).get("sites") or []
            if not invited or site in invited:
                out.append({k: row[k] for k in ("study_id", "hash", "module", "manifest")})
        return out

    def script(self, study_id: str, digest: str) -> dict[str, Any] | None:
        """A script submitted to a study, or None."""
        table = models.scripts
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(table).where(table.c.hash == digest, table.c.study_id == study_id)
                )
                .mappings()
                .first()
            )
        return None if row is None else dict(row)

    def study(self, study_id: str) -> dict[str, Any] | None:
        """A study with its status, or None."""
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(models.studies).where(models.studies.c.id == study_id))
                .mappings()
                .first()
            )
        if row is None:
            return None
        return {
            "config": json.loads(row["config_json"]),
            "status": _study_status(row["status"]),
            "created": row["created"],
        }

    def studies(self) -> list[dict[str, Any]]:
        """Every study: id, title, purpose, status, created."""
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(
                        models.studies.c.id,
                        models.studies.c.title,
                        models.studies.c.purpose,
                        models.studies.c.status,
                        models.studies.c.created,
                    ).order_by(models.studies.c.created)
                )
                .mappings()
                .all()
            )
        return [{**r, "status": _study_status(r["status"])} for r in rows]

    def close_study(self, study_id: str, actor: str) -> None:
        """Mark a study closed (no more requests)."""
        self.set_study_status(study_id, "closed", actor)

    # ------------------------------------------------------------------ requests and results
    def record_request(
        self,
        *,
        request_id: str,
        study_id: str,
        researcher: str,
        request: dict[str, Any],
        submitted: str,
        result: dict[str, Any] | None,
        error: str | None,
        receipts: Sequence[Receipt] = (),
    ) -> None:
        """Store a finished request, its result (or failure), the sites' signed receipts and
        both audit entries, in one transaction.

        The request's ``request_finished`` entry lists each receipt's digest by task, so a
        receipt row edited or deleted later no longer matches the hash chain.
        """
        status = "done" if error is None else "failed"
        finished = now()
        detail: dict[str, Any] = {"request": request_id, "status": status}
        if error:
            detail["error"] = error
        if result is not None:
            detail["sites"] = [(s["name"], s["status"], s["epsilon"]) for s in result["sites"]]
        if receipts:
            detail["receipts"] = {r.task_id: receipt_digest(r) for r in receipts}
        receipt_rows = [
            (
                r.task_id,
                request_id,
                r.site,
                r.request_digest,
                r.reply_digest,
                r.audit_seq,
                r.audit_hash,
                r.public_key,
                r.signature,
                finished,
            )
            for r in receipts
        ]
        request_row = (
            request_id,
            study_id,
            researcher,
            request["analysis"],
            json.dumps(request),
            status,
            error,
            submitted,
            finished,
        )
        result_row = (request_id, json.dumps(result), finished) if result is not None else None
        submitted_detail = {"request": request_id, "study": study_id, "body": request}
        with self._lock:
            head = self._head
            try:
                entries = [
                    self._next_entry("request_submitted", submitted_detail, researcher, submitted),
                    self._next_entry("request_finished", detail, None, finished),
                ]
                if self._fast is not None:
                    self._record_fast(request_row, result_row, entries, receipt_rows)
                else:
                    self._record_core(request_row, result_row, entries, receipt_rows)
            except BaseException:
                self._head = head
                raise

    def _record_fast(
        self,
        request_row: tuple[Any, ...],
        result_row: tuple[Any, ...] | None,
        entries: list[AuditEntry],
        receipt_rows: list[tuple[Any, ...]],
    ) -> None:
        assert self._fast is not None
        db = self._fast
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO alliance_requests (id, study_id, researcher, analysis, request_json, "
                "status, error, created, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                request_row,
            )
            if result_row is not None:
                db.execute(
                    "INSERT INTO alliance_results (request_id, result_json, created) "
                    "VALUES (?, ?, ?)",
                    result_row,
                )
            if receipt_rows:
                db.executemany(
                    f"INSERT INTO alliance_receipts ({', '.join(RECEIPT_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(RECEIPT_COLUMNS))})",
                    receipt_rows,
                )
            db.executemany(
                "INSERT INTO alliance_audit (seq, time, actor, action, detail, prev_hash, hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (e.seq, e.time, e.actor, e.action, e.detail, e.prev_hash, e.hash)
                    for e in entries
                ],
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _record_core(
        self,
        request_row: tuple[Any, ...],
        result_row: tuple[Any, ...] | None,
        entries: list[AuditEntry],
        receipt_rows: list[tuple[Any, ...]],
    ) -> None:
        names = ("id", "study_id", "researcher", "analysis", "request_json", "status", "error")
        with self.engine.begin() as conn:
            conn.execute(
                insert(models.requests).values(
                    **dict(zip(names, request_row, strict=False)),
                    created=request_row[7],
                    finished=request_row[8],
                )
            )
            if result_row is not None:
                conn.execute(
                    insert(models.results).values(
                        request_id=result_row[0], result_json=result_row[1], created=result_row[2]
                    )
                )
            if receipt_rows:
                conn.execute(
                    insert(models.receipts),
                    [dict(zip(RECEIPT_COLUMNS, row, strict=True)) for row in receipt_rows],
                )
            conn.execute(
                insert(models.audit),
                [
                    {
                        "seq": e.seq,
                        "time": e.time,
                        "actor": e.actor,
                        "action": e.action,
                        "detail": e.detail,
                        "prev_hash": e.prev_hash,
                        "hash": e.hash,
                    }
                    for e in entries
                ],
            )

    def request(self, request_id: str) -> dict[str, Any] | None:
        """A request with its status, error and result."""
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(models.requests).where(models.requests.c.id == request_id))
                .mappings()
                .first()
            )
            if row is None:
                return None
            res = conn.execute(
                select(models.results.c.result_json).where(
                    models.results.c.request_id == request_id
                )
            ).scalar()
        return {
            "request_id": row["id"],
            "study_id": row["study_id"],
            "researcher": row["researcher"],
            "analysis": row["analysis"],
            "request": json.loads(row["request_json"]),
            "status": row["status"],
            "error": row["error"],
            "created": row["created"],
            "finished": row["finished"],
            "result": json.loads(res) if res else None,
        }

    def study_requests(self, study_id: str) -> list[dict[str, Any]]:
        """Every request of a study, oldest first."""
        with self.engine.connect() as conn:
            ids = (
                conn.execute(
                    select(models.requests.c.id)
                    .where(models.requests.c.study_id == study_id)
                    .order_by(models.requests.c.created)
                )
                .scalars()
                .all()
            )
        return [r for r in (self.request(i) for i in ids) if r is not None]

    # ------------------------------------------------------------------ sites
    def site_seen(self, name: str, status: str, hello: dict[str, Any] | None = None) -> None:
        """Record a site's connection state (and its Hello when it connects)."""
        stamp = now()
        values: dict[str, Any] = {
            "status": status,
            "last_seen": stamp,
            "last_seen_unix": time.time(),
        }
        if hello:
            values.update(
                version=hello.get("version"), dictionary_digest=hello.get("dictionary_digest")
            )
        with self._transaction() as conn:
            exists = conn.execute(
                select(func.count()).select_from(models.sites).where(models.sites.c.name == name)
            ).scalar()
            if exists:
                conn.execute(
                    update(models.sites).where(models.sites.c.name == name).values(**values)
                )
            else:
                conn.execute(insert(models.sites).values(name=name, first_seen=stamp, **values))
            self._append_audit(conn, f"site_{status}", {"site": name, **(hello or {})})

    def register_site_key(self, site: str, public_key: str) -> bool:
        """Record the signing key a site presented in its Hello (audited when new).

        Returns:
            Whether this key was new for the site.
        """
        table = models.site_keys
        with self._transaction() as conn:
            known = (
                conn.execute(select(table.c.public_key).where(table.c.site == site)).scalars().all()
            )
            if public_key in known:
                return False
            conn.execute(insert(table).values(site=site, public_key=public_key, first_seen=now()))
            self._append_audit(
                conn, "site_key", {"site": site, "key": public_key, "earlier_keys": len(known)}
            )
        return True

    def receipts(self, site: str | None = None) -> list[Receipt]:
        """Stored receipts, oldest first (optionally one site's)."""
        table = models.receipts
        query = select(*[table.c[name] for name in RECEIPT_COLUMNS[:-1]]).order_by(
            table.c.received, table.c.task_id
        )
        if site is not None:
            query = query.where(table.c.site == site)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_receipt(row) for row in rows]

    def study_receipts(self, study_id: str) -> list[dict[str, Any]]:
        """Site, task, request, key and time of every receipt of a study's requests, oldest
        first."""
        receipts, requests = models.receipts, models.requests
        query = (
            select(
                receipts.c.site,
                receipts.c.task_id,
                receipts.c.request_id,
                receipts.c.public_key,
                receipts.c.received,
            )
            .join(requests, requests.c.id == receipts.c.request_id)
            .where(requests.c.study_id == study_id)
            .order_by(receipts.c.received, receipts.c.task_id)
        )
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings().all()]

    def study_receipt_list(self, study_id: str, site: str) -> list[Receipt]:
        """One site's receipts for a study's requests."""
        receipts, requests = models.receipts, models.requests
        query = (
            select(*[receipts.c[name] for name in RECEIPT_COLUMNS[:-1]])
            .join(requests, requests.c.id == receipts.c.request_id)
            .where(requests.c.study_id == study_id, receipts.c.site == site)
            .order_by(receipts.c.received, receipts.c.task_id)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_receipt(row) for row in rows]

    def site_keys(self, site: str) -> set[str]:
        """Every signing key a site has presented."""
        table = models.site_keys
        with self.engine.connect() as conn:
            keys = conn.execute(select(table.c.public_key).where(table.c.site == site))
            return {str(key) for key in keys.scalars()}

    def integrity_problems(self) -> list[str]:
        """Everything ``alliance audit verify`` checks in the coordinator's store, one line per
        finding: the hash chain (first bad entry), and every stored receipt against the chain
        (listed by digest in its request's entry), its signature, and the keys the site
        presented."""
        entries = self.audit_entries()
        report = verify_chain(entries)
        problems = [] if report.ok else [f"audit log: {report.problem}"]
        listed, keys = _receipts_and_keys_in(entries)
        stored = self.receipts()
        for receipt in stored:
            what = f"receipt for task {receipt.task_id} (site {receipt.site})"
            if not receipt.valid():
                problems.append(f"{what}: its signature does not verify")
            if receipt.public_key not in keys.get(receipt.site, set()):
                problems.append(
                    f"{what}: signed by key {fingerprint(receipt.public_key)}, which the site "
                    "never presented"
                )
            logged = listed.get(receipt.task_id)
            if logged is None:
                problems.append(f"{what}: no audit entry lists it (a row was inserted)")
            elif logged[1] != receipt_digest(receipt):
                problems.append(
                    f"{what}: it differs from the digest audit entry {logged[0]} lists "
                    "(the row was changed)"
                )
        for task_id in listed.keys() - {r.task_id for r in stored}:
            problems.append(
                f"receipt for task {task_id} (listed in audit entry {listed[task_id][0]}) is "
                "missing: a row was deleted"
            )
        return problems

    def sites(self) -> list[dict[str, Any]]:
        """Every site ever seen, with its last state."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(models.sites).order_by(models.sites.c.name)).mappings().all()
        return [dict(r) for r in rows]


def _study_status(stored: str) -> str:
    """A study's state as stored; "open", written before the study lifecycle, is active."""
    return "active" if stored == "open" else stored
