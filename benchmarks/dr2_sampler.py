"""DiffRhythm 2's block sampler: time per song against a straightforward reimplementation of the official
loop on the same weights and noise, in one run, and the key/value cache's memory against song length.

The official loop (`CFM.sample_block_cache`), as written there: a cache that concatenates the text, the
history and the call's keys and values anew at every call (per batch row, then `pad_sequence`), the
all-True boolean attention mask, the cond and null branches as separate calls. Rows then add one change
each (each row's own gain is against the row above):
- branches batched: the cond and null branches of every call as one batch of two rows (the default);
- then, each against that row: no mask (SDPA without the all-True mask, the same attention), and a
  buffered cache (keys and values in buffers allocated once per song; each call writes its own at the
  end and attends to a view of the prefix: no copy of the history per layer per step).

    python benchmarks/dr2_sampler.py --seconds 60 --repeats 3 --plot dr2.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.variants import DR2AttentionWithoutMask, swap_attention  # noqa: E402
from musicgen.model import dr2_dit  # noqa: E402
from musicgen.model.dr2_dit import DR2Config, DR2DiT, time_features  # noqa: E402
from musicgen.model.dr2_sampler import BlockSamplerSettings, block_noise, num_blocks, sample_blocks  # noqa: E402


class OfficialCache:
    """The official BlockFlowMatchingCache's data flow: lists of per-layer tensors, `torch.cat` of the
    history and the call's, and per batch row `cat(text[:T], ...)` followed by `pad_sequence`."""

    def __init__(self, depth: int):
        self.text_k, self.text_v, self.k, self.v = (
            [],
            [],
            [[] for _ in range(depth)],
            [[] for _ in range(depth)],
        )
        self.mode = "step"

    def update(self, layer, k, v):
        if self.mode == "text":
            self.text_k.append(k)
            self.text_v.append(v)
            return self.text_k[layer], self.text_v[layer]
        if len(self.k[layer]) != 0:
            k = torch.cat([self.k[layer], k], dim=-2)
            v = torch.cat([self.v[layer], v], dim=-2)
        if self.mode == "store":
            self.k[layer], self.v[layer] = k, v
        t_len = self.text_k[layer].shape[-2]
        ks = [torch.cat([self.text_k[layer][b][:, :t_len, :], k[b]], dim=-2) for b in range(k.shape[0])]
        vs = [torch.cat([self.text_v[layer][b][:, :t_len, :], v[b]], dim=-2) for b in range(v.shape[0])]
        return (torch.nn.utils.rnn.pad_sequence(ks, batch_first=True),
                torch.nn.utils.rnn.pad_sequence(vs, batch_first=True))  # fmt: skip


@torch.inference_mode()
def official_loop(model: DR2DiT, text, style, noise, settings: BlockSamplerSettings) -> torch.Tensor:
    """The official sampler's loop, one row, written plainly (with its mask switched on in the model)."""
    bs, blocks = noise.shape[2], noise.shape[1]
    t_len = text.shape[1]
    cond, null = OfficialCache(model.cfg.depth), OfficialCache(model.cfg.depth)
    zero = torch.zeros_like(style)
    minus = time_features(torch.full((1, t_len), -1.0), torch.float16)
    plus = time_features(torch.ones(1, bs), torch.float16)
    positions = torch.arange(t_len)[None]
    for cache, tokens, s in ((cond, text, style), (null, torch.zeros_like(text), zero)):
        cache.mode = "text"
        model(model.text_embed(tokens), minus, positions, s, cache)
        cache.mode = "step"
    grid = torch.linspace(0, 1, settings.steps)
    stream = torch.zeros(1, 0, noise.shape[-1])
    for b in range(blocks):
        done = stream.shape[1]
        positions = torch.arange(0, done + bs)[None][:, -bs:]
        x = noise[:, b]
        for k in range(settings.steps - 1):
            t = grid[k]
            features = time_features(t.repeat(1)[:, None].repeat(1, bs))
            e = model.latent_embed(x)
            pred = model(e, features, positions, style, cond)
            pred_null = model(e, features, positions, zero, null)
            x = x + (grid[k + 1] - t) * (pred + (pred - pred_null) * settings.cfg_strength)
        clean = model.latent_embed(x)
        for cache, s in ((cond, style), (null, zero)):
            cache.mode = "store"
            model(clean, plus, positions, s, cache)
            cache.mode = "step"
        stream = torch.cat([stream, x], dim=1)
    return stream[0]


