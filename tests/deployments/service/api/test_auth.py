"""API keys on the REST API (auth on), against the embedded Redis: 401s, what stays open, what one key
may see of another's jobs and uploads (nothing; an admin key: everything), idempotency per key, each
quota and the rate limit with their Retry-After, and quotas holding under concurrent submissions."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
import redis
import soundfile as sf
from fastapi.testclient import TestClient

from deployments.service.api import create_api
from deployments.service.api.songs import quota_error
from deployments.service.settings import Quotas
from deployments.service.storage import LocalStorage
from deployments.service.store import JobStore, KeyStore, QuotaExceeded, utc_day
from tests.deployments.service.api.conftest import SONG, LiveApi, make_services, sse_events, wait_done

SECONDS_PER_JOB = 45.0  # the queue's ETA per song, which Retry-After of the jobs-at-once quotas uses
QUOTAS = Quotas(requests_per_minute=600, burst=200)  # the service's defaults in these tests
MISSING_JOB = "f" * 32


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


class Keyed:
    """The API with auth on, and keys: alice and bob (users) and root (admin). `as_(name)` is a client
    sending that key; `gate` holds the single worker so that jobs stay queued until it is set."""

    def __init__(self, http: TestClient, store: JobStore, services, keys: KeyStore):
        self.http, self.store, self.services, self.keys = http, store, services, keys
        self.secrets: dict[str, str] = {}
        self.ids: dict[str, str] = {}
        self.gate = threading.Event()

    def add_key(self, name: str, role: str = "user", **overrides) -> str:
        secret, key = self.keys.create(name, role, overrides)
        self.secrets[name], self.ids[name] = secret, key.id
        return secret

    def hold_worker(self) -> None:
        self.services.worker_pool.submit(self.gate.wait, 60)

    def release_worker(self) -> None:
        """Let the worker go on; the songs still queued are canceled first (nothing to wait for)."""
        release(self.store, self.gate)

    def get(self, who: str, path: str, **kw) -> httpx.Response:
        return self.http.get(path, headers=bearer(self.secrets[who]), **kw)

    def post(self, who: str, path: str, **kw) -> httpx.Response:
        headers = {**bearer(self.secrets[who]), **kw.pop("headers", {})}
        return self.http.post(path, headers=headers, **kw)

    def submit(self, who: str, song: dict | None = None, **kw) -> httpx.Response:
        return self.post(who, "/v1/songs", json=song or SONG, **kw)


@pytest.fixture()
def keyed(server, pipe, tmp_path):
    redis.Redis.from_url(server.url).flushdb()
    services, store = make_services(
        server.url, pipe, LocalStorage(tmp_path / "results"), LocalStorage(tmp_path / "uploads"),
        auth=True, quotas=QUOTAS, max_queue=50, seconds_per_job_estimate=SECONDS_PER_JOB,
        max_upload_bytes=20_000_000,
    )  # fmt: skip
    with TestClient(create_api(services)) as http:
        api = Keyed(http, store, services, KeyStore.from_url(server.url))
        for name, role in (("alice", "user"), ("bob", "user"), ("root", "admin")):
            api.add_key(name, role)
        try:
            yield api
        finally:
            api.release_worker()
    services.worker_pool.shutdown(wait=True)


def release(store: JobStore, gate: threading.Event) -> None:
    for job_id in store.queued_ids():
        store.cancel(job_id)
    gate.set()


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["recovery"], error
    return error


# -- who may call -----------------------------------------------------------------------------------


def test_requests_without_a_valid_key_get_401(keyed):
    revoked = keyed.add_key("carol")
    assert keyed.keys.revoke(keyed.ids["carol"])
    unknown = "mgk_" + "A" * 43
    cases = {
        "missing": {},
        "not bearer": {"Authorization": f"Basic {keyed.secrets['alice']}"},
        "no token": {"Authorization": "Bearer"},
        "malformed token": {"Authorization": "Bearer not-a-key"},
        "unknown key": bearer(unknown),
        "revoked key": bearer(revoked),
    }
    messages = {}
    for case, headers in cases.items():
        r = keyed.http.post("/v1/songs", json=SONG, headers=headers)
        error = assert_error(r, 401, "UNAUTHORIZED")
        assert r.headers["www-authenticate"].startswith("Bearer"), case
        assert "musicgen keys create" in error["recovery"]
        messages[case] = error["message"]
    assert "needs a key" in messages["missing"] and "malformed" in messages["malformed token"]
    assert "revoked" in messages["revoked key"] and "not a key" in messages["unknown key"]
    assert keyed.store.queue_depth() == 0  # nothing was accepted
    assert keyed.get("alice", "/v1/songs").status_code == 200  # the same request with a good key


def test_every_v1_route_needs_a_key_and_the_probes_and_docs_stay_open(keyed):
    paths = keyed.http.get("/openapi.json").json()["paths"]
    v1 = [(method, path) for path, ops in paths.items() if path.startswith("/v1/") for method in ops]
    assert len(v1) >= 9
    for method, path in v1:
        concrete = path.replace("{job_id}", MISSING_JOB).replace("{n}", "1").replace("{upload_id}", "x.wav")
        assert_error(keyed.http.request(method.upper(), concrete), 401, "UNAUTHORIZED")
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert keyed.http.get(path).status_code == 200, path


def test_the_openapi_spec_declares_the_bearer_scheme(keyed):
    spec = keyed.http.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert [(s["type"], s["scheme"]) for s in schemes.values()] == [("http", "bearer")]
    name = next(iter(schemes))
    assert spec["paths"]["/v1/songs"]["post"]["security"] == [{name: []}]
    assert spec["paths"]["/v1/uploads/{upload_id}"]["get"]["security"] == [{name: []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert "security" not in spec["paths"]["/metrics"]["get"]


# -- what a key sees --------------------------------------------------------------------------------


def test_a_key_sees_lists_cancels_follows_and_downloads_only_its_own_jobs(keyed):
    keyed.hold_worker()
    mine = keyed.submit("alice").json()["id"]
    theirs = keyed.submit("bob").json()["id"]
    missing = assert_error(keyed.get("bob", f"/v1/songs/{MISSING_JOB}"), 404, "NOT_FOUND")

    def as_missing(r: httpx.Response, job_id: str) -> None:
        """404 with the body a missing id gets: nothing says the job exists."""
        error = assert_error(r, 404, "NOT_FOUND")
        assert error == {**missing, "message": missing["message"].replace(MISSING_JOB, job_id)}

    as_missing(keyed.get("bob", f"/v1/songs/{mine}"), mine)
    as_missing(keyed.post("bob", f"/v1/songs/{mine}/cancel"), mine)
    as_missing(keyed.get("bob", f"/v1/songs/{mine}/events"), mine)
    as_missing(keyed.get("bob", f"/v1/songs/{mine}/takes/1/audio"), mine)
    as_missing(keyed.get("bob", f"/v1/songs/{mine}/takes/1/live"), mine)
    # the owner hears that the tiny DiffRhythm 1 has no live audio; nobody else learns the job exists
    assert_error(keyed.get("alice", f"/v1/songs/{mine}/takes/1/live"), 409, "NO_LIVE_AUDIO")
    assert keyed.get("alice", f"/v1/songs/{mine}").json()["status"] == "queued"  # bob's cancel did nothing
    assert [j["id"] for j in keyed.get("alice", "/v1/songs").json()] == [mine]
    assert [j["id"] for j in keyed.get("bob", "/v1/songs").json()] == [theirs]
    assert {j["id"] for j in keyed.get("root", "/v1/songs").json()} == {mine, theirs}
    # an admin key reads and cancels anyone's
    assert keyed.get("root", f"/v1/songs/{theirs}").json()["id"] == theirs
    assert keyed.post("root", f"/v1/songs/{theirs}/cancel").json()["status"] == "canceled"
    keyed.gate.set()
    assert wait_done(keyed.http, mine, headers=bearer(keyed.secrets["alice"]))["status"] == "succeeded"
    as_missing(keyed.get("bob", f"/v1/songs/{mine}/takes/1/audio?format=flac"), mine)
    for who in ("alice", "root"):
        audio = keyed.get(who, f"/v1/songs/{mine}/takes/1/audio")
        assert audio.status_code == 200 and audio.content[:4] == b"RIFF", who
        with keyed.http.stream("GET", f"/v1/songs/{mine}/events", headers=bearer(keyed.secrets[who])) as r:
            assert r.status_code == 200
            events = [e for e in sse_events(r.iter_lines()) if "data" in e]
        assert events[-1]["data"]["status"] == "succeeded", who


def test_a_key_sees_and_uses_only_its_own_uploads(keyed, tmp_path):
    path = tmp_path / "ref.wav"
    sf.write(path, np.random.default_rng(0).normal(0, 0.1, (44100 * 11, 2)), 44100)
    upload = keyed.post("alice", "/v1/uploads", content=path.read_bytes())
    assert upload.status_code == 201, upload.text
    upload_id = upload.json()["id"]
    assert keyed.get("alice", f"/v1/uploads/{upload_id}").json() == upload.json()
    assert keyed.get("root", f"/v1/uploads/{upload_id}").json() == upload.json()
    missing_id = "0" * 32 + ".wav"
    missing = assert_error(keyed.get("bob", f"/v1/uploads/{missing_id}"), 404, "NOT_FOUND")
    error = assert_error(keyed.get("bob", f"/v1/uploads/{upload_id}"), 404, "NOT_FOUND")
    assert error == {**missing, "message": missing["message"].replace(missing_id, upload_id)}

    keyed.hold_worker()
    by_reference = {**SONG, "style_prompt": None, "reference_audio_id": upload_id}
    to_edit = {**SONG, "edit": {"source_id": upload_id, "segments": [[1, 3]]}}
    for song, field in ((by_reference, "reference_audio_id"), (to_edit, "edit.source_id")):
        refused = assert_error(keyed.submit("bob", song), 404, "NOT_FOUND")
        as_if_missing = assert_error(keyed.submit("bob", _replace_upload(song, missing_id)), 404, "NOT_FOUND")
        assert refused == {
            **as_if_missing,
            "message": as_if_missing["message"].replace(missing_id, upload_id),
        }
        assert refused["details"] == {"parameter": field}
    assert keyed.store.queue_depth() == 0
    for who in ("alice", "root"):
        accepted = keyed.submit(who, by_reference)
        assert accepted.status_code == 202, accepted.text
        assert keyed.post(who, f"/v1/songs/{accepted.json()['id']}/cancel").json()["status"] == "canceled"


def _replace_upload(song: dict, upload_id: str) -> dict:
    if song.get("edit"):
        return {**song, "edit": {**song["edit"], "source_id": upload_id}}
    return {**song, "reference_audio_id": upload_id}


def test_idempotency_keys_are_scoped_per_api_key(keyed):
    keyed.hold_worker()
    same = {"Idempotency-Key": "order-42"}
    alice = keyed.submit("alice", headers=same).json()["id"]
    bob = keyed.submit("bob", {**SONG, "seed": 1}, headers=same).json()["id"]
    assert alice != bob  # the same Idempotency-Key from two keys: two jobs
    assert keyed.submit("alice", {**SONG, "seed": 5}, headers=same).json()["id"] == alice
    again = keyed.submit("bob", headers=same).json()
    assert again["id"] == bob and again["parameters"]["seed"] == 1
    assert keyed.store.queue_depth() == 2


# -- quotas -----------------------------------------------------------------------------------------


def test_active_jobs_quota_counts_queued_and_running_songs(keyed):
    keyed.add_key("dave", active_jobs=2)
    keyed.hold_worker()
    first, second = (keyed.submit("dave").json()["id"] for _ in range(2))
    r = keyed.submit("dave")
    error = assert_error(r, 429, "QUOTA_EXCEEDED")
    assert (error["details"]["quota"], error["details"]["limit"], error["details"]["used"]) == (
        "active_jobs",
        2,
        2,
    )
    # both wait (the worker is held), the first at the head of the queue: it ends after about one song
    assert r.headers["retry-after"] == str(int(SECONDS_PER_JOB)) == str(error["details"]["retry_after_s"])
    assert keyed.submit("bob").status_code == 202  # another key's quota is its own
    keyed.post("dave", f"/v1/songs/{first}/cancel")
    assert keyed.submit("dave").status_code == 202  # a finished job no longer counts
    assert_error(keyed.submit("dave"), 429, "QUOTA_EXCEEDED")
    assert keyed.get("dave", f"/v1/songs/{second}").json()["status"] == "queued"


def test_queued_jobs_quota_and_its_retry_after_follows_the_queue(keyed):
    keyed.add_key("erin", active_jobs=10, queued_jobs=1)
    keyed.hold_worker()
    for _ in range(2):  # two songs ahead of erin's
        assert keyed.submit("bob").status_code == 202
    assert keyed.submit("erin").status_code == 202
    r = keyed.submit("erin")
    error = assert_error(r, 429, "QUOTA_EXCEEDED")
    assert (error["details"]["quota"], error["details"]["limit"], error["details"]["used"]) == (
        "queued_jobs",
        1,
        1,
    )
    assert r.headers["retry-after"] == str(int(3 * SECONDS_PER_JOB))  # erin's song is third in the queue


def test_songs_per_day_quota_retries_after_the_utc_day_ends(keyed):
    keyed.add_key("fay", songs_per_day=2)
    keyed.hold_worker()
    first = keyed.submit("fay", headers={"Idempotency-Key": "a"}).json()["id"]
    keyed.post("fay", f"/v1/songs/{first}/cancel")
    assert keyed.submit("fay").status_code == 202
    r = keyed.submit("fay")
    error = assert_error(r, 429, "QUOTA_EXCEEDED")
    assert (error["details"]["quota"], error["details"]["used"]) == (
        "songs_per_day",
        2,
    )  # canceled ones count
    _, day_ends_at = utc_day(time.time())
    assert abs(int(r.headers["retry-after"]) - (day_ends_at - time.time())) <= 2
    # a repeated submission (same Idempotency-Key) is not a new song: it still answers
    assert keyed.submit("fay", headers={"Idempotency-Key": "a"}).json()["id"] == first


def test_audio_seconds_per_day_quota_counts_duration_times_takes(keyed):
    keyed.add_key("gus", audio_s_per_day=24)
    keyed.hold_worker()
    assert keyed.submit("gus", {**SONG, "duration_s": 8, "num_takes": 2}).status_code == 202  # 16 s
    error = assert_error(
        keyed.submit("gus", {**SONG, "duration_s": 8, "num_takes": 2}), 429, "QUOTA_EXCEEDED"
    )
    assert (error["details"]["quota"], error["details"]["limit"], error["details"]["used"]) == (
        "audio_s_per_day", 24, 16,
    )  # fmt: skip
    assert "16 s" in error["message"]
    assert keyed.submit("gus", {**SONG, "duration_s": 8, "num_takes": 1}).status_code == 202  # exactly 24 s
    assert_error(keyed.submit("gus", {**SONG, "duration_s": 5, "num_takes": 1}), 429, "QUOTA_EXCEEDED")


def test_retry_after_of_the_jobs_at_once_quotas_is_computed_from_the_jobs():
    now = time.time()
    running = QuotaExceeded("active_jobs", 2, 2, first_start=now - 10, first_rank=3)
    assert quota_error(running, 8, 60).details["retry_after_s"] == 50  # the oldest running song ends
    queued = QuotaExceeded("active_jobs", 2, 2, first_rank=4)
    assert quota_error(queued, 8, 60).details["retry_after_s"] == 300  # its first queued song ends
    late = QuotaExceeded("active_jobs", 2, 2, first_start=now - 500)
    assert quota_error(late, 8, 60).details["retry_after_s"] == 1  # overdue: any moment now
    daily = QuotaExceeded("songs_per_day", 5, 5, day_ends_at=now + 99.2)
    assert quota_error(daily, 8, 60).details["retry_after_s"] == 100


def test_rate_limit_per_key_with_a_computed_retry_after(keyed):
    keyed.add_key("slow", requests_per_minute=6, burst=2)
    keyed.add_key("slower", requests_per_minute=2, burst=1)
    for _ in range(2):
        assert keyed.get("slow", "/v1/songs").status_code == 200
    r = keyed.get("slow", "/v1/songs")
    error = assert_error(r, 429, "RATE_LIMITED")
    # a token every 10 s, the bucket empty: the next one is 10 s after the first request (ms ago)
    assert 9 <= int(r.headers["retry-after"]) <= 10 and error["details"]["retry_after_s"] == int(
        r.headers["retry-after"]
    )
    assert (error["details"]["requests_per_minute"], error["details"]["burst"]) == (6, 2)
    assert keyed.get("slower", "/v1/songs").status_code == 200
    assert 29 <= int(keyed.get("slower", "/v1/songs").headers["retry-after"]) <= 30  # a token every 30 s
    assert keyed.get("alice", "/v1/songs").status_code == 200  # other keys are not slowed
    assert keyed.get("slow", "/v1/songs").status_code == 429
    assert keyed.http.get("/healthz").status_code == 200  # open routes count nothing


# -- quotas under concurrent submissions ----------------------------------------------------------


def test_quotas_hold_when_submissions_arrive_at_once(server, pipe, tmp_path):
    """40 submissions at once over HTTP from two keys: one may have 3 songs at once, the other 5 a
    day. Exactly 3 and 5 are accepted; the others get 429 QUOTA_EXCEEDED."""
    redis.Redis.from_url(server.url).flushdb()
    services, store = make_services(
        server.url, pipe, LocalStorage(tmp_path / "results"), LocalStorage(tmp_path / "uploads"),
        auth=True, quotas=QUOTAS, max_queue=100,
    )  # fmt: skip
    keys = KeyStore.from_url(server.url)
    at_once, _ = keys.create("at-once", overrides={"active_jobs": 3, "queued_jobs": 100})
    daily, _ = keys.create("daily", overrides={"songs_per_day": 5, "active_jobs": 100, "queued_jobs": 100})
    gate = threading.Event()
    services.worker_pool.submit(gate.wait, 60)  # nothing finishes meanwhile

    async def scenario():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=api.base, timeout=60, limits=limits) as client:
            requests = [client.post("/v1/songs", json=SONG, headers=bearer(secret))
                        for secret in (at_once, daily) for _ in range(20)]  # fmt: skip
            return await asyncio.gather(*requests)

    try:
        with LiveApi(services) as api:
            answers = asyncio.run(scenario())
    finally:
        release(store, gate)
    for secret, limit, quota in ((at_once, 3, "active_jobs"), (daily, 5, "songs_per_day")):
        mine = answers[:20] if secret == at_once else answers[20:]
        assert sorted(r.status_code for r in mine) == [202] * limit + [429] * (20 - limit)
        assert {r.json()["error"]["details"]["quota"] for r in mine if r.status_code == 429} == {quota}
    assert len(store.recent(limit=100)) == 8
    services.worker_pool.shutdown(wait=True)


def test_the_admission_script_alone_keeps_a_quota_under_racing_threads(server):
    """The store's admission, from 30 threads released at once: exactly `active_jobs` jobs."""
    redis.Redis.from_url(server.url).flushdb()
    store = JobStore.from_url(server.url)
    quotas = Quotas(active_jobs=4, queued_jobs=100)
    start = threading.Barrier(30)
    outcomes: list[str] = []

    def submit():
        start.wait()
        try:
            store.create({"duration_s": 8, "num_takes": 1}, owner="k1", quotas=quotas)
            outcomes.append("created")
        except QuotaExceeded as exc:
            outcomes.append(exc.quota)

    threads = [threading.Thread(target=submit) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["active_jobs"] * 26 + ["created"] * 4
    assert [j.owner for j in store.recent(owner="k1")] == ["k1"] * 4
