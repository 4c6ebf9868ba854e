"""From a submitted song (wire model) to SongParams: limits, style checks and the lyrics front end.
This is the CPU-side work of the PromptValidator deployment; no Ray here."""

from __future__ import annotations

import secrets

from deployments.service.errors import ServiceError
from deployments.service.netguard import AddressPolicy, Refused
from deployments.service.params import SongParams
from deployments.service.schemas import SongCreate
from deployments.service.settings import MAX_LYRICS_LINES
from deployments.service.storage import Storage
from musicgen.errors import MusicgenError
from musicgen.lyrics.frontend import LyricsFrontEnd
from musicgen.model.style import check_prompt
from musicgen.registry import get_model_spec


class SongValidator:
    def __init__(
        self,
        frontend: LyricsFrontEnd,
        uploads: Storage,
        default_model: str,
        served_models: set[str],
        webhook_policy: AddressPolicy | None = None,
    ):
        self.frontend, self.uploads = frontend, uploads
        self.default_model, self.served_models = default_model, served_models
        self.webhook_policy = webhook_policy or AddressPolicy()  # no allow-list: public addresses only

    def validate(self, req: SongCreate) -> SongParams:
        try:
            return self._validate(req)
        except MusicgenError as exc:
            raise ServiceError.from_library(exc) from None

    def _validate(self, req: SongCreate) -> SongParams:
        name = req.model or self.default_model
        spec = get_model_spec(name)
        if name not in self.served_models:
            raise ServiceError(
                "INVALID_PARAMETER", f"model {name!r} is not served here",
                recovery=f"use one of: {', '.join(sorted(self.served_models))}", details={"parameter": "model"},
            )  # fmt: skip
        lines = req.lyrics.count("\n") + 1
        if lines > MAX_LYRICS_LINES:  # before any phonemizing: the front end's cost grows with lines
            raise ServiceError(
                "INVALID_LYRICS", f"{lines} lyrics lines; at most {MAX_LYRICS_LINES}",
                recovery="shorten the lyrics: a full-length song has far fewer lines", details={"parameter": "lyrics"},
            )  # fmt: skip
        if (req.style_prompt is None) == (req.reference_audio_id is None):
            raise ServiceError(
                "INVALID_PROMPT", "give exactly one of style_prompt and reference_audio_id",
                recovery="describe the style in style_prompt, or upload a reference song and pass its id",
            )  # fmt: skip
        if req.webhook_url is not None:
            # checked again at each delivery attempt (names may resolve elsewhere by then)
            try:
                self.webhook_policy.check(req.webhook_url)
            except Refused as exc:
                raise ServiceError(
                    "WEBHOOK_URL_REFUSED", f"webhook_url refused: {exc}",
                    details={"parameter": "webhook_url", "reason": str(exc)},
                ) from None  # fmt: skip
        style = check_prompt(req.style_prompt) if req.style_prompt is not None else None
        for upload_id, what in (
            (req.reference_audio_id, "reference_audio_id"),
            (req.edit and req.edit.source_id, "edit.source_id"),
        ):
            if upload_id and not self.uploads.exists(upload_id):
                raise ServiceError(
                    "NOT_FOUND", f"{what} {upload_id!r} is not an upload", details={"parameter": what}
                )
        steps = req.steps if req.steps is not None else spec.default_steps
        spec.check_generation(steps=steps, edit=req.edit is not None)
        seconds = req.duration_s if req.duration_s is not None else spec.min_seconds
        frames = self.frontend.encode(req.lyrics, spec, seconds)
        return SongParams(
            model=name, duration_s=seconds, lrc=frames.lrc, tokens=frames.tokens.tolist(),
            song_duration=frames.song_duration, seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
            num_takes=req.num_takes, steps=steps,
            cfg_strength=req.cfg_strength if req.cfg_strength is not None else spec.default_cfg,
            output_format=req.output_format, style_prompt=style, reference_audio_id=req.reference_audio_id,
            edit_source_id=req.edit.source_id if req.edit else None,
            edit_segments=[list(s) for s in req.edit.segments] if req.edit else None,
            webhook_url=req.webhook_url, warnings=frames.warnings,
        )  # fmt: skip
