"""/v1/songs: submit, list, read, cancel and follow song jobs, and download their takes. With API keys,
a caller sees only its own jobs (an admin key sees all): another key's job answers 404, word for word
as a missing one does."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from deployments.service.api.deps import (
    BaseUrl,
    Caller,
    CallerDep,
    ConfigDep,
    ServicesDep,
    StoreDep,
    retry_after,
)
from deployments.service.api.views import job_view
from deployments.service.errors import ServiceError
from deployments.service.live import follow
from deployments.service.media import MEDIA_TYPES, RangeNotSatisfiable, parse_range
from deployments.service.params import SongParams
from deployments.service.schemas import JOB_ID_PATTERN, JobView, SongCreate, error_responses
from deployments.service.store import AsyncJobStore, JobState, QueueFull, QuotaExceeded, SongJob, event_order
from musicgen.registry import MODELS

router = APIRouter(prefix="/v1/songs", tags=["songs"])
JOB_ID = re.compile(JOB_ID_PATTERN)
_ERRORS = error_responses(404)


def not_found(job_id: str) -> ServiceError:
    return ServiceError("NOT_FOUND", f"no song job {job_id!r}")


async def load_job(store: AsyncJobStore, job_id: str, caller: Caller) -> tuple[SongJob, int | None]:
    job, position = await store.get_with_position(job_id) if JOB_ID.fullmatch(job_id) else (None, None)
    if job is None or not caller.owns(job.owner):
        raise not_found(job_id)
    return job, position


async def check_references(store: AsyncJobStore, body: SongCreate, caller: Caller) -> None:
    """A submission may name the caller's own uploads only: another key's answers as a missing one
    (the validator's words), before any work."""
    if caller.sees_all:
        return  # the validator checks that they exist
    for upload_id, what in ((body.reference_audio_id, "reference_audio_id"),
                            (body.edit and body.edit.source_id, "edit.source_id")):  # fmt: skip
        found = await store.upload(upload_id) if upload_id else None
        if upload_id and (found is None or found[0] != caller.owner):
            raise ServiceError(
                "NOT_FOUND", f"{what} {upload_id!r} is not an upload", details={"parameter": what}
            )


def quota_error(exc: QuotaExceeded, audio_s: float, seconds_per_job: float) -> ServiceError:
    """QUOTA_EXCEEDED with when to retry: when the UTC day ends, for the daily quotas; for the songs
    at once, about when the key's oldest running song ends, else its first queued one ((queue rank + 1)
    songs from now, at the queue's estimate per song)."""
    now = time.time()
    if exc.day_ends_at is not None:
        wait = exc.day_ends_at - now
    elif exc.quota == "active_jobs" and exc.first_start is not None:
        wait = exc.first_start + seconds_per_job - now
    elif exc.first_rank is not None:
        wait = (exc.first_rank + 1) * seconds_per_job
    else:
        wait = seconds_per_job
    limit, used = f"{exc.limit:g}", f"{exc.used:g}"
    message = {
        "active_jobs": f"this key has {used} songs queued or running; its quota is {limit} at once",
        "queued_jobs": f"this key has {used} songs waiting in the queue; its quota is {limit}",
        "songs_per_day": f"this key submitted {used} songs today (UTC); its quota is {limit} a day",
        "audio_s_per_day": f"this key asked for {used} s of audio today (UTC) and this song for {audio_s:g} s "
        f"(duration x takes); its quota is {limit} s a day",
    }[exc.quota]
    return ServiceError(
        "QUOTA_EXCEEDED", message,
        details={"quota": exc.quota, "limit": exc.limit, "used": exc.used, "retry_after_s": retry_after(wait)},
    )  # fmt: skip


@router.post("", status_code=202, response_model=JobView, responses=error_responses(404, 429, 507))
async def submit(
    body: SongCreate,
    services: ServicesDep,
    base: BaseUrl,
    caller: CallerDep,
    idempotency_key: str | None = Header(None, max_length=200),
) -> JobView:
    """Queue a song. Idempotency-Key (per API key): a repeated submission returns the first one's job."""
    ok, why = await services.ready()
    if not ok:
        raise ServiceError("MODEL_NOT_LOADED", why)
    await check_references(services.store, body, caller)
    params = await services.validate(body)
    await services.fits(params)
    cfg = services.config
    try:
        job, created = await services.store.create(
            params.to_dict(), idempotency_key=idempotency_key, max_queue=cfg.max_queue, owner=caller.owner,
            quotas=caller.key.quotas(cfg.quotas) if caller.key else None,
        )  # fmt: skip
    except QueueFull as full:
        raise ServiceError(
            "QUEUE_FULL", f"{full.depth} songs are waiting; the queue holds {cfg.max_queue}",
            details={"retry_after_s": int(cfg.seconds_per_job_estimate)},
        ) from None  # fmt: skip
    except QuotaExceeded as exc:
        audio_s = params.duration_s * params.num_takes
        raise quota_error(exc, audio_s, cfg.seconds_per_job_estimate) from None
    if created:
        services.dispatch(job.id)
    position = await services.store.queue_position(job.id) if job.state == JobState.QUEUED else None
    return job_view(job, position, base, seconds_per_job=cfg.seconds_per_job_estimate)


@router.get("", response_model=list[JobView])
async def list_songs(
    store: StoreDep,
    base: BaseUrl,
    caller: CallerDep,
    limit: int = Query(20, ge=1, le=100),
    before: float | None = Query(None, allow_inf_nan=False, description="created_at of the last job seen"),
) -> list[JobView]:
    """The caller's jobs (an admin's or, without keys, everyone's), newest first."""
    jobs = await store.recent(limit=limit, before=before, owner="" if caller.sees_all else caller.owner)
    positions = await store.queue_positions([j.id for j in jobs])
    return [job_view(j, p, base) for j, p in zip(jobs, positions, strict=True)]


@router.get("/{job_id}", response_model=JobView, responses=_ERRORS)
async def status(job_id: str, store: StoreDep, cfg: ConfigDep, base: BaseUrl, caller: CallerDep) -> JobView:
    job, position = await load_job(store, job_id, caller)
    return job_view(job, position, base, seconds_per_job=cfg.seconds_per_job_estimate)


@router.post("/{job_id}/cancel", response_model=JobView, responses=_ERRORS)
async def cancel(job_id: str, store: StoreDep, cfg: ConfigDep, base: BaseUrl, caller: CallerDep) -> JobView:
    """A queued job is canceled at once (its webhook is queued by the same step); a running one stops
    before its next sampling step."""
    await load_job(store, job_id, caller)
    await store.cancel(job_id)
    job, position = await load_job(store, job_id, caller)
    return job_view(job, position, base, seconds_per_job=cfg.seconds_per_job_estimate)


@router.get(
    "/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}, **_ERRORS},
)
async def events(
    job_id: str,
    request: Request,
    services: ServicesDep,
    base: BaseUrl,
    caller: CallerDep,
    last_event_id: str | None = Header(None, max_length=64),
):
    """The job as server-sent events, each with an `id` (send it back as Last-Event-ID to resume).
    The first event is the job as it is now (or, with Last-Event-ID, every event after that one):
    `event` is its status and `data` its full view, as GET /v1/songs/{id}. Then one event per change
    until the job ends: a change of status comes as the full view again; progress within a status as
    `event: progress` with the fields that move (status, stage, progress, step, total_steps,
    queue_position, eta_s, updated_at, cancel_requested, attempts). A client that already saw the
    final event gets 204 (EventSource then stops reconnecting). Comments (`: keep-alive`) every 15 s."""
    store, hub = services.store, services.hub
    if not JOB_ID.fullmatch(job_id) or (not caller.sees_all and await store.owner(job_id) != caller.owner):
        raise not_found(job_id)
    if last_event_id is not None and not re.fullmatch(r"\d+-\d+", last_event_id):
        last_event_id = None  # not one of ours: start from the job as it is now
    # a job that other streams follow is already known to the hub: its parameters and latest update
    # come from memory (no Redis read, and the first frame is rendered once for all of them)
    params = hub.params(job_id) or await store.params(job_id)
    if params is None:
        raise not_found(job_id)
    listener = hub.listen(job_id, params)  # before reading the backlog: nothing falls in between
    try:
        if last_event_id:
            backlog = [hub.update(e, params, None) for e in await store.events_after(job_id, last_event_id)]
        else:
            latest = hub.latest(job_id)
            if latest is None:
                event = await store.last_event(job_id)
                latest = hub.update(event, params, None) if event else None
            backlog = [latest] if latest else []
        if not backlog:
            seen = await store.last_event(job_id)
            if seen is not None and seen.state.finished:
                hub.unlisten(listener)
                return Response(status_code=204)
        if backlog and backlog[-1].job.state == JobState.QUEUED and backlog[-1].position is None:
            backlog[-1] = backlog[-1].moved(await store.queue_position(job_id))
    except BaseException:
        hub.unlisten(listener)
        raise
    keepalive = services.config.sse_keepalive_s

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 2000\n\n"
            # what was sent last: (event order, queue position, status); an event comes again only
            # when its job moved in the queue
            sent: tuple[tuple[int, int], int | None, JobState | None] | None = (
                (event_order(last_event_id), None, None) if last_event_id else None
            )
            for i, update in enumerate(backlog):
                yield update.frame(base, full=sent is None or i == 0 or update.job.state != sent[2])
                sent = event_order(update.event.id), update.position, update.job.state
                if update.final:
                    return
            while True:
                received = await listener.next(keepalive)
                if received is None:
                    yield b": keep-alive\n\n"
                    continue
                update = received
                order = event_order(update.event.id)
                if sent is not None and (
                    order < sent[0] or (order == sent[0] and update.position == sent[1])
                ):
                    continue  # already sent (from the backlog, or announced while it was read)
                yield update.frame(base, full=sent is None or update.job.state != sent[2])
                sent = order, update.position, update.job.state
                if update.final:
                    return
        finally:
            hub.unlisten(listener)

    return StreamingResponse(
        stream(), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )  # fmt: skip


@router.get(
    "/{job_id}/takes/{n}/audio",
    responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}, 206: {"description": "a byte range"},
               416: {"description": "range not satisfiable"}, **_ERRORS},
)  # fmt: skip
async def audio(
    job_id: str,
    n: int,
    services: ServicesDep,
    caller: CallerDep,
    range_header: str | None = Header(None, alias="Range"),
    format: str | None = None,
):
    job, _ = await load_job(services.store, job_id, caller)
    if job.state != JobState.SUCCEEDED:
        raise ServiceError("NOT_FOUND", f"song {job_id} has no audio yet (status {job.state.value})",
                           recovery="wait until the job has succeeded")  # fmt: skip
    takes = {t["n"]: t for t in (job.result or {}).get("takes", [])}
    if n not in takes:
        raise ServiceError("NOT_FOUND", f"song {job_id} has takes {sorted(takes)}, not {n}")
    results = services.results
    key, fmt = takes[n]["key"], takes[n]["format"]
    try:
        if format and format != fmt:
            converter = services.converter
            converter.target(key, format)  # refuses unknown formats before any work
            loop = asyncio.get_running_loop()
            key, fmt = await loop.run_in_executor(services.audio_pool, converter.convert, key, format), format
        size = await asyncio.to_thread(results.size, key)
    except FileNotFoundError:
        raise ServiceError("NOT_FOUND", f"take {n} of song {job_id} is no longer stored",
                           recovery="generate the song again") from None  # fmt: skip
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'inline; filename="{job_id}-take{n}.{fmt}"'}
    first, last, status_code = 0, size - 1, 200
    if range_header:
        try:
            first, last = parse_range(range_header, size)
        except RangeNotSatisfiable:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        status_code = 206
    headers["Content-Length"] = str(last - first + 1)
    return StreamingResponse(
        _read_off_loop(results.iter_range(key, first, last), services.audio_pool),
        status_code=status_code, headers=headers, media_type=MEDIA_TYPES[fmt],
    )  # fmt: skip


