"""The DiffRhythm 2 pipeline on the tiny DiffRhythm 2 (built locally in the official files, loaded with the
hub offline): songs of the requested length at 48 kHz in the official fake stereo, seeds per take,
batched requests equal to requests run alone, cancel mid-song, the lyrics rules, strict loading."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from musicgen.errors import CheckpointMismatch, GenerationCanceled, InvalidLyrics, InvalidParameter
from musicgen.lyrics.frontend import LyricsFrontEnd
from musicgen.pipelines import DR2Pipeline, EditSpec, Pipeline, SongRequest
from musicgen.registry import get_model_spec

LYRICS = "[verse]\nHello world\n[chorus]\nGood night moon"


@pytest.fixture(scope="module")
def pipe(offline_hub):
    return Pipeline.from_pretrained("tiny-2", device="cpu")


@pytest.fixture(scope="module")
def front():
    return LyricsFrontEnd.from_assets()


def request(front, seconds=4.0, lyrics=LYRICS, **kw) -> SongRequest:
    frames = front.encode(lyrics, get_model_spec("tiny-2"), seconds)
    return SongRequest(tokens=frames.tokens, song_duration=frames.song_duration, style_prompt="happy pop",
                       duration_s=seconds, steps=kw.pop("steps", 4), **kw)  # fmt: skip


def test_a_song_has_the_requested_length_at_48_khz_in_the_official_stereo(pipe, front):
    assert isinstance(pipe, DR2Pipeline)
    result = pipe.generate(request(front, seconds=5.3, seed=7, num_takes=2))
    assert result.sample_rate == 48_000 and result.audio.shape == (2, 2, 26 * 9600)  # int(5.3 * 5) frames
    assert result.seeds == [7, 8] and not torch.equal(result.audio[0], result.audio[1])
    left, right = result.audio[0]
    assert torch.equal(right[:480], torch.zeros(480))
    assert torch.equal(right[480:], torch.tensor(0.8) * left[:-480])
    assert result.audio.abs().max() <= 1.0 and result.audio.abs().max() > 0
    assert result.latents.shape == (2, 30, 64)  # three whole blocks were sampled


def test_seeds_are_reproducible_and_batched_requests_equal_requests_alone(pipe, front):
    a = request(front, seed=1, num_takes=2)
    b = request(front, lyrics="[verse]\nHello world\n[chorus]\nGood night sun", seed=5)
    alone = [pipe.generate(a), pipe.generate(b)]
    batched = pipe.generate_many([a, b])
    assert [r.timings["batch_requests"] for r in batched] == [2, 2]
    for x, y in zip(alone, batched, strict=True):
        assert torch.allclose(x.latents, y.latents, atol=1e-5) and torch.allclose(x.audio, y.audio, atol=1e-4)
    assert torch.equal(pipe.generate(a).latents, alone[0].latents)  # the same seed, the same song


def test_plan_and_compile_are_honoured(pipe, front):
    """DiffRhythm 2 takes the same plan and compile settings: auto is batched (both guidance branches in
    one forward), sequential gives the same song, and the plans it has not (parallel; graphs off CUDA)
    and unknown values are refused with a recovery hint."""
    assert pipe.plan.batched and not pipe.plan.cuda_graph  # auto
    for bad in ({"plan": "parallel"}, {"plan": "graphs"}, {"plan": "fastest"}, {"compile": "yes"}):
        with pytest.raises(InvalidParameter) as err:
            Pipeline.from_pretrained("tiny-2", device="cpu", **bad)
        assert err.value.recovery
    sequential = Pipeline.from_pretrained("tiny-2", device="cpu", plan="sequential", compile="off")
    assert not sequential.plan.batched
    req = request(front, seed=3)
    assert torch.allclose(sequential.generate(req).latents, pipe.generate(req).latents, atol=1e-5, rtol=0)


def test_cancel_mid_song_leaves_the_batch_to_the_others(pipe, front):
    seen = []

    def cancel_at_step_3(progress):
        seen.append(progress)
        if progress.stage == "sampling" and progress.step >= 3:
            raise GenerationCanceled("canceled by the test")

    keep, drop = request(front, seed=2), request(front, seed=3, steps=6)
    out = pipe.generate_many([keep, request(front, seed=3), drop], [None, cancel_at_step_3, None])
    assert isinstance(out[1], GenerationCanceled)
    assert max(p.step for p in seen if p.stage == "sampling") == 3  # stopped there, not at the end
    assert torch.allclose(out[0].latents, pipe.generate(keep).latents, atol=1e-5)
    assert out[2].audio.shape[-1] == 4 * 5 * 9600


def test_progress_counts_blocks_and_steps(pipe, front):
    """On the engine (the batched plan) progress comes when sampling starts and after each block; the
    sequential plan's sampler reports before every Euler step."""
    events = []
    pipe.generate(request(front, seconds=4, steps=5), events.append)
    sampling = [p for p in events if p.stage == "sampling"]
    assert pipe.continuous and sampling[-1].total == 2 * 4 and [p.step for p in sampling] == [0, 4, 8]
    assert [p.stage for p in events][0] == "encoding_style" and events[-1].stage == "decoding"
    sequential = Pipeline.from_pretrained("tiny-2", device="cpu", plan="sequential", compile="off")
    events = []
    sequential.generate(request(front, seconds=4, steps=5), events.append)
    assert [p.step for p in events if p.stage == "sampling"] == list(range(8))


