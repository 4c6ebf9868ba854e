"""Live audio (musicgen.model.bigvgan.LiveDecode, LiveStereo): a take's audio released block by block
while it is sampled equals the whole take decoded at the end, sample for sample, whatever the song's
length, its end of song (which can cut the stream up to one frame before the last block that did not
end it) and its requested length. A small random decoder (hop 4) keeps every case fast; the
conformance decoder is checked in test_dr2_conformance.py."""

from __future__ import annotations

import pytest
import torch

from musicgen.model.bigvgan import BigVGAN, DecoderConfig, LiveDecode, LiveStereo, decode_chunked, fake_stereo

BLOCK = 10


@pytest.fixture(autouse=True)
def one_thread():
    """A window of this decoder is ~80 samples: one thread spares each of its many small ops the
    thread pool's overhead (7x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def decoder() -> BigVGAN:
    torch.manual_seed(5)
    cfg = DecoderConfig(upsample_initial_channel=8, upsample_rates=(2, 2), upsample_kernel_sizes=(4, 4),
                        resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),), sampling_rate=20)  # fmt: skip
    model = BigVGAN(cfg).eval()
    with torch.no_grad():  # random weights of a size that keeps the signal O(1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def blocks_of(latents: torch.Tensor) -> list[torch.Tensor]:
    return list(latents.split(BLOCK))


def live(decoder, blocks, *, end=None, limit=None) -> tuple[torch.Tensor, list[int]]:
    """The pieces of one take put together, and the frames released after each push."""
    dec = LiveDecode(decoder, limit_frames=limit)
    pieces, released = [], []
    for b in blocks[:-1]:
        pieces.append(dec.push(b))
        released.append(dec.released)
    pieces.append(dec.finish(blocks[-1], end=end))
    return torch.cat(pieces), released


def whole(decoder, latents, limit=None) -> torch.Tensor:
    mono = decode_chunked(decoder, latents[None], max_batch=1)[0]
    return mono if limit is None else mono[: limit * decoder.cfg.hop]


@pytest.mark.parametrize("frames", [5, 19, 20, 21, 29, 30, 31, 45, 65, 105])
def test_released_audio_equals_the_whole_take_decoded_for_every_end_of_song(decoder, frames):
    torch.manual_seed(frames)
    latents = torch.randn(frames, 64)
    blocks = blocks_of(latents)
    got, _ = live(decoder, blocks)
    assert torch.equal(got, whole(decoder, latents)), "ran to its last block"
    # the end of song at the last block can cut back to one frame before that block: every such end
    before = frames - blocks[-1].shape[0]
    for end in range(max(1, before - 1), frames + 1):
        got, _ = live(decoder, blocks, end=end)
        assert torch.equal(got, whole(decoder, latents[:end])), f"ended at frame {end}"


@pytest.mark.parametrize("frames,limit", [(40, 37), (50, 41), (30, 21), (20, 12), (105, 100)])
def test_audio_stops_at_the_requested_length(decoder, frames, limit):
    torch.manual_seed(1)
    latents = torch.randn(frames, 64)
    got, released = live(decoder, blocks_of(latents), limit=limit)
    assert torch.equal(got, whole(decoder, latents, limit))
    assert got.shape[0] == limit * decoder.cfg.hop and max(released, default=0) <= limit


def test_audio_lags_the_latents_by_about_one_window(decoder):
    latents = torch.randn(100, 64)
    _, released = live(decoder, blocks_of(latents))
    # after 3 blocks the first window is certain (the song is at least 29 frames long), then 15 frames
    # of audio follow every 15 frames of latents, never more than 19 frames behind the certain length
    assert released[:2] == [0, 0] and released[2] == 11
    for pushed, out in zip(range(30, 100, BLOCK), released[2:], strict=True):
        assert 0 < pushed - out <= 19 + 15


def test_pieces_stay_final_and_memory_stays_bounded(decoder):
    latents = torch.randn(300, 64)
    dec = LiveDecode(decoder)
    for b in blocks_of(latents)[:-1]:
        dec.push(b)
        assert len(dec._windows) <= 2  # decoded windows are dropped once no layout can use them
    dec.finish(latents[-BLOCK:])
    with pytest.raises(RuntimeError, match="finished"):
        dec.push(latents[:BLOCK])
    with pytest.raises(ValueError, match="only 20 were pushed"):
        LiveDecode(decoder).finish(latents[:20], end=25)


@pytest.mark.parametrize("pieces", [[1, 2, 3], [480], [100, 500, 7, 2000], [4000]])
def test_stereo_in_pieces_equals_the_official_fake_stereo(pieces):
    mono = torch.randn(sum(pieces))
    stereo = LiveStereo(48_000)
    got = torch.cat([stereo.push(part) for part in mono.split(pieces)], dim=1)
    assert torch.equal(got, fake_stereo(mono[None], 48_000)[0])
