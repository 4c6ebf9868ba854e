"""The ingress's dispatch, reconcile and key provisioning loops (deployments/service/dispatch.py) on a
plain event loop and the embedded Redis, with generators that are plain coroutines: no Ray."""

from __future__ import annotations

import asyncio
import logging

from deployments.service.dispatch import Dispatcher, provision_keys, reconcile, reconcile_forever
from deployments.service.redis_server import EmbeddedRedis, free_port
from deployments.service.storage import LocalStorage
from deployments.service.store import (
    AsyncJobStore,
    AsyncKeyStore,
    JobState,
    JobStore,
    KeyStore,
    digest,
    new_secret,
)
from tests.deployments.conftest import eventually


class Generator:
    """A generator deployment's `run`: records the job ids it is called with and, while `held`, keeps
    each call open until `release()`; a job id in `failing` makes its call raise (a dead replica)."""

    def __init__(self, held: bool = False):
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        if not held:
            self.gate.set()
        self.failing: set[str] = set()

    async def __call__(self, job_id: str) -> str:
        self.calls.append(job_id)
        await self.gate.wait()
        if job_id in self.failing:
            raise ConnectionError("the replica died")
        return "succeeded"

    def release(self) -> None:
        self.gate.set()


def new_job(client, **params) -> str:
    job, _ = JobStore(client).create(params)
    return job.id


def test_a_job_dispatched_again_while_its_call_runs_makes_no_second_call(server, client):
    job_id = new_job(client, model="tiny")
    generator = Generator(held=True)

    async def main():
        store = AsyncJobStore.from_url(server.url)
        dispatcher = Dispatcher(store, {"tiny": generator}, "tiny")
        dispatcher.start(job_id)  # the submission
        dispatcher.start(job_id)  # the reconciler, at the same moment
        await eventually(lambda: generator.calls, 10, "the generator called")
        dispatcher.start(job_id)  # and again while the generator runs it
        await asyncio.sleep(0.05)
        assert generator.calls == [job_id] and dispatcher.inflight == {job_id}
        generator.release()
        await eventually(lambda: not dispatcher.inflight, 10, "the call ended")
        dispatcher.start(job_id)  # a call that ended no longer counts: the job may be sent again
        await eventually(lambda: len(generator.calls) == 2, 10, "a second call")
        await store.aclose()

    asyncio.run(main())


def test_each_job_goes_to_the_generator_of_its_model(server, client, caplog):
    first, second = Generator(), Generator()
    to_second = new_job(client, model="tiny-2")
    to_first = new_job(client, model="tiny")
    no_model = new_job(client)  # parameters that name no model: the default one
    retired = new_job(client, model="diffrhythm-1.2-base")  # a model the config no longer serves

    async def main():
        store = AsyncJobStore.from_url(server.url)
        dispatcher = Dispatcher(store, {"tiny": first, "tiny-2": second}, "tiny")
        for job_id in (to_second, to_first, no_model, retired):
            dispatcher.start(job_id)
        await eventually(lambda: not dispatcher.inflight, 10, "every call ended")
        await store.aclose()

    with caplog.at_level(logging.WARNING, logger="deployments.service.dispatch"):
        asyncio.run(main())
    assert sorted(first.calls) == sorted([to_first, no_model]) and second.calls == [to_second]
    assert f"job {retired} is for model diffrhythm-1.2-base, which this app no longer serves" in caplog.text


def test_a_failed_generator_call_leaves_the_job_to_be_sent_again(server, client):
    job_id = new_job(client, model="tiny")
    generator = Generator()
    generator.failing.add(job_id)

    async def main():
        store = AsyncJobStore.from_url(server.url)
        dispatcher = Dispatcher(store, {"tiny": generator}, "tiny")
        dispatcher.start(job_id)
        await eventually(lambda: generator.calls and not dispatcher.inflight, 10, "the failed call ended")
        dispatcher.start(job_id)
        await eventually(lambda: len(generator.calls) == 2, 10, "the job sent again")
        await store.aclose()

    asyncio.run(main())


