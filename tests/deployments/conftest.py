"""Fixtures of the service tests: one embedded Redis and one tiny pipeline per test module."""

from __future__ import annotations

import contextlib
import threading

import pytest
import redis

from deployments.service.redis_server import EmbeddedRedis

# Submissions the API refuses, as (change to a valid 8 s song, HTTP status, error code): checked on
# the API alone (service/api/test_api.py) and through the Ray Serve proxy (serve/test_app.py).
BAD_SUBMISSIONS = [
    ({"lyrics": "[00:75.00]bad"}, 422, "INVALID_LYRICS"),
    ({"lyrics": "la\n" * 400}, 422, "INVALID_LYRICS"),  # 401 lines
    ({"lyrics": "la " * 7000}, 422, "INVALID_PARAMETER"),  # 21,000 characters
    ({"style_prompt": "  "}, 422, "INVALID_PROMPT"),
    ({"style_prompt": None}, 422, "INVALID_PROMPT"),
    ({"num_takes": 9}, 422, "INVALID_PARAMETER"),
    ({"surprise": 1}, 422, "INVALID_PARAMETER"),
    ({"duration_s": 500}, 422, "INVALID_PARAMETER"),
    ({"model": "diffrhythm-1.2-full"}, 422, "INVALID_PARAMETER"),
    ({"reference_audio_id": "0" * 32 + ".wav", "style_prompt": None}, 404, "NOT_FOUND"),
    # ids are checked by pattern before they reach storage
    ({"reference_audio_id": "../../etc/passwd", "style_prompt": None}, 422, "INVALID_PARAMETER"),
    ({"reference_audio_id": "nope.wav", "style_prompt": None}, 422, "INVALID_PARAMETER"),
    ({"edit": {"source_id": "../x", "segments": [[0, 5]]}}, 422, "INVALID_PARAMETER"),
    ({"webhook_url": "file:///etc/passwd"}, 422, "WEBHOOK_URL_REFUSED"),
    ({"webhook_url": "http://169.254.169.254/latest/meta-data/"}, 422, "WEBHOOK_URL_REFUSED"),
    ({"webhook_url": "http://2130706433/"}, 422, "WEBHOOK_URL_REFUSED"),
]

PUBLIC_IP = "93.184.215.14"  # only ever checked by the tests, never connected to
# webhook URLs the service refuses, with a word of the reason; names resolve through `FakeDns()`
REFUSED_WEBHOOK_URLS = [
    ("ftp://public.test/hook", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://public.test/", "scheme"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://127.0.0.1:6379/", "loopback"),
    ("http://localhost:6379/", "loopback"),
    ("http://10.1.2.3/hook", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "private"),  # CGNAT
    ("http://224.0.0.1/", "multicast"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "reserved"),
    ("http://[::1]/", "loopback"),
    ("http://[::]/", "unspecified"),
    ("http://[fc00::1]/", "private"),
    ("http://[fd12:3456::1]/", "private"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "zone"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),  # NAT64 of the metadata address
    ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 of 127.0.0.1
    ("http://2130706433/", "ambiguous"),  # 127.0.0.1 in decimal
    ("http://0x7f000001/", "ambiguous"),
    ("http://0x7f.1/", "ambiguous"),
    ("http://0177.0.0.1/", "ambiguous"),  # octal
    ("http://127.1/", "ambiguous"),
    ("http://0/", "ambiguous"),
    ("http://127.0.0.1./", "ambiguous"),
    ("http://user:pass@public.test/hook", "credentials"),
    ("http://public.test@127.0.0.1/", "credentials"),
    ("http://public.test\\@127.0.0.1/", "credentials"),
    ("http://%31%32%37.0.0.1/", "host name"),
    ("http://public.test:99999/", "port"),
    ("http:///hook", "no host"),
    ("http://private.test/hook", "private"),  # a name that resolves to a private address
    ("http://mixed.test/hook", "loopback"),  # one of its addresses is private
    ("http://nowhere.test/hook", "does not resolve"),
    ("", "scheme"),
]


class FakeDns:
    """An injected resolver (no lookups leave the machine): name -> addresses, changeable mid-test;
    counts lookups. Unknown names fail as getaddrinfo does."""

    def __init__(self, **names: list[str]):
        self.names = {"public.test": [PUBLIC_IP], "private.test": ["10.0.0.7"],
                      "mixed.test": [PUBLIC_IP, "127.0.0.1"], "localhost": ["127.0.0.1", "::1"],
                      **names}  # fmt: skip
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        import socket

        self.lookups.append(host)
        if host.rstrip(".") not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.names[host.rstrip(".")])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The project's embedded Redis, as users get it without REDIS_URL."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture()
def client(server):
    """A client of the embedded Redis, emptied for each test."""
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    return client


