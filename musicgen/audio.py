"""Audio files in and out: reading (WAV, FLAC, MP3, OGG through libsndfile), writing WAV, FLAC (libsndfile)
or MP3 (LAME through lameenc: several times faster than libsndfile's MP3 at equal or better quality,
see benchmarks/encoding.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from musicgen.errors import InvalidParameter, UnsupportedMedia

OUTPUT_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III")}
# MP3: constant 256 kbps with LAME's fast mode (-q 7). benchmarks/encoding.py picks it as the fastest
# setting whose SNR and log-mel distance to the WAV are both at least as good as libsndfile's default
# MP3 (VBR, ~185 kbps), which it encodes ~5x faster. The stream starts with LAME's usual 1105-sample
# (25 ms) delay: it carries no gapless-playback header.
MP3_BITRATE_KBPS = 256
MP3_QUALITY = 7


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
    if fmt == "mp3":
        path.write_bytes(encode_mp3(data, sample_rate))
    else:
        sf.write(str(path), data, sample_rate, format=container, subtype=subtype)
    return path


def encode_mp3(
    samples: np.ndarray,
    sample_rate: int,
    *,
    bitrate_kbps: int = MP3_BITRATE_KBPS,
    quality: int = MP3_QUALITY,
    block_s: float = 30.0,
) -> bytes:
    """(samples, channels) float in [-1, 1], one or two channels -> an MP3 stream. Encoded a block at a
    time (bounded memory for long songs); LAME runs without the GIL."""
    if samples.ndim == 1:
        samples = samples[:, None]
    stream = Mp3Stream(sample_rate, samples.shape[1], bitrate_kbps=bitrate_kbps, quality=quality)
    block = max(1, int(block_s * sample_rate))
    out = bytearray()
    for start in range(0, samples.shape[0], block):
        out += stream.encode(samples[start : start + block])
    out += stream.flush()
    return bytes(out)


class Mp3Stream:
    """An MP3 stream encoded as its audio arrives (live audio): `encode` each piece of (samples,
    channels) float in [-1, 1] and get the whole MP3 frames it completes, `flush` at the end for the
    rest. The bytes put together are one MP3 file; a browser plays it from the first frame on."""

    def __init__(self, sample_rate: int, channels: int, *, bitrate_kbps: int = MP3_BITRATE_KBPS,
                 quality: int = MP3_QUALITY):  # fmt: skip
        import lameenc

        if channels not in (1, 2):
            raise InvalidParameter(
                f"MP3 holds one or two channels, not {channels}", recovery="use wav or flac"
            )
        self.channels = channels
        self._encoder = lameenc.Encoder()
        self._encoder.set_bit_rate(bitrate_kbps)
        self._encoder.set_in_sample_rate(sample_rate)
        self._encoder.set_channels(channels)
        self._encoder.set_quality(quality)

    def encode(self, samples: np.ndarray) -> bytes:
        if samples.ndim == 1:
            samples = samples[:, None]
        if samples.ndim != 2 or samples.shape[1] != self.channels:
            raise InvalidParameter(f"this MP3 stream has {self.channels} channels; got samples of shape "
                                   f"{samples.shape} (samples, channels): {samples.shape[-1]} channels")  # fmt: skip
        pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
        return bytes(self._encoder.encode(pcm.tobytes()))

    def flush(self) -> bytes:
        return bytes(self._encoder.flush())
