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
from protocol.signing import Receipt, SigningKey

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


SITE_KEY = SigningKey.generate()


def signed_receipt(task_id: str, site: str = "va") -> Receipt:
    """A receipt as site ``site`` signs it (digests and head are made up: only the signature
    and the bookkeeping matter here)."""
    receipt = Receipt(site, task_id, "1" * 64, "2" * 64, 7, "3" * 64, SITE_KEY.public_hex)
    return receipt.signed(SITE_KEY)


def drop_guards(store: Store) -> None:
    """What anyone holding the database can do: drop the append-only triggers."""
    with store.engine.begin() as conn:
        for table in models.APPEND_ONLY:
            if store.dialect == "sqlite":
                for verb in ("update", "delete"):
                    conn.exec_driver_sql(f"DROP TRIGGER {table}_no_{verb}")
            else:
                conn.exec_driver_sql(f"DROP TRIGGER {table}_append_only ON {table}")
                conn.exec_driver_sql(f"DROP TRIGGER {table}_no_truncate ON {table}")


@pytest.mark.parametrize("table", models.APPEND_ONLY)
def test_the_tables_written_once_refuse_update_and_delete(store: Store, table: str) -> None:
    store.create_study({"id": "s9", "title": "T", "purpose": "research"}, "lead")
    store.record_request(
        request_id="r9",
        study_id="s9",
        researcher="r.alice",
        request={"analysis": "count"},
        submitted="2026-12-04T00:00:00+00:00",
        result={"sites": []},
        error=None,
        receipts=[signed_receipt("r9.0.va")],
    )
    store.register_site_key("va", SITE_KEY.public_hex)
    store.record_study_decision(
        {
            "signature": "ab" * 64,
            "site": "va",
            "study_id": "s9",
            "version": 1,
            "study_digest": "",
            "decision": "approved",
            "reason": "",
            "decided_by": "it",
            "decided_at": "2026-12-04T00:00:00+00:00",
            "public_key": SITE_KEY.public_hex,
            "message": "",
        }
    )
    for statement in (
        f"UPDATE {table} SET {_first_column(table)} = {_first_column(table)}",
        f"DELETE FROM {table}",
    ):
        with (
            pytest.raises(sqlalchemy.exc.DBAPIError, match="append-only"),
            store.engine.begin() as conn,
        ):
            conn.exec_driver_sql(statement)
    if store.dialect == "postgresql":
        with (
            pytest.raises(sqlalchemy.exc.DBAPIError, match="append-only"),
            store.engine.begin() as conn,
        ):
            conn.exec_driver_sql(f"TRUNCATE {table}")
    # Reopening the store (a coordinator restart) keeps the guards and works.
    Store(str(store.engine.url)).close()
    assert store.verify_audit().ok


def _first_column(table: str) -> str:
    return next(iter(models.metadata.tables[table].columns)).name


def test_an_edited_audit_entry_is_detected(store: Store) -> None:
    store.create_study({"id": "s2", "title": "T", "purpose": "research"}, "lead")
    store.close_study("s2", "lead")
    drop_guards(store)
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


def _request_with_receipts(store: Store, request_id: str, receipts: list[Receipt]) -> None:
    if store.study("s7") is None:
        store.create_study({"id": "s7", "title": "T", "purpose": "research"}, "lead")
    store.record_request(
        request_id=request_id,
        study_id="s7",
        researcher="r.alice",
        request={"analysis": "count"},
        submitted="2026-12-04T00:00:00+00:00",
        result={"sites": []},
        error=None,
        receipts=receipts,
    )


def test_stored_receipts_verify_and_are_listed_in_the_chain(store: Store) -> None:
    store.register_site_key("va", SITE_KEY.public_hex)
    receipts = [signed_receipt("r1.0.va"), signed_receipt("r1.1.va")]
    _request_with_receipts(store, "r1", receipts)
    assert store.integrity_problems() == []
    assert store.receipts("va") == receipts
    assert store.receipts("cleveland") == []


def test_a_deleted_receipt_is_named(store: Store) -> None:
    store.register_site_key("va", SITE_KEY.public_hex)
    _request_with_receipts(store, "r1", [signed_receipt("r1.0.va"), signed_receipt("r1.1.va")])
    drop_guards(store)
    with store.engine.begin() as conn:
        conn.execute(models.receipts.delete().where(models.receipts.c.task_id == "r1.1.va"))
    problems = store.integrity_problems()
    assert len(problems) == 1
    assert "receipt for task r1.1.va (listed in audit entry" in problems[0]
    assert "a row was deleted" in problems[0]


def test_an_edited_receipt_is_named(store: Store) -> None:
    # A coordinator that would lower the head a site signed, to cover for a cut-off site log.
    store.register_site_key("va", SITE_KEY.public_hex)
    _request_with_receipts(store, "r1", [signed_receipt("r1.0.va")])
    drop_guards(store)
    with store.engine.begin() as conn:
        conn.execute(models.receipts.update().values(audit_seq=2))
    problems = store.integrity_problems()
    assert any("r1.0.va (site va): its signature does not verify" in p for p in problems)
    assert any("r1.0.va" in p and "the row was changed" in p for p in problems)


def test_an_inserted_receipt_and_a_key_the_site_never_presented_are_named(
    store: Store,
) -> None:
    store.register_site_key("va", SITE_KEY.public_hex)
    _request_with_receipts(store, "r1", [signed_receipt("r1.0.va")])
    forger = SigningKey.generate()
    forged = Receipt("va", "r0.0.va", "1" * 64, "2" * 64, 1, "3" * 64, forger.public_hex)
    forged = forged.signed(forger)
    row = {**forged.to_json(), "request_id": "r0", "received": "2026-12-04T00:00:00+00:00"}
    with store.engine.begin() as conn:  # INSERT is allowed: the chain is what catches it
        conn.execute(models.receipts.insert().values(**row))
    problems = store.integrity_problems()
    assert any("r0.0.va" in p and "never presented" in p for p in problems)
    assert any("r0.0.va" in p and "no audit entry lists it" in p for p in problems)
