"""The official checkpoints, end to end: each loads strictly (a key missing or left over fails the load)
and writes a short song whose audio is what a song is, not what a broken load gives (NaNs, silence,
clipping noise). Marked slow: it needs the weights (downloaded into the cache when the hub is
reachable, ~4 GB for DiffRhythm 1.2, ~5 GB for DiffRhythm 2 and the style encoder) and minutes of a
CPU or seconds of a GPU. Run it with `pytest --runslow tests/musicgen/test_real_weights.py`."""

from __future__ import annotations

import os

import pytest
import torch

from musicgen import hub
from musicgen.errors import ModelNotAvailable
from musicgen.lyrics.frontend import LyricsFrontEnd
from musicgen.pipelines import Pipeline, SongRequest
from musicgen.registry import get_model_spec

pytestmark = pytest.mark.slow
# the hub as whoever runs this has it (read at collection, before the session's isolated offline cache)
REAL_HUB = {
    name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "MUSICGEN_CACHE_DIR", "MUSICGEN_ASSETS_DIR")
}

LYRICS = {
    "diffrhythm-1.2-base": "[00:00.50]Morning light upon the hill\n[00:05.00]the river hums and all is still",
    "diffrhythm-2": "[verse]\nMorning light upon the hill\nthe river hums and all is still",
}


@pytest.fixture()
def real_hub(monkeypatch):
    for name, value in REAL_HUB.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize("name", sorted(LYRICS))
def test_an_official_model_writes_a_song(name, real_hub):
    spec = get_model_spec(name)
    if hub.hub_offline():  # set on purpose: test what the cache has
        try:
            hub.check_cached(spec)
        except ModelNotAvailable as exc:
            pytest.skip(str(exc))
    pipe = Pipeline.from_pretrained(name)  # downloads what the cache lacks (a failed download fails here)
    seconds = max(10.0, spec.min_seconds)
    frames = LyricsFrontEnd.from_assets().encode(LYRICS[name], spec, seconds)
    result = pipe.generate(
        SongRequest(
            tokens=frames.tokens,
            song_duration=frames.song_duration,
            style_prompt="gentle folk, acoustic guitar",
            duration_s=seconds,
            seed=0,
        )  # fmt: skip
    )
    audio = result.audio[0]
    assert result.sample_rate == spec.sample_rate and audio.shape[0] == 2
    assert result.seconds >= seconds - 0.5
    assert torch.isfinite(audio).all()
    rms = audio.pow(2).mean().sqrt().item()
    assert 0.01 < rms < 0.7, f"RMS {rms:.3g}: silence or noise, not a song"
    clipped = (audio.abs() >= 0.999).float().mean().item()
    assert clipped < 0.01, f"{clipped:.1%} of the samples clip"
