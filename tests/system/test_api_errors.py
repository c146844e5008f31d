"""Every HTTP error has one shape, checked by one helper (after datasette)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from simulations.federation import LocalFederation, child_env
from simulations.heart import heart_dictionary
from tests.api_shape import assert_api_error
from tests.system.conftest import ADMIN_INVITED, ADMIN_OTHER, OUTSIDER, SITES

pytestmark = pytest.mark.system


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
    researcher = {"Authorization": f"Bearer {off_federation.researcher_token}"}
    with httpx.Client(base_url=off_federation.url) as http:
        assert http.get("/api/health").json() == {"ok": True}  # up; which sites needs a token
        health = http.get("/api/health", headers=researcher).json()
        assert sorted(health["sites"]) == ["cleveland", "hungarian", "switzerland", "va"]
        sites = http.get("/api/sites", headers=researcher).json()
        assert {s["name"]: s["status"] for s in sites["sites"]}["va"] == "connected"


# ----------------------------------------------------------------------------- access control

ROLES = (
    "lead",
    "named researcher",
    "unnamed researcher",
    "site admin of an invited site",
    "site admin of another site",
    "no token",
    "unknown token",
)
NEW_STUDY = {"id": "walk-created", "title": "created by the lead during the walk"}
COUNT = {"analysis": "count"}
AMENDED = {"id": "walk-close", "title": "closed by the lead during the walk, amended"}
# Every endpoint, and the status each role gets, in the order of ROLES. {study} is a study that
# names the researcher and invites cleveland; {request} one of its requests; {closable} a study
# the lead may close. A study or request someone may not see answers exactly as a missing one.
WALK: list[tuple[str, str, dict[str, object] | None, tuple[int, ...]]] = [
    ("GET", "/api/health", None, (200, 200, 200, 200, 200, 200, 401)),
    ("GET", "/api/analyses", None, (200, 200, 200, 200, 200, 401, 401)),
    ("GET", "/api/sites", None, (200, 200, 200, 200, 200, 401, 401)),
    ("GET", "/api/studies", None, (200, 200, 200, 200, 200, 401, 401)),
    ("POST", "/api/studies", NEW_STUDY, (200, 403, 403, 403, 403, 401, 401)),
    ("GET", "/api/studies/{study}", None, (200, 200, 404, 200, 404, 401, 401)),
    ("GET", "/api/studies/nope", None, (404, 404, 404, 404, 404, 401, 401)),
    ("POST", "/api/studies/{study}/requests", COUNT, (200, 200, 404, 403, 403, 401, 401)),
    ("POST", "/api/studies/nope/requests", COUNT, (404, 404, 404, 403, 403, 401, 401)),
    ("GET", "/api/requests/{request}", None, (200, 200, 404, 200, 404, 401, 401)),
    ("GET", "/api/requests/nope", None, (404, 404, 404, 404, 404, 401, 401)),
    # The lifecycle is the lead's alone: a researcher or a site admin can neither suspend,
    # resume, amend nor close (a site approves with its own key, at the site).
    ("POST", "/api/studies/{closable}/suspend", None, (200, 403, 403, 403, 403, 401, 401)),
    ("POST", "/api/studies/{closable}/resume", None, (200, 403, 403, 403, 403, 401, 401)),
    ("PUT", "/api/studies/{closable}", AMENDED, (200, 403, 403, 403, 403, 401, 401)),
    ("POST", "/api/studies/{closable}/close", None, (200, 403, 403, 403, 403, 401, 401)),
    ("GET", "/api/audit/verify", None, (200, 403, 403, 403, 403, 401, 401)),
    ("GET", "/api/studies/{study}/report", None, (200, 200, 404, 403, 403, 401, 401)),
    ("GET", "/api/studies/nope/report", None, (404, 404, 404, 403, 403, 401, 401)),
    ("GET", "/api/studies/{study}/cross-check", None, (200, 403, 403, 403, 403, 401, 401)),
    ("GET", "/api/studies/nope/cross-check", None, (404, 403, 403, 403, 403, 401, 401)),
    # The public registry: open to anyone, whatever token is (or is not) sent.
    ("GET", "/api/registry", None, (200, 200, 200, 200, 200, 200, 200)),
]  # fmt: skip


def role_headers(federation: LocalFederation) -> dict[str, dict[str, str]]:
    tokens = {
        "lead": federation.lead_token,
        "named researcher": federation.researcher_token,
        "unnamed researcher": OUTSIDER["token"],
        "site admin of an invited site": ADMIN_INVITED["token"],
        "site admin of another site": ADMIN_OTHER["token"],
        "unknown token": "not-a-token-anyone-was-given",
    }
    headers = {role: {"Authorization": f"Bearer {token}"} for role, token in tokens.items()}
    headers["no token"] = {}
    return headers


def test_every_endpoint_with_every_role_gets_its_status(off_federation: LocalFederation) -> None:
    headers = role_headers(off_federation)
    with httpx.Client(base_url=off_federation.url, timeout=60) as http:
        lead = headers["lead"]
        closable = {"id": "walk-close", "title": "closed by the lead during the walk"}
        assert http.post("/api/studies", headers=lead, json=closable).status_code == 200
        ran = http.post(
            "/api/studies/s1/requests",
            headers=headers["named researcher"],
            json={"analysis": "count"},
        ).json()
        assert ran["status"] == "done", ran
        names = {"study": "s1", "request": ran["request_id"], "closable": "walk-close"}
        for method, template, body, expected in WALK:
            path = template.format(**names)
            for role, status in zip(ROLES, expected, strict=True):
                response = http.request(method, path, headers=headers[role], json=body)
                if status == 200:
                    assert response.status_code == 200, (method, path, role, response.text)
                    assert response.json()["ok"] is True
                else:
                    assert_api_error(response, status)
                    if status == 404 and "{" in template:
                        # No existence oracle: the same answer as for an id that does not exist.
                        hidden = path.split("/")[3]
                        missing = http.request(
                            method, path.replace(hidden, "nope"), headers=headers[role], json=body
                        )
                        assert_api_error(missing, 404)
                        assert missing.json()["error"] == response.json()["error"].replace(
                            repr(hidden), "'nope'"
                        )


def test_a_site_admin_sees_only_their_own_sites_part(off_federation: LocalFederation) -> None:
    headers = role_headers(off_federation)
    with httpx.Client(base_url=off_federation.url, timeout=60) as http:
        ran = http.post(
            "/api/studies/s1/requests",
            headers=headers["named researcher"],
            json={"analysis": "count"},
        ).json()
        assert ran["result"]["count"] == 920  # what the researcher reads
        admin = headers["site admin of an invited site"]
        seen = http.get(f"/api/requests/{ran['request_id']}", headers=admin).json()
        assert seen["status"] == "done" and seen["analysis"] == "count"
        assert seen["result"] == {
            "analysis": "count",
            "sites": [s for s in ran["result"]["sites"] if s["name"] == "cleveland"],
        }
        study = http.get("/api/studies/s1", headers=admin).json()
        for request in study["requests"]:
            assert [s["name"] for s in (request["result"] or {"sites": []})["sites"]] in (
                [],
                ["cleveland"],
            )
            assert "count" not in (request["result"] or {})
        assert [s["name"] for s in http.get("/api/sites", headers=admin).json()["sites"]] == [
            "cleveland"
        ]
        assert http.get("/api/health", headers=admin).json()["sites"] == ["cleveland"]
        other = headers["site admin of another site"]
        assert http.get("/api/sites", headers=other).json()["sites"] == []
        assert "s1" not in [
            s["id"] for s in http.get("/api/studies", headers=other).json()["studies"]
        ]
        assert "s1" in [s["id"] for s in http.get("/api/studies", headers=admin).json()["studies"]]


def test_a_researcher_sees_only_the_studies_that_name_them(off_federation: LocalFederation) -> None:
    headers = role_headers(off_federation)
    with httpx.Client(base_url=off_federation.url, timeout=60) as http:
        named = http.get("/api/studies", headers=headers["named researcher"]).json()["studies"]
        outsider = http.get("/api/studies", headers=headers["unnamed researcher"]).json()
        assert "s1" in [s["id"] for s in named]
        assert "s1" not in [s["id"] for s in outsider["studies"]]
        sites = http.get("/api/sites", headers=headers["unnamed researcher"]).json()["sites"]
        assert {s["name"]: s["status"] for s in sites}["va"] == "connected"
        assert all(set(s) == {"name", "status"} for s in sites)  # no counts, versions or digests
        assert http.get("/api/health").json() == {"ok": True}  # liveness only, without a token


# ----------------------------------------------------------------------------- budget cap


@pytest.mark.parametrize("epsilon", [3.0, 1.200000000001], ids=["whole-budget", "just-over"])
def test_a_request_over_the_studys_epsilon_per_request_is_refused_before_any_task_leaves(
    off_federation: LocalFederation, epsilon: float
) -> None:
    from protocol.budget import PureDP, over_request_cap

    headers = role_headers(off_federation)["named researcher"]
    with httpx.Client(base_url=off_federation.url, timeout=60) as http:
        before = len(http.get("/api/studies/s1", headers=headers).json()["requests"])
        refused = http.post(
            "/api/studies/s1/requests",
            headers=headers,
            json={"analysis": "count", "epsilon": epsilon},
        )
        assert_api_error(refused, 400, over_request_cap("s1", PureDP(epsilon), PureDP(0.5)))
        after = http.get("/api/studies/s1", headers=headers).json()["requests"]
        assert len(after) == before  # nothing was stored, so nothing was sent
        lower = http.post(
            "/api/studies/s1/requests", headers=headers, json={"analysis": "count", "epsilon": 0.2}
        )
        assert lower.status_code == 200 and lower.json()["status"] == "done"


def test_researchers_see_only_the_coordinators_wall_time(off_federation: LocalFederation) -> None:
    with off_federation.researcher() as client:
        result = client.run("s1", {"analysis": "glm", "params": {"formula": "disease ~ age"}})
    assert set(result["timings"]) == {"total_seconds", "rounds"}
    assert result["timings"]["rounds"] >= 2


# ----------------------------------------------------------------------------- the command line


def alliance(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = child_env()
    env.pop("ALLIANCE_TOKEN", None)
    if token is not None:
        env["ALLIANCE_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("token", [None, "", "   "], ids=["missing", "empty", "blank"])
def test_a_missing_token_is_one_line_that_says_where_tokens_come_from(
    off_federation: LocalFederation, token: str | None
) -> None:
    args = ["study", "list", "--url", off_federation.url]
    line = one_error_line(alliance(*args, token=token))
    assert line == (
        "error: no API token: pass --token or set ALLIANCE_TOKEN; the alliance lead issues tokens"
    )
    line = one_error_line(alliance("run", "x.yaml", "--study", "s1", "--url", off_federation.url))
    assert line.startswith("error: ")  # the request file is missing: said first, in one line


def test_the_site_link_port_is_not_the_http_api(off_federation: LocalFederation) -> None:
    url = f"http://{off_federation.site_link}"
    line = one_error_line(alliance("study", "list", "--url", url, "--token", "x" * 20))
    assert line == (
        f"error: the server at {url} did not answer as Alliance's HTTP API (is this the "
        "site-link port? the API is the coordinator's `http` address)"
    )


def test_an_unknown_token_and_a_bad_url_are_one_line_each(off_federation: LocalFederation) -> None:
    line = one_error_line(
        alliance("study", "list", "--url", off_federation.url, "--token", "x" * 20)
    )
    assert line == (
        "error: unknown API token; check --token or ALLIANCE_TOKEN (the alliance lead issues "
        "tokens)"
    )
    line = one_error_line(alliance("study", "list", "--url", "127.0.0.1:8080", "--token", "x" * 20))
    assert "http://" in line


# ----------------------------------------------------------------------------- registry


def test_the_public_registry_says_who_uses_the_data_and_publishes_no_value(
    off_federation: LocalFederation,
) -> None:
    headers = role_headers(off_federation)
    with httpx.Client(base_url=off_federation.url, timeout=60) as http:
        ran = http.post(
            "/api/studies/s1/requests",
            headers=headers["named researcher"],
            json={"analysis": "count"},
        ).json()
        assert ran["status"] == "done"
        exact = str(ran["result"]["count"])  # mode off: an exact count
        listed = http.get("/api/registry")  # no token at all
        page = http.get("/registry")
    assert listed.status_code == 200 and page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    [entry] = [s for s in listed.json()["studies"] if s["id"] == "s1"]
    assert entry["status"] == "active" and entry["purpose"] == "research"
    assert entry["hospitals"] == sorted(SITES)
    assert entry["results"]["count"] >= 1
    assert "counts of patients" in entry["summary"] or "a count of patients" in entry["summary"]
    body = listed.text + page.text
    assert exact not in body  # no released value
    # Public fields only: no researcher, no request, no per-site figure.
    assert set(entry) == {
        "id",
        "title",
        "purpose",
        "lead",
        "status",
        "hospitals",
        "invited",
        "results",
        "summary",
    }
    assert "system test (off)" in page.text and "Hospitals taking part" in page.text


def test_alliance_sites_lists_what_each_role_may_see(off_federation: LocalFederation) -> None:
    lead = alliance("sites", "--url", off_federation.url, token=off_federation.lead_token)
    assert lead.returncode == 0, lead.stderr
    lines = lead.stdout.splitlines()
    assert [line.split()[0] for line in lines] == sorted(SITES)
    digest = heart_dictionary().digest()[:12]
    for line in lines:
        assert "connected" in line and f"dictionary {digest}" in line and "last seen 20" in line
    researcher = alliance(
        "sites", "--url", off_federation.url, token=off_federation.researcher_token
    )
    assert researcher.returncode == 0, researcher.stderr
    assert all(len(line.split()) == 2 for line in researcher.stdout.splitlines())  # name, status
