"""Every HTTP error has one shape, checked by one helper (after datasette)."""

from __future__ import annotations

import httpx
import pytest

from simulations.federation import LocalFederation

pytestmark = pytest.mark.system


def assert_api_error(response: httpx.Response, status: int, contains: str = "") -> None:
    """The one error shape: ok false, the status twice, a message and a list of messages."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"ok", "status", "error", "errors"}
    assert body["ok"] is False and body["status"] == status
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["errors"], list) and body["errors"]
    assert contains in body["error"], body["error"]


def test_every_error_has_the_one_shape(off_federation: LocalFederation) -> None:
    url = off_federation.url
    lead = {"Authorization": f"Bearer {off_federation.lead_token}"}
    researcher = {"Authorization": f"Bearer {off_federation.researcher_token}"}
    with httpx.Client(base_url=url) as http:
        assert_api_error(http.get("/api/studies"), 401, "missing API token")
        assert_api_error(
            http.get("/api/studies", headers={"Authorization": "Bearer nope"}),
            401,
            "unknown API token",
        )
        assert_api_error(
            http.post("/api/studies", headers=researcher, json={}),
            403,
            "role 'researcher' cannot do this; it needs: lead",
        )
        assert_api_error(
            http.get("/api/studies/nope", headers=lead), 404, "study 'nope' does not exist"
        )
        assert_api_error(http.get("/api/requests/nope", headers=lead), 404)
        assert_api_error(http.get("/api/no-such-endpoint", headers=lead), 404)
        assert_api_error(
            http.post("/api/studies", headers=lead, content=b"{not json"), 400, "not valid JSON"
        )
        assert_api_error(
            http.post("/api/studies", headers=lead, json={"id": "x"}),
            400,
            "study: title: is required but missing",
        )
        assert_api_error(
            http.post("/api/studies", headers=lead, json={"id": "s1", "title": "again"}),
            400,
            "exists already",
        )
        assert_api_error(
            http.post(
                "/api/studies/s1/requests",
                headers=researcher,
                json={"analysis": "mean", "params": {"variable": 3}},
            ),
            400,
            "analysis 'mean': params: variable: 3: Input should be a valid string",
        )
        assert_api_error(
            http.post(
                "/api/studies/s1/requests",
                headers=researcher,
                json={"analysis": "count", "bogus": 1},
            ),
            400,
            "request: bogus: is not a known field",
        )


def test_health_and_sites_need_no_secrets_beyond_a_token(off_federation: LocalFederation) -> None:
    with httpx.Client(base_url=off_federation.url) as http:
        health = http.get("/api/health").json()
        assert sorted(health["sites"]) == ["cleveland", "hungarian", "switzerland", "va"]
        sites = http.get(
            "/api/sites", headers={"Authorization": f"Bearer {off_federation.researcher_token}"}
        ).json()
        assert {s["name"]: s["status"] for s in sites["sites"]}["va"] == "connected"
