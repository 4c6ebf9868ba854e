"""The job store against a real Redis: the project's embedded one, as users get it without REDIS_URL."""

from __future__ import annotations

import contextlib
import json
import time

import pytest

from deployments.service.redis_server import EmbeddedRedis
from deployments.service.store import (
    AsyncJobStore,
    JobState,
    JobStore,
    QueueFull,
    StoreUnavailable,
    event_order,
)
from deployments.service.store.schema import (
    DEAD_WEBHOOKS,
    EXPIRING,
    NOTIFY,
    RUNNING,
    WEBHOOKS,
    events_key,
    job_key,
    webhook_key,
)


@pytest.fixture()
def store(client):
    return JobStore(client, retention_s=3600, lease_s=0.2, max_attempts=2)


PARAMS = {"lyrics": "[00:01.00]hi", "duration_s": 95}


def test_create_is_durable_and_idempotent(store, client):
    job, created = store.create(PARAMS, idempotency_key="abc")
    assert created and job.state == JobState.QUEUED and job.params == PARAMS
    again, created_again = store.create({"other": 1}, idempotency_key="abc")
    assert not created_again and again.id == job.id and again.params == PARAMS
    other, created_other = store.create(PARAMS)
    assert created_other and other.id != job.id
    assert store.queue_position(job.id) == 0 and store.queue_position(other.id) == 1
    assert client.ttl(job_key(job.id)) == -1  # an accepted job never expires while unfinished


def test_claim_and_complete_exactly_once(store, client):
    job, _ = store.create(PARAMS)
    token = store.claim(job.id, "w1")
    assert token == 1  # the lease token is the attempt number
    assert not store.claim(job.id, "w2")
    running = store.get(job.id)
    assert running.state == JobState.RUNNING and running.attempts == 1 and running.worker == "w1"
    assert store.complete(job.id, {"takes": [1]}, token=token)
    # a second completion changes nothing (the same run retrying its call is told it was recorded)
    assert store.complete(job.id, {"takes": [2]}, token=token)
    assert not store.fail(job.id, {"code": "X"}, token=token + 1)
    done = store.get(job.id)
    assert done.state == JobState.SUCCEEDED and done.result == {"takes": [1]} and done.finished_at
    assert 0 < client.ttl(job_key(job.id)) <= 3600
    assert (
        0 < client.ttl(events_key(job.id)) <= 3600
    )  # its events go with it  # kept for the retention period


def test_cancel_queued_at_once_and_running_at_next_step(store):
    queued, _ = store.create(PARAMS)
    assert store.cancel(queued.id) == JobState.CANCELED
    assert store.get(queued.id).error["code"] == "CANCELED" and store.queue_depth() == 0
    running, _ = store.create(PARAMS)
    token = store.claim(running.id, "w1")
    assert store.cancel(running.id) == JobState.RUNNING and store.cancel_requested(running.id)
    assert store.finish_canceled(running.id, token=token)
    assert store.get(running.id).state == JobState.CANCELED
    assert store.complete(running.id, {}, token=token)  # the run's repeated call changes nothing
    assert store.get(running.id).state == JobState.CANCELED and store.get(running.id).result is None
    assert store.cancel("nope") is None


def test_lost_worker_is_requeued_then_failed(store):
    job, _ = store.create(PARAMS)
    later, _ = store.create(PARAMS)
    first = store.claim(job.id, "w1")
    assert store.reconcile() == {"requeued": [], "failed": []}  # lease still valid
    time.sleep(0.3)
    assert store.reconcile()["requeued"] == [job.id]
    requeued = store.get(job.id)
    assert requeued.state == JobState.QUEUED and requeued.attempts == 1
    assert store.queue_position(job.id) == 0 and store.queue_position(later.id) == 1  # keeps its place
    assert not store.heartbeat(job.id, token=first)  # the old worker lost it
    second = store.claim(job.id, "w2")
    assert store.heartbeat(job.id, token=second)
    time.sleep(0.3)
    assert store.reconcile()["failed"] == [job.id]
    failed = store.get(job.id)
    assert failed.state == JobState.FAILED and failed.error["code"] == "WORKER_LOST"
    assert not store.complete(job.id, {}, token=second)  # the lost worker's late result is dropped


