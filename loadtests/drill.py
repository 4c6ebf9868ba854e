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

`--cluster` runs the drill against a multi-node cluster that it starts on this machine
(deployments/serve/local_cluster.py: a head and a second API node, two generator nodes, Redis by URL,
results in an S3 bucket), with creators on both API nodes and cluster faults: a generator node or
the second API node (its ingress and proxy) killed hard and started again `--down` seconds later,
the head's GCS killed and restarted on the same Redis, a generator or ingress replica killed:

    .venv/bin/python loadtests/drill.py --cluster            # ~4 minutes, then the check
    .venv/bin/python loadtests/drill.py --cluster --faults gpu-node,gcs --every 20

The table counts jobs by the fault window they were accepted in (from one fault to the next).
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
CLUSTER_FAULTS = ("gpu-node", "api-node", "gcs", "generator", "ingress")


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


def start_locust(host: str, key: str | None, users: int, seconds: float, song: dict, out: Path, tag: str):
    """Locust creators submitting `song` against `host` for `seconds`; accepted ids go to a job log."""
    job_log = out / f"accepted-{tag}.txt"
    job_log.write_text("")
    env = {**os.environ, "MUSICGEN_LOAD_WEIGHTS": "1:0:0", "MUSICGEN_LOAD_JOBLOG": str(job_log),
           "MUSICGEN_LOAD_STAGES": json.dumps([[seconds, users, users]]),
           "MUSICGEN_LOAD_SONG": json.dumps(song)}  # fmt: skip
    if key:
        env["MUSICGEN_LOAD_API_KEY"] = key
    process = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", host,
         "--csv", str(out / f"locust-{tag}"), "--html", str(out / f"report-{tag}.html"), "--only-summary",
         "--loglevel", "ERROR", "--stop-timeout", "30"],
        env=env, cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, job_log


def stop_locust(process) -> None:
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def tabulate(outcome: dict[str, dict], windows: list[tuple[str, float]]) -> tuple[str, int, int]:
    """The table of outcomes per fault window (a job belongs to the window it was accepted in), with
    (lost, stuck) over all jobs."""
    columns = ("accepted", "succeeded", "failed", "canceled", "lost", "stuck", "retried")
    rows: dict[str, collections.Counter] = {name: collections.Counter() for name, _ in windows}
    failures: collections.Counter = collections.Counter()
    for view in outcome.values():
        created = view.get("created_at") or 0
        name = windows[0][0]
        for w, since in windows:
            if created >= since:
                name = w
        status = view.get("status", "?")
        row = rows[name]
        row["accepted"] += 1
        if status in ("succeeded", "failed", "canceled", "lost"):
            row[status] += 1
        else:  # queued, running, unreadable: not ended when the drill gave up
            row["stuck"] += 1
        if (view.get("attempts") or 0) > 1:
            row["retried"] += 1
        if status == "failed" and view.get("error"):
            failures[view["error"]["code"]] += 1
    total = sum(rows.values(), collections.Counter())
    lines = ["| accepted after | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for name, counts in [*rows.items(), ("all", total)]:
        lines.append(f"| {name} | " + " | ".join(str(counts[c]) for c in columns) + " |")
    table = "\n".join(lines)
    if failures:
        table += "\n\nfailed by error code: " + ", ".join(f"{k}: {v}" for k, v in sorted(failures.items()))
    return table, total["lost"], total["stuck"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--app", default="musicgen", help="the Serve application's name")
    ap.add_argument("--cluster", action="store_true", help="start a multi-node cluster here and drill it")
    ap.add_argument("--faults", help=f"in order, from {FAULTS} (with --cluster: {CLUSTER_FAULTS})")
    ap.add_argument("--every", type=float, default=30, help="seconds between faults")
    ap.add_argument("--down", type=float, default=10, help="--cluster: seconds a killed node stays down")
    ap.add_argument("--users", type=int, default=4, help="Locust creators submitting songs throughout")
    ap.add_argument("--settle", type=float, default=900, help="seconds to wait for accepted jobs to end")
    ap.add_argument("--api-key", default=os.environ.get("MUSICGEN_API_KEY"), help="when the API needs keys")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    known = CLUSTER_FAULTS if args.cluster else FAULTS
    faults = [f for f in (args.faults or ",".join(known)).split(",") if f]
    unknown = set(faults) - set(known)
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}; choose from {known}")
    out = args.out or HERE / "results" / f"drill-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.1f} s] {message}", flush=True)

    cluster = None
    hosts = {"api": args.host}
    if args.cluster:
        sys.path.insert(0, str(HERE.parent))
        from deployments.serve.local_cluster import LocalCluster

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cluster = LocalCluster(out / "cluster", api_nodes=2, generator_nodes=2, log=log,
                               app_args={"quotas": {"requests_per_minute": 100_000, "burst": 10_000}})  # fmt: skip
        cluster.start()
        args.api_key = cluster.api_key
        hosts = {"head": cluster.nodes["head"].url, "api-2": cluster.nodes["api-2"].url}
    try:
        return drill(args, faults, hosts, cluster, out, log)
    finally:
        if cluster is not None:
            cluster.stop()


