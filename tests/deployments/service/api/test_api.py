"""The REST API without Ray: FastAPI's test client (and a real uvicorn server on loopback for event
streams), a real (embedded) Redis, the tiny model run by the job runner on a worker thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import numpy as np
import pytest
import redis
import soundfile as sf
from fastapi.testclient import TestClient

from deployments.service.api import Services, create_api
from deployments.service.media import sniff_audio
from deployments.service.redis_server import EmbeddedRedis
from deployments.service.storage import LocalStorage
from deployments.service.store import AsyncJobStore
from deployments.service.store.schema import EXPIRING, job_key, upload_key
from deployments.service.validator import SongValidator
from musicgen.lyrics.frontend import LyricsFrontEnd
from tests.conftest import ROOT
from tests.deployments.conftest import (
    BAD_SUBMISSIONS,
    PUBLIC_IP,
    REFUSED_WEBHOOK_URLS,
    RunningDeliverer,
    busy_worker,
    wait_until,
)
from tests.deployments.service.api.conftest import SONG, make_services, sse_events, wait_done


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
    assert int(audio.headers["content-length"]) == size
    part = service.get(f"/v1/songs/{job['id']}/takes/1/audio", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == audio.content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{size}"
    tail = service.get(f"/v1/songs/{job['id']}/takes/1/audio", headers={"Range": "bytes=-4"})
    assert tail.content == audio.content[-4:]
    bad = service.get(f"/v1/songs/{job['id']}/takes/1/audio", headers={"Range": f"bytes={size}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{size}"
    flac = service.get(f"/v1/songs/{job['id']}/takes/2/audio?format=flac")
    assert flac.status_code == 200 and flac.content[:4] == b"fLaC"
    mp3 = service.get(f"/v1/songs/{job['id']}/takes/2/audio?format=mp3")
    assert mp3.status_code == 200 and mp3.headers["content-type"] == "audio/mpeg" and len(mp3.content) > 1000
    assert service.get(f"/v1/songs/{job['id']}/takes/2/audio?format=ogg").json()["error"]["code"] == (
        "INVALID_PARAMETER"
    )
    listed = service.get("/v1/songs?limit=5").json()
    assert [j["id"] for j in listed] == [job["id"]]


def test_idempotency_key_returns_the_same_job(service):
    a = service.post("/v1/songs", json=SONG, headers={"Idempotency-Key": "same"}).json()
    b = service.post("/v1/songs", json={**SONG, "seed": 1}, headers={"Idempotency-Key": "same"}).json()
    assert a["id"] == b["id"] and b["parameters"]["seed"] == 9
    wait_done(service, a["id"])


def test_sse_streams_until_the_end(service):
    job = service.post("/v1/songs", json=SONG).json()
    with service.stream("GET", f"/v1/songs/{job['id']}/events") as stream:
        events = [e for e in sse_events(stream.iter_lines()) if "data" in e]
    assert events[-1]["data"]["status"] == "succeeded" and events[-1]["event"] == "succeeded"
    assert len(events[-1]["data"]["takes"]) == 2
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(ids)


def test_cancel_queued_job(service, server, webhook_receiver):
    service.dns.names["hooks.test"] = ["127.0.0.1"]  # the allow-listed internal receiver
    with busy_worker(service.pool):  # so that the job waits in the queue
        job = service.post(
            "/v1/songs", json={**SONG, "webhook_url": webhook_receiver.url_for("hooks.test")}
        ).json()
        r = service.post(f"/v1/songs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert r.json()["error"]["code"] == "CANCELED"
    with RunningDeliverer(server.url, service.webhook_policy):  # as every ingress replica runs one
        assert webhook_receiver.got.wait(10)  # a job that ends in the queue still reaches its webhook
    assert [(p["id"], p["status"]) for p in webhook_receiver.payloads()] == [(job["id"], "canceled")]
    assert webhook_receiver.received[0][0]["Host"] == f"hooks.test:{webhook_receiver.port}"
    assert service.get(f"/v1/songs/{job['id']}/takes/1/audio").json()["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize("url, reason", REFUSED_WEBHOOK_URLS)
def test_refused_webhook_urls(service, url, reason):
    r = service.post("/v1/songs", json={**SONG, "webhook_url": url})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert (
        err["code"] == "WEBHOOK_URL_REFUSED"
        and reason in err["message"]
        and "webhook_allow" in err["recovery"]
    )
    assert err["details"]["parameter"] == "webhook_url" and reason in err["details"]["reason"]
    assert service.store.queue_depth() == 0 and service.get("/v1/songs").json() == []


def test_a_name_public_at_submission_and_private_at_delivery_is_refused(service, server, webhook_receiver):
    """DNS rebinding: flip.test resolves to a public address when the song is submitted, to loopback
    when its webhook is due. The delivery checks again, refuses, and never connects."""
    service.dns.names["flip.test"] = [PUBLIC_IP]
    with busy_worker(service.pool):
        r = service.post("/v1/songs", json={**SONG, "webhook_url": webhook_receiver.url_for("flip.test")})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert service.post(f"/v1/songs/{job_id}/cancel").json()["status"] == "canceled"
    service.dns.names["flip.test"] = ["127.0.0.1"]
    with RunningDeliverer(server.url, service.webhook_policy):
        [letter] = wait_until(service.store.dead_webhooks, what="a dead letter")
    assert (
        letter["id"] == job_id and "refused at delivery" in letter["error"] and "127.0.0.1" in letter["error"]
    )
    assert webhook_receiver.received == []
    assert redis.Redis.from_url(server.url).hget(job_key(job_id), "webhook") == b"failed"


@pytest.mark.parametrize("change, status, code", BAD_SUBMISSIONS)
def test_bad_submissions(service, change, status, code):
    r = service.post("/v1/songs", json={**SONG, **change})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["recovery"]
    assert service.store.queue_depth() == 0


def test_queue_full_and_unknown_ids(service):
    with busy_worker(service.pool):
        ids = [service.post("/v1/songs", json=SONG).json()["id"] for _ in range(3)]
        r = service.post("/v1/songs", json=SONG)
    assert (
        r.status_code == 429
        and r.json()["error"]["code"] == "QUEUE_FULL"
        and int(r.headers["retry-after"]) > 0
    )
    assert service.get("/v1/songs/" + "0" * 32).status_code == 404
    assert service.get("/v1/songs/not-an-id").json()["error"]["code"] == "NOT_FOUND"
    assert service.get("/v1/songs/../../etc/passwd/events").status_code == 404
    assert service.get("/v1/songs/" + "0" * 32 + "/events").json()["error"]["code"] == "NOT_FOUND"
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
    assert service.post("/v1/uploads", content=b"RIFF\0\0\0\0WAVEjunk").json()["error"]["code"] == (
        "UNSUPPORTED_MEDIA"
    )  # looks like a WAV, does not decode
    big = service.post("/v1/uploads", content=b"RIFF" + b"\0" * 3_100_000)
    assert big.status_code == 413 and big.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(40):
            yield b"\0" * 100_000

    streamed = service.post("/v1/uploads", content=chunks())
    assert streamed.status_code == 413, streamed.text
    assert (
        sniff_audio(b"fLaC\0\0") == "flac"
        and sniff_audio(b"ID3\3") == "mp3"
        and sniff_audio(b"\xff\xfb\x90") == "mp3"
    )


def test_an_upload_deleted_by_retention_is_gone_with_its_record(service, server, tmp_path):
    """When the sweep deletes an upload's file, its record goes too: GET answers 404 as for an upload
    that never was, and no record is left behind."""
    from deployments.service.retention import sweep_expired_files

    path = tmp_path / "ref.wav"
    sf.write(path, np.zeros((44100 * 2, 2)), 44100)
    upload_id = service.post("/v1/uploads", content=path.read_bytes()).json()["id"]
    assert service.get(f"/v1/uploads/{upload_id}").status_code == 200
    client = redis.Redis.from_url(server.url)
    client.zadd(EXPIRING, {f"uploads:{upload_id}": 0})  # its retention period is over
    services = service.app.state.services

    async def sweep():
        store = AsyncJobStore.from_url(server.url)
        try:
            return await sweep_expired_files(store, services.results, services.uploads)
        finally:
            await store.aclose()

    assert asyncio.run(sweep()) == [("uploads", upload_id)] and not services.uploads.exists(upload_id)
    gone, never = service.get(f"/v1/uploads/{upload_id}"), service.get("/v1/uploads/" + "0" * 32 + ".wav")
    assert gone.status_code == never.status_code == 404
    assert gone.json() == json.loads(never.text.replace("0" * 32 + ".wav", upload_id))
    assert not client.exists(upload_key(upload_id))


def test_store_down_is_503_and_nothing_accepted_is_lost(tmp_path, pipe):
    srv = EmbeddedRedis(tmp_path / "redis")
    srv.start()
    uploads = LocalStorage(tmp_path / "u")
    validator = SongValidator(LyricsFrontEnd.from_assets(), uploads, "tiny", {"tiny"})
    dispatched = []

    async def validate(body):
        return validator.validate(body)

    services = Services(store=AsyncJobStore.from_url(srv.url), validate=validate, dispatch=dispatched.append,
                        results=LocalStorage(tmp_path / "r"), uploads=uploads)  # fmt: skip
    with TestClient(create_api(services)) as http:
        accepted = http.post("/v1/songs", json=SONG).json()["id"]
        srv.stop()
        r = http.post("/v1/songs", json=SONG)
        assert r.status_code == 503 and r.json()["error"]["code"] == "STORE_UNAVAILABLE"
        assert http.get(f"/v1/songs/{accepted}").status_code == 503
        assert http.get("/readyz").status_code == 503
        srv.start()
        assert http.get(f"/v1/songs/{accepted}").json()["status"] == "queued"
        assert http.post("/v1/songs", json=SONG).status_code == 202
    srv.stop()
    assert len(dispatched) == 2


def test_metrics_endpoint_reports_the_queue(service):
    with busy_worker(service.pool):
        job_id = service.post("/v1/songs", json=SONG).json()["id"]
        text = service.get("/metrics").text
    assert "musicgen_queue_depth 1.0" in text and "musicgen_jobs_running" in text
    assert "musicgen_event_listeners 0.0" in text
    wait_done(service, job_id)


def test_routes_and_their_dependencies_run_on_the_event_loop(service):
    """FastAPI runs a plain `def` endpoint or dependency on a thread pool: a thread hop per request,
    and anyio's hop walks every task of the loop (thousands with open event streams). None here."""
    import inspect

    from fastapi.routing import APIRoute

    from deployments.service.api import health, models, songs, uploads

    def calls(dependant):
        yield dependant.call
        for sub in dependant.dependencies:
            yield from calls(sub)

    def is_async(fn):  # a function, or an object with an async __call__ (the bearer scheme)
        return inspect.iscoroutinefunction(fn if inspect.isroutine(fn) else type(fn).__call__)

    routes = [r for m in (songs, uploads, models, health) for r in m.router.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 11
    for route in routes:
        for fn in calls(route.dependant):
            assert is_async(fn), f"{route.path}: {getattr(fn, '__qualname__', fn)} is not async"


def test_openapi_spec_names_every_route(service):
    spec = service.get("/openapi.json").json()
    assert set(spec["paths"]) >= {
        "/v1/songs", "/v1/songs/{job_id}", "/v1/songs/{job_id}/cancel", "/v1/songs/{job_id}/events",
        "/v1/songs/{job_id}/takes/{n}/audio", "/v1/songs/{job_id}/takes/{n}/live", "/v1/uploads", "/v1/models",
        "/healthz", "/readyz", "/metrics", "/v1/lyrics/timing",
    }  # fmt: skip
    assert spec["paths"]["/v1/songs"]["post"]["responses"]["429"]


def test_lyrics_timing_shows_auto_timing_and_lyrics_errors_on_their_line(service):
    plain = service.post("/v1/lyrics/timing", json={"lyrics": "[Verse]\nHello world\nGood night moon",
                                                     "duration_s": 20})  # fmt: skip
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["model"] == "tiny" and body["duration_s"] == 20
    assert [line["text"] for line in body["lines"]] == ["Hello world", "Good night moon"]
    times = [line["time_s"] for line in body["lines"]]
    assert times == sorted(times) and 0 <= times[0] < times[1] < 20
    assert body["lrc"].splitlines()[0].endswith("]Hello world")
    kept = service.post("/v1/lyrics/timing", json={"lyrics": "[00:01.50]one\n[00:04.25]two"}).json()
    assert [(x["time_s"], x["text"]) for x in kept["lines"]] == [(1.5, "one"), (4.25, "two")]
    bad = service.post("/v1/lyrics/timing", json={"lyrics": "[00:01.00]fine\n[00:75.00]bad"})
    assert bad.status_code == 422
    err = bad.json()["error"]
    assert err["code"] == "INVALID_LYRICS" and err["details"]["line"] == 2 and err["recovery"]
    too_long = service.post("/v1/lyrics/timing", json={"lyrics": "x", "duration_s": 999})
    assert too_long.status_code == 422 and too_long.json()["error"]["details"]["parameter"] == "duration_s"
    extra = service.post("/v1/lyrics/timing", json={"lyrics": "x", "style_prompt": "no such field here"})
    assert extra.status_code == 422 and extra.json()["error"]["code"] == "INVALID_PARAMETER"
    assert service.get("/v1/songs").json() == []  # nothing was queued


def test_the_web_ui_is_served_with_its_own_content_security_policy(server, pipe, tmp_path):
    services, _ = make_services(server.url, pipe, LocalStorage(tmp_path / "r"), LocalStorage(tmp_path / "u"),
                                ui_dir=str(ROOT / "ui"))  # fmt: skip
    with TestClient(create_api(services)) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
        assert http.get("/ui/js/app.js").headers["content-type"].startswith("text/javascript")
        assert http.get("/ui/official/eg_en.lrc").text.startswith("[00:10.00]")
        assert "default-src 'none'" in http.get("/healthz").headers["content-security-policy"]  # API: none
        for sneaky in ("/ui/../pyproject.toml", "/ui/%2e%2e/pyproject.toml", "/ui/..%2fpyproject.toml",
                       "/ui//etc/passwd", "/ui/js/../../serve_config.yaml"):  # fmt: skip
            r = http.get(sneaky)
            assert r.status_code == 404 and "applications" not in r.text and "[project]" not in r.text, sneaky
    services.worker_pool.shutdown(wait=True)
    missing, _ = make_services(server.url, pipe, LocalStorage(tmp_path / "r"), LocalStorage(tmp_path / "u"),
                               ui_dir=str(tmp_path / "nowhere"))  # fmt: skip
    with TestClient(create_api(missing)) as http:
        r = http.get("/")
        assert r.status_code == 404 and "MUSICGEN_UI_DIR" in r.json()["error"]["recovery"]
    missing.worker_pool.shutdown(wait=True)


# -- event streams on a real server -------------------------------------------------------------


async def _follow(client: httpx.AsyncClient, job_id: str, headers=None, until_final=True) -> list[dict]:
    events = []
    async with client.stream("GET", f"/v1/songs/{job_id}/events", headers=headers or {}) as r:
        assert r.status_code == 200, await r.aread()
        lines = []
        async for line in r.aiter_lines():
            lines.append(line)
            if line == "" and lines:
                events.extend(sse_events(lines))
                lines = []
                if until_final and events and events[-1].get("event") in ("succeeded", "failed", "canceled"):
                    break
    return events


def test_many_listeners_share_one_subscription(live, server):
    """200 event streams on one job: one Redis subscription serves them all and every stream sees the
    job to its end."""
    admin = redis.Redis.from_url(server.url)

    gate = threading.Event()
    live.services.worker_pool.submit(gate.wait, 60)  # the job waits in the queue while listeners arrive

    async def scenario():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=live.base, timeout=60, limits=limits) as client:
            job = (await client.post("/v1/songs", json={**SONG, "steps": 200, "duration_s": 30})).json()
            followers = [asyncio.create_task(_follow(client, job["id"])) for _ in range(200)]
            deadline = time.time() + 30
            while live.services.hub.listeners < 200:
                assert time.time() < deadline, live.services.hub.listeners
                await asyncio.sleep(0.05)
            subscribers = await asyncio.to_thread(admin.pubsub_numsub, "mg:notify")
            clients = await asyncio.to_thread(admin.client_list)
            gate.set()
            return job, await asyncio.gather(*followers), subscribers, clients

    job, streams, subscribers, clients = asyncio.run(scenario())
    assert subscribers == [(b"mg:notify", 1)]
    assert sum(1 for c in clients if c.get("sub") not in ("0", None)) == 1  # one pub/sub connection
    assert len(clients) <= 32 + 8  # the listeners hold no connection each: the ingress's pool is bounded
    for events in streams:
        data = [e for e in events if "data" in e]
        assert data[-1]["data"]["status"] == "succeeded" and data[-1]["data"]["takes"]
    steps = {e["data"]["step"] for e in streams[0] if "data" in e and e["data"]["step"]}
    assert len(steps) >= 2  # progress arrived while sampling, not only the end
    assert live.services.hub.listeners == 0  # every stream unregistered when it ended