def test_a_lost_lease_fences_every_write_of_the_old_run(store, client):
    """Run 1 stalls past its lease; the reconciler re-queues the job and run 2 claims it, on the same
    worker even: only the token tells the runs apart. Nothing run 1 still sends changes the record,
    its events or run 2's lease; run 2's writes go through."""
    job, _ = store.create(PARAMS)
    old = store.claim(job.id, "w1")
    time.sleep(0.3)
    assert store.reconcile()["requeued"] == [job.id]
    assert not store.set_progress(job.id, {"stage": "stale"}, token=old, force=True)  # queued meanwhile
    new = store.claim(job.id, "w1")
    assert new == old + 1
    assert store.set_progress(job.id, {"stage": "sampling"}, token=new, force=True)
    record, events, deadline = (
        client.hgetall(job_key(job.id)),
        store.events_after(job.id, None),
        client.zscore(RUNNING, job.id),
    )
    assert not store.heartbeat(job.id, token=old)
    assert store.set_progress(job.id, {"stage": "stale"}, token=old, force=True) is False
    assert not store.complete(job.id, {"takes": ["stale"]}, token=old)
    assert not store.fail(job.id, {"code": "INTERNAL"}, token=old)
    assert not store.finish_canceled(job.id, token=old)
    assert store.release(job.id, token=old) is None
    assert client.hgetall(job_key(job.id)) == record and store.events_after(job.id, None) == events
    assert client.zscore(RUNNING, job.id) == deadline
    assert store.heartbeat(job.id, token=new) and store.complete(job.id, {"takes": ["new"]}, token=new)
    assert not store.complete(job.id, {"takes": ["stale"]}, token=old)
    assert store.get(job.id).result == {"takes": ["new"]}


def test_a_worker_gives_its_job_back(store):
    """A worker that cannot finish a job releases it: queued again in its place, until its attempts
    are used up (max_attempts=2 here), then failed as a lost worker's job is."""
    job, _ = store.create(PARAMS)
    store.create(PARAMS)
    token = store.claim(job.id, "w1")
    assert store.release(job.id, token=token) == JobState.QUEUED
    assert store.queue_position(job.id) == 0 and store.counts() == (2, 0)
    assert store.release(job.id, token=token) is None  # given back already: no change
    token = store.claim(job.id, "w1")
    assert store.release(job.id, token=token) == JobState.FAILED
    failed = store.get(job.id)
    assert failed.state == JobState.FAILED and failed.error["code"] == "WORKER_LOST" and failed.attempts == 2


def test_lease_deadlines_come_from_the_store_clock(store, client, skew_clocks):
    """Deadlines are Redis TIME + lease_s, whatever the clocks of the worker and the reconciler say:
    a host an hour fast neither sets a lease an hour long nor expires a live one; a host an hour slow
    still sees an expired lease expire."""

    def server_now() -> float:
        seconds, microseconds = client.time()
        return seconds + microseconds / 1e6

    skew_clocks(3600)
    job, _ = store.create(PARAMS)
    token = store.claim(job.id, "w1")
    assert server_now() < client.zscore(RUNNING, job.id) <= server_now() + 0.2  # lease_s=0.2
    assert store.reconcile() == {"requeued": [], "failed": []}
    time.sleep(0.1)
    assert store.heartbeat(job.id, token=token)
    assert client.zscore(RUNNING, job.id) <= server_now() + 0.2
    skew_clocks(-3600)
    time.sleep(0.3)
    assert store.reconcile()["requeued"] == [job.id]


