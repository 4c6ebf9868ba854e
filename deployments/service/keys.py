"""API keys: who may call the API, what each caller may use, and the `musicgen keys` command.

A key is a random secret (`mgk_` and 32 random bytes, base64url) shown once, when it is created; the
store keeps only its SHA-256 digest, with the key's id, name, role and quota overrides. Requests send
it as `Authorization: Bearer <secret>`. A `user` key sees only its own jobs and uploads; an `admin`
key sees everyone's. Every key has the service's quotas (settings.Quotas, serve_config.yaml
`quotas:`) unless its record overrides some.

Redis keys (the job store's `mg:` prefix; jobs.py holds the jobs' protocol, the per-key usage and the
quota checks at admission):
- `mg:apikey:{sha256 hex of the secret}` hash: id, name, role, created_at, revoked_at, quotas (JSON:
  this key's overrides) and its request bucket (tokens, tokens_at). No TTL: a revoked key's record
  stays, marked, so that `musicgen keys list` still names it.
- `mg:apikeys` hash: key id -> digest, to list and revoke keys by id.

Keys can also come from the environment: MUSICGEN_API_KEYS (`name:role:secret` entries, e.g. from a
Kubernetes Secret, each secret printed by `musicgen keys secret`) are registered by the ingress at
start, by digest, once; revoking one with `musicgen keys revoke` holds across restarts.

Why no constant-time compare: a request's secret is hashed and its record looked up by the digest;
no secret is compared byte by byte, and how long a lookup takes says nothing about any other secret
(SHA-256 cannot be inverted).

Rate limit: a token bucket per key, in its record, refilled at `requests_per_minute` up to `burst`;
one atomic script per request both authenticates and takes a token.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import secrets
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.service.jobs import PREFIX, AsyncJobStore, JobStore, Steps, _Call, _operation, _Script, _text
from deployments.service.settings import Quotas, env

ROLES = ("user", "admin")
SECRET_PREFIX = "mgk_"
SECRET = re.compile(r"mgk_[A-Za-z0-9_-]{43}")  # the prefix and 32 bytes of base64url
INDEX = PREFIX + "apikeys"


def record_key(digest: str) -> str:
    return f"{PREFIX}apikey:{digest}"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: str
    created_at: float
    revoked_at: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # this key's quotas that differ from the defaults

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def quotas(self, defaults: Quotas) -> Quotas:
        return defaults.model_copy(update=self.overrides)

    @classmethod
    def from_hash(cls, h: Mapping[bytes | str, bytes | str]) -> ApiKey:
        d = {_text(k): _text(v) for k, v in h.items()}
        return cls(
            id=d["id"], name=d["name"], role=d["role"], created_at=float(d["created_at"]),
            revoked_at=float(d["revoked_at"]) if d.get("revoked_at") else None,
            overrides=json.loads(d.get("quotas") or "{}"),
        )  # fmt: skip


class Unauthorized(Exception):
    """No valid key: `reason` says which way (unknown, revoked)."""


class RateLimited(Exception):
    def __init__(self, retry_after_s: float, quotas: dict[str, float]):
        super().__init__(f"rate limited for {retry_after_s:.1f} s")
        self.retry_after_s, self.quotas = retry_after_s, quotas


_CREATE = """
-- KEYS: record, index ; ARGV: id, name, role, created_at, quotas, digest
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'name', ARGV[2], 'role', ARGV[3], 'created_at', ARGV[4],
           'quotas', ARGV[5])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[6])
