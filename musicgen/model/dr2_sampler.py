"""DiffRhythm 2's block flow matching sampler (the official `CFM.sample_block_cache`), with explicit noise.

A song is generated in blocks of `block_size` latent frames, left to right. The text is encoded once
into a key/value cache per guidance branch (cond: the lyrics and the style; null: filler tokens and a
zero style). Each block integrates its own noise from t = 0 to t = 1 with `steps - 1` Euler steps,
attending to the text and to every clean block before it; the guided velocity is `cond + (cond - null)
* cfg_strength`. The finished block then goes through the model once more at t = +1 to append its keys
and values to both caches. Generation stops early when the last frame comes within an MSE of 0.05 of
all-ones (the end-of-song marker).

Differences from the official code, on purpose:
- noise comes from a `torch.Generator` per take (`block_noise`), not the global RNG, and the official
  `seed` argument is honoured; with the same seed the draws are the official ones (CPU generator);
- several requests with the same text length and block count sample as one batch, each row with its
  own end of song (rows are independent, so a batch equals its requests run alone);
- the official +-1 time features of the text and cache passes are fp16 numbers whatever the model's
  precision (it was trained that way); `round_pass_time=False` keeps them in fp32 instead (measured:
  1.6e-5 on the latents of the conformance run);
- the official code runs only in fp16 (its fp32 path crashes); here fp32, bf16 and fp16 all run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from musicgen.model.dr2_dit import BlockCache, DR2DiT, time_features
from musicgen.runtime.graphs import GraphedCall

EOS_MSE = 0.05
# (block index, step index, t, x (b, bs, c), guided velocity (b, bs, c)) after every Euler step's velocity
StepCallback = Callable[[int, int, float, torch.Tensor, torch.Tensor], None]
# (block index, step index, original indices of the rows still sampled) -> the rows to keep, or None
PruneCallback = Callable[[int, int, list[int]], list[int] | None]


@dataclass(frozen=True)
class BlockSamplerSettings:
    """The defaults are the official command line's, and DiffRhythm 2's defaults in the registry."""

    steps: int = 16  # grid points: steps - 1 Euler updates per block (official CLI default)
    cfg_strength: float = 2.0
    round_pass_time: bool = True  # the +-1 time features of the text and cache passes in fp16, as trained
    MIN_STEPS: ClassVar[int] = 2  # grid points: at least one Euler update per block

    def __post_init__(self):
        if not self.MIN_STEPS <= self.steps <= 1000:
            raise ValueError(f"steps must be in 2..1000, got {self.steps}")
        if not 0.0 <= self.cfg_strength <= 50.0:
            raise ValueError(f"cfg_strength must be in 0..50, got {self.cfg_strength}")

    @property
    def uses_guidance(self) -> bool:
        return self.cfg_strength >= 1e-5  # the official threshold below which the null branch is skipped


def num_blocks(frames: int, block_size: int) -> int:
    return -(-frames // block_size)


def block_noise(seed: int, blocks: int, block_size: int, channels: int = 64) -> torch.Tensor:
    """(blocks, block_size, channels) fp32 on the CPU: what the official sampler draws after
    torch.manual_seed(seed), one randn(1, block_size, channels) per block."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(1, block_size, channels, generator=g) for _ in range(blocks)])


def _eos_end(stream: torch.Tensor) -> int | None:
    """Where the official sampler cuts a (n, c) stream whose last frame is the end marker, else None.
    As the official loop does it: walking back over frames within EOS_MSE of all-ones, it stops one frame
    early, so the cut also drops the last frame that is not the marker."""
    ones = torch.ones_like(stream[-1])
    pos = -1
    mse = torch.nn.functional.mse_loss(stream[pos], ones)
    if mse.abs() > EOS_MSE:
        return None
    while mse.abs() <= EOS_MSE and abs(pos) < stream.shape[0]:
        pos -= 1
        mse = torch.nn.functional.mse_loss(stream[pos], ones)
    return stream.shape[0] + pos