@router.get(
    "/{job_id}/takes/{n}/live",
    responses={200: {"content": {"audio/mpeg": {}}, "description": "the take's MP3, streamed as it is written"},
               206: {"description": "the finished take from `offset` or a byte range"},
               409: {"description": "the model has no live audio (NO_LIVE_AUDIO)"},
               416: {"description": "a finished take, asked from past its end"}, **_ERRORS},
)  # fmt: skip
async def live(
    job_id: str,
    n: int,
    services: ServicesDep,
    caller: CallerDep,
    offset: int = Query(0, ge=0, le=2**40, description="bytes already received: resume after them"),
    range_header: str | None = Header(None, alias="Range"),
):
    """The take as an MP3 stream while it is written (DiffRhythm 2): it starts as soon as the first
    samples are final, whenever the job started, and ends with the take. Several listeners at once,
    each from the start; a client whose connection broke asks again with `offset` = the bytes it has
    and gets the rest (the same bytes the take's MP3 file holds). Once the job has succeeded this is
    that file (with byte ranges), as the audio route's `format=mp3` gives it."""
    job, _ = await load_job(services.store, job_id, caller)
    params = SongParams.from_dict(job.params)
    spec = MODELS.get(params.model)
    if spec is None or not spec.live_audio:
        raise ServiceError("NO_LIVE_AUDIO", f"{params.model} writes a song whole: it has no live audio")
    if not 1 <= n <= params.num_takes:
        raise ServiceError("NOT_FOUND", f"song {job_id} has takes 1 to {params.num_takes}, not {n}")
    if job.state == JobState.SUCCEEDED:
        if offset and not range_header:
            range_header = f"bytes={offset}-"
        return await audio(job_id, n, services, caller, range_header, "mp3")
    if job.state.finished:
        raise ServiceError("NOT_FOUND", f"song {job_id} has no audio (status {job.state.value})",
                           recovery="submit the song again")  # fmt: skip

    async def stored(start: int) -> AsyncIterator[bytes]:
        done, _ = await load_job(services.store, job_id, caller)
        takes = {t["n"]: t for t in (done.result or {}).get("takes", [])}
        key = takes[n]["key"]
        loop = asyncio.get_running_loop()
        key = await loop.run_in_executor(services.audio_pool, services.converter.convert, key, "mp3")
        size = await asyncio.to_thread(services.results.size, key)
        if start < size:
            async for chunk in _read_off_loop(
                services.results.iter_range(key, start, size - 1), services.audio_pool
            ):
                yield chunk

    return StreamingResponse(
        follow(services.store, job_id, n, offset, stored), media_type="audio/mpeg",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Live-Offset": str(offset)},
    )  # fmt: skip


async def _read_off_loop(chunks: Iterator[bytes], pool) -> AsyncIterator[bytes]:
    """A blocking iterator read on a thread pool, a chunk at a time (Starlette's own way for sync
    iterators goes through anyio, whose every hop walks all the loop's tasks)."""
    loop = asyncio.get_running_loop()
    try:
        while (chunk := await loop.run_in_executor(pool, next, chunks, None)) is not None:
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await loop.run_in_executor(pool, close)
