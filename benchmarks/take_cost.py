"""CPU seconds a generator spends per take outside the model, for the longest song (285 s, stereo,
44.1 kHz): encoding the take, storing it, recording the job's result. Before (MP3 through libsndfile,
as the service did) and after (LAME through lameenc), the same audio, in one run.

    .venv/bin/python benchmarks/take_cost.py                 # mp3, 3 runs each, local-folder storage
    .venv/bin/python benchmarks/take_cost.py --format flac

It runs the worker's own code (JobRunner._store_takes, JobStore.complete) against the project's embedded
Redis and a local results folder; CPU time is the calling thread's (encoding runs on it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "diffrhythm-assets" / "examples" / "eg_cn.wav"


@dataclass
class FakeResult:
    audio: list[torch.Tensor]
    sample_rate: int
    seeds: list[int]


def libsndfile_write(path, audio, sample_rate, fmt):
    """The service's writer before lameenc: libsndfile for every format."""
    from musicgen.audio import OUTPUT_FORMATS

    container, subtype = OUTPUT_FORMATS[fmt]
    sf.write(str(path), audio.float().clamp(-1, 1).numpy().T, sample_rate, format=container, subtype=subtype)
    return Path(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    ap.add_argument("--seconds", type=float, default=285.0)
    ap.add_argument("--format", default="mp3", choices=["mp3", "flac", "wav"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import deployments.service.runner as runner_module
    from deployments.service.params import SongParams
    from deployments.service.redis_server import EmbeddedRedis
    from deployments.service.runner import JobRunner
    from deployments.service.storage import LocalStorage
    from deployments.service.store import JobStore
    from musicgen.audio import write_audio

    x, sr = sf.read(str(args.input), dtype="float32", always_2d=True)
    if x.shape[1] == 1:
        x = np.concatenate([x, np.roll(x, int(0.007 * sr), axis=0)], axis=1)
    n = int(args.seconds * sr)
    audio = torch.from_numpy(np.ascontiguousarray(np.tile(x, (n // len(x) + 1, 1))[:n].T))
    params = SongParams(model="tiny", duration_s=args.seconds, lrc="", tokens=[], song_duration=1.0, seed=0,
                        output_format=args.format, style_prompt="pop")  # fmt: skip
    writers = {"before (libsndfile)": libsndfile_write, "after (lameenc)": write_audio}
    rows: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as redis_server:
        store = JobStore.from_url(redis_server.url)
        runner = JobRunner.__new__(JobRunner)  # only the storing half of the worker
        runner.results, runner.store = LocalStorage(Path(tmp) / "results"), store
        for _ in range(args.repeat):
            for name, writer in writers.items():
                runner_module.write_audio = writer
                job, _ = store.create(params.to_dict())
                token = store.claim(job.id, "bench")
                lease = runner_module._Lease(store, job.id, token)  # not started: nothing renews it here
                t0 = time.thread_time()
                w0 = time.perf_counter()
                takes = runner._store_takes(lease, params, FakeResult([audio], sr, [0]))
                t1 = time.thread_time()
                store.complete(job.id, {"takes": takes, "timings": {}, "sample_rate": sr}, token=token)
                t2 = time.thread_time()
                row = rows.setdefault(name, {"encode+store": [], "record": [], "wall": [], "bytes": []})
                row["encode+store"].append(t1 - t0)
                row["record"].append(t2 - t1)
                row["wall"].append(time.perf_counter() - w0)
                row["bytes"].append(runner.results.size(takes[0]["key"]))
        runner_module.write_audio = write_audio

    med = {name: {k: statistics.median(v) for k, v in row.items()} for name, row in rows.items()}
    before, after = med["before (libsndfile)"], med["after (lameenc)"]
    print(
        f"{args.seconds:.0f} s stereo take as {args.format}, median of {args.repeat} runs (CPU seconds of the worker thread)\n"
    )
    print("| step | before (libsndfile) | after (lameenc) | ratio |")
    print("| --- | --- | --- | --- |")
    for key, label in (("encode+store", "encode + store (CPU s)"), ("record", "record the result (CPU s)")):
        ratio = before[key] / after[key] if after[key] else float("nan")
        print(f"| {label} | {before[key]:.3f} | {after[key]:.3f} | {ratio:.1f}x |")
    total_b, total_a = before["encode+store"] + before["record"], after["encode+store"] + after["record"]
    print(
        f"| **total CPU s per take** | **{total_b:.2f}** | **{total_a:.2f}** | **{total_b / total_a:.1f}x** |"
    )
    print(f"| wall s | {before['wall']:.2f} | {after['wall']:.2f} | |")
    print(f"| file size | {before['bytes'] / 1e6:.1f} MB | {after['bytes'] / 1e6:.1f} MB | |")


if __name__ == "__main__":
    main()
