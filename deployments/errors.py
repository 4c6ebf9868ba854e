"""The service's errors, one table: stable code -> HTTP status and default recovery hint.

Body of every error response: {"error": {"code", "message", "recovery", "details"}}.
Library errors (musicgen.errors) keep their code and hint; the table gives them their status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from musicgen.errors import MusicgenError


@dataclass(frozen=True)
class ErrorKind:
    status: int
    recovery: str


ERRORS: dict[str, ErrorKind] = {
    "INVALID_LYRICS": ErrorKind(422, "fix the lyrics line named in the message"),
    "INVALID_PROMPT": ErrorKind(
        422, "give a non-empty style prompt or a reference clip of at least 10 seconds"
    ),
    "INVALID_PARAMETER": ErrorKind(422, "change the parameter named in the message"),
    "NOT_FOUND": ErrorKind(404, "check the id; finished jobs are kept for the retention period only"),
    "PAYLOAD_TOO_LARGE": ErrorKind(413, "upload a smaller file"),
    "UNSUPPORTED_MEDIA": ErrorKind(415, "use a WAV, FLAC, MP3 or OGG file"),
    "QUEUE_FULL": ErrorKind(429, "retry after the number of seconds in Retry-After"),
    "MODEL_NOT_LOADED": ErrorKind(
        503, "wait for the model to load, or download it with `musicgen models pull`"
    ),
    "STORE_UNAVAILABLE": ErrorKind(
        503, "retry shortly: the job store is unreachable; accepted jobs are not lost"
    ),
    "OUT_OF_MEMORY": ErrorKind(507, "try a shorter song or fewer takes"),
    "GENERATION_TIMEOUT": ErrorKind(504, "try a shorter song, fewer takes or fewer steps"),
    "WORKER_LOST": ErrorKind(500, "submit the song again; if it keeps failing, try a shorter song"),
    "CANCELED": ErrorKind(409, "submit the song again if you still want it"),
    "INTERNAL": ErrorKind(500, "retry; if it persists, report it with the job id"),
}


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
    def from_library(cls, exc: MusicgenError) -> ServiceError:
        code = exc.code if exc.code in ERRORS else "INTERNAL"
        return cls(code, exc.message, recovery=exc.recovery, details=exc.details)
