"""Where finished audio lives: a local folder by default (one machine, or a shared volume).

Keys are relative paths such as `<job id>/take-1.mp3`. Audio is served from here by the ingress,
never passed through Ray handles (large responses through the proxy are retained in memory).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class LocalStorage:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise ValueError(f"bad storage key {key!r}")
        return p

    def put_file(self, key: str, src: str | Path) -> str:
        """Atomic: readers never see a half-written file."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end] inclusive, as an HTTP range."""
        with open(self.path(key), "rb") as f:
            f.seek(start)
            return f.read(end - start + 1)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)
