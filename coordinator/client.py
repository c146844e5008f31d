"""The researcher's Python API over the coordinator's HTTP API.

client = AllianceClient("http://127.0.0.1:8080", token="...")
result = client.run("cardio-2026", {"analysis": "mean", "params": {"variable": "age"}})
result["mean"], result["sites"]
"""

from __future__ import annotations

import socket
from typing import Any

import httpx

from analyses.results import ResultView
from protocol.errors import AllianceError, LinkError


class APIRequestError(AllianceError):
    """The coordinator answered with an error (its one error shape)."""

    def __init__(self, status: int, error: str, errors: list[str]) -> None:
        super().__init__(error)
        self.status = status
        self.errors = errors


class AllianceClient:
    """A thin, typed client; every call returns the JSON body or raises APIRequestError."""

    def __init__(self, url: str, token: str, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        # TCP_NODELAY: without it, small requests wait ~40 ms for delayed ACKs (Nagle).
        transport = httpx.HTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {token}"},
            transport=transport,
        )

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> AllianceClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise LinkError(
                f"the coordinator at {self.url} is not reachable (connection "
                "refused); is `alliance coordinator serve` running?"
            ) from None
        except httpx.TimeoutException:
            raise LinkError(f"the coordinator at {self.url} did not answer in time") from None
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            raise APIRequestError(
                response.status_code, f"HTTP {response.status_code}: {response.text[:200]}", []
            ) from None
        if not body.get("ok", False):
            raise APIRequestError(
                body.get("status", response.status_code),
                body.get("error", "unknown error"),
                body.get("errors", []),
            )
        return body

    def health(self) -> dict[str, Any]:
        """Connected sites (no token needed)."""
        return self._call("GET", "/api/health")

    def sites(self) -> list[dict[str, Any]]:
        """Every site the coordinator knows, with its state."""
        return list(self._call("GET", "/api/sites")["sites"])

    def create_study(self, study: dict[str, Any]) -> dict[str, Any]:
        """Create a study (alliance lead)."""
        return dict(self._call("POST", "/api/studies", json=study)["study"])

    def studies(self) -> list[dict[str, Any]]:
        """Every study."""
        return list(self._call("GET", "/api/studies")["studies"])

    def study(self, study_id: str) -> dict[str, Any]:
        """One study with its requests and results."""
        return self._call("GET", f"/api/studies/{study_id}")

    def close_study(self, study_id: str) -> dict[str, Any]:
        """Close a study (alliance lead)."""
        return self._call("POST", f"/api/studies/{study_id}/close")

    def submit(self, study_id: str, request: dict[str, Any], wait: bool = True) -> dict[str, Any]:
        """Submit a request; with ``wait`` the body holds its status, error and result."""
        return self._call(
            "POST",
            f"/api/studies/{study_id}/requests",
            params={"wait": str(wait).lower()},
            json=request,
        )

    def run(self, study_id: str, request: dict[str, Any]) -> ResultView:
        """Submit, wait, and return the result (raises when the request failed).

        The result reads as the JSON contract (``result["mean"]``) and has ``.summary``,
        ``print()`` and ``.plot()`` like the in-process result objects.
        """
        body = self.submit(study_id, request, wait=True)
        if body.get("status") != "done":
            raise APIRequestError(
                200, body.get("error") or "the request failed", [body.get("error") or ""]
            )
        return ResultView(body["result"])

    def request(self, request_id: str) -> dict[str, Any]:
        """A request's status and result."""
        return self._call("GET", f"/api/requests/{request_id}")