def set_mask(model: DR2DiT, on: bool) -> None:
    swap_attention(model, dr2_dit.Attention if on else DR2AttentionWithoutMask)


def cache_bytes(cfg: DR2Config, text_tokens: int, frames: int, bytes_per: int) -> int:
    """Keys and values held by both guidance streams for a song: 2 streams x 2 (K, V) x depth x tokens x dim."""
    return 2 * 2 * cfg.depth * (text_tokens + frames) * cfg.dim * bytes_per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--text-tokens", type=int, default=300, help="lyrics tokens (a verse and a chorus: ~300)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds over all rows")
    ap.add_argument("--plot", help="write a bar chart (PNG) here")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = DR2Config(dim=args.dim, depth=args.depth, heads=args.heads, text_num_embeds=1000)
    model = DR2DiT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 364, (1, args.text_tokens), generator=g)
    style = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1)
    frames = int(args.seconds * 5)
    blocks = num_blocks(frames, cfg.block_size)
    noise = block_noise(7, blocks, cfg.block_size)[None]
    settings = BlockSamplerSettings(steps=args.steps, cfg_strength=2.0)
    print(f"CPU ({torch.get_num_threads()} threads), DiT dim {cfg.dim} depth {cfg.depth} heads {cfg.heads} fp32; "
          f"{args.seconds:g} s song = {blocks} blocks x {args.steps - 1} steps x 2 branches; "
          f"{args.text_tokens} text tokens", flush=True)  # fmt: skip

    def ours(mask: bool, buffered: bool, batched: bool):
        def run():
            set_mask(model, mask)
            return sample_blocks(
                model, text, style, noise, settings, buffered_cache=buffered, batch_branches=batched
            )[0]

        return run

    def official():
        set_mask(model, True)
        return official_loop(model, text, style, noise, settings)

    rows = [
        ("official loop (cat cache, mask, pad_sequence)", official),
        ("ours, official calls, cache and mask", ours(True, False, False)),
        ("+ branches batched (the default)", ours(True, False, True)),
        ("  + no mask", ours(False, False, True)),
        ("  + buffered cache", ours(True, True, True)),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, fn in rows:
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    base = outs[rows[0][0]]
    first = min(times[rows[0][0]])
    print(
        f"\n{'row':48} | {'best s':>7} | {'median s':>8} | {'vs official':>11} | {'own gain':>8} | {'max |diff|':>10}"
    )
    prev = first
    for name, _ in rows:
        best = min(times[name])
        if name.startswith("  "):  # measured against the default row
            prev = min(times[rows[2][0]])
        diff = (outs[name] - base).abs().max().item()
        print(f"{name:48} | {best:>7.2f} | {statistics.median(times[name]):>8.2f} | {first / best:>10.2f}x | "
              f"{prev / best:>7.2f}x | {diff:>10.1e}")  # fmt: skip
        prev = best

    print("\nkey/value cache of one song (both guidance streams), text of ~300 tokens")
    print(f"{'song s':>6} | {'frames':>6} | {'measured (this config)':>22} | {'DiffRhythm 2 size, bf16':>23}")
    real = DR2Config(dim=2048, depth=16, heads=16)
    for seconds in (30, 60, 120, 210):
        f = int(seconds * 5)
        nb = num_blocks(f, cfg.block_size)
        trace: dict = {}
        if seconds <= args.seconds:
            set_mask(model, False)
            sample_blocks(model, text, style, block_noise(7, nb, cfg.block_size)[None],
                          BlockSamplerSettings(steps=2, cfg_strength=2.0), trace=trace)  # fmt: skip
            measured = f"{trace['cache_bytes'] / 2**20:.1f} MiB"
            assert trace["cache_bytes"] == cache_bytes(cfg, args.text_tokens, nb * cfg.block_size, 4)
        else:
            measured = f"({cache_bytes(cfg, args.text_tokens, nb * cfg.block_size, 4) / 2**20:.1f} MiB)"
        print(f"{seconds:>6} | {f:>6} | {measured:>22} | "
              f"{cache_bytes(real, 300, nb * cfg.block_size, 2) / 2**20:>19.0f} MiB")  # fmt: skip
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8.5, 3.2))
        names = [n for n, _ in rows]
        ax.barh(names[::-1], [min(times[n]) for n in names][::-1], color="#246")
        ax.set_xlabel("seconds per song (best)")
        ax.set_title(f"DiffRhythm 2 block sampler, {args.seconds:g} s song, CPU fp32", fontsize=10)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
