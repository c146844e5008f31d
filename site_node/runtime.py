"""The trust boundary: turn one task into one reply or one typed refusal.

Order of work: a repeated task id gets its stored reply; then policy (default deny), parameter,
filter and round-state validation, the budget pre-check, the analysis's site half, the privacy
engine, and finally one transaction that charges the ledger, stores the reply and audits it.
Only a reply that transaction committed leaves the site. Deliveries of one task id are handled
one at a time, so a second delivery, however close, gets the first one's stored reply.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd

from analyses import AnalysisContext, get_analysis
from analyses.base import DUPLICATE_ID, Analysis, WorkCache
from analyses.pushdown import MAX_COLUMNS
from analyses.sandbox import SandboxLimits, ScriptStopped
from analyses.scripts import ScriptBundle
from analyses.training.app import TrainingApp, reviewed_bundle
from protocol.audit import AuditEntry
from protocol.budget import ZCDP, PureDP
from protocol.config import DataDictionary, SiteConfig, SiteMapping, StudyApproval, load_yaml
from protocol.errors import (
    AllianceError,
    ConfigError,
    InternalError,
    RefusedError,
    ValidationError,
)
from protocol.filters import RowFilter, parse_filter
from protocol.signing import (
    Receipt,
    SigningKey,
    message_signature_valid,
    reply_digest,
    task_digest,
    task_signature_valid,
)
from protocol.version import VERSION
from protocol.wire import alliance_pb2 as pb
from protocol.wire.messages import RefusalMessage, ReplyMessage, TaskMessage
from site_node.connectors import load
from site_node.consent import Consent, ConsentSourceError, ConsentView
from site_node.disclosure import RecordSet, check_dominance
from site_node.harmonize import (
    SOURCE_MISSING,
    DataReport,
    conform,
    patient_ids,
    usable_share,
)
from site_node.ledger import Charge, SiteStore
from site_node.mapping import apply_mapping, columns_needed
from site_node.policy import TaskScope, canonical_filter, check_approval_terms, check_task
from site_node.privacy import privatize
from site_node.pushdown import PushdownSource, why_not_pushdown
from site_node.studies import StudyGate

#: Filtered frames kept for the later rounds of iterative analyses.
FILTER_CACHE_SIZE = 8
#: Scripts a site keeps awaiting review at most (offers beyond it are dropped and logged).
MAX_PENDING_SCRIPTS = 200
#: Parsed parameters kept (by analysis and parameter text).
PARAMS_CACHE_SIZE = 64
#: Sites with at most this many records answer on the link's thread (a task takes about a
#: millisecond, less than a thread hop costs); larger ones answer in a worker thread.
INLINE_ROWS = 200_000
log = logging.getLogger("alliance.site")


@dataclass
class Outcome:
    """What ``handle`` produced, for logging and tests."""

    message: pb.SiteMessage
    status: str  # reply, replayed or refused
    reason: str = ""


def _refusal(task_id: str, code: str, reason: str) -> pb.SiteMessage:
    return RefusalMessage(task_id, code, reason).to_proto()


SIGNING_KEY_FILE = "signing_key.pem"


def _task_detail(task: pb.Task | TaskMessage) -> dict[str, Any]:
    """What every audit entry about a task names."""
    return {
        "task": task.task_id,
        "study": task.study_id,
        "analysis": task.analysis,
        "researcher": task.researcher,
    }


@dataclass
class _Records:
    """A site's records in memory, with what is derived from them."""

    data: pd.DataFrame
    source: pd.DataFrame
    report: DataReport
    duplicate_patients: bool
    consent: Consent

    @classmethod
    def build(
        cls,
        config: SiteConfig,
        data: pd.DataFrame,
        report: DataReport | None,
        ids: npt.NDArray[np.str_] | None,
    ) -> _Records:
        report = report or DataReport(rows=len(data))
        source = _source_states(data, report, ids)
        data, ids, kept = _one_row_per_patient(data, ids, config.data.duplicate_patients)
        return cls(
            data=data,
            # Each row's state at the source (missing, not allowed, a duplicated id), aligned
            # with data: only the quality analysis reads it.
            source=source if kept is None else source.loc[kept].reset_index(drop=True),
            report=report,
            # Several rows for one patient (rule "refuse"): dp, which assumes one, is refused.
            duplicate_patients=ids is not None and bool(pd.Series(ids).duplicated().any()),
            consent=Consent(config.consent, dict(config.policy.consent), ids),
        )


