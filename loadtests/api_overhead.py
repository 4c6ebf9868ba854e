"""API overhead and latencies of a running service (no load: one job at a time).

    MUSICGEN_MODEL=tiny scripts/serve.sh &      # or any running service
    .venv/bin/python loadtests/api_overhead.py --jobs 20 --base http://localhost:8000

Prints p50/p95 of submit and status calls and, per job, end-to-end time (submit to the status poll
that sees it finished) minus the model's own time (style + sampling + decoding) = the service's overhead.
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
    args = ap.parse_args()
    song = {"lyrics": "Hello world\nGood night moon", "style_prompt": "happy pop", "duration_s": args.duration,
            "steps": args.steps, "output_format": "mp3"}  # fmt: skip
    submit, status, e2e, model, overhead = [], [], [], [], []
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
                    break
                time.sleep(0.02)
            total = time.perf_counter() - t0
            t = body["timings"]
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


if __name__ == "__main__":
    main()
