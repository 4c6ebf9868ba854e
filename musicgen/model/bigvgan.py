"""DiffRhythm 2's audio decoder: a BigVGAN generator (transposed convolutions and anti-aliased SnakeBeta
residual blocks) from 5 Hz, 64-channel latents to 48 kHz mono, the official chunked decode, and the
official fake stereo. Plain PyTorch; the weight norm of the checkpoint is fused once at load.

The official code: ASLP-lab/DiffRhythm2's bigvgan/model.py (`Generator`, its `decode_audio`, and `BigVGAN`),
bigvgan/activations.py (`SnakeBeta`), bigvgan/alias_free_activation/torch/ (`Activation1d`), and the
fake stereo of inference.py's `inference`. Shapes: (b, channels, samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SNAKE_EPS = 1e-9
FILTER_TAPS = 12  # the anti-alias filter: a 12-tap Kaiser-windowed sinc, read from the checkpoint
CHUNK_FRAMES = 20  # official decode_audio: windows of 20 frames every 15, 2 frames trimmed at inner edges
CHUNK_OVERLAP = 5
STEREO_DELAY_S = 0.01  # the official fake stereo: right = 0.8 x left, 10 ms later
STEREO_GAIN = 0.8


@dataclass(frozen=True)
class DecoderConfig:
    """`decoder.json` of the official checkpoint (keys the generator reads)."""

    in_channels: int = 64
    upsample_initial_channel: int = 1536
    upsample_rates: tuple[int, ...] = (10, 10, 8, 3, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (20, 20, 16, 7, 4, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    resblock: str = "1"
    activation: str = "snakebeta"
    snake_logscale: bool = True
    use_tanh_at_final: bool = True  # the official defaults when the keys are absent
    use_bias_at_final: bool = True
    sampling_rate: int = 48_000  # Hz of the audio: decoder.json must give it

    @classmethod
    def from_json(cls, raw: dict) -> DecoderConfig:
        if "snake_logscale" not in raw:
            raise ValueError("decoder.json has no snake_logscale (the official generator requires it)")
        if raw.get("resblock", "1") != "1":
            raise ValueError(f"resblock {raw['resblock']!r} is not supported (the release uses '1')")
        if raw.get("activation", "snakebeta") not in ("snake", "snakebeta"):
            raise ValueError(f"activation {raw['activation']!r} is not snake or snakebeta")
        rate = raw.get("sampling_rate")
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            # the official script writes its audio at this rate: there is no default to fall back on
            raise ValueError(f"sampling_rate must be a positive whole number of Hz, got {rate!r}")
        keys = {f for f in cls.__dataclass_fields__}
        args = {k: v for k, v in raw.items() if k in keys}
        for k in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
            if k in args:
                args[k] = tuple(args[k])
        if "resblock_dilation_sizes" in args:
            args["resblock_dilation_sizes"] = tuple(tuple(d) for d in args["resblock_dilation_sizes"])
        return cls(**args)

    @property
    def hop(self) -> int:
        """Samples per latent frame: the product of the upsampling rates (9600 in the release)."""
        out = 1
        for r in self.upsample_rates:
            out *= r
        return out


def kaiser_sinc_filter(
    taps: int = FILTER_TAPS, cutoff: float = 0.25, half_width: float = 0.3
) -> torch.Tensor:
    """(1, 1, taps): the anti-alias filter of the official code (a Kaiser-windowed sinc, sum 1): what a
    decoder starts with; a checkpoint's own buffers are what loading uses."""
    attenuation = 2.285 * (taps // 2 - 1) * math.pi * 4 * half_width + 7.95
    beta = (
        0.1102 * (attenuation - 8.7)
        if attenuation > 50
        else 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21)
    )
    window = torch.kaiser_window(taps, beta=beta, periodic=False)
    time = torch.arange(-taps // 2, taps // 2) + 0.5 if taps % 2 == 0 else torch.arange(taps) - taps // 2
    f = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return (f / f.sum()).view(1, 1, taps)


class Snake(nn.Module):
    """SnakeBeta (or Snake: beta = alpha) per channel, alpha and beta stored as logarithms."""

    def __init__(self, channels: int, beta: bool, logscale: bool):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels)) if beta else None
        self.logscale = logscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        b = self.beta[None, :, None] if self.beta is not None else a
        if self.logscale:
            a, b = torch.exp(a), torch.exp(b)
        return x + (1.0 / (b + SNAKE_EPS)) * torch.pow(torch.sin(x * a), 2)