def test_no_route_blocks_the_event_loop(live, tmp_path):
    """Every route once, with work that would hold the loop for long if done on it (reading a 30 s
    upload, converting a 60 s take to MP3 and FLAC: ~0.3 s each, streaming it): no loop callback takes
    100 ms (the worker's thread shares the GIL, so shorter thresholds measure it, not the loop)."""
    live.loop.slow_callback_duration = 0.1
    ref = tmp_path / "ref.wav"
    sf.write(ref, np.random.default_rng(1).normal(0, 0.1, (44100 * 30, 2)), 44100)
    song = {**SONG, "duration_s": 60, "num_takes": 1}
    with httpx.Client(base_url=live.base, timeout=60) as http:
        upload = http.post("/v1/uploads", content=ref.read_bytes())
        assert upload.status_code == 201
        job = http.post(
            "/v1/songs", json={**song, "style_prompt": None, "reference_audio_id": upload.json()["id"]}
        )
        with http.stream("GET", f"/v1/songs/{job.json()['id']}/events") as stream:
            events = [e for e in sse_events(stream.iter_lines()) if "data" in e]
        assert events[-1]["data"]["status"] == "succeeded"
        url = f"/v1/songs/{job.json()['id']}/takes/1/audio"
        for fmt in ("mp3", "flac"):
            assert http.get(f"{url}?format={fmt}").status_code == 200
        assert http.get(url, headers={"Range": "bytes=0-99"}).status_code == 206
        for path in ("/v1/songs", f"/v1/songs/{job.json()['id']}", "/readyz", "/metrics", "/v1/models"):
            assert http.get(path).status_code == 200, path
    assert live.slow == [], live.slow


