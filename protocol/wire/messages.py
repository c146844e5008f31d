"""Typed messages of the site link, and the only code that builds or reads its protobufs.

The scheduler and the site runtime speak :class:`TaskMessage`, :class:`ReplyMessage` and
:class:`RefusalMessage`; each checks its fields' types when it is built (a wrong type is a
``TypeError`` at the line that made it, not a surprise on the far side of the link) and
converts to and from protobuf at the wire boundary only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from protocol.config import quality_share_problem
from protocol.errors import RecordError, ValidationError
from protocol.records import MAX_CELLS, AggregateRecord, RecordSpec, Release
from protocol.wire import alliance_pb2 as pb


def _require(owner: str, name: str, value: object, kind: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) and kind is not bool:
        raise TypeError(f"{owner}.{name} must be {kind}, got bool")
    if not isinstance(value, kind):
        raise TypeError(f"{owner}.{name} must be {kind}, got {type(value).__name__}")


def _json_object(text: str, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValidationError(f"{what}: not valid JSON") from None
    if not isinstance(value, dict):
        raise ValidationError(f"{what}: must be a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class TaskMessage:
    """One unit of work for one site: a round of one request.

    Attributes:
        task_id: unique per site and round; a site answers a repeated id from its store.
        request_id: the request this round belongs to (the site's per-request cap sums it).
        study_id: the study the request runs in.
        analysis: the registered analysis.
        researcher: who asked.
        purpose: the study's purpose code.
        params: the analysis parameters (validated again at the site).
        filter: the safe row-filter expression, or empty.
        privacy_mode: the study's mode; the site applies the stricter of it and its own.
        epsilon: what this round may spend at the site in dp mode.
        rho: the zCDP rho this round may spend at the site (Gaussian releases only).
        round: the round number, from 0.
        state: the public round state (validated by the site against the analysis).
        min_quality: the study's least usable share per variable (the site applies the
            higher of it and its own approval's).
        study_version: the study version the task runs under at this site (the latest this
            site approved; 0 on the wire means 1).
    """

    task_id: str
    request_id: str
    study_id: str
    analysis: str
    researcher: str
    purpose: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    filter: str = ""
    privacy_mode: str = "dp"
    epsilon: float = 0.0
    round: int = 0
    state: Mapping[str, Any] = field(default_factory=dict)
    min_quality: Mapping[str, float] = field(default_factory=dict)
    rho: float = 0.0
    study_version: int = 1

    def __post_init__(self) -> None:
        for name in ("task_id", "request_id", "study_id", "analysis", "researcher", "purpose"):
            _require("TaskMessage", name, getattr(self, name), str)
        _require("TaskMessage", "filter", self.filter, str)
        _require("TaskMessage", "privacy_mode", self.privacy_mode, str)
        _require("TaskMessage", "epsilon", self.epsilon, (int, float))
        _require("TaskMessage", "rho", self.rho, (int, float))
        _require("TaskMessage", "round", self.round, int)
        _require("TaskMessage", "study_version", self.study_version, int)
        _require("TaskMessage", "params", self.params, Mapping)
        _require("TaskMessage", "state", self.state, Mapping)
        _require("TaskMessage", "min_quality", self.min_quality, Mapping)
        for name, share in self.min_quality.items():
            problem = quality_share_problem(share)
            if problem is not None:
                raise ValidationError(f"a task's min_quality for {name!r}: {problem}")
        if self.round < 0:
            raise ValidationError(f"a task's round must be >= 0, got {self.round}")
        if self.study_version < 1:
            raise ValidationError(f"a task's study version must be >= 1, got {self.study_version}")
        object.__setattr__(self, "epsilon", float(self.epsilon))
        object.__setattr__(self, "rho", float(self.rho))
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        object.__setattr__(self, "state", MappingProxyType(dict(self.state)))
        quality = {str(k): float(v) for k, v in self.min_quality.items()}
        object.__setattr__(self, "min_quality", MappingProxyType(quality))

    def to_proto(self) -> pb.CoordinatorMessage:
        """The message on the wire."""
        return pb.CoordinatorMessage(
            task=pb.Task(
                task_id=self.task_id,
                request_id=self.request_id,
                study_id=self.study_id,
                analysis=self.analysis,
                researcher=self.researcher,
                purpose=self.purpose,
                params_json=json.dumps(dict(self.params), allow_nan=False),
                filter=self.filter,
                privacy_mode=self.privacy_mode,
                epsilon=self.epsilon,
                round=self.round,
                state_json=json.dumps(dict(self.state), allow_nan=False),
                min_quality=dict(self.min_quality),
                rho=self.rho,
                study_version=self.study_version,
            )
        )

    @classmethod
    def from_proto(cls, task: pb.Task) -> TaskMessage:
        """Decode a task as it arrived (JSON parsed; an empty request id is the task's own).

        Raises:
            ValidationError: the parameters or state are not JSON objects, or the round is
                negative.
        """
        return cls(
            task_id=task.task_id,
            request_id=task.request_id or task.task_id,
            study_id=task.study_id,
            analysis=task.analysis,
            researcher=task.researcher,
            purpose=task.purpose,
            params=_json_object(task.params_json, "task parameters"),
            filter=task.filter,
            privacy_mode=task.privacy_mode or "dp",
            epsilon=task.epsilon,
            round=task.round,
            state=_json_object(task.state_json, "task round state"),
            min_quality=dict(task.min_quality),
            rho=task.rho,
            study_version=task.study_version or 1,
        )


@dataclass(frozen=True)
class ReplyMessage:
    """A site's answer to a task: one aggregate record and what it cost.

    Attributes:
        task_id: the task answered.
        record: the released arrays.
        privacy_mode: the mode the site applied.
        epsilon_spent: what the site's ledger charged.
        rho_spent: the zCDP rho the site's ledger charged (Gaussian releases).
        records_used: records the site used, exact in off/sdc; None when private.
        receipt: SHA-256 over the task id and the serialised record.
        replayed: a stored reply to a repeated task id (charged nothing again).
    """

    task_id: str
    record: AggregateRecord
    privacy_mode: str
    epsilon_spent: float = 0.0
    records_used: int | None = None
    receipt: str = ""
    replayed: bool = False
    rho_spent: float = 0.0

    def __post_init__(self) -> None:
        _require("ReplyMessage", "task_id", self.task_id, str)
        _require("ReplyMessage", "record", self.record, AggregateRecord)
        _require("ReplyMessage", "privacy_mode", self.privacy_mode, str)
        _require("ReplyMessage", "epsilon_spent", self.epsilon_spent, (int, float))
        _require("ReplyMessage", "rho_spent", self.rho_spent, (int, float))
        if self.records_used is not None:
            _require("ReplyMessage", "records_used", self.records_used, int)
        _require("ReplyMessage", "receipt", self.receipt, str)
        _require("ReplyMessage", "replayed", self.replayed, bool)

    def to_proto(self) -> pb.SiteMessage:
        """The message on the wire."""
        return pb.SiteMessage(
            reply=pb.Reply(
                task_id=self.task_id,
                record=record_to_proto(self.record),
                privacy_mode=self.privacy_mode,
                epsilon_spent=float(self.epsilon_spent),
                records_used=-1 if self.records_used is None else self.records_used,
                receipt=self.receipt,
                replayed=self.replayed,
                rho_spent=float(self.rho_spent),
            )
        )

    @classmethod
    def from_proto(cls, reply: pb.Reply, declare: Callable[[str], RecordSpec]) -> ReplyMessage:
        """Decode a reply, rebuilding its record against ``declare(privacy_mode)``: the
        receiver's own declaration for the mode the site applied.

        Raises:
            RecordError: the record does not match the receiver's declaration.
        """
        mode = reply.privacy_mode or "dp"
        return cls(
            task_id=reply.task_id,
            record=record_from_proto(reply.record, declare(mode)),
            privacy_mode=mode,
            epsilon_spent=reply.epsilon_spent,
            records_used=None if reply.records_used < 0 else int(reply.records_used),
            receipt=reply.receipt,
            replayed=reply.replayed,
            rho_spent=reply.rho_spent,
        )


@dataclass(frozen=True)
class RefusalMessage:
    """A typed refusal: the site released nothing, and says why (``code``: policy, budget,
    disclosure, validation or error)."""

    task_id: str
    code: str
    reason: str

    def __post_init__(self) -> None:
        for name in ("task_id", "code", "reason"):
            _require("RefusalMessage", name, getattr(self, name), str)

    def to_proto(self) -> pb.SiteMessage:
        """The message on the wire."""
        return pb.SiteMessage(
            refusal=pb.Refusal(task_id=self.task_id, code=self.code, reason=self.reason)
        )

    @classmethod
    def from_proto(cls, refusal: pb.Refusal) -> RefusalMessage:
        """Decode a refusal."""
        return cls(refusal.task_id, refusal.code, refusal.reason)


def record_to_proto(record: AggregateRecord) -> pb.AggregateRecord:
    """Serialise a record (its spec travels implicitly: the receiver re-declares it)."""
    out = pb.AggregateRecord()
    for name, arr in record.arrays.items():
        spec = record.spec.arrays[name]
        rel = record.releases[name]
        out.arrays.append(
            pb.NamedArray(
                name=name,
                shape=list(arr.shape),
                values=arr.ravel().tolist(),
                kind=spec.kind,
                mechanism=rel.mechanism,
                scale=rel.scale,
                epsilon=rel.epsilon,
                rho=rel.rho,
            )
        )
    return out


def record_from_proto(message: pb.AggregateRecord, spec: RecordSpec) -> AggregateRecord:
    """Rebuild a record against the spec the receiver declared itself.

    Raises:
        RecordError: when the sender's arrays do not match the receiver's declaration.
    """
    arrays = {}
    releases = {}
    for item in message.arrays:
        if item.name in arrays:
            raise RecordError(f"array {item.name!r} appears twice in a reply")
        if item.name not in spec.arrays:
            raise RecordError(f"reply carries undeclared array {item.name!r}")
        shape = tuple(item.shape)
        if any(dim < 0 for dim in shape) or math.prod(shape) > MAX_CELLS:
            raise RecordError(f"array {item.name!r}: shape {list(shape)} is not a valid shape")
        if not all(math.isfinite(x) and x >= 0 for x in (item.scale, item.epsilon, item.rho)):
            raise RecordError(
                f"array {item.name!r}: scale, epsilon and rho must be finite and >= 0"
            )
        values = np.asarray(item.values, dtype=np.float64)
        if values.size != math.prod(shape):
            raise RecordError(f"array {item.name!r}: {values.size} values for shape {shape}")
        arrays[item.name] = values.reshape(shape)
        releases[item.name] = Release(item.mechanism or "none", item.scale, item.epsilon, item.rho)
    return AggregateRecord(spec, arrays, releases)
