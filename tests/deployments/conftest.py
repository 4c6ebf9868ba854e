"""Fixtures of the service tests: one embedded Redis and one tiny pipeline per test module."""

from __future__ import annotations

import pytest

from deployments.redis_server import EmbeddedRedis


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

    from deployments.redis_server import free_port

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