def test_last_event_id_resumes_and_a_finished_stream_says_204(live):
    async def scenario():
        async with httpx.AsyncClient(base_url=live.base, timeout=60) as client:
            job = (await client.post("/v1/songs", json={**SONG, "steps": 30})).json()
            # read two events, drop the connection
            seen = []
            async with client.stream("GET", f"/v1/songs/{job['id']}/events") as r:
                lines = []
                async for line in r.aiter_lines():
                    lines.append(line)
                    if line == "":
                        seen = [e for e in sse_events(lines) if "data" in e]
                        if len(seen) >= 2:
                            break
            resumed = await _follow(client, job["id"], headers={"Last-Event-ID": seen[-1]["id"]})
            full = await client.get(f"/v1/songs/{job['id']}")
            after_end = await client.get(
                f"/v1/songs/{job['id']}/events", headers={"Last-Event-ID": resumed[-1]["id"]}
            )
            replay = await _follow(client, job["id"], headers={"Last-Event-ID": "0-0"})
            return seen, resumed, full.json(), after_end, replay

    seen, resumed, job, after_end, replay = asyncio.run(scenario())
    resumed = [e for e in resumed if "data" in e]
    order = [tuple(map(int, e["id"].split("-"))) for e in seen + resumed]
    assert order == sorted(order) and len(set(order)) == len(order)  # nothing twice, nothing backwards
    assert resumed[-1]["data"]["status"] == "succeeded" and resumed[-1]["data"] == {**job, "eta_s": None}
    assert after_end.status_code == 204  # the client saw the end: EventSource stops reconnecting
    replayed = [e for e in replay if "data" in e]
    assert [e["data"]["status"] for e in replayed][0] == "queued"  # the whole history from the start
    assert replayed[-1]["id"] == resumed[-1]["id"]


