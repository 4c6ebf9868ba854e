"""Flow-matching Euler sampler with classifier-free guidance: a pure function of
(model, conditions, noise, settings).

Same algorithm as the official `CFM.sample` (Euler on `t = linspace(0, 1, steps + 1)`,
`v = pred + (pred - null) * cfg_strength`, the null branch without audio cond and lyrics and with the
negative style), organised so that the numbers stay the same while the work shrinks:

- both CFG branches and all takes of a request run as one batch: rows are [cond x k, null x k];
- everything step-invariant is computed once per request (`DiT.prepare`), and the null branch's
  all-filler lyric embedding is shared by every request of the same length;
- each take gets its own reproducible noise, drawn on the CPU from `torch.Generator(seed + i)`, so a
  take does not depend on the device, on the batch it ran in or on how many takes were asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from musicgen.model.dit import DiT

# Called after every Euler step with (steps done, total steps); raising from it stops sampling
# before the next step (that is how a running job is canceled).
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 31  # Euler updates; the official inference script's steps=32 is 32 grid points = 31 updates
    cfg_strength: float = 4.0

    def __post_init__(self):
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be in 1..1000, got {self.steps}")
        if not 0.0 <= self.cfg_strength <= 50.0:
            raise ValueError(f"cfg_strength must be in 0..50, got {self.cfg_strength}")

    @property
    def uses_guidance(self) -> bool:
        return self.cfg_strength >= 1e-5  # the official threshold below which the null branch is skipped

    def time_grid(self) -> torch.Tensor:
        return torch.linspace(0, 1, self.steps + 1, dtype=torch.float32)


@dataclass
class SongConditions:
    """What one request conditions on; every tensor has a leading batch dim of 1."""

    text: torch.Tensor  # (1, n) frame-aligned model token ids, 0 = filler
    style: torch.Tensor  # (1, 512) style embedding
    negative_style: torch.Tensor  # (1, 512) style of the null branch
    song_duration: torch.Tensor  # (1,) frames / max_frames
    start_time: torch.Tensor | None = None  # (1,), 0 by default
    # edit mode: a latent prompt and a mask of the frames to (re)generate; None means generate all
    latent_prompt: torch.Tensor | None = None  # (1, n, 64)
    generate_mask: torch.Tensor | None = None  # (n,) bool, True where new audio is generated

    @property
    def frames(self) -> int:
        return self.text.shape[1]


def take_noise(seeds: list[int], frames: int, channels: int) -> torch.Tensor:
    """(len(seeds), frames, channels) fp32 on the CPU; row i is torch.randn under seed seeds[i]."""
    rows = [torch.randn(frames, channels, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows)


def _prompt_and_mask(model: DiT, cond: SongConditions, device) -> tuple[torch.Tensor, torch.Tensor]:
    n, mel = cond.frames, model.cfg.mel_dim
    prompt = cond.latent_prompt if cond.latent_prompt is not None else torch.zeros(1, n, mel)
    mask = cond.generate_mask if cond.generate_mask is not None else torch.ones(n, dtype=torch.bool)
    if prompt.shape != (1, n, mel) or mask.shape != (n,):
        raise ValueError(
            f"latent prompt {tuple(prompt.shape)} / mask {tuple(mask.shape)} do not fit {n} frames"
        )
    return prompt.to(device=device, dtype=torch.float32), mask.to(device)


@torch.inference_mode()
def sample(
    model: DiT,
    cond: SongConditions,
    noise: torch.Tensor,  # (k, n, 64): one row per take
    settings: SamplerSettings,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Latents (k, n, 64) in fp32, one row per take."""
    device = next(model.parameters()).device
    k, n = noise.shape[0], cond.frames
    if noise.shape[1:] != (n, model.cfg.mel_dim):
        raise ValueError(f"noise {tuple(noise.shape)} does not fit {n} frames")
    prompt, mask = _prompt_and_mask(model, cond, device)
    step_cond = torch.where(mask[None, :, None], 0.0, prompt)  # frames to generate are hidden

    text = cond.text.to(device)
    start = cond.start_time if cond.start_time is not None else torch.zeros(1)
    start, duration = start.to(device, torch.float32), cond.song_duration.to(device, torch.float32)
    style = cond.style.to(device)
    if settings.uses_guidance:
        pre = model.prepare(
            torch.cat((step_cond, torch.zeros_like(step_cond))),
            torch.cat((model.embed_text(text), model.null_text_embedding(n, device))),
            torch.cat((style, cond.negative_style.to(device))),
            start.repeat(2),
            duration.repeat(2),
        )
    else:
        pre = model.prepare(step_cond, model.embed_text(text), style, start, duration)

    x = noise.to(device=device, dtype=torch.float32)
    t = settings.time_grid().to(device)
    for i in range(settings.steps):
        rows = torch.cat((x, x)) if settings.uses_guidance else x
        v = model.velocity(rows, t[i], pre).float()
        if settings.uses_guidance:
            pred, null = v[:k], v[k:]
            v = pred + (pred - null) * settings.cfg_strength
        x = x + (t[i + 1] - t[i]) * v
        if on_step is not None:
            on_step(i + 1, settings.steps)
    return torch.where(mask[None, :, None], x, prompt)


@torch.inference_mode()
def sample_reference(
    model: DiT,
    cond: SongConditions,
    noise: torch.Tensor,
    settings: SamplerSettings,
) -> torch.Tensor:
    """The official algorithm, written straightforwardly: per take, two separate forwards per step
    (conditional, then null) that recompute everything. For tests and benchmarks only."""
    device = next(model.parameters()).device
    prompt, mask = _prompt_and_mask(model, cond, device)
    step_cond = torch.where(mask[None, :, None], 0.0, prompt)
    start = (cond.start_time if cond.start_time is not None else torch.zeros(1)).to(device)
    duration = cond.song_duration.to(device)
    text, style, neg = cond.text.to(device), cond.style.to(device), cond.negative_style.to(device)
    t = settings.time_grid().to(device)
    outs = []
    for row in noise:
        x = row[None].to(device)
        for i in range(settings.steps):
            pred = model(x, step_cond, text, t[i], style, start, duration).float()
            if settings.uses_guidance:
                null = model(
                    x, step_cond, text, t[i], neg, start, duration, drop_audio_cond=True, drop_text=True
                )
                pred = pred + (pred - null.float()) * settings.cfg_strength
            x = x + (t[i + 1] - t[i]) * pred
        outs.append(torch.where(mask[None, :, None], x, prompt))
    return torch.cat(outs)
