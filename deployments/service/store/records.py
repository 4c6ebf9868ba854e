"""The records the store keeps, as Python values, and how they are read from Redis replies.

Redis answers bytes (or str, with decode_responses); `text` turns either into str. Every record type
here is built from a hash's fields (`from_hash`) as the scripts and operations wrote them.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias

from deployments.service.settings import Quotas

# the record's fields copied into every event (params are immutable and read once)
EVENT_FIELDS = ("state", "progress", "attempts", "created_at", "started_at", "finished_at", "updated_at",
                "error", "result", "cancel_requested")  # fmt: skip


# a hash as redis-py replies it: bytes, or str with decode_responses (events' fields are str already)
Hash: TypeAlias = Mapping[bytes, bytes] | Mapping[str, str]


def text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def texts(h: Hash) -> dict[str, str]:
    return {text(k): text(v) for k, v in h.items()}


def pairs(flat: list[Any]) -> dict[Any, Any]:
    """A hash from HGETALL's flat [field, value, ...] reply inside a script's reply."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)


@dataclass
class SongJob:
    id: str
    state: JobState
    params: dict[str, Any]
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    worker: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    idempotency_key: str | None = None
    owner: str | None = None  # the API key id that submitted it (None when auth is off)

    @classmethod
    def from_hash(cls, h: Hash, **extra: Any) -> SongJob:
        d: dict[str, Any] = texts(h)
        d.update(extra)

        def num(name: str) -> float | None:
            return float(d[name]) if d.get(name) else None

        def obj(name: str) -> Any:
            value = d.get(name)
            return (json.loads(value) if isinstance(value, str) else value) if value else None

        return cls(
            id=d["id"],
            state=JobState(d["state"]),
            params=obj("params") or {},
            created_at=float(d["created_at"]),
            updated_at=float(d["updated_at"]),
            started_at=num("started_at"),
            finished_at=num("finished_at"),
            attempts=int(d.get("attempts") or 0),
            worker=d.get("worker") or None,
            progress=obj("progress") or {},
            result=obj("result"),
            error=obj("error"),
            cancel_requested=d.get("cancel_requested") == "1",
            idempotency_key=d.get("idempotency_key") or None,
            owner=d.get("owner") or None,
        )


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event stream: the record's public fields right after a change."""

    job_id: str
    id: str  # stream entry id "<ms>-<seq>", increasing per job: the SSE event id
    fields: dict[str, str]

    @property
    def state(self) -> JobState:
        return JobState(self.fields["state"])

    @property
    def at(self) -> float:
        """When the writer made the change (its clock)."""
        return float(self.fields.get("updated_at") or 0.0)

    def job(self, params: dict[str, Any]) -> SongJob:
        return SongJob.from_hash(self.fields, id=self.job_id, params=params)

    @classmethod
    def from_entry(cls, job_id: str, entry_id: bytes | str, fields: Hash) -> JobEvent:
        return cls(job_id, text(entry_id), texts(fields))

    @classmethod
    def from_notification(cls, data: bytes | str) -> JobEvent:
        """A message of the `mg:notify` channel."""
        message = json.loads(data)
        return cls(message.pop("id"), message.pop("event"), message)


def event_order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class WebhookDelivery:
    """A claimed webhook delivery: the job's final fields and this attempt's number and token."""

    job_id: str
    url: str
    attempt: int  # 1 for the first
    token: str  # the claim's: only its holder records the attempt's outcome
    state: str
    result: str  # JSON, or "" (as on the job record)
    error: str
    finished_at: str
    created_at: float

    @classmethod
    def from_hash(cls, h: Hash) -> WebhookDelivery:
        d = texts(h)
        return cls(
            job_id=d["id"], url=d["url"], attempt=int(d["attempts"]), token=d.get("claim", ""),
            state=d.get("state", ""), result=d.get("result", ""), error=d.get("error", ""),
            finished_at=d.get("finished_at", ""), created_at=float(d.get("created_at") or 0),
        )  # fmt: skip

    def payload(self) -> dict[str, Any]:
        """What the receiver gets: the finished job."""
        return {"id": self.job_id, "status": self.state,
                "result": json.loads(self.result) if self.result else None,
                "error": json.loads(self.error) if self.error else None,
                "finished_at": float(self.finished_at) if self.finished_at else None}  # fmt: skip


class Upload(NamedTuple):
    """A recorded upload: who uploaded it (an API key id; "" when auth is off) and what it is."""

    owner: str
    info: dict[str, Any]

    @classmethod
    def from_hash(cls, h: Hash) -> Upload:
        d = texts(h)
        return cls(d["owner"], json.loads(d["info"]))


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: str
    created_at: float
    revoked_at: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # this key's quotas that differ from the defaults

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def quotas(self, defaults: Quotas) -> Quotas:
        return defaults.model_copy(update=self.overrides)

    @classmethod
    def from_hash(cls, h: Hash) -> ApiKey:
        d = texts(h)
        return cls(
            id=d["id"], name=d["name"], role=d["role"], created_at=float(d["created_at"]),
            revoked_at=float(d["revoked_at"]) if d.get("revoked_at") else None,
            overrides=json.loads(d.get("quotas") or "{}"),
        )  # fmt: skip