def test_queued_listeners_see_their_position_move_and_keepalives(live):
    """Two jobs queued behind a busy worker: the second's stream shows its position moving up when
    the first starts, and an idle stream gets keep-alive comments."""

    async def scenario():
        async with httpx.AsyncClient(base_url=live.base, timeout=60) as client:
            live.services.worker_pool.submit(time.sleep, 2.0)
            first = (await client.post("/v1/songs", json={**SONG, "steps": 200, "duration_s": 30})).json()
            second = (await client.post("/v1/songs", json=SONG)).json()
            return await _follow(client, second["id"]), first

    events, _ = asyncio.run(scenario())
    positions = [
        e["data"]["queue_position"] for e in events if "data" in e and e["data"]["status"] == "queued"
    ]
    assert positions[0] == 1 and 0 in positions, positions
    assert any(e.get("comment") == "keep-alive" for e in events)
    assert [e for e in events if "data" in e][-1]["data"]["status"] == "succeeded"


def test_diffrhythm_2_through_the_api(server, tmp_path, offline_hub):
    """The same API for the second generation: section-tag lyrics, events, audio of the requested length
    at 48 kHz in two channels; edits refused; LRC timestamps dropped with a warning."""
    import io

    import soundfile as sf

    from musicgen.pipelines import Pipeline

    redis.Redis.from_url(server.url).flushdb()
    pipe2 = Pipeline.from_pretrained("tiny-2", device="cpu")
    services, _ = make_services(server.url, pipe2, LocalStorage(tmp_path / "r"), LocalStorage(tmp_path / "u"),
                                model="tiny-2")  # fmt: skip
    with TestClient(create_api(services)) as http:
        song = {"model": "tiny-2", "lyrics": "[verse]\n[00:01.00]Hello world\n[chorus]\nGood night",
                "style_prompt": "folk", "duration_s": 4, "steps": 3, "num_takes": 2, "output_format": "wav"}  # fmt: skip
        job = http.post("/v1/songs", json=song)
        assert job.status_code == 202, job.text
        body = wait_done(http, job.json()["id"])
        assert body["status"] == "succeeded", body
        assert body["parameters"]["lrc"].splitlines() == ["[verse]", "Hello world", "[chorus]", "Good night"]
        assert any("timestamps were removed" in w for w in body["warnings"])
        assert [t["duration_s"] for t in body["takes"]] == [4.0, 4.0]
        for take in body["takes"]:
            audio, rate = sf.read(io.BytesIO(http.get(take["audio_url"]).content))
            assert rate == 48000 and audio.shape == (4 * 48000, 2)
        events = sse_events(http.get(f"/v1/songs/{body['id']}/events").text.splitlines())
        assert events[-1]["event"] == "succeeded"
        defaults = http.post("/v1/songs", json={k: v for k, v in song.items() if k not in ("steps",)})
        assert wait_done(http, defaults.json()["id"])["parameters"]["steps"] == 16  # the model's own default
        wav = io.BytesIO()
        sf.write(wav, np.zeros((48000, 2), dtype=np.float32), 48000, format="WAV")
        source = http.post("/v1/uploads", content=wav.getvalue()).json()["id"]
        edit = http.post("/v1/songs", json={**song, "edit": {"source_id": source, "segments": [[0, 1]]}})
        assert edit.status_code == 422 and edit.json()["error"]["details"]["parameter"] == "edit"
        assert "cannot edit" in edit.json()["error"]["message"]
        timing = http.post(
            "/v1/lyrics/timing", json={"model": "tiny-2", "lyrics": "[verse]\nHello", "duration_s": 4}
        )
        assert timing.status_code == 200 and timing.json()["lrc"] == "[verse]\nHello"
    services.worker_pool.shutdown(wait=True)


def test_a_song_too_big_for_every_generators_cache_is_refused_and_not_queued(server, pipe, tmp_path):
    """POST /v1/songs asks `fits` (the ingress: Readiness.check_fits over the generators' reports)
    after validating: a refusal is a 507 OUT_OF_MEMORY with a hint, and no job exists afterwards."""
    from deployments.service.readiness import Readiness

    redis.Redis.from_url(server.url).flushdb()
    services, store = make_services(
        server.url, pipe, LocalStorage(tmp_path / "r"), LocalStorage(tmp_path / "u")
    )
    engine = {"budget_bytes": 1_000, "token_bytes": 1_000, "block_size": 10}  # not one token's worth
    store.put_generator_status("g:1", {"loaded": True, "model": "tiny", "error": None, "engine": engine})
    services.fits = Readiness(services.store, ["tiny"], scales_to_zero=False).check_fits
    with TestClient(create_api(services)) as http:
        r = http.post("/v1/songs", json=SONG)
        assert r.status_code == 507, r.text
        err = r.json()["error"]
        assert err["code"] == "OUT_OF_MEMORY" and "shorter song" in err["recovery"]
        assert http.get("/v1/songs").json() == [] and store.queue_depth() == 0
    services.worker_pool.shutdown(wait=True)
