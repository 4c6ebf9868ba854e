"""Chunked VAE decoding: windows decoded as a batch, stitched as the official loop does it."""

from __future__ import annotations

import torch

from musicgen.model.loading import load_vae
from musicgen.model.vae import peak_normalize, posterior_sample


def official_chunked_decode(decode, latents, chunk=128, overlap=32, hop_out=2048):
    """The official decode_audio(chunked=True) loop, restated: one window at a time."""
    hop = chunk - overlap
    total = latents.shape[2]
    starts = list(range(0, total - chunk + 1, hop))
    if starts[-1] + chunk != total:
        starts.append(total - chunk)
    y = torch.zeros(latents.shape[0], 2, total * hop_out)
    ol = (overlap // 2) * hop_out
    for i, s in enumerate(starts):
        y_chunk = decode(latents[:, :, s : s + chunk])
        if i == len(starts) - 1:
            t_end = total * hop_out
            t_start = t_end - y_chunk.shape[2]
        else:
            t_start = s * hop_out
            t_end = t_start + chunk * hop_out
        c0, c1 = 0, y_chunk.shape[2]
        if i > 0:
            t_start, c0 = t_start + ol, c0 + ol
        if i < len(starts) - 1:
            t_end, c1 = t_end - ol, c1 - ol
        y[:, :, t_start:t_end] = y_chunk[:, :, c0:c1]
    return y


def test_batched_chunks_equal_official_loop_and_full_decode(tiny_model_paths):
    vae = load_vae(tiny_model_paths["vae"], device=torch.device("cpu"))
    latents = torch.randn(2, 300, 64)  # (b, frames, 64): 4 windows, the last aligned to the end
    ours = vae.decode(latents, max_batch=3)
    with torch.inference_mode():
        ref = official_chunked_decode(vae.module.decode_export, latents.transpose(1, 2))
        full = vae.module.decode_export(latents.transpose(1, 2))
    assert ours.shape == (2, 2, 300 * 2048)
    assert torch.allclose(ours, ref, atol=1e-6)
    # the tiny VAE sees 3 frames, less than the 16 thrown away at each seam: chunking is exact
    assert torch.allclose(ours, full, atol=1e-5)


def test_short_songs_decode_in_one_window(tiny_model_paths):
    vae = load_vae(tiny_model_paths["vae"], device=torch.device("cpu"))
    assert vae.decode(torch.randn(1, 50, 64)).shape == (1, 2, 50 * 2048)


def test_chunked_encode_matches_whole_encode(tiny_model_paths):
    vae = load_vae(tiny_model_paths["vae"], device=torch.device("cpu"))
    audio = torch.randn(1, 2, 260 * 2048) * 0.1
    with torch.inference_mode():
        whole = vae.module.encode_export(audio)
    assert torch.allclose(vae.encode(audio), whole, atol=1e-5)
    z = posterior_sample(whole, torch.Generator().manual_seed(0))
    assert z.shape == (1, 260, 64)


def test_peak_normalize_is_safe_on_silence():
    silent = torch.zeros(2, 2, 1000)
    out = peak_normalize(silent)
    assert torch.equal(out, silent) and not out.isnan().any()
    loud = torch.randn(2, 2, 1000)
    loud[1] *= 1e-3
    out = peak_normalize(loud)
    assert torch.allclose(out.abs().amax(dim=(1, 2)), torch.ones(2))
