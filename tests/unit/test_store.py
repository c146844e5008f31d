"""The coordinator's store: the same code on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

from coordinator.store import Store, models
from protocol.errors import ConfigError, ValidationError

PG_URL = os.environ.get("ALLIANCE_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _postgres_available() -> str | None:
    try:
        engine = sqlalchemy.create_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any failure means: not available here
        return f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    else:
        problem = _postgres_available()
        if problem:
            if os.environ.get("ALLIANCE_REQUIRE_PG") == "1":
                pytest.fail(f"ALLIANCE_REQUIRE_PG=1 but {problem}")
            pytest.skip(problem)
        schema = f"alliance_test_{uuid.uuid4().hex[:8]}"
        admin = sqlalchemy.create_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
        url = PG_URL + f"?options=-csearch_path%3D{schema}"
    s = Store(url)
    try:
        yield s
    finally:
        s.close()
        if request.param == "postgresql":
            with admin.begin() as conn:
                conn.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()


def test_studies_requests_results_and_audit_round_trip(store: Store) -> None:
    store.create_study({"id": "s1", "title": "T", "purpose": "research"}, "lead")
    with pytest.raises(ValidationError, match="study 's1' exists already"):
        store.create_study({"id": "s1", "title": "T", "purpose": "research"}, "lead")
    result = {
        "analysis": "count",
        "count": 3.0,
        "sites": [{"name": "a", "status": "ok", "epsilon": 0.5}],
    }
    submitted = "2026-12-02T10:00:00.000000+00:00"
    store.record_request(
        request_id="r1",
        study_id="s1",
        researcher="r.chen",
        request={"analysis": "count"},
        submitted=submitted,
        result=result,
        error=None,
    )
    store.site_seen("a", "connected", {"version": "0.1.0", "dictionary_digest": "abc"})
    got = store.request("r1")
    assert got is not None and got["status"] == "done" and got["result"] == result
    assert got["created"] == submitted
    assert [s["id"] for s in store.studies()] == ["s1"]
    assert store.sites()[0]["version"] == "0.1.0"
    assert "records" not in store.sites()[0]  # no site's exact size is kept
    actions = [e.action for e in store.audit_entries()]
    assert actions == ["study_created", "request_submitted", "request_finished", "site_connected"]
    assert store.verify_audit().ok


def test_an_edited_audit_entry_is_detected(store: Store) -> None:
    store.create_study({"id": "s2", "title": "T", "purpose": "research"}, "lead")
    store.close_study("s2", "lead")
    with store.engine.begin() as conn:
        conn.execute(models.audit.update().where(models.audit.c.seq == 1).values(actor="mallory"))
    report = store.verify_audit()
    assert not report.ok
    assert report.problem == "entry 1 (study_created) was altered after it was written"


def test_a_failed_request_keeps_its_error(store: Store) -> None:
    store.create_study({"id": "s3", "title": "T", "purpose": "research"}, "lead")
    store.record_request(
        request_id="r2",
        study_id="s3",
        researcher="r.chen",
        request={"analysis": "mean"},
        submitted="2026-12-02T10:00:00.000000+00:00",
        result=None,
        error="no site contributed",
    )
    got = store.request("r2")
    assert got is not None and (got["status"], got["error"]) == ("failed", "no site contributed")


def test_a_bad_store_url_is_one_clear_line() -> None:
    with pytest.raises(ConfigError, match="store: 'nosuchdb://x' is not a usable database URL"):
        Store("nosuchdb://x")


def test_a_request_that_fails_to_store_moves_no_chain_head(store: Store) -> None:
    store.create_study({"id": "s4", "title": "T", "purpose": "research"}, "lead")
    record = {
        "study_id": "s4",
        "researcher": "r.chen",
        "request": {"analysis": "count"},
        "submitted": "2026-12-02T10:00:00.000000+00:00",
        "result": None,
        "error": "x",
    }
    store.record_request(request_id="dup", **record)
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        store.record_request(request_id="dup", **record)  # the same id again: rolled back
    store.close_study("s4", "lead")  # the chain goes on from the last committed entry
    assert store.verify_audit().ok


def test_a_reopened_store_continues_the_chain(store: Store) -> None:
    store.create_study({"id": "s5", "title": "T", "purpose": "research"}, "lead")
    again = Store(str(store.engine.url.render_as_string(hide_password=False)))
    try:
        again.close_study("s5", "lead")
        assert again.verify_audit().ok and len(again.audit_entries()) == 2
    finally:
        again.close()
