"""The DiffRhythm VAE (a TorchScript module with `decode_export` / `encode_export`) and chunked
decoding/encoding with overlap.

Latents are (b, 64, frames); audio is (b, 2, frames * 2048) at 44.1 kHz. The encoder returns
(b, 128, frames): mean and scale of the posterior.

Chunking follows the official `decode_audio(chunked=True)`: windows of `chunk` frames every
`chunk - overlap` frames, the last window aligned to the end, and the `overlap // 2` frames at each
inner edge thrown away. Unlike the official loop, the windows of all songs in the batch are decoded
together, `max_batch` windows at a time, which bounds memory whatever the song length.
"""

from __future__ import annotations

import torch

SAMPLE_RATE = 44_100  # decoded audio, stereo
LATENT_HOP = 2048  # audio samples per latent frame
LATENT_CHANNELS = 64
FRAMES_PER_SECOND = SAMPLE_RATE / LATENT_HOP  # ~21.53
ENCODER_CHANNELS = 128  # the encoder's posterior: 64 means and 64 scales per frame


def _windows(total: int, chunk: int, overlap: int) -> list[int]:
    """Start frames of the chunk windows over `total` frames (official layout)."""
    hop = chunk - overlap
    starts = list(range(0, total - chunk + 1, hop))
    if not starts or starts[-1] + chunk != total:
        starts.append(total - chunk)
    return starts


def _stitch_spans(starts: list[int], chunk: int, overlap: int, total: int, scale: int):
    """(where in the output, where in the window) for each window, in units of frames * scale."""
    half = overlap // 2
    spans = []
    for i, s in enumerate(starts):
        first, last = i == 0, i == len(starts) - 1
        t0, t1 = s, s + chunk
        c0, c1 = 0, chunk
        if not first:
            t0, c0 = t0 + half, c0 + half
        if not last:
            t1, c1 = t1 - half, c1 - half
        spans.append(((t0 * scale, t1 * scale), (c0 * scale, c1 * scale)))
    return spans


def _run_chunked(
    fn,
    x: torch.Tensor,
    chunk: int,
    overlap: int,
    scale_in: int,
    scale_out: int,
    max_batch: int,
    out_channels: int,
    out_len: int,
) -> torch.Tensor:
    """Apply `fn` to overlapping windows of x (b, c, t*scale_in) and stitch (b, out_channels, out_len)."""
    total = x.shape[-1] // scale_in
    b = x.shape[0]
    starts = _windows(total, chunk, overlap)
    # (windows*b, c, chunk*scale_in), window-major
    stacked = torch.cat([x[..., s * scale_in : (s + chunk) * scale_in] for s in starts])
    outs = [fn(stacked[i : i + max_batch]) for i in range(0, stacked.shape[0], max_batch)]
    decoded = torch.cat(outs)  # (windows*b, out_channels, chunk*scale_out)
    y = decoded.new_zeros(b, out_channels, out_len)
    for i, ((t0, t1), (c0, c1)) in enumerate(_stitch_spans(starts, chunk, overlap, total, scale_out)):
        y[..., t0:t1] = decoded[i * b : (i + 1) * b, :, c0:c1]
    return y


class SongVAE:
    """Wraps the official TorchScript VAE."""

    def __init__(self, module: torch.jit.ScriptModule, device: torch.device):
        self.module = module
        self.device = device

    @torch.inference_mode()
    def decode(
        self, latents: torch.Tensor, *, chunk: int = 128, overlap: int = 32, max_batch: int = 4
    ) -> torch.Tensor:
        """(b, frames, 64) latents -> (b, 2, frames * 2048) fp32 audio."""
        z = latents.transpose(1, 2).to(self.device, torch.float32)
        total = z.shape[-1]
        if total <= chunk:
            return self.module.decode_export(z).float()
        return _run_chunked(
            self.module.decode_export, z, chunk, overlap, 1, LATENT_HOP, max_batch, 2, total * LATENT_HOP
        ).float()

    @torch.inference_mode()
    def encode(
        self, audio: torch.Tensor, *, chunk: int = 128, overlap: int = 32, max_batch: int = 4
    ) -> torch.Tensor:
        """(b, 2, samples) audio, samples a multiple of 2048 -> (b, 128, frames) posterior mean|scale."""
        a = audio.to(self.device, torch.float32)
        frames = a.shape[-1] // LATENT_HOP
        if frames <= chunk:
            return self.module.encode_export(a).float()
        return _run_chunked(
            self.module.encode_export, a, chunk, overlap, LATENT_HOP, 1, max_batch, ENCODER_CHANNELS, frames
        ).float()


def posterior_sample(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(b, 128, t) mean|scale -> (b, t, 64) latents, as the official `vae_sample` (softplus scale)."""
    mean, scale = moments.chunk(2, dim=1)
    std = torch.nn.functional.softplus(scale) + 1e-4
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return (noise * std + mean).transpose(1, 2)


def peak_normalize(audio: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each take (b, c, n) to a peak of 1 and clip; silence stays silence (no division by zero)."""
    peak = audio.abs().amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > eps, audio / peak.clamp_min(eps), torch.zeros_like(audio)).clamp(-1, 1)
