"""/v1/uploads: reference songs and songs to edit. The body is streamed to a temporary file (never
held whole in memory), identified by its bytes, decoded off the event loop, then stored; the job
store records who uploaded it. With API keys, only its uploader (or an admin key) sees it and may
name it in a submission. It is deleted after the retention period (retention.py)."""

from __future__ import annotations

import asyncio
import re
import tempfile
import uuid
from pathlib import Path

from fastapi import APIRouter, Request

from deployments.service.api.deps import CallerDep, ServicesDep, StoreDep
from deployments.service.errors import ServiceError
from deployments.service.media import sniff_audio
from deployments.service.schemas import UploadView, error_responses

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])
_SPOOL_BYTES = 1 << 20  # written to disk (in a thread) a megabyte at a time
UPLOAD_ID = re.compile(r"[0-9a-f]{32}\.(wav|flac|mp3|ogg)")


@router.post(
    "",
    status_code=201,
    response_model=UploadView,
    responses=error_responses(413, 415),
    openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                       "format": "binary"}}},
                                   "required": True}},
)  # fmt: skip
async def upload(request: Request, services: ServicesDep, caller: CallerDep) -> UploadView:
    """The raw bytes of a WAV, FLAC, MP3 or OGG file as the body."""
    cfg = services.config
    limit = cfg.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServiceError("PAYLOAD_TOO_LARGE", f"{declared} bytes; at most {limit}")
    with tempfile.TemporaryDirectory(prefix="musicgen-upload-") as tmp:
        path = Path(tmp) / "upload"
        size, head = 0, b""
        with open(path, "wb") as f:
            buffer = bytearray()
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ServiceError("PAYLOAD_TOO_LARGE", f"more than {limit} bytes")
                if len(head) < 16:
                    head += chunk[: 16 - len(head)]
                buffer += chunk
                if len(buffer) >= _SPOOL_BYTES:
                    await asyncio.to_thread(f.write, bytes(buffer))
                    buffer.clear()
            await asyncio.to_thread(f.write, bytes(buffer))
        kind = sniff_audio(head)
        if kind is None:
            raise ServiceError("UNSUPPORTED_MEDIA", "the upload is not WAV, FLAC, MP3 or OGG audio")
        loop = asyncio.get_running_loop()
        try:
            from musicgen.audio import audio_info

            seconds, sr, channels = await loop.run_in_executor(services.audio_pool, audio_info, path)
        except Exception:
            raise ServiceError("UNSUPPORTED_MEDIA", f"the {kind} upload cannot be decoded") from None
        if seconds > cfg.max_upload_seconds:
            raise ServiceError(
                "PAYLOAD_TOO_LARGE", f"{seconds:.0f} s of audio; at most {cfg.max_upload_seconds:.0f} s"
            )
        upload_id = f"{uuid.uuid4().hex}.{kind}"
        await services.store.expire_upload(upload_id)  # first: no stored upload without a deletion date
        await asyncio.to_thread(services.uploads.put_file, upload_id, path)
    view = UploadView(id=upload_id, format=kind, duration_s=seconds, sample_rate=sr, channels=channels)
    await services.store.put_upload(upload_id, caller.owner, view.model_dump(exclude={"id"}))
    return view


@router.get("/{upload_id}", response_model=UploadView, responses=error_responses(404))
async def upload_info(upload_id: str, store: StoreDep, caller: CallerDep) -> UploadView:
    """An upload as POST /v1/uploads described it; another key's answers 404, as a missing one."""
    found = await store.upload(upload_id) if UPLOAD_ID.fullmatch(upload_id) else None
    if found is None or not caller.owns(found[0]):
        raise ServiceError("NOT_FOUND", f"no upload {upload_id!r}")
    return UploadView(id=upload_id, **found[1])
