"""API keys in the embedded Redis (stored as digests only, listed, revoked, their token bucket), and
the `musicgen keys` command end to end: a subprocess creates a key that the API then accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pydantic
import pytest
import redis
from fastapi.testclient import TestClient

from deployments.service.api import ApiConfig, Services, create_api
from deployments.service.keys import keys_from_env
from deployments.service.redis_server import EmbeddedRedis
from deployments.service.settings import Quotas
from deployments.service.storage import LocalStorage
from deployments.service.store import (
    SECRET,
    AsyncJobStore,
    KeyStore,
    RateLimited,
    Unauthorized,
    digest,
    new_secret,
)
from tests.conftest import ROOT

DEFAULTS = Quotas(requests_per_minute=6, burst=2)


@pytest.fixture()
def keys(server) -> KeyStore:
    redis.Redis.from_url(server.url).flushdb()
    return KeyStore.from_url(server.url)


def test_a_key_is_stored_as_a_digest_only(keys, server):
    secret, key = keys.create("alice", overrides={"songs_per_day": 3})
    assert SECRET.fullmatch(secret) and key.role == "user" and not key.admin
    everything = b""
    r = redis.Redis.from_url(server.url)
    for name in r.keys("*"):
        everything += name + b"".join(k + v for k, v in r.hgetall(name).items())
    assert secret.encode() not in everything and secret[4:].encode() not in everything
    assert digest(secret).encode() in everything
    found = keys.authenticate(secret, DEFAULTS)
    assert (found.id, found.name, found.overrides) == (key.id, "alice", {"songs_per_day": 3})
    assert found.quotas(DEFAULTS) == Quotas(requests_per_minute=6, burst=2, songs_per_day=3)
    other, _ = keys.create("bob", "admin")
    assert other != secret and keys.authenticate(other, DEFAULTS).admin


def test_list_revoke_and_unknown_keys(keys):
    alice, a = keys.create("alice")
    _, b = keys.create("bob", "admin")
    assert [(k.id, k.name, k.role, k.revoked_at) for k in keys.list()] == [
        (a.id, "alice", "user", None), (b.id, "bob", "admin", None),
    ]  # fmt: skip
    assert keys.revoke(a.id) and keys.revoke(a.id)  # twice: the same
    assert not keys.revoke("nope")
    revoked = {k.id: k.revoked_at for k in keys.list()}
    assert revoked[a.id] is not None and revoked[b.id] is None
    with pytest.raises(Unauthorized, match="revoked"):
        keys.authenticate(alice, DEFAULTS)
    with pytest.raises(Unauthorized, match="unknown"):
        keys.authenticate("mgk_" + "x" * 43, DEFAULTS)


def test_bad_roles_and_quotas_are_refused_before_anything_is_stored(keys):
    with pytest.raises(ValueError, match="role"):
        keys.create("x", "root")
    with pytest.raises(pydantic.ValidationError, match="burst"):
        keys.create("x", overrides={"burst": 0})
    with pytest.raises(pydantic.ValidationError):
        keys.create("x", overrides={"songs_a_year": 5})
    assert keys.list() == []


def test_the_token_bucket_refills_at_the_keys_rate(keys):
    """6 requests a minute (a token every 10 s), bursts of 2; times given explicitly."""
    secret, _ = keys.create("alice")
    t0 = 1_000_000.0
    keys.authenticate(secret, DEFAULTS, now=t0)
    keys.authenticate(secret, DEFAULTS, now=t0)
    waits = []
    for t in (t0, t0 + 4):  # refused: nothing taken
        with pytest.raises(RateLimited) as limited:
            keys.authenticate(secret, DEFAULTS, now=t)
        waits.append(limited.value.retry_after_s)
    assert waits == pytest.approx([10, 6])
    keys.authenticate(secret, DEFAULTS, now=t0 + 10)  # one token came back
    with pytest.raises(RateLimited):
        keys.authenticate(secret, DEFAULTS, now=t0 + 10)
    keys.authenticate(secret, DEFAULTS, now=t0 + 100)  # idle: a full bucket (2), not 9
    keys.authenticate(secret, DEFAULTS, now=t0 + 100)
    with pytest.raises(RateLimited):
        keys.authenticate(secret, DEFAULTS, now=t0 + 100)
    fast, _ = keys.create("fast", overrides={"requests_per_minute": 600, "burst": 1})
    keys.authenticate(fast, DEFAULTS, now=t0)
    with pytest.raises(RateLimited) as limited:
        keys.authenticate(fast, DEFAULTS, now=t0)
    assert limited.value.retry_after_s == pytest.approx(0.1)  # its own rate, not the default


# -- the command line ----------------------------------------------------------------------------


def musicgen(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MUSICGEN_DATA_DIR")}
    return subprocess.run(
        [sys.executable, "-m", "musicgen.cli", *args], capture_output=True, text=True, cwd=ROOT,
        env={**base, **(env or {})}, timeout=60,
    )  # fmt: skip


def test_the_keys_command_end_to_end(server, tmp_path):
    redis.Redis.from_url(server.url).flushdb()
    env = {"REDIS_URL": server.url}
    assert "keys" in musicgen("--help").stdout
    made = musicgen("keys", "create", "alice", "--songs-per-day", "7", "--json", env=env)
    assert made.returncode == 0, made.stderr
    alice = json.loads(made.stdout)
    assert SECRET.fullmatch(alice["secret"]) and alice["role"] == "user"
    assert alice["quotas"] == {"songs_per_day": 7}
    human = musicgen("keys", "create", "ops", "--admin", env=env)
    assert human.returncode == 0 and "shown only now" in human.stdout
    ops_secret = human.stdout.strip().splitlines()[-1]
    assert SECRET.fullmatch(ops_secret)

    listed = musicgen("keys", "list", "--json", env=env)
    assert [(k["name"], k["role"], k["revoked_at"]) for k in json.loads(listed.stdout)] == [
        ("alice", "user", None), ("ops", "admin", None),
    ]  # fmt: skip
    assert alice["secret"] not in listed.stdout and ops_secret not in listed.stdout
    table = musicgen("keys", "list", env=env).stdout
    assert alice["id"] in table and "songs_per_day=7" in table and "admin" in table

    uploads = LocalStorage(tmp_path / "uploads")

    async def validate(body):
        raise AssertionError("not reached")

    services = Services(
        store=AsyncJobStore.from_url(server.url), validate=validate, dispatch=lambda job_id: None,
        results=LocalStorage(tmp_path / "results"), uploads=uploads, config=ApiConfig(auth=True),
    )  # fmt: skip
    with TestClient(create_api(services)) as http:
        for secret in (alice["secret"], ops_secret):
            assert http.get("/v1/songs", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
        revoked = musicgen("keys", "revoke", alice["id"], env=env)
        assert revoked.returncode == 0, revoked.stderr
        r = http.get("/v1/songs", headers={"Authorization": f"Bearer {alice['secret']}"})
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        assert http.get("/v1/songs", headers={"Authorization": f"Bearer {ops_secret}"}).status_code == 200
    assert "revoked" in musicgen("keys", "list", env=env).stdout

    unknown = musicgen("keys", "revoke", "nope", env=env)
    assert unknown.returncode == 1 and "no API key 'nope'" in unknown.stderr
    bad = musicgen("keys", "create", "x", "--burst", "0", env=env)
    assert bad.returncode == 2 and "--burst" in bad.stderr and "Traceback" not in bad.stderr
    away = musicgen("keys", "list", env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert away.returncode == 1 and "unreachable" in away.stderr and "Traceback" not in away.stderr
    fresh = [musicgen("keys", "secret", env={"REDIS_URL": "redis://127.0.0.1:1/0"}) for _ in range(2)]
    made = [f.stdout.strip() for f in fresh]  # needs no store, stores nothing
    assert all(f.returncode == 0 for f in fresh) and all(SECRET.fullmatch(m) for m in made)
    assert made[0] != made[1]


def test_the_keys_command_finds_the_embedded_redis(tmp_path):
    """No REDIS_URL: the service's embedded Redis under MUSICGEN_DATA_DIR, the running one if the
    service runs (it says where in redis/url), else started on the same data for the command."""
    env = {"MUSICGEN_DATA_DIR": str(tmp_path / "data")}
    made = musicgen("keys", "create", "offline", "--json", env=env)
    assert made.returncode == 0, made.stderr
    assert "not running" in made.stderr
    with EmbeddedRedis(tmp_path / "data" / "redis") as service_redis:  # as the service starts it
        store = KeyStore.from_url(service_redis.url)
        assert [k.name for k in store.list()] == ["offline"]  # kept on disk (append-only file)
        online = musicgen("keys", "create", "online", "--json", env=env)
        assert online.returncode == 0 and "not running" not in online.stderr
        assert [k.name for k in store.list()] == ["offline", "online"]  # written to the running one
        assert store.authenticate(json.loads(online.stdout)["secret"], Quotas()).name == "online"
    assert not (tmp_path / "data" / "redis" / "url").exists()


def test_the_library_cli_imports_no_redis_until_keys_runs():
    code = (
        "import sys; from musicgen import cli; cli.build_parser().parse_args(['models', 'list']); "
        "print('redis' in sys.modules, 'deployments.service.keys' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_keys_from_the_environment_are_registered_once_by_digest(keys, server):
    ops, bot = new_secret(), new_secret()
    entries = keys_from_env(f" ops:admin:{ops},\n  bot:user:{bot}\n")
    assert entries == [("ops", "admin", digest(ops)), ("bot", "user", digest(bot))]
    assert [keys.provision(*e) for e in entries] == [True, True]
    assert [keys.provision(*e) for e in entries] == [False, False]  # a restart adds nothing
    assert keys.authenticate(ops, DEFAULTS).admin and not keys.authenticate(bot, DEFAULTS).admin
    r = redis.Redis.from_url(server.url)
    assert not any(
        ops.encode() in v for k in r.keys("*") if r.type(k) == b"hash" for v in r.hgetall(k).values()
    )
    bot_id = next(k.id for k in keys.list() if k.name == "bot")
    assert keys.revoke(bot_id) and not keys.provision(*entries[1])  # revoked stays revoked
    with pytest.raises(Unauthorized, match="revoked"):
        keys.authenticate(bot, DEFAULTS)
    assert keys_from_env("") == [] and keys_from_env(" , \n") == []


@pytest.mark.parametrize(
    "value", ["ops:admin", "ops:root:{s}", ":user:{s}", "ops:user:mgk_short", "ops:user:{s}:extra", "{s}"]
)
def test_a_malformed_environment_key_is_refused_without_echoing_the_secret(value):
    secret = new_secret()
    with pytest.raises(ValueError, match="MUSICGEN_API_KEYS entry 1 is not name:role:secret") as refused:
        keys_from_env(value.format(s=secret))
    assert secret not in str(refused.value)
