"""The store's Lua scripts, read once from `lua/*.lua` (package data): each is the prelude of the
schema's constants, `lib.lua`'s shared functions, then its own body. Every transition is one script,
so it is atomic and idempotent."""

from __future__ import annotations

from importlib import resources

from deployments.service.store.records import EVENT_FIELDS
from deployments.service.store.schema import JOB, NOTIFY


def _lua_string(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _prelude() -> str:
    return "\n".join([
        f"local EVENT_FIELDS = {{{', '.join(map(_lua_string, EVENT_FIELDS))}}}",
        f"local NOTIFY = {_lua_string(NOTIFY)}",
        f"local JOB_KEY_PREFIX = {_lua_string(JOB.name(id=''))}",
        "",
    ])  # fmt: skip


def _load() -> dict[str, str]:
    folder = resources.files("deployments.service.store") / "lua"
    files = {f.name.removesuffix(".lua"): f.read_text() for f in folder.iterdir() if f.name.endswith(".lua")}
    head = _prelude() + files.pop("lib")
    return {name: head + body for name, body in sorted(files.items())}


SCRIPTS: dict[str, str] = _load()  # name (the file's, without .lua) -> source