def test_files_come_due_with_their_records_and_are_claimed_once(client, monkeypatch):
    """Every way a job ends schedules its files' deletion for when its record expires (Redis time),
    uploads `retention_s` after they were stored; concurrent sweepers each get different entries, and
    entries a sweeper claimed but never reported deleted come due again after SWEEP_CLAIM_S."""
    from concurrent.futures import ThreadPoolExecutor

    from deployments.service.store import retention

    store = JobStore(client, retention_s=1, lease_s=0.2, max_attempts=1)
    done, _ = store.create(PARAMS)
    store.complete(done.id, {"takes": []}, token=store.claim(done.id, "w1"))
    canceled, _ = store.create(PARAMS)
    store.cancel(canceled.id)
    lost, _ = store.create(PARAMS)
    store.claim(lost.id, "w1")
    waiting, _ = store.create(PARAMS)  # not finished: never due
    store.expire_upload("ref.wav")
    time.sleep(0.3)
    assert store.reconcile()["failed"] == [lost.id]
    assert store.claim_due_files() == []  # not before the records expire
    time.sleep(1.3)
    assert [store.get(j.id) for j in (done, canceled, lost)] == [None] * 3
    monkeypatch.setattr(retention, "SWEEP_CLAIM_S", 0.5)
    with ThreadPoolExecutor(4) as pool:
        claims = list(pool.map(lambda _: store.claim_due_files(limit=2), range(4)))
    got = [entry for claim in claims for entry in claim]
    assert sorted(got) == sorted([("results", done.id), ("results", canceled.id), ("results", lost.id),
                                  ("uploads", "ref.wav")])  # fmt: skip
    assert store.claim_due_files() == []  # claimed: no other sweeper gets them
    store.files_deleted(got[:2])
    time.sleep(0.6)
    assert sorted(store.claim_due_files()) == sorted(got[2:])  # their sweeper died: due again
    store.files_deleted(got[2:])
    assert client.zcard(EXPIRING) == 0 and store.get(waiting.id).state == JobState.QUEUED


def test_progress_is_rate_limited_and_every_change_is_an_event(store, client):
    pubsub = client.pubsub()
    pubsub.subscribe(NOTIFY)
    pubsub.get_message(timeout=1)  # subscription confirmation
    job, _ = store.create(PARAMS)
    assert not store.set_progress(job.id, {"stage": "sampling"}, token=1, force=True)  # queued: no progress
    token = store.claim(job.id, "w1")
    assert store.set_progress(job.id, {"stage": "sampling", "step": 1, "total": 32}, token=token)
    assert not store.set_progress(job.id, {"stage": "sampling", "step": 2, "total": 32}, token=token)
    assert store.set_progress(job.id, {"stage": "decoding"}, token=token, force=True)
    assert store.get(job.id).progress == {"stage": "decoding"}
    store.complete(job.id, {"takes": []}, token=token)
    # a finished record stays finished
    assert not store.set_progress(job.id, {"stage": "late"}, token=token, force=True)

    events = store.events_after(job.id, None)
    assert [(e.state, json.loads(e.fields.get("progress", "{}")).get("stage")) for e in events] == [
        ("queued", None), ("running", None), ("running", "sampling"), ("running", "decoding"),
        ("succeeded", "decoding"),
    ]  # fmt: skip
    assert [event_order(e.id) for e in events] == sorted(event_order(e.id) for e in events)
    assert events[-1].job(PARAMS).result == {"takes": []}
    # the same events, announced on the one channel, in order
    messages = [json.loads(pubsub.get_message(timeout=1)["data"]) for _ in events]
    assert [(m["id"], m["event"], m["state"]) for m in messages] == [(job.id, e.id, e.state) for e in events]
    # what a reconnecting client missed after its last event
    assert [e.id for e in store.events_after(job.id, events[2].id)] == [e.id for e in events[3:]]
    assert store.last_event(job.id).id == events[-1].id


def test_admission_is_atomic_under_concurrent_submissions(store):
    """20 clients at once against a queue of 2: exactly 2 are accepted (no check-then-create race)."""
    from concurrent.futures import ThreadPoolExecutor

    def submit(i):
        try:
            return store.create({**PARAMS, "i": i}, max_queue=2)[1]
        except QueueFull:
            return False

    with ThreadPoolExecutor(20) as pool:
        accepted = list(pool.map(submit, range(20)))
    assert sum(accepted) == 2 and store.queue_depth() == 2
    assert store.create(PARAMS, idempotency_key="k", max_queue=100)[1]
    with pytest.raises(QueueFull):
        store.create(PARAMS, idempotency_key="other", max_queue=3)
    # a known idempotency key answers with its job even when the queue is full
    assert not store.create(PARAMS, idempotency_key="k", max_queue=3)[1]


