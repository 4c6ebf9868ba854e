"""GET /v1/songs/{id}/takes/{n}/live on a real uvicorn server with the tiny DiffRhythm 2: the take's MP3
streamed while the song is still being written, to several listeners at once, resumed from a byte
offset after a broken connection, and, after the end, the take's stored MP3: the same bytes."""

from __future__ import annotations

import io
import threading
import time

import httpx
import pytest
import redis
import soundfile as sf

from deployments.service.storage import LocalStorage
from musicgen.pipelines import Pipeline
from tests.deployments.service.api.conftest import LiveApi, make_services, wait_done

SONG = {"model": "tiny-2", "lyrics": "[verse]\nHello world\n[chorus]\nGood night", "style_prompt": "folk",
        "duration_s": 20, "steps": 3, "num_takes": 2, "seed": 5, "output_format": "wav"}  # fmt: skip
TICK_S = 0.03  # each DiT call is held this long: the song is written over ~2 s, its audio live after ~0.4 s


@pytest.fixture(scope="module")
def pipe2(offline_hub):
    pipe = Pipeline.from_pretrained("tiny-2", device="cpu")
    forward = pipe.dit.forward

    def slow_forward(*args, **kwargs):
        time.sleep(TICK_S)
        return forward(*args, **kwargs)

    pipe.dit.forward = slow_forward
    return pipe


@pytest.fixture()
def api(server, pipe2, tmp_path):
    redis.Redis.from_url(server.url).flushdb()
    services, store = make_services(server.url, pipe2, LocalStorage(tmp_path / "r"), LocalStorage(tmp_path / "u"),
                                    model="tiny-2", max_queue=10)  # fmt: skip
    with LiveApi(services) as live, httpx.Client(base_url=live.base, timeout=60) as http:
        live.http = http
        yield live
    services.worker_pool.shutdown(wait=True)


class Listener(threading.Thread):
    """Reads a live take to its end (or `limit` bytes), noting the job's status when the first bytes came."""

    def __init__(self, api, job_id: str, take: int = 1, offset: int = 0, limit: int | None = None):
        super().__init__(daemon=True)
        self.api, self.job_id, self.take, self.offset, self.limit = api, job_id, take, offset, limit
        self.data = bytearray()
        self.status_at_first_bytes: str | None = None
        self.response: httpx.Response | None = None

    def run(self) -> None:
        url = f"/v1/songs/{self.job_id}/takes/{self.take}/live"
        with self.api.http.stream("GET", url, params={"offset": self.offset}) as r:
            self.response = r
            for chunk in r.iter_raw():
                if not self.data:
                    self.status_at_first_bytes = self.api.http.get(f"/v1/songs/{self.job_id}").json()[
                        "status"
                    ]
                self.data += chunk
                if self.limit is not None and len(self.data) >= self.limit:
                    return


def test_a_take_is_heard_while_it_is_written_and_is_its_stored_mp3(api):
    job = api.http.post("/v1/songs", json=SONG).json()
    assert job["links"]["live"].endswith(f"/v1/songs/{job['id']}/takes/1/live")
    listeners = [Listener(api, job["id"]), Listener(api, job["id"]), Listener(api, job["id"], take=2)]
    for t in listeners:  # connected while the job is queued or just started
        t.start()
    late = None
    deadline = time.time() + 60
    while not listeners[0].data and time.time() < deadline:
        time.sleep(0.01)
    late = Listener(api, job["id"])  # joins once audio flows: it gets the take from the start
    late.start()
    for t in [*listeners, late]:
        t.join(60)
        assert not t.is_alive()
    assert wait_done(api.http, job["id"])["status"] == "succeeded"
    assert listeners[0].status_at_first_bytes == "running", "the first audio came only after the song ended"
    assert listeners[0].response.headers["content-type"] == "audio/mpeg"
    stored = api.http.get(f"/v1/songs/{job['id']}/takes/1/audio", params={"format": "mp3"}).content
    assert bytes(listeners[0].data) == bytes(listeners[1].data) == bytes(late.data) == stored
    assert bytes(listeners[2].data) == api.http.get(f"/v1/songs/{job['id']}/takes/2/audio?format=mp3").content
    audio, rate = sf.read(io.BytesIO(stored), dtype="float32")
    wav, wav_rate = sf.read(io.BytesIO(api.http.get(f"/v1/songs/{job['id']}/takes/1/audio").content))
    assert rate == wav_rate == 48_000 and wav.shape == (20 * 48_000, 2)
    assert abs(audio.shape[0] - wav.shape[0]) <= 2 * 1152 + 529  # LAME's priming and padding frames
    # after the end: the stored file, with its length, and byte ranges
    after = api.http.get(f"/v1/songs/{job['id']}/takes/1/live")
    assert after.status_code == 200 and after.content == stored
    assert after.headers["content-length"] == str(len(stored))
    rest = api.http.get(f"/v1/songs/{job['id']}/takes/1/live", params={"offset": 1000})
    assert rest.status_code == 206 and rest.content == stored[1000:]


