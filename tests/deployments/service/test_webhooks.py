"""Webhook delivery from Redis against real local receivers on 127.0.0.1 (let through by the
allow-list, as an operator lets an internal receiver through) and the embedded Redis."""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time

import pytest

from deployments.service.netguard import AddressPolicy
from deployments.service.redis_server import free_port
from deployments.service.store import AsyncJobStore, JobStore
from deployments.service.store.schema import WEBHOOKS, job_key, webhook_key
from deployments.service.webhooks import WebhookDeliverer, sign
from tests.deployments.conftest import FakeDns, RunningDeliverer, WebhookReceiver, wait_until

LOCAL = AddressPolicy(["127.0.0.1"])


@pytest.fixture()
def store(client):
    return JobStore(client)


def ended_job(store: JobStore, url: str) -> str:
    """A job with a webhook, canceled while queued: its delivery is due."""
    job, _ = store.create({"webhook_url": url})
    store.cancel(job.id)
    return job.id


def run(server, scenario, **options):
    """Run `scenario(deliverer)` on a fresh event loop with a deliverer of its own."""

    async def main():
        astore = AsyncJobStore.from_url(server.url)
        deliverer = WebhookDeliverer(
            astore, options.pop("secret", ""), options.pop("policy", LOCAL), **options
        )
        try:
            return await scenario(deliverer)
        finally:
            await astore.aclose()
            deliverer.close()

    return asyncio.run(main())


def test_a_failed_delivery_is_retried_with_backoff_and_succeeds_when_the_receiver_is_back(
    server, store, client
):
    port = free_port()  # nothing listens there yet: the receiver is down
    url = f"http://127.0.0.1:{port}/hook?token=abc"
    job_id = ended_job(store, url)
    receiver = None

    async def scenario(deliverer):
        nonlocal receiver
        due = []
        for attempt in (1, 2):
            t0 = time.time()
            assert await deliverer.deliver_due() == 1
            hook = client.hgetall(webhook_key(job_id))
            assert int(hook[b"attempts"]) == attempt and b"ConnectionRefusedError" in hook[b"last_error"]
            due.append(client.zscore("mg:webhooks", job_id) - t0)
            assert await deliverer.deliver_due() == 0  # not due again before its backoff
            await asyncio.sleep(due[-1] + 0.05)
        receiver = WebhookReceiver(port=port)  # back up
        assert await deliverer.deliver_due() == 1
        return due

    try:
        due = run(server, scenario, secret="s3cret", backoff_s=0.3, backoff_max_s=10)
        assert 0.3 <= due[0] < 0.5 and 0.6 <= due[1] < 0.8  # 0.3 s, then twice that
        [(headers, body)] = receiver.received
        assert headers["Host"] == f"127.0.0.1:{port}" and receiver.payloads()[0]["id"] == job_id
        assert receiver.payloads()[0]["status"] == "canceled"
        assert hmac.compare_digest(
            headers["X-Musicgen-Signature"], sign("s3cret", headers["X-Musicgen-Timestamp"], body)
        )
        assert not client.exists(webhook_key(job_id)) and client.zcard("mg:webhooks") == 0
        assert client.hget(job_key(job_id), "webhook") == b"delivered"
    finally:
        if receiver is not None:
            receiver.close()


def test_deliveries_are_due_and_leased_in_redis_time(server, store, client, skew_clocks):
    """Hosts whose clocks are an hour off Redis's: a job ended on a fast one is due now; a slow one
    claims it, for a lease of Redis time + lease_s; a retry is due Redis time + its delay, and a fast
    host does not take it early; the deliverer's backoff is counted from Redis time too."""

    def redis_now() -> float:
        seconds, microseconds = client.time()
        return seconds + microseconds / 1e6

    skew_clocks(3600)
    job_id = ended_job(store, f"http://127.0.0.1:{free_port()}/hook")
    assert abs(client.zscore(WEBHOOKS, job_id) - redis_now()) < 1
    skew_clocks(-3600)
    [d] = store.claim_webhooks(10, lease_s=30)
    assert redis_now() < client.zscore(WEBHOOKS, job_id) <= redis_now() + 30
    skew_clocks(3600)
    assert store.webhook_retry(d, "answered 500", 60)
    assert abs(client.zscore(WEBHOOKS, job_id) - (redis_now() + 60)) < 1
    assert store.claim_webhooks(10) == []  # due in a minute of Redis time, whatever this host says
    client.zadd(WEBHOOKS, {job_id: 0})

    async def scenario(deliverer):
        assert await deliverer.deliver_due() == 1  # nothing listens on the port: attempt 2 fails
        return client.zscore(WEBHOOKS, job_id) - redis_now()

    assert 19 < run(server, scenario, backoff_s=10) <= 20  # twice backoff_s after the second attempt


def test_after_the_last_attempt_it_lands_in_the_dead_letters_and_logs_keep_secrets(
    server, store, client, caplog
):
    caplog.set_level(logging.DEBUG, logger="deployments.service.webhooks")
    receiver = WebhookReceiver(failures=100)  # always 500
    url = receiver.url_for("127.0.0.1", "/hook?token=tok-123")
    job_id = ended_job(store, url)
    with RunningDeliverer(server.url, LOCAL, secret="s3cret", attempts=3, backoff_s=0.02):
        [letter] = wait_until(store.dead_webhooks, what="a dead letter")
    try:
        assert len(receiver.received) == 3  # exactly the attempts allowed, then no more
        assert letter["id"] == job_id and letter["url"] == url and letter["attempts"] == 3
        assert letter["error"] == "answered 500" and letter["status"] == "canceled"
        assert not client.exists(webhook_key(job_id)) and client.zcard("mg:webhooks") == 0
        assert client.hget(job_key(job_id), "webhook") == b"failed"
        logs = "\n".join(r.getMessage() for r in caplog.records)
        assert f"127.0.0.1:{receiver.port}/hook" in logs and "dead letters" in logs  # it did log
        signatures = [h["X-Musicgen-Signature"] for h, _ in receiver.received]
        for secret in ("tok-123", "s3cret", "sha256=", *signatures):
            assert secret not in logs
    finally:
        receiver.close()


