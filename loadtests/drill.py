"""A fault drill against a running service on this machine: Locust creators submit songs while the
drill kills generator replicas, restarts the ingress, kills Redis and fills the queue. Afterwards
every job the service accepted (202) is followed to its end, and the drill reports how many were
accepted, completed, failed (by error code), canceled, lost (their record is gone) or left unfinished.
Exit status 1 if any accepted job is lost or still queued/running when the drill gives up waiting.

    MUSICGEN_MODEL=tiny scripts/serve.sh &                       # the app, on loopback
    .venv/bin/python loadtests/drill.py                          # ~3 minutes of faults, then the check
    .venv/bin/python loadtests/drill.py --faults generator,ingress --users 4 --settle 600

Faults are real process deaths (SIGKILL), found by the process titles Ray gives replicas
(`ray::ServeReplica:<app>:<Deployment>`) and by the embedded Redis's command line: Serve replaces a
dead replica, the Redis replica notices its server died and restarts it from its append-only file.
With an external REDIS_URL, `--faults` should leave out `redis`. Writes drill.json (the outcome of
every accepted job) and the Locust report under --out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import TINY_SONG, loopback_only, wait_ready  # noqa: E402

FINAL = {"succeeded", "failed", "canceled"}
FAULTS = ("generator", "ingress", "redis", "fill")


def processes(pattern: str) -> list[int]:
    """PIDs of this machine's processes whose command line contains `pattern`."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pattern in cmdline and int(proc.name) != os.getpid():
            out.append(int(proc.name))
    return out


def kill(what: str, pattern: str, log) -> int:
    pids = processes(pattern)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, signal.SIGKILL)
    log(f"killed {what}: {len(pids)} process(es) {pids}")
    return len(pids)


def fill_queue(http, headers: dict, log) -> dict:
    """Submit until the service says QUEUE_FULL (or 200 tries); count the answers."""
    answers: collections.Counter = collections.Counter()
    accepted = []
    for _ in range(200):
        try:
            r = http.post("/v1/songs", json=TINY_SONG | {"duration_s": 10, "steps": 10}, headers=headers)
        except Exception as exc:  # noqa: BLE001 - a fault in progress: counted, not fatal
            answers[type(exc).__name__] += 1
            time.sleep(0.2)
            continue
        code = r.json().get("error", {}).get("code", "") if r.status_code != 202 else ""
        answers[f"{r.status_code} {code}".strip()] += 1
        if r.status_code == 202:
            accepted.append(r.json()["id"])
        if r.status_code == 429:
            assert r.headers.get("Retry-After", "").isdigit(), "429 without a Retry-After"
            break
    log(f"filled the queue: {dict(answers)}")
    return {"answers": dict(answers), "accepted": accepted}


