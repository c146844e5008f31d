from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("site_id", "software_version", "allowed_analyses", "dictionary_digest", "signing_key", "decisions")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ANALYSES_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNING_KEY_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    software_version: str
    allowed_analyses: _containers.RepeatedScalarFieldContainer[str]
    dictionary_digest: str
    signing_key: str
    decisions: _containers.RepeatedCompositeFieldContainer[StudyDecision]
    def __init__(self, site_id: _Optional[str] = ..., software_version: _Optional[str] = ..., allowed_analyses: _Optional[_Iterable[str]] = ..., dictionary_digest: _Optional[str] = ..., signing_key: _Optional[str] = ..., decisions: _Optional[_Iterable[_Union[StudyDecision, _Mapping]]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("accepted", "reason", "coordinator", "software_version", "signing_key")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNING_KEY_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    coordinator: str
    software_version: str
    signing_key: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., coordinator: _Optional[str] = ..., software_version: _Optional[str] = ..., signing_key: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "study_id", "purpose", "analysis", "params_json", "filter", "privacy_mode", "epsilon", "researcher", "round", "state_json", "request_id", "min_quality", "rho", "signature", "study_version")
    class MinQualityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_MODE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    RESEARCHER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_QUALITY_FIELD_NUMBER: _ClassVar[int]
    RHO_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    STUDY_VERSION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    study_id: str
    purpose: str
    analysis: str
    params_json: str
    filter: str
    privacy_mode: str
    epsilon: float
    researcher: str
    round: int
    state_json: str
    request_id: str
    min_quality: _containers.ScalarMap[str, float]
    rho: float
    signature: str
    study_version: int
    def __init__(self, task_id: _Optional[str] = ..., study_id: _Optional[str] = ..., purpose: _Optional[str] = ..., analysis: _Optional[str] = ..., params_json: _Optional[str] = ..., filter: _Optional[str] = ..., privacy_mode: _Optional[str] = ..., epsilon: _Optional[float] = ..., researcher: _Optional[str] = ..., round: _Optional[int] = ..., state_json: _Optional[str] = ..., request_id: _Optional[str] = ..., min_quality: _Optional[_Mapping[str, float]] = ..., rho: _Optional[float] = ..., signature: _Optional[str] = ..., study_version: _Optional[int] = ...) -> None: ...

class NamedArray(_message.Message):
    __slots__ = ("name", "shape", "values", "kind", "mechanism", "scale", "epsilon", "rho")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    RHO_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    kind: str
    mechanism: str
    scale: float
    epsilon: float
    rho: float
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., kind: _Optional[str] = ..., mechanism: _Optional[str] = ..., scale: _Optional[float] = ..., epsilon: _Optional[float] = ..., rho: _Optional[float] = ...) -> None: ...

