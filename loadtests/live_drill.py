"""Live audio across a multi-node cluster, with the ingress node serving the stream killed mid-song.

Starts the local multi-node cluster (deployments/serve/local_cluster.py) serving the tiny DiffRhythm 2:
a head and a second API node (each with its proxy and an ingress replica), one generator node, Redis
by URL, results in an S3 bucket. For each round it submits a song, follows take 1's live stream
(GET /v1/songs/{id}/takes/1/live) through the second API node, kills that node hard (SIGKILL to all
its processes) once some of the audio has come, reconnects through the head with `?offset=<bytes
received>`, reads to the end, starts the killed node again, and checks that the bytes heard equal the
take's stored MP3: nothing lost, nothing twice. The song is generated on the generator node, so the
audio crosses nodes through the job store. Prints a table per round; exit status 1 on any mismatch.

    .venv/bin/python loadtests/live_drill.py                      # 3 rounds, ~3 minutes
    .venv/bin/python loadtests/live_drill.py --rounds 1 --duration 60 --steps 32 --json live.json

Not a test (it starts a whole cluster): a drill to run and report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SONG = {"model": "tiny-2", "lyrics": "[verse]\nHello world\n[chorus]\nGood night moon", "style_prompt": "folk",
        "num_takes": 1, "output_format": "wav"}  # fmt: skip


def _stream(url: str, headers: dict, offset: int, out: bytearray, stop_after: int | None, first: list) -> str:
    """Reads a live take into `out` from `offset`; returns how the read ended."""
    try:
        with httpx.stream("GET", url, params={"offset": offset}, headers=headers, timeout=120) as r:
            if r.status_code not in (200, 206):
                return f"HTTP {r.status_code}"
            for chunk in r.iter_raw():
                if not first:
                    first.append(time.time())
                out += chunk
                if stop_after is not None and len(out) >= stop_after:
                    return "enough"
        return "ended"
    except httpx.HTTPError as exc:
        return f"broken ({type(exc).__name__})"


def one_round(cluster, n: int, args, log) -> dict:
    head, api = cluster.head, cluster.nodes["api-2"]
    headers = cluster.headers
    cluster.wait_ready(180, node=api)  # its proxy (started again after the last round) answers
    with httpx.Client(base_url=head.url, headers=headers, timeout=30) as http:
        job = http.post("/v1/songs", json={**SONG, "duration_s": args.duration, "steps": args.steps,
                                           "seed": 100 + n}).json()  # fmt: skip
        job_id = job["id"]
        heard = bytearray()
        first: list[float] = []
        broken: list[str] = []
        killed_at: list[float] = []

        def listen():
            broken.append(
                _stream(f"{api.url}/v1/songs/{job_id}/takes/1/live", headers, 0, heard, None, first)
            )

        reader = threading.Thread(target=listen, daemon=True)
        reader.start()
        deadline = time.time() + 120
        while len(heard) < args.kill_after_bytes and reader.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        status_at_kill = http.get(f"/v1/songs/{job_id}").json()["status"]
        before = len(heard)
        cluster.kill_node("api-2")
        killed_at.append(time.time())
        reader.join(30)
        at_break = len(heard)
        resumed = _stream(f"{head.url}/v1/songs/{job_id}/takes/1/live", headers, at_break, heard, None, [])
        deadline = time.time() + 120
        while (body := http.get(f"/v1/songs/{job_id}").json())["status"] not in (
            "succeeded",
            "failed",
            "canceled",
        ):
            assert time.time() < deadline, body
            time.sleep(0.2)
        stored = http.get(f"/v1/songs/{job_id}/takes/1/audio", params={"format": "mp3"}).content
        from deployments.service.store import JobStore

        record = JobStore.from_url(cluster.redis_url).get(job_id)
        pid = int(record.worker.rsplit(":", 1)[1]) if record and record.worker else -1
        generator_node = next((name for name in cluster.nodes if pid in cluster.node_pids(name)), "?")
    cluster.add_api_node("api-2", port=api.port)  # back for the next round
    cluster.wait_ready(180)
    started = body.get("started_at") or 0
    row = {
        "round": n, "job": job_id, "status": body["status"], "generator_node": generator_node,
        "stream_node": "api-2 (killed)", "resumed_on": "head",
        "first_audio_s": round(first[0] - started, 2) if first and started else None,
        "song_status_at_kill": status_at_kill, "bytes_before_kill": before, "bytes_at_break": at_break,
        "first_read": broken[0] if broken else "?", "resumed_read": resumed,
        "bytes_heard": len(heard), "bytes_stored": len(stored), "equal": bytes(heard) == stored,
    }  # fmt: skip
    log(json.dumps(row))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=60, help="seconds of each song")
    ap.add_argument("--steps", type=int, default=48, help="sampling steps (more: the song is written slower)")
    ap.add_argument(
        "--kill-after-bytes", type=int, default=150_000, help="kill the stream's node after this much"
    )
    ap.add_argument("--root", default=None, help="the cluster's folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from deployments.serve.local_cluster import LocalCluster

    def log(line: str) -> None:
        print(line, flush=True)

    root = Path(args.root or tempfile.mkdtemp(prefix="musicgen-live-drill-"))
    rows = []
    with LocalCluster(root, api_nodes=2, generator_nodes=1, model="tiny-2", log=log,
                      app_args={"quotas": {"requests_per_minute": 100_000, "burst": 10_000}}) as cluster:  # fmt: skip
        for n in range(1, args.rounds + 1):
            log(f"round {n}/{args.rounds}")
            rows.append(one_round(cluster, n, args, log))
    cols = ["round", "generator_node", "song_status_at_kill", "first_audio_s", "bytes_before_kill", "bytes_at_break",
            "first_read", "resumed_read", "bytes_heard", "bytes_stored", "equal"]  # fmt: skip
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("\n" + "  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    ok = all(r["equal"] and r["status"] == "succeeded" for r in rows)
    print("\nevery round heard the stored take byte for byte" if ok else "\nMISMATCH: see the rows above")
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
