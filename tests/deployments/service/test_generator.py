"""A generator replica's work (deployments/service/generator.py) on a plain event loop, the embedded
Redis and the tiny model: the failed load's refusals and health checks, its successor's batches. No Ray."""

from __future__ import annotations

import asyncio

import pytest

from deployments.service.generator import LOAD_ERROR_REPORT_TTL_S, GeneratorWorker
from deployments.service.readiness import Readiness
from deployments.service.settings import AppArgs
from deployments.service.storage import LocalStorage
from deployments.service.store import AsyncJobStore, JobState, JobStore
from musicgen.errors import ModelNotAvailable
from tests.deployments.conftest import eventually, params


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Weights:
    """The model's loader: the weights are missing until `pull()` (then: the tiny pipeline)."""

    def __init__(self, pipe):
        self.pipe, self.pulled, self.loads = pipe, False, 0

    def __call__(self, args: AppArgs, model: str):
        self.loads += 1
        if not self.pulled:
            raise ModelNotAvailable(f"{model} is not downloaded")
        return self.pipe

    def pull(self) -> None:
        self.pulled = True


@pytest.fixture()
def store(client):
    return JobStore(client, lease_s=5)


def worker(args, store, tmp_path, name, weights, clock, finished=None, model="tiny") -> GeneratorWorker:
    return GeneratorWorker(
        args, store, LocalStorage(tmp_path / "results"), LocalStorage(tmp_path / "uploads"), model=model,
        worker=name, load=weights, clock=clock, on_finish=None if finished is None else finished.append,
    )  # fmt: skip


def readiness_of(server, model: str) -> Readiness:
    """What an ingress serving `model` sees (no cache: every call reads the store)."""
    return Readiness(AsyncJobStore.from_url(server.url), [model], scales_to_zero=False, cache_s=0)


def test_a_model_that_did_not_load_is_refused_reported_and_retried_by_the_next_replica(
    server, store, client, pipe, tmp_path
):
    """The replica stays up without its model: it reports why (for LOAD_ERROR_REPORT_TTL_S), fails
    the jobs sent to it with MODEL_NOT_LOADED (not those another worker has), passes its health
    checks until `model_retry_s` after the failed load, then fails them, reporting again. The replica
    that replaces it loads the model and serves."""
    args = AppArgs(model="tiny", data_dir=str(tmp_path), model_retry_s=60).resolved()
    weights, clock = Weights(pipe), Clock()

    async def main():
        readiness = readiness_of(server, "tiny")
        first = worker(args, store, tmp_path, "host:1", weights, clock)
        try:
            (report,) = store.generator_statuses()
            assert report["loaded"] is False and report["error"]["code"] == "MODEL_NOT_LOADED"
            assert report["ttl_s"] == LOAD_ERROR_REPORT_TTL_S
            ok, why = await readiness.ready()
            assert (
                not ok
                and why == "tiny: tiny is not downloaded; download the weights with `musicgen models pull`"
            )

            job, _ = store.create(params().to_dict())
            theirs, _ = store.create(params().to_dict())
            assert store.claim(theirs.id, "host:9") is not None
            assert await asyncio.gather(first.run(job.id), first.run(theirs.id)) == ["failed", None]
            refused = store.get(job.id)
            assert refused.state == JobState.FAILED and refused.error == report["error"]
            assert store.get(theirs.id).state == JobState.RUNNING

            first.check_health()  # Serve's check right after __init__: a start, not a failure
            clock.now = 59.9
            first.check_health()
            clock.now = 60.0
            client.hdel("mg:generators", "host:1")
            with pytest.raises(RuntimeError, match="model tiny not loaded: tiny is not downloaded"):
                first.check_health()
            assert [r["worker"] for r in store.generator_statuses()] == ["host:1"]  # told why again
        finally:
            first.stop()

        weights.pull()  # `musicgen models pull`; Serve starts a replacement
        second = worker(args, store, tmp_path, "host:2", weights, clock)
        try:
            assert weights.loads == 2 and second.status()["loaded"] is True
            ok, why = await readiness.ready()
            assert ok and why == "serving tiny on 1 generator(s)"  # beside host:1's last report
            clock.now = 1e6
            second.check_health()
        finally:
            second.stop()
            await readiness.store.aclose()

    asyncio.run(main())


def test_jobs_sent_together_run_as_one_batch_and_are_recorded(server, store, pipe, tmp_path):
    """The worker's batcher hands the runner the jobs queued while it was free; their takes are
    encoded and stored in the background (run returns 'running'), and each finished job is handed
    to `on_finish`."""
    args = AppArgs(model="tiny", data_dir=str(tmp_path), max_batch_size=4, batch_wait_s=0.2).resolved()
    weights, finished = Weights(pipe), []
    weights.pull()

    async def main():
        generator = worker(args, store, tmp_path, "host:3", weights, Clock(), finished)
        try:
            jobs = [store.create(params(num_takes=1, seed=s).to_dict())[0].id for s in (1, 2)]
            states = await asyncio.gather(*(generator.run(j) for j in jobs))
            assert set(states) <= {"running", "succeeded"} and generator.batcher.batches == 1
            await eventually(lambda: len(finished) == 2, 60, "both jobs recorded")
            generator.drain(30)
        finally:
            generator.stop()
        return jobs

    jobs = asyncio.run(main())
    done = [store.get(j) for j in jobs]
    assert [d.state for d in done] == [JobState.SUCCEEDED] * 2
    assert [d.result["timings"]["batch_requests"] for d in done] == [2, 2]
    assert sorted(j.id for j in finished) == sorted(jobs)
    assert store.generator_statuses()[0]["loaded"] is True


