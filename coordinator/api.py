"""The coordinator's HTTP API for people: one error shape for every endpoint.

Every error is ``{"ok": false, "status": N, "error": "...", "errors": ["..."]}``. Every success
has ``"ok": true``. Tokens go in ``Authorization: Bearer <token>``.

Who sees what (``coordinator.auth``): the lead everything; a researcher the studies that name
them, their requests and results; a site admin the studies that invite their site and, of each
request, its metadata and their own site's entry. A study or request a caller may not see
answers 404 exactly as one that does not exist. Without a token, only ``/api/health`` answers,
and only that the coordinator is up.

No single request can take the coordinator down: bodies above ``max_request_bytes`` are
refused with 413 before they are read (by Content-Length, or while streaming), JSON with
non-finite numbers or nested deeper than 32 levels is refused with 400, a model wider than the
study's ``max_model_columns`` is refused before its design is built, and request validation
runs in a worker thread so the site link's event loop never waits for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from analyses import registered_analyses
from coordinator.auth import Principal, TokenBook
from coordinator.link import SiteRegistry, SiteUnavailable
from coordinator.registry import registry_entries, registry_html
from coordinator.report import build_report
from coordinator.scheduler import RequestFailed, Scheduler
from coordinator.store import Store, now
from coordinator.studies import ACTIVE, DRAFT, PROPOSED, StudyBook, StudyStateError
from protocol.config import AnalysisRequest, StudyConfig, parse_model
from protocol.crosscheck import cross_check, entries_from_answer
from protocol.errors import AllianceError, ConfigError, ValidationError
from protocol.version import VERSION

log = logging.getLogger("alliance.coordinator")

#: Arrays and objects inside each other, at most (the top-level object is level 1).
MAX_JSON_DEPTH = 32
#: What each role reads of a known site (``records`` and anything else stay out).
SITE_FIELDS = {
    "lead": ("name", "status", "version", "dictionary_digest", "first_seen", "last_seen"),
    "site_admin": ("name", "status", "version", "dictionary_digest", "first_seen", "last_seen"),
    "researcher": ("name", "status"),
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class APIError(AllianceError):
    """An error with an HTTP status, rendered in the one error shape."""

    def __init__(self, status: int, error: str, errors: list[str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.errors = errors or [error]


def error_body(status: int, error: str, errors: list[str] | None = None) -> dict[str, Any]:
    """The one error shape."""
    return {"ok": False, "status": status, "error": error, "errors": errors or [error]}


def _too_large(limit: int) -> str:
    return (
        f"the request body is larger than the {limit} bytes allowed (max_request_bytes); "
        "send a smaller request"
    )


class BodyLimit:
    """Refuse a body above ``limit`` bytes with 413, without reading it into memory.

    A declared Content-Length above the limit is refused before a byte of the body is read; a
    streamed (chunked) body is counted as it arrives and refused once it passes the limit. The
    413 closes the connection, so the server does not go on draining the rest.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            response = JSONResponse(
                error_body(413, _too_large(self.limit)),
                status_code=413,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise APIError(413, _too_large(self.limit))  # rendered by the app
            return message

        await self.app(scope, counted, send)


class AuditCalls:
    """Audit every API call a token holder makes: who (person and role), the method, the path
    and the status answered, in the coordinator's hash-chained log.

    Written once the response has gone out (the caller does not wait for it), from a worker
    thread. Calls without a token (liveness, the public registry) name nobody and are not
    audited: anyone could fill the log with them.
    """

    def __init__(self, app: ASGIApp, store: Store) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            who = scope.get("state", {}).get("who")
            if isinstance(who, Principal):
                detail = {
                    "role": who.role,
                    **({"site": who.site} if who.site else {}),
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                }
                try:
                    await asyncio.to_thread(self.store.audit, "api_call", detail, who.user)
                except Exception:  # the call was answered; the log says the entry is missing
                    log.exception("could not audit %s %s", scope["method"], scope["path"])


class _NonFinite:
    """A NaN, Infinity or overflowing number met while parsing a body (refused after)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _check_json(value: Any, path: str, depth: int) -> None:
    """Refuse non-finite numbers and deep nesting, naming where (``params.probs[1]``)."""
    where = path or "the request body"
    if isinstance(value, _NonFinite):
        raise APIError(
            400,
            f"{where}: {value.text} is not a finite number; JSON numbers must be finite "
            "(no NaN, Infinity or overflow)",
        )
    if isinstance(value, (dict, list)) and depth > MAX_JSON_DEPTH:
        raise APIError(
            400,
            f"{where}: nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects; "
            "send a flatter body",
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json(item, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]", depth + 1)


def parse_body(raw: bytes) -> Any:
    """A request body as JSON, refusing what would crash or mislead what reads it."""
    try:
        data = json.loads(raw, parse_float=_parse_float, parse_constant=_NonFinite)
    except RecursionError:  # far deeper than MAX_JSON_DEPTH: json gives up on its own
        raise APIError(
            400,
            f"the request body: nested deeper than {MAX_JSON_DEPTH} levels of arrays and "
            "objects; send a flatter body",
        ) from None
    except ValueError as exc:
        where = (
            f" ({exc.msg} at line {exc.lineno}, column {exc.colno})"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise APIError(400, f"the request body is not valid JSON{where}") from None
    _check_json(data, "", 1)
    return data


@dataclass
class Services:
    """What the endpoints work with (kept on ``app.state.services``)."""

    store: Store
    registry: SiteRegistry
    scheduler: Scheduler
    tokens: TokenBook
    studies: StudyBook
    running: dict[str, asyncio.Task[dict[str, Any]]] = field(default_factory=dict)
    #: Requests still running, as ``GET /api/requests/{id}`` shows them (the store gets a
    #: request once, when it finishes: one transaction per request).
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- error shape


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    # After a 413 the rest of the body is not wanted: close rather than drain it.
    headers = {"Connection": "close"} if exc.status == 413 else None
    return JSONResponse(
        error_body(exc.status, exc.error, exc.errors), status_code=exc.status, headers=headers
    )


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return JSONResponse(
        error_body(422, errors[0] if errors else "invalid request", errors), status_code=422
    )


async def _alliance_error(_: Request, exc: Exception) -> JSONResponse:
    status = 400 if isinstance(exc, (ValidationError, ConfigError)) else 500
    if isinstance(exc, StudyStateError):
        status = 409
    lines = str(exc).splitlines() or [type(exc).__name__]
    return JSONResponse(error_body(status, lines[0], lines), status_code=status)


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    message = (
        f"internal error: {type(exc).__name__}: {exc}; this is probably a bug, please "
        "report it with the coordinator's log"
    )
    return JSONResponse(error_body(500, message), status_code=500)


# ----------------------------------------------------------------------------- dependencies
# async: FastAPI runs a plain function dependency in a worker thread on every request.


async def services(request: Request) -> Services:
    """The endpoints' services."""
    found: Services = request.app.state.services
    return found


async def optional_principal(
    request: Request, its: Services = Depends(services)
) -> Principal | None:
    """The caller, or None when no token was sent (an empty one counts as none)."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if not scheme:
        return None
    if scheme.lower() != "bearer":
        raise APIError(401, "the Authorization header must be 'Bearer <token>'")
    if not token.strip():
        return None
    who = its.tokens.identify(token.strip())
    if who is None:
        raise APIError(401, "unknown API token")
    request.state.who = who  # AuditCalls names the caller in the audit log
    return who


async def principal(who: Principal | None = Depends(optional_principal)) -> Principal:
    """The caller, who must have sent a token."""
    if who is None:
        raise APIError(401, "missing API token; send 'Authorization: Bearer <token>'")
    return who


def require(*roles: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency admitting only ``roles``."""

    async def check(who: Principal = Depends(principal)) -> Principal:
        if who.role not in roles:
            raise APIError(403, f"role {who.role!r} cannot do this; it needs: {', '.join(roles)}")
        return who

    return check


def not_found(kind: str, ident: str, who: Principal) -> APIError:
    """The same words whether it is missing or hidden from this caller: no existence oracle."""
    hidden = "" if who.role == "lead" else " or is not shared with you"
    return APIError(404, f"{kind} {ident!r} does not exist{hidden}")


def visible_study(its: Services, study_id: str, who: Principal) -> tuple[StudyConfig, str]:
    """A study the caller may read, or the 404 a missing one gets."""
    loaded = its.studies.get(study_id)
    if loaded is None or not who.can_read(loaded[0]):
        raise not_found("study", study_id, who)
    return loaded


async def body_json(request: Request) -> Any:
    """The request body, parsed and checked (:func:`parse_body`)."""
    return parse_body(await request.body())


# ----------------------------------------------------------------------------- OpenAPI


class ErrorBody(BaseModel):
    """The one error shape of every endpoint."""

    ok: Literal[False]
    status: int
    error: str
    errors: list[str]


class ScriptSubmission(BaseModel):
    """A researcher's script: the module's text and its manifest (YAML text)."""

    module: str
    manifest: str


_WHY = {
    400: "the body or a value is invalid (the error says which and what is allowed)",
    401: "no token, a malformed Authorization header, or an unknown token",
    403: "the token's role cannot do this",
    404: "no such study or request, or it is not shared with this token",
    409: "the study is closed",
    413: "the body is larger than max_request_bytes",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error responses of an endpoint: ``codes`` and 413 (every endpoint
    refuses an oversized body), all in the one error shape."""
    return {code: {"model": ErrorBody, "description": _WHY[code]} for code in sorted({*codes, 413})}


# Bodies the handlers parse themselves (size and depth limits first): documented here.
_BODIES: dict[str, type[BaseModel]] = {
    "StudyConfig": StudyConfig,
    "AnalysisRequest": AnalysisRequest,
    "ScriptSubmission": ScriptSubmission,
}


def request_body(model: str) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON body of ``model``'s schema."""
    ref = {"$ref": f"#/components/schemas/{model}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document: FastAPI's, with the request bodies' schemas and bearer tokens."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name, model in _BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas[name] = body
    spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in spec["paths"].items():
        if path in ("/api/registry", "/registry"):
            continue  # public
        for operation in operations.values():
            # /api/health answers without a token too (liveness only).
            operation["security"] = (
                [{"bearer": []}, {}] if path == "/api/health" else [{"bearer": []}]
            )
    app.openapi_schema = spec
    return spec


# ----------------------------------------------------------------------------- endpoints

router = APIRouter(prefix="/api")


@router.get("/health", responses=errors(401))
async def health(
    who: Principal | None = Depends(optional_principal), its: Services = Depends(services)
) -> dict[str, Any]:
    if who is None:
        return {"ok": True}  # liveness only: which sites are connected needs a token
    connected = its.registry.connected()
    if who.role == "site_admin":
        connected = [name for name in connected if name == who.site]
    return {"ok": True, "sites": connected}


@router.get("/analyses", responses=errors(401))
async def analyses_list(_: Principal = Depends(principal)) -> dict[str, Any]:
    return {"ok": True, "analyses": registered_analyses()}


@router.get("/sites", responses=errors(401))
async def sites(
    who: Principal = Depends(principal), its: Services = Depends(services)
) -> dict[str, Any]:
    known = {s["name"]: s for s in await asyncio.to_thread(its.store.sites)}
    for name in its.registry.connected():
        known.setdefault(name, {"name": name})["status"] = "connected"
    fields = SITE_FIELDS.get(who.role, ("name",))
    shown = [
        {key: site.get(key) for key in fields}
        for name, site in known.items()
        if who.role != "site_admin" or name == who.site
    ]
    return {"ok": True, "sites": shown}


def not_active(its: Services, study: StudyConfig, status: str, what: str) -> str:
    """Why a study that is not active takes no ``what``, in words."""
    if status == PROPOSED:
        approved = its.studies.approved_sites(study)
        return (
            f"study {study.id!r} is proposed and takes no {what} until it is active: "
            f"{len(approved)} of the {study.quorum} site approvals it needs (quorum) "
            f"for version {study.version}; approved by: {', '.join(approved) or 'none yet'}"
        )
    if status == DRAFT:
        return f"study {study.id!r} is a draft; the lead proposes it with `alliance study propose`"
    return f"study {study.id!r} is {status}; it takes no {what}"


def _changed(its: Services, changed: tuple[StudyConfig, str]) -> dict[str, Any]:
    """Tell the invited sites; the response body of every lifecycle step."""
    study, status = changed
    told = its.registry.announce(study, status)
    return {
        "ok": True,
        "study": study.model_dump(mode="json"),
        "status": status,
        "version": study.version,
        "told": told,
    }


@router.post("/studies", responses=errors(400, 401, 403), openapi_extra=request_body("StudyConfig"))
async def create_study(
    request: Request,
    draft: bool = False,
    who: Principal = Depends(require("lead")),
    its: Services = Depends(services),
) -> dict[str, Any]:
    study = parse_model(StudyConfig, await body_json(request), "study")
    changed = await asyncio.to_thread(its.studies.create, study, who.user, draft)
    return _changed(its, changed)


@router.put(
    "/studies/{study_id}",
    responses=errors(400, 401, 403, 404, 409),
    openapi_extra=request_body("StudyConfig"),
)
async def amend_study(
    study_id: str,
    request: Request,
    who: Principal = Depends(require("lead")),
    its: Services = Depends(services),
) -> dict[str, Any]:
    visible_study(its, study_id, who)
    study = parse_model(StudyConfig, await body_json(request), "study")
    if study.id != study_id:
        raise APIError(400, f"the amended study's id is {study.id!r}, not {study_id!r}")
    return _changed(its, await asyncio.to_thread(its.studies.amend, study, who.user))


@router.post("/studies/{study_id}/propose", responses=errors(400, 401, 403, 404, 409))
async def propose_study(
    study_id: str, who: Principal = Depends(require("lead")), its: Services = Depends(services)
) -> dict[str, Any]:
    visible_study(its, study_id, who)
    return _changed(its, await asyncio.to_thread(its.studies.propose, study_id, who.user))


@router.post("/studies/{study_id}/suspend", responses=errors(400, 401, 403, 404, 409))
async def suspend_study(
    study_id: str,
    reason: str = "",
    who: Principal = Depends(require("lead")),
    its: Services = Depends(services),
) -> dict[str, Any]:
    visible_study(its, study_id, who)
    changed = await asyncio.to_thread(its.studies.suspend, study_id, who.user, reason[:500])
    return _changed(its, changed)


@router.post("/studies/{study_id}/resume", responses=errors(400, 401, 403, 404, 409))
async def resume_study(
    study_id: str, who: Principal = Depends(require("lead")), its: Services = Depends(services)
) -> dict[str, Any]:
    visible_study(its, study_id, who)
    return _changed(its, await asyncio.to_thread(its.studies.resume, study_id, who.user))


@router.get("/studies", responses=errors(401))
async def list_studies(
    who: Principal = Depends(principal), its: Services = Depends(services)
) -> dict[str, Any]:
    listed = await asyncio.to_thread(its.studies.all)
    return {"ok": True, "studies": [row for row, study in listed if who.can_read(study)]}


@router.get("/studies/{study_id}", responses=errors(401, 404))
async def show_study(
    study_id: str, who: Principal = Depends(principal), its: Services = Depends(services)
) -> dict[str, Any]:
    study, status = visible_study(its, study_id, who)
    reqs = await asyncio.to_thread(its.store.study_requests, study_id)
    reqs += [view for view in its.pending.values() if view["study_id"] == study_id]
    return {
        "ok": True,
        "study": study.model_dump(mode="json"),
        "status": status,
        "approvals": await asyncio.to_thread(its.store.study_decisions, study_id),
        "requests": [who.request_view(r) for r in reqs],
    }


@router.get("/studies/{study_id}/report", responses=errors(401, 403, 404))
async def study_report(
    study_id: str,
    who: Principal = Depends(require("lead", "researcher")),
    its: Services = Depends(services),
) -> dict[str, Any]:
    # Every site's contribution and refusals: the lead's and the study's researchers' view,
    # not a site admin's (who reads only their own site's entries).
    visible_study(its, study_id, who)
    report = await asyncio.to_thread(build_report, its.store, study_id)
    return {"ok": True, "report": report.to_json()}


@router.post("/studies/{study_id}/close", responses=errors(400, 401, 403, 404))
async def close_study(
    study_id: str, who: Principal = Depends(require("lead")), its: Services = Depends(services)
) -> dict[str, Any]:
    visible_study(its, study_id, who)
    return _changed(its, await asyncio.to_thread(its.studies.close, study_id, who.user))


@router.post(
    "/studies/{study_id}/requests",
    responses={**errors(400, 401, 403, 404, 409), 202: {"description": "wait=false: running"}},
    openapi_extra=request_body("AnalysisRequest"),
)
async def submit(
    study_id: str,
    request: Request,
    wait: bool = True,
    who: Principal = Depends(require("researcher", "lead")),
    its: Services = Depends(services),
) -> JSONResponse:
    study, status = visible_study(its, study_id, who)
    if not who.can_run(study):  # the roles allowed here run what they may read
        raise not_found("study", study_id, who)
    if status != ACTIVE:
        raise APIError(409, await asyncio.to_thread(not_active, its, study, status, "requests"))
    body = parse_model(AnalysisRequest, await body_json(request), "request")
    # A script request names its script by hash; its tasks carry the script.
    sent = await asyncio.to_thread(its.studies.expand_script, study, body)
    # Bad requests fail here, before any task leaves. The check may build a model spec for a
    # while: in a worker thread, so the site link and other requests go on meanwhile.
    params = await asyncio.to_thread(its.studies.check_request, study, sent)
    request_id = uuid.uuid4().hex[:16]
    # Shown as running at once, so a client that does not wait finds it; stored when done.
    its.pending[request_id] = {
        "request_id": request_id,
        "study_id": study.id,
        "researcher": who.user,
        "analysis": body.analysis,
        "request": body.model_dump(mode="json"),
        "status": "running",
        "error": None,
        "created": now(),
        "finished": None,
        "result": None,
    }
    versions = its.studies.site_versions(study)  # kept in memory between decisions
    job = asyncio.create_task(
        _execute(its, study, body, params, who.user, request_id, sent, versions), name=request_id
    )
    its.running[request_id] = job
    job.add_done_callback(lambda _: its.running.pop(request_id, None))
    if not wait:
        return JSONResponse(
            {"ok": True, "request_id": request_id, "status": "running"}, status_code=202
        )
    # shield: a client that hangs up does not cancel a request the sites already run.
    outcome = await asyncio.shield(job)
    return JSONResponse({"ok": True, **outcome})


async def _execute(
    its: Services,
    study: StudyConfig,
    body: AnalysisRequest,
    params: Any,
    researcher: str,
    request_id: str,
    sent: AnalysisRequest | None = None,
    versions: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run one request and store it; never raises, so nothing hangs in "running".

    ``sent`` is the request as its tasks carry it (a script request with its script), when
    that differs from ``body``, the request as the researcher wrote and the store keeps it.
    """
    result: dict[str, Any] | None = None
    error: str | None = None
    try:
        outcome = await its.scheduler.run(
            study, sent or body, researcher, request_id, params, site_versions=versions
        )
        result = outcome.to_dict()
    except RequestFailed as exc:
        error = str(exc)
        result = {"analysis": body.analysis, "sites": [s.to_json() for s in exc.sites]}
    except AllianceError as exc:
        error = str(exc)
    except Exception as exc:  # stored as a failure so nothing hangs in "running"
        log.exception("request %s failed", request_id)
        error = f"internal error: {type(exc).__name__}: {exc}; this is probably a bug"
    submitted = its.pending[request_id]["created"]
    try:  # inline: one sub-millisecond transaction; a thread hop would cost more than it
        its.store.record_request(
            request_id=request_id,
            study_id=study.id,
            researcher=researcher,
            request=body.model_dump(mode="json"),
            submitted=submitted,
            result=result,
            error=error,
            receipts=its.registry.take_receipts(request_id),
        )
    except Exception as exc:  # the caller still gets the result; the log says it was not kept
        log.exception("request %s could not be stored", request_id)
        error = error or f"the result could not be stored ({type(exc).__name__}: {exc})"
    finally:
        its.pending.pop(request_id, None)
    return {
        "request_id": request_id,
        "study_id": study.id,
        "researcher": researcher,
        "analysis": body.analysis,
        "request": body.model_dump(mode="json"),
        "status": "done" if error is None else "failed",
        "error": error,
        "result": result,
    }


@router.post(
    "/studies/{study_id}/scripts",
    responses=errors(400, 401, 403, 404, 409),
    openapi_extra=request_body("ScriptSubmission"),
)
async def submit_script(
    study_id: str,
    request: Request,
    who: Principal = Depends(require("researcher", "lead")),
    its: Services = Depends(services),
) -> dict[str, Any]:
    study, status = visible_study(its, study_id, who)
    if not who.can_run(study):
        raise not_found("study", study_id, who)
    if status not in (PROPOSED, ACTIVE):
        raise APIError(409, f"study {study_id!r} is {status}; it takes no scripts")
    body = await body_json(request)
    if not (
        isinstance(body, dict)
        and set(body) == {"module", "manifest"}
        and all(isinstance(v, str) for v in body.values())
    ):
        raise APIError(400, "a script submission is {module: <text>, manifest: <text>}")
    stored = await asyncio.to_thread(
        its.studies.submit_script, study, body["module"], body["manifest"], who.user
    )
    offer = {"study_id": study.id, "module": body["module"], "manifest": body["manifest"]}
    sent = its.registry.offer_script(study.sites or its.registry.connected(), offer)
    return {"ok": True, "study_id": study.id, **stored, "offered_to": sent}


@router.get("/requests/{request_id}", responses=errors(401, 404))
async def show_request(
    request_id: str, who: Principal = Depends(principal), its: Services = Depends(services)
) -> dict[str, Any]:
    found = its.pending.get(request_id) or await asyncio.to_thread(its.store.request, request_id)
    loaded = its.studies.get(found["study_id"]) if found is not None else None
    if found is None or loaded is None or not who.can_read(loaded[0]):
        raise not_found("request", request_id, who)
    return {"ok": True, **who.request_view(found)}


@router.get("/audit/verify", responses=errors(401, 403))
async def audit_verify(
    _: Principal = Depends(require("lead")), its: Services = Depends(services)
) -> dict[str, Any]:
    report = await asyncio.to_thread(its.store.verify_audit)
    # The chain, and every stored receipt against it and its signature (one line each).
    problems = await asyncio.to_thread(its.store.integrity_problems)
    return {
        "ok": True,
        "intact": not problems,
        "entries": report.entries,
        "head": report.head,
        "problem": report.problem,
        "problems": problems,
    }


@router.get("/studies/{study_id}/cross-check", responses=errors(401, 403, 404))
async def study_cross_check(
    study_id: str,
    who: Principal = Depends(require("lead")),
    its: Services = Depends(services),
) -> dict[str, Any]:
    """Each site's audit log (asked over the link) against the receipts held from it."""
    study, _ = visible_study(its, study_id, who)
    took_part = {r["site"] for r in await asyncio.to_thread(its.store.study_receipts, study_id)}
    names = sorted(set(study.sites) | took_part) or its.registry.connected()
    sites = []
    for name in names:
        receipts = await asyncio.to_thread(its.store.study_receipt_list, study_id, name)
        keys = await asyncio.to_thread(its.store.site_keys, name)
        try:
            answer = await its.registry.ask_audit(name, study_id, timeout=30.0)
        except SiteUnavailable as exc:
            problems = [f"{exc.reason}: not cross-checked (run the offline check on its folder)"]
        else:
            if answer.error:
                problems = [f"site {name} could not show its audit log ({answer.error})"]
            else:
                records = [(r.seq, r.hash, r.action, r.task_id) for r in answer.replies]
                entries = entries_from_answer(name, records)
                problems = cross_check(name, entries, receipts, keys, head_seq=answer.head_seq)
        sites.append({"site": name, "receipts": len(receipts), "problems": problems})
    return {"ok": True, "study_id": study_id, "sites": sites}


@router.get("/registry", responses=errors())
async def registry_json(its: Services = Depends(services)) -> dict[str, Any]:
    """The public study registry: no token needed, none looked at."""
    entries = await asyncio.to_thread(registry_entries, its.store)
    return {"ok": True, "studies": entries}


public = APIRouter()


@public.get("/registry", response_class=HTMLResponse, responses=errors())
async def registry_page(its: Services = Depends(services)) -> HTMLResponse:
    """The public study registry as a plain HTML page (no token)."""
    entries = await asyncio.to_thread(registry_entries, its.store)
    return HTMLResponse(registry_html(entries))


# ----------------------------------------------------------------------------- the app


def create_app(
    store: Store,
    registry: SiteRegistry,
    scheduler: Scheduler,
    tokens: TokenBook,
    max_request_bytes: int = 1 << 20,
    studies: StudyBook | None = None,
) -> FastAPI:
    """The FastAPI application over a store, a site registry, a scheduler and the studies."""
    app = FastAPI(title="Alliance coordinator", version=VERSION)
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    app.add_middleware(AuditCalls, store=store)
    book = studies or StudyBook(store, scheduler.dictionary)
    registry.on_decision = book.receive_decision
    app.state.services = Services(store, registry, scheduler, tokens, book)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(AllianceError, _alliance_error)
    app.add_exception_handler(Exception, _bug)
    app.include_router(router)
    app.include_router(public)
    app.openapi = lambda: document(app)  # type: ignore[method-assign]
    return app