def follow_up(http, headers: dict, ids: list[str], settle_s: float, log) -> dict[str, dict]:
    """Each accepted job's final view; jobs not final after settle_s are reported as they are."""
    outcome: dict[str, dict] = {}
    deadline = time.time() + settle_s
    pending = list(dict.fromkeys(ids))
    while pending:
        still = []
        for job_id in pending:
            try:
                r = http.get(f"/v1/songs/{job_id}", headers=headers)
            except Exception:  # noqa: BLE001 - the service may still be recovering
                still.append(job_id)
                continue
            if r.status_code == 404:
                outcome[job_id] = {"status": "lost"}
            elif r.status_code == 200 and r.json()["status"] in FINAL:
                outcome[job_id] = r.json()
            else:
                still.append(job_id)
        pending = still
        if pending and time.time() > deadline:
            for job_id in pending:
                try:
                    outcome[job_id] = http.get(f"/v1/songs/{job_id}", headers=headers).json()
                except Exception as exc:  # noqa: BLE001
                    outcome[job_id] = {"status": f"unreadable ({type(exc).__name__})"}
            break
        if pending:
            log(f"waiting for {len(pending)} job(s) to finish")
            time.sleep(5)
    return outcome


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--app", default="musicgen", help="the Serve application's name")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"in order, from {FAULTS}")
    ap.add_argument("--every", type=float, default=30, help="seconds between faults")
    ap.add_argument("--users", type=int, default=4, help="Locust creators submitting songs throughout")
    ap.add_argument("--settle", type=float, default=900, help="seconds to wait for accepted jobs to end")
    ap.add_argument("--api-key", default=os.environ.get("MUSICGEN_API_KEY"), help="when the API needs keys")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}; choose from {FAULTS}")
    loopback_only(args.host)
    wait_ready(args.host, 120)
    import httpx

    out = args.out or HERE / "results" / f"drill-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.1f} s] {message}", flush=True)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    job_log = out / "accepted.txt"
    job_log.write_text("")
    seconds = args.every * (len(faults) + 1)
    song = TINY_SONG | {"duration_s": 10, "steps": 30}
    env = {**os.environ, "MUSICGEN_LOAD_WEIGHTS": "1:0:0", "MUSICGEN_LOAD_JOBLOG": str(job_log),
           "MUSICGEN_LOAD_STAGES": json.dumps([[seconds, args.users, args.users]]),
           "MUSICGEN_LOAD_SONG": json.dumps(song)}  # fmt: skip
    if args.api_key:
        env["MUSICGEN_LOAD_API_KEY"] = args.api_key
    locust = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", args.host,
         "--csv", str(out / "locust"), "--html", str(out / "report.html"), "--only-summary",
         "--loglevel", "ERROR", "--stop-timeout", "30"],
        env=env, cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    log(f"{args.users} Locust creators submitting {song['duration_s']} s songs for {seconds:.0f} s")
    filled: dict = {"answers": {}, "accepted": []}
    replica = f"ray::ServeReplica:{args.app}:"
    with httpx.Client(base_url=args.host, timeout=30) as http:
        for fault in faults:
            time.sleep(args.every)
            if fault == "generator":
                kill("a generator replica", replica + "SongGenerator", log)
            elif fault == "ingress":
                kill("the ingress", replica + "Ingress", log)
            elif fault == "redis":
                kill("the embedded Redis", "redis-server", log)
            elif fault == "fill":
                filled = fill_queue(http, headers, log)
        time.sleep(args.every)
        log("faults over; waiting for Locust to stop")
        try:
            locust.wait(timeout=120)
        except subprocess.TimeoutExpired:
            locust.send_signal(signal.SIGINT)
            locust.wait(timeout=60)
        ids = [line for line in job_log.read_text().split() if line] + filled["accepted"]
        log(f"{len(ids)} accepted jobs; following each to its end (up to {args.settle:.0f} s)")
        outcome = follow_up(http, headers, ids, args.settle, log)

    counts: collections.Counter = collections.Counter()
    for view in outcome.values():
        status = view.get("status", "?")
        counts[f"failed {view['error']['code']}" if status == "failed" and view.get("error") else status] += 1
    lost = counts.get("lost", 0)
    unfinished = sum(n for s, n in counts.items() if s in ("queued", "running") or s.startswith("unreadable"))
    rows = [("accepted", len(outcome)), *sorted(counts.items())]
    table = "\n".join(["| jobs | count |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
    if filled["answers"]:
        table += "\n\nqueue fill answers: " + ", ".join(f"{k}: {v}" for k, v in filled["answers"].items())
    print("\n" + table)
    (out / "drill.json").write_text(json.dumps({"faults": faults, "counts": counts, "fill": filled["answers"],
                                                "jobs": outcome}, indent=1))  # fmt: skip
    (out / "summary.md").write_text(f"# drill: {', '.join(faults)}\n\n{table}\n")
    if lost or unfinished:
        print(f"FAILED: {lost} lost, {unfinished} unfinished", file=sys.stderr)
        return 1
    print("every accepted job ended (none lost, none stuck)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
