"""The real Ray Serve app (ray.init(num_cpus=2)) with the tiny model and the embedded Redis, over HTTP."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest

from deployments.service.redis_server import free_port
from tests.conftest import ROOT
from tests.deployments.conftest import BAD_SUBMISSIONS

SONG = {"lyrics": "Hello there\ngood night", "style_prompt": "calm piano", "duration_s": 8, "steps": 3,
        "num_takes": 1, "seed": 3, "output_format": "mp3"}  # fmt: skip


METRICS_PORT = 0


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_paths):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.serve.app import build_app

    data = tmp_path_factory.mktemp("data")
    port = free_port()
    # the replicas are other processes: they must see the same offline, isolated cache
    env = {
        k: os.environ[k]
        for k in ("HF_HUB_OFFLINE", "MUSICGEN_CACHE_DIR", "MUSICGEN_ASSETS_DIR", "RAY_AUTH_MODE")
    }
    global METRICS_PORT
    METRICS_PORT = free_port()  # Ray's metrics agent, as the Docker image and the clusters fix it
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False,
             _metrics_export_port=METRICS_PORT)  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            # fault_oom_takes: batches of more than 2 takes fail as a full GPU would (OUT_OF_MEMORY paths)
            build_app(
                {
                    "model": "tiny",
                    "data_dir": str(data),
                    "lease_s": 5,
                    "fault_oom_takes": 2,
                    "max_queue": 5,
                    "webhook_secret": "serve-secret",
                    "webhook_allow": ["127.0.0.1"],  # the test's receiver: an internal one
                    "max_upload_mb": 3,
                }
            ),  # fmt: skip
            name="musicgen",
            route_prefix="/",
        )
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as http:
            deadline = time.time() + 120
            while time.time() < deadline:  # the generator loads the model after the app is "running"
                r = http.get("/readyz")
                if r.status_code == 200:
                    break
                time.sleep(0.5)
            yield http
    finally:
        serve.shutdown()
        ray.shutdown()


def test_submit_poll_and_download_through_ray_serve(service):
    assert service.get("/healthz").json() == {"status": "ok"}
    r = service.post("/v1/songs", json=SONG, headers={"Idempotency-Key": "k1"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert service.post("/v1/songs", json=SONG, headers={"Idempotency-Key": "k1"}).json()["id"] == job["id"]
    deadline = time.time() + 60
    while time.time() < deadline:
        body = service.get(f"/v1/songs/{job['id']}").json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.2)
    assert body["status"] == "succeeded", body
    assert body["parameters"]["lrc"].startswith("[")  # auto-timed plain lyrics
    audio = service.get(body["takes"][0]["audio_url"].replace(str(service.base_url), ""))
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/mpeg"
    assert "musicgen_queue_depth" in service.get("/metrics").text
    models = service.get("/v1/models").json()
    assert models[0]["name"] == "tiny" and models[0]["loaded"] is True


@pytest.mark.parametrize("change, status, code", BAD_SUBMISSIONS)
def test_errors_through_the_validator_deployment(service, change, status, code):
    r = service.post("/v1/songs", json={**SONG, **change})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["recovery"]


def _niceness_of(title: str) -> set[int]:
    """Nice values of the threads of the processes whose title (Ray sets
    `ray::ServeReplica:app:Deployment`) has `title`."""
    out = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if title not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            for stat in proc.glob("task/*/stat"):
                out.add(int(stat.read_text().rsplit(")", 1)[1].split()[16]))  # field 19 of proc(5)
        except OSError:
            continue
    return out


def test_a_generator_on_cpu_runs_below_the_api(service):
    """Without a GPU the model would take both cores from the HTTP API; every thread of the generator
    runs at the lowest priority, below the ingress's."""
    generator, ingress = _niceness_of("SongGenerator"), _niceness_of("Ingress")
    assert generator == {19}, generator
    assert ingress and max(ingress) < 19, ingress


