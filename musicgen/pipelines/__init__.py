"""Song pipelines: `Pipeline.from_pretrained(name)` loads any model of the registry and returns its
family's pipeline (`DR1Pipeline` for DiffRhythm 1, `DR2Pipeline` for DiffRhythm 2), which all generate
through the same interface."""

from musicgen.pipelines.base import (
    MAX_SEED,
    MAX_TAKES,
    AudioCallback,
    EditSpec,
    Pipeline,
    Progress,
    ProgressCallback,
    SongRequest,
    SongResult,
)
from musicgen.pipelines.dr1 import DR1Pipeline
from musicgen.pipelines.dr2 import DR2Pipeline

__all__ = [
    "MAX_SEED",
    "MAX_TAKES",
    "AudioCallback",
    "DR1Pipeline",
    "DR2Pipeline",
    "EditSpec",
    "Pipeline",
    "Progress",
    "ProgressCallback",
    "SongRequest",
    "SongResult",
]
