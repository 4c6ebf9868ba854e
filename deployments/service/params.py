"""The internal parameters of one song job: what the validator decided (the timed LRC, frame tokens,
the seed) and what the generator needs. Stored on the job as JSON; one conversion each way."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from musicgen.registry import DEFAULT_MODEL, get_model_spec

_DEFAULT = get_model_spec(DEFAULT_MODEL)  # the validator always sets steps and guidance for the job's model


@dataclass(frozen=True)
class SongParams:
    model: str
    duration_s: float
    lrc: str  # the timed lyrics used (auto-timing's choice for plain lyrics)
    tokens: list[int]  # frame-aligned model token ids
    song_duration: float
    seed: int
    num_takes: int = 1
    steps: int = _DEFAULT.default_steps
    cfg_strength: float = _DEFAULT.default_cfg
    output_format: str = "mp3"
    style_prompt: str | None = None
    reference_audio_id: str | None = None
    edit_source_id: str | None = None
    edit_segments: list[list[float]] | None = None
    webhook_url: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SongParams:
        return cls(**d)

    def public(self) -> dict[str, Any]:
        """The parameters as shown to users (without the token array). Shallow: `asdict` would copy
        every token of a long song, on every status read."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tokens"}
