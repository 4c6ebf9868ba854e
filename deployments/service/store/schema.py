"""The Redis key schema of the service: every key it writes, with its lifetime and the reason for it.

`SCHEMA` is the one table. Each entry is a key name pattern (`{...}` stands for an id or a name), the
Redis type, its lifetime (`Lifetime`) and why it lives that long; the key functions below build names
from these patterns, so a name cannot be spelled two ways. Every key has the prefix `mg:`.

Deadlines stored in keys (lease ends, when files or webhooks are due) are Redis `TIME`, computed in
the Lua scripts or read from Redis by the operation, never a host's clock. Record timestamps (a job's
`created_at`, `updated_at`, ...) are the writer's clock, for display and ordering.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

PREFIX = "mg:"
IDEMPOTENCY_TTL_S = 24 * 3600
USAGE_TTL_S = 2 * 24 * 3600  # a day's usage counters outlive the day (they are read during it only)
EVENTS_MAXLEN = 1000
LIVE_TTL_S = 15 * 60  # a take's live audio outlives its last write by this much (then: the stored file)


class Lifetime(enum.Enum):
    KEPT = "no TTL"  # deleted by an operation, or kept for good
    WHEN_FINISHED = "no TTL while the job is queued or running; retention_s once it has finished"
    FIXED = "a TTL of ttl_s seconds, set at every write"
    CHANNEL = "a pub/sub channel: not stored"


@dataclass(frozen=True)
class Key:
    pattern: str  # e.g. "mg:job:{id}"
    type: str  # hash, stream, zset, set, string, list, channel
    lifetime: Lifetime
    why: str
    ttl_s: int | None = None  # for Lifetime.FIXED
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # `{key}` (an Idempotency-Key, the client's text) may hold anything; the ids hold no colon
        parts = re.split(r"(\{\w+\})", self.pattern)
        regex = "".join(
            (".+" if p == "{key}" else "[^:]+") if p.startswith("{") else re.escape(p) for p in parts
        )
        object.__setattr__(self, "_regex", re.compile(regex))

    def name(self, **parts: str) -> str:
        return self.pattern.format(**parts)

    def matches(self, name: str) -> bool:
        return self._regex.fullmatch(name) is not None


JOB = Key(
    "mg:job:{id}", "hash", Lifetime.WHEN_FINISHED,
    "the job record; an accepted job is never dropped, and its result is kept retention_s. "
    "`attempts` is also the current lease token; `recorded_by` the token that recorded the outcome "
    "(a retried write of the same attempt is then idempotent)",
)  # fmt: skip
EVENTS = Key(
    "mg:events:{id}", "stream", Lifetime.WHEN_FINISHED,
    "the job's events: one entry per transition or progress write holding the record's public "
    "fields after it; entry ids are the SSE event ids (Last-Event-ID reads what a client missed). At "
    "most ~EVENTS_MAXLEN entries (each a full snapshot, so trimmed old progress loses nothing); "
    "expires with the record",
)  # fmt: skip
NOTIFY_CHANNEL = Key(
    "mg:notify", "channel", Lifetime.CHANNEL,
    "a JSON message per event of any job ({id, event, ...fields}); one subscription per ingress "
    "replica fans it out to that replica's listeners",
)  # fmt: skip
QUEUE_KEY = Key(
    "mg:queue", "zset", Lifetime.KEPT,
    "job id -> enqueue time: FIFO order and queue positions (ZRANK); a job leaves it when claimed "
    "or canceled",
)  # fmt: skip
RUNNING_KEY = Key(
    "mg:running", "zset", Lifetime.KEPT,
    "job id -> lease deadline (Redis time): the reconciler re-queues entries whose deadline passed",
)  # fmt: skip
RECENT_KEY = Key(
    "mg:recent", "zset", Lifetime.KEPT,
    "job id -> creation time: the paginated job list; trimmed to the retention window when read",
)  # fmt: skip
EXPIRING_KEY = Key(
    "mg:expiring", "zset", Lifetime.KEPT,
    '"results:{job id}" | "uploads:{upload id}" -> when its files are deleted (Redis time): a '
    "finished job's takes when its record expires, an upload retention_s after it was stored. A "
    "sweeper claims due entries, deletes the files (and an upload's record), then the entries; an "
    "entry whose sweeper died comes due again after SWEEP_CLAIM_S",
)  # fmt: skip
IDEM = Key(
    "mg:idem:{key}", "string", Lifetime.FIXED,
    "Idempotency-Key -> job id without API keys: clients retry a submission within minutes or "
    "hours; after a day the same key may start a new job",
    ttl_s=IDEMPOTENCY_TTL_S,
)  # fmt: skip
OWNER_IDEM = Key(
    "mg:owner:{owner}:idem:{key}", "string", Lifetime.FIXED,
    "the same, per API key: two keys sending the same Idempotency-Key make two jobs",
    ttl_s=IDEMPOTENCY_TTL_S,
)  # fmt: skip
OWNER_RECENT = Key(
    "mg:owner:{owner}:recent", "zset", Lifetime.KEPT,
    "an API key's job list (job id -> creation time), trimmed like mg:recent",
)  # fmt: skip
OWNER_ACTIVE = Key(
    "mg:owner:{owner}:active", "set", Lifetime.KEPT,
    "an API key's jobs that were queued or running; the next admission prunes finished and expired "
    "ones and counts the rest against the key's quotas, in the script that creates the job",
)  # fmt: skip
OWNER_USAGE = Key(
    "mg:owner:{owner}:usage:{day}", "hash", Lifetime.FIXED,
    "songs and audio_s an API key submitted on a UTC day (YYYYMMDD), for the daily quotas; read "
    "during that day only",
    ttl_s=USAGE_TTL_S,
)  # fmt: skip
UPLOAD = Key(
    "mg:upload:{id}", "hash", Lifetime.KEPT,
    "owner and info (JSON: format, duration, ...) of an uploaded reference or song to edit; deleted "
    "by the sweeper with the file, retention_s after it was stored",
)  # fmt: skip
GENERATORS_KEY = Key(
    "mg:generators", "hash", Lifetime.KEPT,
    "worker -> JSON status: what each generator replica says of itself, renewed every "
    "GENERATOR_STATUS_EVERY_S and stamped with Redis time; reports older than their `ttl_s` "
    "(default GENERATOR_STATUS_TTL_S: a dead replica stops renewing) are pruned when read. Readiness "
    "reads this hash instead of asking replicas, which would queue behind their songs",
)  # fmt: skip
ENGINE_LIMITS_KEY = Key(
    "mg:engine_limits", "hash", Lifetime.KEPT,
    "model -> JSON {budget_bytes, token_bytes, block_size, at}: the largest key/value cache budget a "
    "generator of that model reported (DiffRhythm 2's engine) within ENGINE_LIMIT_KEEP_S, stamped "
    "with Redis time. While no generator of the model reports (scaled to zero, all restarting), a "
    "song that budget could never hold is still refused at submission; one field per served model",
)  # fmt: skip
WEBHOOK = Key(
    "mg:webhook:{id}", "hash", Lifetime.KEPT,
    "the webhook delivery of a finished job that asked for one: URL, the job's final fields (the "
    "payload outlives the job record), attempts, last error, the token of the attempt in flight. "
    "Written by the script that ends the job; attempts are bounded; deleted once delivered or "
    "dead-lettered",
)  # fmt: skip
WEBHOOKS_KEY = Key(
    "mg:webhooks", "zset", Lifetime.KEPT,
    "job id -> when its delivery is due (Redis time), or, while an attempt is in flight, when its "
    "lease ends: one replica sends an attempt, and a dead replica's falls due again",
)  # fmt: skip
DEAD_WEBHOOKS_KEY = Key(
    "mg:webhooks:dead", "list", Lifetime.KEPT,
    "JSON deliveries that used up their attempts or were refused at delivery, newest first, trimmed "
    "to WEBHOOK_DEAD_MAX; an operator reads them (dead_webhooks)",
)  # fmt: skip
APIKEY = Key(
    "mg:apikey:{digest}", "hash", Lifetime.KEPT,
    "an API key by the SHA-256 hex of its secret: id, name, role, created_at, revoked_at, quotas "
    "(JSON overrides) and its request bucket (tokens, tokens_at). A revoked key's record stays, "
    "marked, so that `musicgen keys list` still names it",
)  # fmt: skip
LIVE = Key(
    "mg:live:{id}:{attempt}:{take}", "stream", Lifetime.FIXED,
    "a take's live audio as one attempt writes it: MP3 bytes in entries of field `b`, in order, then "
    "one entry of field `end` (`done`: the take's file holds exactly these bytes; `stopped`: the "
    "attempt ended without a take). Per attempt, so that a requeued job's new run never mixes with "
    "its lost one's; listeners read it by polling (no connection held per listener). Listeners that "
    "come after it expired get the stored file",
    ttl_s=LIVE_TTL_S,
)  # fmt: skip
APIKEYS_KEY = Key("mg:apikeys", "hash", Lifetime.KEPT, "key id -> digest: to list and revoke keys by id")

SCHEMA: tuple[Key, ...] = (
    JOB, EVENTS, NOTIFY_CHANNEL, QUEUE_KEY, RUNNING_KEY, RECENT_KEY, EXPIRING_KEY, IDEM, OWNER_IDEM,
    OWNER_RECENT, OWNER_ACTIVE, OWNER_USAGE, UPLOAD, GENERATORS_KEY, ENGINE_LIMITS_KEY, WEBHOOK,
    WEBHOOKS_KEY, DEAD_WEBHOOKS_KEY, APIKEY, APIKEYS_KEY, LIVE,
)  # fmt: skip

QUEUE = QUEUE_KEY.pattern
RUNNING = RUNNING_KEY.pattern
RECENT = RECENT_KEY.pattern
EXPIRING = EXPIRING_KEY.pattern
GENERATORS = GENERATORS_KEY.pattern
ENGINE_LIMITS = ENGINE_LIMITS_KEY.pattern
NOTIFY = NOTIFY_CHANNEL.pattern
WEBHOOKS = WEBHOOKS_KEY.pattern
DEAD_WEBHOOKS = DEAD_WEBHOOKS_KEY.pattern
APIKEYS = APIKEYS_KEY.pattern


def key_of(name: str) -> Key | None:
    """The schema entry a key name belongs to (None: not one of the service's keys)."""
    found = [k for k in SCHEMA if k.matches(name)]
    return found[0] if len(found) == 1 else None


def job_key(job_id: str) -> str:
    return JOB.name(id=job_id)


def events_key(job_id: str) -> str:
    return EVENTS.name(id=job_id)


def idem_key(key: str, owner: str = "") -> str:
    return OWNER_IDEM.name(owner=owner, key=key) if owner else IDEM.name(key=key)


def owner_key(owner: str, name: str) -> str:
    """One of an API key's own keys: `recent`, `active`, `usage:{day}`."""
    return f"{PREFIX}owner:{owner}:{name}"


def upload_key(upload_id: str) -> str:
    return UPLOAD.name(id=upload_id)


def webhook_key(job_id: str) -> str:
    return WEBHOOK.name(id=job_id)


def live_key(job_id: str, attempt: int, take: int) -> str:
    return LIVE.name(id=job_id, attempt=str(attempt), take=str(take))


def apikey_key(digest: str) -> str:
    return APIKEY.name(digest=digest)
