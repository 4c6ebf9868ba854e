"""How a job is shown: the JobView of GET /v1/songs/{id}, and the same view as a server-sent event."""

from __future__ import annotations

import time

from deployments.service.params import SongParams
from deployments.service.schemas import JobView, TakeView
from deployments.service.settings import SECONDS_PER_JOB_ESTIMATE
from deployments.service.store import JobState, SongJob
from musicgen.registry import MODELS


def job_view(
    job: SongJob, position: int | None, base: str, *, seconds_per_job: float = SECONDS_PER_JOB_ESTIMATE
) -> JobView:
    params = SongParams.from_dict(job.params)
    progress = job.progress
    eta = None
    if job.state == JobState.QUEUED and position is not None:
        eta = (position + 1) * seconds_per_job
    elif job.state == JobState.RUNNING and progress.get("fraction") and progress.get("stage") == "sampling":
        elapsed = time.time() - (job.started_at or time.time())
        eta = elapsed * (1 - progress["fraction"]) / max(progress["fraction"], 1e-3)
    timings = (job.result or {}).get("timings", {})
    url = f"{base}/v1/songs/{job.id}"
    takes = [
        TakeView(n=t["n"], format=t["format"], duration_s=t["duration_s"], seed=t["seed"],
                 audio_url=f"{url}/takes/{t['n']}/audio")
        for t in (job.result or {}).get("takes", [])
    ]  # fmt: skip
    return JobView(
        id=job.id, status=job.state.value, stage=progress.get("stage"),
        progress=1.0 if job.state == JobState.SUCCEEDED else progress.get("fraction"),
        step=progress.get("step"), total_steps=progress.get("total"),
        queue_position=position if job.state == JobState.QUEUED else None, eta_s=eta,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        updated_at=job.updated_at, attempts=job.attempts, cancel_requested=job.cancel_requested,
        parameters=params.public(), warnings=params.warnings, error=job.error, takes=takes,
        timings={k: v for k, v in timings.items() if k.endswith("_s")},
        batch={k[len("batch_"):]: int(v) for k, v in timings.items() if k.startswith("batch_")},
        links=links(url, params.model),
    )  # fmt: skip


def links(url: str, model: str) -> dict[str, str]:
    """A job's links; `live` (take 1 heard while it is written) for a model with live audio."""
    out = {"self": url, "events": f"{url}/events", "cancel": f"{url}/cancel", "audio": f"{url}/takes/1/audio"}
    spec = MODELS.get(model)
    if spec is not None and spec.live_audio:
        out["live"] = f"{url}/takes/1/live"
    return out


def sse_frame(
    job: SongJob,
    position: int | None,
    base: str,
    event_id: str,
    full: bool = True,
    *,
    seconds_per_job: float = SECONDS_PER_JOB_ESTIMATE,
) -> bytes:
    """One server-sent event: `id` (for Last-Event-ID) and either the job's full view (event type: its
    status) or, for progress within a status, the compact `progress` event with the fields that move."""
    view = job_view(job, position, base, seconds_per_job=seconds_per_job)
    if full:
        return f"id: {event_id}\nevent: {job.state.value}\ndata: {view.model_dump_json()}\n\n".encode()
    data = view.model_dump_json(include=PROGRESS_FIELDS)
    return f"id: {event_id}\nevent: progress\ndata: {data}\n\n".encode()


# what a `progress` event carries: the fields of JobView that change while a job keeps its status
PROGRESS_FIELDS = {"id", "status", "stage", "progress", "step", "total_steps", "queue_position", "eta_s",
                   "updated_at", "cancel_requested", "attempts"}  # fmt: skip
