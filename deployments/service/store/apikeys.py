"""API keys, the Redis side: who may call the API and what each caller may use.

A key is a random secret (`mgk_` and 32 random bytes, base64url) shown once, when it is created; the
store keeps only its SHA-256 digest (`mg:apikey:{digest}`), with the key's id, name, role and quota
overrides, and an index by id (`mg:apikeys`). Requests send it as `Authorization: Bearer <secret>`. A
`user` key sees only its own jobs and uploads; an `admin` key sees everyone's. Every key has the
service's quotas (settings.Quotas, serve_config.yaml `quotas:`) unless its record overrides some.

Why no constant-time compare: a request's secret is hashed and its record looked up by the digest;
no secret is compared byte by byte, and how long a lookup takes says nothing about any other secret
(SHA-256 cannot be inverted).

Rate limit: a token bucket per key, in its record, refilled at `requests_per_minute` up to `burst`;
one atomic script per request both authenticates and takes a token.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio

from deployments.service.settings import Quotas
from deployments.service.store.drivers import AsyncDriver, SyncDriver
from deployments.service.store.records import ApiKey, pairs, text
from deployments.service.store.schema import APIKEYS, apikey_key
from deployments.service.store.steps import Call, OnAsync, OnSync, Script, Steps, operation

ROLES = ("user", "admin")
SECRET_PREFIX = "mgk_"
SECRET = re.compile(r"mgk_[A-Za-z0-9_-]{43}")  # the prefix and 32 bytes of base64url


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


class Unauthorized(Exception):
    """No valid key: `reason` says which way (unknown, revoked)."""


class RateLimited(Exception):
    def __init__(self, retry_after_s: float, quotas: dict[str, float]):
        super().__init__(f"rate limited for {retry_after_s:.1f} s")
        self.retry_after_s, self.quotas = retry_after_s, quotas


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")


class KeyOps:
    @operation
    def create(
        self, name: str, role: str = "user", overrides: Mapping[str, Any] | None = None
    ) -> Steps[tuple[str, ApiKey]]:
        """A new key: (its secret, to show once, and its record). `overrides`: quotas of this key
        that differ from the service's (checked here: a bad value never reaches the store)."""
        _check_role(role)
        own = dict(overrides or {})
        Quotas(**own)  # raises pydantic's ValidationError naming the bad quota
        while True:
            secret = new_secret()
            key = ApiKey(secrets.token_hex(8), name, role, time.time(), overrides=own)
            ok = yield Script(
                "create_key", [apikey_key(digest(secret)), APIKEYS],
                [key.id, name, role, key.created_at, json.dumps(own), digest(secret)],
            )  # fmt: skip
            if ok:  # (else an id or a secret collided: astronomically rare; draw again)
                return secret, key

    @operation
    def provision(self, name: str, role: str, key_digest: str) -> Steps[bool]:
        """Register a key made elsewhere (MUSICGEN_API_KEYS, e.g. from a Kubernetes Secret) by its
        digest, once: True if added now, False if its record exists (a revoked key stays revoked)."""
        _check_role(role)
        while True:
            if (yield Call("exists", (apikey_key(key_digest),))):
                return False
            key = ApiKey(secrets.token_hex(8), name, role, time.time())
            ok = yield Script(
                "create_key", [apikey_key(key_digest), APIKEYS],
                [key.id, name, role, key.created_at, "{}", key_digest],
            )  # fmt: skip
            if ok:
                return True

    @operation
    def list(self) -> Steps[builtins.list[ApiKey]]:
        """Every key, revoked ones too, oldest first."""
        index = yield Call("hgetall", (APIKEYS,))
        keys = []
        for found in index.values():
            h = yield Call("hgetall", (apikey_key(text(found)),))
            if h:
                keys.append(ApiKey.from_hash(h))
        return sorted(keys, key=lambda k: k.created_at)

    @operation
    def revoke(self, key_id: str) -> Steps[bool]:
        """Refuse the key from now on. False for an unknown id; revoking twice changes nothing."""
        found = yield Call("hget", (APIKEYS, key_id))
        if found is None:
            return False
        yield Call("hsetnx", (apikey_key(text(found)), "revoked_at", time.time()))
        return True

    @operation
    def authenticate(self, secret: str, defaults: Quotas, now: float | None = None) -> Steps[ApiKey]:
        """The key whose secret this is, after taking one request from its bucket. Raises
        Unauthorized (unknown or revoked) or RateLimited (with the seconds until the next token)."""
        reply = yield Script(
            "authenticate", [apikey_key(digest(secret))],
            [time.time() if now is None else now, defaults.requests_per_minute, defaults.burst],
        )  # fmt: skip
        outcome = text(reply[0])
        if outcome == "ok":
            return ApiKey.from_hash(pairs(reply[1:]))
        if outcome == "limited":
            wait, per_minute, burst = (float(text(x)) for x in reply[1:])
            raise RateLimited(wait, {"requests_per_minute": per_minute, "burst": burst})
        raise Unauthorized(outcome)


class KeyStore(KeyOps, OnSync):
    """On a blocking client: the `musicgen keys` command."""

    def __init__(self, client: redis.Redis | SyncDriver):
        self.driver: SyncDriver = client if isinstance(client, SyncDriver) else SyncDriver(client)

    @classmethod
    def from_url(cls, url: str) -> KeyStore:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5))


class AsyncKeyStore(KeyOps, OnAsync):
    """On `redis.asyncio`: the API's. Shares the job store's connection pool."""

    def __init__(self, client: redis.asyncio.Redis | AsyncDriver):
        self.driver: AsyncDriver = client if isinstance(client, AsyncDriver) else AsyncDriver(client)

    @classmethod
    def sharing(cls, store: OnAsync) -> AsyncKeyStore:
        """On the connections of another async store (the job store's)."""
        assert isinstance(store.driver, AsyncDriver)
        return cls(store.driver)