def read_records(
    config: SiteConfig, dictionary: DataDictionary
) -> tuple[pd.DataFrame, DataReport, npt.NDArray[np.str_] | None]:
    """Read the site's dictionary columns (mapped, conformed) and its patient ids."""
    mapping = load_yaml(config.data.mapping, SiteMapping) if config.data.mapping else None
    raw = load(config.data, columns_needed(config.data, dictionary, mapping))
    if mapping is not None:
        raw, _ = apply_mapping(raw, mapping, dictionary)
    data, report = conform(raw, dictionary, config.data.rename, config.data.derive)
    return data, report, patient_ids(raw, dictionary, config.data.rename)


class SiteRuntime:
    """A site's data, policy, privacy engine and store, without the network.

    The records are in memory (``data``), or, for a pushdown site, stay in the source
    (``pushdown``) and are read into memory only when a task cannot be computed there.
    """

    def __init__(
        self,
        config: SiteConfig,
        dictionary: DataDictionary,
        data: pd.DataFrame | None = None,
        report: DataReport | None = None,
        patient_ids: npt.NDArray[np.str_] | None = None,
        pushdown: PushdownSource | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.dictionary = dictionary
        self.pushdown = pushdown
        self._records: _Records | None = None
        self._records_lock = threading.Lock()
        if data is not None:
            self._records = _Records.build(config, data, report, patient_ids)
        elif pushdown is None:
            raise InternalError("a site runtime needs its records or a pushdown source")
        # A pushdown site has no consent source (why_not_pushdown): every record is usable.
        self._all_consent = Consent(None, dict(config.policy.consent), None)
        self._consent_audited: set[str] = set()
        for approval in config.policy.studies:
            check_approval_terms(approval, dictionary, f"{config.name}: policy")
        self.store = SiteStore(config.state_dir / "site.db", actor=config.name)
        # The site's own key: it signs every reply's receipt and never leaves the state folder.
        self.signing_key = SigningKey.load_or_create(config.state_dir / SIGNING_KEY_FILE)
        # The admin's decisions on studies, consulted at every task (so a decision made with
        # `alliance site approve | refuse` holds without a restart).
        self.studies = StudyGate(
            self.store, self.name, self.signing_key, list(config.policy.studies)
        )
        # The coordinator's public key, from its Welcome: every task must carry its signature.
        # Empty until a coordinator has welcomed this site (tasks handed in directly, in
        # process, are not signed).
        self.coordinator_key = ""
        self._digest = dictionary.digest()
        self._filter_cache: OrderedDict[str, pd.DataFrame] = OrderedDict()
        self._params_cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._row_sets: OrderedDict[tuple[str, str, tuple[str, ...]], RecordSet] = OrderedDict()
        self._consented: OrderedDict[str, pd.DataFrame] = OrderedDict()
        self._usable: dict[str, float] = {}
        # Dictionary variables this site's data does not hold: tasks reading them are refused.
        self.unmapped = (
            frozenset(self._records.report.missing_columns)
            if self._records is not None
            else pushdown.unmapped  # type: ignore[union-attr]
        )
        # The site's work cache: what an analysis keeps between rounds (a GLM's design),
        # scoped by frame ("" is the unfiltered data; a filter's text its rows).
        self.work = WorkCache()
        self._task_locks: dict[str, tuple[threading.Lock, int]] = {}
        self._task_locks_guard = threading.Lock()

    # ------------------------------------------------------------------ records
    def _in_memory(self) -> _Records:
        """The records in memory, read from the source on first need (a pushdown site)."""
        with self._records_lock:
            if self._records is None:
                started = time.perf_counter()
                data, report, ids = read_records(self.config, self.dictionary)
                self._records = _Records.build(self.config, data, report, ids)
                log.info(
                    "read the dictionary's columns into memory for what pushdown cannot "
                    "compute (%.1f s)",
                    time.perf_counter() - started,
                )
            return self._records

    @property
    def data(self) -> pd.DataFrame:
        """The site's conformed records (read now, for a pushdown site that has not yet)."""
        return self._in_memory().data

    @property
    def source(self) -> pd.DataFrame:
        """Each record's state at the source, aligned with ``data``."""
        return self._in_memory().source

    @property
    def report(self) -> DataReport:
        """The data check of the records in memory; a pushdown site's row count and the
        variables it does not hold, until it reads them."""
        if self._records is None and self.pushdown is not None:
            return DataReport(
                rows=self.pushdown.rows, missing_columns=sorted(self.pushdown.unmapped)
            )
        return self._in_memory().report

    @property
    def consent(self) -> Consent:
        """The consent source and rules applied to the records."""
        return self._all_consent if self._records is None else self._records.consent

    @property
    def duplicate_patients(self) -> bool:
        """Several rows share a patient id (rule refuse): dp is refused."""
        if self._records is None and self.pushdown is not None:
            return self.pushdown.duplicate_patients
        return self._in_memory().duplicate_patients

    @property
    def answers_inline(self) -> bool:
        """Tasks are fast enough to answer on the link's own thread (small data in memory)."""
        return self.pushdown is None and len(self.data) <= INLINE_ROWS

    @classmethod
    def from_config(cls, config: SiteConfig, record_start: bool = True) -> SiteRuntime:
        """Load the dictionary and the data, and check the data against the dictionary.

        With ``data.pushdown`` the records stay in the source when the configuration allows
        (``site_node.pushdown``); otherwise the site says why and reads them now.
        ``record_start`` audits the start; ``alliance site check`` passes False, because a
        check changes nothing, the audit log included.
        """
        dictionary = load_yaml(config.dictionary, DataDictionary)
        runtime: SiteRuntime | None = None
        if config.data.pushdown:
            reason = why_not_pushdown(config)
            if reason is None:
                source = PushdownSource.open(config, dictionary)
                if source.duplicate_patients and config.data.duplicate_patients != "refuse":
                    source.close()
                    reason = (
                        f"several rows share a patient id and data.duplicate_patients is "
                        f"{config.data.duplicate_patients!r}, which keeps one row per patient "
                        "in memory"
                    )
                else:
                    runtime = cls(config, dictionary, pushdown=source)
                    log.info(
                        "data.pushdown: aggregates are computed in %s (%d of %d dictionary "
                        "variables can be)",
                        source.describe,
                        len(source.pushable),
                        len(dictionary.variables),
                    )
            if reason is not None:
                log.warning("data.pushdown: this site reads its records into memory: %s", reason)
        if runtime is None:
            data, report, ids = read_records(config, dictionary)
            runtime = cls(config, dictionary, data, report, ids)
        if record_start:
            problems = runtime.store.chain_and_ledger_problems()
            if problems:  # a deleted charge gives back spent budget: fail closed
                runtime.close()
                raise ConfigError(
                    f"{config.state_dir / 'site.db'}: this site's audit log or ledger was "
                    "altered, so it will not answer tasks until the file is restored from a "
                    "backup (`alliance audit verify` lists every finding):\n  "
                    + "\n  ".join(problems)
                )
            runtime.store.audit(
                "site_started",
                # No record count: audit logs may be shown to other parties (cross-checks).
                {
                    "version": VERSION,
                    "dictionary": runtime._digest,
                    "signing_key": runtime.signing_key.public_hex,
                },
            )
            for study_id in runtime.studies.adopt_site_yaml():
                log.info("recorded site.yaml's approval of study %s", study_id)
        return runtime

    def close(self) -> None:
        """Close the site's SQLite file (and its pushdown source)."""
        self.store.close()
        if self.pushdown is not None:
            self.pushdown.close()

    def hello(self) -> pb.Hello:
        """The first message on the site link."""
        return pb.Hello(
            site_id=self.name,
            software_version=VERSION,
            allowed_analyses=list(self.config.policy.allowed_analyses),
            dictionary_digest=self._digest,
            signing_key=self.signing_key.public_hex,
            decisions=self.studies.latest(),
        )

    def receive_notice(self, notice: pb.StudyNotice) -> None:
        """Keep a study notice the coordinator signed (a version, a state); one that is
        unsigned, forged or malformed is logged and dropped."""
        if not message_signature_valid(notice, self.coordinator_key):
            log.warning(
                "dropped a notice of study %s: it does not carry the coordinator's signature",
                notice.study_id[:64],
            )
            return
        problem = self.studies.receive_notice(notice)
        if problem is not None:
            log.warning("dropped a notice of study %s: %s", notice.study_id[:64], problem)
        else:
            log.info(
                "study %s is %s at version %d (the coordinator's notice); review it with "
                "`alliance site review %s`",
                notice.study_id,
                notice.state,
                notice.version,
                notice.study_id,
            )

    def audit_answer(self, query: pb.AuditQuery) -> pb.SiteMessage:
        """This site's audit head and its reply entries of one study, for the coordinator's
        online cross-check (ids, digests and actions only; audited as shown)."""
        try:
            entries = self.store.audit_entries()
            replies = []
            for entry in entries:
                if entry.action != "reply":
                    continue
                detail = json.loads(entry.detail)
                if isinstance(detail, dict) and detail.get("study") == query.study_id:
                    replies.append(
                        pb.AuditEntryRecord(
                            seq=entry.seq,
                            hash=entry.hash,
                            action=entry.action,
                            task_id=str(detail.get("task", "")),
                        )
                    )
            head = entries[-1] if entries else None
            answer = pb.AuditAnswer(
                query_id=query.query_id,
                head_seq=head.seq if head else 0,
                head_hash=head.hash if head else "",
                replies=replies,
            )
            self.store.audit("audit_shown", {"study": query.study_id, "replies": len(replies)})
        except Exception as exc:  # the query must get an answer; the log says why
            log.exception("could not answer the coordinator's audit query")
            answer = pb.AuditAnswer(query_id=query.query_id, error=type(exc).__name__)
        return pb.SiteMessage(audit_answer=answer)

    # ------------------------------------------------------------------ tasks
    @contextmanager
    def _one_delivery_at_a_time(self, task_id: str) -> Iterator[None]:
        """Serialise deliveries of one task id (answering threads may run several tasks)."""
        with self._task_locks_guard:
            lock, users = self._task_locks.get(task_id, (threading.Lock(), 0))
            self._task_locks[task_id] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._task_locks_guard:
                lock, users = self._task_locks[task_id]
                if users == 1:
                    del self._task_locks[task_id]
                else:
                    self._task_locks[task_id] = (lock, users - 1)

    def handle(self, task: pb.Task) -> Outcome:
        """Answer one task with a reply or a typed refusal; never raise."""
        with self._one_delivery_at_a_time(task.task_id):
            return self._handle(task)

    @staticmethod
    def _replayed(payload: bytes) -> Outcome:
        message = pb.SiteMessage.FromString(payload)
        message.reply.replayed = True
        return Outcome(message, "replayed")

    def _handle(self, task: pb.Task) -> Outcome:
        stored = self.store.stored_reply(task.task_id)
        if stored is not None:
            return self._replayed(stored)
        try:
            return self._run(task)
        except ScriptStopped as exc:  # what the script printed or raised: the site log only
            log.warning(
                "task %s: the sandbox stopped the script (%s): %s",
                task.task_id,
                exc.category,
                exc.detail.strip()[-500:],
            )
            reason, code = exc.reason, exc.code
        except RefusedError as exc:
            reason, code = exc.reason, exc.code
        except ConsentSourceError as exc:  # its detail may hold patient ids: the log only
            log.error("task %s refused: the consent source: %s", task.task_id, exc)
            reason, code = exc.public, "error"
        except ValidationError as exc:
            reason, code = str(exc), "validation"
        except AllianceError as exc:
            reason, code = str(exc), "error"
        except Exception as exc:  # a bug must not take the site down or leak a traceback
            log.exception("task %s failed", task.task_id)
            reason = f"internal error at {self.name}: {type(exc).__name__}; this is probably a bug"
            code = "error"
        try:
            self.store.audit("refused", {**_task_detail(task), "code": code, "reason": reason})
        except Exception:  # nothing was released; the refusal itself must still go out
            log.exception("could not audit the refusal of task %s", task.task_id)
        return Outcome(_refusal(task.task_id, code, reason), "refused", reason)

    def _run(self, wire: pb.Task) -> Outcome:
        if self.coordinator_key and not task_signature_valid(wire, self.coordinator_key):
            why = (
                "has a signature that does not verify under the coordinator's key (the one "
                "its Welcome named)"
                if wire.signature
                else "carries no signature from the coordinator"
            )
            raise RefusedError(
                f"refused by {self.name}: task {wire.task_id} {why}; this site answers only "
                "tasks its coordinator signed",
                code="signature",
            )
        task = TaskMessage.from_proto(wire)
        analysis = get_analysis(task.analysis)
        params = self._params(analysis, wire.params_json, task)
        row_filter = (
            parse_filter(task.filter, set(self.dictionary.variables)) if task.filter else None
        )
        scope = TaskScope(
            task.analysis,
            frozenset(analysis.variables(params)),
            frozenset(analysis.coarsened_variables(params)),
            row_filter,
            analysis.model_key(params),
        )
        in_force = self.studies.approval(task.study_id, task.study_version)
        policy = self.config.policy.model_copy(update={"studies": [in_force]})
        approval, mode = check_task(
            policy, self.name, task.study_id, scope, task.privacy_mode, self.dictionary
        )
        reviewed = analysis.reviewed_code(params)
        if reviewed is not None:
            self._check_reviewed(reviewed)
        if mode == "dp" and self.duplicate_patients:
            raise RefusedError(
                "this site's data holds several rows for some patient ids, and dp assumes one "
                "row per patient; the site admin must set data.duplicate_patients to first or "
                "last (keep one row per patient), or the study must use sdc",
                code="policy",
            )
        absent = sorted((scope.variables | scope.filter_variables) & self.unmapped)
        if absent and not analysis.reads_source:  # a profile shows them all missing
            raise RefusedError(
                f"this site cannot serve {', '.join(map(repr, absent))}: its data has no column "
                "for it and its mapping file maps none (the site admin can add one to the "
                "file named by data.mapping)",
                code="mapping",
            )
        if not analysis.reads_source:  # the quality profile is how a study measures it
            self._check_quality(
                task.study_id,
                scope.variables | scope.filter_variables,
                task.min_quality,
                approval.min_quality,
            )
        consent = self.consent.view(approval.purpose)
        self._audit_consent(approval.purpose, consent)
        charge = self._charge(task, analysis, params, approval, mode)
        if charge is not None:
            self.store.precheck_charge(charge)
        epsilon = charge.epsilon.epsilon if charge is not None else 0.0
        base = AnalysisContext(self.dictionary, mode, self.config.policy.sdc, task.round)
        state = analysis.parse_state(task.state, params, base)
        frame_key = f"{consent.version}|{row_filter.text if row_filter else ''}"
        cache = self.work.scope(frame_key)
        ctx = AnalysisContext(
            self.dictionary,
            mode,
            self.config.policy.sdc,
            task.round,
            state,
            cache=cache,
            sandbox=SandboxLimits(**self.config.policy.scripts.model_dump()),
            site=self.name,
        )
        spec = analysis.declare(params, ctx)
        released: RecordSet | None = None
        arrays = self._pushed_down(analysis, params, ctx, scope, row_filter)
        if arrays is None:
            arrays, released = self._computed_in_memory(
                task.study_id, analysis, params, ctx, scope, (consent, row_filter, frame_key)
            )
        rho = charge.rho.rho if charge is not None and charge.rho is not None else 0.0
        record = privatize(spec, arrays, mode, epsilon, self.config.policy.sdc, rho)
        if charge is not None and record.epsilon > epsilon:
            raise InternalError(
                f"the release spent epsilon {record.epsilon!r}, above the task's {epsilon!r}"
            )
        spent_rho = sum(rel.rho for rel in record.releases.values())
        if spent_rho > rho * (1 + 1e-12):
            raise InternalError(f"the release spent rho {spent_rho!r}, above the task's {rho!r}")
        records_used = analysis.site_records(record)
        message = ReplyMessage(
            task_id=task.task_id,
            record=record,
            privacy_mode=mode,
            epsilon_spent=epsilon,
            records_used=None if mode == "dp" or records_used is None else int(records_used),
            rho_spent=rho,
        ).to_proto()
        # The reply digest covers the task id and the record exactly as serialised here.
        digest = reply_digest(task.task_id, message.reply.record)
        message.reply.receipt = digest
        asked = task_digest(wire)
        message.reply.request_digest = asked
        detail = {
            **_task_detail(task),
            "request": task.request_id,
            "mode": mode,
            "epsilon": message.reply.epsilon_spent,
            **({"rho": rho} if rho else {}),
            "receipt": digest,
            "request_digest": asked,
            "key": self.signing_key.public_hex,
        }

        def signed(entry: AuditEntry) -> bytes:
            """The reply with its receipt: signed over the audit entry that records it."""
            receipt = Receipt(
                self.name,
                task.task_id,
                asked,
                digest,
                entry.seq,
                entry.hash,
                self.signing_key.public_hex,
            ).signed(self.signing_key)
            message.reply.audit_seq = receipt.audit_seq
            message.reply.audit_hash = receipt.audit_hash
            message.reply.signature = receipt.signature
            return message.SerializeToString(deterministic=True)

        committed = self.store.commit_reply(
            task,
            charge,
            signed,
            digest,
            detail,
            released,
            self.config.policy.sdc,
            asked=(wire.SerializeToString(deterministic=True), self.coordinator_key),
        )
        payload = message.SerializeToString(deterministic=True)
        if committed != payload:  # another delivery of this task id committed first
            return self._replayed(committed)
        return Outcome(pb.SiteMessage.FromString(committed), "reply")

    def _computed_in_memory(
        self,
        study_id: str,
        analysis: Analysis[Any],
        params: Any,
        ctx: AnalysisContext,
        scope: TaskScope,
        frame: tuple[ConsentView, RowFilter | None, str],
    ) -> tuple[dict[str, npt.NDArray[np.float64]], RecordSet | None]:
        """The task's exact aggregates from the records in memory; in sdc, after the
        differencing guard (returning the record set to commit) and with the dominance rule."""
        consent, row_filter, frame_key = frame
        data = self._frame(consent, row_filter, frame_key)
        if analysis.reads_source:
            ctx = dataclasses.replace(ctx, source=self.source.loc[data.index])
        released: RecordSet | None = None
        if ctx.mode == "sdc":
            # Before any computation: the differencing guard on the rows that would contribute.
            released = self._record_set(
                study_id, scope, analysis.complete_case_variables(params), data, frame_key
            )
            self.store.precheck_release(released, self.config.policy.sdc)
        arrays = analysis.local(data, params, ctx)  # in sdc, the model's own checks first
        if ctx.mode == "sdc":
            check_dominance(analysis.magnitude_cells(data, params, ctx), self.config.policy.sdc)
        return arrays, released

    def _pushed_down(
        self,
        analysis: Analysis[Any],
        params: Any,
        ctx: AnalysisContext,
        scope: TaskScope,
        row_filter: RowFilter | None,
    ) -> dict[str, npt.NDArray[np.float64]] | None:
        """The task's exact aggregates computed by the source (pushdown), or None: the site
        computes them in memory. Only dp releases are pushed down: sdc's differencing guard
        and dominance rule need the records, and the quality profile each record's state."""
        source = self.pushdown
        if source is None or ctx.mode != "dp" or analysis.reads_source:
            return None
        if self._records is not None and source.rows != len(self._records.data):
            return None  # unreachable while pushdown excludes row-changing configurations
        if not source.serves(scope.variables | scope.filter_variables):
            return None
        plan = analysis.pushdown(params, ctx, source.column)
        if plan is None or any(query.width > MAX_COLUMNS for query in plan.queries):
            return None
        started = time.perf_counter()
        arrays = source.run(plan, row_filter)
        log.debug("pushdown %s: %.3f s in the source", plan.label, time.perf_counter() - started)
        return {name: np.asarray(value, dtype=np.float64) for name, value in arrays.items()}

    def _charge(
        self,
        task: TaskMessage,
        analysis: Analysis[Any],
        params: Any,
        approval: StudyApproval,
        mode: str,
    ) -> Charge | None:
        """What a dp task asks of the ledger: zCDP rho for a release with Gaussian noise,
        else epsilon; None outside dp.

        Raises:
            ValidationError: the task's epsilon or rho is not a finite number above 0.
        """
        charge: Charge | None = None
        gaussian = mode == "dp" and analysis.dp_measure(params) == "zcdp"
        if gaussian:
            if not (math.isfinite(task.rho) and task.rho > 0):
                raise ValidationError(
                    f"this dp task releases with Gaussian noise and needs a zCDP rho that is a "
                    f"finite number above 0, got {task.rho!r}"
                )
            charge = Charge(
                task.study_id,
                task.request_id,
                PureDP(0.0),
                approval.budget,
                None,
                researcher=task.researcher,
                rho=ZCDP(task.rho),
                rho_budget=approval.rho_budget,
                rho_cap=approval.rho_per_request,
            )
        elif mode == "dp":
            if not (math.isfinite(task.epsilon) and task.epsilon > 0):
                raise ValidationError(
                    f"a dp task needs an epsilon that is a finite number above 0, got "
                    f"{task.epsilon!r}"
                )
            charge = Charge(
                task.study_id,
                task.request_id,
                PureDP(task.epsilon),
                approval.budget,
                approval.epsilon_per_request,
                researcher=task.researcher,
                researcher_budget=approval.researcher_budget,
                period=self.config.policy.period_budget,
            )
        return charge

    def receive_offer(self, offer: pb.ScriptOffer) -> None:
        """Keep a script the coordinator offers for review (never run: a task must name it, and
        its admin approve it). A malformed offer, or one past the pending limit, is logged and
        dropped; nothing is answered."""
        try:
            bundle = reviewed_bundle(offer.module, offer.manifest)
            manifest = bundle.manifest
        except AllianceError as exc:
            log.warning("dropped a script offered for study %s: %s", offer.study_id, exc)
            return
        digest = bundle.hash
        if self.store.script_status(digest) is not None:
            return
        pending = sum(1 for s in self.store.scripts() if s["status"] == "pending")
        if pending >= MAX_PENDING_SCRIPTS:
            log.warning(
                "dropped script %s offered for study %s: %d scripts already await review",
                bundle.label,
                offer.study_id,
                pending,
            )
            return
        self.store.receive_script(
            digest, manifest.name, manifest.version, bundle.module, bundle.manifest_text
        )
        log.info(
            "script %s was submitted to study %s; review it with `alliance site review-script %s`",
            bundle.label,
            offer.study_id,
            digest,
        )

    def _check_reviewed(self, bundle: ScriptBundle | TrainingApp) -> None:
        """Run a researcher's code only when this site's admin approved its exact hash; keep
        code seen for the first time for review.

        Raises:
            RefusedError: code ``script``, saying how to review and approve it.
        """
        digest = bundle.hash
        what = bundle.label if isinstance(bundle, TrainingApp) else f"script {bundle.label}"
        status = self.store.script_status(digest)
        if status == "approved":
            return
        if status is None:
            manifest = bundle.manifest
            self.store.receive_script(
                digest, manifest.name, manifest.version, bundle.module, bundle.manifest_text
            )
        if status == "refused":
            raise RefusedError(f"{what} was refused at this site by its admin", code="script")
        raise RefusedError(
            f"{what} is not approved at this site: its admin reviews it with "
            f"`alliance site review-script {digest}` and approves it with "
            f"`alliance site approve-script {digest}`",
            code="script",
        )

    def usable_share(self, variable: str) -> float:
        """The share of this site's loaded records whose ``variable`` holds an allowed,
        plausible value (what ``min_quality`` compares against; kept, the data do not change)."""
        found = self._usable.get(variable)
        if found is None:
            if self._records is None and self.pushdown is not None:
                found = self.pushdown.usable_share(variable)
            else:
                found = usable_share(self.data, self.dictionary, variable)
            self._usable[variable] = found
        return found

    def _check_quality(
        self,
        study_id: str,
        variables: frozenset[str],
        study_minimum: Mapping[str, float],
        site_minimum: Mapping[str, float],
    ) -> None:
        """Leave out of a study the variables whose usable share here is below the higher of
        the study's and this site's minimum: refuse, naming them and the minimum, never the
        share itself.

        Raises:
            RefusedError: code ``quality``.
        """
        short = []
        for name in sorted(variables):
            minimum = max(study_minimum.get(name, 0.0), site_minimum.get(name, 0.0))
            if minimum > 0 and self.usable_share(name) < minimum:
                short.append(f"{name!r} (at least {minimum:.0%} required)")
        if short:
            raise RefusedError(
                f"this site leaves {', '.join(short)} out of study {study_id}: fewer of its "
                "records hold an allowed, plausible value than the study's minimum quality; "
                "the quality analysis shows each site's profile",
                code="quality",
            )

    def _audit_consent(self, purpose: str, consent: ConsentView) -> None:
        """Audit, once per version of the consent source and purpose, how many records it
        excluded: that number goes to the site's own audit log and nowhere else."""
        if consent.mask is None or consent.version in self._consent_audited:
            return
        self.store.audit(
            "consent_applied",
            {"purpose": purpose, "version": consent.version, "excluded": consent.excluded},
        )
        self._consent_audited.add(consent.version)

    def _record_set(
        self,
        study_id: str,
        scope: TaskScope,
        variables: set[str],
        data: pd.DataFrame,
        frame_key: str,
    ) -> RecordSet:
        """The rows a release covers: ``data``'s complete cases of ``variables`` (the
        analysis's), by their positions in the site's data (kept for the rounds of iterative
        analyses)."""
        population = canonical_filter(scope.row_filter)
        key = (study_id, frame_key, tuple(sorted(variables)))

        def build() -> RecordSet:
            complete = data[sorted(variables)].notna().all(axis=1).to_numpy()
            positions = np.asarray(data.index.to_numpy()[complete], dtype=np.int64)
            return RecordSet.of(study_id, population, positions)

        return _cached(self._row_sets, key, build, FILTER_CACHE_SIZE)

    def _params(self, analysis: Any, text: str, task: TaskMessage) -> Any:
        """The task's parameters, validated; every round of a request sends the same ones, so
        they are parsed once (pydantic costs more than a small task's arithmetic)."""
        return _cached(
            self._params_cache,
            (analysis.name, text),
            lambda: analysis.parse_params(task.params, self.dictionary),
            PARAMS_CACHE_SIZE,
        )

    def _frame(
        self, consent: ConsentView, row_filter: RowFilter | None, frame_key: str
    ) -> pd.DataFrame:
        """The rows a task computes on: those with consent for the study's purpose, then the
        filter's. Kept for the next rounds of iterative analyses, with their scope of the work
        cache (the two are dropped together); a new consent version is a new frame."""
        base = self.data
        if consent.mask is not None:
            mask = consent.mask
            base = _cached(self._consented, consent.version, lambda: self.data.loc[mask], 2)
        if row_filter is None:
            return base

        def build() -> pd.DataFrame:
            columns = {c: base[c].to_numpy() for c in row_filter.variables}
            return base.loc[row_filter.mask(columns, len(base))]

        return _cached(self._filter_cache, frame_key, build, FILTER_CACHE_SIZE, self.work.drop)


K = TypeVar("K")
V = TypeVar("V")


def _cached(
    cache: OrderedDict[K, V],
    key: K,
    build: Callable[[], V],
    limit: int,
    dropped: Callable[[K], None] | None = None,
) -> V:
    """A least-recently-used cache's value for ``key``, built when missing; ``dropped`` hears of
    each key it evicts."""
    found = cache.get(key)
    if found is not None:
        cache.move_to_end(key)
        return found
    value = build()
    cache[key] = value
    while len(cache) > limit:
        evicted, _ = cache.popitem(last=False)
        if dropped is not None:
            dropped(evicted)
    return value


def _one_row_per_patient(
    data: pd.DataFrame, ids: npt.NDArray[np.str_] | None, rule: str
) -> tuple[pd.DataFrame, npt.NDArray[np.str_] | None, npt.NDArray[np.bool_] | None]:
    """Collapse several rows of one patient to one (rule first or last, in file order);
    the third item is the rows kept, None when all are."""
    if ids is None or rule == "refuse":
        return data, ids, None
    keep = ~pd.Series(ids).duplicated(keep=rule).to_numpy()
    if keep.all():
        return data, ids, None
    return data.loc[keep].reset_index(drop=True), ids[keep], keep


def _source_states(
    data: pd.DataFrame, report: DataReport, ids: npt.NDArray[np.str_] | None
) -> pd.DataFrame:
    """Each loaded row's state at the source: per variable the conform step's record (or, for
    data given conformed, missing where it is NaN), and whether the row is the first of a
    patient id that has several rows (so their sum counts duplicated ids, not rows)."""
    columns: dict[str, npt.NDArray[Any]] = {}
    for name in data.columns:
        status = report.status.get(str(name))
        if status is None or status.size != len(data):
            status = np.where(data[name].isna().to_numpy(), SOURCE_MISSING, 0).astype(np.int8)
        columns[str(name)] = status
    if ids is None:
        columns[DUPLICATE_ID] = np.zeros(len(data), dtype=bool)
    else:
        repeated = pd.Series(ids).duplicated(keep=False).to_numpy()
        first = ~pd.Series(ids).duplicated(keep="first").to_numpy()
        columns[DUPLICATE_ID] = repeated & first
    return pd.DataFrame(columns, index=data.index)
