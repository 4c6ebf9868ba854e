"""Peak resident memory of one full-size DiT forward on the CPU, per song length.

    python benchmarks/memory.py                       # DiffRhythm 1.2 (dim 2048, depth 16), 2048 and 6144 frames
    python benchmarks/memory.py --frames 2048 --rows 1 2
    python benchmarks/memory.py --rows 2 --cpu-default   # as the CPU runs a song: packed, rows in parallel

Each measurement runs in a fresh process (peak RSS only grows): it builds the DiT with random fp32
weights, records the resident set after building, runs one `velocity` over `rows` rows (2 rows are a
request's conditional and null branch), and reports the peak resident set (`ru_maxrss`) and the
forward's wall time. The last column scales the activation part to a bf16 GPU run (weights at 2
bytes, activations at half the fp32 bytes): an estimate, until measured on a GPU. With --cpu-default
the model is in its CPU state at load (fused, oneDNN-packed weights) and the rows run as the CPU's
`auto` plan runs them (each its own forward, at the same time on worker threads), so two rows hold
two forwards' activations at once; the GPU estimate does not apply to that and is left out.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(frames: int, rows: int, model: str, cpu_default: bool) -> dict:
    import torch

    from musicgen.model.dit import DiT
    from musicgen.registry import DR1, MODELS
    from musicgen.runtime.plans import apply_execution, resolve_execution
    from musicgen.runtime.workers import velocity_by_row

    torch.set_grad_enabled(False)
    cfg = MODELS[model].dit
    torch.manual_seed(0)
    dit = DiT(cfg).eval()
    params = sum(p.numel() for p in dit.parameters())
    if cpu_default:
        apply_execution(dit, resolve_execution(DR1, torch.device("cpu"), torch.float32))
    after_build = rss_mib()
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, cfg.text_num_embeds, (rows, frames), generator=g)
    pre = dit.prepare(torch.zeros(rows, frames, cfg.mel_dim), dit.embed_text(text), torch.randn(rows, 512),
                      torch.zeros(rows), torch.full((rows,), frames / cfg.max_frames))  # fmt: skip
    t0 = time.perf_counter()
    x = torch.randn(rows, frames, cfg.mel_dim, generator=g)
    if cpu_default:
        velocity_by_row(dit, x, torch.tensor(0.5), pre, parallel=True)
    else:
        dit.velocity(x, torch.tensor(0.5), pre)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"frames": frames, "rows": rows, "params": params, "weights_mib": params * 4 / 2**20,
            "after_build_mib": after_build, "peak_mib": peak, "seconds": seconds}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="*", default=[2048, 6144])
    ap.add_argument("--rows", type=int, nargs="*", default=[1])
    ap.add_argument("--model", default="diffrhythm-1.2-base")
    ap.add_argument("--cpu-default", action="store_true", help="packed weights, rows in parallel (see above)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # "frames,rows": run one measurement, print JSON
    args = ap.parse_args()
    if args.one:
        frames, rows = map(int, args.one.split(","))
        print(json.dumps(measure(frames, rows, args.model, args.cpu_default)))
        return
    print(f"{'frames':>6} | {'rows':>4} | {'weights MiB':>11} | {'RSS built MiB':>13} | {'peak RSS MiB':>12} "
          f"| {'forward MiB':>11} | {'forward s':>9} | {'bf16 GPU est. MiB':>17}")  # fmt: skip
    print("-" * 110)
    for frames in args.frames:
        for rows in args.rows:
            cmd = [sys.executable, __file__, "--model", args.model, "--one", f"{frames},{rows}"]
            cmd += ["--cpu-default"] if args.cpu_default else []
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
            forward = out["peak_mib"] - out["after_build_mib"]
            gpu = f"{out['weights_mib'] / 2 + forward / 2:.0f}" if not args.cpu_default else "-"
            print(f"{frames:>6} | {rows:>4} | {out['weights_mib']:>11.0f} | {out['after_build_mib']:>13.0f} "
                  f"| {out['peak_mib']:>12.0f} | {forward:>11.0f} | {out['seconds']:>9.1f} | {gpu:>17}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
