"""Getting every accepted job to a generator of its model, from the ingress: a new job at once, the
jobs that lost theirs (an ingress restart, a generator crash, a Redis restart) on the next
reconcile; and the keys of MUSICGEN_API_KEYS registered once the store answers.

No Ray here: the ingress hands each generator deployment in as a plain callable (job id -> awaitable
that ends when the generator is done with the job), and runs these loops on its event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from deployments.service.retention import sweep_expired_files
from deployments.service.storage import Storage
from deployments.service.store import AsyncJobStore, AsyncKeyStore

log = logging.getLogger(__name__)
RECONCILE_EVERY_S = 5.0  # the reconcile loop's period, and how often key provisioning is retried

RunJob = Callable[[str], Awaitable[object]]  # a generator deployment's `run`


class Dispatcher:
    """Sends job ids to the generator of each job's model, with at most one call per job in flight.
    A second call would be harmless (a job is claimed atomically) but would hold a place in the
    generator's queue for nothing; the reconciler re-sends a queued job every few seconds."""

    def __init__(
        self,
        store: AsyncJobStore,
        generators: Mapping[str, RunJob],  # model name -> its generator deployment's run
        default_model: str,  # the model of a job whose parameters name none
        loop: asyncio.AbstractEventLoop | None = None,  # None: the loop running `start`'s caller
    ):
        self.store, self.generators, self.default_model = store, generators, default_model
        self._loop = loop
        self.inflight: set[str] = set()  # job ids sent to a generator whose call has not returned
        self._tasks: set[asyncio.Task] = set()  # the calls in flight (the loop keeps only weak references)

    def start(self, job_id: str) -> None:
        """Send a job to its generator unless a call for it is in flight. Never blocks: call it on
        the event loop."""
        if job_id in self.inflight:
            return
        self.inflight.add(job_id)
        task = (self._loop or asyncio.get_running_loop()).create_task(self.send(job_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send(self, job_id: str) -> None:
        """The call itself: ends when the generator is done with the job or the call failed."""
        try:
            params = await self.store.params(job_id)  # the job's model picks its generator deployment
            model = (params or {}).get("model", self.default_model)
            run = self.generators.get(model)
            if run is None:  # a job of a model no longer served (the config changed)
                log.warning("job %s is for model %s, which this app no longer serves", job_id, model)
                return
            await run(job_id)
        except Exception:  # the replica died: the lease expires and the reconciler sends it again
            log.warning("generator call for %s failed", job_id, exc_info=True)
        finally:
            self.inflight.discard(job_id)


async def reconcile(
    store: AsyncJobStore, dispatch: Callable[[str], None], results: Storage, uploads: Storage
) -> None:
    """One round: re-queue jobs of lost workers (or fail them with WORKER_LOST, which queues their
    webhooks in the same script), (re)dispatch every queued job, then delete the files whose
    retention period is over (expired jobs' takes, old uploads)."""
    await store.reconcile()
    for job_id in await store.queued_ids():
        dispatch(job_id)
    await sweep_expired_files(store, results, uploads)


async def reconcile_forever(
    store: AsyncJobStore,
    dispatch: Callable[[str], None],
    results: Storage,
    uploads: Storage,
    every_s: float = RECONCILE_EVERY_S,
) -> None:
    """`reconcile` every `every_s`: after an ingress restart, a generator crash or a Redis restart,
    every accepted job gets a worker. A round that fails (the store away) is logged and retried."""
    while True:
        try:
            await reconcile(store, dispatch, results, uploads)
        except Exception:
            log.warning("reconcile failed (job store unreachable?)", exc_info=True)
        await asyncio.sleep(every_s)


async def provision_keys(
    keys: AsyncKeyStore, entries: list[tuple[str, str, str]], retry_s: float = RECONCILE_EVERY_S
) -> None:
    """Register the keys of MUSICGEN_API_KEYS, (name, role, digest) each, retrying every `retry_s`
    until the store answers; a key whose record exists (a revoked one too) is left as it is."""
    left = list(entries)
    while left:
        try:
            for name, role, key_digest in list(left):
                if await keys.provision(name, role, key_digest):
                    log.info("API key %r (%s) registered from MUSICGEN_API_KEYS", name, role)
                left.remove((name, role, key_digest))
        except Exception:
            log.warning("could not register MUSICGEN_API_KEYS yet (job store unreachable?)", exc_info=True)
            await asyncio.sleep(retry_s)
