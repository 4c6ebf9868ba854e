"""Fixtures of the API tests: the API's collaborators as the ingress builds them (a runner on one
worker thread as the generator), the app under FastAPI's test client or on a real uvicorn server, and
helpers that follow a job."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from fastapi.testclient import TestClient

from deployments.service.api import ApiConfig, Services, create_api
from deployments.service.netguard import AddressPolicy
from deployments.service.redis_server import free_port
from deployments.service.runner import JobRunner
from deployments.service.storage import LocalStorage, S3Storage
from deployments.service.store import AsyncJobStore, JobStore
from deployments.service.validator import SongValidator
from musicgen.lyrics.frontend import LyricsFrontEnd
from tests.deployments.conftest import FakeDns

SONG = {"lyrics": "[00:01.00]Hello there\n[00:03.00]good night", "style_prompt": "calm piano", "model": "tiny",
        "duration_s": 8, "steps": 3, "num_takes": 2, "seed": 9, "output_format": "wav"}  # fmt: skip


def make_services(
    url: str,
    pipe,
    results,
    uploads,
    *,
    lease_s: float = 5,
    webhook_policy=None,
    model: str = "tiny",
    **config,
) -> tuple[Services, JobStore]:
    """The API's collaborators as the ingress has them, with a runner on one worker thread as the
    generator. Returns (services, the worker's sync store)."""
    store = JobStore.from_url(url, lease_s=lease_s)
    runner = JobRunner(store, pipe, results, uploads, "w1")
    pool = ThreadPoolExecutor(1)
    validator = SongValidator(LyricsFrontEnd.from_assets(), uploads, model, {model}, webhook_policy)

    async def validate(body):
        return await asyncio.to_thread(validator.validate, body)

    services = Services(
        store=AsyncJobStore.from_url(url, lease_s=lease_s), validate=validate,
        dispatch=lambda job_id: pool.submit(runner.run, job_id), results=results, uploads=uploads,
        config=ApiConfig(**{"max_queue": 3, "max_upload_bytes": 3_000_000, **config}),
    )  # fmt: skip
    services.worker_pool = pool
    return services, store


@pytest.fixture()
def service(request, server, pipe, tmp_path):
    """The API on the local-folder storage, or with `indirect` param "s3" on an S3-compatible bucket.
    Webhook hosts resolve through `service.dns` (a FakeDns); the name hooks.test is allow-listed (an
    internal receiver: point it at a local one)."""
    redis.Redis.from_url(server.url).flushdb()
    if getattr(request, "param", "local") == "s3":
        _, s3_client, bucket = request.getfixturevalue("s3")
        prefix = uuid.uuid4().hex[:8]
        results = S3Storage(bucket, f"{prefix}/results", client=s3_client)
        uploads = S3Storage(bucket, f"{prefix}/uploads", client=s3_client)
    else:
        results, uploads = LocalStorage(tmp_path / "results"), LocalStorage(tmp_path / "uploads")
    dns = FakeDns()
    policy = AddressPolicy(["hooks.test"], resolve=dns)
    services, store = make_services(server.url, pipe, results, uploads, webhook_policy=policy)
    with TestClient(create_api(services)) as http:
        http.store, http.pool, http.dns, http.webhook_policy = store, services.worker_pool, dns, policy
        yield http
    services.worker_pool.shutdown(wait=True)


class LiveApi:
    """The app on a real uvicorn server on loopback, its event loop in debug mode: any callback that
    holds the loop longer than `slow_s` is recorded (a blocking call on the event loop)."""

    def __init__(self, services: Services, slow_s: float = 0.1):
        import uvicorn

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.services = services
        self.slow: list[str] = []
        self.server = uvicorn.Server(
            uvicorn.Config(create_api(services), host="127.0.0.1", port=self.port, log_level="warning",
                           lifespan="on", timeout_graceful_shutdown=1)
        )  # fmt: skip
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(True)
        self.loop.slow_callback_duration = slow_s
        self._handler = _Collect(self.slow)
        logging.getLogger("asyncio").addHandler(self._handler)
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True
        )

    def __enter__(self) -> LiveApi:
        # as the ingress does after start-up (deployments/serve/app.py): the objects alive now leave the
        # cycle collector's view, whose full passes over a test session's heap (~0.4 s) would otherwise
        # be counted as the route's blocking time
        gc.collect()
        gc.freeze()
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        gc.unfreeze()
        logging.getLogger("asyncio").removeHandler(self._handler)


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "took" in message and "Executing" in message:
            self.into.append(message)


@pytest.fixture()
def live(server, pipe, tmp_path):
    redis.Redis.from_url(server.url).flushdb()
    services, store = make_services(
        server.url, pipe, LocalStorage(tmp_path / "results"), LocalStorage(tmp_path / "uploads"),
        max_queue=50, sse_keepalive_s=0.5, max_upload_bytes=20_000_000,
    )  # fmt: skip
    with LiveApi(services) as api:
        api.store = store
        yield api
    services.worker_pool.shutdown(wait=True)


def wait_done(http, job_id, timeout=30, headers=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = http.get(f"/v1/songs/{job_id}", headers=headers).json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def sse_events(lines) -> list[dict]:
    """Parse server-sent events: [{"id", "event", "data"}], comments as {"comment": ...}."""
    out, current = [], {}
    for line in lines:
        if line == "":
            if current:
                out.append(current)
            current = {}
        elif line.startswith(":"):
            out.append({"comment": line[1:].strip()})
        else:
            name, _, value = line.partition(": ")
            current[name] = json.loads(value) if name == "data" else value
    return out
