"""Offline end to end: the tiny DiT checkpoint, TorchScript VAE and MuQ-MuLan, written in the official
formats, loaded through the same code as the real weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from musicgen.errors import GenerationCanceled, InvalidParameter, InvalidPrompt, OutOfMemory, UnsupportedMedia
from musicgen.pipelines import DR1Pipeline, EditSpec, Pipeline, SongRequest
from musicgen.pipelines.dr1 import edit_mask
from musicgen.runtime.projections import is_fused


@pytest.fixture(scope="module")
def pipe(tiny_model_paths):
    return Pipeline.from_pretrained("tiny", device="cpu")


def request(pipe, seconds=8.0, **kw):
    frames = pipe.spec.frames_for(seconds)
    tokens = torch.zeros(frames, dtype=torch.long)
    tokens[10:40] = torch.arange(3, 33)
    kw.setdefault("style_prompt", "calm acoustic folk")
    kw.setdefault("steps", 3)
    return SongRequest(tokens=tokens, song_duration=frames / pipe.spec.max_frames, **kw)


def test_takes_have_right_shape_and_are_reproducible(pipe):
    res = pipe.generate(request(pipe, num_takes=2, seed=10))
    frames = pipe.spec.frames_for(8.0)
    assert res.audio.shape == (2, 2, frames * 2048) and res.sample_rate == 44100
    assert res.seeds == [10, 11]
    assert res.audio.abs().max() <= 1.0
    assert math.isclose(res.seconds, frames * 2048 / 44100)
    single = pipe.generate(request(pipe, num_takes=1, seed=11))
    assert torch.allclose(single.latents[0], res.latents[1], atol=2e-5)
    assert set(res.timings) >= {"style_s", "sampling_s", "decoding_s", "total_s"}


def test_the_registry_picks_the_pipeline_and_its_defaults(pipe):
    """`Pipeline.from_pretrained` returns the family's pipeline; a family's class refuses another family's
    model; a request without steps or guidance samples with the model's defaults."""
    assert type(pipe) is DR1Pipeline and pipe.spec.name == "tiny"
    with pytest.raises(InvalidParameter, match="DiffRhythm 2") as err:
        DR1Pipeline.from_pretrained("tiny-2", device="cpu")
    assert err.value.details == {"parameter": "model", "value": "tiny-2"}
    req = request(pipe, seed=2, cfg_strength=3.0)
    unset = SongRequest(tokens=req.tokens, song_duration=req.song_duration, style_prompt="calm acoustic folk")
    filled = pipe.with_defaults(unset)
    assert (filled.steps, filled.cfg_strength) == (pipe.spec.default_steps, pipe.spec.default_cfg)
    assert (pipe.spec.default_steps, pipe.spec.default_cfg) == (31, 4.0)
    assert pipe.with_defaults(req) is req


def test_text_prompt_and_reference_audio_both_condition(pipe, tmp_path):
    ref = tmp_path / "ref.wav"
    t = np.arange(44100 * 12) / 44100
    sf.write(ref, np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], 1) * 0.3, 44100)
    by_text = pipe.generate(request(pipe, seed=1, style_prompt="sad piano"))
    by_audio = pipe.generate(request(pipe, seed=1, style_prompt=None, reference_audio=ref))
    assert not torch.allclose(by_text.latents, by_audio.latents)


def test_edit_mode_keeps_the_untouched_frames(pipe, tmp_path):
    src = tmp_path / "src.flac"
    sf.write(src, np.random.default_rng(0).normal(0, 0.1, (44100 * 8, 2)), 44100)
    req = request(pipe, seed=3, edit=EditSpec(src, ((2.0, 4.0),)))
    prompt, mask = pipe.latent_prompt(req.edit, req.tokens.shape[0], req.seed)
    res = pipe.generate(req)
    keep = ~mask
    assert keep.sum() > 0 and mask.sum() > 0
    assert torch.allclose(res.latents[0][keep], prompt[0][keep])


