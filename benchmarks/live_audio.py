"""DiffRhythm 2 live audio: how soon a song can be heard and whether its stream keeps ahead of a
listener, alone and with other songs sampling on the same engine. Random-weight DiT and BigVGAN
decoder of the sizes given, written to a temporary folder in the official files and read back by the
pipeline's own loaders (load_dr2, load_bigvgan), run by DR2Pipeline on its engine (the batched plan),
whose LiveDecode hands each take's final samples to SongRequest.on_audio as its blocks finish.

One run per --concurrency N: N songs of the same length and lyrics length (different seeds) sample at
once, each from a thread of its own calling pipe.generate; the N - 1 others are started first and the
measured song joins when they are all sampling (N = 1: the song alone). For the measured song (and,
in the JSON, every song), with t = 0 at its first "sampling" Progress:
- time to first audio: the first on_audio call with samples;
- stream RTF: audio seconds released after the first piece over the wall seconds from the first piece
  to the last (>= 1: the stream keeps up on average);
- a simulated listener who starts playing at the first piece, at 1x, and waits when the next piece has
  not come: stalls (count, total seconds), and the minimum lead, the least audio released ahead of the
  playhead when a piece arrives (negative: that piece came late by as much);
- time to finish (generate returned) and the audio's length.
On a CPU the live decode runs on the engine's thread between ticks (DR2Pipeline.live_decoder), so
decoding slows every song's sampling; on a GPU it has a thread of its own.

    python benchmarks/live_audio.py --dim 512 --depth 8 --duration 60 --steps 16 --concurrency 1 4
    python benchmarks/live_audio.py --dim 64 --depth 2 --duration 20 --steps 4 --concurrency 1 2
    python benchmarks/live_audio.py --device cuda --dtype bf16 --dim 2048 --depth 16 --heads 16 \
        --decoder-channels 1536 --decoder-kernels 3 --duration 210 --concurrency 1 4 8 16 \
        --json live.json --plot live.png
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from musicgen.model.bigvgan import BigVGAN, DecoderConfig  # noqa: E402
from musicgen.model.dr2_dit import DR2Config, DR2DiT  # noqa: E402
from musicgen.model.loading import load_bigvgan, load_dr2, save_bigvgan, save_dr2  # noqa: E402
from musicgen.pipelines.base import Progress, SongRequest  # noqa: E402
from musicgen.pipelines.dr2 import DR2Pipeline, _compile_probe  # noqa: E402
from musicgen.registry import DR2, MODELS  # noqa: E402
from musicgen.runtime.device import resolve_device, resolve_dtype  # noqa: E402
from musicgen.runtime.plans import apply_execution, resolve_execution  # noqa: E402


def build_pipeline(args, device: torch.device, dtype: torch.dtype, folder: Path) -> DR2Pipeline:
    """Random weights saved in the official files and loaded as DR2Pipeline._load loads them."""
    torch.manual_seed(args.seed)
    dit = DR2DiT(DR2Config(dim=args.dim, depth=args.depth, heads=args.heads or args.dim // 64,
                           text_num_embeds=1000, block_size=10,
                           extra={"text_dim": 512, "use_flex_attn": False}))  # fmt: skip
    save_dr2(dit, folder)
    kernels = (3, 7, 11)[: args.decoder_kernels]  # the release has three; one is a third of the cost
    decoder = BigVGAN(DecoderConfig(upsample_initial_channel=args.decoder_channels,
                                    resblock_kernel_sizes=kernels,
                                    resblock_dilation_sizes=((1, 3, 5),) * len(kernels),
                                    use_tanh_at_final=False, use_bias_at_final=False))  # fmt: skip
    save_bigvgan(decoder, folder)
    del dit, decoder
    # diffrhythm-2's spec: its 10-210 s limits and defaults; nothing is downloaded (no _load)
    spec = MODELS["diffrhythm-2"]
    execution = resolve_execution(DR2, device, dtype, plan="auto", compile=args.compile)
    dit = load_dr2(folder, device=device, dtype=dtype)
    apply_execution(dit, execution, _compile_probe(dit, device))
    decoder = load_bigvgan(folder, device=device, dtype=dtype)
    pipe = DR2Pipeline(spec, dit, decoder, None, device, execution.plan)
    if not pipe.continuous:
        raise SystemExit(f"plan {execution.plan} does not run on the engine: no live audio to measure")
    return pipe


class Stream:
    """One song's request and what its callbacks saw (perf_counter times)."""

    def __init__(self, args, seed: int, duration: float, steps: int):
        g = torch.Generator().manual_seed(seed)
        style = torch.randn(1, 512, generator=g)
        self.req = SongRequest(
            tokens=torch.randint(1, 1001, (args.tokens,), generator=g),
            song_duration=0.0,  # DiffRhythm 1's; DiffRhythm 2 reads duration_s
            style_embedding=style / style.norm(),
            seed=seed,
            steps=steps,
            cfg_strength=args.cfg,
            duration_s=duration,
            on_audio=self.on_audio,
        )
        self.sampling = threading.Event()
        self.t_sampling: float | None = None
        self.pieces: list[tuple[float, int]] = []  # (arrival, samples)
        self.chunks: list[torch.Tensor] = []
        self.t_done: float | None = None
        self.result = None
        self.error: BaseException | None = None

    def report(self, p: Progress) -> None:
        if p.stage == "sampling" and self.t_sampling is None:
            self.t_sampling = time.perf_counter()
            self.sampling.set()

    def on_audio(self, take: int, samples: torch.Tensor) -> None:
        if samples.shape[-1]:
            self.pieces.append((time.perf_counter(), samples.shape[-1]))
            self.chunks.append(samples)

    def run(self, pipe: DR2Pipeline) -> None:
        try:
            self.result = pipe.generate(self.req, self.report)
        except BaseException as exc:  # reported by the caller, after the others finish
            self.error = exc
        finally:
            self.t_done = time.perf_counter()
            self.sampling.set()  # a song that failed before sampling must not hang the start