def drill(args, faults: list[str], hosts: dict[str, str], cluster, out: Path, log) -> int:
    import httpx

    for host in hosts.values():
        loopback_only(host)
        wait_ready(host, 120)
    host = next(iter(hosts.values()))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    seconds = args.every * (len(faults) + 1)
    song = TINY_SONG | {"duration_s": 10, "steps": 30}
    users = max(1, args.users // len(hosts))
    locusts = [start_locust(url, args.api_key, users, seconds, song, out, tag) for tag, url in hosts.items()]
    log(f"{users * len(hosts)} Locust creators on {', '.join(hosts)} submitting {song['duration_s']} s "
        f"songs for {seconds:.0f} s")  # fmt: skip
    filled: dict = {"answers": {}, "accepted": []}
    replica = f"ray::ServeReplica:{args.app}:"
    windows = [("start", 0.0)]
    with httpx.Client(base_url=host, timeout=30) as http:
        for fault in faults:
            time.sleep(args.every)
            windows.append((fault, time.time()))
            if fault == "generator":
                kill("a generator replica", replica + "SongGenerator", log)
            elif fault == "ingress":
                kill("the ingress", replica + "Ingress", log)
            elif fault == "redis":
                kill("the embedded Redis", "redis-server", log)
            elif fault == "fill":
                filled = fill_queue(http, headers, log)
            elif fault == "gcs":
                cluster.restart_gcs(down_s=3)
            elif fault in ("gpu-node", "api-node"):
                name = "gpu-1" if fault == "gpu-node" else "api-2"
                if name not in cluster.nodes:  # killed before and replaced under another name
                    name = next(n for n, node in cluster.nodes.items()
                                if node.role == ("generator" if fault == "gpu-node" else "api"))  # fmt: skip
                port = cluster.nodes[name].port
                cluster.kill_node(name)
                time.sleep(args.down)
                if fault == "gpu-node":
                    cluster.add_generator_node(name)
                else:
                    cluster.add_api_node(name, port=port)  # the same port: its creators come back
        time.sleep(args.every)
        log("faults over; waiting for Locust to stop")
        for process, _ in locusts:
            stop_locust(process)
        ids = [line for _, job_log in locusts for line in job_log.read_text().split() if line]
        ids += filled["accepted"]
        log(f"{len(ids)} accepted jobs; following each to its end (up to {args.settle:.0f} s)")
        outcome = follow_up(http, headers, ids, args.settle, log)

    table, lost, stuck = tabulate(outcome, windows)
    if filled["answers"]:
        table += "\n\nqueue fill answers: " + ", ".join(f"{k}: {v}" for k, v in filled["answers"].items())
    print("\n" + table)
    (out / "drill.json").write_text(json.dumps({"faults": faults, "windows": windows, "fill": filled["answers"],
                                                "jobs": outcome}, indent=1))  # fmt: skip
    (out / "summary.md").write_text(f"# drill: {', '.join(faults)}\n\n{table}\n")
    if lost or stuck:
        print(f"FAILED: {lost} lost, {stuck} stuck", file=sys.stderr)
        return 1
    print("every accepted job ended (none lost, none stuck)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