def test_progress_reports_every_stage(pipe):
    seen = []
    pipe.generate(request(pipe), progress=seen.append)
    stages = [p.stage for p in seen]
    assert stages[0] == "encoding_style" and stages[-1] == "decoding"
    assert [p.step for p in seen if p.stage == "sampling"] == [1, 2, 3]


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(num_takes=5), InvalidParameter, "num_takes"),
        (dict(seed=-1), InvalidParameter, "seed"),
        (dict(steps=0), InvalidParameter, "steps"),
        (dict(style_prompt="   "), InvalidPrompt, "empty"),
        (dict(style_prompt="x" * 600), InvalidPrompt, "at most"),
        (dict(style_prompt=None), InvalidParameter, "no style"),
    ],
)
def test_bad_requests_are_refused(pipe, change, error, match):
    with pytest.raises(error, match=match):
        pipe.generate(request(pipe, **change))


def test_bad_reference_audio(pipe, tmp_path):
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros((44100 * 3, 2)), 44100)
    with pytest.raises(InvalidPrompt, match="3.00 s long"):
        pipe.generate(request(pipe, style_prompt=None, reference_audio=short))
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"ID3 this is not audio" * 10)
    with pytest.raises(UnsupportedMedia):
        pipe.generate(request(pipe, style_prompt=None, reference_audio=junk))
    with pytest.raises(UnsupportedMedia, match="does not exist"):
        pipe.generate(request(pipe, style_prompt=None, reference_audio=tmp_path / "nope.wav"))


def test_edit_mask_follows_official_rounding():
    mask = edit_mask(((-1, 1.0), (3.0, -1)), 100, 2048)
    assert mask[:21].all() and not mask[21:64].any() and mask[64:].all()
    with pytest.raises(InvalidParameter, match="empty"):
        edit_mask(((5.0, 2.0),), 100, 2048)


def test_style_embeddings_are_cached_by_text_and_by_audio_content(pipe, tmp_path):
    enc = pipe.style_encoder
    enc._cache.clear()
    hits = enc.hits
    a = enc.embed_text("dreamy synthwave")
    b = enc.embed_text("  dreamy synthwave ")  # same prompt once stripped
    assert torch.equal(a, b) and enc.hits == hits + 1
    a[0, 0] = 123.0  # callers get copies: the cache cannot be corrupted
    assert enc.embed_text("dreamy synthwave")[0, 0] != 123.0

    clip = np.random.default_rng(1).normal(0, 0.1, (44100 * 11, 2))
    first, second = tmp_path / "a.wav", tmp_path / "b.wav"
    sf.write(first, clip, 44100)
    sf.write(second, clip, 44100)  # same bytes under another name
    hits = enc.hits
    e1 = enc.embed_audio_file(first)
    e2 = enc.embed_audio_file(second)
    assert torch.equal(e1, e2) and enc.hits == hits + 1
    sf.write(second, clip * 0.5, 44100)
    assert not torch.equal(enc.embed_audio_file(second), e1)


# --------------------------------------------------------------------------------------------------
# several requests at once (the service's batches)


def test_compatible_requests_share_one_batch_and_match_running_alone(pipe):
    reqs = [
        request(pipe, seed=1),
        request(pipe, seed=5, num_takes=2, style_prompt="loud metal", cfg_strength=2.0),
    ]
    outs = pipe.generate_many(reqs)
    for req, out in zip(reqs, outs, strict=True):
        assert out.timings["batch_requests"] == 2 and out.timings["batch_takes"] == 3
        alone = pipe.generate(req)
        assert alone.timings["batch_requests"] == 1
        assert out.seeds == alone.seeds
        assert torch.allclose(out.latents, alone.latents, atol=2e-5), (
            (out.latents - alone.latents).abs().max()
        )
        assert torch.allclose(out.audio, alone.audio, atol=1e-4)


