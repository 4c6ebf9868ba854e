"""Schemathesis against the API's own OpenAPI spec, with API keys on: generated requests (valid and
invalid) to every operation, sent with a user's key, on a real Redis. No answer may be a 5xx, and every answer must match the spec (status code
documented, body valid against its schema, content type). A bounded number of cases per operation
here (MUSICGEN_FUZZ_EXAMPLES, default 25); run at length by hand with a larger number."""

from __future__ import annotations

import os

import hypothesis
import pytest
import redis
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from deployments.service.api import create_api
from deployments.service.settings import Quotas
from deployments.service.storage import LocalStorage
from deployments.service.store import KeyStore
from tests.deployments.service.api.conftest import make_services

EXAMPLES = int(os.environ.get("MUSICGEN_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def api_schema(server, pipe, tmp_path_factory):
    redis.Redis.from_url(server.url).flushdb()
    tmp = tmp_path_factory.mktemp("fuzz")
    services, _ = make_services(server.url, pipe, LocalStorage(tmp / "results"), LocalStorage(tmp / "uploads"),
                                auth=True, quotas=Quotas(requests_per_minute=100_000, burst=100_000))  # fmt: skip
    services.dispatch = lambda job_id: None  # accepted songs stay queued: this tests the API, not the model
    secret, _ = KeyStore.from_url(server.url).create("fuzzer")
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_api(services))
    yield schema, {"Authorization": f"Bearer {secret}"}
    services.worker_pool.shutdown()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _fuzz(operation, mode, headers: dict, cases: dict[str, int], statuses: dict[str, set[int]]) -> None:
    @hypothesis.given(case=operation.as_strategy(mode))
    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
    def run(case):
        cases[f"{mode.value} {operation.label}"] = cases.get(f"{mode.value} {operation.label}", 0) + 1
        response = case.call_and_validate(checks=CHECKS, headers=headers)
        statuses.setdefault(f"{mode.value} {operation.label}", set()).add(response.status_code)

    run()


def test_no_server_error_and_every_answer_matches_the_spec(api_schema):
    schema, headers = api_schema
    cases: dict[str, int] = {}
    statuses: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:  # requests valid by the spec, then invalid ones
        for mode in schemathesis.GenerationMode:
            try:
                _fuzz(operation, mode, headers, cases, statuses)
            except hypothesis.errors.Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label  # nothing to get wrong
    print(f"schemathesis: {sum(cases.values())} cases over {len(cases)} operations", cases)
    assert len({label.split(" ", 1)[1] for label in cases}) == len(operations) >= 11, cases  # all ran
    # the key works: requests valid by the spec are never refused with 401
    assert statuses["positive GET /v1/songs"] == {200}, statuses
    assert not any(401 in codes for label, codes in statuses.items() if label.startswith("positive")), (
        statuses
    )
    assert sum(cases.values()) >= 10 * EXAMPLES  # those with inputs ran many cases each
    # invalid requests for every constrained input (an id in a path is any string: nothing invalid)
    assert {
        "negative POST /v1/songs",
        "negative GET /v1/songs",
        "negative GET /v1/songs/{job_id}/events",
    } <= cases.keys()
