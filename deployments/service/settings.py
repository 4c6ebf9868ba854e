"""The service's settings: every default and every environment variable, in one place.

serve_config.yaml `args:` -> AppArgs (typed, validated; env vars fill what is unset) -> the deployments'
constructors and the service objects (JobStore, ApiConfig, JobRunner) built from it. Nothing here runs
at import time.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.service.netguard import parse_allow
from musicgen import env as musicgen_env

# -- defaults (each named once; AppArgs, the job store, the wire schemas and the API read them here) --
LEASE_S = 30.0  # a worker renews its job's lease every lease/3 s; a lost worker's job is re-queued after it
MAX_ATTEMPTS = 3  # runs of a job whose worker is lost before it fails with WORKER_LOST
RETENTION_S = 7 * 24 * 3600  # finished jobs, their events and their files are kept this long
MAX_STEPS = 200  # sampling steps of one song (takes of one song: the library's musicgen.pipelines.MAX_TAKES)
MAX_QUEUE = 100  # queued songs before submissions get QUEUE_FULL
MAX_UPLOAD_MB = 50.0  # reference songs and songs to edit
MAX_UPLOAD_SECONDS = 600.0
MAX_LYRICS_LINES = 400  # lines of one song's lyrics (20,000 characters at most: schemas.py)
MAX_BODY_KB = 256  # any request body but an upload's (a song request with the longest lyrics is ~60 KiB)
GENERATION_TIMEOUT_S = 1800.0
MAX_BATCH_SIZE = 4  # jobs a generator runs as one batch at most; those of equal length sample together
# jobs a generator whose model runs on an engine (DiffRhythm 2) samples at once: each joins the running
# ones; its cache budget may hold fewer takes, and the rest wait in order inside the replica
MAX_ENGINE_JOBS = 64
BATCH_WAIT_S = 0.05  # how long an idle generator waits for more jobs after the first
# after a stopping generator's last batch: its takes encoded and stored. At most 8 jobs' takes wait (32
# takes of 4); a 285 s take encodes to MP3 in ~10 s on each of two threads: ~160 s, the rest for storage
STORE_TAKES_S = 300.0
# a generator whose model failed to load refuses jobs (MODEL_NOT_LOADED) this long, then fails its health
# check so that Serve replaces it and the new replica tries again: a retry a minute, not a restart loop
MODEL_RETRY_S = 60.0
GENERATOR_HEALTH_CHECK_S = 10.0
SECONDS_PER_JOB_ESTIMATE = 60.0  # queue ETA before measured timings exist
SSE_KEEPALIVE_S = 15.0  # a comment line on idle event streams (proxies close silent connections)
INGRESS_MAX_ONGOING = 5000  # concurrent requests per ingress replica: event streams stay open for minutes
# per API key (each key's record may override them: `musicgen keys create --songs-per-day ...`)
KEY_ACTIVE_JOBS = 4  # queued + running songs at once
KEY_QUEUED_JOBS = 4  # songs waiting in the queue at once
KEY_SONGS_PER_DAY = 200  # submissions accepted per UTC day
KEY_AUDIO_S_PER_DAY = 4 * 3600.0  # seconds of audio per UTC day: duration_s x num_takes of each song
KEY_REQUESTS_PER_MINUTE = 120  # every authenticated request (a token bucket refilled at this rate)
KEY_BURST = 30  # requests a key may make at once after being idle (the bucket's size)
# webhooks: failed attempt n is retried after min(BACKOFF * 2**(n-1), BACKOFF_MAX); 8 attempts span ~21 min
WEBHOOK_ATTEMPTS = 8
WEBHOOK_BACKOFF_S = 10.0
WEBHOOK_BACKOFF_MAX_S = 3600.0
WEBHOOK_TIMEOUT_S = 10.0  # connect, and each read of the answer
WEBHOOK_LEASE_S = 60.0  # an attempt in flight is no other replica's until then: longer than any attempt
WEBHOOK_POLL_S = 1.0  # how often an idle delivery loop looks for due deliveries
WEBHOOK_CONCURRENCY = 8  # attempts in flight per delivery loop (each on a thread)
WEBHOOK_DEAD_MAX = 1000  # dead letters kept (newest first); older ones are dropped

DEFAULT_UI_DIR = Path(__file__).resolve().parents[2] / "ui"  # the checkout's (an editable install)

ENV = {
    "REDIS_URL": "the job store; unset: an embedded Redis with its data under MUSICGEN_DATA_DIR/redis",
    "MUSICGEN_DATA_DIR": "results, uploads and the embedded Redis (default ./data); each node's own, where set on it",
    "MUSICGEN_STORAGE_URL": "results and uploads elsewhere: s3://bucket/prefix (several nodes need this)",
    "MUSICGEN_S3_ENDPOINT_URL": "the S3 endpoint of a non-AWS service (MinIO, R2, ...); AWS_* credentials",
    "MUSICGEN_MODEL": "the model to serve (default diffrhythm-1.2-base; 'tiny' = the untrained demo model)",
    "MUSICGEN_MODELS": "more models served beside it, comma-separated (e.g. diffrhythm-2): a generator each",
    "MUSICGEN_WEBHOOK_SECRET": "HMAC key of webhook signatures (X-Musicgen-Signature)",
    "MUSICGEN_GENERATOR_GPUS": "GPUs per generator replica (generator_gpus), e.g. 1 on a cluster that scales GPU nodes from 0",
    "MUSICGEN_GENERATOR_RESOURCES": 'custom Ray resources per generator replica, a JSON object: {"musicgen_generator": 1}',
    "MUSICGEN_API_RESOURCES": 'custom Ray resources per ingress and validator replica: {"musicgen_api": 1}',
    "MUSICGEN_API_KEYS": "keys registered at start: name:role:secret entries (secrets from `musicgen keys secret`)",
    "MUSICGEN_UI_DIR": "the web UI's files (default: ui/ of the checkout; the Docker image sets /app/ui)",
    "MUSICGEN_WEBHOOK_ALLOW": "comma-separated CIDRs and host names webhooks may reach although not public",
}


def env(name: str) -> str:
    """The value of environment variable `name` ("" when unset): the service reads its environment only
    through here, so that ENV lists every variable it obeys."""
    if name not in ENV:
        raise KeyError(f"{name} is not declared in deployments.service.settings.ENV")
    return os.environ.get(name, "")


class Quotas(BaseModel):
    """What one API key may use. The defaults apply to every key; a key's record may override some."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    active_jobs: int = Field(KEY_ACTIVE_JOBS, ge=1)
    queued_jobs: int = Field(KEY_QUEUED_JOBS, ge=1)
    songs_per_day: int = Field(KEY_SONGS_PER_DAY, ge=1)
    audio_s_per_day: float = Field(KEY_AUDIO_S_PER_DAY, gt=0)
    requests_per_minute: float = Field(KEY_REQUESTS_PER_MINUTE, gt=0)
    burst: int = Field(KEY_BURST, ge=1)


