"""The Ray Serve application: `serve run serve_config.yaml` calls `build_app`. Only the adapters live
here; what they adapt is the Ray-free service layer in deployments/service/.

- `Ingress` (CPU, autoscaled between min_ingress and max_ingress on open requests): the async FastAPI
  app of deployments/service/api; writes every job to Redis before answering 202, pushes its id to
  the generators (at most one call in flight per job: deployments/service/dispatch.py), fans job
  events out to event streams over one Redis subscription, runs the reconciler (re-queue lost
  workers' jobs, re-dispatch queued jobs, e.g. after an ingress restart) and a webhook delivery loop (deliveries live in Redis: any replica
  sends them, and they outlive the replica that queued them). Sized for thousands of open
  connections (`ingress_max_ongoing`): an event stream stays open for the minutes a song takes.
- `PromptValidator` (CPU): the lyrics front end and request limits.
- `SongGenerator`, one deployment per served model (`model` and `models`: DiffRhythm 1.2 and 2 beside
  each other; the ingress sends each job to its model's), `generator_gpus` GPUs each (unset: one when
  the cluster has GPUs at start): loads its model and the style encoder (MuQ-MuLan, with its prompt
  cache) once and runs the jobs queued at it in batches (deployments/service/generator.py); a job is
  claimed atomically in Redis, so a duplicate dispatch is harmless. Takes are encoded and stored on
  CPU threads while the model runs the next batch. Replicas report their status to Redis, which
  `/readyz` reads (deployments/service/readiness.py); they scale between min_generators (0 allowed)
  and max_generators. A stopping replica gets generation_timeout_s and the time to store its takes.

Without REDIS_URL a `RedisServer` replica runs an embedded Redis (data under data_dir/redis) for as
long as the app runs; a multi-node cluster must set REDIS_URL.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.service.settings import AppArgs, ResolvedArgs

log = logging.getLogger("ray.serve")
INGRESS_GC_THRESHOLDS = (50_000, 20, 100)  # Python's default is (700, 10, 10): see Ingress.__init__


class _ToServeLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log.handle(record)


def _log_through_serve(*loggers: str) -> None:
    """On a replica, Serve's logger writes the replica's log; the service layer logs under its module
    names. The records of these modules (the work they took over from the adapters) go there too,
    INFO included."""
    for name in loggers:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.handlers = [_ToServeLog()]


def _storage(args: ResolvedArgs, area: str):
    """Results or uploads: under data_dir, or in the bucket of storage_url (s3://...)."""
    from deployments.service.storage import open_storage

    return open_storage(args.storage_url or args.data_dir, area)


def _node_id() -> str | None:
    """The Ray node this replica runs on (for reports and messages)."""
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # not in a Ray worker (a unit test)
        return None


def _store_options(args: ResolvedArgs) -> dict:
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
    def __init__(self, args: ResolvedArgs):
        from deployments.service.netguard import AddressPolicy
        from deployments.service.validator import SongValidator
        from musicgen.lyrics.frontend import LyricsFrontEnd

        args = args.on_this_node()
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


# graceful_shutdown_timeout_s and health_check_period_s: set by build_app from the app's generation
# timeout (generator_grace_s) and generator_health_check_s
@serve.deployment(ray_actor_options={"num_cpus": 1})
class SongGenerator:
    """A `GeneratorWorker` (deployments/service/generator.py) on a replica: it loads `model` (default:
    the app's) and runs the jobs sent here in batches, reporting its status to the job store."""

    def __init__(self, args: ResolvedArgs, redis_url: str, model: str | None = None):
        import socket

        from deployments.serve.metrics import GeneratorMetrics
        from deployments.service.generator import CPU_GENERATOR_NICE, GeneratorWorker
        from deployments.service.store import JobStore

        _log_through_serve("deployments.service.generator")
        args = args.on_this_node()
        model = model or args.model
        self.worker = GeneratorWorker(
            args, JobStore.from_url(redis_url, **_store_options(args)),
            _storage(args, "results"), _storage(args, "uploads"), model=model,
            worker=f"{socket.gethostname()}:{os.getpid()}", on_finish=GeneratorMetrics(model).record,
            cpu_nice=CPU_GENERATOR_NICE, node=_node_id(),
        )  # fmt: skip

    async def run(self, job_id: str) -> str | None:
        """The job's state as this replica left it (None: another worker has it)."""
        return await self.worker.run(job_id)

    def status(self) -> dict:
        return self.worker.status()

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s and replaces the replica when it raises."""
        self.worker.check_health()

    def __del__(self):
        # graceful shutdown: Serve waited for the running batch; let its takes finish encoding
        from deployments.service.settings import STORE_TAKES_S

        if getattr(self, "worker", None) is not None:
            self.worker.drain(STORE_TAKES_S)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    """The API (deployments/service/api) on a replica, with the generator deployments' handles as its
    dispatch targets (deployments/service/dispatch.py) and readiness from the generators' reports
    (deployments/service/readiness.py); runs the reconcile, webhook and key provisioning loops."""

    def __init__(
        self,
        validator: DeploymentHandle,
        generators: dict[str, DeploymentHandle],  # one deployment per served model
        args: ResolvedArgs,
        redis_url: str,
        redis_server=None,
        provisioned_keys: Sequence[tuple[str, str, str]] = (),
        generator_needs: dict[str, float] | None = None,  # what a generator replica asks Ray for
    ):
        from deployments.service.api import ApiConfig, Services
        from deployments.service.dispatch import Dispatcher, provision_keys, reconcile_forever
        from deployments.service.netguard import AddressPolicy
        from deployments.service.readiness import Readiness
        from deployments.service.store import AsyncJobStore, AsyncKeyStore
        from deployments.service.webhooks import WebhookDeliverer

        _log_through_serve("deployments.service.dispatch")
        args = args.on_this_node()
        self.validator = validator
        self.store = AsyncJobStore.from_url(redis_url, **_store_options(args))
        loop = asyncio.get_event_loop()
        runs = {model: _run_on(handle) for model, handle in generators.items()}
        self.dispatcher = Dispatcher(self.store, runs, args.model, loop=loop)
        results = _storage(args, "results")
        self.readiness = Readiness(
            self.store, args.served_models, scales_to_zero=args.min_generators == 0, results=results,
            node=_node_id(), unplaceable=lambda: no_node_fits(generator_needs),
        )  # fmt: skip
        self.services = Services(
            store=self.store, validate=self._validate, dispatch=self.dispatcher.start,
            results=results, uploads=_storage(args, "uploads"),
            ready=self.readiness.ready, models=self.readiness.models, fits=self.readiness.check_fits,
            config=ApiConfig(
                max_queue=args.max_queue, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                auth=args.auth_required, quotas=args.quotas, cors_origins=tuple(args.cors_origins),
                security_headers=args.security_headers, ui_dir=args.ui_dir,
            ),
        )  # fmt: skip
        self._reconciler = loop.create_task(
            reconcile_forever(self.store, self.dispatcher.start, self.services.results, self.services.uploads)
        )
        self.webhooks = WebhookDeliverer(
            self.store, args.webhook_secret or "", AddressPolicy(args.webhook_allow or ()),
            attempts=args.webhook_attempts, backoff_s=args.webhook_backoff_s,
        )  # fmt: skip
        self._webhook_loop = loop.create_task(self.webhooks.run_forever())
        self._provisioning = loop.create_task(
            provision_keys(AsyncKeyStore.sharing(self.store), list(provisioned_keys))
        )
        # Python's cycle collector stalled this loop: with hundreds of open streams, full collections
        # scanned every long-lived object for 100-190 ms, every few seconds, and found no garbage
        # (measured with gc.callbacks). The objects alive after start-up leave its view, and full
        # collections become rare (refcounting still frees all but cyclic garbage at once).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*INGRESS_GC_THRESHOLDS)

    async def _validate(self, body):
        from deployments.service.errors import ServiceError
        from deployments.service.params import SongParams

        out = await self.validator.validate.remote(body.model_dump())
        if "error" in out:
            raise ServiceError.from_dict(out["error"])
        return SongParams.from_dict(out["params"])

    def __serve_build_asgi_app__(self):
        from deployments.service.api import create_api

        return create_api(self.services)


def _run_on(generator: DeploymentHandle):
    """A generator deployment as the dispatcher calls it: job id -> the awaitable of its `run`."""
    return lambda job_id: generator.run.remote(job_id)


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


def app_args(raw_args: dict | None) -> ResolvedArgs:
    """serve_config.yaml's args, validated (an open API on a public address is refused here), with
    the HTTP host Serve listens on unless the args name one."""
    raw = dict(raw_args or {})
    if raw.get("host") is None:
        raw["host"] = _serve_http_host()
    return AppArgs(**raw).resolved()


def generator_gpus(args: ResolvedArgs) -> float:
    """GPUs per generator replica: the setting, else what the cluster has now (one machine's case)."""
    import ray

    if args.generator_gpus is not None:
        return args.generator_gpus
    found = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    log.info("generator_gpus unset: %s (the cluster has %g GPUs now; a cluster that adds GPU nodes later "
             "must set generator_gpus)", 1 if found else 0, found)  # fmt: skip
    return 1.0 if found else 0.0


def generator_needs(args: ResolvedArgs, gpus: float) -> dict[str, float]:
    """The Ray resources a generator replica asks for: CPUs, GPUs and the custom ones."""
    return {"CPU": args.generator_cpus, **({"GPU": gpus} if gpus else {}), **args.generator_resources}


def no_node_fits(needs: dict[str, float] | None) -> str | None:
    """Why no alive node of the Ray cluster could ever host a replica that asks for `needs` (None: one
    could, or the cluster cannot be asked): what /readyz says instead of "loading" when none runs."""
    import ray

    if not needs:
        return None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:
        return None
    if any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in needs.items()) for n in nodes):
        return None
    return (
        f"none of the cluster's {len(nodes)} node(s) has what a generator replica asks for ({needs}); "
        "the generator starts when a node that has them joins (a GPU node, with the custom resources of "
        "generator_resources / MUSICGEN_GENERATOR_RESOURCES)"
    )