class SkewedClock:
    """The `time` module as a host whose clock is `offset_s` off Redis's sees it."""

    def __init__(self, offset_s: float):
        import time

        self.offset_s, self._time = offset_s, time

    def time(self) -> float:
        return self._time.time() + self.offset_s

    def __getattr__(self, name: str):  # monotonic, gmtime, strftime, ...: the real module's
        return getattr(self._time, name)


@pytest.fixture()
def skew_clocks(monkeypatch):
    """`skew_clocks(offset_s)`: from now on, every module of the service reads `time.time()` that far
    off the real clock (and Redis's), as a host whose clock is wrong does; undone after the test."""
    import sys
    import time

    def skew(offset_s: float) -> None:
        for name, module in list(sys.modules.items()):
            clock = getattr(module, "time", None)
            if name.startswith("deployments.") and (clock is time or isinstance(clock, SkewedClock)):
                monkeypatch.setattr(module, "time", SkewedClock(offset_s))

    return skew


@pytest.fixture(scope="module")
def pipe(tiny_model_paths):
    from musicgen.pipelines import Pipeline

    return Pipeline.from_pretrained("tiny", device="cpu")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3-compatible server on loopback (moto's, spoken to over HTTP by boto3) with an empty
    bucket; yields (endpoint url, boto3 client, bucket)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from deployments.service.redis_server import free_port

    port = free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip
    client.create_bucket(Bucket="songs")
    try:
        yield endpoint, client, "songs"
    finally:
        srv.stop()


class WebhookReceiver:
    """A local HTTP endpoint on 127.0.0.1 recording the webhooks it gets (headers, body, arrival time).
    Answers 500 to the first `failures`; `respond(n)` (n = 1 for the first request) may instead
    return (status, headers) and may block (a receiver that hangs)."""

    def __init__(self, failures: int = 0, port: int = 0):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.received: list[tuple[dict, bytes]] = []
        self.times: list[float] = []
        self.failures = failures
        self.respond = None
        self.got = threading.Event()  # set by the first 2xx answer
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                import time

                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    receiver.received.append((dict(self.headers), body))
                    receiver.times.append(time.monotonic())
                    n = len(receiver.received)
                if receiver.respond is not None:
                    status, headers = receiver.respond(n)
                else:
                    status, headers = (500 if n <= receiver.failures else 200), {}
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if 200 <= status < 300:
                    receiver.got.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_port
        self.url = self.url_for("127.0.0.1")
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url_for(self, host: str, path: str = "/hook") -> str:
        return f"http://{host}:{self.port}{path}"

    def payloads(self) -> list[dict]:
        import json

        return [json.loads(body) for _, body in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def webhook_receiver():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


class RunningDeliverer:
    """A WebhookDeliverer on an event loop of its own, in a thread, as on an ingress replica, with its
    own Redis connections. `stop()` cancels its loop wherever it is (a replica that dies)."""

    def __init__(self, redis_url: str, policy, secret: str = "", **options):
        import asyncio
        import threading

        from deployments.service.store import AsyncJobStore
        from deployments.service.webhooks import WebhookDeliverer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.store = AsyncJobStore.from_url(redis_url)
        self.deliverer = WebhookDeliverer(self.store, secret, policy, **{"poll_s": 0.02, **options})
        self.task = asyncio.run_coroutine_threadsafe(self.deliverer.run_forever(), self.loop)

    def stop(self) -> None:
        import asyncio

        self.loop.call_soon_threadsafe(self.task.cancel)
        asyncio.run_coroutine_threadsafe(self.store.aclose(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.deliverer.close()

    def __enter__(self) -> RunningDeliverer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(condition, timeout: float = 20.0, what: str = "condition"):
    """Poll `condition()` until it returns something truthy; that value."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout} s")


@contextlib.contextmanager
def busy_worker(pool):
    """Keep the one worker of `pool` busy until the block ends: jobs submitted inside wait in the queue
    (an event, not a sleep: the test decides when the worker is free)."""
    gate = threading.Event()
    pool.submit(gate.wait, 60)
    try:
        yield
    finally:
        gate.set()


async def eventually(condition, timeout: float = 20.0, what: str = "condition"):
    """`wait_until` on an event loop: awaits `condition()` when it returns an awaitable, and lets the
    loop run between tries."""
    import asyncio
    import inspect
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout} s")


def params(**kw):
    """The SongParams of a short song for the tiny model (the validator's output), with `kw` changed."""
    from deployments.service.params import SongParams
    from musicgen.lyrics.frontend import LyricsFrontEnd
    from musicgen.registry import MODELS

    fe = LyricsFrontEnd.from_assets()
    frames = fe.encode("[00:01.00]Hello there\n[00:03.00]good night", MODELS["tiny"], 8)
    base = dict(model="tiny", duration_s=8, lrc=frames.lrc, tokens=frames.tokens.tolist(),
                song_duration=frames.song_duration, seed=4, num_takes=2, steps=3, output_format="flac",
                style_prompt="calm piano")  # fmt: skip
    return SongParams(**{**base, **kw})
