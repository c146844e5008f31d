"""Schemathesis against the coordinator's own OpenAPI document: no 500, no undocumented response.

A real uvicorn server on loopback runs the coordinator's app over a real SQLite store and an
empty site registry (requests that reach the scheduler fail fast: no site is connected).
Schemathesis reads ``/openapi.json`` from it and generates requests for every operation, valid
and invalid, with the lead's token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    status_code_conformance,
)

from coordinator.store import Store
from tests.served_api import coordinator_app, served_app

LEAD = "lead-token-for-the-schema-tests"
AUTH = {"Authorization": f"Bearer {LEAD}"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("schema")


@pytest.fixture(scope="module")
def served(folder: Path) -> Iterator[str]:
    store = Store(f"sqlite:///{folder / 'coordinator.db'}")
    try:
        with served_app(store, LEAD, log_level="critical") as port:
            url = f"http://127.0.0.1:{port}"
            study = {"id": "s1", "title": "schema", "privacy": {"mode": "off"}, "quorum": 0}
            assert httpx.post(f"{url}/api/studies", headers=AUTH, json=study).status_code == 200
            yield url
    finally:
        store.close()


# The document the served app gives (it depends on no state; schemathesis' lazy fixture loader
# does not run on pytest 9, so the operations are collected from the same document here).
_DOCUMENT_STORE = Store("sqlite://")
schema = schemathesis.openapi.from_dict(coordinator_app(_DOCUMENT_STORE, LEAD).openapi())
_DOCUMENT_STORE.close()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples on every run: a failure reproduces
)
def test_no_server_error_and_no_undocumented_response(case: schemathesis.Case, served: str) -> None:
    assert httpx.get(f"{served}/openapi.json").json() == case.operation.schema.raw_schema
    case.call_and_validate(
        base_url=served,
        headers=AUTH,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance],
    )


def test_the_document_names_every_error_the_api_gives(served: str) -> None:
    spec = httpx.get(f"{served}/openapi.json").json()
    operations = [(path, op) for path, ops in spec["paths"].items() for op in ops.values()]
    assert len(operations) >= 14
    for path, operation in operations:
        assert "413" in operation["responses"], path  # every endpoint limits its body
        if path not in ("/api/registry", "/registry"):
            assert "401" in operation["responses"], path
            assert operation["security"][0] == {"bearer": []}, path
    submit = spec["paths"]["/api/studies/{study_id}/requests"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AnalysisRequest"
    }
    assert "AnalysisRequest" in spec["components"]["schemas"]


def _calls(folder: Path) -> list[tuple[str, str, int]]:
    """(who, path, status) of every audited API call, and whether the chain verifies."""
    store = Store.open_read_only(folder / "coordinator.db")
    try:
        assert store.verify_audit().ok
        details = [(e.actor, json.loads(e.detail)) for e in store.audit_entries()]
    finally:
        store.close()
    return [(who, d["path"], d["status"]) for who, d in details if "path" in d and "method" in d]


def test_every_call_with_a_token_is_audited_with_who_made_it(served: str, folder: Path) -> None:
    before = _calls(folder)
    httpx.get(f"{served}/api/studies/s1", headers=AUTH)
    httpx.get(f"{served}/api/studies/nope", headers=AUTH)  # a 404 is audited too
    httpx.get(f"{served}/api/registry")  # public: nobody to name, not audited
    httpx.get(f"{served}/api/health", headers={"Authorization": "Bearer not-a-token"})
    httpx.get(f"{served}/api/analyses", headers=AUTH)  # after the two that must not appear
    deadline = time.monotonic() + 10
    while len(new := _calls(folder)[len(before) :]) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # written once the response has gone out
    assert new == [
        ("lead", "/api/studies/s1", 200),
        ("lead", "/api/studies/nope", 404),
        ("lead", "/api/analyses", 200),
    ]
