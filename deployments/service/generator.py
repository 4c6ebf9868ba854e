"""A generator replica's work, without Ray: load one model, run the jobs sent to it in batches, and
say how it is to the job store every few seconds (readiness.py reads those reports).

A replica whose model did not load stays up and fails every job sent to it with MODEL_NOT_LOADED
(jobs accepted while scaled to zero, or queued before a restart, would otherwise wait forever),
reporting why for `LOAD_ERROR_REPORT_TTL_S`. `model_retry_s` after the failed load its health check
fails, and the replica that replaces it loads the model again (after `musicgen models pull`, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deployments.service.batching import JobBatcher
from deployments.service.errors import ServiceError
from deployments.service.runner import JobRunner
from deployments.service.settings import ResolvedArgs
from deployments.service.storage import Storage, write_probe
from deployments.service.store import GENERATOR_STATUS_EVERY_S, JobStore, SongJob
from musicgen.errors import MusicgenError
from musicgen.pipelines import Pipeline

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
# A generator without its model reports that for this long (a loaded one: GENERATOR_STATUS_TTL_S): longer
# than Serve takes to replace it, so /readyz keeps telling why until its successor reports.
LOAD_ERROR_REPORT_TTL_S = 120.0
CPU_GENERATOR_NICE = 19  # a generator without a GPU runs below the API (see GeneratorWorker.__init__)


def lower_priority(nice: int) -> None:
    """Nice every thread of this process (on Linux a nice value belongs to a thread; threads started
    later inherit their creator's). Ray starts workers at 15; 19 is the lowest priority."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        with contextlib.suppress(OSError):  # a thread that just ended
            os.setpriority(os.PRIO_PROCESS, int(tid), max(nice, os.getpriority(os.PRIO_PROCESS, int(tid))))


def load_pipeline(args: ResolvedArgs, model: str) -> Pipeline:
    """The model as the app's settings ask for it (raises MusicgenError when it cannot be loaded)."""
    return Pipeline.from_pretrained(model, device=args.device, plan=args.plan, compile=args.compile)


class GeneratorWorker:
    """Runs jobs in batches: a `JobBatcher` hands the runner every job id queued here when the model is
    free (up to `max_batch_size`, waiting up to `batch_wait_s` after the first for more), and the
    pipeline samples those of the same frame and step count as one batch. Construct it on the event
    loop that calls `run` (it starts the status reports there); loading the model blocks."""

    def __init__(
        self,
        args: ResolvedArgs,
        store: JobStore,
        results: Storage,
        uploads: Storage,
        *,
        model: str,  # the model this worker loads (one of args.served_models)
        worker: str,  # this replica's name in the job store (host:pid)
        on_finish: Callable[[SongJob], None] | None = None,  # each finished job (metrics)
        load: Callable[[ResolvedArgs, str], Pipeline] = load_pipeline,
        cpu_nice: int | None = None,  # on CPU, run every thread at this nice value (None: leave it)
        node: str | None = None,  # the cluster node this replica runs on (reported)
        clock: Callable[[], float] = time.monotonic,
    ):
        self.args, self.store, self.model, self.worker, self.clock = args, store, model, worker, clock
        self.node, self.results = node, results
        # a file in the results storage that readers must find: an ingress that cannot read it would
        # answer 404 to every download of this replica's songs (readiness.py checks it). It stays when
        # the replica stops (its last report may outlive it by GENERATOR_STATUS_TTL_S): a few hundred
        # bytes per replica started, under _probes/.
        self.probe: str | None = None
        try:
            self.probe = write_probe(results, worker, {"node": node, "model": model})
        except Exception:
            log.warning("could not write the storage probe to %s", results.location, exc_info=True)
        # ServiceError.to_dict() of the failed load (MODEL_NOT_LOADED)
        self.load_error: dict[str, Any] | None = None
        self.load_failed_at = 0.0  # clock() when the model failed to load
        self.runner: JobRunner | None = None
        self.pipeline: Pipeline | None = None
        self.device: torch.device | None = None  # the model's, once loaded
        self.batcher = JobBatcher(self._run_batch, args.max_batch_size, args.batch_wait_s)
        self.reporter = asyncio.get_event_loop().create_task(self.report_forever())
        try:
            pipeline = load(args, model)
        except MusicgenError as exc:
            self.load_error = ServiceError.from_library(exc).to_dict()
            self.load_failed_at = clock()
            log.error("model %s not loaded: %s", model, exc)
            self.report_now()  # before any job is refused: /readyz then tells why
            return
        if args.max_batch_takes is not None:
            pipeline.max_batch_takes = args.max_batch_takes
        pipeline.fault_oom_takes = args.fault_oom_takes
        if args.engine_cache_gib is not None:
            pipeline.engine_budget_bytes = int(args.engine_cache_gib * 2**30)
        pipeline.engine_cache_share = args.engine_cache_share
        self.runner = JobRunner(
            store, pipeline, results, uploads, worker, on_finish=on_finish,
            timeout_s=args.generation_timeout_s, encode_in_background=True,
        )  # fmt: skip
        self.pipeline, self.device = pipeline, pipeline.device
        if self.device.type == "cpu" and cpu_nice is not None:
            # On CPU the model takes every core it can; the HTTP API shares them. At the lowest priority
            # the model runs as fast as before on an idle box and yields to requests when they come.
            lower_priority(cpu_nice)
        self.report_now()

    def status(self) -> dict:
        report = {"loaded": self.runner is not None, "model": self.model, "error": self.load_error,
                  "worker": self.worker, "node": self.node, "storage": self.results.location,
                  "storage_probe": self.probe}  # fmt: skip
        load = self.pipeline.load() if self.pipeline is not None else None
        if load is not None:  # a continuous pipeline: what it samples now (readiness tells it)
            report["engine"] = load
        return report

    def report_now(self) -> None:
        try:
            ttl_s = LOAD_ERROR_REPORT_TTL_S if self.load_error else None
            self.store.put_generator_status(self.worker, self.status(), ttl_s=ttl_s)
        except Exception:
            log.warning("could not report generator status (job store unreachable?)", exc_info=True)

    async def report_forever(self) -> None:
        while True:
            await asyncio.to_thread(self.report_now)
            await asyncio.sleep(GENERATOR_STATUS_EVERY_S)

    async def run(self, job_id: str) -> str | None:
        """The job's state as this replica left it (None: another worker has it). A continuous
        pipeline's jobs run at once, each on a thread of its own: its engine samples every running
        job's takes together, and a job joins them at the next tick. The others wait for a batch."""
        if self.runner is not None and self.pipeline is not None and self.pipeline.continuous:
            (state,) = await asyncio.to_thread(self.runner.run_many, [job_id])
            return state.value if state else None
        return await self.batcher.submit(job_id)

    async def _run_batch(self, job_ids: list[str]) -> list[str | None]:
        if self.runner is None:
            return await asyncio.to_thread(self._refuse, job_ids)
        states = await asyncio.to_thread(self.runner.run_many, job_ids)
        return [state.value if state else None for state in states]

    def _refuse(self, job_ids: list[str]) -> list[str | None]:
        """Without a model, the jobs sent here fail with MODEL_NOT_LOADED rather than wait forever."""
        out: list[str | None] = []
        for job_id in job_ids:
            token = self.store.claim(job_id, self.worker)
            if token is not None:
                self.store.fail(job_id, self._not_loaded(), token=token)
            out.append("failed" if token is not None else None)
        return out

    def _not_loaded(self) -> dict[str, Any]:
        """The error of the failed load (the worker has no runner only after one)."""
        if self.load_error is None:
            raise RuntimeError(f"generator of {self.model} has no model and no load error")
        return self.load_error

    def check_health(self) -> None:
        """Raises when this replica should be replaced: `model_retry_s` after a failed load, or on a
        dead CUDA context."""
        if self.runner is None:
            # Not at once: Serve checks a new replica right after __init__ and takes a failure there for
            # a failed start (the replica never serves, and jobs sent to it wait instead of failing
            # with MODEL_NOT_LOADED); and a restart loop would take the node's CPU.
            if self.clock() - self.load_failed_at >= self.args.model_retry_s:
                self.report_now()  # /readyz keeps telling why while this replica is replaced
                raise RuntimeError(f"model {self.model} not loaded: {self._not_loaded()['message']}")
            return
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)  # raises on a dead CUDA context

    def drain(self, timeout: float) -> None:
        """Let the takes of the last batch finish encoding and be stored (a stopping replica: the
        running batch has ended). A job cut off after `timeout` keeps no lease and is run elsewhere."""
        if self.runner is not None:
            self.runner.drain(timeout=timeout)

    def stop(self) -> None:
        """Stop the status reports (the replica, or a test, is done with this worker)."""
        self.reporter.cancel()
