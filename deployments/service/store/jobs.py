"""Jobs: their lifecycle in Redis, and the two job stores.

States: queued -> running -> succeeded | failed | canceled (queued -> canceled too). Every transition
is one Lua script (lua/), so it is atomic and idempotent: a job runs at least once (a lost worker's
lease expires and the reconciler re-queues it) and its result is recorded exactly once (a second
completion finds the job no longer running and changes nothing). Every transition and progress write
also appends the job's new state to its event stream and announces it on one pub/sub channel, in the
same script, so a listener never sees a state the record does not have.

Leases and fencing. A claim returns a lease token: the job's attempt number, which the claim raises
by one. Every later write of that run (progress, lease renewal, result, failure, cancellation, giving
the job back) passes the token, and its script refuses it unless the job is still running under that
token. A worker whose lease expired and whose job was claimed again (by another worker, or by itself)
therefore cannot change the record any more: its writes return False and it stops working on the
job. Lease and retention deadlines are computed inside the scripts from Redis `TIME` (schema.py).

`JobStore` runs the operations on a blocking client (the GPU worker's threads); `AsyncJobStore` on
redis.asyncio (the ingress's event loop), where every method returns an awaitable of what the sync
method returns. Both have the operations of uploads.py, retention.py, webhooks.py, generators.py and
live.py.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypedDict, Unpack

import redis
import redis.asyncio

from deployments.service import settings
from deployments.service.errors import ServiceError
from deployments.service.store.admission import UNLIMITED, audio_seconds, quota_args, refusal, utc_day
from deployments.service.store.drivers import AsyncDriver, SyncDriver
from deployments.service.store.generators import GeneratorOps
from deployments.service.store.live import LiveOps
from deployments.service.store.records import JobEvent, JobState, SongJob, text
from deployments.service.store.retention import RetentionOps
from deployments.service.store.schema import (
    EVENTS_MAXLEN,
    EXPIRING,
    IDEMPOTENCY_TTL_S,
    QUEUE,
    RECENT,
    RUNNING,
    USAGE_TTL_S,
    WEBHOOKS,
    events_key,
    idem_key,
    job_key,
    owner_key,
    webhook_key,
)
from deployments.service.store.steps import Call, OnAsync, OnSync, Pipeline, Script, Steps, operation
from deployments.service.store.uploads import UploadOps
from deployments.service.store.webhooks import WebhookOps

PROGRESS_MIN_INTERVAL_S = 1.0  # progress writes (and events) per job: at most one a second


def _canceled_error() -> str:
    return json.dumps(ServiceError("CANCELED", "canceled by the user").to_dict())


class JobOps:
    """The jobs' operations; the stores below set these attributes."""

    retention_s: int
    lease_s: float
    max_attempts: int
    _last_progress: dict[str, float]

    # -- writes ------------------------------------------------------------------------------

    @operation
    def create(
        self,
        params: dict[str, Any],
        idempotency_key: str | None = None,
        *,
        max_queue: int | None = None,
        owner: str = "",
        quotas: settings.Quotas | None = None,
    ) -> Steps[tuple[SongJob, bool]]:
        """Durably record a queued job (admission and creation in one atomic step). Returns (job,
        created); with a known idempotency key (the owner's own), the existing job and False. Raises
        QueueFull when `max_queue` jobs are already waiting, QuotaExceeded when the owner (an API key
        id) would go past one of its `quotas`."""
        idem = idem_key(idempotency_key, owner) if idempotency_key else ""
        while True:
            job_id, now = uuid.uuid4().hex, time.time()
            day, day_ends_at = utc_day(now)
            mine = [owner_key(owner, n) if owner else "" for n in ("recent", "active", f"usage:{day}")]
            reply = yield Script(
                "create",
                [job_key(job_id), QUEUE, RECENT, idem, events_key(job_id), *mine],
                [job_id, now, json.dumps(params), idempotency_key or "", IDEMPOTENCY_TTL_S, EVENTS_MAXLEN,
                 max_queue if max_queue is not None else UNLIMITED, owner, audio_seconds(params),
                 USAGE_TTL_S, *quota_args(owner, quotas), params.get("webhook_url") or ""],
            )  # fmt: skip
            refused = refusal(reply, day_ends_at)
            if refused is not None:
                raise refused
            h = yield Call("hgetall", (job_key(text(reply[1])),))
            if h:
                return SongJob.from_hash(h), text(reply[0]) == "created"
            # the key pointed at a job whose record has expired: start afresh
            yield Call("delete", (idem,))

    @operation
    def claim(self, job_id: str, worker: str) -> Steps[int | None]:
        """Take a queued job. Returns the lease token (the job's attempt number, from 1) that every
        later write of this run passes, or None when the job is not queued."""
        token = yield Script("claim", [job_key(job_id), QUEUE, RUNNING, events_key(job_id)],
                             [job_id, time.time(), worker, self.lease_s, EVENTS_MAXLEN])  # fmt: skip
        return int(token) or None

    @operation
    def heartbeat(self, job_id: str, *, token: int) -> Steps[bool]:
        """Renew the lease; False when the job is no longer this run's (requeued, claimed again,
        finished)."""
        ok = yield Script("heartbeat", [job_key(job_id), RUNNING], [job_id, token, self.lease_s])
        return bool(ok)

    @operation
    def set_progress(
        self, job_id: str, progress: dict[str, Any], *, token: int, force: bool = False
    ) -> Steps[bool | None]:
        """Write progress at most every PROGRESS_MIN_INTERVAL_S per job (stage changes use force).
        True: written; None: skipped (too soon after the last write); False: refused, the job is no
        longer running under this lease."""
        now = time.monotonic()
        if not force and now - self._last_progress.get(job_id, 0.0) < PROGRESS_MIN_INTERVAL_S:
            return None
        ok = yield Script("progress", [job_key(job_id), events_key(job_id)],
                          [job_id, time.time(), json.dumps(progress), EVENTS_MAXLEN, token])  # fmt: skip
        if ok:
            self._last_progress[job_id] = now
        return bool(ok)

    def _finish(self, job_id: str, token: int, state: JobState, field_name: str, value: str) -> Steps[bool]:
        ok = yield Script(
            "finish",
            [job_key(job_id), RUNNING, events_key(job_id), EXPIRING, webhook_key(job_id), WEBHOOKS],
            [job_id, time.time(), state.value, field_name, value, self.retention_s, token, EVENTS_MAXLEN],
        )
        self._last_progress.pop(job_id, None)
        return bool(ok)

    @operation
    def complete(self, job_id: str, result: dict[str, Any], *, token: int) -> Steps[bool]:
        """Record the result; exactly once (False, and no change, unless the job is running under
        this lease; True again for a repeated call of the run that recorded it)."""
        return (yield from self._finish(job_id, token, JobState.SUCCEEDED, "result", json.dumps(result)))

    @operation
    def fail(self, job_id: str, error: dict[str, Any], *, token: int) -> Steps[bool]:
        return (yield from self._finish(job_id, token, JobState.FAILED, "error", json.dumps(error)))

    @operation
    def cancel(self, job_id: str) -> Steps[JobState | None]:
        """Queued jobs are canceled at once; running ones are flagged and stop before the next step.
        Returns the state after the call (None for an unknown job)."""
        state = yield Script(
            "cancel",
            [job_key(job_id), QUEUE, RUNNING, events_key(job_id), EXPIRING, webhook_key(job_id), WEBHOOKS],
            [job_id, time.time(), _canceled_error(), self.retention_s, EVENTS_MAXLEN],
        )
        return JobState(text(state)) if text(state) else None

    @operation
    def finish_canceled(self, job_id: str, *, token: int) -> Steps[bool]:
        """The worker saw the cancel flag and stopped."""
        return (yield from self._finish(job_id, token, JobState.CANCELED, "error", _canceled_error()))

    def _requeue(self, job_id: str, token: int | str) -> Steps[int]:
        error = ServiceError("WORKER_LOST", f"the worker running this job was lost {self.max_attempts} times")
        keys = [job_key(job_id), QUEUE, RUNNING, events_key(job_id), EXPIRING, webhook_key(job_id), WEBHOOKS]
        args = [job_id, time.time(), self.max_attempts, json.dumps(error.to_dict()), self.retention_s,
                EVENTS_MAXLEN, token]  # fmt: skip
        return int((yield Script("requeue", keys, args)))

    @operation
    def release(self, job_id: str, *, token: int) -> Steps[JobState | None]:
        """The worker gives its job back (it cannot finish or record it): queued again for another
        attempt, or failed with WORKER_LOST once its attempts are used up, as when a worker is lost.
        Returns the new state; None when the job was no longer running under this lease."""
        outcome = yield from self._requeue(job_id, token)
        self._last_progress.pop(job_id, None)
        return {1: JobState.QUEUED, 2: JobState.FAILED}.get(outcome)

    @operation
    def reconcile(self) -> Steps[dict[str, list[str]]]:
        """Re-queue running jobs whose lease expired (their worker is gone), or fail them with
        WORKER_LOST once they have used up their attempts. Deadlines are compared in Redis time."""
        seconds, microseconds = yield Call("time")
        expired = yield Call("zrangebyscore", (RUNNING, "-inf", seconds + microseconds / 1e6))
        out: dict[str, list[str]] = {"requeued": [], "failed": []}
        for job_id in map(text, expired):
            res = yield from self._requeue(job_id, "")
            if res == 1:
                out["requeued"].append(job_id)
            elif res == 2:
                out["failed"].append(job_id)
        return out

    # -- reads -------------------------------------------------------------------------------

    @operation
    def get(self, job_id: str) -> Steps[SongJob | None]:
        h = yield Call("hgetall", (job_key(job_id),))
        return SongJob.from_hash(h) if h else None

    @operation
    def get_with_position(self, job_id: str) -> Steps[tuple[SongJob | None, int | None]]:
        """(job or None, queue position or None), in one round trip."""
        h, pos = yield Pipeline((Call("hgetall", (job_key(job_id),)), Call("zrank", (QUEUE, job_id))))
        return (SongJob.from_hash(h) if h else None), pos

    @operation
    def owner(self, job_id: str) -> Steps[str | None]:
        """The job's owner: an API key id, "" without one, None for an unknown job."""
        h = yield Call("hmget", (job_key(job_id), "id", "owner"))
        return None if h[0] is None else text(h[1] or "")

    @operation
    def params(self, job_id: str) -> Steps[dict[str, Any] | None]:
        raw = yield Call("hget", (job_key(job_id), "params"))
        return json.loads(raw) if raw else None

    @operation
    def cancel_requested(self, job_id: str) -> Steps[bool]:
        return (yield Call("hget", (job_key(job_id), "cancel_requested"))) in (b"1", "1")

    @operation
    def queue_position(self, job_id: str) -> Steps[int | None]:
        """0 = next to run; None when not queued."""
        position: int | None = yield Call("zrank", (QUEUE, job_id))
        return position

    @operation
    def queue_positions(self, job_ids: list[str]) -> Steps[list[int | None]]:
        if not job_ids:
            return []
        return list((yield Pipeline(tuple(Call("zrank", (QUEUE, i)) for i in job_ids))))

    @operation
    def queue_depth(self) -> Steps[int]:
        return int((yield Call("zcard", (QUEUE,))))

    @operation
    def counts(self) -> Steps[tuple[int, int]]:
        """(queued, running)."""
        queued, running = yield Pipeline((Call("zcard", (QUEUE,)), Call("zcard", (RUNNING,))))
        return int(queued), int(running)

    @operation
    def queued_ids(self) -> Steps[list[str]]:
        return [text(m) for m in (yield Call("zrange", (QUEUE, 0, -1)))]

    @operation
    def recent(self, limit: int = 20, before: float | None = None, owner: str = "") -> Steps[list[SongJob]]:
        """Newest first; `before` (a created_at) pages further back; `owner`: that API key's jobs
        only. Expired records are pruned."""
        listing = owner_key(owner, "recent") if owner else RECENT
        yield Call("zremrangebyscore", (listing, "-inf", time.time() - self.retention_s))
        ids = yield Call("zrevrangebyscore", (listing, f"({before}" if before else "+inf", "-inf"),
                         {"start": 0, "num": limit})  # fmt: skip
        if not ids:
            return []
        hashes = yield Pipeline(tuple(Call("hgetall", (job_key(text(i)),)) for i in ids))
        return [SongJob.from_hash(h) for h in hashes if h]

    @operation
    def events_after(
        self, job_id: str, after: str | None, count: int = EVENTS_MAXLEN
    ) -> Steps[list[JobEvent]]:
        """The job's events after the entry `after` (all of them for None), oldest first."""
        entries = yield Call(
            "xrange", (events_key(job_id), f"({after}" if after else "-", "+"), {"count": count}
        )
        return [JobEvent.from_entry(job_id, eid, f) for eid, f in entries]

    @operation
    def last_event(self, job_id: str) -> Steps[JobEvent | None]:
        entries = yield Call("xrevrange", (events_key(job_id), "+", "-"), {"count": 1})
        return JobEvent.from_entry(job_id, *entries[0]) if entries else None

    @operation
    def ping(self) -> Steps[bool]:
        return bool((yield Call("ping")))


