"""Hostile and malformed requests get a 4xx with the service's error body, never a 500 or a stack
trace; every answer carries a request id and the security headers. (Bad song fields are in
conftest.BAD_SUBMISSIONS, run against this API and the Ray Serve app.)"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import redis
from fastapi.testclient import TestClient

from deployments.service.api import create_api
from deployments.service.storage import LocalStorage
from tests.deployments.service.api.conftest import SONG, make_services


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["code"] == code and body["message"] and body["recovery"], body
    return body


def test_unknown_paths_and_methods_answer_the_error_body(service):
    _error(service.get("/v1/nothing-here"), 404, "NOT_FOUND")
    _error(service.get("/v1/songs/../../etc/passwd"), 404, "NOT_FOUND")
    _error(service.get("/v1/songs/%2e%2e%2fetc%2fpasswd/takes/1/audio"), 404, "NOT_FOUND")
    _error(service.get("/v1/songs/" + "a" * 5000), 404, "NOT_FOUND")
    _error(service.delete("/v1/songs"), 405, "METHOD_NOT_ALLOWED")
    _error(service.get("/v1/songs", params={"before": "nan"}), 422, "INVALID_PARAMETER")
    _error(service.get("/v1/songs", params={"before": "inf"}), 422, "INVALID_PARAMETER")
    _error(service.get("/v1/songs", params={"limit": "-1"}), 422, "INVALID_PARAMETER")


def test_bodies_over_the_limit_are_refused_before_they_are_read(service):
    huge = json.dumps({**SONG, "lyrics": "la " * 200_000}).encode()  # 600 KB of JSON
    body = _error(service.post("/v1/songs", content=huge, headers={"Content-Type": "application/json"}),
                  413, "PAYLOAD_TOO_LARGE")  # fmt: skip
    assert body["details"]["limit_bytes"] == 256 * 1024

    def chunks():  # no Content-Length: the limit applies while the body streams
        for _ in range(100):
            yield b"x" * 10_000

    _error(service.post("/v1/songs", content=chunks(), headers={"Content-Type": "application/json"}),
           413, "PAYLOAD_TOO_LARGE")  # fmt: skip
    _error(service.post("/v1/songs", content=b"{not json", headers={"Content-Type": "application/json"}),
           422, "INVALID_PARAMETER")  # fmt: skip
    assert service.store.counts() == (0, 0)  # nothing was accepted on the way


def _raw(
    app, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> tuple[int, dict]:
    """One request straight into the ASGI app: headers exactly as given (HTTP clients fix a bad
    Content-Length before it leaves them)."""
    sent: list[dict] = []

    async def run():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
        await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(payload)


def test_a_content_length_that_is_not_a_number_is_400(server, pipe, tmp_path):
    services, _ = make_services(server.url, pipe, LocalStorage(tmp_path / "r"), LocalStorage(tmp_path / "u"))
    app = create_api(services)
    for path in ("/v1/uploads", "/v1/songs"):
        status, body = _raw(app, "POST", path, [(b"content-length", b"abc")], b"RIFF")
        assert status == 400 and body["error"]["code"] == "BAD_REQUEST", (path, body)
    services.worker_pool.shutdown()


def test_an_unexpected_failure_is_500_internal_with_the_request_id_and_no_trace(
    server, pipe, tmp_path, caplog
):
    redis.Redis.from_url(server.url).flushdb()
    services, _ = make_services(server.url, pipe, LocalStorage(tmp_path / "r"), LocalStorage(tmp_path / "u"))

    async def broken_validator(body):
        raise RuntimeError("secret internals /srv/path")

    services.validate = broken_validator
    with (
        TestClient(create_api(services), raise_server_exceptions=False) as http,
        caplog.at_level(logging.ERROR),
    ):
        r = http.post("/v1/songs", json=SONG, headers={"X-Request-ID": "req-123"})
    body = _error(r, 500, "INTERNAL")
    assert body["details"] == {"request_id": "req-123"} and r.headers["x-request-id"] == "req-123"
    assert "secret internals" not in r.text and "Traceback" not in r.text
    assert any(
        "req-123" in rec.getMessage() and rec.exc_info for rec in caplog.records
    )  # the trace is logged
    services.worker_pool.shutdown()


def test_request_ids_and_security_headers_on_every_answer(service):
    r = service.get("/healthz", headers={"X-Request-ID": "abc-1"})
    assert r.headers["x-request-id"] == "abc-1"
    for bad in ("x" * 65, "has space", "semi;colon"):
        rid = service.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert rid != bad and len(rid) == 32  # replaced, not echoed
    job = service.post("/v1/songs", json=SONG).json()
    for answer in (r, service.get(f"/v1/songs/{job['id']}"), service.get("/v1/nothing")):
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert "content-security-policy" not in service.get("/docs").headers  # Swagger UI loads its assets
    assert (
        "access-control-allow-origin"
        not in service.get("/healthz", headers={"Origin": "https://x.example"}).headers
    )


def test_cors_only_for_the_configured_origins(server, pipe, tmp_path):
    services, _ = make_services(server.url, pipe, LocalStorage(tmp_path / "r"), LocalStorage(tmp_path / "u"),
                                cors_origins=("https://app.example",))  # fmt: skip
    with TestClient(create_api(services)) as http:
        ok = http.options("/v1/songs", headers={"Origin": "https://app.example",
                                                "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        assert ok.headers["x-content-type-options"] == "nosniff"  # the edge middleware wraps CORS too
        other = http.options("/v1/songs", headers={"Origin": "https://evil.example",
                                                   "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert "access-control-allow-origin" not in other.headers
    services.worker_pool.shutdown()


def test_a_take_whose_file_is_gone_is_404_not_500(service, tmp_path):
    job = service.post("/v1/songs", json={**SONG, "num_takes": 1}).json()
    with service.stream("GET", f"/v1/songs/{job['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: succeeded"):
                break
    for f in (tmp_path / "results").rglob("*"):
        if f.is_file():
            f.unlink()
    body = _error(service.get(f"/v1/songs/{job['id']}/takes/1/audio"), 404, "NOT_FOUND")
    assert "no longer stored" in body["message"]
    _error(service.get(f"/v1/songs/{job['id']}/takes/1/audio?format=flac"), 404, "NOT_FOUND")


@pytest.mark.parametrize("header", ["garbage", "1-2-3", "9" * 70])
def test_a_foreign_last_event_id_starts_from_the_job_as_it_is(service, header):
    job = service.post("/v1/songs", json=SONG).json()
    with service.stream("GET", f"/v1/songs/{job['id']}/events", headers={"Last-Event-ID": header}) as r:
        assert r.status_code in (200, 422), r.status_code
        if r.status_code == 422:
            assert json.loads(r.read())["error"]["code"] == "INVALID_PARAMETER"
            return
        for line in r.iter_lines():
            if line.startswith("data: "):
                assert json.loads(line[6:])["id"] == job["id"]
                break