class UpSample(nn.Module):
    """x2: replicate-pad 5, depthwise transposed conv with the filter (stride 2), x2, crop 15 each side."""

    def __init__(self):
        super().__init__()
        self.register_buffer("filter", kaiser_sinc_filter())  # a checkpoint brings its own copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (5, 5), mode="replicate")
        x = 2 * F.conv_transpose1d(x, self.filter.expand(c, -1, -1), stride=2, groups=c)
        return x[..., 15:-15]


class LowPass(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("filter", kaiser_sinc_filter())


class DownSample(nn.Module):
    """/2: replicate-pad 5 left and 6 right, depthwise correlation with the filter at stride 2."""

    def __init__(self):
        super().__init__()
        self.lowpass = LowPass()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (5, 6), mode="replicate")
        return F.conv1d(x, self.lowpass.filter.expand(c, -1, -1), stride=2, groups=c)


class AntiAliasedActivation(nn.Module):
    def __init__(self, channels: int, cfg: DecoderConfig):
        super().__init__()
        self.upsample = UpSample()
        self.act = Snake(channels, cfg.activation == "snakebeta", cfg.snake_logscale)
        self.downsample = DownSample()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


class AMPBlock(nn.Module):
    """Three (activation, dilated conv, activation, conv) residual steps (the official AMPBlock1)."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...], cfg: DecoderConfig):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in dilations
        )
        self.activations = nn.ModuleList(
            AntiAliasedActivation(channels, cfg) for _ in range(2 * len(dilations))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m, (c1, c2) in enumerate(zip(self.convs1, self.convs2, strict=True)):
            t = c2(self.activations[2 * m + 1](c1(self.activations[2 * m](x))))
            x = t + x
        return x


class BigVGAN(nn.Module):
    """(b, 64, frames) latents -> (b, 1, frames * hop) audio in [-1, 1]."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        c0 = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.in_channels, c0, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        width = c0
        for rate, kernel in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True):
            out = width // 2
            # one transposed conv per stage, in a list as the official checkpoint keys it (ups.{i}.0)
            self.ups.append(
                nn.ModuleList([nn.ConvTranspose1d(width, out, kernel, rate, padding=(kernel - rate) // 2)])
            )
            for k, dilations in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True):
                self.resblocks.append(AMPBlock(out, k, dilations, cfg))
            width = out
        self.activation_post = AntiAliasedActivation(width, cfg)
        self.conv_post = nn.Conv1d(width, 1, 7, padding=3, bias=cfg.use_bias_at_final)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nk = len(self.cfg.resblock_kernel_sizes)
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            mixed = self.resblocks[i * nk](x)
            for j in range(1, nk):
                mixed += self.resblocks[i * nk + j](x)
            x = mixed / nk
        x = self.conv_post(self.activation_post(x))
        return torch.tanh(x) if self.cfg.use_tanh_at_final else torch.clamp(x, -1.0, 1.0)


def fuse_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official checkpoint's `weight_g` / `weight_v` pairs (legacy weight norm, dim 0) fused into
    `weight` with torch's own primitive, so the weights are the official ones to the bit."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".weight_v"):
            continue
        if key.endswith(".weight_g"):
            base = key[: -len(".weight_g")]
            v = state.get(base + ".weight_v")
            if v is None:
                raise KeyError(f"{base}.weight_g has no {base}.weight_v")
            out[base + ".weight"] = torch._weight_norm(v, value, 0)
        else:
            out[key] = value
    orphans = [k for k in state if k.endswith(".weight_v") and k[: -len("_v")] + "_g" not in state]
    if orphans:
        raise KeyError(f"{orphans[0]} has no weight_g")
    return out


def chunk_starts(frames: int, chunk: int = CHUNK_FRAMES, overlap: int = CHUNK_OVERLAP) -> list[int]:
    """The official windows: every chunk - overlap frames while a whole chunk fits, then one aligned to
    the end when the last does not end there."""
    hop = chunk - overlap
    starts = list(range(0, frames - chunk + 1, hop))
    if starts and starts[-1] + chunk != frames:
        starts.append(frames - chunk)
    return starts


def chunk_sources(starts: list[int], frames: int) -> list[tuple[int, int, int]]:
    """(chunk start, first frame, end frame) of the audio each chunk supplies once the official paste
    is done: `overlap // 2` frames are trimmed at inner edges and a later chunk overwrites an earlier
    one, so a chunk supplies from its start (+ the trim, but the first) up to the next one's start +
    the trim, and the last up to the end."""
    trim = CHUNK_OVERLAP // 2
    return [
        (s, s if k == 0 else s + trim, starts[k + 1] + trim if k + 1 < len(starts) else frames)
        for k, s in enumerate(starts)
    ]


@torch.inference_mode()
def decode_chunked(model: BigVGAN, latents: torch.Tensor, *, max_batch: int = 4) -> torch.Tensor:
    """(b, frames, 64) latents -> (b, frames * hop) fp32 mono, as the official `decode_audio` pastes it:
    each chunk decoded alone, `overlap // 2` frames trimmed at inner edges, later chunks written over
    earlier ones (`chunk_sources`). Songs shorter than one chunk (which crash the official code) are
    decoded in one call. The chunks of every song go through the generator `max_batch` at a time."""
    hop = model.cfg.hop
    dtype = next(model.parameters()).dtype
    z = latents.transpose(1, 2)  # (b, 64, frames)
    b, _, frames = z.shape
    starts = chunk_starts(frames)
    if not starts:
        return model(z.to(dtype)).float()[:, 0]
    windows = torch.cat([z[..., s : s + CHUNK_FRAMES] for s in starts]).to(dtype)  # chunk-major
    decoded = torch.cat([model(windows[i : i + max_batch]) for i in range(0, windows.shape[0], max_batch)])
    out = torch.zeros(b, frames * hop, dtype=torch.float32, device=z.device)
    for k, (s, lo, hi) in enumerate(chunk_sources(starts, frames)):
        out[:, lo * hop : hi * hop] = decoded[k * b : (k + 1) * b, 0, (lo - s) * hop : (hi - s) * hop].float()
    return out


class LiveDecode:
    """One take's audio while its latents are still being sampled, block by block: `push` each block
    as it becomes final and get back the audio samples that no later block can change; `finish` with
    the song's end gives the rest. The pieces put together equal `decode_chunked` of the whole take
    with `max_batch=1` sample for sample (the same windows decoded one at a time).

    What is final: a window of the official layout (`chunk_starts`) exists for sure once the latents
    reach one frame past its end, because the end of song cuts a stream at most one frame before the
    end of the block that had already been sampled when it was not cut (`_eos_end`); a sample is final
    once every window that could still come (the next one on the grid, or the one aligned to the
    song's end) starts writing after it. So audio lags the latents by about one window. Songs shorter
    than one window are decoded whole at `finish`, as `decode_chunked` does. `limit_frames`: the
    requested length, where the audio is cut (the sampler fills whole blocks)."""

    def __init__(self, model: BigVGAN, *, limit_frames: int | None = None):
        self.model, self.hop, self.limit = model, model.cfg.hop, limit_frames
        self.dtype = next(model.parameters()).dtype
        self._latents: list[torch.Tensor] = []  # (n, 64) blocks
        self.frames = 0  # latent frames pushed
        self.released = 0  # frames of audio handed out
        self._windows: dict[int, torch.Tensor] = {}  # start -> (CHUNK_FRAMES * hop,) fp32 mono, decoded
        self.finished = False

    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _z(self) -> torch.Tensor:  # (64, frames)
        if len(self._latents) > 1:
            self._latents = [torch.cat(self._latents)]
        return self._latents[0].transpose(0, 1)

    def _window(self, start: int) -> torch.Tensor:
        if start not in self._windows:
            z = self._z()[None, :, start : start + CHUNK_FRAMES].to(self.model_device(), self.dtype)
            self._windows[start] = self.model(z)[0, 0].float()
        return self._windows[start]

    def _release(self, sources: list[tuple[int, int, int]], upto: int) -> torch.Tensor:
        if self.limit is not None:
            upto = min(upto, self.limit)
        hop, pieces = self.hop, []
        for s, lo, hi in sources:
            lo, hi = max(lo, self.released), min(hi, upto)
            if lo < hi:
                pieces.append(self._window(s)[(lo - s) * hop : (hi - s) * hop])
        if pieces:
            self.released = max(self.released, upto)
        step = CHUNK_FRAMES - CHUNK_OVERLAP
        for s in [s for s in self._windows if s + step + CHUNK_OVERLAP // 2 <= self.released]:
            del self._windows[s]  # no layout can take audio from it any more
        if not pieces:
            return torch.zeros(0, dtype=torch.float32, device=self.model_device())
        return torch.cat(pieces)

    @torch.inference_mode()
    def push(self, block: torch.Tensor) -> torch.Tensor:
        """(n, 64) the next final latents -> (samples,) fp32 mono that follow those released before."""
        if self.finished:
            raise RuntimeError("this take's audio is finished")
        self._latents.append(block.detach())
        self.frames += block.shape[0]
        certain = self.frames - 1  # the song is at least this long
        step, trim = CHUNK_FRAMES - CHUNK_OVERLAP, CHUNK_OVERLAP // 2
        grid = list(range(0, certain - CHUNK_FRAMES + 1, step))
        if not grid:
            return self._release([], 0)
        # the windows still to come: the grid's next, or the one aligned to an end at `certain` or later
        upto = min(grid[-1] + step, certain - CHUNK_FRAMES) + trim
        return self._release(chunk_sources(grid, grid[-1] + step + trim), upto)

    @torch.inference_mode()
    def finish(self, last: torch.Tensor | None = None, end: int | None = None) -> torch.Tensor:
        """The rest of the audio, with the song's `last` block if it was not pushed (it may have ended
        the song before itself), the song ending at frame `end` (None: with the frames pushed)."""
        if self.finished:
            raise RuntimeError("this take's audio is finished")
        if last is not None:
            self._latents.append(last.detach())
            self.frames += last.shape[0]
        frames = self.frames if end is None else end
        if frames > self.frames:
            raise ValueError(f"the song ends at frame {frames} but only {self.frames} were pushed")
        self.finished = True
        starts = chunk_starts(frames)
        if not starts:  # shorter than one window: one call on the whole, as decode_chunked
            assert self.released == 0, "audio of a song shorter than one window was released early"
            z = self._z()[None, :, :frames].to(self.model_device(), self.dtype)
            mono = self.model(z)[0, 0].float()
            upto = frames if self.limit is None else min(frames, self.limit)
            self.released = upto
            return mono[: upto * self.hop]
        return self._release(chunk_sources(starts, frames), frames)


class LiveStereo:
    """`fake_stereo` of a mono signal that arrives in pieces: each piece's (2, n), the right channel
    taking the delayed samples from the pieces before."""

    def __init__(self, sample_rate: int, device: torch.device | str = "cpu"):
        self.delay = int(STEREO_DELAY_S * sample_rate)
        self._tail = torch.zeros(self.delay, dtype=torch.float32, device=device)

    def push(self, mono: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([self._tail.to(mono.device), mono])
        right = torch.tensor(STEREO_GAIN, dtype=torch.float32) * joined[: mono.shape[0]]
        self._tail = joined[joined.shape[0] - self.delay :]
        return torch.stack([mono, right])


def fake_stereo(mono: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(b, n) -> (b, 2, n): right = 0.8 x left delayed 10 ms (zeros before), as the official code makes
    its stereo from the decoder's mono."""
    delay = int(STEREO_DELAY_S * sample_rate)
    right = torch.zeros_like(mono)
    right[:, delay:] = torch.tensor(STEREO_GAIN, dtype=torch.float32) * mono[:, : mono.shape[1] - delay]
    return torch.stack([mono, right], dim=1)
