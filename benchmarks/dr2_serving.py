"""DiffRhythm 2 serving: N requests of mixed lyrics lengths and durations sampled three ways, side by side:
one at a time (sample_blocks per request), today's grouping (requests of equal text length, block
count, steps and guidance batched into one sample_blocks call, as DR2Pipeline._batch_key groups them)
and the continuous-batching engine (musicgen.engine.DR2Engine: one DiT call per tick over every
running request); optionally `graphs`, the engine's fixed-shape ticks (CUDA graphs on CUDA, the graphs
plan), and `compiled`, the engine with the blocks' MLPs compiled as `compile: on` does (compiled and
warmed up on small requests first, outside the timing: the warm-up's seconds are printed). Random-weight DiT from a DR2Config; the block sampler only (no decoder).

Under the table, the ceiling of batching on this device: a DiT call's time per row for one take (2
rows) against all the run's takes at once (2 x requests rows), attention left out (it costs the same
per row either way). The engine cannot beat one at a time by more than that ratio. Then the engine's
tick with every request running (its best of 10 early ticks) against a call of one request alone (the
one-at-a-time mode's time over its DiT calls, text passes included), and how much of the tick its
attention takes (timed with a device sync around each call) with the keys and values it reads.

Requests arrive all at once, or as a Poisson process with --rate requests per second. One server, a
simulated clock: a mode's clock advances by the measured time of each call it makes and jumps to the
next arrival when it has nothing to do, so no time is slept. Time to finish = finish - arrival.
Every request of the grouped and engine modes is compared with the same request sampled alone (the
one-at-a-time mode) and the max abs difference printed. Peak memory: the largest resident set size
sampled after each call (CPU: the whole process's, so a mode also counts what the allocator kept from
the modes before it; they run in the order given), or torch.cuda.max_memory_allocated (CUDA, reset
before each mode).

    python benchmarks/dr2_serving.py --requests 8 --dim 512 --depth 8
    python benchmarks/dr2_serving.py --device cuda --dtype bf16 --dim 2048 --depth 16 --requests 4 16 64 \
        --rate 0.5 --json serving.json --plot serving.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from musicgen.engine import DR2Engine  # noqa: E402
from musicgen.model.dr2_dit import DR2Config, DR2DiT  # noqa: E402
from musicgen.model.dr2_sampler import BlockSamplerSettings, block_noise, num_blocks, sample_blocks  # noqa: E402
from musicgen.registry import DR2  # noqa: E402
from musicgen.runtime.compile import compile_modules, uncompile_modules  # noqa: E402
from musicgen.runtime.device import resolve_device, resolve_dtype  # noqa: E402
from musicgen.runtime.plans import compiled_parts  # noqa: E402

FRAME_RATE = 5  # latent frames per second


class Memory:
    """Peak memory of one mode: sampled RSS on the CPU, the allocator's peak on CUDA."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def reset(self) -> None:
        self.peak = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_requests(args, block_size: int, device: torch.device, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out, clock = [], 0.0
    for i in range(args.n):
        t_len = int(torch.randint(args.lyrics[0], args.lyrics[1] + 1, (1,), generator=g))
        seconds = args.seconds[0] + float(torch.rand((), generator=g)) * (args.seconds[1] - args.seconds[0])
        blocks = num_blocks(int(seconds * FRAME_RATE), block_size)
        if args.rate:
            clock += float(torch.empty(()).exponential_(args.rate, generator=g))
        out.append({
            "arrival": clock if args.rate else 0.0,
            "text": torch.randint(1, 364, (t_len,), generator=g).to(device),
            "style": torch.nn.functional.normalize(torch.randn(512, generator=g), dim=-1).to(device),
            "noise": block_noise(seed * 1000 + i, blocks, block_size),
            "audio_s": blocks * block_size / FRAME_RATE,
        })  # fmt: skip
    return out


class CallCounter:
    """Counts the model's forwards (text passes included) while entered."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.calls = model, 0

    def __enter__(self) -> CallCounter:
        self._hook = self.model.register_forward_pre_hook(self._count)
        return self

    def _count(self, *_args) -> None:
        self.calls += 1

    def __exit__(self, *_exc) -> None:
        self._hook.remove()


def run_alone(model, reqs, settings, device, memory, progress):
    clock, finish, latents = 0.0, [], []
    for i, r in enumerate(reqs):
        clock = max(clock, r["arrival"])
        t0 = time.perf_counter()
        latents.append(sample_blocks(model, r["text"][None], r["style"][None], r["noise"][None], settings)[0])
        sync(device)
        clock += time.perf_counter() - t0
        memory.sample()
        finish.append(clock)
        progress(f"alone: request {i + 1}/{len(reqs)} done at {clock:.1f} s")
    return finish, latents


def run_grouped(model, reqs, settings, device, memory, progress):
    """Whenever the server is free: every request that has arrived, grouped by DR2Pipeline's batch key
    (text length, blocks, steps, cfg), each group one sample_blocks call, oldest group first."""
    clock, finish, latents = 0.0, [None] * len(reqs), [None] * len(reqs)
    pending = list(range(len(reqs)))
    while pending:
        clock = max(clock, reqs[pending[0]]["arrival"])
        ready = [i for i in pending if reqs[i]["arrival"] <= clock]
        groups: dict[tuple, list[int]] = {}
        for i in ready:
            key = (reqs[i]["text"].shape[0], reqs[i]["noise"].shape[0], settings.steps, settings.cfg_strength)
            groups.setdefault(key, []).append(i)
        for rows in groups.values():
            t0 = time.perf_counter()
            outs = sample_blocks(model, torch.stack([reqs[i]["text"] for i in rows]),
                                 torch.stack([reqs[i]["style"] for i in rows]),
                                 torch.stack([reqs[i]["noise"] for i in rows]), settings)  # fmt: skip
            sync(device)
            clock += time.perf_counter() - t0
            memory.sample()
            for i, o in zip(rows, outs, strict=True):
                finish[i], latents[i] = clock, o
            progress(f"grouped: a batch of {len(rows)} done at {clock:.1f} s")
        pending = [i for i in pending if finish[i] is None]
    return finish, latents


def run_engine(model, reqs, settings, device, memory, progress, budget, graphs=False):
    engine = DR2Engine(model, device=device, memory_budget_bytes=budget, graphs=graphs)
    clock, handles, nxt = 0.0, [], 0
    finish: list[float | None] = [None] * len(reqs)
    bound = sum(r["noise"].shape[0] * settings.steps for r in reqs) + len(reqs)  # ticks, with slack
    for _ in range(bound):
        if engine.idle and nxt < len(reqs):
            clock = max(clock, reqs[nxt]["arrival"])
        while nxt < len(reqs) and reqs[nxt]["arrival"] <= clock:
            r = reqs[nxt]
            handles.append(engine.submit(r["text"], r["style"], r["noise"], settings))
            nxt += 1
        if engine.idle and nxt == len(reqs):
            break
        t0 = time.perf_counter()
        engine.step()
        sync(device)
        clock += time.perf_counter() - t0
        memory.sample()
        for i, h in enumerate(handles):
            if h.done and finish[i] is None:
                finish[i] = clock
                progress(f"engine: request {i + 1} done at {clock:.1f} s (tick {engine.ticks}, "
                         f"{engine.running} running, {engine.waiting} waiting)")  # fmt: skip
    else:
        raise RuntimeError(f"the engine did not finish within {bound} ticks")
    stats = {"ticks": engine.ticks, "rows_per_tick": engine.rows_sampled / max(engine.ticks, 1)}
    if graphs:
        stats["captures"] = engine.captures
    return finish, [h.result() for h in handles], stats


def batching_ceiling(model, rows: int, device: torch.device, repeats: int = 5) -> tuple[float, float]:
    """Seconds per row of a DiT call of block_size tokens per row (no cache: no attention to a history)
    for 2 rows and for `rows` rows, best of `repeats`."""
    bs = model.cfg.block_size

    def per_row(n: int) -> float:
        x = torch.randn(n, bs, 512, device=device, dtype=model.dtype)
        features = torch.randn(n, bs, 256, device=device)
        positions = torch.arange(bs, device=device)[None].repeat(n, 1)
        style = torch.randn(n, 512, device=device, dtype=model.dtype)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(repeats + 1):
                sync(device)
                t0 = time.perf_counter()
                model(x, features, positions, style, None)
                sync(device)
                best = min(best, time.perf_counter() - t0)
        return best / n

    return per_row(2), per_row(rows)


def full_tick(model, reqs, settings, device: torch.device, ticks: int = 10) -> dict:
    """The engine's tick with every request running (the first ticks of an all-at-once run), best of
    `ticks`: its seconds, the seconds its attention calls take (a device sync around each) and the
    bytes of keys and values they read (every row's keys, K and V, every layer)."""
    engine = DR2Engine(model, device=device)
    for r in reqs:
        engine.submit(r["text"], r["style"], r["noise"], settings)
    engine.step()  # admission, the text passes and the first tick
    spent = {"attention": 0.0, "keys": 0}

    def timed(fn):
        def run(*args, **kw):
            sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            sync(device)
            spent["attention"] += time.perf_counter() - t0
            return out

        return run

    def prepare(lo, starts, n_query, lengths):
        spent["keys"] += sum(lengths)
        return cache_prepare(lo, starts, n_query, lengths)

    layers = [block.self_attn for block in model.transformer_blocks]
    cache_prepare = engine.cache.prepare
    engine.cache.prepare = prepare
    for layer in layers:  # instance attributes over the class's methods, removed below
        layer.attend, layer.attend_rows = timed(layer.attend), timed(layer.attend_rows)
    best = None
    try:
        for _ in range(ticks):
            spent["attention"], spent["keys"] = 0.0, 0
            sync(device)
            t0 = time.perf_counter()
            engine.step()
            sync(device)
            tick_s = time.perf_counter() - t0
            if engine.running < len(reqs):
                break  # a request ended: no longer every request's tick
            if best is None or tick_s < best["tick_s"]:
                best = {"tick_s": tick_s, "attention_s": spent["attention"],
                        "kv_bytes": spent["keys"] * engine.bytes_per_token}  # fmt: skip
    finally:
        for layer in layers:
            del layer.attend, layer.attend_rows
    if best is None:
        raise RuntimeError("a request ended within the first tick: no tick ran every request")
    return {"requests": len(reqs), "rows": engine.cache.active, **best}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, nargs="+", default=[8], help="request counts (one run each)")
    ap.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    ap.add_argument("--lyrics", type=int, nargs=2, default=[50, 400], metavar=("MIN", "MAX"))
    ap.add_argument("--seconds", type=float, nargs=2, default=[30.0, 210.0], metavar=("MIN", "MAX"))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--heads", type=int, default=0, help="0: dim / 64")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--budget-gib", type=float, default=0.0, help="the engine's cache budget (0: none)")
    ap.add_argument("--modes", nargs="+", default=["alone", "grouped", "engine"],
                    choices=["alone", "grouped", "engine", "graphs", "compiled"])  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the table here")
    ap.add_argument("--plot", help="write songs per hour against request count (PNG, matplotlib) here")
    ap.add_argument("--no-alone", action="store_true",
                    help="skip the one-at-a-time reference (64 long songs alone take minutes even on a GPU): "
                         "no speed-up or difference columns")  # fmt: skip
    args = ap.parse_args()
    if args.no_alone:
        args.modes = [m for m in args.modes if m != "alone"]
    elif "alone" not in args.modes:
        args.modes.insert(0, "alone")  # the reference of the comparison

    device = resolve_device(args.device)
    dtype = resolve_dtype(device, args.dtype)
    torch.manual_seed(args.seed)
    cfg = DR2Config(dim=args.dim, depth=args.depth, heads=args.heads or args.dim // 64, text_num_embeds=1000)
    with torch.device(device):
        model = DR2DiT(cfg).to(dtype).eval()
    settings = BlockSamplerSettings(steps=args.steps, cfg_strength=args.cfg)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"{name}, {str(dtype)[6:]}: DiT dim {cfg.dim} depth {cfg.depth} heads {cfg.heads} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M), block {cfg.block_size}, "
          f"{args.steps} steps, cfg {args.cfg}, lyrics {args.lyrics} tokens, {args.seconds} s, "
          f"arrivals: {f'Poisson {args.rate}/s' if args.rate else 'all at once'}", flush=True)  # fmt: skip
    warm = make_requests(
        argparse.Namespace(n=2, lyrics=[20, 30], seconds=[2, 4], rate=0), cfg.block_size, device, 99
    )
    for mode in (run_alone, run_grouped):
        mode(model, warm, settings, device, Memory(device), lambda _m: None)
    run_engine(model, warm, settings, device, Memory(device), lambda _m: None, None)

    memory = Memory(device)
    budget = int(args.budget_gib * 2**30) or None
    rows, failures = [], []
    for n in args.requests:
        args.n = n
        reqs = make_requests(args, cfg.block_size, device, args.seed + n)
        audio = sum(r["audio_s"] for r in reqs)
        print(f"\n{n} requests: lyrics {[r['text'].shape[0] for r in reqs]}, "
              f"seconds {[round(r['audio_s']) for r in reqs]}", flush=True)  # fmt: skip
        reference = None
        for mode in args.modes:
            memory.reset()
            extra = {}
            progress = lambda m: print("  " + m, flush=True)  # noqa: E731
            try:  # a mode that fails (a capture, a compile) is reported; the others still run
                if mode == "alone":
                    with CallCounter(model) as counter:
                        finish, latents = run_alone(model, reqs, settings, device, memory, progress)
                    reference = latents
                    extra = {"calls": counter.calls}
                elif mode == "grouped":
                    finish, latents = run_grouped(model, reqs, settings, device, memory, progress)
                elif mode == "compiled":
                    parts = compiled_parts(model, DR2.execution.compile_target)
                    compile_modules(parts)
                    try:
                        t0 = time.perf_counter()
                        run_engine(model, warm, settings, device, Memory(device), lambda _m: None, None)
                        warm_s = time.perf_counter() - t0
                        print(f"  compiled: compiling and warming up took {warm_s:.1f} s", flush=True)
                        finish, latents, extra = run_engine(model, reqs, settings, device, memory, progress,
                                                            budget)  # fmt: skip
                        extra["compile_warm_up_s"] = warm_s
                    finally:
                        uncompile_modules(parts)
                else:
                    finish, latents, extra = run_engine(model, reqs, settings, device, memory, progress,
                                                        budget, graphs=mode == "graphs")  # fmt: skip
            except Exception as exc:
                failures.append(f"{n} requests, {mode}: {type(exc).__name__}: {str(exc)[:500]}")
                print(f"  {mode} FAILED: {failures[-1]}", flush=True)
                continue
            diff = (
                max(
                    float((a.float() - b.float()).abs().max())
                    for a, b in zip(latents, reference, strict=True)
                )
                if reference is not None
                else None
            )
            start = min(r["arrival"] for r in reqs)
            makespan = max(finish) - start
            waits = [f - r["arrival"] for f, r in zip(finish, reqs, strict=True)]
            rows.append({
                "requests": n, "mode": mode, "songs_per_hour": n / makespan * 3600,
                "audio_s_per_s": audio / makespan, "p50_s": percentile(waits, 0.5),
                "p95_s": percentile(waits, 0.95), "makespan_s": makespan, "peak_mib": memory.peak / 2**20,
                "max_abs_diff": diff, **extra,
            })  # fmt: skip
    base = {r["requests"]: r["songs_per_hour"] for r in rows if r["mode"] == "alone"}
    header = (f"{'reqs':>4} | {'mode':>8} | {'songs/h':>8} | {'audio s/s':>9} | {'p50 s':>7} | {'p95 s':>7} | "
              f"{'peak MiB':>8} | {'vs alone':>8} | {'max |diff|':>10} | {'rows/tick':>9}")  # fmt: skip
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        r["vs_alone"] = r["songs_per_hour"] / base[r["requests"]] if base else None
        rpt = f"{r['rows_per_tick']:.1f}" if "rows_per_tick" in r else "-"
        vs = f"{r['vs_alone']:>7.2f}x" if r["vs_alone"] is not None else f"{'-':>8}"
        diff = f"{r['max_abs_diff']:>10.2e}" if r["max_abs_diff"] is not None else f"{'-':>10}"
        print(f"{r['requests']:>4} | {r['mode']:>8} | {r['songs_per_hour']:>8.1f} | {r['audio_s_per_s']:>9.2f} | "
              f"{r['p50_s']:>7.2f} | {r['p95_s']:>7.2f} | {r['peak_mib']:>8.0f} | {vs} | {diff} | {rpt:>9}")  # fmt: skip
    for failure in failures:
        print(f"FAILED: {failure}")
    ceilings = {}
    for n in (n for n in args.requests if n > 1):
        one, many = batching_ceiling(model, 2 * n, device)
        ceilings[n] = one / many
        print(f"ceiling, {n} requests: a DiT call costs {one * 1e3:.2f} ms per row for 2 rows, "
              f"{many * 1e3:.2f} ms for {2 * n}: batching gains at most {one / many:.2f}x here")  # fmt: skip
    ticks = {}
    for n in (n for n in args.requests if n > 1):
        args.n = n  # the run's requests again (same seed)
        tick = full_tick(model, make_requests(args, cfg.block_size, device, args.seed + n), settings, device)
        alone = next((r for r in rows if r["requests"] == n and r["mode"] == "alone"), None)
        if alone is not None:  # one call of one request alone, everything included, against a tick's share
            tick["alone_call_s"] = alone["makespan_s"] / alone["calls"]
        ticks[n] = tick
        per = tick["tick_s"] / n
        versus = (f" against {tick['alone_call_s'] * 1e3:.2f} ms a call alone: {tick['alone_call_s'] / per:.2f}x"
                  if alone is not None else "")  # fmt: skip
        print(f"full tick, {n} requests ({tick['rows']} rows): {tick['tick_s'] * 1e3:.1f} ms, {per * 1e3:.2f} ms "
              f"a request{versus}; attention {tick['attention_s'] * 1e3:.1f} ms of it, reading "
              f"{tick['kv_bytes'] / 2**20:.0f} MiB of keys and values "
              f"({tick['kv_bytes'] / max(tick['attention_s'], 1e-9) / 1e9:.1f} GB/s)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "n"},
                                               "device": name, "rows": rows, "ceiling": ceilings,
                                               "full_tick": ticks, "failures": failures}, indent=2))  # fmt: skip
        print(f"table written to {args.json}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for mode in args.modes:
            pts = [(r["requests"], r["songs_per_hour"]) for r in rows if r["mode"] == mode]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=mode)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("songs per hour")
        ax.set_title(
            f"DiffRhythm 2 sampling, {name}, {str(dtype)[6:]}, dim {cfg.dim} depth {cfg.depth}", fontsize=9
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
