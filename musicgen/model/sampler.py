"""Flow-matching Euler sampler with classifier-free guidance: a pure function of
(model, conditions, noise, settings).

Same algorithm as the official `CFM.sample` (Euler on `t = linspace(0, 1, steps + 1)`,
`v = pred + (pred - null) * cfg_strength`, the null branch without audio cond and lyrics and with the
negative style), organised so that the numbers stay the same while the work shrinks:

- both CFG branches and all takes of a request run as one batch: rows are [cond x k, null x k];
- several requests of the same length run as one batch too (`sample_many`): one conditional group
  per request and one null group for all that share the null conditioning;
- everything step-invariant is computed once per request (`DiT.prepare`), and the null branch's
  all-filler lyric embedding is shared by every request of the same length;
- each take gets its own reproducible noise, drawn on the CPU from `torch.Generator(seed + i)`, so a
  take does not depend on the device, on the batch it ran in or on how many takes were asked for.

How a step's rows run (batched, one by one, on worker threads, as a CUDA graph) is the execution
plan's (musicgen/runtime/plans.py); every plan computes the same numbers, to fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from musicgen.model.dit import DiT
from musicgen.runtime.plans import ExecutionPlan, StepRunner

# Called after every Euler step with (steps done, total steps); raising from it stops sampling
# before the next step (that is how a running job is canceled).
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplerSettings:
    """The defaults are the official inference script's, and DiffRhythm 1's defaults in the registry."""

    steps: int = 31  # Euler updates; the official inference script's steps=32 is 32 grid points = 31 updates
    cfg_strength: float = 4.0
    MIN_STEPS: ClassVar[int] = 1

    def __post_init__(self):
        if not self.MIN_STEPS <= self.steps <= 1000:
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


def sample(
    model: DiT,
    cond: SongConditions,
    noise: torch.Tensor,  # (k, n, 64): one row per take
    settings: SamplerSettings,
    on_step: StepCallback | None = None,
    plan: ExecutionPlan | None = None,
) -> torch.Tensor:
    """Latents (k, n, 64) in fp32, one row per take. An exception raised by `on_step` propagates."""
    (out,) = sample_many(model, [cond], [noise], [settings], [on_step], plan=plan)
    if isinstance(out, BaseException):
        raise out
    return out


def _null_groups(conds: list[SongConditions]) -> tuple[list[int], list[tuple[float, float, torch.Tensor]]]:
    """The null-branch group of each request (0, 1, ... in order of first appearance) and each group's
    (start time, duration, negative style). The null branch sees no lyrics and no latent prompt, so
    requests with equal start time, duration and negative style share one."""
    keys: list[tuple[float, float, torch.Tensor]] = []
    out = []
    for c in conds:
        start = float(c.start_time[0]) if c.start_time is not None else 0.0
        duration = float(c.song_duration[0])
        for j, (s, d, neg) in enumerate(keys):
            if s == start and d == duration and torch.equal(neg, c.negative_style):
                out.append(j)
                break
        else:
            keys.append((start, duration, c.negative_style))
            out.append(len(keys) - 1)
    return out, keys


@torch.inference_mode()
def sample_many(
    model: DiT,
    conds: list[SongConditions],
    noises: list[torch.Tensor],  # per request (k_r, n, 64)
    settings: list[SamplerSettings],
    on_step: list[StepCallback | None] | None = None,
    plan: ExecutionPlan | None = None,
) -> list[torch.Tensor | BaseException]:
    """Sample several requests of the same length and step count as one batch.

    Rows are [cond rows of every request, null rows]; each request is its own conditional group, and
    requests with the same null conditioning share one null group (see `_null_groups`). Each request
    keeps its own guidance strength. When a request's `on_step` raises (canceled, timed out), the
    request leaves the batch before the next step and its slot in the result holds the exception;
    the others go on. Returns per request the latents (k_r, n, 64) in fp32, or that exception.
    `plan` says how each step's rows run (default: one batched forward; the pipeline passes the plan
    resolved for its device, musicgen/runtime/plans.py).
    """
    r_count = len(conds)
    if not r_count or not len(noises) == len(settings) == r_count:
        raise ValueError("give one noise tensor and one settings object per request")
    n, steps = conds[0].frames, settings[0].steps
    if any(c.frames != n for c in conds) or any(s.steps != steps for s in settings):
        raise ValueError("a batch needs requests of the same frame count and step count")
    for noise in noises:
        if noise.shape[1:] != (n, model.cfg.mel_dim):
            raise ValueError(f"noise {tuple(noise.shape)} does not fit {n} frames")
    callbacks = list(on_step) if on_step is not None else [None] * r_count
    device = next(model.parameters()).device
    plan = plan if plan is not None else ExecutionPlan()
    guided = any(s.uses_guidance for s in settings)

    # Work in an order where requests sharing a null group are adjacent, so that the null rows are
    # the conditional rows' x in the same order.
    null_of, null_keys = _null_groups(conds)
    order = sorted(range(r_count), key=lambda r: null_of[r])
    takes = {r: noises[r].shape[0] for r in range(r_count)}
    prompts, masks, step_conds = {}, {}, []
    for r in order:
        prompts[r], masks[r] = _prompt_and_mask(model, conds[r], device)
        step_conds.append(torch.where(masks[r][None, :, None], 0.0, prompts[r]))  # generated frames hidden

    def per_request(get) -> torch.Tensor:
        return torch.cat([get(conds[r]) for r in order]).to(device)

    starts = per_request(lambda c: c.start_time if c.start_time is not None else torch.zeros(1)).float()
    durations = per_request(lambda c: c.song_duration).float()
    groups_cond, groups_text = torch.cat(step_conds), model.embed_text(per_request(lambda c: c.text))
    groups_style = per_request(lambda c: c.style)
    if guided:  # then the null groups, in group order
        u = len(null_keys)
        groups_cond = torch.cat((groups_cond, torch.zeros(u, n, groups_cond.shape[-1], device=device)))
        groups_text = torch.cat((groups_text, model.null_text_embedding(n, device).expand(u, -1, -1)))
        groups_style = torch.cat((groups_style, torch.cat([neg for _, _, neg in null_keys]).to(device)))
        starts = torch.cat((starts, torch.tensor([s for s, _, _ in null_keys], device=device)))
        durations = torch.cat((durations, torch.tensor([d for _, d, _ in null_keys], device=device)))
    pre = model.prepare(groups_cond, groups_text, groups_style, starts, durations)

    active = list(order)  # requests still in the batch, in row order

    def layout(active: list[int]) -> tuple[list[int], tuple[int, ...]]:
        groups = [order.index(r) for r in active]
        rows = [takes[r] for r in active]
        if guided:
            for j in range(len(null_keys)):
                members = [takes[r] for r in active if null_of[r] == j]
                if members:
                    groups.append(r_count + j)
                    rows.append(sum(members))
        return groups, tuple(rows)

    groups, rows = layout(active)  # all groups, in the order prepared
    pre.rows = rows
    x = torch.cat([noises[r] for r in order]).to(device=device, dtype=torch.float32)

    def guidance(active: list[int]) -> torch.Tensor:
        per_row = [settings[r].cfg_strength for r in active for _ in range(takes[r])]
        return torch.tensor(per_row, device=device, dtype=torch.float32)[:, None, None]

    cfg = guidance(active)
    results: list[torch.Tensor | BaseException | None] = [None] * r_count
    t = settings[0].time_grid().to(device)
    velocity = StepRunner(model, plan)  # how each step's rows run
    for i in range(steps):
        rows_in = torch.cat((x, x)) if guided else x
        v = velocity(i, rows_in, t[i], pre)
        if guided:
            k = x.shape[0]
            pred, null = v[:k], v[k:]
            v = pred + (pred - null) * cfg
        x = x + (t[i + 1] - t[i]) * v
        stopped = []
        for r in active:
            if callbacks[r] is None:
                continue
            try:
                callbacks[r](i + 1, steps)
            except Exception as exc:
                results[r] = exc
                stopped.append(r)
        if stopped:
            if len(stopped) == len(active):
                active = []
                break
            keep = torch.tensor([r not in stopped for r in active for _ in range(takes[r])], device=device)
            x = x[keep]
            active = [r for r in active if r not in stopped]
            old_groups = groups
            groups, rows = layout(active)
            pre = pre.select([old_groups.index(g) for g in groups], rows)
            cfg = guidance(active)
            velocity.batch_changed()  # a CUDA graph captured for the old batch is captured again

    offset = 0
    for r in active:
        rows_r = x[offset : offset + takes[r]]
        offset += takes[r]
        results[r] = torch.where(masks[r][None, :, None], rows_r, prompts[r])
    return results


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
