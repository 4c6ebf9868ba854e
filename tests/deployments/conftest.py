"""Fixtures of the service tests: one embedded Redis and one tiny pipeline per test module."""

from __future__ import annotations

import pytest

from deployments.service.redis_server import EmbeddedRedis

# Submissions the API refuses, as (change to a valid 8 s song, HTTP status, error code): checked on
# the API alone (test_api) and through the Ray Serve proxy (test_serve_app).
BAD_SUBMISSIONS = [
    ({"lyrics": "[00:75.00]bad"}, 422, "INVALID_LYRICS"),
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
    ({"webhook_url": "file:///etc/passwd"}, 422, "INVALID_PARAMETER"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The project's embedded Redis, as users get it without REDIS_URL."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture(scope="module")
def pipe(tiny_model_paths):
    from musicgen.pipeline import SongPipeline

    return SongPipeline.from_pretrained("tiny", device="cpu")


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
    """A local HTTP endpoint recording the webhooks it gets; answers 500 to the first `failures`."""

    def __init__(self, failures: int = 0):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.received: list[tuple[dict, bytes]] = []
        self.failures = failures
        self.got = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                self.send_response(500 if len(receiver.received) <= receiver.failures else 200)
                self.end_headers()
                if len(receiver.received) > receiver.failures:
                    receiver.got.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def payloads(self) -> list[dict]:
        import json

        return [json.loads(body) for _, body in self.received]


@pytest.fixture()
def webhook_receiver():
    receiver = WebhookReceiver()
    yield receiver
    receiver.server.shutdown()
