"""The REST API (FastAPI), one router per resource, built from a `Services` object so that it runs
without Ray: the tests give it an embedded Redis, a validator in a thread and a runner on a worker
thread; the Ray Serve ingress gives it its deployment handles.

Every route is async and does no blocking work on the event loop: Redis through `redis.asyncio`,
files and audio on thread pools. Errors leave as one body: {"error": {code, message, recovery, details}}.

With auth on, every /v1 route needs an API key (deps.authenticate); /healthz, /readyz, /metrics,
/docs, /openapi.json and the web UI's files (/, /ui/) stay open (probes, scrapers, API readers and
browsers before the user gives a key; none of them shows a job).
"""

from __future__ import annotations

import contextlib
import json
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.service.api import health, lyrics, models, songs, uploads
from deployments.service.api.deps import ApiConfig, Services, authenticate
from deployments.service.api.edge import EdgeMiddleware
from deployments.service.api.ui import mount_ui
from deployments.service.errors import ServiceError
from deployments.service.schemas import AUTH_ERRORS, COMMON_ERRORS
from deployments.service.store import StoreUnavailable

__all__ = ["ApiConfig", "Services", "create_api"]
log = logging.getLogger(__name__)


def error_response(err: ServiceError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": err.to_dict()}, status_code=err.status, headers=headers)


def create_api(services: Services) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        services.hub.start()
        yield
        await services.hub.stop()

    app = FastAPI(
        title="musicgen",
        version="1",
        description="DiffRhythm song generation: submit, watch, cancel and download songs.",
        lifespan=lifespan,
    )
    app.state.services = services
    cfg = services.config
    if cfg.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", "X-Request-ID"],
            expose_headers=["Retry-After", "X-Request-ID", "Content-Range"], max_age=600,
        )  # fmt: skip
    # added last: outermost, so its headers and limits apply to every answer, CORS preflights included
    app.add_middleware(
        EdgeMiddleware, max_body_bytes=cfg.max_body_bytes, security_headers=cfg.security_headers
    )
    for module in (songs, uploads, models, lyrics):
        app.include_router(
            module.router, dependencies=[Depends(authenticate)], responses={**COMMON_ERRORS, **AUTH_ERRORS}
        )
    app.include_router(health.router, responses=COMMON_ERRORS)  # open
    mount_ui(app, cfg.ui_dir)  # open: the page holds no data; its API calls carry the user's key

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError):
        headers = {}
        if exc.status == 429:  # QUEUE_FULL, QUOTA_EXCEEDED, RATE_LIMITED: each computes its wait
            headers["Retry-After"] = str(exc.details.get("retry_after_s", 10))
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="musicgen"'
        return error_response(exc, headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(
            ServiceError(
                "INVALID_PARAMETER", f"{where or 'request'}: {first.get('msg', 'invalid')}",
                recovery="see the OpenAPI spec at /openapi.json for the accepted fields and ranges",
                details={"parameter": where, "errors": json.loads(json.dumps(exc.errors(), default=str))},
            )
        )  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        """Starlette's own answers (no such path, wrong method) in the service's error body."""
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "BAD_REQUEST")
        err = ServiceError(code, str(exc.detail))
        return JSONResponse({"error": err.to_dict()}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_: Request, exc: StoreUnavailable):
        return error_response(ServiceError("STORE_UNAVAILABLE", f"job store unavailable: {exc.kind}"))

    return app
