"""Audio files in and out: reading (WAV, FLAC, MP3, OGG through libsndfile), writing WAV, FLAC or MP3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from musicgen.errors import InvalidParameter, UnsupportedMedia

OUTPUT_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III")}


def audio_info(path: str | Path) -> tuple[float, int, int]:
    """(duration in seconds, sample rate, channels) of an audio file."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise UnsupportedMedia(f"audio file {path} does not exist", recovery="check the path")
    try:
        info = sf.info(str(path))
    except Exception as exc:
        raise UnsupportedMedia(f"cannot read {path.name} as audio: {exc}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise UnsupportedMedia(f"{path.name} holds no audio")
    return info.frames / info.samplerate, info.samplerate, info.channels


def read_audio(
    path: str | Path, *, offset_s: float = 0.0, duration_s: float | None = None
) -> tuple[torch.Tensor, int]:
    """(channels, samples) fp32 and the sample rate; a window of the file when offset/duration are given."""
    import soundfile as sf

    _, sr, _ = audio_info(path)
    start = int(round(offset_s * sr))
    stop = None if duration_s is None else start + int(round(duration_s * sr))
    try:
        data, sr = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as exc:
        raise UnsupportedMedia(f"cannot decode {Path(path).name}: {exc}") from None
    return torch.from_numpy(np.ascontiguousarray(data.T)), sr


def resample(audio: torch.Tensor, sr_in: int, sr_out: int) -> torch.Tensor:
    if sr_in == sr_out:
        return audio
    import torchaudio.functional as AF

    return AF.resample(audio, sr_in, sr_out)


def write_audio(path: str | Path, audio: torch.Tensor, sample_rate: int, fmt: str) -> Path:
    """audio (channels, samples) in [-1, 1] -> file; returns the path written."""
    import soundfile as sf

    if fmt not in OUTPUT_FORMATS:
        raise InvalidParameter(
            f"unknown output format {fmt!r}", recovery=f"use one of {', '.join(OUTPUT_FORMATS)}"
        )
    container, subtype = OUTPUT_FORMATS[fmt]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = audio.detach().float().clamp(-1, 1).cpu().numpy().T
    sf.write(str(path), data, sample_rate, format=container, subtype=subtype)
    return path
