"""What the store package promises of itself, against the embedded Redis: its schema table names every
key the protocol writes (and nothing it never writes), with the lifetimes the keys really have; its
Lua scripts load, from package data; and callers see StoreUnavailable, never redis-py's errors, from
either driver when Redis is gone."""

from __future__ import annotations

import asyncio
import fnmatch
import time
import tomllib
from pathlib import Path

import pytest
import redis

from deployments.service.redis_server import EmbeddedRedis
from deployments.service.settings import Quotas
from deployments.service.store import SCHEMA, AsyncJobStore, JobStore, KeyStore, Lifetime, StoreUnavailable
from deployments.service.store.schema import EXPIRING, key_of
from deployments.service.store.scripts import SCRIPTS
from tests.conftest import ROOT

HOOK = "http://hooks.example/h"


def every_operation(client: redis.Redis) -> JobStore:
    """Each operation of the protocol once or more, the way the service uses them."""
    store = JobStore(client, retention_s=60, lease_s=0.2, max_attempts=1)
    store.create({"duration_s": 10}, idempotency_key="plain")
    owned, _ = store.create({"duration_s": 10, "webhook_url": HOOK}, idempotency_key="a:b", owner="k1",
                            quotas=Quotas())  # fmt: skip
    token = store.claim(owned.id, "w1")
    assert token and store.set_progress(owned.id, {"stage": "sampling"}, token=token, force=True)
    assert store.heartbeat(owned.id, token=token) and not store.cancel_requested(owned.id)
    store.live_append(owned.id, token, 1, b"ID3")
    store.live_end(owned.id, token, 1, "done")
    assert [c.end for c in store.live_read(owned.id, token, 1)] == [None, "done"]
    assert store.complete(owned.id, {"takes": []}, token=token)
    canceled, _ = store.create({"webhook_url": HOOK})
    store.cancel(canceled.id)
    lost, _ = store.create({"webhook_url": HOOK})
    store.claim(lost.id, "w1")
    time.sleep(0.3)
    assert store.reconcile()["failed"] == [lost.id]
    store.expire_upload("u.wav")
    store.put_upload("u.wav", "k1", {"format": "wav"})
    assert store.upload("u.wav") == ("k1", {"format": "wav"})
    store.expire_upload("gone.wav")
    store.put_upload("gone.wav", "", {"format": "wav"})
    client.zadd(EXPIRING, {"uploads:gone.wav": 0})
    store.files_deleted(store.claim_due_files())
    first, second, third = store.claim_webhooks(10)
    assert store.webhook_delivered(first) and store.webhook_retry(second, "answered 500", 60)
    assert store.webhook_dead(third, "answered 500") and store.dead_webhooks()
    store.put_generator_status("g1", {"loaded": True})
    engine = {"budget_bytes": 10**9, "token_bytes": 4096, "block_size": 10}
    store.put_generator_status("g2", {"loaded": True, "model": "tiny-2", "engine": engine})
    assert store.generator_statuses() and store.engine_limit("tiny-2")["budget_bytes"] == 10**9
    assert store.recent() and store.recent(owner="k1") and store.events_after(owned.id, None)
    keys = KeyStore(client)
    secret, key = keys.create("alice", overrides={"burst": 3})
    assert keys.authenticate(secret, Quotas()).id == key.id
    assert keys.provision("bot", "user", "0" * 64) and keys.revoke(key.id) and keys.list()
    return store


def test_the_schema_names_every_key_the_protocol_writes_with_its_lifetime(client):
    """Keyspace notifications record every key a command or script writes; each is in the table, each
    entry of the table is written, and each key has the TTL its entry says."""
    client.config_set("notify-keyspace-events", "EA")
    pubsub = client.pubsub()
    pubsub.psubscribe("__keyevent@*__:*")
    try:
        assert pubsub.get_message(timeout=5)["type"] == "psubscribe"  # subscribed before the writes
        store = every_operation(client)
        written = set()
        while (message := pubsub.get_message(timeout=0.5)) is not None:
            written.add(message["data"].decode())
    finally:
        pubsub.close()
        client.config_set("notify-keyspace-events", "")
    assert written and not [k for k in written if key_of(k) is None]  # no key outside the table
    stored = {k for k in SCHEMA if k.lifetime != Lifetime.CHANNEL}
    assert {key_of(k) for k in written} == stored  # no entry the protocol never writes
    for name in (k.decode() for k in client.scan_iter()):
        entry, ttl = key_of(name), client.ttl(name)
        assert entry is not None, name
        if entry.lifetime == Lifetime.KEPT:
            assert ttl == -1, name
        elif entry.lifetime == Lifetime.FIXED:
            assert entry.ttl_s and 0 < ttl <= entry.ttl_s, name
        else:  # WHEN_FINISHED: the job's record and events
            job = store.get(name.rsplit(":", 1)[1])
            assert job is not None and (0 < ttl <= 60 if job.state.finished else ttl == -1), name
    for k in SCHEMA:  # every entry says why, and has a TTL exactly when its lifetime is one
        assert k.why and (k.ttl_s is not None) == (k.lifetime == Lifetime.FIXED), k.pattern


def test_the_scripts_load_and_ship_as_package_data(client):
    lua = Path(ROOT) / "deployments" / "service" / "store" / "lua"
    assert set(SCRIPTS) == {p.stem for p in lua.glob("*.lua")} - {"lib"}
    for name, source in SCRIPTS.items():
        assert client.script_load(source), name  # compiles
    globs = tomllib.loads((Path(ROOT) / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [p for p in lua.glob("*.lua") if any(fnmatch.fnmatch(str(p.relative_to(Path(ROOT) / "deployments")), g)
                                                  for g in globs["deployments"])]  # fmt: skip
    assert len(shipped) == len(SCRIPTS) + 1


def test_both_drivers_raise_store_unavailable_when_redis_is_gone(tmp_path):
    srv = EmbeddedRedis(tmp_path / "redis")
    srv.start()
    sync = JobStore.from_url(srv.url)
    job, _ = sync.create({})
    srv.stop()

    def check(exc: pytest.ExceptionInfo[StoreUnavailable]) -> None:
        assert not isinstance(exc.value, redis.RedisError) and isinstance(
            exc.value.__cause__, redis.RedisError
        )
        assert exc.value.kind == type(exc.value.__cause__).__name__

    with pytest.raises(StoreUnavailable) as exc:
        sync.get(job.id)
    check(exc)
    with pytest.raises(StoreUnavailable) as exc:
        KeyStore.from_url(srv.url).list()
    check(exc)

    async def scenario() -> None:
        store = AsyncJobStore.from_url(srv.url)
        try:
            with pytest.raises(StoreUnavailable) as exc:
                await store.create({})
            check(exc)
            with pytest.raises(StoreUnavailable) as exc:
                async with store.notifications():
                    pass
            check(exc)
        finally:
            await store.aclose()

    asyncio.run(scenario())
