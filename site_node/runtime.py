"""The trust boundary: turn one task into one reply or one typed refusal.

Order of work: a repeated task id gets its stored reply; then policy (default deny), parameter
and filter validation, the budget pre-check, the analysis's site half, the privacy engine, and
finally one transaction that charges the ledger, stores the reply and audits it. Only then does
the reply leave.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pandas as pd

from analyses import AnalysisContext, get_analysis
from protocol.budget import PureDP
from protocol.config import DataDictionary, SiteConfig, load_yaml
from protocol.errors import AllianceError, RefusedError, ValidationError
from protocol.filters import RowFilter, parse_filter
from protocol.records import AggregateRecord
from protocol.wire import alliance_pb2 as pb
from protocol.wire.messages import record_to_proto
from site_node.connectors import load
from site_node.harmonize import DataReport, conform
from site_node.ledger import SiteStore
from site_node.policy import check_task
from site_node.privacy import privatize

VERSION = "0.1.0"
#: Filtered frames kept for the later rounds of iterative analyses.
FILTER_CACHE_SIZE = 8
log = logging.getLogger("alliance.site")


@dataclass
class Outcome:
    """What ``handle`` produced, for logging and tests."""

    message: pb.SiteMessage
    status: str  # reply, replayed or refused
    reason: str = ""


def _refusal(task_id: str, code: str, reason: str) -> pb.SiteMessage:
    return pb.SiteMessage(refusal=pb.Refusal(task_id=task_id, code=code, reason=reason))


class SiteRuntime:
    """A site's data, policy, privacy engine and store, without the network."""

    def __init__(
        self,
        config: SiteConfig,
        dictionary: DataDictionary,
        data: pd.DataFrame,
        report: DataReport | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.dictionary = dictionary
        self.data = data
        self.report = report or DataReport(rows=len(data))
        self.store = SiteStore(config.state_dir / "site.db", actor=config.name)
        self._digest = dictionary.digest()
        self._filter_cache: OrderedDict[str, pd.DataFrame] = OrderedDict()

    @classmethod
    def from_config(cls, config: SiteConfig, record_start: bool = True) -> SiteRuntime:
        """Load the dictionary and the data, and check the data against the dictionary.

        ``record_start`` audits the start; ``alliance site check`` passes False, because a
        check changes nothing, the audit log included.
        """
        dictionary = load_yaml(config.dictionary, DataDictionary)
        raw = load(config.data)
        data, report = conform(raw, dictionary, config.data.rename, config.data.derive)
        runtime = cls(config, dictionary, data, report)
        if record_start:
            runtime.store.audit(
                "site_started",
                {"version": VERSION, "records": len(data), "dictionary": runtime._digest},
            )
        return runtime

    def close(self) -> None:
        """Close the site's SQLite file."""
        self.store.close()

    def hello(self) -> pb.Hello:
        """The first message on the site link."""
        return pb.Hello(
            site_id=self.name,
            software_version=VERSION,
            allowed_analyses=list(self.config.policy.allowed_analyses),
            dictionary_digest=self._digest,
            records=len(self.data),
        )

    # ------------------------------------------------------------------ tasks
    def handle(self, task: pb.Task) -> Outcome:
        """Answer one task with a reply or a typed refusal; never raise."""
        stored = self.store.stored_reply(task.task_id)
        if stored is not None:
            message = pb.SiteMessage.FromString(stored)
            message.reply.replayed = True
            return Outcome(message, "replayed")
        try:
            return self._run(task)
        except RefusedError as exc:
            reason, code = exc.reason, exc.code
        except ValidationError as exc:
            reason, code = str(exc), "validation"
        except AllianceError as exc:
            reason, code = str(exc), "error"
        except Exception as exc:  # a bug must not take the site down or leak a traceback
            log.exception("task %s failed", task.task_id)
            reason = f"internal error at {self.name}: {type(exc).__name__}; this is probably a bug"
            code = "error"
        try:
            self.store.audit(
                "refused",
                {
                    "task": task.task_id,
                    "study": task.study_id,
                    "analysis": task.analysis,
                    "researcher": task.researcher,
                    "code": code,
                    "reason": reason,
                },
            )
        except Exception:  # nothing was released; the refusal itself must still go out
            log.exception("could not audit the refusal of task %s", task.task_id)
        return Outcome(_refusal(task.task_id, code, reason), "refused", reason)

    def _run(self, task: pb.Task) -> Outcome:
        started = time.perf_counter()
        analysis = get_analysis(task.analysis)
        try:
            raw_params: Any = json.loads(task.params_json or "{}")
        except json.JSONDecodeError:
            raise ValidationError("task parameters are not valid JSON") from None
        if not isinstance(raw_params, dict):
            raise ValidationError("task parameters must be a JSON object")
        params = analysis.parse_params(raw_params, self.dictionary)
        row_filter = (
            parse_filter(task.filter, set(self.dictionary.variables)) if task.filter else None
        )
        variables = set(analysis.variables(params)) | (
            set(row_filter.variables) if row_filter else set()
        )
        approval, mode = check_task(
            self.config.policy,
            self.name,
            task.study_id,
            task.analysis,
            variables,
            task.privacy_mode or "dp",
        )
        epsilon = task.epsilon if mode == "dp" else 0.0
        budget = PureDP(approval.budget)
        if mode == "dp":
            if epsilon <= 0:
                raise ValidationError(f"a dp task needs an epsilon above 0, got {epsilon}")
            self._check_budget(task.study_id, budget, PureDP(epsilon))
        data = self._filtered(row_filter) if row_filter is not None else self.data
        state = json.loads(task.state_json) if task.state_json else {}
        ctx = AnalysisContext(self.dictionary, mode, self.config.policy.sdc, task.round, state)
        spec = analysis.declare(params, ctx)
        record: AggregateRecord | None = None
        if mode == "dp":
            private = analysis.local_private(data, params, ctx, epsilon)
            if private is not None:
                record = AggregateRecord(spec, private[0], private[1])
        if record is None:
            record = privatize(
                spec, analysis.local(data, params, ctx), mode, epsilon, self.config.policy.sdc
            )
        spent = record.epsilon if mode == "dp" else 0.0
        records_used = analysis.site_records(record)
        proto_record = record_to_proto(record)
        receipt = hashlib.sha256(
            task.task_id.encode() + proto_record.SerializeToString(deterministic=True)
        ).hexdigest()
        reply = pb.Reply(
            task_id=task.task_id,
            record=proto_record,
            privacy_mode=mode,
            epsilon_spent=spent,
            records_used=-1 if mode == "dp" or records_used is None else int(records_used),
            compute_seconds=time.perf_counter() - started,
            receipt=receipt,
        )
        message = pb.SiteMessage(reply=reply)
        committed = self.store.commit_reply(
            task_id=task.task_id,
            study_id=task.study_id,
            researcher=task.researcher,
            analysis=task.analysis,
            epsilon=spent,
            budget=budget if mode == "dp" else None,
            payload=message.SerializeToString(deterministic=True),
            receipt=receipt,
            detail={
                "task": task.task_id,
                "study": task.study_id,
                "analysis": task.analysis,
                "researcher": task.researcher,
                "mode": mode,
                "epsilon": spent,
                "receipt": receipt,
            },
        )
        if not committed:  # lost a race for the last of the budget
            self._check_budget(task.study_id, budget, PureDP(spent))
        return Outcome(message, "reply")

    def _filtered(self, row_filter: RowFilter) -> pd.DataFrame:
        """The rows a filter keeps, as the same frame object every round of an analysis.

        Iterative analyses cache per-frame work (a GLM's design matrix) by frame identity, so a
        filter's rows are kept for the next rounds instead of being rebuilt.
        """
        frame = self._filter_cache.get(row_filter.text)
        if frame is None:
            columns = {c: self.data[c].to_numpy() for c in row_filter.variables}
            frame = self.data.loc[row_filter.mask(columns, len(self.data))]
            self._filter_cache[row_filter.text] = frame
            while len(self._filter_cache) > FILTER_CACHE_SIZE:
                self._filter_cache.popitem(last=False)
        else:
            self._filter_cache.move_to_end(row_filter.text)
        return frame

    def _check_budget(self, study_id: str, budget: PureDP, requested: PureDP) -> None:
        spent = self.store.spent(study_id)
        remaining = budget - spent
        if not remaining.covers(requested):
            short = requested.epsilon - remaining.epsilon
            raise RefusedError(
                f"refused by {self.name}: study {study_id} has epsilon {remaining.epsilon:.4g} "
                f"left at this site; this request needs {requested.epsilon:.4g} (short by "
                f"{short:.4g}). Ask the site admin for more budget, or lower `epsilon` in the "
                "request",
                code="budget",
            )
