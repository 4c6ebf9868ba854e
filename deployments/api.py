"""The REST API under /v1 (FastAPI), built from its collaborators so that it runs without Ray in tests:
the job store, a validator (lyrics and limits), a dispatcher that hands a job id to the GPU workers,
and the storage folders. The Ray Serve ingress wraps this app.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deployments.api_models import JobView, SongCreate, TakeView
from deployments.errors import ServiceError
from deployments.jobs import JobState, JobStore, SongJob, events_channel
from deployments.params import SongParams
from deployments.storage import Storage

MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "ogg": "audio/ogg"}
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class ApiConfig:
    max_queue: int = 100
    max_upload_bytes: int = 50 * 1024 * 1024
    max_upload_seconds: float = 600.0
    seconds_per_job_estimate: float = 60.0  # ETA before measured timings exist
    sse_keepalive_s: float = 15.0
    webhook_secret: str = ""  # signs webhooks of jobs that end here (canceled while queued)


def sniff_audio(head: bytes) -> str | None:
    """The container from the first bytes, whatever the file name or Content-Type claims."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def create_api(
    store: JobStore,
    validate: Callable[[SongCreate], SongParams],
    dispatch: Callable[[str], None],
    results: Storage,
    uploads: Storage,
    *,
    ready: Callable[[], tuple[bool, str]] = lambda: (True, "ready"),
    models: Callable[[], list[dict]] = lambda: [],
    config: ApiConfig | None = None,
) -> FastAPI:
    cfg = config or ApiConfig()
    app = FastAPI(
        title="musicgen",
        version="1",
        description="DiffRhythm song generation: submit, watch, cancel and download songs.",
    )

    # -- errors ------------------------------------------------------------------------------

    def error_response(err: ServiceError, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": err.to_dict()}, status_code=err.status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError):
        headers = (
            {"Retry-After": str(exc.details.get("retry_after_s", 10))} if exc.code == "QUEUE_FULL" else None
        )
        return error_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(
            ServiceError(
                "INVALID_PARAMETER", f"{where or 'request'}: {first.get('msg', 'invalid')}",
                recovery="see the OpenAPI spec at /openapi.json for the accepted fields and ranges",
                details={"parameter": where, "errors": json.loads(json.dumps(exc.errors(), default=str))},
            )
        )  # fmt: skip

    @app.exception_handler(redis.RedisError)
    async def _store_down(_: Request, exc: redis.RedisError):
        return error_response(
            ServiceError("STORE_UNAVAILABLE", f"job store unavailable: {type(exc).__name__}")
        )

    # -- views -------------------------------------------------------------------------------

    def view(job: SongJob, base: str) -> JobView:
        params = SongParams.from_dict(job.params)
        pos = store.queue_position(job.id) if job.state == JobState.QUEUED else None
        eta = None
        if pos is not None:
            eta = (pos + 1) * cfg.seconds_per_job_estimate
        elif (
            job.state == JobState.RUNNING
            and job.progress.get("fraction")
            and job.progress.get("stage") == "sampling"
        ):
            elapsed = time.time() - (job.started_at or time.time())
            eta = elapsed * (1 - job.progress["fraction"]) / max(job.progress["fraction"], 1e-3)
        timings = (job.result or {}).get("timings", {})
        takes = [
            TakeView(n=t["n"], format=t["format"], duration_s=t["duration_s"], seed=t["seed"],
                     audio_url=f"{base}/v1/songs/{job.id}/takes/{t['n']}/audio")
            for t in (job.result or {}).get("takes", [])
        ]  # fmt: skip
        return JobView(
            id=job.id, status=job.state.value, stage=job.progress.get("stage"),
            progress=1.0 if job.state == JobState.SUCCEEDED else job.progress.get("fraction"),
            step=job.progress.get("step"), total_steps=job.progress.get("total"), queue_position=pos,
            eta_s=eta, created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
            attempts=job.attempts, parameters=params.public(), warnings=params.warnings,
            error=job.error, takes=takes,
            timings={k: v for k, v in timings.items() if k.endswith("_s")},
            batch={k[len("batch_"):]: int(v) for k, v in timings.items() if k.startswith("batch_")},
            links={
                "self": f"{base}/v1/songs/{job.id}", "events": f"{base}/v1/songs/{job.id}/events",
                "cancel": f"{base}/v1/songs/{job.id}/cancel", "audio": f"{base}/v1/songs/{job.id}/takes/1/audio",
            },
        )  # fmt: skip

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def get_job(job_id: str) -> SongJob:
        job = store.get(job_id) if re.fullmatch(r"[0-9a-f]{32}", job_id) else None
        if job is None:
            raise ServiceError("NOT_FOUND", f"no song job {job_id!r}")
        return job

    # -- routes ------------------------------------------------------------------------------

    @app.post("/v1/songs", status_code=202, response_model=JobView)
    def submit(
        body: SongCreate, request: Request, idempotency_key: str | None = Header(None, max_length=200)
    ):
        ok, why = ready()
        if not ok:
            raise ServiceError("MODEL_NOT_LOADED", why)
        params = validate(body)
        depth = store.queue_depth()
        if depth >= cfg.max_queue:
            retry = int(cfg.seconds_per_job_estimate)
            raise ServiceError(
                "QUEUE_FULL", f"{depth} songs are waiting; the queue holds {cfg.max_queue}",
                details={"retry_after_s": retry},
            )  # fmt: skip
        job, created = store.create(params.to_dict(), idempotency_key=idempotency_key)
        if created:
            dispatch(job.id)
        return view(job, base_url(request))

    @app.get("/v1/songs", response_model=list[JobView])
    def list_songs(request: Request, limit: int = Query(20, ge=1, le=100), before: float | None = None):
        return [view(j, base_url(request)) for j in store.recent(limit=limit, before=before)]

    @app.get("/v1/songs/{job_id}", response_model=JobView)
    def status(job_id: str, request: Request):
        return view(get_job(job_id), base_url(request))

    @app.post("/v1/songs/{job_id}/cancel", response_model=JobView)
    def cancel(job_id: str, request: Request):
        was = get_job(job_id)
        if store.cancel(job_id) == JobState.CANCELED and was.state == JobState.QUEUED:
            # it ended here, not on a worker: its webhook goes from here
            from deployments.webhooks import notify

            notify(store, get_job(job_id), cfg.webhook_secret)
        return view(get_job(job_id), base_url(request))

    @app.get("/v1/songs/{job_id}/events")
    def events(job_id: str, request: Request):
        get_job(job_id)
        base = base_url(request)

        def stream() -> Iterator[str]:
            pubsub = store.r.pubsub()
            pubsub.subscribe(events_channel(job_id))
            try:
                last, last_sent = None, time.monotonic()
                while True:
                    job = store.get(job_id)
                    if job is None:
                        return
                    payload = view(job, base).model_dump_json()
                    if payload != last:
                        yield f"event: {job.state.value}\ndata: {payload}\n\n"
                        last, last_sent = payload, time.monotonic()
                    if job.state.finished:
                        return
                    if time.monotonic() - last_sent > cfg.sse_keepalive_s:
                        yield ": keep-alive\n\n"
                        last_sent = time.monotonic()
                    pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            finally:
                pubsub.close()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/v1/songs/{job_id}/takes/{n}/audio")
    def audio(
        job_id: str, n: int, range_header: str | None = Header(None, alias="Range"), format: str | None = None
    ):
        job = get_job(job_id)
        if job.state != JobState.SUCCEEDED:
            raise ServiceError("NOT_FOUND", f"song {job_id} has no audio yet (status {job.state.value})",
                               recovery="wait until the job has succeeded")  # fmt: skip
        takes = {t["n"]: t for t in job.result["takes"]}
        if n not in takes:
            raise ServiceError("NOT_FOUND", f"song {job_id} has takes {sorted(takes)}, not {n}")
        key, fmt = takes[n]["key"], takes[n]["format"]
        if format and format != fmt:
            key, fmt = _converted(results, key, format), format
        size = results.size(key)
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{job_id}-take{n}.{fmt}"',
        }
        if range_header:
            m = _RANGE.match(range_header.strip())
            start, end = (m.group(1), m.group(2)) if m else ("", "")
            if not m or (start == "" and end == ""):
                return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
            if start == "":
                first, last = max(0, size - int(end)), size - 1
            else:
                first, last = int(start), min(int(end) if end else size - 1, size - 1)
            if first > last or first >= size:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            return Response(
                results.read_range(key, first, last), 206, headers=headers, media_type=MEDIA_TYPES[fmt]
            )
        return Response(
            results.read_range(key, 0, size - 1), 200, headers=headers, media_type=MEDIA_TYPES[fmt]
        )

    @app.post("/v1/uploads", status_code=201)
    async def upload(request: Request):
        declared = int(request.headers.get("content-length") or 0)
        if declared > cfg.max_upload_bytes:
            raise ServiceError("PAYLOAD_TOO_LARGE", f"{declared} bytes; at most {cfg.max_upload_bytes}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > cfg.max_upload_bytes:
                raise ServiceError("PAYLOAD_TOO_LARGE", f"more than {cfg.max_upload_bytes} bytes")
        kind = sniff_audio(bytes(data[:16]))
        if kind is None:
            raise ServiceError("UNSUPPORTED_MEDIA", "the upload is not WAV, FLAC, MP3 or OGG audio")
        upload_id = f"{uuid.uuid4().hex}.{kind}"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / upload_id
            path.write_bytes(bytes(data))
            try:
                from musicgen.audio import audio_info

                seconds, sr, channels = audio_info(path)
            except Exception:
                raise ServiceError("UNSUPPORTED_MEDIA", f"the {kind} upload cannot be decoded") from None
            if seconds > cfg.max_upload_seconds:
                raise ServiceError(
                    "PAYLOAD_TOO_LARGE", f"{seconds:.0f} s of audio; at most {cfg.max_upload_seconds:.0f} s"
                )
            await asyncio.to_thread(uploads.put_file, upload_id, path)
        return {
            "id": upload_id,
            "format": kind,
            "duration_s": seconds,
            "sample_rate": sr,
            "channels": channels,
        }

    @app.get("/v1/models")
    def list_models():
        return models()

    @app.get("/metrics")
    def metrics():
        from deployments.metrics import queue_metrics_text

        return Response(queue_metrics_text(store), media_type="text/plain; version=0.0.4")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        ok, why = ready()
        store.r.ping()
        return JSONResponse({"ready": ok, "reason": why}, status_code=200 if ok else 503)

    return app


def _converted(results: Storage, key: str, fmt: str) -> str:
    """The take in another format, converted once and kept next to the original."""
    if fmt not in MEDIA_TYPES or fmt == "ogg":
        raise ServiceError(
            "INVALID_PARAMETER", f"format {fmt!r} is not offered", recovery="use wav, flac or mp3"
        )
    target = str(Path(key).with_suffix("." + fmt))
    if not results.exists(target):
        from musicgen.audio import read_audio, write_audio

        with results.local_copy(key) as local:
            audio, sr = read_audio(local)
        with tempfile.TemporaryDirectory() as tmp:
            results.put_file(target, write_audio(Path(tmp) / f"take.{fmt}", audio, sr, fmt))
    return target
