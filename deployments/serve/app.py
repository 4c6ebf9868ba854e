"""The Ray Serve application: `serve run serve_config.yaml` calls `build_app`. Only the adapters live
here; what they adapt is the Ray-free service layer in deployments/service/.

- `Ingress` (CPU, autoscaled between min_ingress and max_ingress on open requests): the async FastAPI
  app of deployments/service/api; writes every job to Redis before answering 202, pushes its id to
  the generators (at most one call in flight per job), fans job events out to event streams over one
  Redis subscription, runs the reconciler (re-queue lost workers' jobs, re-dispatch queued jobs,
  e.g. after an ingress restart) and a webhook delivery loop (deliveries live in Redis: any replica
  sends them, and they outlive the replica that queued them). Sized for thousands of open
  connections (`ingress_max_ongoing`): an event stream stays open for the minutes a song takes.
- `PromptValidator` (CPU): the lyrics front end and request limits.
- `SongGenerator`, one deployment per served model (`model` and `models`: DiffRhythm 1.2 and 2 beside
  each other; the ingress sends each job to its model's), `generator_gpus` GPUs each (unset: one when
  the cluster has GPUs at start): loads its model and the style encoder (MuQ-MuLan, with its prompt
  cache) once and runs the jobs queued at it in batches (deployments/service/batching.py); a job is
  claimed atomically in Redis, so a duplicate dispatch is harmless. Takes are encoded and stored on
  CPU threads while the model runs the next batch. Replicas report their status to Redis, which
  `/readyz` reads; they scale between min_generators (0 allowed) and max_generators.

Without REDIS_URL a `RedisServer` replica runs an embedded Redis (data under data_dir/redis) for as
long as the app runs; a multi-node cluster must set REDIS_URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from pathlib import Path

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.service.settings import AppArgs

log = logging.getLogger("ray.serve")
RECONCILE_EVERY_S = 5.0
READY_CACHE_S = 1.0  # submissions and /readyz read the generators' reports at most this often
GENERATION_GRACE_S = 900  # graceful shutdown: longer than the longest song takes on a GPU
CPU_GENERATOR_NICE = 19  # a generator without a GPU runs below the API (see SongGenerator.__init__)
# A generator without its model reports that for this long (a loaded one: GENERATOR_STATUS_TTL_S): longer
# than Serve takes to replace it, so /readyz keeps telling why until its successor reports.
LOAD_ERROR_REPORT_TTL_S = 120.0
INGRESS_GC_THRESHOLDS = (50_000, 20, 100)  # Python's default is (700, 10, 10): see Ingress.__init__


def _lower_priority(nice: int) -> None:
    """Nice every thread of this process (on Linux a nice value belongs to a thread; threads started
    later inherit their creator's). Ray starts workers at 15; 19 is the lowest priority."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        with contextlib.suppress(OSError):  # a thread that just ended
            os.setpriority(os.PRIO_PROCESS, int(tid), max(nice, os.getpriority(os.PRIO_PROCESS, int(tid))))


def _storage(args: AppArgs, area: str):
    """Results or uploads: under data_dir, or in the bucket of storage_url (s3://...)."""
    from deployments.service.storage import open_storage

    return open_storage(args.storage_url or args.data_dir, area)


def _store_options(args: AppArgs) -> dict:
    return {"retention_s": args.retention_s, "lease_s": args.lease_s, "max_attempts": args.max_attempts}


@serve.deployment(ray_actor_options={"num_cpus": 0}, num_replicas=1, health_check_period_s=5)
class RedisServer:
    """The embedded Redis, owned by a replica so that it lives (and dies) with the app. The port is
    fixed at build time so that every deployment knows the URL without asking."""

    def __init__(self, data_dir: str, port: int):
        from deployments.service.redis_server import EmbeddedRedis

        self.server = EmbeddedRedis(data_dir, port=port)
        self.server.start()

    def check_health(self) -> None:
        if self.server.process is None or self.server.process.poll() is not None:
            # the replica is replaced and Redis restarts from its AOF
            raise RuntimeError("embedded redis exited")

    def __del__(self):
        self.server.stop()


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class PromptValidator:
    def __init__(self, args: AppArgs):
        from deployments.service.netguard import AddressPolicy
        from deployments.service.validator import SongValidator
        from musicgen.lyrics.frontend import LyricsFrontEnd

        self.validator = SongValidator(
            LyricsFrontEnd.from_assets(), _storage(args, "uploads"), args.model, set(args.served_models),
            webhook_policy=AddressPolicy(args.webhook_allow or ()),
        )  # fmt: skip

    def validate(self, body: dict) -> dict:
        """{'params': ...} or {'error': ...}: errors travel as data, not as wrapped exceptions."""
        from deployments.service.errors import ServiceError
        from deployments.service.schemas import SongCreate

        try:
            return {"params": self.validator.validate(SongCreate(**body)).to_dict()}
        except ServiceError as exc:
            return {"error": exc.to_dict()}


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    graceful_shutdown_timeout_s=GENERATION_GRACE_S,
    health_check_period_s=10,
)
class SongGenerator:
    """Runs jobs in batches: a `JobBatcher` hands the model every job id queued at this replica when
    it is free (up to `max_batch_size`, waiting up to `batch_wait_s` after the first for more), and the
    pipeline samples those of the same frame and step count as one batch. Reports its own status to
    the job store every few seconds."""

    def __init__(self, args: AppArgs, redis_url: str, model: str | None = None):
        import socket

        from deployments.serve.metrics import GeneratorMetrics
        from deployments.service.batching import JobBatcher
        from deployments.service.errors import ServiceError
        from deployments.service.runner import JobRunner
        from deployments.service.store import JobStore
        from musicgen.errors import MusicgenError
        from musicgen.pipeline import SongPipeline

        self.args = args
        self.model = model or args.model  # the model this deployment's replicas load (one of served_models)
        self.load_error: dict | None = None
        self.load_failed_at = 0.0  # time.monotonic() when the model failed to load
        self.runner = None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.store = JobStore.from_url(redis_url, **_store_options(args))
        self.batcher = JobBatcher(self._run_batch, args.max_batch_size, args.batch_wait_s)
        self._reporter = asyncio.get_event_loop().create_task(self._report_forever())
        try:
            pipeline = SongPipeline.from_pretrained(
                self.model, device=args.device, plan=args.plan, compile=args.compile
            )
        except MusicgenError as exc:
            self.load_error = ServiceError.from_library(exc).to_dict()  # MODEL_NOT_LOADED
            self.load_failed_at = time.monotonic()
            log.error("model %s not loaded: %s", self.model, exc)
            self._report_now()  # before any job is refused: /readyz then tells why
            return
        pipeline.max_batch_takes = args.max_batch_takes
        pipeline.fault_oom_takes = args.fault_oom_takes
        self.runner = JobRunner(
            self.store, pipeline, _storage(args, "results"), _storage(args, "uploads"), self.worker,
            on_finish=GeneratorMetrics(self.model).record, timeout_s=args.generation_timeout_s,
            encode_in_background=True,
        )  # fmt: skip
        self.device = pipeline.device
        if self.device.type == "cpu":
            # On CPU the model takes every core it can; the HTTP API shares them. At the lowest priority
            # the model runs as fast as before on an idle box and yields to requests when they come.
            _lower_priority(CPU_GENERATOR_NICE)
        self._report_now()

    def _report_now(self) -> None:
        try:
            ttl_s = LOAD_ERROR_REPORT_TTL_S if self.load_error else None
            self.store.put_generator_status(self.worker, self.status(), ttl_s=ttl_s)
        except Exception:
            log.warning("could not report generator status (job store unreachable?)", exc_info=True)

    async def _report_forever(self) -> None:
        from deployments.service.store import GENERATOR_STATUS_EVERY_S

        while True:
            await asyncio.to_thread(self._report_now)
            await asyncio.sleep(GENERATOR_STATUS_EVERY_S)

    async def run(self, job_id: str) -> str | None:
        """The job's state as this replica left it (None: another worker has it)."""
        return await self.batcher.submit(job_id)

    async def _run_batch(self, job_ids: list[str]) -> list[str | None]:
        if self.runner is None:
            return await asyncio.to_thread(self._refuse, job_ids)
        states = await asyncio.to_thread(self.runner.run_many, job_ids)
        return [state.value if state else None for state in states]

    def _refuse(self, job_ids: list[str]) -> list[str | None]:
        """Without a model, jobs sent here (accepted while scaled to zero, or queued before a restart)
        fail with MODEL_NOT_LOADED rather than wait forever."""
        out: list[str | None] = []
        for job_id in job_ids:
            token = self.store.claim(job_id, self.worker)
            if token is not None:
                self.store.fail(job_id, self.load_error, token=token)
            out.append("failed" if token is not None else None)
        return out

    def __del__(self):
        # graceful shutdown: Serve waited for the running batch; let its takes finish encoding (a job
        # cut off here keeps no lease and is re-run elsewhere)
        if getattr(self, "runner", None) is not None:
            self.runner.drain(timeout=GENERATION_GRACE_S / 2)

    def status(self) -> dict:
        return {"loaded": self.runner is not None, "model": self.model, "error": self.load_error,
                "worker": self.worker}  # fmt: skip

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s and replaces the replica when it raises."""
        if self.runner is None:
            # Without its model the replica only refuses jobs: model_retry_s after the failed load it
            # fails, and the replica that replaces it loads the model again (after `musicgen models
            # pull`, say). Not at once: Serve checks a new replica right after __init__ and takes a
            # failure there for a failed start (the replica never serves, and jobs sent to it wait
            # instead of failing with MODEL_NOT_LOADED); and a restart loop would take the node's CPU.
            if time.monotonic() - self.load_failed_at >= self.args.model_retry_s:
                self._report_now()  # /readyz keeps telling why while Serve replaces this replica
                raise RuntimeError(f"model {self.model} not loaded: {self.load_error['message']}")
            return
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)  # raises on a dead CUDA context: the replica is replaced


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    def __init__(
        self,
        validator: DeploymentHandle,
        generators: dict[str, DeploymentHandle],  # one deployment per served model
        args: AppArgs,
        redis_url: str,
        redis_server=None,
        provisioned_keys: list[tuple[str, str, str]] = (),
    ):
        from deployments.service.api import ApiConfig, Services
        from deployments.service.netguard import AddressPolicy
        from deployments.service.store import AsyncJobStore
        from deployments.service.webhooks import WebhookDeliverer

        self.args, self.validator, self.generators = args, validator, generators
        self.store = AsyncJobStore.from_url(redis_url, **_store_options(args))
        self.services = Services(
            store=self.store, validate=self._validate, dispatch=self._start,
            results=_storage(args, "results"), uploads=_storage(args, "uploads"),
            ready=self._ready, models=self._models,
            config=ApiConfig(
                max_queue=args.max_queue, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                auth=args.auth_required, quotas=args.quotas, cors_origins=tuple(args.cors_origins),
                security_headers=args.security_headers, ui_dir=args.ui_dir,
            ),
        )  # fmt: skip
        self._loop = asyncio.get_event_loop()
        self._inflight: set[str] = set()  # job ids sent to a generator whose call has not returned
        self._ready_cache: tuple[float, tuple[bool, str]] | None = None
        self._reconciler = self._loop.create_task(self._reconcile_forever())
        self.webhooks = WebhookDeliverer(
            self.store, args.webhook_secret or "", AddressPolicy(args.webhook_allow or ()),
            attempts=args.webhook_attempts, backoff_s=args.webhook_backoff_s,
        )  # fmt: skip
        self._webhook_loop = self._loop.create_task(self.webhooks.run_forever())
        self._provisioning = self._loop.create_task(self._provision_keys(list(provisioned_keys)))
        # Python's cycle collector stalled this loop: with hundreds of open streams, full collections
        # scanned every long-lived object for 100-190 ms, every few seconds, and found no garbage
        # (measured with gc.callbacks). The objects alive after start-up leave its view, and full
        # collections become rare (refcounting still frees all but cyclic garbage at once).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*INGRESS_GC_THRESHOLDS)

    async def _provision_keys(self, keys: list[tuple[str, str, str]]) -> None:
        """Register the keys of MUSICGEN_API_KEYS (name, role, digest) until the store answers."""
        from deployments.service.store import AsyncKeyStore

        store = AsyncKeyStore.sharing(self.store)
        while keys:
            try:
                for name, role, key_digest in list(keys):
                    if await store.provision(name, role, key_digest):
                        log.info("API key %r (%s) registered from MUSICGEN_API_KEYS", name, role)
                    keys.remove((name, role, key_digest))
            except Exception:
                log.warning(
                    "could not register MUSICGEN_API_KEYS yet (job store unreachable?)", exc_info=True
                )
                await asyncio.sleep(RECONCILE_EVERY_S)

    async def _reconcile_forever(self) -> None:
        """Re-queue jobs of lost workers and (re)dispatch queued jobs: after an ingress restart, a
        generator crash or a Redis restart, every accepted job gets a worker (a job failed here with
        WORKER_LOST has its webhook queued by the same script). Then delete the files whose retention
        period is over (expired jobs' takes, old uploads)."""
        from deployments.service.retention import sweep_expired_files

        while True:
            try:
                await self.store.reconcile()
                for job_id in await self.store.queued_ids():
                    self._start(job_id)
                await sweep_expired_files(self.store, self.services.results, self.services.uploads)
            except Exception:
                log.warning("reconcile failed (job store unreachable?)", exc_info=True)
            await asyncio.sleep(RECONCILE_EVERY_S)

    def _start(self, job_id: str) -> None:
        """Send a job to the generators; at most one call per job in flight. Never blocks."""
        if job_id not in self._inflight:
            self._inflight.add(job_id)
            self._loop.create_task(self._send(job_id))

    async def _send(self, job_id: str) -> None:
        try:
            params = await self.store.params(job_id)  # the job's model picks its generator deployment
            model = (params or {}).get("model", self.args.model)
            generator = self.generators.get(model)
            if generator is None:  # a job of a model no longer served (the config changed)
                log.warning("job %s is for model %s, which this app no longer serves", job_id, model)
                return
            await generator.run.remote(job_id)
        except Exception:  # the replica died: the lease expires and the reconciler sends it again
            log.warning("generator call for %s failed", job_id, exc_info=True)
        finally:
            self._inflight.discard(job_id)

    async def _validate(self, body):
        from deployments.service.errors import ServiceError
        from deployments.service.params import SongParams

        out = await self.validator.validate.remote(body.model_dump())
        if "error" in out:
            raise ServiceError.from_dict(out["error"])
        return SongParams.from_dict(out["params"])

    async def _ready(self) -> tuple[bool, str]:
        """From the generators' own reports in the job store (asking a replica would wait behind the
        songs it is generating), cached for a second. Ready when every served model has a generator
        with its model loaded (or may start one: scaled to zero)."""
        now = time.monotonic()
        if self._ready_cache is not None and now - self._ready_cache[0] < READY_CACHE_S:
            return self._ready_cache[1]
        reports = await self.store.generator_statuses()
        states = [
            self._model_state(m, [r for r in reports if r.get("model") == m]) for m in self.args.served_models
        ]
        answer = all(ok for ok, _ in states), "; ".join(why for _, why in states)
        self._ready_cache = now, answer
        return answer

    def _model_state(self, model: str, reports: list[dict]) -> tuple[bool, str]:
        loaded = [r for r in reports if r.get("loaded")]
        failed = [r["error"] for r in reports if r.get("error")]
        if loaded:
            return True, f"serving {model} on {len(loaded)} generator(s)"
        if failed:
            return False, f"{model}: {failed[0]['message']}; {failed[0]['recovery']}"
        if self.args.min_generators == 0:
            return (
                True,
                f"{model} scaled to zero: the first song starts a generator, which loads the model first",
            )
        return False, f"{model}: no generator has reported yet: the model is loading"

    async def _models(self) -> list[dict]:
        from deployments.service.schemas import model_view
        from deployments.service.settings import MAX_TAKES
        from musicgen.registry import MODELS

        reports = await self.store.generator_statuses()
        out = []
        for name in self.args.served_models:
            ok, why = self._model_state(name, [r for r in reports if r.get("model") == name])
            spec = MODELS[name]
            out.append(model_view(spec, ok, why, MAX_TAKES))
        return out

    def __serve_build_asgi_app__(self):
        from deployments.service.api import create_api

        return create_api(self.services)


def _serve_http_host() -> str | None:
    """The address Serve's HTTP proxy (and, with HAProxy, each ingress replica) listens on: the
    controller's http_options. None when no Serve instance runs (then auth counts it as public)."""
    from ray.serve.context import _get_global_client

    try:
        client = _get_global_client(raise_if_no_controller_running=False)
        return client.http_config.host if client is not None else None
    except Exception:  # Ray's private API moved: unknown, so treated as public
        log.warning("could not read Serve's HTTP host; API keys are required", exc_info=True)
        return None


def app_args(raw_args: dict | None) -> AppArgs:
    """serve_config.yaml's args, validated (an open API on a public address is refused here), with
    the HTTP host Serve listens on unless the args name one."""
    raw = dict(raw_args or {})
    if raw.get("host") is None:
        raw["host"] = _serve_http_host()
    return AppArgs(**raw).resolved()


def generator_gpus(args: AppArgs) -> float:
    """GPUs per generator replica: the setting, else what the cluster has now (one machine's case)."""
    import ray

    if args.generator_gpus is not None:
        return args.generator_gpus
    found = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    log.info("generator_gpus unset: %s (the cluster has %g GPUs now; a cluster that adds GPU nodes later "
             "must set generator_gpus)", 1 if found else 0, found)  # fmt: skip
    return 1.0 if found else 0.0


def build_app(raw_args: dict) -> serve.Application:
    """The app builder named in serve_config.yaml. Generators ask for `generator_gpus` GPUs each (unset:
    one when the cluster has GPUs at start); keys from MUSICGEN_API_KEYS are checked here, so that a
    malformed entry stops the app at start, and registered by the ingress (by digest only)."""
    from deployments.service.keys import keys_from_env

    args = app_args(raw_args)
    provisioned = keys_from_env()
    log.info("API keys %s (auth: %s, HTTP host %s)", "required" if args.auth_required else "off", args.auth,
             args.host)  # fmt: skip
    redis_url, redis_server = args.redis_url, None
    if redis_url is None:  # embedded: a replica of its own owns the server process
        from deployments.service.redis_server import free_port

        port = free_port()
        redis_url = f"redis://127.0.0.1:{port}/0"
        redis_server = RedisServer.bind(str(Path(args.data_dir) / "redis"), port)
    gpus = generator_gpus(args)
    generators = {}
    for i, model in enumerate(args.served_models):
        generators[model] = SongGenerator.options(
            # the default model's deployment keeps the plain name; each other model gets its own
            name="SongGenerator" if i == 0 else f"SongGenerator-{model}",
            ray_actor_options={"num_gpus": gpus, "num_cpus": args.generator_cpus}
            if gpus
            else {"num_cpus": args.generator_cpus},
            # a full batch running and the next one gathering; the rest wait in the handles' queues
            max_ongoing_requests=2 * args.max_batch_size,
            autoscaling_config={
                "min_replicas": args.min_generators,
                "max_replicas": max(args.max_generators, args.min_generators, 1),
                "target_ongoing_requests": args.max_batch_size,  # scale on queued work: more than a batch each
                "upscale_delay_s": 5,
                "downscale_delay_s": 300,
            },
        ).bind(args, redis_url, model)
    ingress = Ingress.options(
        # its code is all async and never blocks: run it on the replica's own event loop, without the
        # thread hop per request that Serve adds to protect loops from blocking user code
        ray_actor_options={
            "num_cpus": 0.25,
            "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}},
        },
        max_ongoing_requests=args.ingress_max_ongoing,
        autoscaling_config={
            "min_replicas": args.min_ingress,
            "max_replicas": max(args.max_ingress, args.min_ingress),
            # open event streams count: a replica holds a quarter of its capacity before another starts
            "target_ongoing_requests": max(1, args.ingress_max_ongoing // 4),
            "upscale_delay_s": 10,
            "downscale_delay_s": 300,
        },
    )
    # binding the Redis deployment to the ingress makes it part of the app (started and stopped with it)
    return ingress.bind(PromptValidator.bind(args), generators, args, redis_url, redis_server, provisioned)
