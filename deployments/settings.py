"""Every environment variable the service reads, in one place, turned into typed app arguments.

serve_config.yaml -> AppArgs (typed, validated) -> the deployments' constructors. Nothing here runs at
import time.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

ENV = {
    "REDIS_URL": "the job store; unset: an embedded Redis with its data under MUSICGEN_DATA_DIR/redis",
    "MUSICGEN_DATA_DIR": "results, uploads and the embedded Redis (default ./data)",
    "MUSICGEN_STORAGE_URL": "results and uploads elsewhere: s3://bucket/prefix (several nodes need this)",
    "MUSICGEN_S3_ENDPOINT_URL": "the S3 endpoint of a non-AWS service (MinIO, R2, ...); AWS_* credentials",
    "MUSICGEN_MODEL": "the model to serve (default diffrhythm-1.2-base; 'tiny' = the untrained demo model)",
    "MUSICGEN_CACHE_DIR": "weights cache (default ./models/cache)",
    "MUSICGEN_WEBHOOK_SECRET": "HMAC key of webhook signatures (X-Musicgen-Signature)",
}


class AppArgs(BaseModel):
    """Arguments of the app builder (the `args:` of serve_config.yaml); env vars fill what is unset."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    redis_url: str | None = None
    data_dir: str | None = None
    storage_url: str | None = None  # s3://bucket/prefix; unset: results and uploads under data_dir
    max_queue: int = Field(100, ge=1)
    max_upload_mb: float = Field(50, gt=0)  # reference songs and songs to edit
    min_generators: int = Field(1, ge=0)
    max_generators: int = Field(1, ge=1)
    retention_s: int = Field(7 * 24 * 3600, ge=60)
    lease_s: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    device: str = "auto"
    generation_timeout_s: float = Field(1800.0, gt=0)
    max_batch_size: int = Field(4, ge=1, le=64)  # jobs gathered into one generator call (@serve.batch)
    batch_wait_s: float = Field(0.05, ge=0, le=10)  # how long a generator waits to fill a batch
    max_batch_takes: int = Field(8, ge=1)  # takes sampled together at most (GPU memory)
    fault_oom_takes: int | None = Field(None, ge=0)  # testing aid: simulate OOM above this many takes
    webhook_secret: str | None = Field(None, repr=False)

    def resolved(self) -> AppArgs:
        return self.model_copy(
            update={
                "model": self.model or os.environ.get("MUSICGEN_MODEL") or "diffrhythm-1.2-base",
                "redis_url": self.redis_url or os.environ.get("REDIS_URL") or None,
                "storage_url": self.storage_url or os.environ.get("MUSICGEN_STORAGE_URL") or None,
                "data_dir": os.path.abspath(self.data_dir or os.environ.get("MUSICGEN_DATA_DIR") or "data"),
                "webhook_secret": self.webhook_secret or os.environ.get("MUSICGEN_WEBHOOK_SECRET", ""),
            }
        )
