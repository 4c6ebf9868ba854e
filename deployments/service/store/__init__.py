"""The store: the service's whole Redis protocol (jobs, admission, retention, uploads, webhook
deliveries, generator reports, API keys), one module per concern.

- schema.py: every key name pattern, with its TTL and why (the one table)
- records.py: the record types and how they are read from Redis
- steps.py: operations as generators of Redis steps, written once for both drivers
- scripts.py, lua/: the Lua scripts (every transition is one atomic script)
- drivers.py: the blocking and the asyncio driver; StoreUnavailable
- jobs.py (the job stores), admission.py, retention.py, uploads.py, webhooks.py, generators.py,
  live.py, apikeys.py: the operations

Callers see `StoreUnavailable` for any Redis failure, never redis-py's exceptions.
"""

from deployments.service.store.admission import QueueFull, QuotaExceeded, utc_day
from deployments.service.store.apikeys import (
    ROLES,
    SECRET,
    SECRET_PREFIX,
    AsyncKeyStore,
    KeyStore,
    RateLimited,
    Unauthorized,
    digest,
    new_secret,
)
from deployments.service.store.drivers import AsyncDriver, StoreUnavailable, SyncDriver
from deployments.service.store.generators import GENERATOR_STATUS_EVERY_S, GENERATOR_STATUS_TTL_S
from deployments.service.store.jobs import PROGRESS_MIN_INTERVAL_S, AsyncJobStore, JobStore
from deployments.service.store.live import LIVE_DONE, LIVE_STOPPED, LiveChunk
from deployments.service.store.records import (
    EVENT_FIELDS,
    ApiKey,
    JobEvent,
    JobState,
    SongJob,
    Upload,
    WebhookDelivery,
    event_order,
)
from deployments.service.store.retention import SWEEP_CLAIM_S
from deployments.service.store.schema import SCHEMA, Key, Lifetime

__all__ = [
    "EVENT_FIELDS", "GENERATOR_STATUS_EVERY_S", "GENERATOR_STATUS_TTL_S", "LIVE_DONE", "LIVE_STOPPED",
    "PROGRESS_MIN_INTERVAL_S", "LiveChunk",
    "ROLES", "SCHEMA", "SECRET", "SECRET_PREFIX", "SWEEP_CLAIM_S", "ApiKey", "AsyncDriver", "AsyncJobStore",
    "AsyncKeyStore", "JobEvent", "JobState", "JobStore", "Key", "KeyStore", "Lifetime", "QueueFull",
    "QuotaExceeded", "RateLimited", "SongJob", "StoreUnavailable", "SyncDriver", "Unauthorized", "Upload",
    "WebhookDelivery", "digest", "event_order", "new_secret", "utc_day",
]  # fmt: skip