def test_a_continuous_pipelines_jobs_run_at_once_and_join_the_running_ones(server, store, tmp_path):
    """DiffRhythm 2 on its engine: a job sent while another samples starts then (no batch to wait
    for), both finish, and the replica's reports say what the engine holds (readiness tells it)."""
    from deployments.service.params import SongParams
    from musicgen.lyrics.frontend import LyricsFrontEnd
    from musicgen.pipelines import Pipeline
    from musicgen.registry import MODELS

    pipe2 = Pipeline.from_pretrained("tiny-2", device="cpu")
    assert pipe2.continuous
    args = AppArgs(model="tiny-2", data_dir=str(tmp_path), max_batch_size=4).resolved()

    def song(lyrics: str, seconds: int, seed: int, steps: int = 4) -> dict:
        frames = LyricsFrontEnd.from_assets().encode(lyrics, MODELS["tiny-2"], seconds)
        return SongParams(
            model="tiny-2", duration_s=seconds, tokens=frames.tokens.tolist(), seed=seed, lrc=frames.lrc,
            song_duration=frames.song_duration, num_takes=1, steps=steps, output_format="wav",
            style_prompt="calm piano",
        ).to_dict()  # fmt: skip

    async def main():
        generator = worker(args, store, tmp_path, "host:4", lambda a, m: pipe2, Clock(), model="tiny-2")
        readiness = readiness_of(server, "tiny-2")
        try:
            words = "[verse]\nHello there, a longer line of words\ngood night"
            long, _ = store.create(song(words, 40, 1, steps=100))  # long enough to be running below
            first = asyncio.ensure_future(generator.run(long.id))
            await eventually(lambda: pipe2.load()["running"] == 1, 60, "the first song sampling")
            generator.report_now()
            ok, why = await readiness.ready()
            assert (
                ok and why == "serving tiny-2 on 1 generator(s): 1 takes sampling, 0 waiting for cache memory"
            )
            short, _ = store.create(song("[chorus]\nla la", 4, 2))
            second = await generator.run(short.id)
            assert not first.done() and second in ("running", "succeeded")  # it did not wait for the first
            assert await first in ("running", "succeeded") and generator.batcher.batches == 0
            generator.drain(60)
        finally:
            generator.stop()
            await readiness.store.aclose()
        return long.id, short.id

    jobs = asyncio.run(main())
    assert [store.get(j).state for j in jobs] == [JobState.SUCCEEDED] * 2


def test_the_engine_cache_setting_is_the_replicas_budget_and_judges_songs_at_submission(
    server, store, tmp_path
):
    """`engine_cache_gib` becomes the DiffRhythm 2 pipeline's cache budget as the replica loads it; the
    replica reports it, and the ingress refuses a song one take of which needs more (OUT_OF_MEMORY)
    while one that fits is accepted."""
    from deployments.service.errors import ServiceError
    from musicgen.engine import cache_bytes_alone
    from musicgen.model.dr2_sampler import num_blocks
    from musicgen.pipelines import Pipeline
    from musicgen.registry import MODELS

    pipe2 = Pipeline.from_pretrained("tiny-2", device="cpu")
    report = pipe2.load()

    def need(text: int, seconds: int) -> int:
        blocks = num_blocks(MODELS["tiny-2"].frames_for(seconds), report["block_size"])
        return cache_bytes_alone(
            text, blocks, report["block_size"], guided=True, token_bytes=report["token_bytes"]
        )

    small, big = need(20, 10), need(20, 60)
    gib = (small + big) / 2 / 2**30
    args = AppArgs(model="tiny-2", data_dir=str(tmp_path), engine_cache_gib=gib).resolved()

    async def main():
        generator = worker(args, store, tmp_path, "host:5", lambda a, m: pipe2, Clock(), model="tiny-2")
        readiness = readiness_of(server, "tiny-2")
        try:
            assert pipe2.engine_budget_bytes == int(gib * 2**30)
            (status,) = store.generator_statuses()
            assert status["engine"]["budget_bytes"] == int(gib * 2**30)
            await readiness.check_fits(
                params(model="tiny-2", duration_s=10, tokens=[5] * 20, cfg_strength=2.0)
            )
            with pytest.raises(ServiceError) as refused:
                await readiness.check_fits(
                    params(model="tiny-2", duration_s=60, tokens=[5] * 20, cfg_strength=2.0)
                )
        finally:
            generator.stop()
            await readiness.store.aclose()
        return refused.value

    err = asyncio.run(main())
    assert err.code == "OUT_OF_MEMORY" and err.details == {
        "needed_bytes": big,
        "budget_bytes": int(gib * 2**30),
    }