def test_a_broken_connection_resumes_from_its_offset_with_nothing_lost_or_repeated(api):
    job = api.http.post("/v1/songs", json={**SONG, "num_takes": 1, "seed": 11}).json()
    got = bytearray()
    while True:  # hang up after every ~20 KB, come back for the rest while the song is still written
        part = Listener(api, job["id"], offset=len(got), limit=20_000)
        part.run()
        if part.response.status_code == 200:  # still written (from the offset), or the whole file
            assert part.response.headers.get("x-live-offset", "0") == str(len(got))
        elif part.response.status_code == 416:  # finished, and the client has it all
            assert part.response.headers["content-range"] == f"bytes */{len(got)}"
            break
        else:
            assert part.response.status_code == 206  # finished: the stored file from the offset
        got += part.data
    assert wait_done(api.http, job["id"])["status"] == "succeeded"
    assert bytes(got) == api.http.get(f"/v1/songs/{job['id']}/takes/1/audio?format=mp3").content


def test_live_audio_errors(api):
    job = api.http.post("/v1/songs", json={**SONG, "num_takes": 1, "duration_s": 4}).json()
    for n in (0, 2, 99):
        r = api.http.get(f"/v1/songs/{job['id']}/takes/{n}/live")
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND", n
    for bad in ("-1", "x", str(2**41)):
        r = api.http.get(f"/v1/songs/{job['id']}/takes/1/live", params={"offset": bad})
        assert r.status_code == 422 and r.json()["error"]["code"] == "INVALID_PARAMETER", bad
    r = api.http.get("/v1/songs/../../etc/passwd/takes/1/live")
    assert r.status_code == 404
    assert api.http.get(f"/v1/songs/{'0' * 32}/takes/1/live").status_code == 404
    assert wait_done(api.http, job["id"])["status"] == "succeeded"
    canceled = api.http.post("/v1/songs", json={**SONG, "num_takes": 1, "seed": 3}).json()
    api.http.post(f"/v1/songs/{canceled['id']}/cancel")
    assert wait_done(api.http, canceled["id"])["status"] == "canceled"
    r = api.http.get(f"/v1/songs/{canceled['id']}/takes/1/live")
    assert r.status_code == 404 and "canceled" in r.json()["error"]["message"]
    # (GET /v1/models saying which models have live audio: tests/deployments/serve/test_app.py)


def test_the_ingress_serving_a_stream_stops_and_another_one_serves_the_rest(server, pipe2, tmp_path):
    """Two ingress servers on the same store (two replicas); the one streaming a take is stopped
    mid-song (its connections cut), and the client asks the other from the bytes it has: the take
    arrives whole, nothing lost or repeated. (Hard node kills: tests/deployments/serve/test_cluster.py
    kills whole nodes for the event streams; this route keeps no state in the replica either.)"""
    redis.Redis.from_url(server.url).flushdb()
    results, uploads = LocalStorage(tmp_path / "r"), LocalStorage(tmp_path / "u")
    services_a, _ = make_services(server.url, pipe2, results, uploads, model="tiny-2", max_queue=10)
    services_b, _ = make_services(server.url, pipe2, results, uploads, model="tiny-2", max_queue=10)
    first = LiveApi(services_a).__enter__()
    try:
        with LiveApi(services_b) as second, httpx.Client(base_url=first.base, timeout=60) as http_a:
            job = http_a.post("/v1/songs", json={**SONG, "num_takes": 1, "seed": 21}).json()
            got = bytearray()
            with http_a.stream("GET", f"/v1/songs/{job['id']}/takes/1/live") as r:
                for chunk in r.iter_raw():
                    got += chunk
                    if len(got) > 30_000:
                        break
            status = http_a.get(f"/v1/songs/{job['id']}").json()["status"]
            first.__exit__(None, None, None)  # the replica goes away mid-song; the generator goes on
            first = None
            assert status == "running" and got
            with httpx.Client(base_url=second.base, timeout=60) as http_b:
                with http_b.stream(
                    "GET", f"/v1/songs/{job['id']}/takes/1/live", params={"offset": len(got)}
                ) as r:
                    assert r.status_code in (200, 206)
                    for chunk in r.iter_raw():
                        got += chunk
                assert wait_done(http_b, job["id"])["status"] == "succeeded"
                assert bytes(got) == http_b.get(f"/v1/songs/{job['id']}/takes/1/audio?format=mp3").content
    finally:
        if first is not None:
            first.__exit__(None, None, None)
        services_a.worker_pool.shutdown(wait=True)
        services_b.worker_pool.shutdown(wait=True)
