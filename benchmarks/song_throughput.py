"""Songs per hour on one device: the whole GPU path of a song as the service runs it, at full size.

For each song length and number of songs per batch: DiT sampling (the `auto` plan and `compile: auto`
of the service, 31 steps, CFG) and the chunked VAE decode (windows of 128 frames, 32 overlapping, 4
windows per call), timed separately, with the peak device memory. The arithmetic beside it: FLOPs per
song counted from the architecture, and the throughput they imply on this device.

The VAE is the official one's size, not its weights: the official `vae_model.pt` is a TorchScript
Oobleck autoencoder (Stable Audio's design: 128 channels, multiples 1-2-4-8-16, upsampling strides
2-4-4-8-8 = 2048 samples per frame, Snake activations, three dilated residual units per stage). A
decoder of that shape with random weights costs the same arithmetic; DiT weights are random too (no
weights can be downloaded where this runs). Style encoding (a text prompt through MuQ-MuLan, cached
per prompt) and MP3 encoding (CPU threads, beside the next batch: `benchmarks/take_cost.py`) are not
on the device's critical path and are not timed here.

    python benchmarks/song_throughput.py --device cuda --frames 2048 6144 --songs 1 4 --plot out.png
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampler import build, conditions, timed  # noqa: E402  (benchmarks/sampler.py)

from musicgen.model.dit import DiTConfig  # noqa: E402
from musicgen.model.sampler import SamplerSettings, sample_many, take_noise  # noqa: E402
from musicgen.model.vae import FRAMES_PER_SECOND, LATENT_CHANNELS, SongVAE, _windows  # noqa: E402
from musicgen.registry import DIFFRHYTHM_1B, DR1  # noqa: E402
from musicgen.runtime.device import resolve_device, resolve_dtype  # noqa: E402
from musicgen.runtime.plans import apply_execution, resolve_execution  # noqa: E402

STRIDES = (2, 4, 4, 8, 8)
MULTIPLES = (1, 2, 4, 8, 16)


class Snake(nn.Module):
    """x + sin(alpha x)^2 / beta, per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sin(self.alpha * x).pow(2) / (self.beta + 1e-9)