def generator_concurrency(args: ResolvedArgs, model: str, gpus: float) -> tuple[int, int]:
    """(max_ongoing_requests, target_ongoing_requests) of a model's generator deployment. A model whose
    plan runs on an engine (DiffRhythm 2's batched plan) runs each job as it comes: up to
    `max_engine_jobs` at once, scaled out at half of that. Others run a full batch while the next one
    gathers (the rest wait in the handles' queues), scaled out on more than a batch each."""
    from musicgen.registry import get_model_spec

    rules = get_model_spec(model).family.execution
    plan = (
        dict(rules.auto_plan).get("cuda" if gpus else "cpu", "batched") if args.plan == "auto" else args.plan
    )
    if rules.engine and plan == "batched":
        return args.max_engine_jobs, max(1, args.max_engine_jobs // 2)
    return 2 * args.max_batch_size, args.max_batch_size


def build_app(raw_args: dict) -> serve.Application:
    """The app builder named in serve_config.yaml. Generators ask for `generator_gpus` GPUs each (unset:
    one when the cluster has GPUs at start); keys from MUSICGEN_API_KEYS are checked here, so that a
    malformed entry stops the app at start, and registered by the ingress (by digest only)."""
    from deployments.service.keys import keys_from_env

    # (the classes here are Deployments once @serve.deployment has wrapped them, which Ray's
    # annotations do not tell mypy: hence the ignores on .bind and .options)
    args = app_args(raw_args)
    provisioned = keys_from_env()
    log.info("API keys %s (auth: %s, HTTP host %s)", "required" if args.auth_required else "off", args.auth,
             args.host)  # fmt: skip
    redis_url, redis_server = args.redis_url, None
    if redis_url is None:  # embedded: a replica of its own owns the server process
        from deployments.service.redis_server import free_port

        port = free_port()
        redis_url = f"redis://127.0.0.1:{port}/0"
        redis_server = RedisServer.bind(str(Path(args.data_dir) / "redis"), port)  # type: ignore[attr-defined]
    gpus = generator_gpus(args)
    # custom resources keep the API on the nodes that declare them (e.g. off GPU nodes that come and go)
    api_resources = {"resources": args.api_resources} if args.api_resources else {}
    generators = {}
    for i, model in enumerate(args.served_models):
        at_once, target = generator_concurrency(args, model, gpus)
        generators[model] = SongGenerator.options(  # type: ignore[attr-defined]
            # the default model's deployment keeps the plain name; each other model gets its own
            name="SongGenerator" if i == 0 else f"SongGenerator-{model}",
            ray_actor_options={
                "num_cpus": args.generator_cpus,
                **({"num_gpus": gpus} if gpus else {}),
                **({"resources": args.generator_resources} if args.generator_resources else {}),
            },  # what generator_needs() says
            max_ongoing_requests=at_once,
            # a stopping replica's running batch may take generation_timeout_s, then its takes are stored
            graceful_shutdown_timeout_s=args.generator_grace_s,
            health_check_period_s=args.generator_health_check_s,
            autoscaling_config={
                "min_replicas": args.min_generators,
                "max_replicas": max(args.max_generators, args.min_generators, 1),
                "target_ongoing_requests": target,
                "upscale_delay_s": 5,
                "downscale_delay_s": 300,
            },
        ).bind(args, redis_url, model)
    ingress = Ingress.options(  # type: ignore[attr-defined]
        # its code is all async and never blocks: run it on the replica's own event loop, without the
        # thread hop per request that Serve adds to protect loops from blocking user code
        ray_actor_options={
            "num_cpus": 0.25,
            "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}},
            **api_resources,
        },
        max_ongoing_requests=args.ingress_max_ongoing,
        **({"max_replicas_per_node": args.max_ingress_per_node} if args.max_ingress_per_node else {}),
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
    validator = PromptValidator.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": 0.25, **api_resources}
    ).bind(args)
    return ingress.bind(
        validator, generators, args, redis_url, redis_server, provisioned, generator_needs(args, gpus)
    )
