"""The job store: the whole Redis protocol of the service, in one place.

States: queued -> running -> succeeded | failed | canceled (queued -> canceled too).
Every transition is one Lua script, so it is atomic and idempotent: a job runs at least once (a lost
worker's lease expires and the reconciler re-queues it) and its result is recorded exactly once (a
second completion finds the job no longer running and changes nothing). Every transition and
progress write also appends the job's new state to its event stream and announces it on one pub/sub
channel, in the same script, so a listener never sees a state the record does not have.

Leases and fencing. A claim returns a lease token: the job's attempt number, which the claim raises
by one. Every later write of that run (progress, lease renewal, result, failure, cancellation, giving
the job back) passes the token, and its script refuses it unless the job is still running under that
token. A worker whose lease expired and whose job was claimed again (by another worker, or by itself)
therefore cannot change the record any more: its writes return False and it stops working on the
job. Lease deadlines and retention deadlines are computed inside the scripts from Redis `TIME`, never
from a host's clock (record timestamps such as `updated_at` are the writer's clock, for display).

Keys (prefix `mg:`), with their lifetimes and why:
- `mg:job:{id}` hash, the job record. No TTL while queued or running (an accepted job is never
  dropped); `retention_s` once finished (results are kept that long, then the record expires).
  `attempts` is also the current lease token; `recorded_by` the token that recorded the outcome (a
  retried write of the same attempt is then idempotent).
- `mg:events:{id}` stream, the job's events: one entry per transition or progress write holding the
  record's public fields after it (`EVENT_FIELDS`). Entry ids are the SSE event ids: a client that
  reconnects with Last-Event-ID reads what it missed here. At most ~`EVENTS_MAXLEN` entries (every
  entry is a full snapshot, so trimmed old progress loses nothing); expires with the record.
- `mg:notify` pub/sub channel: a JSON message per event of any job ({"id", "event", ...fields}).
  One subscription per ingress replica fans it out to that replica's listeners.
- `mg:queue` zset id -> enqueue time: FIFO order and queue positions (ZRANK). No TTL.
- `mg:running` zset id -> lease deadline (Redis time): the reconciler re-queues entries whose
  deadline passed.
- `mg:recent` zset id -> creation time: the paginated job list; trimmed to the retention window.
- `mg:expiring` zset "results:{job id}" | "uploads:{upload id}" -> when its files are deleted (Redis
  time): a finished job's folder of takes when its record expires, an upload `retention_s` after it
  was stored. A sweeper claims due entries atomically (`claim_due_files`), deletes the files, then
  removes the entries (`files_deleted`); an entry whose sweeper died comes due again after
  `SWEEP_CLAIM_S`. No TTL.
- `mg:idem:{key}` string -> job id, TTL `IDEMPOTENCY_TTL_S` (24 h): clients retry a submission within
  minutes or hours; after a day the same key may start a new job. With API keys, the owner's
  `mg:owner:{key id}:idem:{key}` instead: two API keys sending the same Idempotency-Key make two jobs.
- `mg:owner:{key id}:...`, what one API key (the job's `owner`; none when auth is off) has:
  `recent` zset id -> creation time (its job list, trimmed like `mg:recent`); `active` set of job ids
  that were queued or running (finished and expired ones are pruned by the next admission, which
  counts them against the key's quotas); `usage:{UTC day}` hash songs, audio_s, TTL `USAGE_TTL_S`.
  Admission checks and updates them in the same script that creates the job, so concurrent
  submissions cannot exceed a quota.
- `mg:upload:{id}` hash owner, info (JSON: format, duration, ...): who uploaded a reference or a song
  to edit. No TTL: uploads are kept as long as their files, which the service never deletes.
- `mg:generators` hash worker -> JSON status: what each generator replica says of itself (model
  loaded or why not, and when it said so), renewed every `GENERATOR_STATUS_EVERY_S`; readers ignore
  and delete reports older than `GENERATOR_STATUS_TTL_S` (a dead replica stops renewing), or than
  the report's own `ttl_s` (a replica that is about to be replaced keeps its report for longer).
  Readiness reads this one hash instead of asking the replicas, which would queue behind the songs
  they are generating.
- `mg:webhook:{id}` hash, the webhook delivery of a finished job that asked for one: URL, the job's
  final fields (the payload is rebuilt from them, so it outlives the job record), attempts so far,
  the last error and the token of the attempt in flight. Written by the same script that ends the
  job (a job never ends without its delivery queued); no TTL while pending (attempts are bounded);
  deleted once delivered or dead-lettered.
- `mg:webhooks` zset id -> when the delivery is due; while an attempt is in flight, when its lease
  ends (`WEBHOOK_LEASE_S`, longer than any attempt). A claim moves the score to the lease's end in
  one script, so one attempt is sent by one replica; a replica that dies mid-attempt leaves an entry
  that falls due again when its lease ends, and any live replica picks it up.
- `mg:webhooks:dead` list of JSON deliveries that used up their attempts or were refused at delivery,
  newest first, trimmed to `WEBHOOK_DEAD_MAX`; no TTL (an operator reads it: `dead_webhooks`).

The protocol is written once, as generators of Redis steps (`_Call`, `_Script`, `_Pipeline`) that
receive each step's reply: `JobStore` runs them on a blocking client (the GPU worker's threads) and
`AsyncJobStore` on `redis.asyncio` (the ingress's event loop), where every method returns an
awaitable of what the sync method returns.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio

from deployments.service import settings
from deployments.service.errors import ServiceError

PREFIX = "mg:"
QUEUE = PREFIX + "queue"
RUNNING = PREFIX + "running"
RECENT = PREFIX + "recent"
EXPIRING = PREFIX + "expiring"
GENERATORS = PREFIX + "generators"
NOTIFY = PREFIX + "notify"
WEBHOOKS = PREFIX + "webhooks"
DEAD_WEBHOOKS = PREFIX + "webhooks:dead"
IDEMPOTENCY_TTL_S = 24 * 3600
USAGE_TTL_S = 2 * 24 * 3600  # a day's usage counters outlive the day (they are read during it only)
EVENTS_MAXLEN = 1000
PROGRESS_MIN_INTERVAL_S = 1.0  # progress writes (and events) per job: at most one a second
GENERATOR_STATUS_EVERY_S = 5.0
GENERATOR_STATUS_TTL_S = 3 * GENERATOR_STATUS_EVERY_S  # two missed renewals: the replica is gone
SWEEP_CLAIM_S = 300  # a sweeper that claimed files and died before deleting them: others retry after this
# the record's fields copied into every event (params are immutable and read once)
EVENT_FIELDS = ("state", "progress", "attempts", "created_at", "started_at", "finished_at", "updated_at",
                "error", "result", "cancel_requested")  # fmt: skip


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}events:{job_id}"


def idem_key(key: str, owner: str = "") -> str:
    return owner_key(owner, f"idem:{key}") if owner else f"{PREFIX}idem:{key}"


def owner_key(owner: str, name: str) -> str:
    """One of an API key's own keys: `recent`, `active`, `usage:{day}`, `idem:{key}`."""
    return f"{PREFIX}owner:{owner}:{name}"


