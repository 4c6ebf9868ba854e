"""Errors of the library, each with a stable code and a recovery hint.

The service maps `code` to an HTTP status; the CLI prints `message` and `recovery` without a traceback.
"""

from __future__ import annotations


class MusicgenError(Exception):
    """Base class: a problem the user can act on."""

    code = "INTERNAL"
    recovery = "report this as a bug"

    def __init__(self, message: str, *, recovery: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        if recovery is not None:
            self.recovery = recovery
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.message} ({self.recovery})"


class InvalidParameter(MusicgenError):
    code = "INVALID_PARAMETER"
    recovery = "change the parameter named in the message"


class InvalidLyrics(MusicgenError):
    code = "INVALID_LYRICS"
    recovery = "fix the lyrics line named in the message"


class InvalidPrompt(MusicgenError):
    code = "INVALID_PROMPT"
    recovery = "give a non-empty style prompt or a reference clip of at least 10 seconds"


class UnsupportedMedia(MusicgenError):
    code = "UNSUPPORTED_MEDIA"
    recovery = "use a WAV, FLAC, MP3 or OGG file"


class ModelNotAvailable(MusicgenError):
    """Weights missing from the cache (and not downloadable now) or not in the official format."""

    code = "MODEL_NOT_LOADED"
    recovery = "download the weights with `musicgen models pull`"


class CheckpointMismatch(ModelNotAvailable):
    """A checkpoint whose keys or shapes are not those of the model it was loaded for."""

    recovery = "check that the file is the official checkpoint of the model you chose"


class GenerationCanceled(MusicgenError):
    code = "CANCELED"
    recovery = "submit the song again if you still want it"


class OutOfMemory(MusicgenError):
    code = "OUT_OF_MEMORY"
    recovery = "try a shorter song or fewer takes"


# every code the library raises, with the class that carries its default recovery hint
LIBRARY_ERRORS: dict[str, type[MusicgenError]] = {
    cls.code: cls
    for cls in (InvalidParameter, InvalidLyrics, InvalidPrompt, UnsupportedMedia, ModelNotAvailable,
                GenerationCanceled, OutOfMemory)
}  # fmt: skip