class StoreOptions(TypedDict, total=False):
    """What a job store may be given besides its client (each defaults to the service's setting)."""

    retention_s: int  # finished jobs, their events and files are kept this long
    lease_s: float  # a worker's lease on its job (renewed every lease_s / 3)
    max_attempts: int  # runs of a job whose worker is lost before it fails with WORKER_LOST


class _Settings:
    def _configure(
        self,
        *,
        retention_s: int = settings.RETENTION_S,
        lease_s: float = settings.LEASE_S,
        max_attempts: int = settings.MAX_ATTEMPTS,
    ) -> None:
        self.retention_s, self.lease_s, self.max_attempts = retention_s, lease_s, max_attempts
        self._last_progress: dict[str, float] = {}


class JobStore(JobOps, UploadOps, RetentionOps, WebhookOps, GeneratorOps, LiveOps, _Settings, OnSync):
    """The protocol on a blocking client: for the GPU worker, whose jobs run on threads."""

    def __init__(self, client: redis.Redis | SyncDriver, **options: Unpack[StoreOptions]):
        self.driver: SyncDriver = client if isinstance(client, SyncDriver) else SyncDriver(client)
        self._configure(**options)

    @classmethod
    def from_url(cls, url: str, **options: Unpack[StoreOptions]) -> JobStore:
        return cls(SyncDriver.from_url(url), **options)

    def close(self) -> None:
        self.driver.close()


class AsyncJobStore(JobOps, UploadOps, RetentionOps, WebhookOps, GeneratorOps, LiveOps, _Settings, OnAsync):
    """The protocol on `redis.asyncio`: for the ingress's event loop. Every method returns an
    awaitable of what JobStore's returns. Use it from one event loop only."""

    def __init__(self, client: redis.asyncio.Redis | AsyncDriver, **options: Unpack[StoreOptions]):
        self.driver: AsyncDriver = client if isinstance(client, AsyncDriver) else AsyncDriver(client)
        self._configure(**options)

    @classmethod
    def from_url(
        cls, url: str, *, max_connections: int = 32, **options: Unpack[StoreOptions]
    ) -> AsyncJobStore:
        return cls(AsyncDriver.from_url(url, max_connections=max_connections), **options)

    @contextlib.asynccontextmanager
    async def notifications(self) -> AsyncIterator[AsyncIterator[JobEvent]]:
        """The events of every job, as they happen, over one pub/sub connection:
        `async with store.notifications() as events: async for event in events: ...`."""
        async with self.driver.notifications() as events:
            yield events

    async def aclose(self) -> None:
        await self.driver.aclose()