def test_a_request_without_steps_samples_the_official_default(pipe, front):
    events = []
    pipe.generate(request(front, seconds=4, steps=None), events.append)
    assert pipe.spec.default_steps == 16
    assert [p.total for p in events if p.stage == "sampling"][-1] == 2 * 15  # grid points: 15 steps a block


def test_from_pretrained_on_the_base_returns_this_family_with_its_plan():
    pipe = Pipeline.from_pretrained("tiny-2", device="cpu", with_style_encoder=False, plan="sequential")
    assert isinstance(pipe, DR2Pipeline) and not pipe.plan.batched


def test_lyrics_rules_tags_timestamps_and_errors(front):
    spec = get_model_spec("tiny-2")
    out = front.encode("[Verse 1]\n[00:10.00]Hello world\n\n[Pre-Chorus]\nLa la", spec, 10)
    assert out.tokens[:2].tolist() == [503, 511] and out.tokens[-1] == 511
    assert out.lrc.splitlines() == ["[verse]", "Hello world", "La la"]
    assert any("timestamps were removed" in w for w in out.warnings)
    assert any("[Pre-Chorus] is not a DiffRhythm 2 section tag" in w for w in out.warnings)
    with pytest.raises(InvalidLyrics, match="line 2") as err:
        front.encode("[verse]\n!!!\nfine", spec, 10)
    assert err.value.details["line"] == 2
    assert front.encode("", spec, 10).tokens.numel() == 0  # instrumental


def test_inputs_are_checked_before_any_work(pipe, front, tmp_path):
    with pytest.raises(InvalidParameter, match="cannot edit"):
        pipe.generate(request(front, edit=EditSpec(tmp_path / "x.wav", ((1.0, 2.0),))))
    with pytest.raises(InvalidParameter, match="out of range"):
        pipe.generate(request(front, seconds=4).__class__(**{**request(front).__dict__, "duration_s": 600}))
    with pytest.raises(InvalidParameter, match="at least 2 steps"):
        pipe.generate(request(front, steps=1))
    with pytest.raises(InvalidParameter, match="token ids"):
        pipe.generate(
            SongRequest(tokens=torch.tensor([5000]), song_duration=0, style_prompt="x", duration_s=4)
        )


def test_an_instrumental_song_without_lyrics(pipe, front):
    result = pipe.generate(request(front, lyrics="", seed=4))
    assert result.audio.shape == (1, 2, 4 * 5 * 9600)


def test_strict_loading_refuses_a_checkpoint_that_does_not_fit(tmp_path, offline_hub):
    import json
    import shutil

    from musicgen import hub
    from musicgen.model.loading import load_bigvgan, load_dr2

    folder = hub.cache_dir() / "tiny-2" / "model"
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "model.json").read_text())
    (bad / "model.json").write_text(json.dumps({**cfg, "depth": cfg["depth"] + 1}))
    with pytest.raises(CheckpointMismatch, match="does not fit"):
        load_dr2(bad, device=torch.device("cpu"))
    (bad / "decoder.json").write_text(json.dumps({"upsample_rates": [2]}))
    with pytest.raises(CheckpointMismatch, match="snake_logscale"):
        load_bigvgan(bad, device=torch.device("cpu"))
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointMismatch, match="not a readable safetensors"):
        load_dr2(bad, device=torch.device("cpu"))


def tiny_decoder(tmp_path, **changes):
    """A tiny decoder like tiny-2's, with these decoder.json fields, written and loaded from the files."""
    from musicgen.model.bigvgan import BigVGAN, DecoderConfig
    from musicgen.model.loading import load_bigvgan, save_bigvgan

    cfg = DecoderConfig(upsample_initial_channel=64, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),),
                        use_tanh_at_final=False, use_bias_at_final=False, **changes)  # fmt: skip
    torch.manual_seed(0)
    return load_bigvgan(save_bigvgan(BigVGAN(cfg), tmp_path / "decoder"), device=torch.device("cpu"))


def test_the_audio_is_at_the_sample_rate_of_decoder_json(pipe, front, tmp_path):
    # 24 kHz and 4800 samples a frame (one 2x stage fewer): still the DiT's 5 frames a second
    decoder = tiny_decoder(tmp_path, sampling_rate=24_000, upsample_rates=(10, 10, 8, 3, 2),
                           upsample_kernel_sizes=(20, 20, 16, 7, 4))  # fmt: skip
    half = DR2Pipeline(pipe.spec, pipe.dit, decoder, pipe.style_encoder, torch.device("cpu"))
    assert half.sample_rate == 24_000 and pipe.sample_rate == 48_000
    result = half.generate(request(front, seconds=4.4, seed=3))
    assert result.sample_rate == 24_000 and result.audio.shape == (1, 2, 22 * 4800)
    assert result.seconds == pytest.approx(4.4)
    left, right = result.audio[0]
    assert torch.equal(right[:240], torch.zeros(240))  # the fake stereo's 10 ms at 24 kHz
    assert torch.equal(right[240:], torch.tensor(0.8) * left[:-240])


