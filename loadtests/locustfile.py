"""Realistic users of the song service, for Locust. Run it through `loadtests/run.py`, which picks a
profile (user mix, load shape, objectives), starts Locust headless and checks the results.

- `Creator`: writes a song, follows its event stream to the end, downloads its takes, thinks, repeats.
- `Watcher`: keeps a browser tab open on a running (or queued) job: follows its events until the job
  ends, then opens another. Most of a song service's connections are these.
- `Poller`: a client that reads one job's status once a second (and the health check now and then).

Besides Locust's per-request statistics, the users report, as request type "SSE":
  "first event"     time from opening an event stream to its first event
  "event delivery"  for each later event, the client's clock minus the job's `updated_at` (when the
                    worker wrote the change): how late progress reaches a listener. Same machine,
                    same clock; on several machines the clocks' offset adds to it.
and as type "JOB", "completed": submit to final event, for every song a Creator saw finish.

Environment (set by run.py): MUSICGEN_LOAD_WEIGHTS="creator:watcher:poller" (user mix),
MUSICGEN_LOAD_STAGES (JSON list of [seconds, users, spawn rate]: the load shape),
MUSICGEN_LOAD_SONG (JSON: the song Creators submit), MUSICGEN_LOAD_API_KEY (a key, when the API needs
one), MUSICGEN_LOAD_JOBLOG (a file: Creators append the id
of every accepted job; loadtests/drill.py reads it).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import FastHttpUser, LoadTestShape, between, constant, constant_pacing, events, task

SONG = json.loads(
    os.environ.get("MUSICGEN_LOAD_SONG")
    or '{"lyrics": "Hello world\\nGood night moon", "style_prompt": "happy pop", "duration_s": 95, '
    '"steps": 100, "output_format": "mp3"}'
)
_WEIGHTS = [int(w) for w in os.environ.get("MUSICGEN_LOAD_WEIGHTS", "2:10:5").split(":")]
FINAL = {"succeeded", "failed", "canceled"}
JOB_LOG = os.environ.get("MUSICGEN_LOAD_JOBLOG")  # a file to append accepted job ids to
_KEY = os.environ.get("MUSICGEN_LOAD_API_KEY")  # sent as a bearer token when the API needs keys
HEADERS = {"Authorization": f"Bearer {_KEY}"} if _KEY else {}
ACTIVE: dict[str, str] = {}  # job id -> last status seen, shared by the users of this process


def report(
    request_type: str, name: str, ms: float, length: int = 0, exception: Exception | None = None
) -> None:
    events.request.fire(request_type=request_type, name=name, response_time=ms, response_length=length,
                        exception=exception, context={})  # fmt: skip


def follow(user: FastHttpUser, job_id: str) -> dict | None:
    """Read a job's event stream until its final event; report first-event and delivery times.
    Returns the last job view seen (None if the stream failed)."""
    opened = time.time()
    last, last_id, fields = None, None, {}
    try:
        for line in _lines(user, f"/v1/songs/{job_id}/events"):
            if line.startswith("id: "):
                fields["id"] = line[4:]
            elif line.startswith("data: "):
                fields["data"] = line[6:]
            elif line == "" and "data" in fields:
                now = time.time()
                view = json.loads(fields["data"])
                if last is None:
                    report("SSE", "first event", (now - opened) * 1000, len(fields["data"]))
                elif fields.get("id") != last_id and view.get("updated_at"):
                    report("SSE", "event delivery", max(0.0, now - view["updated_at"]) * 1000)
                last, last_id, fields = view, fields.get("id"), {}
                ACTIVE[job_id] = view["status"]
                if view["status"] in FINAL:
                    ACTIVE.pop(job_id, None)
                    return last
    except Exception as exc:  # the stream broke: Locust counts it as a failure of the stream request
        report("SSE", "stream broken", (time.time() - opened) * 1000, exception=exc)
        return None
    return last


def _lines(user: FastHttpUser, path: str):
    """The lines of a streamed response as they arrive. (FastHttpSession.iter_lines reads in blocks
    of 1024 bytes and waits until a block is full: a small event would sit in the buffer until the
    next ones arrive, and its delivery time would measure the client, not the service.)"""
    response = user.client.request("GET", path, stream=True, name="GET /v1/songs/[id]/events")
    response.raise_for_status()
    raw = response._response  # geventhttpclient's response: readline returns each line at once
    while line := raw.readline(b"\n"):
        yield line.decode("utf-8", errors="replace").rstrip("\r\n")


class Creator(FastHttpUser):
    default_headers = HEADERS
    weight = _WEIGHTS[0]
    wait_time = between(5, 15)

    @task
    def make_a_song(self) -> None:
        start = time.time()
        with self.client.post("/v1/songs", json=SONG, name="POST /v1/songs", catch_response=True) as r:
            if r.status_code != 202:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
            job_id = r.json()["id"]
        if JOB_LOG:  # loadtests/drill.py checks every accepted job's outcome afterwards
            with open(JOB_LOG, "a") as log:
                log.write(job_id + "\n")
        ACTIVE[job_id] = "queued"
        final = follow(self, job_id)
        if final is None:
            return
        report(
            "JOB",
            "completed" if final["status"] == "succeeded" else final["status"],
            (time.time() - start) * 1000,
        )
        for take in final.get("takes", []):
            self.client.get(
                f"/v1/songs/{job_id}/takes/{take['n']}/audio", name="GET /v1/songs/[id]/takes/[n]/audio"
            )


class Watcher(FastHttpUser):
    default_headers = HEADERS
    weight = _WEIGHTS[1]
    wait_time = constant(0.5)

    def pick(self) -> str | None:
        running = [j for j, s in ACTIVE.items() if s == "running"]
        if running or ACTIVE:
            return random.choice(running or list(ACTIVE))
        r = self.client.get("/v1/songs?limit=20", name="GET /v1/songs")
        jobs = [j for j in (r.json() if r.status_code == 200 else []) if j["status"] not in FINAL]
        for j in jobs:
            ACTIVE[j["id"]] = j["status"]
        return random.choice(jobs)["id"] if jobs else None

    @task
    def keep_a_tab_open(self) -> None:
        job_id = self.pick()
        if job_id is None:
            time.sleep(1)
            return
        follow(self, job_id)


class Poller(FastHttpUser):
    default_headers = HEADERS
    weight = _WEIGHTS[2]
    wait_time = constant_pacing(1.0)
    job_id: str | None = None

    @task(20)
    def read_status(self) -> None:
        if self.job_id is None:
            r = self.client.get("/v1/songs?limit=20", name="GET /v1/songs")
            jobs = r.json() if r.status_code == 200 else []
            if not jobs:
                return
            self.job_id = random.choice(jobs)["id"]
        with self.client.get(f"/v1/songs/{self.job_id}", name="GET /v1/songs/[id]", catch_response=True) as r:
            if r.status_code == 404:  # expired or unknown: pick another one next time
                self.job_id = None
                r.success()

    @task(1)
    def health(self) -> None:
        self.client.get("/healthz", name="GET /healthz")


class Stages(LoadTestShape):
    """The load shape: [seconds, users, spawn rate] stages from MUSICGEN_LOAD_STAGES, in order."""

    stages = json.loads(os.environ.get("MUSICGEN_LOAD_STAGES") or "[[60, 17, 5]]")

    def tick(self):
        elapsed = self.get_run_time()
        for seconds, users, rate in self.stages:
            if elapsed < seconds:
                return users, rate
            elapsed -= seconds
        return None
