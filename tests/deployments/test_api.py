"""The REST API without Ray: FastAPI's test client, a real (embedded) Redis, the tiny model run by the
job runner on a worker thread."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis
import soundfile as sf
from fastapi.testclient import TestClient

from deployments.api import ApiConfig, create_api, sniff_audio
from deployments.jobs import JobStore
from deployments.redis_server import EmbeddedRedis
from deployments.runner import JobRunner
from deployments.storage import LocalStorage, S3Storage
from deployments.validator import SongValidator
from musicgen.lyrics.frontend import LyricsFrontEnd
from tests.deployments.conftest import BAD_SUBMISSIONS

SONG = {"lyrics": "[00:01.00]Hello there\n[00:03.00]good night", "style_prompt": "calm piano", "model": "tiny",
        "duration_s": 8, "steps": 3, "num_takes": 2, "seed": 9, "output_format": "wav"}  # fmt: skip


@pytest.fixture()
def service(request, server, pipe, tmp_path):
    """The API on the local-folder storage, or with `indirect` param "s3" on an S3-compatible bucket."""
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    store = JobStore(client, lease_s=5)
    if getattr(request, "param", "local") == "s3":
        _, s3_client, bucket = request.getfixturevalue("s3")
        prefix = uuid.uuid4().hex[:8]
        results = S3Storage(bucket, f"{prefix}/results", client=s3_client)
        uploads = S3Storage(bucket, f"{prefix}/uploads", client=s3_client)
    else:
        results, uploads = LocalStorage(tmp_path / "results"), LocalStorage(tmp_path / "uploads")
    runner = JobRunner(store, pipe, results, uploads, "w1")
    pool = ThreadPoolExecutor(1)
    validator = SongValidator(LyricsFrontEnd.from_assets(), uploads, "tiny", {"tiny"})
    app = create_api(store, validator.validate, lambda job_id: pool.submit(runner.run, job_id), results, uploads,
                     config=ApiConfig(max_queue=3, max_upload_bytes=3_000_000))  # fmt: skip
    with TestClient(app) as http:
        http.store, http.pool = store, pool
        yield http
    pool.shutdown(wait=True)


def wait_done(http, job_id, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = http.get(f"/v1/songs/{job_id}").json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.parametrize("service", ["local", "s3"], indirect=True)
def test_submit_poll_download(service):
    r = service.post("/v1/songs", json=SONG)
    assert r.status_code == 202
    job = r.json()
    assert job["status"] in ("queued", "running", "succeeded") and set(job["links"]) == {
        "self",
        "events",
        "cancel",
        "audio",
    }
    done = wait_done(service, job["id"])
    assert done["status"] == "succeeded" and [t["seed"] for t in done["takes"]] == [9, 10]
    assert (
        done["parameters"]["lrc"].startswith("[00:01.00]Hello there") and "tokens" not in done["parameters"]
    )
    audio = service.get(f"/v1/songs/{job['id']}/takes/1/audio")
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    assert audio.content[:4] == b"RIFF" and audio.headers["accept-ranges"] == "bytes"
    size = len(audio.content)
    part = service.get(f"/v1/songs/{job['id']}/takes/1/audio", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == audio.content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{size}"
    tail = service.get(f"/v1/songs/{job['id']}/takes/1/audio", headers={"Range": "bytes=-4"})
    assert tail.content == audio.content[-4:]
    bad = service.get(f"/v1/songs/{job['id']}/takes/1/audio", headers={"Range": f"bytes={size}-"})
    assert bad.status_code == 416
    flac = service.get(f"/v1/songs/{job['id']}/takes/2/audio?format=flac")
    assert flac.status_code == 200 and flac.content[:4] == b"fLaC"
    listed = service.get("/v1/songs?limit=5").json()
    assert [j["id"] for j in listed] == [job["id"]]


def test_idempotency_key_returns_the_same_job(service):
    a = service.post("/v1/songs", json=SONG, headers={"Idempotency-Key": "same"}).json()
    b = service.post("/v1/songs", json={**SONG, "seed": 1}, headers={"Idempotency-Key": "same"}).json()
    assert a["id"] == b["id"] and b["parameters"]["seed"] == 9
    wait_done(service, a["id"])


def test_sse_streams_until_the_end(service):
    job = service.post("/v1/songs", json=SONG).json()
    events = []
    with service.stream("GET", f"/v1/songs/{job['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "succeeded"
    assert len(events) >= 1


def test_cancel_queued_job(service, webhook_receiver):
    service.pool.submit(time.sleep, 1.0)  # keep the single worker busy so that the next job waits
    job = service.post("/v1/songs", json={**SONG, "webhook_url": webhook_receiver.url}).json()
    r = service.post(f"/v1/songs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert r.json()["error"]["code"] == "CANCELED"
    assert webhook_receiver.got.wait(10)  # a job that ends in the queue still reaches its webhook
    assert [(p["id"], p["status"]) for p in webhook_receiver.payloads()] == [(job["id"], "canceled")]
    assert service.get(f"/v1/songs/{job['id']}/takes/1/audio").json()["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize("change, status, code", BAD_SUBMISSIONS)
def test_bad_submissions(service, change, status, code):
    r = service.post("/v1/songs", json={**SONG, **change})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["recovery"]
    assert service.store.queue_depth() == 0


def test_queue_full_and_unknown_ids(service):
    service.pool.submit(time.sleep, 1.5)
    ids = [service.post("/v1/songs", json=SONG).json()["id"] for _ in range(3)]
    r = service.post("/v1/songs", json=SONG)
    assert (
        r.status_code == 429
        and r.json()["error"]["code"] == "QUEUE_FULL"
        and int(r.headers["retry-after"]) > 0
    )
    assert service.get("/v1/songs/" + "0" * 32).status_code == 404
    assert service.get("/v1/songs/not-an-id").json()["error"]["code"] == "NOT_FOUND"
    for job_id in ids:
        wait_done(service, job_id)


@pytest.mark.parametrize("service", ["local", "s3"], indirect=True)
def test_uploads_sniff_content_and_limit_size(service, tmp_path):
    path = tmp_path / "ref.wav"
    sf.write(path, np.random.default_rng(0).normal(0, 0.1, (44100 * 11, 2)), 44100)
    r = service.post(
        "/v1/uploads", content=path.read_bytes(), headers={"Content-Type": "application/octet-stream"}
    )
    assert (
        r.status_code == 201 and r.json()["format"] == "wav" and r.json()["duration_s"] == pytest.approx(11)
    )
    job = service.post(
        "/v1/songs", json={**SONG, "style_prompt": None, "reference_audio_id": r.json()["id"]}
    ).json()
    assert wait_done(service, job["id"])["status"] == "succeeded"
    assert (
        service.post("/v1/uploads", content=b"<html>not audio</html>").json()["error"]["code"]
        == "UNSUPPORTED_MEDIA"
    )
    big = service.post("/v1/uploads", content=b"RIFF" + b"\0" * 3_100_000)
    assert big.status_code == 413 and big.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert (
        sniff_audio(b"fLaC\0\0") == "flac"
        and sniff_audio(b"ID3\3") == "mp3"
        and sniff_audio(b"\xff\xfb\x90") == "mp3"
    )


def test_store_down_is_503_and_nothing_accepted_is_lost(tmp_path, pipe):
    srv = EmbeddedRedis(tmp_path / "redis")
    srv.start()
    store = JobStore.from_url(srv.url)
    uploads = LocalStorage(tmp_path / "u")
    validator = SongValidator(LyricsFrontEnd.from_assets(), uploads, "tiny", {"tiny"})
    dispatched = []
    app = create_api(store, validator.validate, dispatched.append, LocalStorage(tmp_path / "r"), uploads)
    with TestClient(app) as http:
        accepted = http.post("/v1/songs", json=SONG).json()["id"]
        srv.stop()
        r = http.post("/v1/songs", json=SONG)
        assert r.status_code == 503 and r.json()["error"]["code"] == "STORE_UNAVAILABLE"
        assert http.get(f"/v1/songs/{accepted}").status_code == 503
        srv.start()
        assert http.get(f"/v1/songs/{accepted}").json()["status"] == "queued"
        assert http.post("/v1/songs", json=SONG).status_code == 202
    srv.stop()
    assert len(dispatched) == 2


def test_metrics_endpoint_reports_the_queue(service):
    service.pool.submit(time.sleep, 1.0)
    job_id = service.post("/v1/songs", json=SONG).json()["id"]
    text = service.get("/metrics").text
    assert "musicgen_queue_depth 1.0" in text and "musicgen_jobs_running" in text
    wait_done(service, job_id)
