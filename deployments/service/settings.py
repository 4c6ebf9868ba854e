"""The service's settings: every default and every environment variable, in one place.

serve_config.yaml `args:` -> AppArgs (typed, validated; env vars fill what is unset) -> the deployments'
constructors and the service objects (JobStore, ApiConfig, JobRunner) built from it. Nothing here runs
at import time.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.service.netguard import parse_allow

# -- defaults (each named once; AppArgs, the job store, the wire schemas and the API read them here) --
LEASE_S = 30.0  # a worker renews its job's lease every lease/3 s; a lost worker's job is re-queued after it
MAX_ATTEMPTS = 3  # runs of a job whose worker is lost before it fails with WORKER_LOST
RETENTION_S = 7 * 24 * 3600  # finished jobs, their events and their files are kept this long
MAX_TAKES = 4  # takes of one song
MAX_STEPS = 200  # sampling steps of one song
MAX_QUEUE = 100  # queued songs before submissions get QUEUE_FULL
MAX_UPLOAD_MB = 50.0  # reference songs and songs to edit
MAX_UPLOAD_SECONDS = 600.0
GENERATION_TIMEOUT_S = 1800.0
SECONDS_PER_JOB_ESTIMATE = 60.0  # queue ETA before measured timings exist
SSE_KEEPALIVE_S = 15.0  # a comment line on idle event streams (proxies close silent connections)
INGRESS_MAX_ONGOING = 5000  # concurrent requests per ingress replica: event streams stay open for minutes
# webhooks: failed attempt n is retried after min(BACKOFF * 2**(n-1), BACKOFF_MAX); 8 attempts span ~21 min
WEBHOOK_ATTEMPTS = 8
WEBHOOK_BACKOFF_S = 10.0
WEBHOOK_BACKOFF_MAX_S = 3600.0
WEBHOOK_TIMEOUT_S = 10.0  # connect, and each read of the answer
WEBHOOK_LEASE_S = 60.0  # an attempt in flight is no other replica's until then: longer than any attempt
WEBHOOK_POLL_S = 1.0  # how often an idle delivery loop looks for due deliveries
WEBHOOK_CONCURRENCY = 8  # attempts in flight per delivery loop (each on a thread)
WEBHOOK_DEAD_MAX = 1000  # dead letters kept (newest first); older ones are dropped

ENV = {
    "REDIS_URL": "the job store; unset: an embedded Redis with its data under MUSICGEN_DATA_DIR/redis",
    "MUSICGEN_DATA_DIR": "results, uploads and the embedded Redis (default ./data)",
    "MUSICGEN_STORAGE_URL": "results and uploads elsewhere: s3://bucket/prefix (several nodes need this)",
    "MUSICGEN_S3_ENDPOINT_URL": "the S3 endpoint of a non-AWS service (MinIO, R2, ...); AWS_* credentials",
    "MUSICGEN_MODEL": "the model to serve (default diffrhythm-1.2-base; 'tiny' = the untrained demo model)",
    "MUSICGEN_CACHE_DIR": "weights cache (default ./models/cache)",
    "MUSICGEN_WEBHOOK_SECRET": "HMAC key of webhook signatures (X-Musicgen-Signature)",
    "MUSICGEN_WEBHOOK_ALLOW": "comma-separated CIDRs and host names webhooks may reach although not public",
}


class AppArgs(BaseModel):
    """Arguments of the app builder (the `args:` of serve_config.yaml); env vars fill what is unset."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    redis_url: str | None = None
    data_dir: str | None = None
    storage_url: str | None = None  # s3://bucket/prefix; unset: results and uploads under data_dir
    max_queue: int = Field(MAX_QUEUE, ge=1)
    max_upload_mb: float = Field(MAX_UPLOAD_MB, gt=0)
    min_ingress: int = Field(1, ge=1)  # CPU replicas of the HTTP ingress (autoscaled on open requests)
    max_ingress: int = Field(1, ge=1)
    ingress_max_ongoing: int = Field(INGRESS_MAX_ONGOING, ge=10)
    min_generators: int = Field(1, ge=0)
    max_generators: int = Field(1, ge=1)
    retention_s: int = Field(RETENTION_S, ge=60)
    lease_s: float = Field(LEASE_S, gt=0)
    max_attempts: int = Field(MAX_ATTEMPTS, ge=1)
    device: str = "auto"
    generation_timeout_s: float = Field(GENERATION_TIMEOUT_S, gt=0)
    max_batch_size: int = Field(4, ge=1, le=64)  # jobs gathered into one generator call (@serve.batch)
    batch_wait_s: float = Field(0.05, ge=0, le=10)  # how long a generator waits to fill a batch
    max_batch_takes: int = Field(8, ge=1)  # takes sampled together at most (GPU memory)
    fault_oom_takes: int | None = Field(None, ge=0)  # testing aid: simulate OOM above this many takes
    webhook_secret: str | None = Field(None, repr=False)
    # internal receivers webhooks may reach (CIDRs, exact host names); everything else must be public
    webhook_allow: list[str] | None = None
    webhook_attempts: int = Field(WEBHOOK_ATTEMPTS, ge=1, le=30)
    webhook_backoff_s: float = Field(WEBHOOK_BACKOFF_S, gt=0)

    @field_validator("webhook_allow")
    @classmethod
    def _allow_list(cls, entries: list[str] | None) -> list[str] | None:
        parse_allow(entries or ())  # a bad entry stops the app at start, naming it
        return entries

    def resolved(self) -> AppArgs:
        allow = self.webhook_allow
        if allow is None:
            allow = [e.strip() for e in os.environ.get("MUSICGEN_WEBHOOK_ALLOW", "").split(",") if e.strip()]
            parse_allow(allow)  # model_copy does not validate
        return self.model_copy(
            update={
                "model": self.model or os.environ.get("MUSICGEN_MODEL") or "diffrhythm-1.2-base",
                "redis_url": self.redis_url or os.environ.get("REDIS_URL") or None,
                "storage_url": self.storage_url or os.environ.get("MUSICGEN_STORAGE_URL") or None,
                "data_dir": os.path.abspath(self.data_dir or os.environ.get("MUSICGEN_DATA_DIR") or "data"),
                "webhook_secret": self.webhook_secret or os.environ.get("MUSICGEN_WEBHOOK_SECRET", ""),
                "webhook_allow": allow,
            }
        )