def is_loopback(host: str | None) -> bool:
    """Only this machine can connect to `host` (None: not known, so not assumed)."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


class AppArgs(BaseModel):
    """Arguments of the app builder (the `args:` of serve_config.yaml); env vars fill what is unset."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # the default model (requests that name none)
    models: list[str] | None = None  # more models served beside it (unset: MUSICGEN_MODELS, comma-separated)
    redis_url: str | None = None
    data_dir: str | None = None
    storage_url: str | None = None  # s3://bucket/prefix; unset: results and uploads under data_dir
    max_queue: int = Field(MAX_QUEUE, ge=1)
    max_upload_mb: float = Field(MAX_UPLOAD_MB, gt=0)
    min_ingress: int = Field(1, ge=1)  # CPU replicas of the HTTP ingress (autoscaled on open requests)
    max_ingress: int = Field(1, ge=1)
    ingress_max_ongoing: int = Field(INGRESS_MAX_ONGOING, ge=10)
    # ingress replicas on one node at most (1 on a cluster: losing a node loses one replica); unset: any
    max_ingress_per_node: int | None = Field(None, ge=1)
    min_generators: int = Field(1, ge=0)
    max_generators: int = Field(1, ge=1)
    retention_s: int = Field(RETENTION_S, ge=60)
    lease_s: float = Field(LEASE_S, gt=0)
    max_attempts: int = Field(MAX_ATTEMPTS, ge=1)
    device: str = "auto"
    # GPUs each generator replica asks Ray for (fractions share a GPU). Unset: MUSICGEN_GENERATOR_GPUS,
    # else 1 when the Ray cluster has a GPU at start and 0 otherwise: right for one machine, wrong for a
    # cluster whose GPU nodes scale from zero, which must set it (cluster/ does).
    generator_gpus: float | None = Field(None, ge=0, le=8)
    generator_cpus: float = Field(1.0, gt=0, le=64)  # CPUs each generator replica asks Ray for
    # custom Ray resources each generator replica asks for, which only the nodes meant for generators
    # declare (`ray start --resources`), e.g. {"musicgen_generator": 1}; and each ingress and validator
    # replica, e.g. {"musicgen_api": 1} on the head (kept off GPU nodes that come and go). Unset:
    # MUSICGEN_GENERATOR_RESOURCES / MUSICGEN_API_RESOURCES (JSON objects), else none.
    generator_resources: dict[str, float] | None = None
    api_resources: dict[str, float] | None = None
    plan: Literal["auto", "batched", "sequential", "parallel", "graphs"] = "auto"  # musicgen's PLANS
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the DiT blocks; auto = on CUDA only
    generation_timeout_s: float = Field(GENERATION_TIMEOUT_S, gt=0)
    model_retry_s: float = Field(MODEL_RETRY_S, gt=0)  # see SongGenerator.check_health
    # how often Serve runs a generator replica's health check (three failures in a row replace it)
    generator_health_check_s: float = Field(GENERATOR_HEALTH_CHECK_S, gt=0, le=300)
    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=1, le=64)
    max_engine_jobs: int = Field(MAX_ENGINE_JOBS, ge=1, le=1024)
    # the key/value cache of a generator whose model runs on an engine (DiffRhythm 2), at most: GiB, or
    # a share of its GPU's free memory once the model is loaded (unset: musicgen's ENGINE_CACHE_SHARE,
    # 0.6; a quarter of the RAM on a CPU). Over it, takes wait in order; a song that could not fit alone
    # is refused. One of the two at most.
    engine_cache_gib: float | None = Field(None, gt=0, le=4096)
    engine_cache_share: float | None = Field(None, gt=0, le=0.95)
    batch_wait_s: float = Field(BATCH_WAIT_S, ge=0, le=10)
    # takes sampled together at most (GPU memory); unset: the pipeline's own (musicgen.pipelines.Pipeline)
    max_batch_takes: int | None = Field(None, ge=1)
    fault_oom_takes: int | None = Field(None, ge=0)  # testing aid: simulate OOM above this many takes
    webhook_secret: str | None = Field(None, repr=False)
    cors_origins: list[str] = []  # browser origins allowed to call the API from other sites ("*" = any)
    security_headers: bool = True  # nosniff, no framing, no referrer, a strict CSP on API answers
    ui_dir: str | None = None  # the web UI served at / (unset: MUSICGEN_UI_DIR, else ui/ of the checkout)
    # API keys: "auto" = on unless the API listens on loopback only; "on"; "off" (refused on a public
    # address unless allow_insecure_public). `host`: where the API listens; unset, build_app reads it
    # from Ray Serve's http_options (unknown counts as public).
    auth: Literal["auto", "on", "off"] = "auto"
    allow_insecure_public: bool = False
    host: str | None = None
    quotas: Quotas = Field(default_factory=Quotas)  # per API key (a key's own record may override them)

    @model_validator(mode="after")
    def _refuse_an_open_public_api(self) -> AppArgs:
        if self.auth == "off" and not is_loopback(self.host) and not self.allow_insecure_public:
            raise ValueError(
                f"auth is off but the API listens on {self.host or 'an unknown address'!r}, which other "
                "machines can reach: anyone could read, cancel and download every user's songs. Either "
                "turn auth on (auth: on, and create keys with `musicgen keys create NAME`), listen on "
                "127.0.0.1 only (http_options.host), or accept an open API with allow_insecure_public: true"
            )
        return self

    @model_validator(mode="after")
    def _one_cache_budget(self) -> AppArgs:
        if self.engine_cache_gib is not None and self.engine_cache_share is not None:
            raise ValueError(
                "engine_cache_gib and engine_cache_share both set: give the engine's cache budget one way, "
                "in GiB or as a share of the GPU's free memory"
            )
        return self

    @property
    def served_models(self) -> list[str]:
        """The default model first, then the others, each once (a generator deployment each)."""
        if self.model is None:
            raise ValueError("the served models are known once resolved() has filled the default model")
        return list(dict.fromkeys([self.model, *(self.models or [])]))

    @property
    def generator_grace_s(self) -> float:
        """How long a stopping generator may take to finish (Serve's graceful_shutdown_timeout_s): its
        running batch, which may last generation_timeout_s, then the storing of that batch's takes."""
        return self.generation_timeout_s + STORE_TAKES_S

    @property
    def auth_required(self) -> bool:
        """Requests need an API key: auth on, or auto on an address other machines can reach."""
        return self.auth == "on" or (self.auth == "auto" and not is_loopback(self.host))

    # internal receivers webhooks may reach (CIDRs, exact host names); everything else must be public
    webhook_allow: list[str] | None = None
    webhook_attempts: int = Field(WEBHOOK_ATTEMPTS, ge=1, le=30)
    webhook_backoff_s: float = Field(WEBHOOK_BACKOFF_S, gt=0)

    @field_validator("webhook_allow")
    @classmethod
    def _allow_list(cls, entries: list[str] | None) -> list[str] | None:
        parse_allow(entries or ())  # a bad entry stops the app at start, naming it
        return entries

    def resolved(self) -> ResolvedArgs:
        """These args with the environment filling what is unset (see ENV): what the app runs on."""
        allow = self.webhook_allow
        if allow is None:
            allow = [e.strip() for e in env("MUSICGEN_WEBHOOK_ALLOW").split(",") if e.strip()]
        gpus = self.generator_gpus
        if gpus is None and env("MUSICGEN_GENERATOR_GPUS").strip():
            raw = env("MUSICGEN_GENERATOR_GPUS").strip()
            try:
                gpus = float(raw)
                if not 0 <= gpus <= 8:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"MUSICGEN_GENERATOR_GPUS={raw!r}: give a number of GPUs from 0 to 8"
                ) from None
        return ResolvedArgs(
            **{
                **dict(self),
                "generator_gpus": gpus,
                "generator_resources": _resources(
                    self.generator_resources,
                    "MUSICGEN_GENERATOR_RESOURCES",
                    env("MUSICGEN_GENERATOR_RESOURCES"),
                ),
                "api_resources": _resources(
                    self.api_resources, "MUSICGEN_API_RESOURCES", env("MUSICGEN_API_RESOURCES")
                ),
                "data_dir_given": self.data_dir is not None,
                "model": self.model or env("MUSICGEN_MODEL") or "diffrhythm-1.2-base",
                "models": self.models
                if self.models is not None
                else [m.strip() for m in env("MUSICGEN_MODELS").split(",") if m.strip()],
                "redis_url": self.redis_url or env("REDIS_URL") or None,
                "storage_url": self.storage_url or env("MUSICGEN_STORAGE_URL") or None,
                "data_dir": os.path.abspath(self.data_dir or env("MUSICGEN_DATA_DIR") or "data"),
                "webhook_secret": self.webhook_secret or env("MUSICGEN_WEBHOOK_SECRET"),
                "webhook_allow": allow,
                "ui_dir": self.ui_dir or env("MUSICGEN_UI_DIR") or str(DEFAULT_UI_DIR),
            }
        )


