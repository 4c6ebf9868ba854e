"""Every environment variable the library reads, with its meaning and default, in one place.

Each is read when it is asked for, not at import, so a process (or a test) that changes one sees the
change at the next read. Nothing else in `musicgen/` reads the environment (a test checks it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EnvVar:
    name: str
    meaning: str
    default: str  # what applies when the variable is unset or empty, in words

    def get(self) -> str | None:
        """The value, or None when the variable is unset or empty."""
        return os.environ.get(self.name) or None

    def flag(self) -> bool:
        """Set to 1, true, yes or on (any case)."""
        return (self.get() or "").strip().lower() in {"1", "true", "yes", "on"}


CACHE_DIR = EnvVar(
    "MUSICGEN_CACHE_DIR",
    "where model weights and fetched data files are cached",
    "models/cache under the current directory",
)
ASSETS_DIR = EnvVar(
    "MUSICGEN_ASSETS_DIR",
    "a local folder with the official data files (the layout of musicgen/data), copied instead of downloaded",
    "none: the files are downloaded from the official repository",
)
DEBUG = EnvVar(
    "MUSICGEN_DEBUG", "any value: the command line shows tracebacks", "errors are one line and a hint"
)
# huggingface_hub reads it too (when it is imported); the library reads it to refuse downloads itself and
# to say so in its errors, and never writes it
HF_HUB_OFFLINE = EnvVar("HF_HUB_OFFLINE", "1, true, yes or on: never download", "downloads are allowed")

ALL = (CACHE_DIR, ASSETS_DIR, DEBUG, HF_HUB_OFFLINE)


def cache_dir() -> Path:
    return Path(CACHE_DIR.get() or Path.cwd() / "models" / "cache")


def assets_source() -> Path | None:
    value = ASSETS_DIR.get()
    return Path(value) if value else None


def hub_offline() -> bool:
    return HF_HUB_OFFLINE.flag()


def debug() -> bool:
    return DEBUG.get() is not None
