"""The researcher's Python API over the coordinator's HTTP API.

client = AllianceClient("http://127.0.0.1:8080", token="...")
result = client.run("cardio-2026", {"analysis": "mean", "params": {"variable": "age"}})
result["mean"], result["sites"]
"""

from __future__ import annotations

import re
import socket
from typing import Any

import httpx

from analyses import AnalysisResult, get_analysis
from protocol.errors import AllianceError, ConfigError, LinkError

#: What a token can hold: printable ASCII without spaces (a header value cannot hold more).
_TOKEN = re.compile(r"[!-~]+")
NO_TOKEN = "no API token: pass --token or set ALLIANCE_TOKEN; the alliance lead issues tokens"


class APIRequestError(AllianceError):
    """The coordinator answered with an error (its one error shape)."""

    def __init__(self, status: int, error: str, errors: list[str]) -> None:
        super().__init__(error)
        self.status = status
        self.errors = errors


def result_from_json(data: dict[str, Any]) -> AnalysisResult:
    """The result object of the analysis ``data["analysis"]``, rebuilt from its JSON."""
    result: AnalysisResult = get_analysis(str(data["analysis"])).result_type.from_dict(data)
    return result


class AllianceClient:
    """A thin, typed client; every call returns the JSON body or raises.

    Errors are one line each: :class:`APIRequestError` when the coordinator refused (its own
    words), :class:`~protocol.errors.LinkError` when no Alliance coordinator answered at
    ``url`` (not running, the wrong port, not HTTP), never an httpx traceback.
    """

    def __init__(self, url: str, token: str = "", timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        token = token.strip()  # a token pasted from a file often ends with a newline
        if token and not _TOKEN.fullmatch(token):
            raise ConfigError(
                "the API token holds characters a token never has (spaces, line breaks or "
                "non-ASCII); copy it again from the alliance lead"
            )
        if not self.url.startswith(("http://", "https://")):
            raise LinkError(
                f"the coordinator's URL {url!r} must start with http:// or https:// (its "
                "`http` address, e.g. http://127.0.0.1:8080)"
            )
        # TCP_NODELAY: without it, small requests wait ~40 ms for delayed ACKs (Nagle).
        transport = httpx.HTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        try:
            self._http = httpx.Client(
                base_url=self.url,
                timeout=timeout,
                headers={"Authorization": f"Bearer {token}"} if token else {},
                transport=transport,
            )
        except httpx.InvalidURL as exc:
            raise LinkError(f"the coordinator's URL {url!r} is not a valid URL ({exc})") from None

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> AllianceClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _not_alliance(self, detail: str = "") -> LinkError:
        return LinkError(
            f"the server at {self.url} did not answer as Alliance's HTTP API{detail} (is this "
            "the site-link port? the API is the coordinator's `http` address)"
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._link_error(exc) from None
        except httpx.InvalidURL as exc:
            raise LinkError(f"the coordinator's URL {self.url!r} is not valid ({exc})") from None
        try:
            body = response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type").split(";")[0]
            raise self._not_alliance(f" (HTTP {response.status_code}, {kind})") from None
        if not isinstance(body, dict) or "ok" not in body:
            raise self._not_alliance(f" (HTTP {response.status_code}, JSON of another shape)")
        if not body["ok"]:
            error = str(body.get("error") or f"HTTP {response.status_code}").splitlines()[0]
            if response.status_code == 401:
                error += "; check --token or ALLIANCE_TOKEN (the alliance lead issues tokens)"
            raise APIRequestError(
                body.get("status", response.status_code), error, body.get("errors", [])
            )
        return dict(body)

    def _link_error(self, exc: httpx.TransportError) -> LinkError:
        """One line for each way the connection to the coordinator can fail."""
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, httpx.ConnectError):
            if "refused" in reason.lower():
                return LinkError(
                    f"the coordinator at {self.url} is not reachable (connection "
                    "refused); is `alliance coordinator serve` running?"
                )
            if "ssl" in reason.lower() or "certificate" in reason.lower():
                return LinkError(
                    f"the TLS handshake with {self.url} failed ({reason}); check whether the "
                    "coordinator's `http` address uses http:// or https://"
                )
            return LinkError(
                f"the coordinator at {self.url} is not reachable ({reason}); check the host "
                "and port of its `http` address"
            )
        if isinstance(exc, httpx.TimeoutException):
            return LinkError(f"the coordinator at {self.url} did not answer in time")
        if isinstance(exc, httpx.UnsupportedProtocol):
            return LinkError(
                f"the coordinator's URL {self.url!r} must start with http:// or https://"
            )
        if isinstance(exc, httpx.LocalProtocolError):
            return LinkError(f"the request to {self.url} could not be sent ({reason})")
        if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
            return self._not_alliance()
        return LinkError(f"the connection to the coordinator at {self.url} failed ({reason})")

    def health(self) -> dict[str, Any]:
        """Whether the coordinator is up (no token needed); with a token, the connected sites
        this caller may see."""
        return self._call("GET", "/api/health")

    def sites(self) -> list[dict[str, Any]]:
        """Every site the coordinator knows, with its state."""
        return list(self._call("GET", "/api/sites")["sites"])

    def create_study(self, study: dict[str, Any], draft: bool = False) -> dict[str, Any]:
        """Create a study, proposed to its sites (or a draft) (alliance lead)."""
        params = {"draft": "true"} if draft else None
        return dict(self._call("POST", "/api/studies", json=study, params=params)["study"])

    def study_step(self, study_id: str, step: str, reason: str = "") -> dict[str, Any]:
        """A lifecycle step: propose, suspend, resume or close (alliance lead); the body
        holds the study, its status and version, and the sites told."""
        params = {"reason": reason} if reason else None
        return self._call("POST", f"/api/studies/{study_id}/{step}", params=params)

    def amend_study(self, study: dict[str, Any]) -> dict[str, Any]:
        """Keep a new version of a study (alliance lead)."""
        return self._call("PUT", f"/api/studies/{study['id']}", json=study)

    def studies(self) -> list[dict[str, Any]]:
        """Every study."""
        return list(self._call("GET", "/api/studies")["studies"])

    def study(self, study_id: str) -> dict[str, Any]:
        """One study with its requests and results."""
        return self._call("GET", f"/api/studies/{study_id}")

    def study_report(self, study_id: str) -> dict[str, Any]:
        """A study's report as JSON (lead and the study's researchers)."""
        return dict(self._call("GET", f"/api/studies/{study_id}/report")["report"])

    def cross_check(self, study_id: str) -> list[dict[str, Any]]:
        """Each site's audit log against the coordinator's receipts (alliance lead)."""
        return list(self._call("GET", f"/api/studies/{study_id}/cross-check")["sites"])

    def close_study(self, study_id: str) -> dict[str, Any]:
        """Close a study (alliance lead)."""
        return self.study_step(study_id, "close")

    def submit(self, study_id: str, request: dict[str, Any], wait: bool = True) -> dict[str, Any]:
        """Submit a request; with ``wait`` the body holds its status, error and result."""
        return self._call(
            "POST",
            f"/api/studies/{study_id}/requests",
            params={"wait": str(wait).lower()},
            json=request,
        )

    def run(self, study_id: str, request: dict[str, Any]) -> AnalysisResult:
        """Submit, wait, and return the analysis's own result object (raises when the request
        failed): ``GLMResult``, ``CoxResult``, ... rebuilt from the JSON through the registry,
        with ``.summary``, ``print()``, ``.plot()``, ``.to_dict()`` and ``result["key"]``.
        """
        body = self.submit(study_id, request, wait=True)
        if body.get("status") != "done":
            raise APIRequestError(
                200, body.get("error") or "the request failed", [body.get("error") or ""]
            )
        return result_from_json(body["result"])

    def submit_script(self, study_id: str, module: str, manifest: str) -> dict[str, Any]:
        """Submit a script's module and manifest to a study; the body holds its ``hash``."""
        return self._call(
            "POST",
            f"/api/studies/{study_id}/scripts",
            json={"module": module, "manifest": manifest},
        )

    def request(self, request_id: str) -> dict[str, Any]:
        """A request's status and result."""
        return self._call("GET", f"/api/requests/{request_id}")
