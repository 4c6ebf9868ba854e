"""The optimised sampler against the official algorithm, same weights, same noise, in one run, with
an ablation: each optimisation's own gain.

    python benchmarks/sampler.py                       # CPU reference config: dim 512, depth 8, 32 heads,
                                                       # 4 ConvNeXt blocks, 2048 frames, 7 steps, CFG 4
    python benchmarks/sampler.py --repeats 3 --plot benchmarks/sampler.png
    python benchmarks/sampler.py --compile             # adds a torch.compile row (compile time reported)
    python benchmarks/sampler.py --real-size --device cuda --steps 32 --compile --memory-frames 2048 4096 6144

Rows, each adding one change to the row above (the model's weights never change):
  official algorithm  `sample_reference`: per take, a conditional and a null forward per step, each
                      recomputing the text path, ConvNeXt blocks and embeddings; the model as the
                      official code lays it out (unfused projections, the transposed residual stream)
  prepared once       `sample` with the batched plan: step-invariant work once per request, both
                      guidance branches in one batch
  contiguous stream   the conv position embedding's output made contiguous
  fused projections   q/k/v in one matrix multiply, gate/up in one
  device plan         (GPU) the plan `auto` picks there: one batch, a CUDA graph per step on CUDA
  rows back to back   (CPU) each row (guidance branch, take) its own forward, all threads each
  packed weights      (CPU, fp32) the projections' weights packed for oneDNN (`runtime.projections.pack`)
  oneDNN post-ops     (CPU, fp32) SiLU, gate x up and the residual additions inside the packed
                      matrix multiplies
  rows in parallel    (CPU) the plan `auto` picks there: the rows' forwards at the same time on
                      worker threads, the intra-op threads split among them
  torch.compile       (with --compile) the blocks compiled; the first song's compile time is reported

Times are per song (one take); with --repeats N the rows run N rounds, alternating, and the table
shows the best and the median. `max |diff|` is against the official algorithm's latents. The second
table (--requests) is the service's batching of different requests. --memory-frames: peak GPU memory
of one song per length (CUDA).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.variants import (  # noqa: E402
    AdditiveMaskAttention,
    TransposedConvPositionEmbedding,
    set_post_ops,
    swap_attention,
)
from musicgen.model.dit import Attention, ConvPositionEmbedding, DiT, DiTConfig  # noqa: E402
from musicgen.model.sampler import (  # noqa: E402
    SamplerSettings,
    SongConditions,
    sample,
    sample_many,
    sample_reference,
    take_noise,
)
from musicgen.registry import DR1, MODELS  # noqa: E402
from musicgen.runtime.compile import compile_modules  # noqa: E402
from musicgen.runtime.device import resolve_device, resolve_dtype  # noqa: E402
from musicgen.runtime.plans import ExecutionPlan  # noqa: E402
from musicgen.runtime.projections import fuse, pack, packing_available, unfuse, unpack  # noqa: E402


def build(cfg: DiTConfig, device, dtype) -> DiT:
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(cfg)
    with torch.no_grad():  # the official init zeroes the text-fusion layers; make every path count
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
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


def timed(device, fn: Callable, *args, **kwargs) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


@dataclass
class Row:
    name: str
    setup: Callable[[DiT], None]  # puts the model in this row's state
    run: Callable[[], torch.Tensor]
    times: list[float]
    out: torch.Tensor | None = None
    note: str = ""


def set_state(
    model: DiT,
    *,
    contiguous: bool,
    fused: bool,
    mask: bool = False,
    packed: bool = False,
    post_ops: bool = False,
) -> None:
    """The model as one row runs it: the runtime's projections (musicgen/runtime/projections.py) and the
    official code's layouts (benchmarks/variants.py) swapped in or out."""
    unpack(model)
    model.input_embed.conv_pos_embed.__class__ = (
        ConvPositionEmbedding if contiguous else TransposedConvPositionEmbedding
    )
    swap_attention(model, Attention)  # no mask, unfused, before fusing or not
    if fused:
        fuse(model)
    else:
        unfuse(model)
        if mask:
            swap_attention(model, AdditiveMaskAttention)
    if packed:
        pack(model)
        set_post_ops(model, post_ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--real-size", action="store_true", help="DiffRhythm-1.2-base's real config (dim 2048, depth 16)"
    )
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--frames", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=7, help="Euler steps per song (the default song uses 31)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds over all rows")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile row")
    ap.add_argument("--requests", type=int, nargs="*", default=[], help="batch sizes of the second table")
    ap.add_argument("--memory-frames", type=int, nargs="*", default=[], help="peak GPU memory per length")
    ap.add_argument("--fp32-check", action="store_true", help="compare reduced-precision latents with fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--plot", help="write a bar chart (PNG) here")
    ap.add_argument("--check-plans", action="store_true",
                    help="only compare the plans' latents (batched, sequential, parallel or graphs; eager and compiled) and exit")  # fmt: skip
    ap.add_argument("--service-path", type=int, nargs="*", metavar="FRAMES",
                    help="only time songs of these lengths as the service runs them (compile=auto, plan=auto): "
                    "first and second song per length, so compile time shows; then exit")  # fmt: skip
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(device, args.dtype)
    cfg = MODELS["diffrhythm-1.2-base"].dit if args.real_size else DiTConfig(
        dim=args.dim, depth=args.depth, max_frames=max(2048, args.frames))  # fmt: skip
    model = build(cfg, device, dtype)
    cond = conditions(args.frames, cfg.max_frames)
    settings = SamplerSettings(steps=args.steps, cfg_strength=4.0)
    noise = take_noise([0], args.frames, 64)
    torch.set_grad_enabled(False)
    batched = ExecutionPlan(batched=True)
    auto = ExecutionPlan.resolve("auto", device, DR1)
    print(
        f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) dtype={dtype} "
        f"dim={cfg.dim} depth={cfg.depth} heads={cfg.heads} convnext={cfg.conv_layers} frames={args.frames} "
        f"steps={args.steps} cfg=4 torch={torch.__version__} threads={torch.get_num_threads()} "
        f"plan(auto)={auto}",
        flush=True,
    )

    if args.service_path:
        service_path(model, cfg, args, device)
        return

    if args.check_plans:
        check_plans(model, cfg, args, device)
        return

    def official(m):
        set_state(m, contiguous=False, fused=False)

    rows = [
        Row("official code (additive mask)", lambda m: set_state(m, contiguous=False, fused=False, mask=True),
            lambda: sample_reference(model, cond, noise, settings), []),
        Row("official algorithm, no mask", official, lambda: sample_reference(model, cond, noise, settings), []),
        Row("prepared once, branches batched", official,
            lambda: sample(model, cond, noise, settings, plan=batched), []),
        Row("+ contiguous stream", lambda m: set_state(m, contiguous=True, fused=False),
            lambda: sample(model, cond, noise, settings, plan=batched), []),
        Row("+ fused projections", lambda m: set_state(m, contiguous=True, fused=True),
            lambda: sample(model, cond, noise, settings, plan=batched), []),
    ]  # fmt: skip
    if device.type == "cpu":  # the CPU's plan, packing and post-ops, one row each; auto last
        sequential = ExecutionPlan.resolve("sequential", device, DR1)
        rows.append(Row("+ rows back to back (sequential)", lambda m: set_state(m, contiguous=True, fused=True),
                        lambda: sample(model, cond, noise, settings, plan=sequential), []))  # fmt: skip
        packed = dtype == torch.float32 and packing_available()
        if packed:
            rows += [
                Row("+ packed weights (oneDNN)", lambda m: set_state(m, contiguous=True, fused=True, packed=True),
                    lambda: sample(model, cond, noise, settings, plan=sequential), []),
                Row("+ oneDNN post-ops", lambda m: set_state(m, contiguous=True, fused=True, packed=True, post_ops=True),
                    lambda: sample(model, cond, noise, settings, plan=sequential), []),
            ]  # fmt: skip
        rows.append(Row("+ rows in parallel (threads split)",
                        lambda m: set_state(m, contiguous=True, fused=True, packed=packed, post_ops=packed),
                        lambda: sample(model, cond, noise, settings, plan=auto), []))  # fmt: skip
    else:
        rows.append(Row(f"+ device plan ({'graphs' if auto.cuda_graph else 'batched'})",
                        lambda m: set_state(m, contiguous=True, fused=True),
                        lambda: sample(model, cond, noise, settings, plan=auto), []))  # fmt: skip

    # warm-up (kernel selection, allocator, CUDA graph private pools) on a short song, not timed
    warm_cond, warm_noise = conditions(256, cfg.max_frames), take_noise([0], 256, 64)
    for row in rows[1:]:
        row.setup(model)
        for plan in {batched, auto, ExecutionPlan(batched=False)}:
            sample(model, warm_cond, warm_noise, SamplerSettings(steps=3), plan=plan)
    sample_reference(model, warm_cond, warm_noise, SamplerSettings(steps=1))

    if args.compile:
        compiled_row = Row("+ torch.compile" if device.type == "cuda" else "  torch.compile (unpacked)", lambda m: set_state(m, contiguous=True, fused=True),
                           lambda: sample(model, cond, noise, settings, plan=auto), [])  # fmt: skip
        unfused_row = Row("  torch.compile, projections unfused", lambda m: set_state(m, contiguous=True, fused=False),
                          lambda: sample(model, cond, noise, settings, plan=auto), [])  # fmt: skip
        compile_modules(model.transformer_blocks)
        try:
            for row in (unfused_row, compiled_row):  # compiled last: the state the next tables use
                row.setup(model)
                t_compile, _ = timed(device, sample, model, cond, noise, SamplerSettings(steps=2), plan=auto)
                row.note = f"first song compiled in {t_compile:.1f} s"
            rows += [compiled_row, unfused_row]
        except Exception as exc:
            print(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)

    for _ in range(args.repeats):
        for row in rows:
            row.setup(model)
            try:
                seconds, out = timed(device, run_uncompiled(model, row, args.compile))
            except Exception as exc:  # one failing row must not lose the others' numbers
                row.note = f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"
                print(f"  {row.name}: {row.note}", flush=True)
                continue
            row.times.append(seconds)
            row.out = out
            print(f"  {row.name}: {seconds:.3f} s", flush=True)
    for row in rows:
        if not row.times:
            print(f"{row.name}: {row.note}")
    rows = [row for row in rows if row.times]

    ref = rows[0]
    best_ref = min(ref.times)
    print()
    header = (f"{'':<36} | {'best s/song':>11} | {'median s/song':>13} | {'vs official':>11} | "
              f"{'own gain':>8} | {'max |diff|':>10}")  # fmt: skip
    print(header)
    print("-" * len(header))
    previous = best_ref
    for row in rows:
        best = min(row.times)
        diff = (row.out.float() - ref.out.float()).abs().max().item()
        print(f"{row.name:<36} | {best:>11.3f} | {statistics.median(row.times):>13.3f} | {best_ref / best:>10.2f}x"
              f" | {previous / best:>7.2f}x | {diff:>10.2e}" + (f"  ({row.note})" if row.note else ""))  # fmt: skip
        previous = best

    if args.requests:
        print()
        header = f"{'requests':>8} | {'one by one s/song':>17} | {'batched s/song':>14} | {'speed-up':>8} | {'max |diff|':>10}"
        print(header)
        print("-" * len(header))
    for r in args.requests:
        conds = [conditions(args.frames, cfg.max_frames, seed=i) for i in range(r)]
        noises = [take_noise([i], args.frames, 64) for i in range(r)]
        one_by_one(model, conds, noises, settings)  # warm: kernels, and a compiled graph per batch shape
        sample_many(model, conds, noises, [settings] * r)
        t_one, ones = timed(device, one_by_one, model, conds, noises, settings)
        t_many, many = timed(device, sample_many, model, conds, noises, [settings] * r)
        diff = max((a - b).abs().max().item() for a, b in zip(ones, many, strict=True))
        print(f"{r:>8} | {t_one / r:>17.3f} | {t_many / r:>14.3f} | {t_one / t_many:>7.2f}x | {diff:>10.2e}")

    if args.fp32_check and dtype != torch.float32:
        # how far a reduced-precision run is from fp32 at all: the official algorithm and the optimised
        # sampler in this dtype, each against the official algorithm on an fp32 copy of the weights
        exact = build(cfg, device, torch.float32)
        exact.load_state_dict(model.state_dict())
        truth = sample_reference(exact, cond, noise, settings)
        del exact
        fastest = min(rows, key=lambda r: min(r.times))
        print(f"\nagainst fp32 (official algorithm, fp32 weights): {rows[0].name} max |diff| "
              f"{(rows[0].out.float() - truth).abs().max().item():.2e}, {fastest.name.strip()} "
              f"{(fastest.out.float() - truth).abs().max().item():.2e}; fp32 latents' max |x| {truth.abs().max().item():.2f}")  # fmt: skip

    if device.type == "cuda":  # the attention must run on the flash kernel (no mask): prove it can
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.compiler.set_stance("force_eager"):
                sample(model, cond, noise, SamplerSettings(steps=1), plan=batched)
            print("\nattention: runs on the flash kernel alone (SDPBackend.FLASH_ATTENTION)")
        except RuntimeError as exc:
            print(f"\nattention: the flash kernel refused these inputs: {str(exc)[:300]}")

    if args.memory_frames and device.type == "cuda":
        print()
        print(
            f"{'frames':>6} | {'seconds of audio':>16} | {'peak GPU MiB':>12} | {'of which weights':>16} | {'s/song':>7}"
        )
        print("-" * 70)
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        for frames in args.memory_frames:
            c, n = conditions(frames, max(cfg.max_frames, frames)), take_noise([0], frames, 64)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with torch.compiler.set_stance("force_eager"):  # no recompiling for each length
                seconds, _ = timed(device, sample, model, c, n, settings, plan=auto)
            peak = torch.cuda.max_memory_allocated() / 2**20
            print(
                f"{frames:>6} | {frames * 2048 / 44100:>16.1f} | {peak:>12.0f} | {weights:>16.0f} | {seconds:>7.2f}"
            )

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.8))
        names = [r.name for r in rows]
        ax.barh(names[::-1], [min(r.times) for r in rows][::-1], color="C0")
        ax.set_xlabel(f"seconds per song ({args.steps} steps, best of {args.repeats})")
        ax.set_title(f"DiT dim {cfg.dim}, depth {cfg.depth}, {args.frames} frames, {device.type} {dtype}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


def service_path(model: DiT, cfg: DiTConfig, args, device) -> None:
    """What the service does: compile as `compile: auto` does (with its start-up probe), then songs of
    each length under the `auto` plan, twice: the first song of a length includes any compiling."""
    from musicgen.pipelines.dr1 import _compile_probe
    from musicgen.runtime.plans import apply_execution, resolve_execution

    t0 = (
        time.perf_counter()
    )  # what the pipeline does after loading: fused and packed on the CPU, compiled on CUDA
    apply_execution(model, resolve_execution(DR1, device, model.dtype), _compile_probe(model, device))
    print(f"start-up compile probe: {time.perf_counter() - t0:.1f} s")
    settings = SamplerSettings(steps=args.steps, cfg_strength=4.0)
    print(f"{'frames':>6} | {'first song s':>12} | {'second song s':>13}")
    for frames in args.service_path:
        c, n = conditions(frames, max(cfg.max_frames, frames)), take_noise([0], frames, 64)
        first, _ = timed(device, sample, model, c, n, settings)
        second, _ = timed(device, sample, model, c, n, settings)
        print(f"{frames:>6} | {first:>12.2f} | {second:>13.2f}", flush=True)


def check_plans(model: DiT, cfg: DiTConfig, args, device) -> None:
    """Every plan, eager and compiled, against the batched eager plan: a batch of three requests (one
    with two takes) in which one request leaves after step 2 (the CUDA graph is then captured again)."""
    from musicgen.errors import GenerationCanceled

    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions in fp32: the plans differ by rounding alone

    conds = [conditions(args.frames, cfg.max_frames, seed=i) for i in range(3)]
    noises = [
        take_noise([10], args.frames, 64),
        take_noise([20, 21], args.frames, 64),
        take_noise([30], args.frames, 64),
    ]
    settings = [SamplerSettings(steps=args.steps, cfg_strength=4.0)] * 3

    def leave_at_2(k, n):
        if k == 2:
            raise GenerationCanceled("leaves")

    def run(plan):
        return sample_many(model, conds, noises, settings, [None, leave_at_2, None], plan=plan)

    plans = ["batched", "sequential"] + (["graphs"] if device.type == "cuda" else ["parallel"])
    base = run(ExecutionPlan.resolve("batched", device, DR1))
    print(f"{'plan':<22} | {'max |diff| vs batched eager':>27} | canceled request")
    for compiled in (False, True):
        if compiled:
            compile_modules(model.transformer_blocks)
        for name in plans:
            out = run(ExecutionPlan.resolve(name, device, DR1))
            diff = max(
                (a - b).abs().max().item()
                for a, b in zip(out, base, strict=True)
                if isinstance(a, torch.Tensor)
            )
            label = f"{name}{' compiled' if compiled else ''}"
            print(f"{label:<22} | {diff:>27.2e} | {type(out[1]).__name__}", flush=True)


def one_by_one(model, conds, noises, settings) -> list[torch.Tensor]:
    return [sample(model, c, n, settings) for c, n in zip(conds, noises, strict=True)]


def run_uncompiled(model: DiT, row: Row, compiled: bool) -> Callable[[], torch.Tensor]:
    """The rows before the compile row run the eager blocks, also once the blocks were compiled."""
    if not compiled or "torch.compile" in row.name:
        return row.run

    def eager():
        with torch.compiler.set_stance("force_eager"):
            return row.run()

    return eager


if __name__ == "__main__":
    main()