def test_a_decoder_that_does_not_make_5_frames_a_second_is_refused(pipe, tmp_path):
    decoder = tiny_decoder(tmp_path, sampling_rate=96_000)  # 9600 samples a frame: 10 frames a second
    with pytest.raises(CheckpointMismatch, match="sampling_rate 96000 over a hop of 9600 .* is 10 frames a second, "
                       "but tiny-2's DiT makes 5 latent frames a second"):  # fmt: skip
        DR2Pipeline(pipe.spec, pipe.dit, decoder, pipe.style_encoder, torch.device("cpu"))


def test_live_audio_comes_while_the_song_is_sampled_and_is_the_take(pipe, front):
    """On the engine, each take's final samples reach on_audio while later blocks are still sampled
    (the sampler is held at its 5th block until audio has come), and the pieces of a take are its
    audio in the result, sample for sample; the sequential plan decodes at the end and hands over each
    take whole, the same song."""
    pieces: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    heard = threading.Event()

    def on_audio(take, samples):
        pieces[take].append(samples)
        heard.set()

    waited = []

    def hold_until_heard(progress):
        if progress.stage == "sampling" and progress.step == 4 * 3 and not waited:
            waited.append(heard.wait(60))

    req = request(front, seconds=11.5, seed=4, num_takes=2, steps=4, on_audio=on_audio)
    result = pipe.generate(req, hold_until_heard)
    assert waited == [True], "no audio came while the song was still being sampled"
    assert result.audio.shape == (2, 2, 57 * 9600)
    for take in (0, 1):
        assert len(pieces[take]) > 1 and torch.equal(torch.cat(pieces[take], dim=1), result.audio[take])
    sequential = Pipeline.from_pretrained("tiny-2", device="cpu", plan="sequential", compile="off")
    whole: list[tuple[int, torch.Tensor]] = []
    alone = sequential.generate(dataclasses.replace(req, on_audio=lambda k, a: whole.append((k, a))))
    assert [k for k, _ in whole] == [0, 1] and all(torch.equal(a, alone.audio[k]) for k, a in whole)
    assert torch.allclose(alone.latents, result.latents, atol=1e-5, rtol=0)
    assert torch.allclose(alone.audio, result.audio, atol=1e-4, rtol=0)


def test_live_audio_of_a_song_of_one_window_comes_whole_at_its_end(pipe, front):
    """4 s, the shortest song: 20 frames, one window of the decoder, final only when the song is."""
    pieces = []
    result = pipe.generate(request(front, seconds=4, seed=9, on_audio=lambda k, a: pieces.append(a)))
    assert len(pieces) == 1 and torch.equal(pieces[0], result.audio[0])


def test_a_failing_audio_listener_does_not_fail_the_song(pipe, front, caplog):
    def broken(take, samples):
        raise OSError("the listener went away")

    result = pipe.generate(request(front, seconds=8, seed=2, on_audio=broken))
    assert result.audio.shape == (1, 2, 40 * 9600) and "live audio stops" in caplog.text


def test_the_engines_cache_budget_is_the_bytes_given_else_a_share_of_the_gpus_free_memory(monkeypatch):
    """Bytes when given; else a share (0.6 unless given) of what the GPU has free once the model is
    loaded, read from torch.cuda.mem_get_info; on a CPU a quarter of the machine's memory."""
    import os

    from musicgen.pipelines.dr2 import ENGINE_CACHE_SHARE, engine_cache_budget

    gpu = torch.device("cuda", 0)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (asked.append(d), (10 * 2**30, 80 * 2**30))[1])
    assert ENGINE_CACHE_SHARE == 0.6
    assert engine_cache_budget(gpu) == int(0.6 * 10 * 2**30) and asked == [gpu]
    assert engine_cache_budget(gpu, share=0.9) == int(0.9 * 10 * 2**30)
    assert engine_cache_budget(gpu, 3 * 2**30, share=0.9) == 3 * 2**30
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert engine_cache_budget(torch.device("cpu")) == ram // 4
    assert engine_cache_budget(torch.device("cpu"), 12345) == 12345
    assert len(asked) == 2  # neither a CPU nor a budget in bytes asks the GPU


def test_the_pipelines_cache_budget_is_what_its_engine_runs_with(pipe, front, monkeypatch):
    """`engine_budget_bytes` (what a server's setting sets) is the budget the pipeline reports before
    its engine starts and the one the engine starts with."""
    monkeypatch.setattr(pipe, "engine_budget_bytes", 7 * 2**20)
    monkeypatch.setattr(pipe, "_loop", None)  # a fresh engine for this test
    try:
        assert pipe.load()["budget_bytes"] == 7 * 2**20
        pipe.generate(request(front, seed=1))
        assert pipe.engine_loop().engine.memory_budget_bytes == 7 * 2**20
        assert pipe.load()["budget_bytes"] == 7 * 2**20
    finally:
        if pipe._loop is not None:
            pipe._loop.stop()