def test_reconcile_sends_queued_jobs_and_requeues_a_lost_workers_job(server, client, tmp_path):
    """A job accepted before an ingress restart (queued, never sent) goes out on the first round; a
    job whose worker died keeps its lease until it expires, then is queued again and sent again."""
    sync = JobStore(client, lease_s=0.3)
    waiting, _ = sync.create({"model": "tiny"})
    lost, _ = sync.create({"model": "tiny"})
    assert sync.claim(lost.id, "dead-worker") is not None  # and no heartbeat ever after
    generator = Generator(held=True)
    results, uploads = LocalStorage(tmp_path / "results"), LocalStorage(tmp_path / "uploads")

    async def main():
        store = AsyncJobStore.from_url(server.url, lease_s=0.3)
        dispatcher = Dispatcher(store, {"tiny": generator}, "tiny")
        await reconcile(store, dispatcher.start, results, uploads)
        await eventually(lambda: generator.calls == [waiting.id], 10, "the queued job sent")
        assert (await store.get(lost.id)).state == JobState.RUNNING  # its lease still runs

        async def lost_job_sent() -> bool:
            await reconcile(store, dispatcher.start, results, uploads)  # every round sends `waiting` again
            return lost.id in generator.calls

        await eventually(lost_job_sent, 10, "the lost worker's job sent again")
        requeued = await store.get(lost.id)
        assert requeued.state == JobState.QUEUED and requeued.attempts == 1
        assert sorted(generator.calls) == sorted([waiting.id, lost.id])  # one call each, rounds or not
        generator.release()
        await eventually(lambda: not dispatcher.inflight, 10, "the calls ended")
        await store.aclose()

    asyncio.run(main())


def test_the_reconcile_loop_goes_on_after_the_store_was_away(tmp_path):
    """Rounds fail while Redis is down (the loop logs and waits); once it is back, queued jobs go out."""
    port = free_port()
    sent: list[str] = []
    results, uploads = LocalStorage(tmp_path / "results"), LocalStorage(tmp_path / "uploads")

    async def main():
        store = AsyncJobStore.from_url(f"redis://127.0.0.1:{port}/0")
        loop = asyncio.get_running_loop().create_task(
            reconcile_forever(store, sent.append, results, uploads, every_s=0.05)
        )
        await asyncio.sleep(0.3)
        assert not loop.done()  # failed rounds did not end it
        with EmbeddedRedis(tmp_path / "redis", port=port) as server:
            job, _ = JobStore.from_url(server.url).create({"model": "tiny"})
            await eventually(lambda: job.id in sent, 20, "the queued job sent")
            loop.cancel()
            await store.aclose()

    asyncio.run(main())


def test_keys_are_registered_once_the_store_answers(tmp_path):
    """MUSICGEN_API_KEYS's entries wait for a store that is not up yet, then are registered by digest;
    an entry whose key exists already (here: revoked since) is left as it is."""
    port = free_port()
    ops, bot = new_secret(), new_secret()
    entries = [("ops", "admin", digest(ops)), ("bot", "user", digest(bot))]

    async def main():
        store = AsyncJobStore.from_url(f"redis://127.0.0.1:{port}/0")
        provisioning = asyncio.get_running_loop().create_task(
            provision_keys(AsyncKeyStore.sharing(store), entries, retry_s=0.05)
        )
        await asyncio.sleep(0.3)
        assert not provisioning.done()  # retrying
        with EmbeddedRedis(tmp_path / "redis", port=port) as server:
            await asyncio.wait_for(provisioning, 20)
            keys = KeyStore.from_url(server.url)
            assert sorted((k.name, k.role) for k in keys.list()) == [("bot", "user"), ("ops", "admin")]
            (bot_key,) = (k for k in keys.list() if k.name == "bot")
            keys.revoke(bot_key.id)
            await asyncio.wait_for(provision_keys(AsyncKeyStore.sharing(store), entries), 10)
            assert [k.name for k in keys.list() if not k.revoked_at] == ["ops"]
            await store.aclose()

    asyncio.run(main())
