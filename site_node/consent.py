"""Consent by purpose: which of a site's records a study may use, decided before any computation.

A site names a consent source (``consent:`` in ``site.yaml``): a CSV file, a SQL table, or FHIR R4
``Consent`` resources exported as NDJSON. Each statement says: patient id, purpose code, granted
or withdrawn, and a date. For each (patient, purpose) the latest-dated statement wins; on equal
dates a withdrawal wins. The site's policy gives each purpose a rule:

* ``opt-in``: a record is used only with a grant for the purpose;
* ``opt-out``: a record is used unless it has a withdrawal for the purpose.

A purpose without a rule is refused while a consent source is configured (default deny). The
source is read again whenever it changes (a file's size or modification time; a SQL table at
every task), so a withdrawal takes effect for the next task without a restart. How many
records were excluded goes only to the site's audit log.

FHIR mapping: ``patient.reference`` ``Patient/<id>``; the purpose from
``provision.purpose[].code`` (every code listed), else ``category[].coding[].code``; the date from
``dateTime`` (else ``date``). ``status: active`` with ``provision.type: permit`` is a grant, with
``deny`` a withdrawal; ``inactive`` and ``rejected`` are withdrawals; ``entered-in-error``,
``draft`` and ``proposed`` are ignored.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.config import ConsentSource
from protocol.errors import ConfigError, RefusedError

GRANTED = {"granted", "grant", "permit", "yes", "1"}
WITHDRAWN = {"withdrawn", "withdraw", "deny", "denied", "no", "0", "revoked"}
FHIR_WITHDRAWN_STATUS = {"inactive", "rejected"}
FHIR_IGNORED_STATUS = {"entered-in-error", "draft", "proposed"}


class ConsentSourceError(ConfigError):
    """The consent source cannot be read or holds a bad statement, found while serving a task.

    ``str(exc)`` is the full detail (file, line, value) for the site's own log and ``alliance
    site check``; ``public`` is what a refusal and the audit log carry. A malformed line may hold
    a patient id in any field, so no part of it leaves the site's log.
    """

    public = (
        "this site cannot apply its consent source (it cannot be read or holds a malformed "
        "statement), so it answers no task until its admin fixes it; the details are in the "
        "site's log and in `alliance site check`"
    )


@dataclass(frozen=True)
class Statement:
    """One consent statement."""

    patient: str
    purpose: str
    granted: bool
    date: dt.date


def _date(text: Any, where: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(text)[:10])
    except ValueError:
        raise ConfigError(f"{where}: date {text!r} is not an ISO date (YYYY-MM-DD)") from None


def _granted(text: Any, where: str) -> bool:
    value = str(text).strip().lower()
    if value in GRANTED:
        return True
    if value in WITHDRAWN:
        return False
    raise ConfigError(f"{where}: status {text!r} is not allowed; use granted or withdrawn")


def read_csv(source: ConsentSource) -> list[Statement]:
    """Statements from a CSV with a header row (column names in ``source.columns``)."""
    assert source.path is not None
    names = source.columns
    out = []
    try:
        with source.path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [
                c
                for c in (names.patient, names.purpose, names.status, names.date)
                if c not in (reader.fieldnames or [])
            ]
            if missing:
                raise ConfigError(
                    f"{source.path}: consent columns {missing} are missing; the header has "
                    f"{reader.fieldnames}"
                )
            for line, row in enumerate(reader, start=2):
                where = f"{source.path}, line {line}"
                out.append(
                    Statement(
                        str(row[names.patient]).strip(),
                        str(row[names.purpose]).strip(),
                        _granted(row[names.status], where),
                        _date(row[names.date], where),
                    )
                )
    except FileNotFoundError:
        raise ConfigError(f"{source.path}: consent file not found") from None
    return out


def read_sql(source: ConsentSource) -> list[Statement]:
    """Statements from a SQL table, through a read-only query."""
    import sqlalchemy as sa

    assert source.url is not None
    names = source.columns
    engine = sa.create_engine(source.url)
    table = sa.table(
        source.table,
        sa.column(names.patient),
        sa.column(names.purpose),
        sa.column(names.status),
        sa.column(names.date),
    )
    query = sa.select(*table.columns)
    try:
        with engine.connect() as connection:
            rows = connection.execute(query).fetchall()
    except sa.exc.SQLAlchemyError as exc:
        raise ConfigError(
            f"consent table {source.table!r} at {engine.url.render_as_string()}: cannot be "
            f"read ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
    finally:
        engine.dispose()
    where = f"consent table {source.table!r}"
    return [
        Statement(str(p).strip(), str(u).strip(), _granted(s, where), _date(d, where))
        for p, u, s, d in rows
    ]


def _fhir_statements(resource: dict[str, Any], where: str) -> list[Statement]:
    if resource.get("resourceType") != "Consent":
        raise ConfigError(f"{where}: resourceType {resource.get('resourceType')!r} is not Consent")
    status = str(resource.get("status", ""))
    if status in FHIR_IGNORED_STATUS:
        return []
    reference = str((resource.get("patient") or {}).get("reference", ""))
    if not reference.startswith("Patient/"):
        raise ConfigError(f"{where}: patient.reference {reference!r} is not 'Patient/<id>'")
    provision = resource.get("provision") or {}
    if status == "active":
        kind = provision.get("type", "permit")
        if kind not in ("permit", "deny"):
            raise ConfigError(f"{where}: provision.type {kind!r}; use permit or deny")
        granted = kind == "permit"
    elif status in FHIR_WITHDRAWN_STATUS:
        granted = False
    else:
        raise ConfigError(f"{where}: status {status!r} is not a FHIR Consent status")
    purposes = [str(c.get("code")) for c in provision.get("purpose") or [] if c.get("code")]
    if not purposes:
        purposes = [
            str(c.get("code"))
            for category in resource.get("category") or []
            for c in category.get("coding") or []
            if c.get("code")
        ]
    if not purposes:
        raise ConfigError(f"{where}: no purpose (provision.purpose[].code or category coding)")
    when = _date(resource.get("dateTime") or resource.get("date"), where)
    patient = reference.split("/", 1)[1]
    return [Statement(patient, purpose, granted, when) for purpose in purposes]


def read_fhir(source: ConsentSource) -> list[Statement]:
    """Statements from FHIR R4 Consent resources, one JSON object per line."""
    assert source.path is not None
    out: list[Statement] = []
    try:
        lines = source.path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{source.path}: consent file not found") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source.path}, line {number}"
        try:
            resource = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc.msg})") from None
        out += _fhir_statements(resource, where)
    return out


READERS = {"csv": read_csv, "sql": read_sql, "fhir": read_fhir}


def latest(statements: list[Statement]) -> dict[tuple[str, str], bool]:
    """(patient, purpose) -> granted, by the latest statement (a withdrawal wins a tie)."""
    best: dict[tuple[str, str], tuple[dt.date, bool]] = {}
    for s in statements:
        key = (s.patient, s.purpose)
        found = best.get(key)
        if found is None or (s.date, not s.granted) > (found[0], not found[1]):
            best[key] = (s.date, s.granted)
    return {key: granted for key, (_, granted) in best.items()}


@dataclass(frozen=True)
class ConsentView:
    """The records one purpose may use, at one version of the consent source."""

    version: str
    mask: npt.NDArray[np.bool_] | None  # None: every record
    excluded: int


class Consent:
    """A site's consent source and rules, applied to its records' patient ids."""

    def __init__(
        self,
        source: ConsentSource | None,
        rules: dict[str, str],
        patient_ids: npt.NDArray[np.str_] | None,
    ) -> None:
        if source is not None and patient_ids is None:
            raise ConfigError(
                "a consent source is configured but the data dictionary declares no "
                "patient_id column to match it with; add patient_id: <column> to the dictionary"
            )
        self.source = source
        self.rules = dict(rules)
        self.patient_ids = patient_ids
        self._lock = threading.Lock()
        self._stamp: Any = None
        self._decisions: dict[tuple[str, str], bool] = {}
        self._digest = "none"
        self._views: dict[str, ConsentView] = {}

    def _stamp_now(self) -> Any:
        assert self.source is not None
        if self.source.kind == "sql":
            return None  # re-read at every task
        try:
            stat = Path(self.source.path or "").stat()
        except FileNotFoundError:
            raise ConfigError(f"{self.source.path}: consent file not found") from None
        return (stat.st_mtime_ns, stat.st_size)

    def _refresh(self) -> None:
        assert self.source is not None
        stamp = self._stamp_now()
        if stamp is not None and stamp == self._stamp:
            return
        statements = READERS[self.source.kind](self.source)
        decisions = latest(statements)
        digest = hashlib.sha256(repr(sorted(decisions.items())).encode()).hexdigest()[:16]
        if digest != self._digest:
            self._views.clear()
        self._stamp, self._decisions, self._digest = stamp, decisions, digest

    def view(self, purpose: str) -> ConsentView:
        """The records ``purpose`` may use now.

        Raises:
            RefusedError: code ``policy``, for a purpose without a rule.
            ConsentSourceError: the source cannot be read or holds a bad statement.
        """
        if self.source is None:
            return ConsentView("none", None, 0)
        rule = self.rules.get(purpose)
        if rule is None:
            ruled = ", ".join(sorted(self.rules)) or "none"
            raise RefusedError(
                f"this site has no consent rule for purpose {purpose!r} (rules: {ruled}); "
                "the site admin must add one to policy.consent (opt-in or opt-out)",
                code="policy",
            )
        with self._lock:
            try:
                self._refresh()
            except ConfigError as exc:
                raise ConsentSourceError(str(exc)) from None
            found = self._views.get(purpose)
            if found is not None:
                return found
            assert self.patient_ids is not None
            decisions = self._decisions
            if rule == "opt-in":
                keep = [decisions.get((p, purpose)) is True for p in self.patient_ids]
            else:
                keep = [decisions.get((p, purpose)) is not False for p in self.patient_ids]
            mask = np.asarray(keep, dtype=bool)
            view = ConsentView(
                f"{self._digest}:{purpose}", mask, int(mask.size - np.count_nonzero(mask))
            )
            self._views[purpose] = view
            return view
