"""The job store: the whole Redis protocol of the service, in one place.

States: queued -> running -> succeeded | failed | canceled (queued -> canceled | failed too).
Every transition is one Lua script, so it is atomic and idempotent: a job runs at least once (a lost
worker's lease expires and the reconciler re-queues it) and its result is recorded exactly once (a
second completion finds the job no longer running and changes nothing).

Keys (prefix `mg:`), with their lifetimes and why:
- `mg:job:{id}` hash, the job record. No TTL while queued or running (an accepted job is never
  dropped); `retention_s` once finished (results are kept that long, then the record expires).
- `mg:queue` zset id -> enqueue time: FIFO order and queue positions (ZRANK). No TTL.
- `mg:running` zset id -> lease deadline: the reconciler re-queues entries whose deadline passed.
- `mg:recent` zset id -> creation time: the paginated job list; trimmed to the retention window.
- `mg:idem:{key}` string -> job id, TTL `IDEMPOTENCY_TTL_S` (24 h): clients retry a submission within
  minutes or hours; after a day the same key may start a new job.
- `mg:events:{id}` pub/sub channel: a message on every state or progress change (SSE streams).
- `mg:generator:{worker}` string (JSON), TTL `GENERATOR_STATUS_TTL_S`: what a generator replica says
  of itself (model loaded or why not), renewed every `GENERATOR_STATUS_EVERY_S`; a replica that dies
  stops renewing and its record expires. Readiness reads these instead of asking the replicas,
  which would queue behind the songs they are generating.
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

PREFIX = "mg:"
QUEUE = PREFIX + "queue"
RUNNING = PREFIX + "running"
RECENT = PREFIX + "recent"
IDEMPOTENCY_TTL_S = 24 * 3600
DEFAULT_RETENTION_S = 7 * 24 * 3600
DEFAULT_LEASE_S = 30.0  # a worker renews its lease every lease/3 seconds
DEFAULT_MAX_ATTEMPTS = 3
PROGRESS_MIN_INTERVAL_S = 0.5  # progress writes per job are rate-limited to this
GENERATOR_STATUS_EVERY_S = 5.0
GENERATOR_STATUS_TTL_S = 3 * GENERATOR_STATUS_EVERY_S  # two missed renewals: the replica is gone


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def idem_key(key: str) -> str:
    return f"{PREFIX}idem:{key}"


def generator_key(worker: str) -> str:
    return f"{PREFIX}generator:{worker}"


def events_channel(job_id: str) -> str:
    return f"{PREFIX}events:{job_id}"


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

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> SongJob:
        d = {k.decode(): v.decode() for k, v in h.items()}

        def num(name):
            return float(d[name]) if d.get(name) else None

        def obj(name):
            return json.loads(d[name]) if d.get(name) else None

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
        )


# --------------------------------------------------------------------------------------------------
# Lua: each transition reads and writes its keys in one atomic step

_CREATE = """
-- KEYS: job, queue, recent, idem ; ARGV: id, now, params, idem_key, idem_ttl
if KEYS[4] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return existing end
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', 'queued', 'params', ARGV[3], 'created_at', ARGV[2],
           'updated_at', ARGV[2], 'attempts', 0, 'idempotency_key', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[5]) end
return ARGV[1]
"""

_CLAIM = """
-- KEYS: job, queue, running ; ARGV: id, now, worker, lease_deadline
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[3], 'started_at', ARGV[2], 'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 1
"""

_HEARTBEAT = """
-- KEYS: job, running ; ARGV: id, worker, lease_deadline
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

_FINISH = """
-- KEYS: job, queue, running ; ARGV: id, now, new_state, field, value, retention, from_states (csv)
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
local allowed = false
for s in string.gmatch(ARGV[7], '[^,]+') do if s == state then allowed = true end end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished_at', ARGV[2], 'updated_at', ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[4], ARGV[5]) end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 1
"""

