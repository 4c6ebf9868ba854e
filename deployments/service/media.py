"""Audio files at the API's edge: what an upload really is (sniffed from its bytes), byte ranges of a
stored take, and takes converted to another format (once, then kept next to the original)."""

from __future__ import annotations

import re
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

from deployments.service.errors import ServiceError
from deployments.service.storage import Storage

MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "ogg": "audio/ogg"}
OUTPUT_FORMATS = ("wav", "flac", "mp3")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def sniff_audio(head: bytes) -> str | None:
    """The container from the first bytes, whatever the file name or Content-Type claims."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str, size: int) -> tuple[int, int]:
    """[first, last] (inclusive) of a single `bytes=` range over `size` bytes."""
    m = _RANGE.match(header.strip())
    if not m or (m.group(1) == "" and m.group(2) == ""):
        raise RangeNotSatisfiable(header)
    start, end = m.group(1), m.group(2)
    if start == "":
        first, last = max(0, size - int(end)), size - 1
    else:
        first, last = int(start), min(int(end) if end else size - 1, size - 1)
    if first > last or first >= size:
        raise RangeNotSatisfiable(header)
    return first, last


class TakeConverter:
    """Takes in another format, converted once and kept next to the original. Conversions of the same
    target already running in this process are joined rather than repeated; storage writes are
    atomic, so two processes converting at once both leave a whole file."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._running: dict[str, Future] = {}
        self._lock = threading.Lock()

    def target(self, key: str, fmt: str) -> str:
        if fmt not in OUTPUT_FORMATS:
            raise ServiceError(
                "INVALID_PARAMETER", f"format {fmt!r} is not offered",
                recovery=f"use one of: {', '.join(OUTPUT_FORMATS)}", details={"parameter": "format"},
            )  # fmt: skip
        return str(Path(key).with_suffix("." + fmt))

    def convert(self, key: str, fmt: str) -> str:
        """Blocking: the key of the converted take (run it in a thread pool)."""
        target = self.target(key, fmt)
        if self.storage.exists(target):
            return target
        with self._lock:
            running = self._running.get(target)
            if running is None:
                future = self._running[target] = Future()
        if running is not None:
            return running.result()
        try:
            self._convert(key, target, fmt)
            future.set_result(target)
            return target
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._running.pop(target, None)

    def _convert(self, key: str, target: str, fmt: str) -> None:
        from musicgen.audio import read_audio, write_audio

        with self.storage.local_copy(key) as local:
            audio, sr = read_audio(local)
        with tempfile.TemporaryDirectory(prefix="musicgen-convert-") as tmp:
            self.storage.put_file(target, write_audio(Path(tmp) / f"take.{fmt}", audio, sr, fmt))