def test_cancel_is_one_step_and_announced_once(store):
    job, _ = store.create(PARAMS)
    store.claim(job.id, "w1")
    assert store.cancel(job.id) == JobState.RUNNING
    assert store.cancel(job.id) == JobState.RUNNING  # asking twice flags once
    flagged = [e for e in store.events_after(job.id, None) if e.fields.get("cancel_requested") == "1"]
    assert len(flagged) == 1 and store.get(job.id).cancel_requested


def test_generator_reports_expire(store, monkeypatch):
    from deployments.service.store import generators

    store.put_generator_status("a", {"loaded": True})
    store.put_generator_status("b", {"loaded": False})
    assert sorted(r["loaded"] for r in store.generator_statuses()) == [False, True]
    monkeypatch.setattr(generators, "GENERATOR_STATUS_TTL_S", -1)  # every report is now too old
    assert store.generator_statuses() == []
    store.put_generator_status("c", {"loaded": False}, ttl_s=60)  # a report that says how long it holds
    assert [r["loaded"] for r in store.generator_statuses()] == [False]
    monkeypatch.undo()
    assert len(store.generator_statuses()) == 1  # and the stale ones were deleted


def test_generator_reports_are_stamped_and_judged_in_redis_time(store, skew_clocks):
    """Hosts an hour off Redis's clock: a slow host's fresh report is live; a fast host's report goes
    stale once its ttl_s has passed in Redis time, whatever the reader's clock says."""
    skew_clocks(-3600)
    store.put_generator_status("slow", {"worker": "slow"})
    skew_clocks(3600)
    store.put_generator_status("fast", {"worker": "fast"}, ttl_s=0.3)
    skew_clocks(0)
    assert sorted(r["worker"] for r in store.generator_statuses()) == ["fast", "slow"]
    time.sleep(0.4)
    skew_clocks(-3600)
    assert [r["worker"] for r in store.generator_statuses()] == ["slow"]
    skew_clocks(3600)
    assert [r["worker"] for r in store.generator_statuses()] == ["slow"]


def test_a_report_renewed_while_the_reports_are_read_is_not_pruned(store, client, monkeypatch):
    """A reader finds a stale report, and its replica renews it before the reader prunes: the renewed
    report stays (only reports that were not renewed are pruned)."""
    from deployments.service.store import generators
    from deployments.service.store.schema import GENERATORS
    from deployments.service.store.steps import reply

    monkeypatch.setattr(generators, "GENERATOR_STATUS_TTL_S", 0.2)
    store.put_generator_status("a", {"worker": "a"})
    time.sleep(0.3)
    steps = JobStore.generator_statuses.steps(store)  # the read, one step at a time
    answer = store.driver.run(reply(next(steps)))
    store.put_generator_status("a", {"worker": "a"})  # renewed between the reader's steps
    with contextlib.suppress(StopIteration):
        while True:
            answer = store.driver.run(reply(steps.send(answer)))
    assert client.hexists(GENERATORS, "a") and len(store.generator_statuses()) == 1


def test_the_async_store_runs_the_same_protocol(server, store):
    """AsyncJobStore drives the same operations on redis.asyncio, and streams notifications."""
    import asyncio

    async def scenario():
        astore = AsyncJobStore.from_url(server.url, lease_s=0.2, max_attempts=2)
        try:
            async with astore.notifications() as events:
                job, created = await astore.create(PARAMS, idempotency_key="a")
                assert created and (await astore.create(PARAMS, idempotency_key="a"))[0].id == job.id
                got, position = await astore.get_with_position(job.id)
                assert got.state == JobState.QUEUED and position == 0
                assert await astore.cancel(job.id) == JobState.CANCELED
                seen = [await asyncio.wait_for(anext(events), 5) for _ in range(2)]
                assert [(e.job_id, e.state) for e in seen] == [(job.id, "queued"), (job.id, "canceled")]
                assert seen[1].job(PARAMS).error["code"] == "CANCELED"
                assert await astore.counts() == (0, 0)
                assert await astore.ping()
        finally:
            await astore.aclose()

    asyncio.run(scenario())
    assert store.get(store.recent(limit=1)[0].id).state == JobState.CANCELED