class AggregateRecord(_message.Message):
    __slots__ = ("arrays",)
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    arrays: _containers.RepeatedCompositeFieldContainer[NamedArray]
    def __init__(self, arrays: _Optional[_Iterable[_Union[NamedArray, _Mapping]]] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("task_id", "record", "privacy_mode", "epsilon_spent", "records_used", "replayed", "receipt", "rho_spent", "request_digest", "audit_seq", "audit_hash", "signature")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_MODE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    RECORDS_USED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    RHO_SPENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQ_FIELD_NUMBER: _ClassVar[int]
    AUDIT_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    record: AggregateRecord
    privacy_mode: str
    epsilon_spent: float
    records_used: int
    replayed: bool
    receipt: str
    rho_spent: float
    request_digest: str
    audit_seq: int
    audit_hash: str
    signature: str
    def __init__(self, task_id: _Optional[str] = ..., record: _Optional[_Union[AggregateRecord, _Mapping]] = ..., privacy_mode: _Optional[str] = ..., epsilon_spent: _Optional[float] = ..., records_used: _Optional[int] = ..., replayed: _Optional[bool] = ..., receipt: _Optional[str] = ..., rho_spent: _Optional[float] = ..., request_digest: _Optional[str] = ..., audit_seq: _Optional[int] = ..., audit_hash: _Optional[str] = ..., signature: _Optional[str] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("task_id", "code", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    code: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., code: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_unix_ms",)
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    sent_unix_ms: int
    def __init__(self, sent_unix_ms: _Optional[int] = ...) -> None: ...

class AuditEntryRecord(_message.Message):
    __slots__ = ("seq", "hash", "action", "task_id")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    seq: int
    hash: str
    action: str
    task_id: str
    def __init__(self, seq: _Optional[int] = ..., hash: _Optional[str] = ..., action: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class AuditAnswer(_message.Message):
    __slots__ = ("query_id", "head_seq", "head_hash", "replies", "error")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    head_seq: int
    head_hash: str
    replies: _containers.RepeatedCompositeFieldContainer[AuditEntryRecord]
    error: str
    def __init__(self, query_id: _Optional[str] = ..., head_seq: _Optional[int] = ..., head_hash: _Optional[str] = ..., replies: _Optional[_Iterable[_Union[AuditEntryRecord, _Mapping]]] = ..., error: _Optional[str] = ...) -> None: ...

class SiteMessage(_message.Message):
    __slots__ = ("hello", "reply", "refusal", "heartbeat", "audit_answer", "study_decision")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    AUDIT_ANSWER_FIELD_NUMBER: _ClassVar[int]
    STUDY_DECISION_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    reply: Reply
    refusal: Refusal
    heartbeat: Heartbeat
    audit_answer: AuditAnswer
    study_decision: StudyDecision
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., reply: _Optional[_Union[Reply, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., audit_answer: _Optional[_Union[AuditAnswer, _Mapping]] = ..., study_decision: _Optional[_Union[StudyDecision, _Mapping]] = ...) -> None: ...

class StudyDecision(_message.Message):
    __slots__ = ("site", "study_id", "version", "study_digest", "decision", "reason", "decided_by", "decided_at", "terms_json", "signature")
    SITE_FIELD_NUMBER: _ClassVar[int]
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STUDY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    TERMS_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    site: str
    study_id: str
    version: int
    study_digest: str
    decision: str
    reason: str
    decided_by: str
    decided_at: str
    terms_json: str
    signature: str
    def __init__(self, site: _Optional[str] = ..., study_id: _Optional[str] = ..., version: _Optional[int] = ..., study_digest: _Optional[str] = ..., decision: _Optional[str] = ..., reason: _Optional[str] = ..., decided_by: _Optional[str] = ..., decided_at: _Optional[str] = ..., terms_json: _Optional[str] = ..., signature: _Optional[str] = ...) -> None: ...

class AuditQuery(_message.Message):
    __slots__ = ("query_id", "study_id")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    study_id: str
    def __init__(self, query_id: _Optional[str] = ..., study_id: _Optional[str] = ...) -> None: ...

class ScriptOffer(_message.Message):
    __slots__ = ("study_id", "module", "manifest")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    module: str
    manifest: str
    def __init__(self, study_id: _Optional[str] = ..., module: _Optional[str] = ..., manifest: _Optional[str] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("welcome", "task", "heartbeat", "script_offer", "audit_query", "study_notice")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    SCRIPT_OFFER_FIELD_NUMBER: _ClassVar[int]
    AUDIT_QUERY_FIELD_NUMBER: _ClassVar[int]
    STUDY_NOTICE_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    task: Task
    heartbeat: Heartbeat
    script_offer: ScriptOffer
    audit_query: AuditQuery
    study_notice: StudyNotice
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., task: _Optional[_Union[Task, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., script_offer: _Optional[_Union[ScriptOffer, _Mapping]] = ..., audit_query: _Optional[_Union[AuditQuery, _Mapping]] = ..., study_notice: _Optional[_Union[StudyNotice, _Mapping]] = ...) -> None: ...

class StudyNotice(_message.Message):
    __slots__ = ("study_id", "version", "state", "study_json", "sent_at", "signature")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STUDY_JSON_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    version: int
    state: str
    study_json: str
    sent_at: str
    signature: str
    def __init__(self, study_id: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., study_json: _Optional[str] = ..., sent_at: _Optional[str] = ..., signature: _Optional[str] = ...) -> None: ...