@torch.inference_mode()
def sample_blocks(
    model: DR2DiT,
    text: torch.Tensor,  # (b, T) token ids, the same T for every row
    style: torch.Tensor,  # (b, 512)
    noise: torch.Tensor,  # (b, blocks, block_size, c), e.g. block_noise per row
    settings: BlockSamplerSettings,
    on_step: StepCallback | None = None,
    trace: dict | None = None,
    prune: PruneCallback | None = None,
    buffered_cache: bool = False,
    batch_branches: bool = True,
    cuda_graph: bool = False,
) -> list[torch.Tensor | None]:
    """One (frames, c) latent stream per row; frames = blocks * block_size unless the row ended early.
    `prune`, called before every step, may drop rows (a canceled request): theirs are None.
    `batch_branches`: the cond and null branches of every call as one batch (rows [cond | null], one
    cache), where the official code makes two calls; the same arithmetic per row.
    `buffered_cache`: keys and values in preallocated buffers (default: the official concatenation).
    `cuda_graph` (CUDA; implies the buffered cache and batched branches; EXPERIMENTAL, off by default):
    each block's step is captured once as a CUDA graph and replayed for its other steps (the shapes
    and the cache's addresses stay fixed within a block); a call of 20 tokens is otherwise mostly
    kernel launches. On an H200 (benchmarks/dr2_throughput.py --graphs, bf16, random weights) it
    sampled 2.4-2.7x faster, but its latents were 2.1-3.7 (max abs) away from the eager path's, which
    used the concatenating cache: the autoregressive growth of bf16 rounding or a bug, not told apart
    (no fp32 comparison on a GPU was made). That run's capture read the step's position ids from a
    tensor freed after the step; they are now an input of the graph, and the new capture has not
    been measured on a GPU. The pipeline does not run it (its `graphs` plan runs the engine's
    CUDA-graph ticks); benchmarks/dr2_throughput.py --graphs measures it against eager."""
    if cuda_graph:
        buffered_cache = batch_branches = True
    device, dtype = text.device, next(model.parameters()).dtype
    b, t_len = text.shape
    blocks, bs = noise.shape[1], noise.shape[2]
    depth = model.cfg.depth
    style = style.to(device, dtype)
    pass_dtype = torch.float16 if settings.round_pass_time else None
    capacity = t_len + blocks * bs if buffered_cache else None  # see BlockCache
    guided = settings.uses_guidance
    joint = batch_branches and guided
    # streams: [cache, style] per branch, and each branch's tokens (the text pass only); joint: one
    # cache whose rows are [cond | null]
    zero, fillers = torch.zeros_like(style), torch.zeros_like(text)
    if joint:
        streams = [[BlockCache(depth, capacity), torch.cat([style, zero])]]
        tokens_of = [torch.cat([text, fillers])]
    else:
        streams = [[BlockCache(depth, capacity), style], [BlockCache(depth, capacity), zero]]
        tokens_of = [text, fillers]

    def call(x512, features, positions, stream):
        cache, s = stream
        reps = s.shape[0] // x512.shape[0]
        if reps > 1:
            x512, features, positions = (
                t.repeat(reps, *[1] * (t.ndim - 1)) for t in (x512, features, positions)
            )
        return model(x512, features, positions, s, cache)

    if t_len:
        for (cache, s), tokens in zip(streams, tokens_of, strict=True):
            rows = s.shape[0]
            cache.mode = "text"
            out = model(model.text_embed(tokens), time_features(torch.full((rows, t_len), -1.0, device=device), pass_dtype),
                        torch.arange(t_len, device=device)[None].repeat(rows, 1), s, cache)  # fmt: skip
            cache.mode = "step"
            if trace is not None:
                trace.setdefault("text_pass", []).extend(out.chunk(2) if joint else [out])

    grid = torch.linspace(0, 1, settings.steps, device=device, dtype=torch.float32)
    stream_out = torch.zeros(b, 0, noise.shape[-1], device=device, dtype=dtype)
    ends: list[int | None] = [None] * b
    alive = list(range(b))  # original row of each row still sampled
    results: list[torch.Tensor | None] = [None] * b
    for blk in range(blocks):
        done = stream_out.shape[1]
        x = noise[alive, blk].to(device, dtype)
        graph = None  # this block's step as a CUDA graph (GraphedCall)
        for k in range(settings.steps - 1):
            keep = prune(blk, k, list(alive)) if prune is not None else None
            if keep is not None and keep != alive:
                rows = torch.tensor([alive.index(r) for r in keep], device=device, dtype=torch.long)
                width = len(alive)
                alive, x, stream_out = list(keep), x.index_select(0, rows), stream_out.index_select(0, rows)
                if not alive:
                    return results
                for stream in streams:
                    picked = torch.cat([rows, rows + width]) if joint else rows
                    stream[0].select(picked)
                    stream[1] = stream[1].index_select(0, picked)
                graph = None  # the batch changed shape: capture again
            n = len(alive)
            positions = torch.arange(done, done + bs, device=device)[None].repeat(n, 1)
            t = grid[k]
            features = time_features(t.expand(n, bs))
            if cuda_graph and joint and device.type == "cuda":
                if graph is None:  # in step mode the cache only writes the call's keys and values into
                    # the same slots, so warming up and capturing change nothing that counts; the
                    # positions are an input too (this step's tensor is freed after it)
                    graph = GraphedCall(
                        lambda x_, f_, p_: call(model.latent_embed(x_), f_, p_, streams[0]),
                        x, features, positions, warm_up=True,
                    )  # fmt: skip
                v, v_null = graph(x, features, positions).clone().chunk(2)
            elif joint:
                embedded = model.latent_embed(x)
                v, v_null = call(embedded, features, positions, streams[0]).chunk(2)
            else:
                embedded = model.latent_embed(x)
                v = call(embedded, features, positions, streams[0])
                v_null = call(embedded, features, positions, streams[1]) if guided else None
            if v_null is not None:
                if trace is not None:
                    trace.setdefault("pred", []).append((v, v_null))
                v = v + (v - v_null) * settings.cfg_strength
            if on_step is not None:
                on_step(blk, k, float(t), x, v)
            x = x + (grid[k + 1] - t) * v
        n = len(alive)
        positions = torch.arange(done, done + bs, device=device)[None].repeat(n, 1)
        plus_one = time_features(torch.ones(n, bs, device=device), pass_dtype)
        clean = model.latent_embed(x)
        for stream in streams:  # both branches' caches, guided or not, as the official code does
            stream[0].mode = "store"
            out = call(clean, plus_one, positions, stream)
            stream[0].mode = "step"
            if trace is not None:
                trace.setdefault("cache_pass", []).extend(out.chunk(2) if joint else [out])
        stream_out = torch.cat([stream_out, x], dim=1)
        for pos, r in enumerate(alive):
            if ends[r] is None:
                ends[r] = _eos_end(stream_out[pos])
        if all(ends[r] is not None for r in alive):
            break
    if trace is not None:
        trace["cache_bytes"] = sum(stream[0].nbytes() for stream in streams)
    for pos, r in enumerate(alive):
        results[r] = stream_out[pos, : ends[r] if ends[r] is not None else stream_out.shape[1]]
    return results
