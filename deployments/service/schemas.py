"""Wire models of the REST API: strict (unknown fields are rejected), converted once into SongParams."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.service.settings import MAX_STEPS
from musicgen.pipelines.base import MAX_TAKES
from musicgen.registry import family_defaults

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
UPLOAD_ID_PATTERN = r"^[0-9a-f]{32}\.(wav|flac|mp3|ogg)$"  # as POST /v1/uploads names them


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EditRequest(Strict):
    source_id: str = Field(
        pattern=UPLOAD_ID_PATTERN, description="upload id of the song to edit (POST /v1/uploads)"
    )
    segments: list[tuple[float, float]] = Field(
        min_length=1,
        max_length=16,
        description="[start, end] seconds to regenerate; -1 = start/end of the song",
    )


class SongCreate(Strict):
    lyrics: str = Field(
        "", max_length=20_000, description="LRC ([mm:ss.xx]line) or plain lines; empty = instrumental"
    )
    style_prompt: str | None = Field(None, max_length=512, description="text description of the style")
    reference_audio_id: str | None = Field(
        None, pattern=UPLOAD_ID_PATTERN, description="upload id of a reference song (>= 10 s)"
    )
    duration_s: float | None = Field(None, description="song length; default: the model's shortest")
    model: str | None = Field(None, description="model name; default: the service's default model")
    seed: int | None = Field(None, ge=0, le=2**62, description="take i uses seed + i; default: random")
    num_takes: int = Field(1, ge=1, le=MAX_TAKES)
    steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description=f"sampling steps; default: the model's ({family_defaults('steps')})",
    )
    cfg_strength: float | None = Field(
        None,
        ge=0.0,
        le=20.0,
        description=f"guidance strength; default: the model's ({family_defaults('cfg_strength')})",
    )
    output_format: Literal["wav", "flac", "mp3"] = "mp3"
    edit: EditRequest | None = None
    webhook_url: str | None = Field(
        None, max_length=2048,
        description="POSTed the finished job, signed (X-Musicgen-Signature); http(s), public addresses only",
    )  # fmt: skip


class LyricsTiming(Strict):
    lyrics: str = Field(max_length=20_000, description="LRC or plain lines (section tags allowed)")
    model: str | None = Field(None, description="model name; default: the service's default model")
    duration_s: float | None = Field(None, description="song length; default: the model's shortest")


class TimedLine(Strict):
    time_s: float
    text: str


class LyricsTimingView(Strict):
    model: str
    duration_s: float
    lrc: str = Field(description="the timed lyrics a song with these lyrics would use")
    lines: list[TimedLine]
    warnings: list[str] = []


class ErrorBody(Strict):
    code: str
    message: str
    recovery: str
    details: dict = {}


class ErrorResponse(Strict):
    """The body of every error answer."""

    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` entries for these statuses, all with the error body."""
    return {status: {"model": ErrorResponse} for status in statuses}


# what any operation may answer: a malformed request (400), a body over the limit (413), invalid
# fields (422), an unexpected failure (500), the job store unreachable (503)
COMMON_ERRORS = error_responses(400, 413, 422, 500, 503)
# what any operation that needs an API key may answer besides: no valid key (401), rate limited (429)
AUTH_ERRORS = error_responses(401, 429)


class TakeView(Strict):
    n: int
    format: str
    duration_s: float
    seed: int
    audio_url: str


class JobView(Strict):
    id: str
    status: str
    stage: str | None = None
    progress: float | None = None
    step: int | None = None
    total_steps: int | None = None
    queue_position: int | None = None
    eta_s: float | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None  # the job's last change, as its writer's clock saw it
    attempts: int = 0
    cancel_requested: bool = False
    parameters: dict
    warnings: list[str] = []
    error: ErrorBody | None = None
    takes: list[TakeView] = []
    timings: dict[str, float] = {}  # seconds per stage of the finished job (style, sampling, decoding, ...)
    batch: dict[str, int] = {}  # the sampler batch the job ran in: {"requests": jobs, "takes": takes}
    links: dict[str, str]


class ModelView(Strict):
    name: str
    loaded: bool
    status: str
    min_seconds: float
    max_seconds: float
    max_takes: int
    untrained: bool
    timed_lyrics: bool = True  # DiffRhythm 1: LRC timestamps place the lines; DiffRhythm 2: section tags only
    edits: bool = True  # regenerating a section of a song (DiffRhythm 1 only)
    live_audio: bool = False  # takes heard while written: GET .../takes/{n}/live (DiffRhythm 2 only)
    sample_rate: int = 44_100
    default_steps: int  # what a song without `steps` samples with
    default_cfg: float  # and without `cfg_strength`


def model_view(spec, loaded: bool, status: str, max_takes: int) -> dict:
    """GET /v1/models's entry for a registry ModelSpec."""
    return {"name": spec.name, "loaded": loaded, "status": status, "min_seconds": spec.min_seconds,
            "max_seconds": spec.max_seconds, "max_takes": max_takes, "untrained": spec.untrained,
            "timed_lyrics": spec.timed_lyrics, "edits": spec.edits, "live_audio": spec.live_audio,
            "sample_rate": spec.sample_rate,
            "default_steps": spec.default_steps, "default_cfg": spec.default_cfg}  # fmt: skip


class UploadView(Strict):
    id: str
    format: str
    duration_s: float
    sample_rate: int
    channels: int
