"""The `musicgen keys` command, and the keys of MUSICGEN_API_KEYS.

The keys themselves (secrets, digests, roles, quotas, the rate limit) and their Redis records are the
store's: deployments/service/store/apikeys.py.

Keys can also come from the environment: MUSICGEN_API_KEYS (`name:role:secret` entries, e.g. from a
Kubernetes Secret, each secret printed by `musicgen keys secret`) are registered by the ingress at
start, by digest, once; revoking one with `musicgen keys revoke` holds across restarts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deployments.service.settings import env
from deployments.service.store import ROLES, SECRET, ApiKey, KeyStore, StoreUnavailable, digest, new_secret

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
    url = explicit or args.redis_url
    if url:
        yield url
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
    except (StoreUnavailable, RuntimeError) as exc:
        print(f"error: the key store is unreachable: {exc}\n  hint: start the service (scripts/serve.sh), "
              "or give its Redis with --redis-url or REDIS_URL", file=sys.stderr)  # fmt: skip
        return 1