def test_notifications_end_when_redis_comes_back_under_them(tmp_path):
    """redis-py's retry reconnects a pub/sub connection and re-subscribes by itself; what was published
    meanwhile is lost, so the iteration must end (the event hub then subscribes again and re-reads
    what its streams follow) instead of waiting on silently."""
    import asyncio

    srv = EmbeddedRedis(tmp_path / "data")
    srv.start()

    async def scenario():
        astore = AsyncJobStore.from_url(srv.url, lease_s=5, max_attempts=2)
        try:
            async with astore.notifications() as events:
                srv.stop()
                srv.start()  # back before the subscriber noticed: its next read reconnects
                with pytest.raises(StoreUnavailable, match="subscription was lost"):
                    await asyncio.wait_for(anext(events), 10)
            async with astore.notifications() as events:  # a new subscription gets new events
                job, _ = await astore.create(PARAMS)
                event = await asyncio.wait_for(anext(events), 5)
                assert (event.job_id, event.state) == (job.id, "queued")
        finally:
            await astore.aclose()

    try:
        asyncio.run(scenario())
    finally:
        srv.stop()


def test_recent_is_paginated_newest_first(store):
    ids = [store.create(PARAMS)[0].id for _ in range(5)]
    first = store.recent(limit=2)
    assert [j.id for j in first] == ids[::-1][:2]
    second = store.recent(limit=2, before=first[-1].created_at)
    assert [j.id for j in second] == ids[::-1][2:4]


HOOKED = {**PARAMS, "webhook_url": "http://hooks.example/h?token=t"}


def test_every_way_a_job_ends_queues_its_webhook_in_the_same_step(store, client):
    """Cancel while queued, fail, succeed, cancel while running, WORKER_LOST: each final transition
    writes the job's delivery (URL and final fields) and makes it due, once; jobs without a URL none."""
    ends = {}
    job = store.create(HOOKED)[0]
    store.cancel(job.id)
    ends[job.id] = "canceled"
    job = store.create(HOOKED)[0]
    store.fail(job.id, {"code": "X"}, token=store.claim(job.id, "w1"))
    ends[job.id] = "failed"
    job = store.create(HOOKED)[0]
    store.complete(job.id, {"takes": []}, token=store.claim(job.id, "w1"))
    ends[job.id] = "succeeded"
    job = store.create(HOOKED)[0]
    token = store.claim(job.id, "w1")
    store.cancel(job.id)
    store.finish_canceled(job.id, token=token)
    ends[job.id] = "canceled"
    lost = store.create(HOOKED)[0]
    for _ in range(2):  # max_attempts=2: the second lost lease fails it
        store.claim(lost.id, "w1")
        time.sleep(0.3)
        store.reconcile()
    ends[lost.id] = "failed"
    plain = store.create(PARAMS)[0]
    store.cancel(plain.id)
    store.claim(store.create(HOOKED)[0].id, "w1")  # still running: nothing to deliver yet

    due = {m.decode(): score for m, score in client.zrange(WEBHOOKS, 0, -1, withscores=True)}
    assert set(due) == set(ends) and all(score <= time.time() for score in due.values())
    for job_id, state in ends.items():
        hook = {k.decode(): v.decode() for k, v in client.hgetall(webhook_key(job_id)).items()}
        final = store.get(job_id)
        assert hook["url"] == HOOKED["webhook_url"] and hook["state"] == state == final.state.value
        assert hook["attempts"] == "0" and float(hook["finished_at"]) == final.finished_at
        assert client.hget(job_key(job_id), "webhook") == b"pending"
        assert client.ttl(webhook_key(job_id)) == -1  # a queued delivery is not dropped
    assert store.get(lost.id).error["code"] == "WORKER_LOST"
    assert not client.exists(webhook_key(plain.id))
    assert not store.fail(lost.id, {"code": "Y"}, token=2) and client.zcard(WEBHOOKS) == len(
        ends
    )  # ends once


