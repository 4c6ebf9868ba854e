"""/v1/lyrics/timing: the timed lyrics a song would use, without queuing one. The web UI shows the
timestamps auto-timing chose for plain lyrics (and lets the user move them), and a lyrics error on its
line before anything is submitted. Runs the same validator as POST /v1/songs."""

from __future__ import annotations

import re

from fastapi import APIRouter

from deployments.service.api.deps import ServicesDep
from deployments.service.schemas import LyricsTiming, LyricsTimingView, SongCreate, TimedLine

router = APIRouter(prefix="/v1/lyrics", tags=["lyrics"])
LRC_LINE = re.compile(r"\[(\d+):(\d+(?:\.\d+)?)\](.*)")
PREVIEW_PROMPT = "timing preview"  # the validator wants a style; timing never depends on it


@router.post("/timing", response_model=LyricsTimingView)
async def timing(body: LyricsTiming, services: ServicesDep) -> LyricsTimingView:
    """The lyrics as the model would sing them: LRC kept as given (within the song), plain lines
    timed automatically. Invalid lyrics answer 422 INVALID_LYRICS with `details.line` (1-based)."""
    request = SongCreate(lyrics=body.lyrics, model=body.model, duration_s=body.duration_s,
                         style_prompt=PREVIEW_PROMPT)  # fmt: skip
    params = await services.validate(request)
    lines = [
        TimedLine(time_s=round(int(m.group(1)) * 60 + float(m.group(2)), 3), text=m.group(3).strip())
        for m in map(LRC_LINE.fullmatch, params.lrc.splitlines())
        if m
    ]
    return LyricsTimingView(model=params.model, duration_s=params.duration_s, lrc=params.lrc, lines=lines,
                            warnings=list(params.warnings))  # fmt: skip
