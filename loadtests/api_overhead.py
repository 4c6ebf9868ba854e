"""API overhead and latencies of a running service (no load: one job at a time).

    MUSICGEN_MODEL=tiny scripts/serve.sh &      # or any running service
    .venv/bin/python loadtests/api_overhead.py --jobs 20 --base http://localhost:8000
    .venv/bin/python loadtests/api_overhead.py --burst 12 --every 1   # jobs arriving while others run

Prints p50/p95 of submit and status calls and, per job, end-to-end time (submit to the status poll
that sees it finished) minus the model's own time (style + sampling + decoding) = the service's overhead,
and where that overhead goes (from the job's own timestamps and timings, same clock on one machine):
  queue     accepted -> claimed by a generator (dispatch hop, batch wait, claim)
  encoding  writing the takes (audio encoding + storage)
  worker    the rest of the claimed time (reading the job, progress writes, recording the result)
  observe   finished -> the client's poll that saw it (poll interval + status call)
  submit    the POST itself (validation via the validator deployment, Redis write)
"""

from __future__ import annotations

import argparse
import time

import httpx


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[int(p * (len(xs) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="http://localhost:8000")
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--format", default="mp3", choices=["mp3", "flac", "wav"])
    ap.add_argument("--burst", type=int, default=0,
                    help="instead: submit this many jobs back to back, then wait for all (throughput, batch sizes)")  # fmt: skip
    ap.add_argument("--every", type=float, default=0,
                    help="with --burst: one job every this many seconds instead of back to back (jobs that "
                         "arrive while a batch runs)")  # fmt: skip
    args = ap.parse_args()
    song = {"lyrics": "Hello world\nGood night moon", "style_prompt": "happy pop", "duration_s": args.duration,
            "steps": args.steps, "output_format": args.format}  # fmt: skip
    if args.burst:
        burst(args, song)
        return
    submit, status, e2e, model, overhead = [], [], [], [], []
    parts: dict[str, list[float]] = {"submit": [], "queue": [], "encoding": [], "worker": [], "observe": []}
    with httpx.Client(base_url=args.base, timeout=60) as http:
        for i in range(args.jobs):
            t0 = time.perf_counter()
            r = http.post("/v1/songs", json={**song, "seed": i})
            submit.append(time.perf_counter() - t0)
            r.raise_for_status()
            job_id = r.json()["id"]
            while True:
                t1 = time.perf_counter()
                body = http.get(f"/v1/songs/{job_id}").json()
                status.append(time.perf_counter() - t1)
                if body["status"] in ("succeeded", "failed", "canceled"):
                    seen = time.time()
                    break
                time.sleep(0.02)
            total = time.perf_counter() - t0
            t = body["timings"]
            if body["status"] == "succeeded":
                claimed = body["finished_at"] - body["started_at"]
                parts["submit"].append(submit[-1])
                parts["queue"].append(body["started_at"] - body["created_at"])
                parts["encoding"].append(t.get("encoding_s", 0.0))
                parts["worker"].append(claimed - t.get("total_s", 0.0) - t.get("encoding_s", 0.0))
                parts["observe"].append(seen - body["finished_at"])
            e2e.append(total)
            model.append(t.get("total_s", 0.0))
            overhead.append(total - t.get("total_s", 0.0))
            print(
                f"job {i + 1}/{args.jobs}: {body['status']} in {total:.2f} s (model {t.get('total_s', 0):.2f} s)",
                flush=True,
            )
    print()
    print(f"{'measure':>28} | {'p50 ms':>8} | {'p95 ms':>8}")
    print("-" * 50)
    for name, xs in (("POST /v1/songs", submit), ("GET /v1/songs/{id}", status), ("end to end", e2e),
                     ("model (style+sample+decode)", model), ("overhead (e2e - model)", overhead)):  # fmt: skip
        print(f"{name:>28} | {1000 * pct(xs, 0.5):>8.1f} | {1000 * pct(xs, 0.95):>8.1f}")
    print("\nwhere the overhead goes (succeeded jobs):")
    for name, xs in parts.items():
        if xs:
            print(f"{'  ' + name:>28} | {1000 * pct(xs, 0.5):>8.1f} | {1000 * pct(xs, 0.95):>8.1f}")


def burst(args, song: dict) -> None:
    """Back-to-back (or --every S apart) submissions while the generators are busy: submit latency under
    load, throughput and the batches the jobs ran in."""
    from collections import Counter

    submit, ids = [], []
    with httpx.Client(base_url=args.base, timeout=60) as http:
        t0 = time.perf_counter()
        for i in range(args.burst):
            t = time.perf_counter()
            r = http.post("/v1/songs", json={**song, "seed": i})
            submit.append(time.perf_counter() - t)
            r.raise_for_status()
            ids.append(r.json()["id"])
            if args.every and i + 1 < args.burst:
                time.sleep(max(0.0, t + args.every - time.perf_counter()))
        done: dict[str, dict] = {}
        while len(done) < len(ids):
            for job_id in ids:
                if job_id not in done:
                    body = http.get(f"/v1/songs/{job_id}").json()
                    if body["status"] in ("succeeded", "failed", "canceled"):
                        done[job_id] = body
            print(f"\r{len(done)}/{len(ids)} finished", end="", flush=True)
            time.sleep(0.1)
        wall = time.perf_counter() - t0
    states = Counter(b["status"] for b in done.values())
    batches = Counter(b.get("batch", {}).get("requests", 0) for b in done.values())
    print(f"\n{args.burst} jobs: {dict(states)} in {wall:.1f} s = {args.burst / wall:.2f} jobs/s")
    print(
        f"POST /v1/songs under load: p50 {1000 * pct(submit, 0.5):.1f} ms, p95 {1000 * pct(submit, 0.95):.1f} ms"
    )
    print("jobs by size of the batch they ran in:", dict(sorted(batches.items())))


if __name__ == "__main__":
    main()
