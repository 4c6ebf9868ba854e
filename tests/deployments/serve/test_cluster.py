"""The service across a multi-node Ray cluster on this machine (deployments/serve/local_cluster.py): a
head and a second API node (an ingress replica each), generator nodes that stand in for GPU nodes and
join or die during the tests, Redis by URL (also the head's GCS storage), results in an S3 bucket. The
app is serve_config.yaml as clusters deploy it (HTTP on every interface, so API keys are required).
The tests run in order on one cluster: it starts with no generator node."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import httpx
import pytest

from tests.deployments.serve.test_app import SONG

LONG = {**SONG, "duration_s": 95, "steps": 48}  # some seconds of sampling on the tiny model


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_paths):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from deployments.serve.local_cluster import LocalCluster

    local = LocalCluster(
        tmp_path_factory.mktemp("cluster"), api_nodes=2, generator_nodes=0,
        app_args={"min_generators": 0, "max_generators": 2,  # tests poll fast: no rate limit in the way
                  "quotas": {"requests_per_minute": 100_000, "burst": 10_000}},
        log=lambda line: print(line, flush=True),
    )  # fmt: skip
    try:
        local.start(wait_ready=False)
        local.wait_ready(180)  # ready while scaled to zero: songs are accepted and wait for a node
        yield local
    finally:
        local.stop()


def _client(cluster, node: str = "head") -> httpx.Client:
    return httpx.Client(base_url=cluster.nodes[node].url, headers=cluster.headers, timeout=30)


def _wait(cluster, job_id: str, states: set[str], timeout: float = 120, node: str = "head") -> dict:
    deadline = time.time() + timeout
    body: dict = {}
    with _client(cluster, node) as http:
        while time.time() < deadline:
            try:
                r = http.get(f"/v1/songs/{job_id}")
            except httpx.HTTPError:  # a proxy or ingress coming back
                time.sleep(0.5)
                continue
            if r.status_code == 200:
                body = r.json()
                if body["status"] in states:
                    return body
            elif r.status_code != 503:  # 503: the store briefly away; anything else is a lost job
                raise AssertionError(f"GET {job_id} through {node}: {r.status_code} {r.text}")
            time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {states}: {body}")


def _node_of_job(cluster, job_id: str) -> str:
    """The node whose generator ran the job last (its worker is host:pid)."""
    from deployments.service.store import JobStore

    job = JobStore.from_url(cluster.redis_url).get(job_id)
    assert job is not None and job.worker, job
    pid = int(job.worker.rsplit(":", 1)[1])
    nodes = [name for name in cluster.nodes if pid in cluster.node_pids(name)]
    assert len(nodes) == 1, (job.worker, nodes)
    return nodes[0]


def _events(cluster, node: str, job_id: str, out: list[dict]) -> None:
    with _client(cluster, node) as http, http.stream("GET", f"/v1/songs/{job_id}/events", timeout=120) as r:
        assert r.status_code == 200, r.read()
        out.extend(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: "))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # a process that just ended
        return b""


def test_a_job_waits_for_a_generator_node_and_runs_there_once_one_joins(cluster):
    with _client(cluster) as http:
        ready = http.get("/readyz").json()
        assert ready["ready"] is True, ready  # scaled to zero: it takes songs, and says why none runs
        assert "no generator can start yet" in ready["reason"] and "musicgen_generator" in ready["reason"]
        assert http.post("/v1/songs", json=SONG, headers={"Authorization": ""}).status_code == 401
        job = http.post("/v1/songs", json=SONG)
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        time.sleep(3)
        assert http.get(f"/v1/songs/{job_id}").json()["status"] == "queued"
    cluster.add_generator_node("gpu-1")
    done = _wait(cluster, job_id, {"succeeded", "failed"}, timeout=180)
    assert done["status"] == "succeeded", done
    assert _node_of_job(cluster, job_id) == "gpu-1"
    cluster.add_generator_node("gpu-2")  # for the tests after this one
    assert "serving tiny on 1 generator(s)" in cluster.wait_ready(60)["reason"]


def test_a_song_made_on_a_generator_node_is_followed_and_downloaded_through_other_nodes(cluster):
    with _client(cluster, "head") as head:
        job_id = head.post("/v1/songs", json=SONG).json()["id"]
    events: list[dict] = []
    _events(cluster, "api-2", job_id, events)  # followed through the other API node's proxy
    assert events[-1]["status"] == "succeeded", events[-3:]
    assert _node_of_job(cluster, job_id).startswith("gpu-")  # made on a generator node
    takes = []
    for node in ("head", "api-2"):
        with _client(cluster, node) as http:
            r = http.get(f"/v1/songs/{job_id}/takes/1/audio")
            assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg", r.text[:200]
            takes.append(r.content)
    assert takes[0] == takes[1] and len(takes[0]) > 1000
    # nothing of it on any node's own disk: the bucket has it
    for node in cluster.nodes.values():
        assert not list(node.data_dir.rglob("take-*")), node


def test_two_ingress_replicas_on_two_nodes_both_stream_a_jobs_events(cluster):
    def ingress_processes(node: str) -> list[int]:  # Ray titles a replica's process ray::ServeReplica:...
        return [
            pid for pid in cluster.node_pids(node)
            if b"ServeReplica:musicgen:Ingress" in _read(f"/proc/{pid}/cmdline")
        ]  # fmt: skip

    placed = {node: ingress_processes(node) for node in cluster.nodes}
    assert {n for n, pids in placed.items() if pids} == {"head", "api-2"}, placed
    assert all(len(placed[n]) == 1 for n in ("head", "api-2")), placed
    with _client(cluster) as http:
        job_id = http.post("/v1/songs", json=LONG).json()["id"]
    streams: dict[str, list[dict]] = {"head": [], "api-2": []}
    threads = [threading.Thread(target=_events, args=(cluster, n, job_id, out)) for n, out in streams.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for node, events in streams.items():
        assert events and events[-1]["status"] == "succeeded", (node, events[-3:])
        assert any(e.get("stage") == "sampling" for e in events), node


def test_a_generator_node_killed_mid_song_has_its_job_retried_on_another_node(cluster):
    with _client(cluster) as http:
        job_id = http.post("/v1/songs", json=LONG).json()["id"]
    running = _wait(cluster, job_id, {"running", "succeeded", "failed"})
    assert running["status"] == "running", running
    time.sleep(1)  # mid-song
    victim = _node_of_job(cluster, job_id)
    assert cluster.kill_node(victim) > 0  # power lost: no graceful stop, no lease released
    done = _wait(cluster, job_id, {"succeeded", "failed", "canceled"}, timeout=240)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2  # its lease ran out and the reconciler sent it again
    survivor = _node_of_job(cluster, job_id)
    assert survivor != victim and survivor.startswith("gpu-")
    with _client(cluster) as http:
        assert http.get(f"/v1/songs/{job_id}/takes/1/audio").status_code == 200
    cluster.add_generator_node("gpu-3")


def test_the_heads_gcs_killed_and_restarted_on_the_same_redis_loses_no_job(cluster):
    import ray

    with _client(cluster) as http:
        ids = [http.post("/v1/songs", json=song).json()["id"] for song in (LONG, SONG, {**SONG, "seed": 9})]
    cluster.restart_gcs(down_s=3)
    for job_id in ids:  # accepted before the restart: each ends, and its take is there
        done = _wait(cluster, job_id, {"succeeded", "failed", "canceled"}, timeout=240)
        assert done["status"] == "succeeded", done
    with _client(cluster) as http:
        after = http.post("/v1/songs", json=SONG)
        assert after.status_code == 202, after.text
        assert http.get(f"/v1/songs/{ids[0]}/takes/1/audio").status_code == 200
    assert _wait(cluster, after.json()["id"], {"succeeded", "failed"})["status"] == "succeeded"
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert {node.ray_node.node_id for node in cluster.nodes.values()} <= alive


def test_results_on_each_nodes_own_disk_are_caught_by_readyz_naming_the_storage_setting(cluster):
    """Last: redeploys the app without MUSICGEN_STORAGE_URL. Each node then keeps results under its
    own MUSICGEN_DATA_DIR, which the ingress on another node cannot read: not ready, with the fix.
    (While the replicas of the deployment before still report, /readyz may first name one of them:
    their results are in the S3 storage this ingress no longer reads. Their reports expire.)"""
    cluster.storage = "local"
    cluster.deploy()
    deadline = time.time() + 180
    last = None
    with _client(cluster) as http:
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):  # replicas being replaced
                r = http.get("/readyz")
                last = r.json()
                if r.status_code == 503 and "a local disk" in last.get("reason", ""):
                    break
            time.sleep(1)
    assert last is not None and "MUSICGEN_STORAGE_URL" in last["reason"], last
    assert "cannot read" in last["reason"] and "a local disk" in last["reason"]
