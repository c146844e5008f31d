"""The coordinator's tables (SQLAlchemy Core; SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text

metadata = MetaData()

studies = Table(
    "alliance_studies",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("title", Text, nullable=False),
    Column("purpose", String(64), nullable=False),
    Column("config_json", Text, nullable=False),
    # draft, proposed, active, suspended, closed ("open" in stores before the lifecycle: active)
    Column("status", String(16), nullable=False),
    Column("created", String(40), nullable=False),
)

# Every version of every study, as the lead wrote it (version 1 at creation, one per amendment).
study_versions = Table(
    "alliance_study_versions",
    metadata,
    Column("study_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("config_json", Text, nullable=False),
    Column("created", String(40), nullable=False),
    Column("actor", String(128), nullable=False),
)

# Every site decision on a study version, as the site signed it (verified on arrival).
study_decisions = Table(
    "alliance_study_decisions",
    metadata,
    Column("signature", String(128), primary_key=True),
    Column("site", String(64), nullable=False, index=True),
    Column("study_id", String(64), nullable=False, index=True),
    Column("version", Integer, nullable=False),
    Column("study_digest", String(64), nullable=False),
    Column("decision", String(16), nullable=False),  # approved, refused
    Column("reason", Text, nullable=False),
    Column("decided_by", String(128), nullable=False),
    Column("decided_at", String(40), nullable=False),
    Column("public_key", String(64), nullable=False),
    Column("message", Text, nullable=False),  # the signed message, hex
    Column("received", String(40), nullable=False),
)

requests = Table(
    "alliance_requests",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("study_id", String(64), nullable=False, index=True),
    Column("researcher", String(128), nullable=False),
    Column("analysis", String(64), nullable=False),
    Column("request_json", Text, nullable=False),
    Column("status", String(16), nullable=False),  # running, done, failed
    Column("error", Text),
    Column("created", String(40), nullable=False),
    Column("finished", String(40)),
)

results = Table(
    "alliance_results",
    metadata,
    Column("request_id", String(40), primary_key=True),
    Column("result_json", Text, nullable=False),
    Column("created", String(40), nullable=False),
)

audit = Table(
    "alliance_audit",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("time", String(40), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("detail", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
)

sites = Table(
    "alliance_sites",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("status", String(16), nullable=False),  # connected, disconnected
    Column("version", String(32)),
    Column("dictionary_digest", String(64)),
    Column("first_seen", String(40), nullable=False),
    Column("last_seen", String(40), nullable=False),
    Column("last_seen_unix", Float, nullable=False),
)
scripts = Table(
    "alliance_scripts",
    metadata,
    Column("hash", String(64), primary_key=True),
    Column("study_id", String(64), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("version", String(32), nullable=False),
    Column("module", Text, nullable=False),
    Column("manifest", Text, nullable=False),
    Column("submitted_by", String(128), nullable=False),
    Column("submitted", String(40), nullable=False),
)

# A site's signed receipt for each reply (written with its request, listed by digest in the
# request's audit entry): proof of what the site answered and of its audit head at that moment.
receipts = Table(
    "alliance_receipts",
    metadata,
    Column("task_id", String(200), primary_key=True),
    Column("request_id", String(40), nullable=False, index=True),
    Column("site", String(64), nullable=False, index=True),
    Column("request_digest", String(64), nullable=False),
    Column("reply_digest", String(64), nullable=False),
    Column("audit_seq", Integer, nullable=False),
    Column("audit_hash", String(64), nullable=False),
    Column("public_key", String(64), nullable=False),
    Column("signature", String(128), nullable=False),
    Column("received", String(40), nullable=False),
)

# Every signing key a site has presented in its Hello (over mutual TLS), first seen when.
site_keys = Table(
    "alliance_site_keys",
    metadata,
    Column("site", String(64), primary_key=True),
    Column("public_key", String(64), primary_key=True),
    Column("first_seen", String(40), nullable=False),
)

# Written once and never changed: the store refuses UPDATE and DELETE on these (triggers).
APPEND_ONLY = (
    "alliance_audit",
    "alliance_receipts",
    "alliance_requests",
    "alliance_results",
    "alliance_site_keys",
    "alliance_study_decisions",
    "alliance_study_versions",
)