def test_requests_of_other_lengths_or_steps_run_in_their_own_batches(pipe):
    outs = pipe.generate_many([request(pipe, seed=1), request(pipe, 6.0, seed=1), request(pipe, steps=2)])
    assert [o.timings["batch_requests"] for o in outs] == [1, 1, 1]
    assert outs[1].audio.shape[-1] < outs[0].audio.shape[-1]


def test_batches_hold_at_most_max_batch_takes(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "max_batch_takes", 3)
    outs = pipe.generate_many([request(pipe, num_takes=2), request(pipe, num_takes=2), request(pipe)])
    assert [o.timings["batch_takes"] for o in outs] == [2, 3, 3]


def test_one_failing_request_costs_the_others_nothing(pipe):
    canceled = []

    def cancel_at_step_2(p):
        if p.stage == "sampling" and p.step == 2:
            canceled.append(p)
            raise GenerationCanceled("canceled")

    bad = request(pipe, style_prompt=None)  # no style: refused before sampling
    outs = pipe.generate_many(
        [request(pipe, seed=1), bad, request(pipe, seed=2)], [None, None, cancel_at_step_2]
    )
    assert isinstance(outs[1], InvalidParameter) and isinstance(outs[2], GenerationCanceled) and canceled
    assert outs[0].timings["batch_requests"] == 2  # the canceled request sampled with it until it left
    assert torch.allclose(outs[0].latents, pipe.generate(request(pipe, seed=1)).latents, atol=2e-5)


def test_out_of_memory_splits_the_batch_then_fails_only_what_cannot_fit(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "fault_oom_takes", 2)
    outs = pipe.generate_many(
        [request(pipe, seed=1), request(pipe, seed=2), request(pipe, seed=3, num_takes=3)]
    )
    assert [o.timings["batch_requests"] for o in outs[:2]] == [1, 1]  # 2 + 3 takes did not fit: one at a time
    assert isinstance(outs[2], OutOfMemory) and "fewer takes" in outs[2].recovery
    assert torch.allclose(outs[0].latents, pipe.generate(request(pipe, seed=1)).latents, atol=2e-5)
    monkeypatch.setattr(pipe, "fault_oom_takes", None)
    assert pipe.generate(request(pipe, seed=3, num_takes=3)).audio.shape[0] == 3  # the pipeline recovered


def test_execution_settings_are_checked_and_give_the_same_song(pipe, tiny_model_paths):
    """`plan` and `compile` of from_pretrained: bad values are refused with a recovery hint; the
    batched plan gives the song the CPU's default (rows in parallel) gives."""
    assert pipe.plan.batched is False and pipe.plan.parallel  # auto on the CPU
    for bad in ({"plan": "fastest"}, {"plan": "graphs"}, {"compile": "yes"}):
        with pytest.raises(InvalidParameter) as err:
            DR1Pipeline.from_pretrained("tiny", device="cpu", **bad)
        assert err.value.recovery
    batched = DR1Pipeline.from_pretrained("tiny", device="cpu", plan="batched", compile="off")
    assert batched.plan.batched and is_fused(batched.dit)
    req = request(pipe, seed=3)
    assert torch.allclose(batched.generate(req).latents, pipe.generate(req).latents, atol=1e-5, rtol=0)


def test_the_tiny_model_needs_no_download_and_no_local_copy(tmp_path, monkeypatch):
    """Offline, with an empty cache and no MUSICGEN_ASSETS_DIR: the tiny model is built with its own
    negative style embedding and generates."""
    from musicgen import hub

    monkeypatch.delenv("MUSICGEN_ASSETS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path / "cache"))
    pipe = Pipeline.from_pretrained("tiny", device="cpu")
    assert pipe.negative_style.shape == (1, 512)
    assert not (hub.cache_dir() / "assets" / "negative_style_vocal.npy").exists()
    assert pipe.generate(request(pipe, seconds=5.0)).audio.shape[0] == 1
