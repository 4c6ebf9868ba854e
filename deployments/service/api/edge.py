"""What every request passes first, as one plain ASGI middleware (Starlette's BaseHTTPMiddleware would
buffer event streams and cost a task per request):

- a request id: the client's `X-Request-ID` when it is a short token, else a new one; returned on every
  answer and written into INTERNAL errors and the log, so a report can be matched to a trace;
- the catch-all: an exception no handler turned into an error body is logged with its trace and
  answered 500 INTERNAL with the request id, and nothing of its text;
- a body limit: a request body other than an upload's is refused with 413 PAYLOAD_TOO_LARGE past
  `max_body_bytes`, from its Content-Length before a byte is read, or while it streams without one; a
  Content-Length that is not a number is 400 BAD_REQUEST;
- security headers on every answer (unless turned off): no MIME sniffing, no framing, no referrer, and
  a Content-Security-Policy that lets a JSON or audio answer run nothing (the docs pages get their own;
  the web UI may run its own scripts and call the API, nothing from elsewhere).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from deployments.service.errors import ServiceError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

log = logging.getLogger(__name__)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
UNLIMITED_BODY = ("/v1/uploads",)  # streamed to disk with their own limit (api/uploads.py)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-site"),
]
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
DOCS_PATHS = ("/docs", "/redoc")  # Swagger UI loads its script and styles from a CDN
# the web UI: its own scripts, styles and fonts only; API calls and fetched audio (blob: URLs) from here
UI_CSP = (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
          b"media-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
          b"form-action 'none'; object-src 'none'")  # fmt: skip


def error_body(err: ServiceError) -> bytes:
    return json.dumps({"error": err.to_dict()}).encode()


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, security_headers: bool = True):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.security_headers = security_headers

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        extra = [(b"x-request-id", request_id.encode())]
        if self.security_headers:
            extra += SECURITY_HEADERS
            path = scope["path"]
            if path == "/" or path.startswith("/ui/"):
                extra.append((b"content-security-policy", UI_CSP))
            elif not path.startswith(DOCS_PATHS):
                extra.append((b"content-security-policy", API_CSP))
        answered = False

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal answered, started
            if answered:
                return  # this middleware already answered (413): the app's late reply is dropped
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
                started = True
            await send(message)

        async def refuse(err: ServiceError) -> None:
            nonlocal answered
            body = error_body(err)
            await send_with_headers({"type": "http.response.start", "status": err.status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})  # fmt: skip
            await send_with_headers({"type": "http.response.body", "body": body})
            answered = True

        declared = headers.get(b"content-length")
        if declared is not None and not declared.strip().isdigit():
            await refuse(ServiceError("BAD_REQUEST", "Content-Length is not a number",
                                      details={"request_id": request_id}))  # fmt: skip
            return
        limit = None if scope["path"].startswith(UNLIMITED_BODY) else self.max_body_bytes
        if limit is not None and declared is not None and int(declared) > limit:
            await refuse(_too_large(limit, request_id))
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request" and limit is not None:
                received += len(message.get("body", b""))
                if received > limit:
                    await refuse(_too_large(limit, request_id))
                    return {"type": "http.disconnect"}  # the app stops reading and gives up
            return message

        try:
            await self.app(scope, counted_receive, send_with_headers)
        except Exception as exc:
            if answered:
                return  # the app failed on the body this middleware cut off; the client has its 413
            log.error(
                "%s %s failed (request id %s)", scope["method"], scope["path"], request_id, exc_info=exc
            )
            if started:
                raise  # mid-answer: the server closes the connection
            await refuse(ServiceError("INTERNAL", "internal error", details={"request_id": request_id}))


def _too_large(limit: int, request_id: str) -> ServiceError:
    return ServiceError("PAYLOAD_TOO_LARGE", f"the request body is larger than {limit} bytes",
                        details={"limit_bytes": limit, "request_id": request_id})  # fmt: skip