return 1
"""

_AUTHENTICATE = """
-- KEYS: record ; ARGV: now, requests_per_minute, burst (the service's; the key's own quotas override them)
-- Returns {'unknown'}, {'revoked'}, {'limited', seconds until a token, rate, burst} or {'ok', the record}.
local f = redis.call('HMGET', KEYS[1], 'id', 'revoked_at', 'quotas', 'tokens', 'tokens_at')
if not f[1] then return {'unknown'} end
if f[2] and f[2] ~= '' then return {'revoked'} end
local own = (f[3] and f[3] ~= '') and cjson.decode(f[3]) or {}
local per_minute = tonumber(own['requests_per_minute'] or ARGV[2])
local burst = tonumber(own['burst'] or ARGV[3])
local now = tonumber(ARGV[1])
local tokens = tonumber(f[4]) or burst
local since = math.max(0, now - (tonumber(f[5]) or now))  -- another replica's clock may be behind
tokens = math.min(burst, tokens + since * per_minute / 60)
if tokens < 1 then
  return {'limited', tostring((1 - tokens) * 60 / per_minute), tostring(per_minute), tostring(burst)}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'tokens_at', ARGV[1])
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, 'ok')
return out
"""

_SCRIPTS = {"create_key": _CREATE, "authenticate": _AUTHENTICATE}


class _KeyProtocol:
    """The keys' Redis protocol, written as steps the job store's drivers run (see jobs.py)."""

    def __init__(self, client):
        self._r = client
        self._scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}

    def _drive(self, steps: Steps):
        raise NotImplementedError

    @_operation
    def create(self, name: str, role: str = "user", overrides: Mapping[str, Any] | None = None) -> Steps:
        """A new key: (its secret, to show once, and its record). `overrides`: quotas of this key
        that differ from the service's (checked here: a bad value never reaches the store)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        overrides = dict(overrides or {})
        Quotas(**overrides)  # raises pydantic's ValidationError naming the bad quota
        while True:
            secret = new_secret()
            key = ApiKey(secrets.token_hex(8), name, role, time.time(), overrides=overrides)
            ok = yield _Script(
                "create_key", [record_key(digest(secret)), INDEX],
                [key.id, name, role, key.created_at, json.dumps(overrides), digest(secret)],
            )  # fmt: skip
            if ok:  # (else an id or a secret collided: astronomically rare; draw again)
                return secret, key

    @_operation
    def provision(self, name: str, role: str, key_digest: str) -> Steps:
        """Register a key made elsewhere (MUSICGEN_API_KEYS, e.g. from a Kubernetes Secret) by its
        digest, once: True if added now, False if its record exists (a revoked key stays revoked)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        while True:
            if (yield _Call("exists", (record_key(key_digest),))):
                return False
            key = ApiKey(secrets.token_hex(8), name, role, time.time())
            ok = yield _Script(
                "create_key", [record_key(key_digest), INDEX],
                [key.id, name, role, key.created_at, "{}", key_digest],
            )  # fmt: skip
            if ok:
                return True

    @_operation
    def list(self) -> Steps:
        """Every key, revoked ones too, oldest first."""
        index = yield _Call("hgetall", (INDEX,))
        keys = []
        for digest_ in index.values():
            h = yield _Call("hgetall", (record_key(_text(digest_)),))
            if h:
                keys.append(ApiKey.from_hash(h))
        return sorted(keys, key=lambda k: k.created_at)

    @_operation
    def revoke(self, key_id: str) -> Steps:
        """Refuse the key from now on. False for an unknown id; revoking twice changes nothing."""
        found = yield _Call("hget", (INDEX, key_id))
        if found is None:
            return False
        yield _Call("hsetnx", (record_key(_text(found)), "revoked_at", time.time()))
        return True

    @_operation
    def authenticate(self, secret: str, defaults: Quotas, now: float | None = None) -> Steps:
        """The key whose secret this is, after taking one request from its bucket. Raises
        Unauthorized (unknown or revoked) or RateLimited (with the seconds until the next token)."""
        reply = yield _Script(
            "authenticate", [record_key(digest(secret))],
            [time.time() if now is None else now, defaults.requests_per_minute, defaults.burst],
        )  # fmt: skip
        outcome = _text(reply[0])
        if outcome == "ok":
            fields = reply[1:]
            return ApiKey.from_hash(dict(zip(fields[::2], fields[1::2], strict=True)))
        if outcome == "limited":
            wait, per_minute, burst = (float(_text(x)) for x in reply[1:])
            raise RateLimited(wait, {"requests_per_minute": per_minute, "burst": burst})
        raise Unauthorized(outcome)


class KeyStore(_KeyProtocol):
    """On a blocking client: the `musicgen keys` command."""

    _drive = JobStore._drive  # the job store's drivers: the same steps, run the same way
    _run_step = JobStore._run_step

    @classmethod
    def from_url(cls, url: str) -> KeyStore:
        import redis

        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5))


class AsyncKeyStore(_KeyProtocol):
    """On `redis.asyncio`: the API's. Shares the job store's connection pool."""

    _drive = AsyncJobStore._drive
    _run_step = AsyncJobStore._run_step

    @classmethod
    def sharing(cls, store: AsyncJobStore) -> AsyncKeyStore:
        return cls(store.client)


# --------------------------------------------------------------------------------------------------
# `musicgen keys`: the library's CLI runs this module's `main` (musicgen.cli.PLUGIN_COMMANDS)

_QUOTA_OPTIONS = {  # option -> (Quotas field, type, help)
    "--active-jobs": ("active_jobs", int, "queued + running songs at once"),
    "--queued-jobs": ("queued_jobs", int, "songs waiting in the queue at once"),
    "--songs-per-day": ("songs_per_day", int, "submissions per UTC day"),
    "--audio-s-per-day": ("audio_s_per_day", float, "seconds of audio per UTC day (duration x takes)"),
    "--requests-per-minute": ("requests_per_minute", float, "API requests per minute"),
    "--burst": ("burst", int, "requests at once after an idle spell"),
}


API_KEYS_ENV = "MUSICGEN_API_KEYS"


def keys_from_env(value: str | None = None) -> list[tuple[str, str, str]]:
    """(name, role, SHA-256 digest of the secret) of each key in MUSICGEN_API_KEYS: entries `name:role:secret` separated by
    commas, spaces or new lines (a Kubernetes Secret's value), each secret from `musicgen keys secret`.
    A malformed entry raises ValueError naming it (never the secret), so the app stops at start."""
    raw = env(API_KEYS_ENV) if value is None else value
    out = []
    for n, entry in enumerate(e for e in re.split(r"[\s,]+", raw) if e):
        parts = entry.split(":")
        if len(parts) != 3 or not parts[0] or parts[1] not in ROLES or not SECRET.fullmatch(parts[2]):
            raise ValueError(
                f"{API_KEYS_ENV} entry {n + 1} is not name:role:secret with a role in {ROLES} and a "
                "secret printed by `musicgen keys secret`"
            )
        out.append((parts[0], parts[1], digest(parts[2])))
    return out


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Create, list and revoke API keys of the musicgen service. The store: --redis-url, "
        "else REDIS_URL, else the service's embedded Redis (under MUSICGEN_DATA_DIR, default ./data; "
        "started for the command when the service is not running).",
    )
    parser.add_argument("--redis-url", help="the service's Redis (default: REDIS_URL or the embedded one)")
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="create a key and print its secret (shown this once only)")
    create.add_argument("name", help="who or what the key is for, e.g. 'alice' or 'web-frontend'")
    create.add_argument("--admin", action="store_true", help="sees and cancels every key's jobs")
    quotas = create.add_argument_group("quotas of this key (default: the service's, serve_config.yaml)")
    for option, (_, kind, text) in _QUOTA_OPTIONS.items():
        quotas.add_argument(option, type=kind, help=text)
    create.add_argument("--json", action="store_true", help="print the key as JSON")
    listing = sub.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print the keys as JSON")
    revoke = sub.add_parser("revoke", help="refuse a key from now on (its jobs are kept)")
    revoke.add_argument("id", help="the key's id, as `list` shows it")
    sub.add_parser(
        "secret",
        help=f"print a new secret without storing it: for {API_KEYS_ENV} (name:role:secret), which the "
        "service registers at start (e.g. from a Kubernetes Secret)",
    )
    return parser


@contextlib.contextmanager
def _store_url(explicit: str | None) -> Iterator[str]:
    """The Redis the service uses: given, REDIS_URL, or the embedded one (started here, on the
    service's data folder, when the service is not running)."""
    from deployments.service.redis_server import EmbeddedRedis
    from deployments.service.settings import AppArgs

    args = AppArgs().resolved()
    if explicit or args.redis_url:
        yield explicit or args.redis_url
        return
    folder = Path(args.data_dir) / "redis"
    running = EmbeddedRedis.running_url(folder)
    if running:
        yield running
        return
    print(f"note: the service is not running; using its embedded Redis data in {folder}", file=sys.stderr)
    with EmbeddedRedis(folder) as server:
        yield server.url


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else ""


def _as_json(key: ApiKey) -> dict[str, Any]:
    return {"id": key.id, "name": key.name, "role": key.role, "created_at": key.created_at,
            "revoked_at": key.revoked_at, "quotas": key.overrides}  # fmt: skip


def main(argv: list[str], prog: str = "musicgen keys") -> int:
    import pydantic
    import redis

    args = _parser(prog).parse_args(argv)
    if args.action == "secret":  # needs no store
        print(new_secret())
        return 0
    try:
        with _store_url(args.redis_url) as url:
            store = KeyStore.from_url(url)
            if args.action == "create":
                overrides = {
                    name: value
                    for option, (name, _, _) in _QUOTA_OPTIONS.items()
                    if (value := getattr(args, option[2:].replace("-", "_"))) is not None
                }
                secret, key = store.create(args.name, "admin" if args.admin else "user", overrides)
                if args.json:
                    print(json.dumps({**_as_json(key), "secret": secret}))
                else:
                    print(f"created {key.role} key {key.id} ({key.name})")
                    print("secret (shown only now: store it; the service keeps only its hash):")
                    print(secret)
            elif args.action == "list":
                keys = store.list()
                if args.json:
                    print(json.dumps([_as_json(k) for k in keys]))
                for k in [] if args.json else keys:
                    state = f"revoked {_when(k.revoked_at)}" if k.revoked_at else "active"
                    own = " ".join(f"{n}={v:g}" for n, v in k.overrides.items())
                    print(f"{k.id}  {k.role:5}  {_when(k.created_at)}  {state:31}  {k.name}  {own}".rstrip())
            elif not store.revoke(args.id):
                print(f"error: no API key {args.id!r}\n  hint: `{prog} list` shows the ids", file=sys.stderr)
                return 1
            else:
                print(f"revoked {args.id}")
        return 0
    except pydantic.ValidationError as exc:
        problem = exc.errors()[0]
        print(f"error: --{'-'.join(map(str, problem['loc'])).replace('_', '-')}: {problem['msg']}",
              file=sys.stderr)  # fmt: skip
        return 2
    except (redis.RedisError, RuntimeError) as exc:
        print(f"error: the key store is unreachable: {exc}\n  hint: start the service (scripts/serve.sh), "
              "or give its Redis with --redis-url or REDIS_URL", file=sys.stderr)  # fmt: skip
        return 1