_REQUEUE = """
-- KEYS: job, queue, running ; ARGV: id, now, max_attempts, error, retention
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 0
end
local deadline = redis.call('ZSCORE', KEYS[3], ARGV[1])
if deadline and tonumber(deadline) > tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], 'attempts')) >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[4], 'finished_at', ARGV[2], 'updated_at', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return 2
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'worker', '', 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
return 1
"""


class JobStore:
    def __init__(
        self,
        client: redis.Redis,
        *,
        retention_s: int = DEFAULT_RETENTION_S,
        lease_s: float = DEFAULT_LEASE_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ):
        self.r = client
        self.retention_s = retention_s
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self._create = client.register_script(_CREATE)
        self._claim = client.register_script(_CLAIM)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._finish = client.register_script(_FINISH)
        self._requeue = client.register_script(_REQUEUE)
        self._last_progress: dict[str, float] = {}

    @classmethod
    def from_url(cls, url: str, **kw) -> JobStore:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5), **kw)

    # -- writes ------------------------------------------------------------------------------

    def create(self, params: dict[str, Any], idempotency_key: str | None = None) -> tuple[SongJob, bool]:
        """Durably record a queued job. Returns (job, created); with a known idempotency key, the
        existing job and False."""
        job_id = uuid.uuid4().hex
        now = time.time()
        got = self._create(
            keys=[job_key(job_id), QUEUE, RECENT, idem_key(idempotency_key) if idempotency_key else ""],
            args=[job_id, now, json.dumps(params), idempotency_key or "", IDEMPOTENCY_TTL_S],
        ).decode()
        job = self.get(got)
        if job is None:  # the key pointed at a job whose record has expired: start afresh
            self.r.delete(idem_key(idempotency_key))
            return self.create(params, idempotency_key)
        created = got == job_id
        if created:
            self._publish(job.id, job.state)
        return job, created

    def claim(self, job_id: str, worker: str) -> bool:
        now = time.time()
        ok = bool(
            self._claim(
                keys=[job_key(job_id), QUEUE, RUNNING], args=[job_id, now, worker, now + self.lease_s]
            )
        )
        if ok:
            self._publish(job_id, JobState.RUNNING)
        return ok

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Renew the lease; False when the job is no longer this worker's (requeued, finished)."""
        return bool(
            self._heartbeat(
                keys=[job_key(job_id), RUNNING], args=[job_id, worker, time.time() + self.lease_s]
            )
        )

    def set_progress(self, job_id: str, progress: dict[str, Any], *, force: bool = False) -> bool:
        """Write progress at most every PROGRESS_MIN_INTERVAL_S per job (stage changes use force)."""
        now = time.monotonic()
        if not force and now - self._last_progress.get(job_id, 0.0) < PROGRESS_MIN_INTERVAL_S:
            return False
        self._last_progress[job_id] = now
        pipe = self.r.pipeline()
        pipe.hset(job_key(job_id), mapping={"progress": json.dumps(progress), "updated_at": time.time()})
        pipe.publish(events_channel(job_id), json.dumps({"id": job_id, "progress": progress}))
        pipe.execute()
        return True

    def _finish_job(self, job_id: str, state: JobState, field_name: str, value: Any, from_states) -> bool:
        ok = bool(
            self._finish(
                keys=[job_key(job_id), QUEUE, RUNNING],
                args=[job_id, time.time(), state.value, field_name, json.dumps(value) if field_name else "",
                      self.retention_s, ",".join(s.value for s in from_states)],
            )
        )  # fmt: skip
        if ok:
            self._last_progress.pop(job_id, None)
            self._publish(job_id, state)
        return ok

    def complete(self, job_id: str, result: dict[str, Any]) -> bool:
        """Record the result; exactly once (False, and no change, if the job is not running)."""
        return self._finish_job(job_id, JobState.SUCCEEDED, "result", result, [JobState.RUNNING])

    def fail(self, job_id: str, error: dict[str, Any]) -> bool:
        return self._finish_job(job_id, JobState.FAILED, "error", error, [JobState.QUEUED, JobState.RUNNING])

    def cancel(self, job_id: str) -> JobState | None:
        """Queued jobs are canceled at once; running ones are flagged and stop before the next step."""
        error = {"code": "CANCELED", "message": "canceled by the user", "recovery": "submit the song again"}
        if self._finish_job(job_id, JobState.CANCELED, "error", error, [JobState.QUEUED]):
            return JobState.CANCELED
        job = self.get(job_id)
        if job is None:
            return None
        if job.state == JobState.RUNNING:
            self.r.hset(job_key(job_id), "cancel_requested", "1")
            self._publish(job_id, job.state)
        return job.state

    def finish_canceled(self, job_id: str) -> bool:
        """The worker saw the cancel flag and stopped."""
        error = {"code": "CANCELED", "message": "canceled by the user", "recovery": "submit the song again"}
        return self._finish_job(job_id, JobState.CANCELED, "error", error, [JobState.RUNNING])

    def reconcile(self) -> dict[str, list[str]]:
        """Re-queue running jobs whose lease expired (their worker is gone), or fail them with
        WORKER_LOST once they have used up their attempts."""
        now = time.time()
        expired = [m.decode() for m in self.r.zrangebyscore(RUNNING, "-inf", now)]
        out: dict[str, list[str]] = {"requeued": [], "failed": []}
        error = json.dumps(
            {"code": "WORKER_LOST", "message": f"the worker running this job was lost {self.max_attempts} times",
             "recovery": "submit the song again; if it keeps failing, try a shorter song"}
        )  # fmt: skip
        for job_id in expired:
            res = self._requeue(
                keys=[job_key(job_id), QUEUE, RUNNING],
                args=[job_id, now, self.max_attempts, error, self.retention_s],
            )
            if res == 1:
                out["requeued"].append(job_id)
                self._publish(job_id, JobState.QUEUED)
            elif res == 2:
                out["failed"].append(job_id)
                self._publish(job_id, JobState.FAILED)
        return out

    def put_generator_status(self, worker: str, status: dict[str, Any]) -> None:
        self.r.set(
            generator_key(worker), json.dumps({**status, "at": time.time()}), ex=int(GENERATOR_STATUS_TTL_S)
        )

    def generator_statuses(self) -> list[dict[str, Any]]:
        """The live generator replicas' own reports (expired ones are gone)."""
        keys = list(self.r.scan_iter(match=generator_key("*"), count=100))
        return [json.loads(v) for v in self.r.mget(keys) if v is not None] if keys else []

    def set_webhook_status(self, job_id: str, status: str) -> None:
        self.r.hset(job_key(job_id), "webhook", status)

    # -- reads -------------------------------------------------------------------------------

    def get(self, job_id: str) -> SongJob | None:
        h = self.r.hgetall(job_key(job_id))
        return SongJob.from_hash(h) if h else None

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(job_key(job_id), "cancel_requested") == b"1"

    def queue_position(self, job_id: str) -> int | None:
        """0 = next to run; None when not queued."""
        return self.r.zrank(QUEUE, job_id)

    def queue_depth(self) -> int:
        return self.r.zcard(QUEUE)

    def queued_ids(self) -> list[str]:
        return [m.decode() for m in self.r.zrange(QUEUE, 0, -1)]

    def recent(self, limit: int = 20, before: float | None = None) -> list[SongJob]:
        """Newest first; `before` (a created_at) pages further back. Expired records are pruned."""
        self.r.zremrangebyscore(RECENT, "-inf", time.time() - self.retention_s)
        ids = self.r.zrevrangebyscore(RECENT, f"({before}" if before else "+inf", "-inf", start=0, num=limit)
        pipe = self.r.pipeline()
        for i in ids:
            pipe.hgetall(job_key(i.decode()))
        return [SongJob.from_hash(h) for h in pipe.execute() if h]

    # -- events ------------------------------------------------------------------------------

    def _publish(self, job_id: str, state: JobState) -> None:
        """Each transition knows the state it wrote: no read-back needed to announce it."""
        self.r.publish(events_channel(job_id), json.dumps({"id": job_id, "state": state.value}))
