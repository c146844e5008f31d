"""The one error shape of the HTTP API, checked by one helper (after datasette)."""

from __future__ import annotations

import httpx


def assert_api_error(response: httpx.Response, status: int, contains: str = "") -> None:
    """The one error shape: ok false, the status twice, a message and a list of messages."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"ok", "status", "error", "errors"}
    assert body["ok"] is False and body["status"] == status
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["errors"], list) and body["errors"]
    assert contains in body["error"], body["error"]