def test_smoke_load_test_against_the_app(service, tmp_path):
    """The load-test command's smoke profile (Locust: creators, watchers, pollers) against the real app,
    shortened to 15 s: it runs, writes its CSV, HTML report, plot and summary, and sees no errors,
    songs completed and events delivered. Latency objectives are measured in the README, not asserted
    here."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "smoke"
    correctness = ["errors:failures:0", "JOB completed:count:>=1", "SSE first event:count:>=1",
                   "SSE event delivery:count:>=1"]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "loadtests" / "run.py"), "--profile", "smoke", "--seconds", "15",
           "--host", str(service.base_url), "--out", str(out)] + [a for o in correctness for a in ("--objective", o)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("locust_stats.csv", "locust_stats_history.csv", "report.html", "latency.png", "summary.md"):
        assert (out / name).is_file(), name
    summary = (out / "summary.md").read_text()
    assert "GET GET /v1/songs/[id]" in summary and "POST POST /v1/songs" in summary
    # a missed objective is an exit status of 1
    impossible = subprocess.run(
        [sys.executable, str(ROOT / "loadtests" / "run.py"), "--check-only", str(out),
         "--objective", "GET GET /healthz:95%:0.001"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert impossible.returncode == 1 and "MISSED" in impossible.stderr


def test_lean_latency_clients_against_the_app(service):
    """loadtests/lean_clients.py: both client kinds time real answers (a row per run, non-2xx counted,
    exit 1 on any), and it refuses an address that is not this machine."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    tool = [sys.executable, str(ROOT / "loadtests" / "lean_clients.py"), "--host", str(service.base_url),
            "--clients", "5", "--seconds", "2"]  # fmt: skip
    for client in ("raw", "httpx"):
        done = subprocess.run(
            [*tool, "--client", client], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr
        row = done.stdout.strip().splitlines()[-1].split("|")
        assert row[1].strip() == client and int(row[3]) >= 5 and int(row[4]) == 0
    missing = subprocess.run([*tool, "--path", "/v1/songs/" + "0" * 32], capture_output=True, text=True,
                             timeout=60, cwd=ROOT)  # fmt: skip
    assert missing.returncode == 1 and int(missing.stdout.strip().splitlines()[-1].split("|")[4]) >= 5
    remote = subprocess.run([*tool[:2], "--host", "http://192.0.2.1:8000"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)  # fmt: skip
    assert remote.returncode != 0 and "loopback" in remote.stderr


def test_not_found_and_payload_too_large(service):
    r = service.get("/v1/songs/" + "f" * 32)
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
    big = service.post("/v1/uploads", content=b"RIFF" + b"\0" * 3_200_000)  # the app allows 3 MB
    assert big.status_code == 413 and big.json()["error"]["code"] == "PAYLOAD_TOO_LARGE", big.text


def wait_for(service, job_id, states, timeout=90):
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        r = service.get(f"/v1/songs/{job_id}")
        body = r.json()
        if r.status_code == 503:  # a store read timed out on this loaded 2-core box: ask again
            seen.append(body["error"]["code"])
            time.sleep(0.5)
            continue
        if r.status_code != 200:  # e.g. 404: an accepted job was lost
            raise AssertionError(f"GET job {job_id}: {r.status_code} {body}; before: {seen[-3:]}")
        seen.append(body["status"])
        if body["status"] in states:
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {states}: {body}")


def test_the_whole_api_through_the_serve_proxy(service, webhook_receiver, tmp_path):
    import hmac
    import json
    import threading

    import numpy as np
    import soundfile as sf

    from deployments.service.webhooks import sign

    # a running job: its SSE stream through the proxy, canceled before the next step, a signed webhook
    busy = service.post("/v1/songs", json={**SONG, "duration_s": 95, "steps": 200,
                                           "webhook_url": webhook_receiver.url}).json()  # fmt: skip
    wait_for(service, busy["id"], {"running"})
    events: list[dict] = []

    def listen() -> None:
        with service.stream("GET", f"/v1/songs/{busy['id']}/events") as stream:
            events.extend(json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: "))

    listener = threading.Thread(target=listen)
    listener.start()
    time.sleep(1.5)
    assert service.post(f"/v1/songs/{busy['id']}/cancel").status_code == 200
    listener.join(30)
    assert not listener.is_alive() and events[-1]["status"] == "canceled"
    assert any(e["stage"] == "sampling" and e["step"] for e in events)
    assert events[-1]["step"] < 200  # stopped before the end
    assert webhook_receiver.got.wait(30)
    headers, body = webhook_receiver.received[-1]
    assert hmac.compare_digest(headers["X-Musicgen-Signature"],
                               sign("serve-secret", headers["X-Musicgen-Timestamp"], body))  # fmt: skip
    assert json.loads(body)["status"] == "canceled"

    # a full queue: 429 with Retry-After; queued jobs cancel at once
    busy = service.post("/v1/songs", json={**SONG, "duration_s": 95, "steps": 200}).json()
    wait_for(service, busy["id"], {"running"})
    queued = [service.post("/v1/songs", json={**SONG, "seed": s}) for s in range(5)]
    assert all(r.status_code == 202 for r in queued)
    full = service.post("/v1/songs", json=SONG)
    assert full.status_code == 429 and full.json()["error"]["code"] == "QUEUE_FULL"
    assert int(full.headers["Retry-After"]) > 0
    for r in queued:
        assert service.post(f"/v1/songs/{r.json()['id']}/cancel").json()["status"] == "canceled"
    service.post(f"/v1/songs/{busy['id']}/cancel")
    assert wait_for(service, busy["id"], {"canceled", "succeeded"})["status"] == "canceled"

    # uploads: content sniffing, and a reference song used as the style; the take in byte ranges
    assert (
        service.post("/v1/uploads", content=b"<html>no</html>").json()["error"]["code"] == "UNSUPPORTED_MEDIA"
    )
    ref = tmp_path / "ref.flac"
    sf.write(ref, np.random.default_rng(0).normal(0, 0.1, (44100 * 12, 2)), 44100)
    upload = service.post("/v1/uploads", content=ref.read_bytes())
    assert upload.status_code == 201 and upload.json()["format"] == "flac"
    song = {**SONG, "style_prompt": None, "reference_audio_id": upload.json()["id"], "output_format": "wav"}
    done = wait_for(service, service.post("/v1/songs", json=song).json()["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    url = f"/v1/songs/{done['id']}/takes/1/audio"
    whole = service.get(url).content
    part = service.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(whole)}"
    assert service.get(url + "?format=flac").content[:4] == b"fLaC"


def test_the_web_ui_through_the_serve_proxy(service):
    page = service.get("/")
    assert page.status_code == 200 and "<title>musicgen" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert service.get("/ui/js/app.js").status_code == 200
    timing = service.post("/v1/lyrics/timing", json={"lyrics": "Hello\nworld", "duration_s": 10})
    assert timing.status_code == 200 and len(timing.json()["lines"]) == 2  # through the validator deployment


def test_the_grafana_dashboard_queries_metrics_the_app_exports(service):
    """Every metric a panel of cluster/observability/grafana/dashboards/musicgen.json reads is exported
    by this running app: the ingress's /metrics or Ray's metrics agent (Ray Serve's metrics and the
    generators' musicgen_* ones, after the jobs of the tests above)."""
    import json

    dashboard = json.loads((ROOT / "cluster/observability/grafana/dashboards/musicgen.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    wanted = {m for q in queries for m in re.findall(r"\b(?:ray_)?(?:musicgen|serve)_\w+", q)}
    assert len(wanted) >= 12 and any(w.startswith("ray_musicgen_") for w in wanted)
    deadline, exported = time.time() + 90, set()
    while time.time() < deadline:  # replicas push their metrics to the agent every few seconds
        text = (
            service.get("/metrics").text
            + httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        )
        exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
        if wanted <= exported:
            break
        time.sleep(3)
    assert wanted <= exported, sorted(wanted - exported)


def test_compatible_jobs_share_a_batch_and_out_of_memory_is_contained(service):
    """While one song runs, jobs queue at the generator and start as one batch when it ends, however far
    apart they came: the pair is sampled together, the other length on its own. The running song is
    long (~10 s here) so that the next jobs are queued before it ends even on a busy box."""
    busy = service.post("/v1/songs", json={**SONG, "duration_s": 60, "steps": 200}).json()
    wait_for(service, busy["id"], {"running"})
    pair = [service.post("/v1/songs", json={**SONG, "seed": s}).json()["id"] for s in (1, 2)]
    odd = service.post("/v1/songs", json={**SONG, "duration_s": 12}).json()["id"]  # another length
    done = [wait_for(service, i, {"succeeded", "failed"}) for i in [busy["id"], *pair, odd]]
    assert [d["status"] for d in done] == ["succeeded"] * 4, done
    assert [d["batch"]["requests"] for d in done] == [1, 2, 2, 1]
    assert done[1]["takes"][0]["seed"] == 1 and done[2]["takes"][0]["seed"] == 2

    # a batch that does not fit (1 + 2 takes > 2) is split and both succeed; a job that cannot fit
    # on its own (3 takes) fails with OUT_OF_MEMORY, and the replica goes on serving
    busy = service.post("/v1/songs", json={**SONG, "duration_s": 60, "steps": 200}).json()
    wait_for(service, busy["id"], {"running"})
    split = [service.post("/v1/songs", json={**SONG, "num_takes": n}).json()["id"] for n in (1, 2)]
    too_big = service.post("/v1/songs", json={**SONG, "num_takes": 3}).json()["id"]
    done = [wait_for(service, i, {"succeeded", "failed"}) for i in [*split, too_big]]
    assert [d["status"] for d in done] == ["succeeded", "succeeded", "failed"], done
    assert [d["batch"]["requests"] for d in done[:2]] == [1, 1]
    err = done[2]["error"]
    assert err["code"] == "OUT_OF_MEMORY" and "fewer takes" in err["recovery"]
    after = service.post("/v1/songs", json=SONG).json()["id"]
    assert wait_for(service, after, {"succeeded", "failed"})["status"] == "succeeded"


def test_killed_generator_replica_mid_job_is_retried_and_succeeds(service):
    import ray

    # long enough to be killed while it runs (it is killed as soon as it is seen running); the second
    # attempt runs it all again, so no longer than that
    job = service.post("/v1/songs", json={**SONG, "duration_s": 95, "steps": 100}).json()
    running = wait_for(service, job["id"], {"running"})
    assert running["attempts"] == 1
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SongGenerator" in a["name"]]
    assert replicas
    for a in replicas:  # the GPU worker dies mid-song, as on a preempted node
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    done = wait_for(service, job["id"], {"succeeded", "failed"}, timeout=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2  # the lease expired, the reconciler re-queued it, a new replica ran it


def _kill(pattern: str) -> None:
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if pattern in a["name"]]
    assert actors, pattern
    for a in actors:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)


def _get_retrying(service, path, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            r = service.get(path)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{path} did not come back")


def test_ingress_restart_loses_no_accepted_job(service):
    ids = [service.post("/v1/songs", json={**SONG, "steps": 60}).json()["id"] for _ in range(3)]
    _kill("Ingress")  # handle calls queued in the dead ingress are gone; the jobs are in Redis
    for job_id in ids:
        deadline = time.time() + 180
        while time.time() < deadline:
            body = _get_retrying(service, f"/v1/songs/{job_id}")
            if body["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.3)
        assert body["status"] == "succeeded", body


def test_redis_stop_and_restart_under_the_app(service):
    before = service.post("/v1/songs", json=SONG).json()["id"]
    wait_for(service, before, {"succeeded"})
    _kill("RedisServer")  # Serve replaces the replica, which restarts Redis from its append-only file
    saw_503 = False
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            r = service.post("/v1/songs", json=SONG)
        except httpx.HTTPError:
            r = None
        if r is not None and r.status_code == 503:
            assert r.json()["error"]["code"] in ("STORE_UNAVAILABLE", "MODEL_NOT_LOADED")
            saw_503 = True
        if r is not None and r.status_code == 202:
            after = r.json()["id"]
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the service did not recover from a Redis restart")
    assert saw_503
    assert _get_retrying(service, f"/v1/songs/{before}")["status"] == "succeeded"  # survived via AOF
    assert wait_for(service, after, {"succeeded", "failed"})["status"] == "succeeded"


def test_a_generator_without_its_model_refuses_jobs_then_fails_its_health_check(server, tmp_path):
    """The replica class alone (no Ray cluster): the model is not downloaded (offline, empty cache).
    It reports why to the job store, fails the jobs sent to it with MODEL_NOT_LOADED, passes the
    health check Serve runs right after __init__, and fails it `model_retry_s` after the failed load,
    so that Serve replaces it; its report outlives it long enough for /readyz to keep telling why."""
    import asyncio

    import redis

    from deployments.serve.app import SongGenerator
    from deployments.service.generator import LOAD_ERROR_REPORT_TTL_S
    from deployments.service.settings import AppArgs
    from deployments.service.store import JobState, JobStore

    redis.Redis.from_url(server.url).flushdb()
    store = JobStore.from_url(server.url)
    args = AppArgs(model="diffrhythm-1.2-base", data_dir=str(tmp_path), model_retry_s=0.5).resolved()

    async def scenario() -> None:
        generator = SongGenerator.func_or_class(args, server.url)
        try:
            generator.check_health()  # Serve's first check, right after __init__: a start, not a failure
            (report,) = store.generator_statuses()
            assert report["loaded"] is False and report["error"]["code"] == "MODEL_NOT_LOADED"
            assert report["ttl_s"] == LOAD_ERROR_REPORT_TTL_S
            job, _ = store.create({"model": "diffrhythm-1.2-base"})
            assert await generator.run(job.id) == "failed"  # through its batcher, as Serve calls it
            failed = store.get(job.id)
            assert failed.state == JobState.FAILED and failed.error["code"] == "MODEL_NOT_LOADED"
            assert "musicgen models pull" in failed.error["recovery"]
            await asyncio.sleep(0.6)
            with pytest.raises(RuntimeError, match="diffrhythm-1.2-base not loaded"):
                generator.check_health()
            assert store.generator_statuses()[0]["error"]["code"] == "MODEL_NOT_LOADED"
        finally:
            generator.worker.stop()

    asyncio.run(scenario())


def test_api_keys_through_ray_serve(service, tmp_path):
    """Auth as build_app decides it: on this loopback proxy, auth: auto needs no key (the host is read
    from Serve's HTTP options); an open API on a public address is refused; with auth: on, a key
    created in the app's embedded Redis (found as `musicgen keys` finds it) works through the proxy."""
    import pydantic
    from ray import serve

    from deployments.serve.app import app_args, build_app
    from deployments.service.redis_server import EmbeddedRedis
    from deployments.service.store import KeyStore, new_secret

    assert app_args({}).host == "127.0.0.1" and not app_args({}).auth_required
    with pytest.raises(pydantic.ValidationError, match="allow_insecure_public"):
        app_args({"auth": "off", "host": "0.0.0.0"})
    serve.delete("musicgen")
    data = tmp_path / "data"
    ops = new_secret()  # a key from the environment (a Kubernetes Secret): registered by the ingress
    os.environ["MUSICGEN_API_KEYS"] = f"ops:admin:{ops}"
    try:
        serve.run(build_app({"model": "tiny", "data_dir": str(data), "auth": "on", "lease_s": 5}),
                  name="musicgen", route_prefix="/")  # fmt: skip
    finally:
        del os.environ["MUSICGEN_API_KEYS"]
    secret, _ = KeyStore.from_url(EmbeddedRedis.running_url(data / "redis")).create("alice")
    _get_retrying(service, "/readyz")  # open
    refused = service.post("/v1/songs", json=SONG)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "UNAUTHORIZED"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    with httpx.Client(
        base_url=service.base_url, headers={"Authorization": f"Bearer {secret}"}, timeout=30
    ) as keyed:
        job = keyed.post("/v1/songs", json=SONG)
        assert job.status_code == 202, job.text
        assert wait_for(keyed, job.json()["id"], {"succeeded", "failed"})["status"] == "succeeded"
        assert [j["id"] for j in keyed.get("/v1/songs").json()] == [job.json()["id"]]
    deadline = time.time() + 30  # the ingress registers it right after start
    while (seen := service.get("/v1/songs", headers={"Authorization": f"Bearer {ops}"})).status_code == 401:
        assert time.time() < deadline, seen.text
        time.sleep(0.3)
    assert seen.status_code == 200 and [j["id"] for j in seen.json()] == [job.json()["id"]]  # admin: all
    stored = KeyStore.from_url(EmbeddedRedis.running_url(data / "redis")).list()
    # either may be first: the ingress registers ops while the test creates alice
    assert sorted((k.name, k.role) for k in stored) == [("alice", "user"), ("ops", "admin")]


def test_both_generations_beside_each_other_through_ray_serve(service, tmp_path):
    """One app serving the tiny DiffRhythm 1 (the default model) and the tiny DiffRhythm 2 beside it, a
    generator deployment each: jobs go to their model's generator; a DiffRhythm 2 song comes with events
    and audio of the requested length at 48 kHz in two channels, a DiffRhythm 1 song at 44.1 kHz."""
    import io

    import soundfile as sf
    from ray import serve

    from deployments.serve.app import build_app

    serve.delete("musicgen")
    # two generators on this 2-CPU Ray: half a CPU each
    app = {"model": "tiny", "models": ["tiny-2"], "data_dir": str(tmp_path / "data"), "lease_s": 5,
           "generator_cpus": 0.5}  # fmt: skip
    serve.run(build_app(app), name="musicgen", route_prefix="/")
    deadline = time.time() + 180
    while (ready := service.get("/readyz")).status_code != 200:
        assert time.time() < deadline, ready.text
        time.sleep(0.5)
    assert "serving tiny on" in ready.text and "serving tiny-2 on" in ready.text
    models = {m["name"]: m for m in service.get("/v1/models").json()}
    assert set(models) == {"tiny", "tiny-2"} and (
        models["tiny-2"]["min_seconds"],
        models["tiny-2"]["max_seconds"],
    ) == (4, 60)
    defaults = {m: (models[m]["default_steps"], models[m]["default_cfg"]) for m in models}
    assert defaults == {"tiny": (31, 4), "tiny-2": (16, 2)}
    assert {m: models[m]["live_audio"] for m in models} == {"tiny": False, "tiny-2": True}
    first = service.post("/v1/songs", json={**SONG, "output_format": "wav"})  # no model: the default one
    assert first.status_code == 202, first.text
    song = {"model": "tiny-2", "lyrics": "[verse]\nHello world\n[chorus]\nGood night", "style_prompt": "folk",
            "duration_s": 5, "steps": 3, "output_format": "wav"}  # fmt: skip
    job = service.post("/v1/songs", json=song)
    assert job.status_code == 202, job.text
    statuses = []
    with service.stream("GET", f"/v1/songs/{job.json()['id']}/events", timeout=120) as events:
        for line in events.iter_lines():
            if line.startswith("event: "):
                statuses.append(line[7:])
                if statuses[-1] in ("succeeded", "failed", "canceled"):
                    break
    assert statuses[-1] == "succeeded" and "progress" in statuses, statuses
    done = service.get(f"/v1/songs/{job.json()['id']}").json()
    audio, rate = sf.read(io.BytesIO(service.get(done["takes"][0]["audio_url"]).content))
    assert rate == 48000 and audio.shape == (5 * 48000, 2)
    one = wait_for(service, first.json()["id"], {"succeeded", "failed"})
    assert one["status"] == "succeeded" and one["parameters"]["model"] == "tiny", one
    audio, rate = sf.read(io.BytesIO(service.get(one["takes"][0]["audio_url"]).content))
    assert rate == 44100 and audio.shape[1] == 2
    generators = {
        d for d in serve.status().applications["musicgen"].deployments if d.startswith("SongGenerator")
    }
    assert generators == {"SongGenerator", "SongGenerator-tiny-2"}


def test_scale_from_zero_and_a_model_that_cannot_load(service, tmp_path):
    """Last in this module: replaces the app with one scaled to zero whose model is not downloaded
    (offline, empty cache). Ready while scaled to zero; the first song starts a generator, which
    cannot load the model: that job fails with MODEL_NOT_LOADED, /readyz says why and how to fix
    it, and new submissions get 503 MODEL_NOT_LOADED. A second after its failed load the replica
    fails its health checks, and Serve replaces it (the new replica tries to load the model again):
    meanwhile /readyz keeps telling why."""
    import ray
    from ray import serve

    from deployments.serve.app import build_app

    serve.delete("musicgen")
    args = {"model": "diffrhythm-1.2-base", "data_dir": str(tmp_path), "min_generators": 0, "lease_s": 5,
            "model_retry_s": 1, "generator_health_check_s": 2}  # fmt: skip
    serve.run(build_app(args), name="musicgen", route_prefix="/")
    ready = _get_retrying(service, "/readyz")
    assert ready["ready"] is True and "scaled to zero" in ready["reason"]
    job = service.post("/v1/songs", json={**SONG, "model": "diffrhythm-1.2-base", "duration_s": 95})
    assert job.status_code == 202, job.text
    failed = wait_for(service, job.json()["id"], {"failed", "succeeded"}, timeout=120)
    assert failed["error"]["code"] == "MODEL_NOT_LOADED", failed
    assert "musicgen models pull" in failed["error"]["recovery"]
    deadline = time.time() + 10  # the ingress caches readiness for a second
    while (r := service.get("/readyz")).status_code == 200 and time.time() < deadline:
        time.sleep(0.3)
    assert r.status_code == 503 and "musicgen models pull" in r.json()["reason"]
    r = service.post("/v1/songs", json={**SONG, "model": "diffrhythm-1.2-base", "duration_s": 95})
    assert r.status_code == 503 and r.json()["error"]["code"] == "MODEL_NOT_LOADED"
    assert "musicgen models pull" in r.json()["error"]["recovery"]

    def generators() -> set[str]:
        return {
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SongGenerator" in a["name"]
        }

    first = generators()
    assert first
    deadline = time.time() + 150
    while not generators() - first:  # three failed checks 2 s apart, then a new replica
        assert time.time() < deadline, "the generator without its model was never replaced"
        r = service.get("/readyz")
        assert r.status_code == 503 and "musicgen models pull" in r.json()["reason"], r.text
        time.sleep(1)