def stream_stats(s: Stream, rate: int) -> dict:
    """The listener's view of one stream (see the module docstring); times from its sampling start."""
    t0 = s.t_sampling
    arrivals = [t - t0 for t, _ in s.pieces]
    starts, audio = [], 0.0  # the audio time each piece begins at
    for _, n in s.pieces:
        starts.append(audio)
        audio += n / rate
    first = arrivals[0]
    stalls, stalled, leads = 0, 0.0, []
    for arrival, start in zip(arrivals[1:], starts[1:], strict=True):
        need = first + start + stalled  # when the playhead reaches this piece
        leads.append(need - arrival)
        if arrival > need:
            stalls += 1
            stalled += arrival - need
    span = arrivals[-1] - first
    return {
        "time_to_first_audio_s": first,
        "stream_rtf": (audio - starts[1]) / span if len(arrivals) > 1 and span > 0 else None,
        "stalls": stalls,
        "stall_s": stalled,
        "min_lead_s": min(leads) if leads else None,
        "finish_s": s.t_done - t0,
        "audio_s": audio,
        "pieces": len(arrivals),
        "curve": [[a, st + n / rate] for a, st, (_, n) in zip(arrivals, starts, s.pieces, strict=True)],
    }


def run_songs(pipe: DR2Pipeline, args, n: int, duration: float, steps: int, seed: int) -> list[Stream]:
    """N songs at once on the pipeline's engine; the first is the measured one, started last."""
    songs = [Stream(args, seed + 10 * k, duration, steps) for k in range(n)]
    threads = [threading.Thread(target=s.run, args=(pipe,), daemon=True) for s in songs]
    for t, s in zip(threads[1:], songs[1:], strict=True):
        t.start()
        s.sampling.wait()
    threads[0].start()
    for t in threads:
        t.join()
    for k, s in enumerate(songs):
        if s.error is not None:
            raise RuntimeError(f"song {k} of {n} failed") from s.error
        # the pieces are the take's audio (the pipeline puts them together): a check of the callback
        whole = torch.cat(s.chunks, dim=1)
        assert torch.equal(whole, s.result.audio[0, :, : whole.shape[1]]), (
            "live audio differs from the result"
        )
        assert whole.shape[1] == s.result.audio.shape[-1]
    return songs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="songs running (one run each)")
    ap.add_argument("--duration", type=float, default=60.0, help="song length, seconds (10-210)")
    ap.add_argument("--steps", type=int, default=16, help="grid points a block (the official 16)")
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--tokens", type=int, default=200, help="lyrics tokens a song")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--heads", type=int, default=0, help="0: dim / 64")
    ap.add_argument(
        "--decoder-channels", type=int, default=64, help="upsample_initial_channel (release: 1536)"
    )
    ap.add_argument(
        "--decoder-kernels", type=int, default=1, choices=(1, 2, 3), help="resblock kernels (release: 3)"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: fp32 on a CPU, bf16 on CUDA")
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the table (and every song's stream) here")
    ap.add_argument("--plot", help="write audio released against wall time (PNG, matplotlib) here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(device, args.dtype)
    with tempfile.TemporaryDirectory(prefix="live-audio-") as tmp:
        pipe = build_pipeline(args, device, dtype, Path(tmp))
    rate, cfg = pipe.sample_rate, pipe.dit.cfg
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (pipe.dit, pipe.decoder)]
    print(f"{name}, {str(dtype)[6:]}: DiT dim {cfg.dim} depth {cfg.depth} heads {cfg.heads} ({params[0]:.0f} M), "
          f"decoder {args.decoder_channels} channels x {args.decoder_kernels} kernels ({params[1]:.1f} M), "
          f"{rate} Hz; {args.duration:g} s songs, {args.tokens} tokens, {args.steps} steps, cfg {args.cfg}",
          flush=True)  # fmt: skip
    # warm-up: the engine's thread, the kernels, the allocator (a short song, two steps a block)
    run_songs(pipe, args, 1, float(pipe.spec.min_seconds), 2, args.seed + 999)

    rows, streams = [], {}
    for n in args.concurrency:
        t = time.perf_counter()
        songs = run_songs(pipe, args, n, args.duration, args.steps, args.seed)
        stats = [stream_stats(s, rate) for s in songs]
        streams[n] = stats
        row = {"songs": n, **{k: v for k, v in stats[0].items() if k != "curve"}}
        row["others_stalls"] = sum(s["stalls"] for s in stats[1:])
        rows.append(row)
        print(f"  {n} songs: done in {time.perf_counter() - t:.1f} s", flush=True)

    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    header = (f"{'songs':>5} | {'first audio s':>13} | {'stream RTF':>10} | {'stalls':>6} | {'stall s':>7} | "
              f"{'min lead s':>10} | {'finish s':>8} | {'audio s':>7}")  # fmt: skip
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['songs']:>5} | {r['time_to_first_audio_s']:>13.2f} | {fmt(r['stream_rtf']):>10} | "
              f"{r['stalls']:>6} | {r['stall_s']:>7.2f} | {fmt(r['min_lead_s']):>10} | {r['finish_s']:>8.2f} | "
              f"{r['audio_s']:>7.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": name, "rows": rows,
                                               "streams": {str(k): v for k, v in streams.items()}},
                                              indent=2))  # fmt: skip
        print(f"table written to {args.json}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for i, n in enumerate(args.concurrency):
            curve = streams[n][0]["curve"]
            xs, ys = [0.0], [0.0]
            for t, a in curve:  # a step: the audio released stays until the next piece
                xs += [t, t]
                ys += [ys[-1], a]
            color = f"C{i}"
            ax.plot(xs, ys, color=color, label=f"{n} song{'s' if n > 1 else ''}: released")
            first, audio = curve[0][0], curve[-1][1]
            ax.plot([first, first + audio], [0, audio], color=color, linestyle=":", linewidth=1,
                    label="listener at 1x" if i == 0 else None)  # fmt: skip
        ax.set_xlabel("wall time from sampling start (s)")
        ax.set_ylabel("audio released (s)")
        ax.set_title(f"DiffRhythm 2 live audio, {name}, {str(dtype)[6:]}, dim {cfg.dim} depth {cfg.depth}, "
                     f"{args.steps} steps", fontsize=9)  # fmt: skip
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
