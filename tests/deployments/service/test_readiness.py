"""Readiness and the models list (deployments/service/readiness.py) from generator reports in the
embedded Redis, as the generator replicas write them: no Ray."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.service.readiness import Readiness, model_state
from deployments.service.store import AsyncJobStore, JobStore
from tests.deployments.conftest import wait_until

NOT_LOADED = {"code": "MODEL_NOT_LOADED", "message": "diffrhythm-1.2-base is not downloaded",
              "recovery": "run `musicgen models pull diffrhythm-1.2-base`"}  # fmt: skip


def loaded(model: str, worker: str = "w1") -> dict:
    return {"loaded": True, "model": model, "error": None, "worker": worker}


def failed(model: str, worker: str = "w2") -> dict:
    return {"loaded": False, "model": model, "error": NOT_LOADED, "worker": worker}


@pytest.mark.parametrize(
    "reports, scales_to_zero, ready, why",
    [
        ([], False, False, "m: no generator has reported yet: the model is loading"),
        ([], True, True, "m scaled to zero: the first song starts a generator, which loads the model first"),
        ([failed("m")], True, False, "m: diffrhythm-1.2-base is not downloaded; run `musicgen models pull"),
        ([failed("m"), loaded("m")], False, True, "serving m on 1 generator(s)"),  # its successor loaded it
        ([loaded("m"), loaded("m", "w3")], False, True, "serving m on 2 generator(s)"),
    ],
)  # fmt: skip
def test_a_models_state_from_its_generators_reports(reports, scales_to_zero, ready, why):
    ok, reason = model_state("m", reports, scales_to_zero=scales_to_zero)
    assert ok is ready and reason.startswith(why)


def test_without_a_node_that_can_host_a_generator_readiness_says_so():
    """No node has what a generator asks for (a cluster whose GPU nodes have not joined): not
    "loading" but why; scaled to zero, songs are still accepted (they wait for the node)."""
    why = "none of the cluster's 2 node(s) has what a generator replica asks for"
    assert model_state("m", [], scales_to_zero=False, unplaceable=why) == (
        False, f"m: no generator is running: {why}")  # fmt: skip
    assert model_state("m", [], scales_to_zero=True, unplaceable=why) == (
        True, f"m scaled to zero, and no generator can start yet: {why}")  # fmt: skip
    assert model_state("m", [loaded("m")], scales_to_zero=False, unplaceable=why)[0] is True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ready_follows_the_reports_of_every_served_model_a_second_late_at_most(server, client):
    """Loading, then one model loaded, then both; a replica whose model failed to load makes the
    service not ready until another reports it loaded. Answers are cached for `cache_s`."""
    reports = JobStore(client)
    clock = Clock()

    async def main():
        store = AsyncJobStore.from_url(server.url)
        readiness = Readiness(store, ["tiny", "tiny-2"], scales_to_zero=False, clock=clock)
        assert await readiness.ready() == (
            False,
            "tiny: no generator has reported yet: the model is loading; "
            "tiny-2: no generator has reported yet: the model is loading",
        )
        await asyncio.to_thread(reports.put_generator_status, "a:1", loaded("tiny", "a:1"))
        assert (await readiness.ready())[0] is False  # cached
        clock.now += 0.5
        assert "tiny: no generator" in (await readiness.ready())[1]  # still cached
        clock.now += 0.5
        ok, why = await readiness.ready()
        assert not ok and why.startswith("serving tiny on 1 generator(s); tiny-2: no generator")
        await asyncio.to_thread(reports.put_generator_status, "b:2", failed("tiny-2", "b:2"), ttl_s=120)
        clock.now += 1
        ok, why = await readiness.ready()
        assert not ok and why.endswith(
            "tiny-2: diffrhythm-1.2-base is not downloaded; " + NOT_LOADED["recovery"]
        )
        await asyncio.to_thread(reports.put_generator_status, "c:3", loaded("tiny-2", "c:3"))
        clock.now += 1
        assert await readiness.ready() == (
            True,
            "serving tiny on 1 generator(s); serving tiny-2 on 1 generator(s)",
        )
        await store.aclose()

    asyncio.run(main())


def test_a_dead_generators_report_stops_counting_after_its_ttl(server, client):
    JobStore(client).put_generator_status("a:1", loaded("tiny", "a:1"), ttl_s=0.2)  # then it dies

    async def main():
        store = AsyncJobStore.from_url(server.url)
        readiness = Readiness(store, ["tiny"], scales_to_zero=False, cache_s=0)
        assert (await readiness.ready())[0] is True
        await asyncio.sleep(0.3)
        assert await readiness.ready() == (False, "tiny: no generator has reported yet: the model is loading")
        await store.aclose()

    asyncio.run(main())
    wait_until(lambda: not client.hlen("mg:generators"), 5, "the stale report pruned")


def test_the_models_list_names_every_served_model_with_its_state(server, client):
    JobStore(client).put_generator_status("a:1", loaded("tiny", "a:1"))

    async def main():
        store = AsyncJobStore.from_url(server.url)
        readiness = Readiness(store, ["tiny", "tiny-2"], scales_to_zero=True)
        models = await readiness.models()
        await store.aclose()
        return models

    models = asyncio.run(main())
    assert [(m["name"], m["loaded"]) for m in models] == [("tiny", True), ("tiny-2", True)]
    assert models[0]["status"] == "serving tiny on 1 generator(s)" and "scaled to zero" in models[1]["status"]
    assert (models[1]["min_seconds"], models[1]["max_seconds"], models[1]["max_takes"]) == (4, 60, 4)
    assert models[0]["sample_rate"] == 44100 and models[1]["sample_rate"] == 48000


def test_a_song_no_generator_could_hold_is_refused_at_submission(server, client):
    """A DiffRhythm 2 generator reports its engine's cache budget: a song one take of which needs more
    (lyrics + blocks, per guidance branch) is refused with OUT_OF_MEMORY before it is queued; a song
    that fits, one sampled unguided (half the cache) and a model whose generators report no engine
    pass."""
    from deployments.service.errors import ServiceError
    from tests.deployments.conftest import params

    client.flushdb()
    token_bytes, block = 1000, 10
    # 2 branches x (20 lyrics tokens + 20 s x 5 frames) x 1000 bytes = 240 kB: the budget holds 200 kB
    engine = {"running": 0, "waiting": 0, "cache_bytes": 0, "budget_bytes": 200_000, "token_bytes": token_bytes,
              "block_size": block}  # fmt: skip
    JobStore(client).put_generator_status("g:1", {**loaded("tiny-2", "g:1"), "engine": engine})
    JobStore(client).put_generator_status("g:2", loaded("tiny", "g:2"))
    song = params(model="tiny-2", duration_s=20, tokens=[5] * 20, cfg_strength=2.0)

    async def check(p):
        store = AsyncJobStore.from_url(server.url)
        try:
            await Readiness(store, ["tiny", "tiny-2"], scales_to_zero=False).check_fits(p)
        finally:
            await store.aclose()

    with pytest.raises(ServiceError) as refused:
        asyncio.run(check(song))
    err = refused.value
    assert err.code == "OUT_OF_MEMORY" and err.status == 507 and "shorter song" in err.recovery
    assert err.details == {"needed_bytes": 240_000, "budget_bytes": 200_000}
    asyncio.run(check(params(model="tiny-2", duration_s=10, tokens=[5] * 20, cfg_strength=2.0)))  # 140 kB
    asyncio.run(check(params(model="tiny-2", duration_s=20, tokens=[5] * 20, cfg_strength=0.0)))  # 120 kB
    asyncio.run(check(params(model="tiny", duration_s=300, tokens=[5] * 20)))  # no engine: not judged here


def test_the_largest_budget_reported_still_refuses_a_song_while_no_generator_runs(
    server, client, monkeypatch
):
    """The generators' reports expire with them; their cache limits do not. Scaled to zero, a song
    no generator of the model ever could hold is refused at submission as before (its message says
    when the budget was last reported), one that fits is accepted. The largest budget reported
    within ENGINE_LIMIT_KEEP_S counts (a smaller one does not replace it: the ingress refuses only
    what fits nowhere); past that a newer report replaces it whatever its size."""
    from deployments.service.errors import ServiceError
    from deployments.service.store import generators
    from tests.deployments.conftest import params

    client.flushdb()
    reports = JobStore(client)

    def report(worker: str, budget: int, ttl_s: float = 0.2) -> None:
        engine = {"running": 0, "waiting": 0, "cache_bytes": 0, "budget_bytes": budget, "token_bytes": 1000,
                  "block_size": 10}  # fmt: skip
        reports.put_generator_status(worker, {**loaded("tiny-2", worker), "engine": engine}, ttl_s=ttl_s)

    big = params(model="tiny-2", duration_s=20, tokens=[5] * 20, cfg_strength=2.0)  # 240 kB
    small = params(model="tiny-2", duration_s=10, tokens=[5] * 20, cfg_strength=2.0)  # 140 kB

    async def check(p) -> ServiceError | None:
        store = AsyncJobStore.from_url(server.url)
        try:
            await Readiness(store, ["tiny-2"], scales_to_zero=True, cache_s=0).check_fits(p)
        except ServiceError as exc:
            return exc
        finally:
            await store.aclose()
        return None

    assert asyncio.run(check(big)) is None  # no generator ever reported: not judged at submission
    report("g:1", 200_000)
    report("g:2", 150_000)  # smaller: the 200 kB one stays
    wait_until(lambda: not reports.generator_statuses(), timeout=5)  # both replicas gone (scaled to zero)
    err = asyncio.run(check(big))
    assert err is not None and err.code == "OUT_OF_MEMORY" and err.status == 507
    assert err.details == {"needed_bytes": 240_000, "budget_bytes": 200_000}
    assert "when one last reported" in err.message and "none runs now" in err.message
    assert asyncio.run(check(small)) is None
    report("g:3", 300_000)  # bigger GPUs: replaces it at once
    assert asyncio.run(check(big)) is None
    assert reports.engine_limit("tiny-2")["budget_bytes"] == 300_000
    monkeypatch.setattr(generators, "ENGINE_LIMIT_KEEP_S", 0.2)
    time.sleep(0.3)
    assert reports.engine_limit("tiny-2") is None  # too old to trust
    report("g:4", 100_000)  # and then a smaller one replaces it
    assert reports.engine_limit("tiny-2")["budget_bytes"] == 100_000
    assert reports.engine_limit("tiny") is None


def test_a_generator_whose_results_this_ingress_cannot_read_makes_the_service_not_ready(
    server, client, tmp_path
):
    """Two nodes each keeping results on their own disk: the generator's probe file is not in the
    ingress's storage, so /readyz fails naming MUSICGEN_STORAGE_URL (never a silent 404 on download).
    A generator that shares the ingress's storage is fine; the check is cached for `cache_s`."""
    from deployments.service.storage import LocalStorage, write_probe

    ingress_disk, other_disk = LocalStorage(tmp_path / "node-a"), LocalStorage(tmp_path / "node-b")
    reports = JobStore(client)
    clock = Clock()

    def report(worker: str, storage: LocalStorage, node: str) -> None:
        probe = write_probe(storage, worker, {"node": node})
        status = {**loaded("tiny", worker), "node": node, "storage": storage.location, "storage_probe": probe}
        reports.put_generator_status(worker, status)

    async def main():
        store = AsyncJobStore.from_url(server.url)
        readiness = Readiness(store, ["tiny"], scales_to_zero=False, results=ingress_disk, node="A",
                              clock=clock)  # fmt: skip
        await asyncio.to_thread(report, "a:1", ingress_disk, "A")
        assert await readiness.ready() == (True, "serving tiny on 1 generator(s)")
        await asyncio.to_thread(report, "b:2", other_disk, "B")
        clock.now += 1
        ok, why = await readiness.ready()
        assert not ok
        assert why.startswith(f"generator b:2 (node B) stores results in the folder {tmp_path / 'node-b'}")
        assert "which this ingress (node A) cannot read" in why and "MUSICGEN_STORAGE_URL=s3://" in why
        # the storage becomes shared (here: the probe appears where the ingress reads)
        write_probe(ingress_disk, "b:2", {"node": "B"})
        clock.now += 0.5
        assert (await readiness.ready())[0] is False  # checked again after cache_s
        clock.now += 0.5
        assert await readiness.ready() == (True, "serving tiny on 2 generator(s)")
        await store.aclose()

    asyncio.run(main())
