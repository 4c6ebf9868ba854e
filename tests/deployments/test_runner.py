"""The worker's job loop on the tiny model and a real (embedded) Redis, without Ray."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
import soundfile as sf

from deployments.service.jobs import JobState, JobStore
from deployments.service.params import SongParams
from deployments.service.runner import JobRunner
from deployments.service.storage import LocalStorage
from musicgen.lyrics.frontend import LyricsFrontEnd
from musicgen.registry import MODELS


@pytest.fixture()
def runner(server, pipe, tmp_path):
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    store = JobStore(client, lease_s=5)
    return JobRunner(
        store, pipe, LocalStorage(tmp_path / "results"), LocalStorage(tmp_path / "uploads"), "w1"
    )


def params(**kw) -> SongParams:
    fe = LyricsFrontEnd.from_assets()
    frames = fe.encode("[00:01.00]Hello there\n[00:03.00]good night", MODELS["tiny"], 8)
    base = dict(model="tiny", duration_s=8, lrc=frames.lrc, tokens=frames.tokens.tolist(),
                song_duration=frames.song_duration, seed=4, num_takes=2, steps=3, output_format="flac",
                style_prompt="calm piano")  # fmt: skip
    return SongParams(**{**base, **kw})


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

    def cancel_on_first_step(job_id, progress, force=False):
        if progress.get("stage") == "sampling":
            steps.append(progress["step"])
            runner.store.cancel(job_id)
        return original(job_id, progress, force=force)

    monkeypatch.setattr(runner.store, "set_progress", cancel_on_first_step)
    assert runner.run(job.id) == JobState.CANCELED
    assert steps == [1]  # the cancel asked during step 1 stopped it before step 2
    assert not runner.results.exists(f"{job.id}/take-1.flac")


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

    from deployments.service.jobs import AsyncJobStore, webhook_key
    from deployments.service.netguard import AddressPolicy
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

    def cancel_c_at_step_2(job_id, progress, force=False):
        if job_id == c.id and progress.get("step") == 2:
            runner.store.cancel(job_id)
        return original(job_id, progress, force=force)

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
