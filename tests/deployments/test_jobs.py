"""The job store against a real Redis: the project's embedded one, as users get it without REDIS_URL."""

from __future__ import annotations

import json
import time

import pytest
import redis

from deployments.jobs import JobState, JobStore, job_key
from deployments.redis_server import EmbeddedRedis


@pytest.fixture()
def store(server):
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    return JobStore(client, retention_s=3600, lease_s=0.2, max_attempts=2)


PARAMS = {"lyrics": "[00:01.00]hi", "duration_s": 95}


def test_create_is_durable_and_idempotent(store):
    job, created = store.create(PARAMS, idempotency_key="abc")
    assert created and job.state == JobState.QUEUED and job.params == PARAMS
    again, created_again = store.create({"other": 1}, idempotency_key="abc")
    assert not created_again and again.id == job.id and again.params == PARAMS
    other, created_other = store.create(PARAMS)
    assert created_other and other.id != job.id
    assert store.queue_position(job.id) == 0 and store.queue_position(other.id) == 1
    assert store.r.ttl(job_key(job.id)) == -1  # an accepted job never expires while unfinished


def test_claim_and_complete_exactly_once(store):
    job, _ = store.create(PARAMS)
    assert store.claim(job.id, "w1")
    assert not store.claim(job.id, "w2")
    running = store.get(job.id)
    assert running.state == JobState.RUNNING and running.attempts == 1 and running.worker == "w1"
    assert store.complete(job.id, {"takes": [1]})
    assert not store.complete(job.id, {"takes": [2]})  # a second completion changes nothing
    assert not store.fail(job.id, {"code": "X"})
    done = store.get(job.id)
    assert done.state == JobState.SUCCEEDED and done.result == {"takes": [1]} and done.finished_at
    assert 0 < store.r.ttl(job_key(job.id)) <= 3600  # kept for the retention period


def test_cancel_queued_at_once_and_running_at_next_step(store):
    queued, _ = store.create(PARAMS)
    assert store.cancel(queued.id) == JobState.CANCELED
    assert store.get(queued.id).error["code"] == "CANCELED" and store.queue_depth() == 0
    running, _ = store.create(PARAMS)
    store.claim(running.id, "w1")
    assert store.cancel(running.id) == JobState.RUNNING and store.cancel_requested(running.id)
    assert store.finish_canceled(running.id)
    assert store.get(running.id).state == JobState.CANCELED
    assert not store.complete(running.id, {})  # a late result of a canceled job is dropped
    assert store.cancel("nope") is None


def test_lost_worker_is_requeued_then_failed(store):
    job, _ = store.create(PARAMS)
    later, _ = store.create(PARAMS)
    store.claim(job.id, "w1")
    assert store.reconcile() == {"requeued": [], "failed": []}  # lease still valid
    time.sleep(0.3)
    assert store.reconcile()["requeued"] == [job.id]
    requeued = store.get(job.id)
    assert requeued.state == JobState.QUEUED and requeued.attempts == 1
    assert store.queue_position(job.id) == 0 and store.queue_position(later.id) == 1  # keeps its place
    assert not store.heartbeat(job.id, "w1")  # the old worker lost it
    store.claim(job.id, "w2")
    assert store.heartbeat(job.id, "w2")
    time.sleep(0.3)
    assert store.reconcile()["failed"] == [job.id]
    failed = store.get(job.id)
    assert failed.state == JobState.FAILED and failed.error["code"] == "WORKER_LOST"
    assert not store.complete(job.id, {})  # the lost worker's late result is dropped


def test_progress_is_rate_limited_and_published(store):
    job, _ = store.create(PARAMS)
    pubsub = store.r.pubsub()
    pubsub.subscribe(f"mg:events:{job.id}")
    pubsub.get_message(timeout=1)  # subscription confirmation
    assert store.set_progress(job.id, {"stage": "sampling", "step": 1, "total": 32})
    assert not store.set_progress(job.id, {"stage": "sampling", "step": 2, "total": 32})
    assert store.set_progress(job.id, {"stage": "decoding"}, force=True)
    assert store.get(job.id).progress == {"stage": "decoding"}
    messages = [pubsub.get_message(timeout=1) for _ in range(2)]
    assert [json.loads(m["data"])["progress"]["stage"] for m in messages] == ["sampling", "decoding"]


def test_recent_is_paginated_newest_first(store):
    ids = [store.create(PARAMS)[0].id for _ in range(5)]
    first = store.recent(limit=2)
    assert [j.id for j in first] == ids[::-1][:2]
    second = store.recent(limit=2, before=first[-1].created_at)
    assert [j.id for j in second] == ids[::-1][2:4]


def test_jobs_survive_a_redis_restart(tmp_path):
    srv = EmbeddedRedis(tmp_path / "data")
    srv.start()
    store = JobStore.from_url(srv.url)
    job, _ = store.create(PARAMS, idempotency_key="k")
    srv.stop()
    with pytest.raises(redis.ConnectionError):
        store.get(job.id)
    srv.start()
    try:
        again = JobStore.from_url(srv.url)
        assert again.get(job.id).state == JobState.QUEUED
        assert again.queued_ids() == [job.id]
        assert again.create(PARAMS, idempotency_key="k")[0].id == job.id
    finally:
        srv.stop()


def test_embedded_redis_dies_with_its_owner(tmp_path):
    """A killed owner (e.g. a replica) must not leave an orphan Redis holding the port."""
    import subprocess
    import sys

    code = (
        "import sys, time; from deployments.redis_server import EmbeddedRedis; "
        f"r = EmbeddedRedis({str(tmp_path)!r}); r.start(); print(r.process.pid, flush=True); time.sleep(60)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    redis_pid = int(owner.stdout.readline())
    owner.kill()
    owner.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with open(f"/proc/{redis_pid}/status") as f:
                if "State:\tZ" in f.read():
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("redis-server outlived its owner")