def upload_key(upload_id: str) -> str:
    return f"{PREFIX}upload:{upload_id}"


def utc_day(t: float) -> tuple[str, float]:
    """The UTC day of unix time `t` (the usage counters' key) and when it ends."""
    day = int(t // 86400)
    return time.strftime("%Y%m%d", time.gmtime(day * 86400)), (day + 1) * 86400.0


def webhook_key(job_id: str) -> str:
    return f"{PREFIX}webhook:{job_id}"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


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
    def from_hash(cls, h: Mapping[bytes | str, bytes | str], **extra: Any) -> SongJob:
        d = {_text(k): _text(v) for k, v in h.items()}
        d.update(extra)

        def num(name):
            return float(d[name]) if d.get(name) else None

        def obj(name):
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
    def from_hash(cls, h: Mapping[bytes | str, bytes | str]) -> WebhookDelivery:
        d = {_text(k): _text(v) for k, v in h.items()}
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


def event_order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


# --------------------------------------------------------------------------------------------------
# Lua: each transition reads and writes its keys in one atomic step, and emits its event

_LIB = f"""
local EVENT_FIELDS = {{{", ".join(repr(f) for f in EVENT_FIELDS)}}}
-- append the record's public fields to its event stream and announce them; returns the entry id
local function emit(job_key, events_key, id, maxlen)
  local values = redis.call('HMGET', job_key, unpack(EVENT_FIELDS))
  local entry, message = {{}}, {{id = id}}
  for i, name in ipairs(EVENT_FIELDS) do
    if values[i] then
      entry[#entry + 1] = name
      entry[#entry + 1] = values[i]
      message[name] = values[i]
    end
  end
  local eid = redis.call('XADD', events_key, 'MAXLEN', '~', maxlen, '*', unpack(entry))
  message['event'] = eid
  redis.call('PUBLISH', '{NOTIFY}', cjson.encode(message))
  return eid
end
-- the store's clock, in seconds: deadlines never depend on the clock of the host that asks
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- the job is running under the lease `token` (its attempt number): the fence of a worker's writes
local function holds(job_key, token)
  local v = redis.call('HMGET', job_key, 'state', 'attempts')
  return v[1] == 'running' and v[2] == token
end
-- a finished record and its events expire after `retention` s; its files are deleted then
local function retire(job_key, events_key, expiring_key, id, retention)
  redis.call('EXPIRE', job_key, retention)
  redis.call('EXPIRE', events_key, retention)
  redis.call('ZADD', expiring_key, server_now() + tonumber(retention), 'results:' .. id)
end
-- a job that asked for a webhook and has just ended: queue its delivery, due now
local function enqueue_webhook(job_key, hook_key, hooks_key, id, now)
  local url = redis.call('HGET', job_key, 'webhook_url')
  if not url or url == '' then return end
  local v = redis.call('HMGET', job_key, 'state', 'result', 'error', 'finished_at')
  redis.call('HSET', hook_key, 'id', id, 'url', url, 'state', v[1], 'result', v[2] or '',
             'error', v[3] or '', 'finished_at', v[4] or '', 'attempts', 0, 'created_at', now)
  redis.call('ZADD', hooks_key, now, id)
  redis.call('HSET', job_key, 'webhook', 'pending')
end
"""

_CREATE = f"""
-- KEYS: job, queue, recent, idem, events, owner's recent, owner's active, owner's usage today
-- ARGV: id, now, params, idem_key, idem_ttl, maxlen, max_queue, owner, audio_s, usage_ttl,
--       then the owner's quotas: active_jobs, queued_jobs, songs_per_day, audio_s_per_day ('' = none),
--       webhook_url ('' = none)
if KEYS[4] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {{'existing', existing}} end
end
local depth = redis.call('ZCARD', KEYS[2])
if depth >= tonumber(ARGV[7]) then return {{'full', tostring(depth)}} end
if ARGV[8] ~= '' then
  -- the owner's jobs that wait or run (finished and expired ones leave the set here); the earliest
  -- start and best queue rank tell when one may end. Their records are read by name: the store is
  -- one Redis, not a cluster.
  local queued, running, first_start, first_rank = 0, 0, '', ''
  for _, other in ipairs(redis.call('SMEMBERS', KEYS[7])) do
    local state, started = unpack(redis.call('HMGET', '{PREFIX}job:' .. other, 'state', 'started_at'))
    if state == 'queued' then
      queued = queued + 1
      local rank = redis.call('ZRANK', KEYS[2], other)
      if rank and (first_rank == '' or rank < first_rank) then first_rank = rank end
    elseif state == 'running' then
      running = running + 1
      local t = tonumber(started)
      if t and (first_start == '' or t < first_start) then first_start = t end
    else
      redis.call('SREM', KEYS[7], other)
    end
  end
  if ARGV[11] ~= '' then
    local when = {{tostring(first_start), tostring(first_rank)}}
    local songs, audio = unpack(redis.call('HMGET', KEYS[8], 'songs', 'audio_s'))
    songs, audio = tonumber(songs) or 0, tonumber(audio) or 0
    if queued + running >= tonumber(ARGV[11]) then
      return {{'quota', 'active_jobs', ARGV[11], tostring(queued + running), unpack(when)}}
    end
    if queued >= tonumber(ARGV[12]) then
      return {{'quota', 'queued_jobs', ARGV[12], tostring(queued), unpack(when)}}
    end
    if songs + 1 > tonumber(ARGV[13]) then return {{'quota', 'songs_per_day', ARGV[13], tostring(songs)}} end
    if audio + tonumber(ARGV[9]) > tonumber(ARGV[14]) then
      return {{'quota', 'audio_s_per_day', ARGV[14], tostring(audio)}}
    end
  end
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', 'queued', 'params', ARGV[3], 'created_at', ARGV[2],
           'updated_at', ARGV[2], 'attempts', 0, 'idempotency_key', ARGV[4], 'owner', ARGV[8])
if ARGV[15] ~= '' then redis.call('HSET', KEYS[1], 'webhook_url', ARGV[15]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[5]) end
if ARGV[8] ~= '' then
  redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])
  redis.call('SADD', KEYS[7], ARGV[1])
  redis.call('HINCRBY', KEYS[8], 'songs', 1)
  redis.call('HINCRBYFLOAT', KEYS[8], 'audio_s', ARGV[9])
  redis.call('EXPIRE', KEYS[8], ARGV[10])
end
emit(KEYS[1], KEYS[5], ARGV[1], ARGV[6])
return {{'created', ARGV[1]}}
"""

_CLAIM = """
-- KEYS: job, queue, running, events ; ARGV: id, now, worker, lease_s, maxlen
-- returns the lease token (the new attempt number), or 0 when the job is not queued
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[3], 'started_at', ARGV[2], 'updated_at', ARGV[2])
local token = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], server_now() + tonumber(ARGV[4]), ARGV[1])
emit(KEYS[1], KEYS[4], ARGV[1], ARGV[5])
return token
"""

_HEARTBEAT = """
-- KEYS: job, running ; ARGV: id, token, lease_s
if not holds(KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], server_now() + tonumber(ARGV[3]), ARGV[1])
return 1
"""

_PROGRESS = """
-- KEYS: job, events ; ARGV: id, now, progress, maxlen, token
if not holds(KEYS[1], ARGV[5]) then return 0 end  -- never revive a finished record, nor write for a lost lease
redis.call('HSET', KEYS[1], 'progress', ARGV[3], 'updated_at', ARGV[2])
emit(KEYS[1], KEYS[2], ARGV[1], ARGV[4])
return 1
"""

_FINISH = """
-- KEYS: job, running, events, expiring, webhook, webhooks ; ARGV: id, now, new_state, field, value, retention, token, maxlen
if not holds(KEYS[1], ARGV[7]) then
  -- the same attempt writing again (a retried call whose reply was lost) is told it succeeded
  return redis.call('HGET', KEYS[1], 'recorded_by') == ARGV[7] and 1 or 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished_at', ARGV[2], 'updated_at', ARGV[2], 'recorded_by', ARGV[7])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[4], ARGV[5]) end
redis.call('ZREM', KEYS[2], ARGV[1])
emit(KEYS[1], KEYS[3], ARGV[1], ARGV[8])
retire(KEYS[1], KEYS[3], KEYS[4], ARGV[1], ARGV[6])
enqueue_webhook(KEYS[1], KEYS[5], KEYS[6], ARGV[1], ARGV[2])
return 1
"""

_CANCEL = """
-- KEYS: job, queue, running, events, expiring, webhook, webhooks ; ARGV: id, now, error, retention, maxlen
-- queued: canceled at once; running: flagged, the worker stops before its next step. Returns the state.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return '' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'canceled', 'error', ARGV[3], 'finished_at', ARGV[2], 'updated_at', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[1])
  emit(KEYS[1], KEYS[4], ARGV[1], ARGV[5])
  retire(KEYS[1], KEYS[4], KEYS[5], ARGV[1], ARGV[4])
  enqueue_webhook(KEYS[1], KEYS[6], KEYS[7], ARGV[1], ARGV[2])
  return 'canceled'
end
if state == 'running' and redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[2])
  emit(KEYS[1], KEYS[4], ARGV[1], ARGV[5])
end
return state
"""

_REQUEUE = """
-- KEYS: job, queue, running, events, expiring, webhook, webhooks ; ARGV: id, now, max_attempts, error, retention, maxlen, token
-- Back to the queue (keeping its place), or failed once its attempts are used up. Without a token: the
-- reconciler, for a running job whose lease deadline passed; with one: the worker giving its job back.
local state = redis.call('HGET', KEYS[1], 'state')
if ARGV[7] == '' then
  if state ~= 'running' then
    redis.call('ZREM', KEYS[3], ARGV[1])
    return 0
  end
  local deadline = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if deadline and tonumber(deadline) > server_now() then return 0 end
elseif not holds(KEYS[1], ARGV[7]) then
  return 0
end
redis.call('ZREM', KEYS[3], ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], 'attempts')) >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[4], 'finished_at', ARGV[2], 'updated_at', ARGV[2])
  emit(KEYS[1], KEYS[4], ARGV[1], ARGV[6])
  retire(KEYS[1], KEYS[4], KEYS[5], ARGV[1], ARGV[5])
  enqueue_webhook(KEYS[1], KEYS[6], KEYS[7], ARGV[1], ARGV[2])
  return 2
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'worker', '', 'cancel_requested', '', 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
emit(KEYS[1], KEYS[4], ARGV[1], ARGV[6])
return 1
"""

_EXPIRE_FILES = """
-- KEYS: expiring ; ARGV: member, after_s
redis.call('ZADD', KEYS[1], server_now() + tonumber(ARGV[2]), ARGV[1])
return 1
"""

_CLAIM_DUE_FILES = """
-- KEYS: expiring ; ARGV: limit, claim_s
-- the entries whose time is up, pushed claim_s into the future: no other sweeper takes them meanwhile
local now = server_now()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), member) end
return due
"""

_WEBHOOK_CLAIM = """
-- KEYS: webhooks, webhook ; ARGV: id, now, lease_deadline, token
-- the delivery if it is due (a claim by another replica moved its score past now), with its lease taken
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return false
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HINCRBY', KEYS[2], 'attempts', 1)
redis.call('HSET', KEYS[2], 'claim', ARGV[4])
return redis.call('HGETALL', KEYS[2])
"""

_WEBHOOK_SETTLE = """
-- KEYS: webhooks, webhook, job, dead ; ARGV: id, token, outcome (delivered|retry|dead), due, error,
--   dead letter (JSON), dead_max
-- only the holder of the attempt's claim records its outcome (after a lost lease another replica has it)
if redis.call('HGET', KEYS[2], 'claim') ~= ARGV[2] then return 0 end
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
  redis.call('HSET', KEYS[2], 'last_error', ARGV[5], 'claim', '')
  return 1
end
if ARGV[3] == 'dead' then
  redis.call('LPUSH', KEYS[4], ARGV[6])
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[7]) - 1)
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[3]) == 1 then  -- never revive an expired job record
  redis.call('HSET', KEYS[3], 'webhook', ARGV[3] == 'dead' and 'failed' or 'delivered')
end
return 1
"""

_SCRIPTS = {
    name: _LIB + body
    for name, body in {"create": _CREATE, "claim": _CLAIM, "heartbeat": _HEARTBEAT, "progress": _PROGRESS,
                       "finish": _FINISH, "cancel": _CANCEL, "requeue": _REQUEUE,
                       "expire_files": _EXPIRE_FILES, "claim_due_files": _CLAIM_DUE_FILES,
                       "webhook_claim": _WEBHOOK_CLAIM, "webhook_settle": _WEBHOOK_SETTLE}.items()
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the protocol's steps, and the two drivers that run them


@dataclass(frozen=True)
class _Call:
    method: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Script:
    name: str
    keys: list
    args: list


@dataclass(frozen=True)
class _Pipeline:
    calls: tuple[_Call, ...]


Steps = Generator[_Call | _Script | _Pipeline, Any, Any]


def _operation(fn):
    """A protocol operation: a generator of Redis steps, run by the store's driver (`_drive`)."""

    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        return self._drive(fn(self, *args, **kwargs))

    return run


class QueueFull(Exception):
    def __init__(self, depth: int):
        super().__init__(f"{depth} songs are waiting")
        self.depth = depth


class QuotaExceeded(Exception):
    """A submission past one of its API key's quotas. For active_jobs and queued_jobs, when the key's
    earliest running job started and the best queue rank of its queued ones (None: there is none);
    for the daily quotas, when the day ends."""

    def __init__(self, quota: str, limit: float, used: float, *, first_start: float | None = None,
                 first_rank: int | None = None, day_ends_at: float | None = None):  # fmt: skip
        super().__init__(f"{quota}: {used:g} of {limit:g} used")
        self.quota, self.limit, self.used = quota, limit, used
        self.first_start, self.first_rank, self.day_ends_at = first_start, first_rank, day_ends_at


class _JobProtocol:
    def __init__(
        self,
        client,
        *,
        retention_s: int = settings.RETENTION_S,
        lease_s: float = settings.LEASE_S,
        max_attempts: int = settings.MAX_ATTEMPTS,
    ):
        self._r = client
        self.retention_s = retention_s
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self._scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}
        self._last_progress: dict[str, float] = {}

    @property
    def client(self):
        """The Redis client: the API keys' protocol (keys.py) shares its connection pool."""
        return self._r

    def _drive(self, steps: Steps):
        raise NotImplementedError

    # -- writes ------------------------------------------------------------------------------

    @_operation
    def create(
        self,
        params: dict[str, Any],
        idempotency_key: str | None = None,
        *,
        max_queue: int | None = None,
        owner: str = "",
        quotas: settings.Quotas | None = None,
    ) -> Steps:
        """Durably record a queued job (admission and creation in one atomic step). Returns (job,
        created); with a known idempotency key (the owner's own), the existing job and False. Raises
        QueueFull when `max_queue` jobs are already waiting, QuotaExceeded when the owner (an API key
        id) would go past one of its `quotas`."""
        idem = idem_key(idempotency_key, owner) if idempotency_key else ""
        limits = ["", "", "", ""]
        if owner and quotas is not None:
            limits = [quotas.active_jobs, quotas.queued_jobs, quotas.songs_per_day, quotas.audio_s_per_day]
        audio_s = float(params.get("duration_s") or 0) * int(params.get("num_takes") or 1)
        while True:
            job_id, now = uuid.uuid4().hex, time.time()
            day, day_ends_at = utc_day(now)
            mine = [owner_key(owner, n) if owner else "" for n in ("recent", "active", f"usage:{day}")]
            reply = yield _Script(
                "create",
                [job_key(job_id), QUEUE, RECENT, idem, events_key(job_id), *mine],
                [job_id, now, json.dumps(params), idempotency_key or "", IDEMPOTENCY_TTL_S,
                 EVENTS_MAXLEN, max_queue if max_queue is not None else 2**62, owner, audio_s, USAGE_TTL_S,
                 *limits, params.get("webhook_url") or ""],
            )  # fmt: skip
            outcome, value = _text(reply[0]), _text(reply[1])
            if outcome == "full":
                raise QueueFull(int(value))
            if outcome == "quota":
                limit, used, *when = (_text(x) for x in reply[2:])
                first_start, first_rank = (when + ["", ""])[:2]
                raise QuotaExceeded(
                    value, float(limit), float(used), first_start=float(first_start) if first_start else None,
                    first_rank=int(first_rank) if first_rank else None,
                    day_ends_at=day_ends_at if value.endswith("_per_day") else None,
                )  # fmt: skip
            h = yield _Call("hgetall", (job_key(value),))
            if h:
                return SongJob.from_hash(h), outcome == "created"
            # the key pointed at a job whose record has expired: start afresh
            yield _Call("delete", (idem,))

    @_operation
    def claim(self, job_id: str, worker: str) -> Steps:
        """Take a queued job. Returns the lease token (the job's attempt number, from 1) that every
        later write of this run passes, or None when the job is not queued."""
        token = yield _Script("claim", [job_key(job_id), QUEUE, RUNNING, events_key(job_id)],
                              [job_id, time.time(), worker, self.lease_s, EVENTS_MAXLEN])  # fmt: skip
        return int(token) or None

    @_operation
    def heartbeat(self, job_id: str, *, token: int) -> Steps:
        """Renew the lease; False when the job is no longer this run's (requeued, claimed again,
        finished)."""
        ok = yield _Script("heartbeat", [job_key(job_id), RUNNING], [job_id, token, self.lease_s])
        return bool(ok)

    @_operation
    def set_progress(
        self, job_id: str, progress: dict[str, Any], *, token: int, force: bool = False
    ) -> Steps:
        """Write progress at most every PROGRESS_MIN_INTERVAL_S per job (stage changes use force).
        True: written; None: skipped (too soon after the last write); False: refused, the job is no
        longer running under this lease."""
        now = time.monotonic()
        if not force and now - self._last_progress.get(job_id, 0.0) < PROGRESS_MIN_INTERVAL_S:
            return None
        ok = yield _Script("progress", [job_key(job_id), events_key(job_id)],
                           [job_id, time.time(), json.dumps(progress), EVENTS_MAXLEN, token])  # fmt: skip
        if ok:
            self._last_progress[job_id] = now
        return bool(ok)

    def _finish(self, job_id: str, token: int, state: JobState, field_name: str, value: Any) -> Steps:
        ok = yield _Script(
            "finish",
            [job_key(job_id), RUNNING, events_key(job_id), EXPIRING, webhook_key(job_id), WEBHOOKS],
            [job_id, time.time(), state.value, field_name, json.dumps(value) if field_name else "",
             self.retention_s, token, EVENTS_MAXLEN],
        )  # fmt: skip
        self._last_progress.pop(job_id, None)
        return bool(ok)

    @_operation
    def complete(self, job_id: str, result: dict[str, Any], *, token: int) -> Steps:
        """Record the result; exactly once (False, and no change, unless the job is running under
        this lease; True again for a repeated call of the run that recorded it)."""
        return (yield from self._finish(job_id, token, JobState.SUCCEEDED, "result", result))

    @_operation
    def fail(self, job_id: str, error: dict[str, Any], *, token: int) -> Steps:
        return (yield from self._finish(job_id, token, JobState.FAILED, "error", error))

    @_operation
    def cancel(self, job_id: str) -> Steps:
        """Queued jobs are canceled at once; running ones are flagged and stop before the next step.
        Returns the state after the call (None for an unknown job)."""
        error = ServiceError("CANCELED", "canceled by the user").to_dict()
        state = yield _Script(
            "cancel",
            [job_key(job_id), QUEUE, RUNNING, events_key(job_id), EXPIRING, webhook_key(job_id), WEBHOOKS],
            [job_id, time.time(), json.dumps(error), self.retention_s, EVENTS_MAXLEN],
        )
        state = _text(state)
        return JobState(state) if state else None

    @_operation
    def finish_canceled(self, job_id: str, *, token: int) -> Steps:
        """The worker saw the cancel flag and stopped."""
        error = ServiceError("CANCELED", "canceled by the user").to_dict()
        return (yield from self._finish(job_id, token, JobState.CANCELED, "error", error))

    def _requeue(self, job_id: str, token: int | str) -> Steps:
        error = ServiceError("WORKER_LOST", f"the worker running this job was lost {self.max_attempts} times")
        keys = [job_key(job_id), QUEUE, RUNNING, events_key(job_id), EXPIRING, webhook_key(job_id), WEBHOOKS]
        args = [job_id, time.time(), self.max_attempts, json.dumps(error.to_dict()), self.retention_s,
                EVENTS_MAXLEN, token]  # fmt: skip
        return (yield _Script("requeue", keys, args))

    @_operation
    def release(self, job_id: str, *, token: int) -> Steps:
        """The worker gives its job back (it cannot finish or record it): queued again for another
        attempt, or failed with WORKER_LOST once its attempts are used up, as when a worker is lost.
        Returns the new state; None when the job was no longer running under this lease."""
        outcome = yield from self._requeue(job_id, token)
        self._last_progress.pop(job_id, None)
        return {1: JobState.QUEUED, 2: JobState.FAILED}.get(outcome)

    @_operation
    def reconcile(self) -> Steps:
        """Re-queue running jobs whose lease expired (their worker is gone), or fail them with
        WORKER_LOST once they have used up their attempts. Deadlines are compared in Redis time."""
        seconds, microseconds = yield _Call("time")
        expired = yield _Call("zrangebyscore", (RUNNING, "-inf", seconds + microseconds / 1e6))
        out: dict[str, list[str]] = {"requeued": [], "failed": []}
        for job_id in map(_text, expired):
            res = yield from self._requeue(job_id, "")
            if res == 1:
                out["requeued"].append(job_id)
            elif res == 2:
                out["failed"].append(job_id)
        return out

    # -- files past their retention ------------------------------------------------------------

    @_operation
    def expire_upload(self, upload_id: str) -> Steps:
        """Schedule an upload's deletion `retention_s` from now (call it before storing the file: an
        upload stored without an entry would never be deleted)."""
        yield _Script("expire_files", [EXPIRING], [f"uploads:{upload_id}", self.retention_s])

    @_operation
    def claim_due_files(self, limit: int = 100) -> Steps:
        """Files whose time is up, as (area, key) pairs: ("results", job id) for the job's folder of
        takes, ("uploads", upload id). Atomic: two sweepers never get the same entry, unless the first
        has not called `files_deleted` within SWEEP_CLAIM_S."""
        due = yield _Script("claim_due_files", [EXPIRING], [limit, SWEEP_CLAIM_S])
        return [tuple(_text(m).split(":", 1)) for m in due]

    @_operation
    def files_deleted(self, entries: list[tuple[str, str]]) -> Steps:
        if entries:
            yield _Call("zrem", (EXPIRING, *(f"{area}:{key}" for area, key in entries)))

    @_operation
    def put_generator_status(
        self, worker: str, status: dict[str, Any], *, ttl_s: float | None = None
    ) -> Steps:
        """`ttl_s`: how long readers trust this report (default GENERATOR_STATUS_TTL_S)."""
        report = {**status, "at": time.time(), **({"ttl_s": ttl_s} if ttl_s is not None else {})}
        yield _Call("hset", (GENERATORS, worker, json.dumps(report)))

    @_operation
    def generator_statuses(self) -> Steps:
        """The live generator replicas' own reports; stale ones (a dead replica's) are pruned."""
        reports = yield _Call("hgetall", (GENERATORS,))
        now, live, stale = time.time(), [], []
        for worker, raw in reports.items():
            report = json.loads(raw)
            if now - report.get("at", 0) > report.get("ttl_s", GENERATOR_STATUS_TTL_S):
                stale.append(_text(worker))
            else:
                live.append(report)
        if stale:
            yield _Call("hdel", (GENERATORS, *stale))
        return live

    # -- webhook deliveries (queued by the scripts that end a job) -----------------------------

    @_operation
    def claim_webhooks(self, limit: int, lease_s: float = settings.WEBHOOK_LEASE_S) -> Steps:
        """Up to `limit` due deliveries, each claimed for `lease_s` seconds: no other replica takes
        them until then. Each claim counts as an attempt."""
        now = time.time()
        due = yield _Call("zrangebyscore", (WEBHOOKS, "-inf", now), {"start": 0, "num": limit})
        claimed = []
        for job_id in map(_text, due):
            h = yield _Script("webhook_claim", [WEBHOOKS, webhook_key(job_id)],
                              [job_id, now, now + lease_s, uuid.uuid4().hex])  # fmt: skip
            if h:  # None: another replica claimed it between the read and the script
                claimed.append(WebhookDelivery.from_hash(dict(zip(h[::2], h[1::2], strict=True))))
        return claimed

    def _settle(
        self, d: WebhookDelivery, outcome: str, due: float = 0.0, error: str = "", dead: str = ""
    ) -> Steps:
        ok = yield _Script(
            "webhook_settle", [WEBHOOKS, webhook_key(d.job_id), job_key(d.job_id), DEAD_WEBHOOKS],
            [d.job_id, d.token, outcome, due, error, dead, settings.WEBHOOK_DEAD_MAX],
        )  # fmt: skip
        return bool(ok)

    @_operation
    def webhook_delivered(self, d: WebhookDelivery) -> Steps:
        """Forget the delivery and mark the job's `webhook` field "delivered". False when this
        attempt's lease was lost (another replica owns the delivery now): nothing changes."""
        return (yield from self._settle(d, "delivered"))

    @_operation
    def webhook_retry(self, d: WebhookDelivery, error: str, due: float) -> Steps:
        """Schedule the next attempt at `due` (unix time)."""
        return (yield from self._settle(d, "retry", due=due, error=error))

    @_operation
    def webhook_dead(self, d: WebhookDelivery, error: str) -> Steps:
        """Move the delivery to the dead-letter list and mark the job's `webhook` field "failed"."""
        letter = {"id": d.job_id, "url": d.url, "attempts": d.attempt, "error": error, "status": d.state,
                  "finished_at": d.payload()["finished_at"], "queued_at": d.created_at,
                  "dead_at": time.time()}  # fmt: skip
        return (yield from self._settle(d, "dead", error=error, dead=json.dumps(letter)))

    @_operation
    def dead_webhooks(self, limit: int = 100) -> Steps:
        """The dead letters, newest first: {"id", "url", "attempts", "error", "status", "finished_at",
        "queued_at", "dead_at"}. The URL is whole (query included): this is operator data, not a log."""
        return [json.loads(x) for x in (yield _Call("lrange", (DEAD_WEBHOOKS, 0, limit - 1)))]

    @_operation
    def put_upload(self, upload_id: str, owner: str, info: dict[str, Any]) -> Steps:
        """Record who uploaded `upload_id` (an API key id; "" when auth is off) and what it is."""
        yield _Call("hset", (upload_key(upload_id),), {"mapping": {"owner": owner, "info": json.dumps(info)}})

    # -- reads -------------------------------------------------------------------------------

    @_operation
    def get(self, job_id: str) -> Steps:
        h = yield _Call("hgetall", (job_key(job_id),))
        return SongJob.from_hash(h) if h else None

    @_operation
    def get_with_position(self, job_id: str) -> Steps:
        """(job or None, queue position or None), in one round trip."""
        h, pos = yield _Pipeline((_Call("hgetall", (job_key(job_id),)), _Call("zrank", (QUEUE, job_id))))
        return (SongJob.from_hash(h) if h else None), pos

    @_operation
    def owner(self, job_id: str) -> Steps:
        """The job's owner: an API key id, "" without one, None for an unknown job."""
        h = yield _Call("hmget", (job_key(job_id), "id", "owner"))
        return None if h[0] is None else _text(h[1] or "")

    @_operation
    def upload(self, upload_id: str) -> Steps:
        """(owner, info) of a recorded upload, or None."""
        h = {_text(k): _text(v) for k, v in (yield _Call("hgetall", (upload_key(upload_id),))).items()}
        return (h["owner"], json.loads(h["info"])) if h else None

    @_operation
    def params(self, job_id: str) -> Steps:
        raw = yield _Call("hget", (job_key(job_id), "params"))
        return json.loads(raw) if raw else None

    @_operation
    def cancel_requested(self, job_id: str) -> Steps:
        return (yield _Call("hget", (job_key(job_id), "cancel_requested"))) in (b"1", "1")

    @_operation
    def queue_position(self, job_id: str) -> Steps:
        """0 = next to run; None when not queued."""
        return (yield _Call("zrank", (QUEUE, job_id)))

    @_operation
    def queue_positions(self, job_ids: list[str]) -> Steps:
        if not job_ids:
            return []
        return (yield _Pipeline(tuple(_Call("zrank", (QUEUE, i)) for i in job_ids)))

    @_operation
    def queue_depth(self) -> Steps:
        return (yield _Call("zcard", (QUEUE,)))

    @_operation
    def counts(self) -> Steps:
        """(queued, running)."""
        return tuple((yield _Pipeline((_Call("zcard", (QUEUE,)), _Call("zcard", (RUNNING,))))))

    @_operation
    def queued_ids(self) -> Steps:
        return [_text(m) for m in (yield _Call("zrange", (QUEUE, 0, -1)))]

    @_operation
    def recent(self, limit: int = 20, before: float | None = None, owner: str = "") -> Steps:
        """Newest first; `before` (a created_at) pages further back; `owner`: that API key's jobs
        only. Expired records are pruned."""
        listing = owner_key(owner, "recent") if owner else RECENT
        yield _Call("zremrangebyscore", (listing, "-inf", time.time() - self.retention_s))
        ids = yield _Call("zrevrangebyscore", (listing, f"({before}" if before else "+inf", "-inf"),
                          {"start": 0, "num": limit})  # fmt: skip
        if not ids:
            return []
        hashes = yield _Pipeline(tuple(_Call("hgetall", (job_key(_text(i)),)) for i in ids))
        return [SongJob.from_hash(h) for h in hashes if h]

    @_operation
    def events_after(self, job_id: str, after: str | None, count: int = EVENTS_MAXLEN) -> Steps:
        """The job's events after the entry `after` (all of them for None), oldest first."""
        entries = yield _Call(
            "xrange", (events_key(job_id), f"({after}" if after else "-", "+"), {"count": count}
        )
        return [
            JobEvent(job_id, _text(eid), {_text(k): _text(v) for k, v in f.items()}) for eid, f in entries
        ]

    @_operation
    def last_event(self, job_id: str) -> Steps:
        entries = yield _Call("xrevrange", (events_key(job_id), "+", "-"), {"count": 1})
        if not entries:
            return None
        eid, f = entries[0]
        return JobEvent(job_id, _text(eid), {_text(k): _text(v) for k, v in f.items()})

    @_operation
    def ping(self) -> Steps:
        return (yield _Call("ping"))


def _decode_notification(data: bytes | str) -> JobEvent:
    message = json.loads(data)
    return JobEvent(message.pop("id"), message.pop("event"), message)


def _client_options(retry_class, backoff_class) -> dict[str, Any]:
    # A store read that takes seconds is an outage: fail fast with STORE_UNAVAILABLE. A pooled
    # connection that a Redis restart closed is retried on a new one (three tries, 50-500 ms apart).
    return {
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "retry": retry_class(backoff_class(cap=0.5, base=0.05), 3),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


class JobStore(_JobProtocol):
    """The protocol on a blocking client: for the GPU worker, whose jobs run on threads."""

    @classmethod
    def from_url(cls, url: str, **kw) -> JobStore:
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        return cls(redis.Redis.from_url(url, **_client_options(Retry, ExponentialBackoff)), **kw)

    def _drive(self, steps: Steps):
        try:
            step = next(steps)
            while True:
                step = steps.send(self._run_step(step))
        except StopIteration as done:
            return done.value

    def _run_step(self, step):
        if isinstance(step, _Script):
            return self._scripts[step.name](keys=step.keys, args=step.args)
        if isinstance(step, _Pipeline):
            pipe = self._r.pipeline(transaction=False)
            for call in step.calls:
                getattr(pipe, call.method)(*call.args, **call.kwargs)
            return pipe.execute()
        return getattr(self._r, step.method)(*step.args, **step.kwargs)


class AsyncJobStore(_JobProtocol):
    """The protocol on `redis.asyncio`: for the ingress's event loop. Every method returns an
    awaitable of what JobStore's returns. Use it from one event loop only."""

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 32, **kw) -> AsyncJobStore:
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=5, **_client_options(Retry, ExponentialBackoff)
        )
        return cls(redis.asyncio.Redis(connection_pool=pool), **kw)

    async def _drive(self, steps: Steps):
        try:
            step = next(steps)
            while True:
                step = steps.send(await self._run_step(step))
        except StopIteration as done:
            return done.value

    async def _run_step(self, step):
        if isinstance(step, _Script):
            return await self._scripts[step.name](keys=step.keys, args=step.args)
        if isinstance(step, _Pipeline):
            async with self._r.pipeline(transaction=False) as pipe:
                for call in step.calls:
                    getattr(pipe, call.method)(*call.args, **call.kwargs)
                return await pipe.execute()
        return await getattr(self._r, step.method)(*step.args, **step.kwargs)

    @contextlib.asynccontextmanager
    async def notifications(self) -> AsyncIterator[AsyncIterator[JobEvent]]:
        """The events of every job, as they happen, over one pub/sub connection:
        `async with store.notifications() as events: async for event in events: ...`."""
        pubsub = self._r.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(NOTIFY)

        async def events() -> AsyncIterator[JobEvent]:
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "message":
                    yield _decode_notification(message["data"])

        try:
            yield events()
        finally:
            await pubsub.aclose()

    async def aclose(self) -> None:
        await self._r.aclose()