def test_a_webhook_claim_is_exclusive_until_its_lease_ends(server, store, client, monkeypatch):
    from deployments.service import settings

    job = store.create(HOOKED)[0]
    store.cancel(job.id)
    other = JobStore.from_url(server.url)  # a second replica
    [mine] = store.claim_webhooks(10, lease_s=0.3)
    assert (mine.job_id, mine.attempt, mine.url) == (job.id, 1, HOOKED["webhook_url"])
    final = store.get(job.id)
    assert mine.payload() == {"id": job.id, "status": "canceled", "result": None, "error": final.error,
                              "finished_at": final.finished_at}  # fmt: skip
    assert other.claim_webhooks(10) == []  # leased
    time.sleep(0.35)  # the first replica died mid-attempt: its lease ends
    [theirs] = other.claim_webhooks(10, lease_s=30)
    assert theirs.attempt == 2 and theirs.token != mine.token
    assert not store.webhook_delivered(mine)  # the late first replica records nothing
    assert client.exists(webhook_key(job.id))
    assert other.webhook_retry(theirs, "answered 500", delay_s=60)
    assert (
        store.claim_webhooks(10) == [] and client.hget(webhook_key(job.id), "last_error") == b"answered 500"
    )
    client.zadd(WEBHOOKS, {job.id: 0})  # due now
    [third] = store.claim_webhooks(10)
    assert third.attempt == 3 and store.webhook_dead(third, "answered 500")
    assert not client.exists(webhook_key(job.id)) and client.zcard(WEBHOOKS) == 0
    assert client.hget(job_key(job.id), "webhook") == b"failed"
    [letter] = other.dead_webhooks()
    assert letter["id"] == job.id and letter["url"] == HOOKED["webhook_url"] and letter["attempts"] == 3
    assert letter["error"] == "answered 500" and letter["status"] == "canceled" and letter["dead_at"] > 0

    # the list keeps the newest WEBHOOK_DEAD_MAX; a job record that expired meanwhile is not revived
    monkeypatch.setattr(settings, "WEBHOOK_DEAD_MAX", 2)
    ids = []
    for _ in range(3):
        job = store.create(HOOKED)[0]
        store.cancel(job.id)
        client.delete(job_key(job.id))
        [d] = store.claim_webhooks(1)
        assert store.webhook_dead(d, "gone")
        ids.append(job.id)
        assert not client.exists(job_key(job.id))
    assert [x["id"] for x in store.dead_webhooks()] == ids[::-1][:2] and client.llen(DEAD_WEBHOOKS) == 2
    job = store.create(HOOKED)[0]
    store.cancel(job.id)
    [d] = store.claim_webhooks(1)
    assert store.webhook_delivered(d) and client.hget(job_key(job.id), "webhook") == b"delivered"
    assert not client.exists(webhook_key(job.id)) and client.zcard(WEBHOOKS) == 0


def test_replicas_claiming_at_once_never_take_the_same_delivery(server, store, client):
    """Eight replicas claim 60 due deliveries at the same moment: each is claimed exactly once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    for _ in range(60):
        store.cancel(store.create(HOOKED)[0].id)
    stores = [JobStore.from_url(server.url) for _ in range(8)]
    start = threading.Barrier(8)

    def claim(s):
        start.wait()
        return [d.job_id for d in s.claim_webhooks(60)]

    with ThreadPoolExecutor(8) as pool:
        claimed = [job_id for ids in pool.map(claim, stores) for job_id in ids]
    assert len(claimed) == 60 and len(set(claimed)) == 60
    assert {int(v) for k in client.scan_iter("mg:webhook:*") for v in [client.hget(k, "attempts")]} == {1}


def test_jobs_survive_a_redis_restart(tmp_path):
    srv = EmbeddedRedis(tmp_path / "data")
    srv.start()
    store = JobStore.from_url(srv.url)
    job, _ = store.create(PARAMS, idempotency_key="k")
    srv.stop()
    with pytest.raises(StoreUnavailable):
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
        "import sys, time; from deployments.service.redis_server import EmbeddedRedis; "
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