def _resources(given: dict[str, float] | None, var: str, raw: str) -> dict[str, float]:
    """Custom Ray resources: the arg, else the JSON object `raw` (of variable `var`); amounts > 0."""
    if given is None:
        raw = raw.strip()
        try:
            given = json.loads(raw) if raw else {}
        except ValueError:
            raise ValueError(
                f"{var}={raw!r} is not JSON: give an object such as '{{\"musicgen_generator\": 1}}'"
            ) from None
    if not isinstance(given, dict) or not all(
        isinstance(k, str) and k and isinstance(v, int | float) and not isinstance(v, bool) and v > 0
        for k, v in given.items()
    ):
        raise ValueError(
            f"{var} (or its arg): give an object of resource names and amounts > 0, got {given!r}"
        )
    if {"CPU", "GPU", "memory", "object_store_memory"} & set(given):
        raise ValueError(f"{var}: CPUs and GPUs have settings of their own (generator_cpus, generator_gpus)")
    return {k: float(v) for k, v in given.items()}


class ResolvedArgs(AppArgs):
    """AppArgs after `resolved()`: the default model and the data folder are known."""

    model: str
    data_dir: str
    generator_resources: dict[str, float] = {}
    api_resources: dict[str, float] = {}
    data_dir_given: bool = False  # data_dir was an arg (every node uses it), not the environment

    def on_this_node(self) -> ResolvedArgs:
        """These args where a replica runs: the data folder is this node's MUSICGEN_DATA_DIR when the
        node sets one and the args do not (nodes of a cluster do not share a disk)."""
        local = env("MUSICGEN_DATA_DIR")
        if self.data_dir_given or not local:
            return self
        return self.model_copy(update={"data_dir": os.path.abspath(local)})


def describe() -> str:
    """Every arg of serve_config.yaml with its default, then every environment variable: what
    `python -m deployments.service.settings` prints."""
    rows = []
    for name, field in AppArgs.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            rows += [(f"{name}.{k}", v) for k, v in default.model_dump().items()]
        else:
            rows.append((name, default))
    width = max(len(name) for name, _ in rows)
    lines = ["serve_config.yaml args and their defaults:"]
    lines += [f"  {name:<{width}}  {'unset' if value is None else repr(value)}" for name, value in rows]
    lines += ["", "environment (fills args that are unset):"]
    lines += [f"  {name}: {meaning}" for name, meaning in ENV.items()]
    lines += ["", "environment of the library the service runs (musicgen/env.py):"]
    lines += [f"  {var.name}: {var.meaning} (unset: {var.default})" for var in musicgen_env.ALL]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
