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
