"""The coordinator's HTTP API for people: one error shape for every endpoint.

Every error is ``{"ok": false, "status": N, "error": "...", "errors": ["..."]}``. Every success
has ``"ok": true``. Tokens go in ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from analyses import registered_analyses
from coordinator.auth import Principal, TokenBook
from coordinator.link import SiteRegistry
from coordinator.scheduler import RequestFailed, Scheduler
from coordinator.store import Store
from protocol.config import AnalysisRequest, StudyConfig, parse_model
from protocol.errors import AllianceError, ConfigError, ValidationError
from protocol.version import VERSION

log = logging.getLogger("alliance.coordinator")


class APIError(Exception):
    """An error with an HTTP status, rendered in the one error shape."""

    def __init__(self, status: int, error: str, errors: list[str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.errors = errors or [error]


def error_body(status: int, error: str, errors: list[str] | None = None) -> dict[str, Any]:
    """The one error shape."""
    return {"ok": False, "status": status, "error": error, "errors": errors or [error]}


def create_app(
    store: Store, registry: SiteRegistry, scheduler: Scheduler, tokens: TokenBook
) -> FastAPI:
    """The FastAPI application over a store, a site registry and a scheduler."""
    app = FastAPI(title="Alliance coordinator", version=VERSION)
    running: dict[str, asyncio.Task[dict[str, Any]]] = {}
    open_studies: dict[str, StudyConfig] = {}

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.error, exc.errors), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(
            error_body(422, errors[0] if errors else "invalid request", errors), status_code=422
        )

    @app.exception_handler(AllianceError)
    async def _alliance_error(_: Request, exc: AllianceError) -> JSONResponse:
        status = 400 if isinstance(exc, (ValidationError, ConfigError)) else 500
        lines = str(exc).splitlines() or [type(exc).__name__]
        return JSONResponse(error_body(status, lines[0], lines), status_code=status)

    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise APIError(401, "missing API token; send 'Authorization: Bearer <token>'")
        who = tokens.identify(header[7:].strip())
        if who is None:
            raise APIError(401, "unknown API token")
        return who

    def require(*roles: str) -> Any:
        def check(who: Principal = Depends(principal)) -> Principal:
            if who.role not in roles:
                raise APIError(
                    403, f"role {who.role!r} cannot do this; it needs: {', '.join(roles)}"
                )
            return who

        return check

    def load_study(study_id: str) -> tuple[StudyConfig, str]:
        # Studies change only through this API (create, close), so a parsed copy is kept.
        if study_id in open_studies:
            return open_studies[study_id], "open"
        found = store.study(study_id)
        if found is None:
            raise APIError(404, f"study {study_id!r} does not exist")
        study = StudyConfig.model_validate(found["config"])
        if found["status"] == "open":
            open_studies[study_id] = study
        return study, found["status"]

    async def body_json(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "sites": registry.connected()}

    @app.get("/api/analyses")
    async def analyses_list(_: Principal = Depends(principal)) -> dict[str, Any]:
        return {"ok": True, "analyses": registered_analyses()}

    @app.get("/api/sites")
    async def sites(_: Principal = Depends(principal)) -> dict[str, Any]:
        known = {s["name"]: s for s in await asyncio.to_thread(store.sites)}
        for name in registry.connected():
            known.setdefault(name, {"name": name})["status"] = "connected"
        return {"ok": True, "sites": list(known.values())}

    @app.post("/api/studies")
    async def create_study(
        request: Request, who: Principal = Depends(require("lead"))
    ) -> dict[str, Any]:
        study = parse_model(StudyConfig, await body_json(request), "study")
        await asyncio.to_thread(store.create_study, study.model_dump(mode="json"), who.user)
        return {"ok": True, "study": study.model_dump(mode="json")}

    @app.get("/api/studies")
    async def list_studies(_: Principal = Depends(principal)) -> dict[str, Any]:
        return {"ok": True, "studies": await asyncio.to_thread(store.studies)}

    @app.get("/api/studies/{study_id}")
    async def show_study(study_id: str, _: Principal = Depends(principal)) -> dict[str, Any]:
        study, status = load_study(study_id)
        reqs = await asyncio.to_thread(store.study_requests, study_id)
        return {
            "ok": True,
            "study": study.model_dump(mode="json"),
            "status": status,
            "requests": reqs,
        }

    @app.post("/api/studies/{study_id}/close")
    async def close_study(
        study_id: str, who: Principal = Depends(require("lead"))
    ) -> dict[str, Any]:
        load_study(study_id)
        await asyncio.to_thread(store.close_study, study_id, who.user)
        open_studies.pop(study_id, None)
        return {"ok": True, "study": study_id, "status": "closed"}

    @app.post("/api/studies/{study_id}/requests")
    async def submit(
        study_id: str,
        request: Request,
        wait: bool = True,
        who: Principal = Depends(require("researcher", "lead")),
    ) -> JSONResponse:
        study, status = load_study(study_id)
        if status != "open":
            raise APIError(409, f"study {study_id!r} is {status}; it takes no more requests")
        body = parse_model(AnalysisRequest, await body_json(request), "request")
        params = scheduler.validate(study, body)  # bad requests fail here, before any task leaves
        request_id = uuid.uuid4().hex[:16]
        body_json_out = body.model_dump(mode="json")
        # Store calls run inline: each is a sub-millisecond transaction, and a thread hop per
        # call would cost more than the call on the request's hot path.
        store.create_request(request_id, study_id, who.user, body_json_out)

        async def execute() -> dict[str, Any]:
            result: dict[str, Any] | None = None
            error: str | None = None
            try:
                result = (await scheduler.run(study, body, who.user, request_id, params)).to_dict()
            except RequestFailed as exc:
                error = str(exc)
                result = {"analysis": body.analysis, "sites": [vars(s) for s in exc.sites]}
            except AllianceError as exc:
                error = str(exc)
            except Exception as exc:  # stored as a failure so nothing hangs in "running"
                log.exception("request %s failed", request_id)
                error = f"internal error: {type(exc).__name__}: {exc}; this is probably a bug"
            store.finish_request(request_id, result, error)
            return {
                "request_id": request_id,
                "study_id": study_id,
                "researcher": who.user,
                "analysis": body.analysis,
                "request": body_json_out,
                "status": "done" if error is None else "failed",
                "error": error,
                "result": result,
            }

        job = asyncio.create_task(execute())
        running[request_id] = job
        job.add_done_callback(lambda _: running.pop(request_id, None))
        if not wait:
            return JSONResponse(
                {"ok": True, "request_id": request_id, "status": "running"}, status_code=202
            )
        # shield: a client that hangs up does not cancel a request the sites already run.
        outcome = await asyncio.shield(job)
        return JSONResponse({"ok": True, **outcome})

    @app.get("/api/requests/{request_id}")
    async def show_request(request_id: str, _: Principal = Depends(principal)) -> dict[str, Any]:
        found = await asyncio.to_thread(store.request, request_id)
        if found is None:
            raise APIError(404, f"request {request_id!r} does not exist")
        return {"ok": True, **found}

    @app.get("/api/audit/verify")
    async def audit_verify(_: Principal = Depends(require("lead"))) -> dict[str, Any]:
        report = await asyncio.to_thread(store.verify_audit)
        return {
            "ok": True,
            "intact": report.ok,
            "entries": report.entries,
            "head": report.head,
            "problem": report.problem,
        }

    return app
