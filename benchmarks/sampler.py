"""Optimised sampler vs the official algorithm, same weights, same noise, one run.

The reference (`sample_reference`) is the official algorithm written straightforwardly: per take,
a conditional and a null forward per step, each recomputing the text path, ConvNeXt blocks, fusion
projections and embeddings. The optimised `sample` batches both CFG branches and all takes and does
the step-invariant work once per request.

    python benchmarks/sampler.py                                   # mid-size on CPU (dim 512, depth 8, 2048 frames)
    python benchmarks/sampler.py --real-size --device cuda --dtype bf16 # DiffRhythm's real size, random weights
    python benchmarks/sampler.py --plot benchmarks/sampler.png
    python benchmarks/sampler.py --takes --requests 2 4             # the service's batches only

The second table is the service's batching: R different requests of the same length, one take
each, sampled one after another (`sample` per request) vs together (`sample_many`, one conditional
group per request and one shared null group).
"""

from __future__ import annotations

import argparse
import time

import torch

from musicgen.model.device import resolve_device, resolve_dtype
from musicgen.model.dit import DiT, DiTConfig
from musicgen.model.sampler import (
    SamplerSettings,
    SongConditions,
    sample,
    sample_many,
    sample_reference,
    take_noise,
)
from musicgen.registry import MODELS


def build(cfg: DiTConfig, device, dtype) -> DiT:
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(cfg)
    return model.to(dtype).eval()


def conditions(frames: int, max_frames: int, seed: int = 0) -> SongConditions:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 364, (1, frames), generator=g)
    text[:, torch.rand(frames, generator=g) < 0.6] = 0  # mostly fillers, as in real lyrics
    return SongConditions(
        text=text,
        style=torch.randn(1, 512, generator=g),
        negative_style=torch.linspace(-1, 1, 512)[None],  # one negative style, as in the pipeline
        song_duration=torch.tensor([frames / max_frames]),
    )


def timed(device, fn, *args) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def one_by_one(model, conds, noises, settings) -> list[torch.Tensor]:
    return [sample(model, c, n, settings) for c, n in zip(conds, noises, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--real-size", action="store_true", help="DiffRhythm-1.2-base's real config (dim 2048, depth 16)"
    )
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--frames", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4, help="Euler steps per song (the default song uses 31)")
    ap.add_argument("--takes", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--requests", type=int, nargs="*", default=[2, 4], help="batch sizes of the second table")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--plot", help="write a bar chart (PNG) here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(device, args.dtype)
    if args.real_size:
        cfg = MODELS["diffrhythm-1.2-base"].dit
    else:
        cfg = DiTConfig(dim=args.dim, depth=args.depth, max_frames=max(2048, args.frames))
    model = build(cfg, device, dtype)
    cond = conditions(args.frames, cfg.max_frames)
    settings = SamplerSettings(steps=args.steps, cfg_strength=4.0)
    torch.set_grad_enabled(False)

    # warm-up (kernel selection, allocator) on a short song, not timed
    warm = conditions(256, cfg.max_frames)
    sample(model, warm, take_noise([0], 256, 64), SamplerSettings(steps=1))
    sample_reference(model, warm, take_noise([0], 256, 64), SamplerSettings(steps=1))

    print(
        f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) dtype={dtype} "
        f"dim={cfg.dim} depth={cfg.depth} heads={cfg.heads} frames={args.frames} steps={args.steps} "
        f"torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    header = f"{'takes':>5} | {'reference s/song':>16} | {'optimised s/song':>16} | {'speed-up':>8} | {'max |diff|':>10}"
    print(header)
    print("-" * len(header))
    rows = []
    for k in args.takes:
        noise = take_noise(list(range(k)), args.frames, 64)
        t_ref, ref = timed(device, sample_reference, model, cond, noise, settings)
        t_opt, opt = timed(device, sample, model, cond, noise, settings)
        diff = (ref - opt).abs().max().item()
        rows.append((k, t_ref / k, t_opt / k))
        print(f"{k:>5} | {t_ref / k:>16.3f} | {t_opt / k:>16.3f} | {t_ref / t_opt:>7.2f}x | {diff:>10.2e}")

    if args.requests:
        print()
        header = f"{'requests':>8} | {'one by one s/song':>17} | {'batched s/song':>14} | {'speed-up':>8} | {'max |diff|':>10}"
        print(header)
        print("-" * len(header))
    for r in args.requests:
        conds = [conditions(args.frames, cfg.max_frames, seed=i) for i in range(r)]
        noises = [take_noise([i], args.frames, 64) for i in range(r)]
        t_one, ones = timed(device, one_by_one, model, conds, noises, settings)
        t_many, many = timed(device, sample_many, model, conds, noises, [settings] * r)
        diff = max((a - b).abs().max().item() for a, b in zip(ones, many, strict=True))
        print(f"{r:>8} | {t_one / r:>17.3f} | {t_many / r:>14.3f} | {t_one / t_many:>7.2f}x | {diff:>10.2e}")

    if args.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="reference (official algorithm)")
        ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label="optimised")
        ax.set_xticks(list(xs), [f"{r[0]} take(s)" for r in rows])
        ax.set_ylabel(f"seconds per song ({args.steps} steps)")
        ax.set_title(f"DiT dim {cfg.dim}, depth {cfg.depth}, {args.frames} frames, {device.type} {dtype}")
        ax.legend(loc="lower center")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
