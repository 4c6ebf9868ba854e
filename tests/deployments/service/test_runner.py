"""The worker's job loop on the tiny model and a real (embedded) Redis, without Ray."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
import soundfile as sf

from deployments.service.runner import JobRunner
from deployments.service.storage import LocalStorage
from deployments.service.store import JobState, JobStore, StoreUnavailable
from tests.deployments.conftest import params


@pytest.fixture()
def runner(server, pipe, tmp_path):
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    store = JobStore(client, lease_s=5)
    return JobRunner(
        store, pipe, LocalStorage(tmp_path / "results"), LocalStorage(tmp_path / "uploads"), "w1"
    )


def test_success_stores_takes_and_records_once(runner):
    job, _ = runner.store.create(params().to_dict())
    assert runner.run(job.id) == JobState.SUCCEEDED
    done = runner.store.get(job.id)
    takes = done.result["takes"]
    assert [t["seed"] for t in takes] == [4, 5] and done.attempts == 1
    for t in takes:
        info = sf.info(str(runner.results.path(t["key"])))
        assert (info.samplerate, info.channels, info.format) == (44100, 2, "FLAC")
    assert done.progress["stage"] == "encoding_audio"
    assert runner.run(job.id) is None  # cannot be claimed again


def test_cancel_while_running_stops_before_the_next_step(runner, monkeypatch):
    job, _ = runner.store.create(params(steps=20).to_dict())
    original = runner.store.set_progress
    steps = []

    def cancel_on_first_step(job_id, progress, **kw):
        if progress.get("stage") == "sampling":
            steps.append(progress["step"])
            runner.store.cancel(job_id)
        return original(job_id, progress, **kw)

    monkeypatch.setattr(runner.store, "set_progress", cancel_on_first_step)
    assert runner.run(job.id) == JobState.CANCELED
    assert steps == [1]  # the cancel asked during step 1 stopped it before step 2
    assert not runner.results.path(job.id).exists()  # no take stored


def test_library_errors_fail_the_job_with_their_code(runner, tmp_path):
    short = runner.uploads.path("short.wav")
    sf.write(short, np.zeros((44100 * 2, 2)), 44100)
    job, _ = runner.store.create(params(style_prompt=None, reference_audio_id="short.wav").to_dict())
    assert runner.run(job.id) == JobState.FAILED
    err = runner.store.get(job.id).error
    assert err["code"] == "INVALID_PROMPT" and "10 s" in err["recovery"]


def test_a_finished_job_queues_its_signed_webhook(runner, webhook_receiver, server):
    """The runner's outcome queues the delivery in the same step; a delivery loop (on the ingress, here
    run once) sends the finished job, signed. Retries: test_webhooks.py."""
    import asyncio
    import hmac

    from deployments.service.netguard import AddressPolicy
    from deployments.service.store import AsyncJobStore
    from deployments.service.store.schema import webhook_key
    from deployments.service.webhooks import WebhookDeliverer, sign

    job, _ = runner.store.create(params(webhook_url=webhook_receiver.url).to_dict())
    assert runner.run(job.id) == JobState.SUCCEEDED
    client = redis.Redis.from_url(server.url)
    assert client.hget(webhook_key(job.id), "state") == b"succeeded" and webhook_receiver.received == []

    async def deliver():
        store = AsyncJobStore.from_url(server.url)
        deliverer = WebhookDeliverer(store, "s3cret", AddressPolicy(["127.0.0.1"]))  # the receiver's address
        try:
            return await deliverer.deliver_due()
        finally:
            await store.aclose()
            deliverer.close()

    assert asyncio.run(deliver()) == 1
    [(headers, body)] = webhook_receiver.received
    assert hmac.compare_digest(
        headers["X-Musicgen-Signature"], sign("s3cret", headers["X-Musicgen-Timestamp"], body)
    )
    payload = webhook_receiver.payloads()[-1]
    assert (
        payload["id"] == job.id and payload["status"] == "succeeded" and len(payload["result"]["takes"]) == 2
    )
    assert payload["result"] == runner.store.get(job.id).result
    assert client.hget(f"mg:job:{job.id}", "webhook") == b"delivered"


def test_finished_jobs_reach_the_metrics_hook(runner):
    from deployments.serve.metrics import GeneratorMetrics

    seen = []
    runner.on_finish = seen.append
    job, _ = runner.store.create(params().to_dict())
    runner.run(job.id)
    assert [j.id for j in seen] == [job.id] and seen[0].result["timings"]["sampling_s"] > 0

    class Recorder:  # stands in for ray.serve.metrics objects, which need a Ray worker
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda *a, **k: self.calls.append((name, a, k))

    m = GeneratorMetrics.__new__(GeneratorMetrics)
    m.finished, m.stage, m.inverse_rtf, m.takes, m.requests = (Recorder() for _ in range(5))
    m.tags = {"model": "tiny"}
    m.record(seen[0])
    assert m.finished.calls == [("inc", (), {"tags": {"model": "tiny", "state": "succeeded", "code": ""}})]
    assert {k["tags"]["stage"] for _, _, k in m.stage.calls} >= {"style", "sampling", "decoding"}
    rtf = m.inverse_rtf.calls[0][1][0]
    assert rtf == pytest.approx(
        sum(t["duration_s"] for t in seen[0].result["takes"]) / seen[0].result["timings"]["total_s"]
    )
    assert m.takes.calls == [("observe", (2,), {"tags": {"model": "tiny"}})]
    assert m.requests.calls == [("observe", (1,), {"tags": {"model": "tiny"}})]

    runner.on_finish = lambda job: 1 / 0  # a broken hook never fails a job
    job2, _ = runner.store.create(params().to_dict())
    assert runner.run(job2.id) == JobState.SUCCEEDED


def test_generation_timeout_fails_the_job(runner):
    runner.timeout_s = 1e-6
    job, _ = runner.store.create(params(steps=5).to_dict())
    assert runner.run(job.id) == JobState.FAILED
    err = runner.store.get(job.id).error
    assert err["code"] == "GENERATION_TIMEOUT" and "shorter" in err["recovery"]


def test_a_batch_of_jobs_runs_together_and_each_ends_on_its_own(runner, monkeypatch):
    """Three compatible jobs, a duplicate id, a job another worker holds, one canceled mid-batch and
    one whose upload vanished: each gets its own outcome."""
    a, _ = runner.store.create(params(seed=1, num_takes=1).to_dict())
    b, _ = runner.store.create(params(seed=2, num_takes=2, steps=3).to_dict())
    c, _ = runner.store.create(params(seed=3, num_takes=1).to_dict())
    gone, _ = runner.store.create(params(style_prompt=None, reference_audio_id="deleted.wav").to_dict())
    other, _ = runner.store.create(params().to_dict())
    assert runner.store.claim(other.id, "w2")
    original = runner.store.set_progress

    def cancel_c_at_step_2(job_id, progress, **kw):
        if job_id == c.id and progress.get("step") == 2:
            runner.store.cancel(job_id)
        return original(job_id, progress, **kw)

    monkeypatch.setattr(runner.store, "set_progress", cancel_c_at_step_2)
    states = runner.run_many([a.id, b.id, a.id, c.id, gone.id, other.id])
    assert states == [JobState.SUCCEEDED, JobState.SUCCEEDED, None, JobState.CANCELED, JobState.FAILED, None]
    for job in (a, b):
        timings = runner.store.get(job.id).result["timings"]
        assert timings["batch_requests"] == 3 and timings["batch_takes"] == 4  # c sampled with them
    assert runner.store.get(gone.id).error["code"] == "NOT_FOUND"
    assert runner.store.get(other.id).state == JobState.RUNNING  # untouched: w2 owns it


def test_background_encoding_frees_the_model_and_keeps_the_lease(server, pipe, tmp_path, monkeypatch):
    """With encode_in_background, run_many returns once the audio is decoded; the takes are encoded
    and stored on a CPU thread while the job keeps its lease, then recorded exactly once."""
    import threading

    import deployments.service.runner as runner_module

    client = redis.Redis.from_url(server.url)
    client.flushdb()
    store = JobStore(client, lease_s=0.6)  # heartbeats every 0.2 s; encoding takes longer than a lease
    runner = JobRunner(store, pipe, LocalStorage(tmp_path / "r"), LocalStorage(tmp_path / "u"), "w1",
                       encode_in_background=True, max_pending_encodes=4)  # fmt: skip
    release = threading.Event()
    real_write = runner_module.write_audio

    def slow_write(*args, **kw):
        release.wait(10)
        return real_write(*args, **kw)

    monkeypatch.setattr(runner_module, "write_audio", slow_write)
    first, _ = store.create(params(seed=1).to_dict())
    second, _ = store.create(params(seed=2).to_dict())
    assert runner.run_many([first.id]) == [JobState.RUNNING]  # returned while its takes wait to encode
    assert runner.run_many([second.id]) == [JobState.RUNNING]  # the next batch ran meanwhile
    time.sleep(1.5)  # more than two leases: only heartbeats keep the jobs ours
    assert store.reconcile() == {"requeued": [], "failed": []}  # no lease expired
    assert store.get(first.id).state == JobState.RUNNING
    release.set()
    assert runner.drain(timeout=30)
    for job in (first, second):
        done = store.get(job.id)
        assert done.state == JobState.SUCCEEDED and done.attempts == 1
        assert done.result["timings"]["encoding_s"] > 0
        assert runner.results.exists(done.result["takes"][0]["key"])


def _lease_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("lease-")]


def test_a_job_whose_outcome_cannot_be_recorded_does_not_strand_the_others(runner, monkeypatch):
    """Mid-batch, the store fails to take one job's result (a Redis blip): the jobs after it are still
    recorded, that job goes back to the queue for another attempt, and no lease is renewed after
    run_many returns."""
    a, _ = runner.store.create(params(seed=1, num_takes=1).to_dict())
    b, _ = runner.store.create(params(seed=2, num_takes=1).to_dict())
    c, _ = runner.store.create(params(seed=3, num_takes=1).to_dict())
    real_complete = runner.store.complete

    def blip_on_b(job_id, result, **kw):
        if job_id == b.id:
            raise StoreUnavailable("ConnectionError", "connection reset by peer")
        return real_complete(job_id, result, **kw)

    monkeypatch.setattr(runner.store, "complete", blip_on_b)
    assert runner.run_many([a.id, b.id, c.id]) == [JobState.SUCCEEDED, JobState.QUEUED, JobState.SUCCEEDED]
    assert runner.store.get(c.id).result["takes"][0]["seed"] == 3
    again = runner.store.get(b.id)
    assert again.state == JobState.QUEUED and again.attempts == 1 and runner.store.queue_position(b.id) == 0
    assert runner.store.counts() == (1, 0)  # nothing left running
    assert _lease_threads() == []  # every renewer stopped
    monkeypatch.undo()
    assert runner.run(b.id) == JobState.SUCCEEDED  # the retry records it
    assert runner.store.get(b.id).attempts == 2


def test_a_job_the_store_cannot_take_back_either_lets_its_lease_expire(server, pipe, tmp_path, monkeypatch):
    """The store is unreachable for one job's result and for giving it back: its lease is no longer
    renewed, so the reconciler re-queues it once the lease is over; the other job is recorded."""
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    store = JobStore(client, lease_s=0.6)
    runner = JobRunner(store, pipe, LocalStorage(tmp_path / "r"), LocalStorage(tmp_path / "u"), "w1")
    a, _ = store.create(params(seed=1, num_takes=1).to_dict())
    b, _ = store.create(params(seed=2, num_takes=1).to_dict())
    real_complete = store.complete

    def down_for_a(job_id, result, **kw):
        if job_id == a.id:
            raise StoreUnavailable("TimeoutError", "timed out")
        return real_complete(job_id, result, **kw)

    def release(job_id, **kw):
        raise StoreUnavailable("ConnectionError", "connection refused")

    monkeypatch.setattr(store, "complete", down_for_a)
    monkeypatch.setattr(store, "release", release)
    assert runner.run_many([a.id, b.id]) == [None, JobState.SUCCEEDED]
    assert store.get(a.id).state == JobState.RUNNING and _lease_threads() == []
    time.sleep(0.8)  # longer than the lease: only a renewal could have kept it
    assert store.reconcile()["requeued"] == [a.id]


def test_a_batch_that_crashes_gives_its_jobs_back(runner, monkeypatch):
    """The pipeline itself raises (a dead CUDA context, say): every job of the batch is back in the
    queue at once, not running under a lease that nothing renews, and the error propagates."""
    jobs = [runner.store.create(params(seed=s).to_dict())[0] for s in (1, 2)]

    def crash(*args, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner.pipeline, "generate_many", crash)
    with pytest.raises(RuntimeError, match="CUDA"):
        runner.run_many([j.id for j in jobs])
    assert [runner.store.get(j.id).state for j in jobs] == [JobState.QUEUED] * 2
    assert runner.store.queued_ids() == [j.id for j in jobs] and runner.store.counts() == (2, 0)
    assert _lease_threads() == []


def test_a_worker_that_lost_its_lease_cannot_overwrite_its_successor(server, pipe, tmp_path, monkeypatch):
    """Worker A's lease renewals stop reaching Redis while it encodes (a partition); its lease expires,
    the reconciler re-queues the job and worker B runs it to the end. A then finishes encoding: it
    changes neither B's record nor B's files, and leaves no file of its own."""
    import threading

    import deployments.service.runner as runner_module

    client = redis.Redis.from_url(server.url)
    client.flushdb()
    results = LocalStorage(tmp_path / "results")
    store_a, store_b = JobStore(client, lease_s=0.5), JobStore(client, lease_s=5)
    finished_by_a = []
    uploads = LocalStorage(tmp_path / "u")
    runner_a = JobRunner(store_a, pipe, results, uploads, "w1", on_finish=finished_by_a.append)
    runner_b = JobRunner(store_b, pipe, results, uploads, "w1")  # the same name: only tokens tell them apart
    job, _ = store_a.create(params(num_takes=1).to_dict())

    def partitioned(job_id, **kw):
        raise StoreUnavailable("ConnectionError", "no route to host")

    monkeypatch.setattr(store_a, "heartbeat", partitioned)
    encoding, resume = threading.Event(), threading.Event()
    real_write = runner_module.write_audio

    def write(path, audio, *args, **kw):
        if threading.current_thread().name == "worker-a":
            encoding.set()
            resume.wait(30)
            audio = audio * 0.5  # A's take differs from B's, byte for byte
        return real_write(path, audio, *args, **kw)

    monkeypatch.setattr(runner_module, "write_audio", write)
    out_a = []
    thread_a = threading.Thread(target=lambda: out_a.append(runner_a.run(job.id)), name="worker-a")
    thread_a.start()
    assert encoding.wait(60)
    time.sleep(0.7)  # A's lease runs out
    assert store_b.reconcile()["requeued"] == [job.id]
    assert runner_b.run(job.id) == JobState.SUCCEEDED
    done = store_b.get(job.id)
    (take,) = done.result["takes"]
    b_bytes = results.path(take["key"]).read_bytes()
    events = store_b.events_after(job.id, None)

    resume.set()  # A stores its take and tries to record it
    thread_a.join(60)
    assert out_a == [None] and finished_by_a == []  # nothing recorded, no metrics or webhook from A
    assert (
        store_b.get(job.id) == done and done.attempts == 2 and take["key"].startswith(f"{job.id}/attempt-2/")
    )
    assert results.path(take["key"]).read_bytes() == b_bytes  # B's file untouched
    assert store_b.events_after(job.id, None) == events  # A wrote nothing, not even progress
    assert [p.name for p in results.path(job.id).iterdir()] == ["attempt-2"]  # A's own files removed
