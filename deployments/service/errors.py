"""The service's errors, one table: stable code -> HTTP status and default recovery hint.

Body of every error response: {"error": {"code", "message", "recovery", "details"}}.
Codes the library raises (musicgen.errors) keep the library's hint, written there once; the service's
own codes have theirs here. Nothing else in the service writes a default hint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from musicgen.errors import LIBRARY_ERRORS, MusicgenError


@dataclass(frozen=True)
class ErrorKind:
    status: int
    recovery: str


_STATUS = {
    "INVALID_LYRICS": 422,
    "INVALID_PROMPT": 422,
    "INVALID_PARAMETER": 422,
    "WEBHOOK_URL_REFUSED": 422,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "BAD_REQUEST": 400,
    "UNAUTHORIZED": 401,
    "PAYLOAD_TOO_LARGE": 413,
    "UNSUPPORTED_MEDIA": 415,
    "QUEUE_FULL": 429,
    "QUOTA_EXCEEDED": 429,
    "RATE_LIMITED": 429,
    "MODEL_NOT_LOADED": 503,
    "STORE_UNAVAILABLE": 503,
    "OUT_OF_MEMORY": 507,
    "GENERATION_TIMEOUT": 504,
    "WORKER_LOST": 500,
    "CANCELED": 409,
    "NO_LIVE_AUDIO": 409,
    "INTERNAL": 500,
}

_SERVICE_HINTS = {
    "NOT_FOUND": "check the id; finished jobs are kept for the retention period only",
    "METHOD_NOT_ALLOWED": "see the OpenAPI spec at /openapi.json for each path's methods",
    "BAD_REQUEST": "send a well-formed HTTP request (see the OpenAPI spec at /openapi.json)",
    "PAYLOAD_TOO_LARGE": "send a smaller body: uploads up to the upload limit, JSON requests up to 256 KiB",
    "UNAUTHORIZED": "send an API key as `Authorization: Bearer <key>`; an operator creates one with "
    "`musicgen keys create NAME`",
    "WEBHOOK_URL_REFUSED": (
        "give a public http(s) URL without user:password@, whose host name resolves only to public "
        "addresses; a receiver inside your network must be on the service's webhook_allow list"
    ),
    "QUEUE_FULL": "retry after the number of seconds in Retry-After",
    "QUOTA_EXCEEDED": "retry after the number of seconds in Retry-After (details name the quota and its "
    "limit), or ask an operator for a higher quota",
    "RATE_LIMITED": "slow down: retry after the number of seconds in Retry-After",
    "STORE_UNAVAILABLE": "retry shortly: the job store is unreachable; accepted jobs are not lost",
    "GENERATION_TIMEOUT": "try a shorter song, fewer takes or fewer steps",
    "WORKER_LOST": "submit the song again; if it keeps failing, try a shorter song",
    "NO_LIVE_AUDIO": "this model writes a song whole: download its takes (/takes/{n}/audio) once the job has "
    "succeeded",
    "INTERNAL": "retry; if it persists, report it with the request id (details.request_id)",
}


def _table() -> dict[str, ErrorKind]:
    library = {code: cls.recovery for code, cls in LIBRARY_ERRORS.items()}
    both = library.keys() & _SERVICE_HINTS.keys()
    assert not both, f"hints written twice: {both}"
    hints = {**library, **_SERVICE_HINTS}
    assert hints.keys() == _STATUS.keys(), (
        f"codes without a status or a hint: {hints.keys() ^ _STATUS.keys()}"
    )
    return {code: ErrorKind(status, hints[code]) for code, status in _STATUS.items()}


ERRORS: dict[str, ErrorKind] = _table()


class ServiceError(Exception):
    def __init__(self, code: str, message: str, *, recovery: str | None = None, details: dict | None = None):
        if code not in ERRORS:
            raise ValueError(f"unknown error code {code}")
        super().__init__(message)
        self.code, self.message = code, message
        self.recovery = recovery or ERRORS[code].recovery
        self.details = details or {}

    @property
    def status(self) -> int:
        return ERRORS[self.code].status

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "recovery": self.recovery,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServiceError:
        return cls(d["code"], d["message"], recovery=d.get("recovery"), details=d.get("details"))

    @classmethod
    def from_library(cls, exc: MusicgenError) -> ServiceError:
        code = exc.code if exc.code in ERRORS else "INTERNAL"
        return cls(code, exc.message, recovery=exc.recovery, details=exc.details)
