"""DiffRhythm 2 songs per hour on one device: the block sampler and the chunked BigVGAN decode at the
release's reported size (DiT dim 2048, depth 16, 16 heads; decoder 1536 channels, rates 10-10-8-3-2-2),
random weights (none can be downloaded where this runs): the block sampler alone (`sample_blocks`, how
DR2Pipeline ran before the engine; benchmarks/dr2_serving.py measures the engine) and the decoder.

    python benchmarks/dr2_throughput.py --device cuda --seconds 95 210 --takes 1 4
    python benchmarks/dr2_throughput.py --device cuda --dtype fp32 --seconds 95 --takes 1 --graphs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from musicgen.model.bigvgan import BigVGAN, DecoderConfig, decode_chunked  # noqa: E402
from musicgen.model.dr2_dit import DR2Config, DR2DiT  # noqa: E402
from musicgen.model.dr2_sampler import BlockSamplerSettings, block_noise, num_blocks, sample_blocks  # noqa: E402
from musicgen.runtime.device import resolve_device, resolve_dtype  # noqa: E402


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, nargs="+", default=[95, 210])
    ap.add_argument("--takes", type=int, nargs="+", default=[1, 4], help="takes sampled and decoded together")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--text-tokens", type=int, default=300)
    ap.add_argument("--decoder-batch", type=int, nargs="+", default=[4], help="windows per decoder call")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--decoder-channels", type=int, default=1536)
    ap.add_argument(
        "--graphs", action="store_true",
        help="also sample eagerly with the preallocated cache, and with a CUDA graph per block (which uses it): "
             "each compared with eager and with the preallocated cache",
    )  # fmt: skip
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(device, args.dtype)
    torch.manual_seed(0)
    with torch.device(device):
        dit = DR2DiT(DR2Config(dim=args.dim, depth=args.depth, heads=args.heads, text_num_embeds=1000))
        decoder = BigVGAN(DecoderConfig(upsample_initial_channel=args.decoder_channels, use_tanh_at_final=False,
                                        use_bias_at_final=False))  # fmt: skip
    dit, decoder = dit.to(dtype).eval(), decoder.to(dtype).eval()
    params = (
        sum(p.numel() for p in dit.parameters()) / 1e6,
        sum(p.numel() for p in decoder.parameters()) / 1e6,
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, {str(dtype)[6:]}: DiT {params[0]:.0f} M parameters, decoder {params[1]:.0f} M; "
          f"{args.steps} steps, CFG 2, {args.text_tokens} lyrics tokens", flush=True)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    header = (f"{'song s':>6} | {'takes':>5} | {'sampler':>8} | {'win/call':>8} | {'sample s/song':>13} | "
              f"{'decode s/song':>13} | {'songs/hour':>10} | {'peak GiB':>8} | {'vs eager':>8} | {'vs buffer':>9}")  # fmt: skip
    print(header)
    print("-" * len(header))
    settings = BlockSamplerSettings(steps=args.steps, cfg_strength=2.0)
    for seconds in args.seconds:
        frames = int(seconds * 5)
        blocks = num_blocks(frames, 10)
        for takes in args.takes:
            text = torch.randint(1, 364, (takes, args.text_tokens), generator=g).to(device)
            style = torch.nn.functional.normalize(torch.randn(takes, 512, generator=g), dim=-1).to(device)
            noise = torch.stack([block_noise(s, blocks, 10) for s in range(takes)])
            eager = buffered = None
            for mode in ["eager", "buffered", "graphs"] if args.graphs else ["eager"]:
                for windows in args.decoder_batch:
                    for _round in range(2):  # the first round warms the kernels up
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        sync(device)
                        t0 = time.perf_counter()
                        latents = sample_blocks(dit, text, style, noise, settings, cuda_graph=mode == "graphs",
                                                buffered_cache=mode == "buffered")  # fmt: skip
                        sync(device)
                        t1 = time.perf_counter()
                        mono = decode_chunked(decoder, torch.stack(latents), max_batch=windows)
                        sync(device)
                        t2 = time.perf_counter()
                    assert mono[:, : frames * 9600].shape == (takes, frames * 9600)
                    stacked = torch.stack(latents).float()
                    eager = stacked if eager is None else eager
                    buffered = stacked if mode == "buffered" else buffered
                    diff = (stacked - eager).abs().max().item()
                    vs_buffer = (
                        f"{(stacked - buffered).abs().max().item():>9.1e}"
                        if buffered is not None
                        else f"{'-':>9}"
                    )
                    peak = (
                        torch.cuda.max_memory_allocated(device) / 2**30
                        if device.type == "cuda"
                        else float("nan")
                    )
                    per_song = (t2 - t0) / takes
                    print(f"{seconds:>6.0f} | {takes:>5} | {mode:>8} | {windows:>8} | {(t1 - t0) / takes:>13.2f} | "
                          f"{(t2 - t1) / takes:>13.2f} | {3600 / per_song:>10.0f} | {peak:>8.2f} | {diff:>8.1e} | {vs_buffer}",
                          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