def test_it_connects_to_the_address_it_checked_with_the_urls_host(server, store, client):
    """The name resolves once per attempt, through the policy; the connection goes to that address
    (the system resolver has never heard of hooks.test) and the request keeps the URL's host."""
    dns = FakeDns(**{"hooks.test": ["127.0.0.1"]})
    receiver = WebhookReceiver()
    job_id = ended_job(store, receiver.url_for("hooks.test"))
    try:
        assert run(server, lambda d: d.deliver_due(), policy=AddressPolicy(["hooks.test"], resolve=dns)) == 1
        [(headers, _)] = receiver.received
        assert headers["Host"] == f"hooks.test:{receiver.port}" and dns.lookups == ["hooks.test"]
        assert client.hget(job_key(job_id), "webhook") == b"delivered"
    finally:
        receiver.close()


def test_a_name_that_now_resolves_privately_is_refused_and_never_contacted(server, store, client):
    dns = FakeDns(**{"flip.test": ["127.0.0.1"]})  # public when submitted (test_api), private now
    receiver = WebhookReceiver()
    job_id = ended_job(store, receiver.url_for("flip.test"))
    try:
        assert run(server, lambda d: d.deliver_due(), policy=AddressPolicy(resolve=dns)) == 1
        [letter] = store.dead_webhooks()
        assert letter["id"] == job_id and letter["attempts"] == 1  # refused at once: no retries
        assert "refused at delivery" in letter["error"] and "loopback" in letter["error"]
        assert receiver.received == [] and client.hget(job_key(job_id), "webhook") == b"failed"
    finally:
        receiver.close()


def test_redirects_are_not_followed(server, store, client):
    """The receiver (allowed by name) answers 302 to a loopback address that is not allowed: the
    service does not go there, and a redirect counts as a failed attempt."""
    dns = FakeDns(**{"hooks.test": ["127.0.0.1"]})
    target = WebhookReceiver()
    receiver = WebhookReceiver()
    receiver.respond = lambda n: (302, {"Location": target.url_for("127.0.0.1", "/stolen")})
    job_id = ended_job(store, receiver.url_for("hooks.test"))
    policy = AddressPolicy(["hooks.test"], resolve=dns)
    try:
        with RunningDeliverer(server.url, policy, attempts=2, backoff_s=0.02):
            [letter] = wait_until(store.dead_webhooks, what="a dead letter")
        assert letter["id"] == job_id and letter["error"] == "answered 302 (redirects are not followed)"
        assert len(receiver.received) == 2 and target.received == []
    finally:
        receiver.close()
        target.close()


def test_two_delivery_loops_at_once_deliver_each_attempt_once(server, store, client, caplog):
    caplog.set_level(logging.DEBUG, logger="deployments.service.webhooks")
    receiver = WebhookReceiver()
    receiver.respond = lambda n: (time.sleep(0.05), (200, {}))[1]  # a receiver that takes its time
    job_ids = [ended_job(store, receiver.url) for _ in range(40)]
    loops = [RunningDeliverer(server.url, LOCAL, concurrency=4, poll_s=0.01) for _ in range(2)]
    try:
        wait_until(lambda: client.zcard("mg:webhooks") == 0, what="every delivery done")
    finally:
        for loop in loops:
            loop.stop()
        receiver.close()
    got = [p["id"] for p in receiver.payloads()]
    assert sorted(got) == sorted(job_ids) and len(got) == 40  # each once, none lost
    assert all(client.hget(job_key(j), "webhook") == b"delivered" for j in job_ids)
    by_loop = {}
    for r in caplog.records:
        if r.getMessage().startswith("webhook for job") and "delivered" in r.getMessage():
            by_loop[r.threadName] = by_loop.get(r.threadName, 0) + 1
    assert len(by_loop) == 2 and sum(by_loop.values()) == 40, by_loop  # both loops took part


def test_a_delivery_survives_its_loop_dying_mid_attempt(server, store, client):
    """Loop A claims the delivery and dies while the receiver holds the request; loop B, started
    afterwards, makes the attempt again once A's lease has run out, and it is delivered."""
    release = threading.Event()
    receiver = WebhookReceiver()
    receiver.respond = lambda n: (release.wait(10) if n == 1 else None, (200, {}))[1]
    job_id = ended_job(store, receiver.url)
    a = RunningDeliverer(server.url, LOCAL, lease_s=1.0)
    try:
        wait_until(lambda: receiver.received, what="A's attempt")
        a.stop()  # the replica dies with its attempt in flight
        assert client.exists(webhook_key(job_id)) and not receiver.got.is_set()
        with RunningDeliverer(server.url, LOCAL, lease_s=1.0):
            wait_until(lambda: client.hget(job_key(job_id), "webhook") == b"delivered", what="B's delivery")
        assert [p["id"] for p in receiver.payloads()] == [job_id, job_id]
        assert receiver.times[1] - receiver.times[0] >= 0.8  # B waited for A's lease to end
        assert not client.exists(webhook_key(job_id)) and client.zcard("mg:webhooks") == 0
    finally:
        release.set()
        receiver.close()