class Residual(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            Snake(channels),
            nn.Conv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),
            Snake(channels),
            nn.Conv1d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class OobleckSizedDecoder(nn.Module):
    """A decoder of the official VAE's shape: (b, 64, t) latents -> (b, 2, t * 2048) audio."""

    def __init__(self, channels: int = 128):
        super().__init__()
        widths = [channels * m for m in MULTIPLES]
        layers: list[nn.Module] = [nn.Conv1d(LATENT_CHANNELS, widths[-1], 7, padding=3)]
        for i in reversed(range(len(STRIDES))):
            c_in, c_out, s = widths[i], widths[i - 1] if i else channels, STRIDES[i]
            layers += [
                Snake(c_in),
                nn.ConvTranspose1d(
                    c_in, c_out, 2 * s, stride=s, padding=math.ceil(s / 2), output_padding=s % 2
                ),
                *(Residual(c_out, d) for d in (1, 3, 9)),
            ]
        layers += [Snake(channels), nn.Conv1d(channels, 2, 7, padding=3, bias=False)]
        self.net = nn.Sequential(*layers)

    @torch.jit.export
    def decode_export(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_export(latents)


def conv_flops(module: nn.Module, frames: int) -> float:
    """Multiply-add FLOPs (x2) of the decoder's convolutions for `frames` latent frames."""
    total, length = 0.0, frames
    for m in module.modules():
        if isinstance(m, nn.ConvTranspose1d):
            length *= m.stride[0]
            total += 2 * m.in_channels * m.out_channels * m.kernel_size[0] * length / m.stride[0]
        elif isinstance(m, nn.Conv1d):
            total += 2 * m.in_channels * m.out_channels * m.kernel_size[0] * length
    return total


def dit_flops(model, frames: int, steps: int, rows: int) -> float:
    """FLOPs of one song's sampling: every linear layer of the blocks and the attention, per row."""
    linear = sum(m.weight.numel() for m in model.transformer_blocks.modules() if isinstance(m, nn.Linear))
    per_velocity = 2 * linear * frames + 4 * frames * frames * model.cfg.dim * model.cfg.depth
    return per_velocity * steps * rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="+", default=[2048, 6144])
    ap.add_argument("--songs", type=int, nargs="+", default=[1, 4], help="songs sampled and decoded together")
    ap.add_argument("--steps", type=int, default=31)
    ap.add_argument("--dim", type=int, default=DIFFRHYTHM_1B["dim"])
    ap.add_argument("--depth", type=int, default=DIFFRHYTHM_1B["depth"])
    ap.add_argument("--vae-channels", type=int, default=128)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--vae-batch",
        type=int,
        nargs="*",
        default=[],
        help="also time one song's decode at these windows per VAE call (the service uses 4)",
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak, for utilisation"
    )
    ap.add_argument("--plot", help="write a bar chart (PNG) of songs per hour here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(device, args.dtype)
    cfg = DiTConfig(**{**DIFFRHYTHM_1B, "dim": args.dim, "depth": args.depth},
                    max_frames=max(args.frames), duration_embed=True)  # fmt: skip
    model = build(cfg, device, dtype)
    from musicgen.pipelines.dr1 import _compile_probe

    execution = resolve_execution(DR1, device, dtype, compile=args.compile)  # as the service resolves it
    t0 = time.perf_counter()
    apply_execution(model, execution, _compile_probe(model, device))
    compile_s = time.perf_counter() - t0
    torch.manual_seed(0)
    vae = SongVAE(OobleckSizedDecoder(args.vae_channels).to(device).eval(), device)
    plan = execution.plan
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"device {name}, DiT dim {args.dim} depth {args.depth} {str(dtype)[6:]}, plan {plan}, compile "
          f"{args.compile} (start-up {compile_s:.1f} s); VAE stand-in {args.vae_channels} channels fp32; "
          f"{args.steps} steps, CFG 4", flush=True)  # fmt: skip

    header = (f"{'song s':>6} | {'songs':>5} | {'DiT s/song':>10} | {'VAE s/song':>10} | {'total s/song':>12} | "
              f"{'songs/hour':>10} | {'audio s/s':>9} | {'peak GiB':>8} | {'DiT TFLOP/s':>11} | {'VAE TFLOP/s':>11}")  # fmt: skip
    print(header)
    print("-" * len(header))
    results = []
    for frames in args.frames:
        for n in args.songs:
            conds = [conditions(frames, cfg.max_frames, seed=i) for i in range(n)]
            noises = [take_noise([i], frames, LATENT_CHANNELS) for i in range(n)]
            settings = [SamplerSettings(steps=args.steps)] * n
            for _round in (True, False):  # the first round compiles and captures for this shape
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                dit_s, latents = timed(device, sample_many, model, conds, noises, settings, plan=plan)
                batch = torch.cat([x.to(device) for x in latents])
                vae_s, audio = timed(device, vae.decode, batch)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            assert audio.shape == (n, 2, frames * 2048)
            seconds = frames / FRAMES_PER_SECOND
            per_song = (dit_s + vae_s) / n
            d_fl = dit_flops(model, frames, args.steps, rows=2)  # CFG: conditional and null rows
            v_fl = (
                conv_flops(vae.module, 128) * len(_windows(frames, 128, 32))
                if frames > 128
                else conv_flops(vae.module, frames)
            )
            row = dict(seconds=seconds, songs=n, dit=dit_s / n, vae=vae_s / n, total=per_song,
                       per_hour=3600 / per_song, rt=seconds / per_song, peak=peak,
                       dit_tflops=d_fl * n / dit_s / 1e12, vae_tflops=v_fl * n / vae_s / 1e12,
                       dit_flops=d_fl, vae_flops=v_fl)  # fmt: skip
            results.append(row)
            print(f"{seconds:>6.0f} | {n:>5} | {row['dit']:>10.2f} | {row['vae']:>10.2f} | {per_song:>12.2f} | "
                  f"{row['per_hour']:>10.0f} | {row['rt']:>9.0f} | {peak:>8.2f} | {row['dit_tflops']:>11.0f} | "
                  f"{row['vae_tflops']:>11.0f}", flush=True)  # fmt: skip
    print()
    for frames in args.frames:
        r = next(r for r in results if round(r["seconds"]) == round(frames / FRAMES_PER_SECOND))
        line = (f"{r['seconds']:.0f} s song: DiT {r['dit_flops'] / 1e12:.1f} TFLOP ({args.steps} steps x 2 rows), "
                f"VAE {r['vae_flops'] / 1e12:.1f} TFLOP")  # fmt: skip
        if args.peak_tflops:
            best = max((x for x in results if x["seconds"] == r["seconds"]), key=lambda x: x["dit_tflops"])
            line += (
                f"; DiT at {best['dit_tflops'] / args.peak_tflops:.0%} of {args.peak_tflops:.0f} TFLOP/s peak"
            )
        print(line)
    if args.vae_batch:
        frames = max(args.frames)
        z = torch.randn(1, frames, LATENT_CHANNELS, device=device)
        print(f"\nVAE decode of one {frames / FRAMES_PER_SECOND:.0f} s song by windows per call")
        for mb in args.vae_batch:
            times = [timed(device, vae.decode, z, max_batch=mb)[0] for _ in range(2)]
            peak = ""
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                timed(device, vae.decode, z, max_batch=mb)
                peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
            print(f"  {mb:>3} windows per call: {min(times):.2f} s{peak}", flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['seconds']:.0f} s x{r['songs']}" for r in results]
        ax.bar(labels, [3600 / r["dit"] for r in results], label="DiT only", color="#9ab")
        ax.bar(labels, [r["per_hour"] for r in results], label="DiT + VAE decode", color="#246")
        ax.set_ylabel("songs per hour")
        ax.set_title(f"{name}: songs per hour (song length x songs per batch)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
