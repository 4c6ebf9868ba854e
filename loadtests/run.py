"""Load-test a running service with Locust and check latency objectives; exit 1 when one is missed.

    MUSICGEN_MODEL=tiny scripts/serve.sh &                     # or any running service
    .venv/bin/python loadtests/run.py --profile smoke          # < 1 minute
    .venv/bin/python loadtests/run.py --profile full           # 100 pollers + 500 open event streams
    .venv/bin/python loadtests/run.py --profile spike
    .venv/bin/python loadtests/run.py --profile streams        # steps of open streams: where it breaks

Writes, under --out (default loadtests/results/<profile>-<time>/): Locust's CSV files and HTML report,
`latency.png` (p50/p95 per endpoint over time), `summary.md` (the table printed at the end). Only
addresses on this machine are accepted (load tests never leave loopback). When the API needs keys,
export MUSICGEN_LOAD_API_KEY=<key> (sent by every Locust user and the probe). The users are in
loadtests/locustfile.py; each profile below sets their mix, the load shape and the objectives.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
TINY_SONG = {"lyrics": "Hello world\nGood night moon", "style_prompt": "happy pop", "output_format": "mp3"}


@dataclass(frozen=True)
class Objective:
    name: str  # "<type> <name>" as in Locust's stats, or "errors" / "jobs completed"
    stat: str  # a percentile column ("95%") or "count" / "failures"
    limit: float
    at_most: bool = True

    def describe(self) -> str:
        return f"{self.name} {self.stat} {'<=' if self.at_most else '>='} {self.limit:g}"


LATENCY = [
    Objective("GET GET /v1/songs/[id]", "95%", 50),
    Objective("GET GET /healthz", "95%", 50),
    Objective("POST POST /v1/songs", "95%", 100),
    Objective("SSE event delivery", "95%", 100),
    Objective("SSE first event", "95%", 500),
]
CORRECT = [Objective("errors", "failures", 0), Objective("JOB completed", "count", 1, at_most=False)]


@dataclass
class Profile:
    description: str
    song: dict
    weights: tuple[int, int, int]  # creators : watchers : pollers
    stages: list[list[float]]  # [seconds, users, spawn rate]
    objectives: list[Objective] = field(default_factory=lambda: LATENCY + CORRECT)


def users(creators: int, watchers: int, pollers: int) -> tuple[tuple[int, int, int], int]:
    return (creators, watchers, pollers), creators + watchers + pollers


def profiles() -> dict[str, Profile]:
    full_mix, full_n = users(4, 500, 100)
    spike_mix, spike_n = users(4, 300, 60)
    return {
        "smoke": Profile(
            "under a minute: 2 creators, 10 watchers, 5 pollers on short songs; checks the whole path",
            {**TINY_SONG, "duration_s": 10, "steps": 30}, (2, 10, 5), [[45, 17, 17]],
        ),
        "full": Profile(
            "100 users reading status once a second while 500 event streams follow running jobs",
            {**TINY_SONG, "duration_s": 95, "steps": 100}, full_mix, [[60, full_n, 20], [180, full_n, 20]],
        ),
        "spike": Profile(
            "steady load, a 3x spike for 30 s, back to steady",
            {**TINY_SONG, "duration_s": 95, "steps": 100}, spike_mix,
            [[60, spike_n, 20], [30, 3 * spike_n, 200], [90, spike_n, 100]],
        ),
    }  # fmt: skip


def loopback_only(host: str) -> None:
    name = urlparse(host).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except socket.gaierror:
        sys.exit(f"cannot resolve {name!r}")
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        sys.exit(f"{host}: load tests run against this machine only (a loopback address)")


def wait_ready(host: str, timeout_s: float) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            r = httpx.get(f"{host}/readyz", timeout=5)
            if r.status_code == 200:
                return
            why = r.text
        except httpx.HTTPError as exc:
            why = str(exc)
        if time.time() > deadline:
            sys.exit(f"{host} is not ready: {why}")
        time.sleep(1)


def run_locust(host: str, profile: Profile, out: Path, processes: int) -> int:
    env = {
        **os.environ,
        "MUSICGEN_LOAD_WEIGHTS": ":".join(map(str, profile.weights)),
        "MUSICGEN_LOAD_STAGES": json.dumps(profile.stages),
        "MUSICGEN_LOAD_SONG": json.dumps(profile.song),
    }
    seconds = sum(s[0] for s in profile.stages)
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", host,
           "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "report.html"),
           "--run-time", f"{int(seconds) + 10}s", "--stop-timeout", "10", "--only-summary",
           "--loglevel", "WARNING"]  # fmt: skip
    if processes > 1:
        cmd += ["--processes", str(processes)]
    print(f"locust: {profile.description}; {int(seconds)} s; stages {profile.stages}", flush=True)
    probe = Probe(host)
    probe.start()
    try:
        done = subprocess.run(cmd, env=env, cwd=HERE.parent, timeout=seconds + 180)
    finally:
        probe.done.set()
        probe.join()
    (out / "probe.json").write_text(json.dumps(probe.rows()))
    return done.returncode


class Probe(threading.Thread):
    """A second opinion on latency from outside Locust: one client in this (otherwise idle) process
    reads /healthz and the newest job's status four times a second over one keep-alive connection.
    Locust runs hundreds of users on one gevent loop, and a burst of events on many streams delays
    the greenlets that time other requests; the probe shows what the service itself answers."""

    NAMES = ("PROBE GET /healthz", "PROBE GET /v1/songs/[id]")

    def __init__(self, host: str, period_s: float = 0.25):
        super().__init__(daemon=True)
        self.host, self.period_s = host, period_s
        self.samples: dict[str, list[float]] = {name: [] for name in self.NAMES}
        self.failures = dict.fromkeys(self.NAMES, 0)
        self.done = threading.Event()

    def run(self) -> None:
        import httpx

        key = os.environ.get("MUSICGEN_LOAD_API_KEY")  # the key the Locust users send, if the API needs one
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(base_url=self.host, timeout=10, headers=headers) as http:
            job_id, i = None, 0
            while not self.done.wait(self.period_s):
                i += 1
                if job_id is None or i % 40 == 0:
                    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
                        job_id = http.get("/v1/songs", params={"limit": 1}).json()[0]["id"]
                name, path = (self.NAMES[0], "/healthz") if i % 2 or job_id is None else (
                    self.NAMES[1], f"/v1/songs/{job_id}")  # fmt: skip
                start = time.perf_counter()
                try:
                    ok = http.get(path).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.samples[name].append((time.perf_counter() - start) * 1000)
                else:
                    self.failures[name] += 1

    def rows(self) -> dict[str, dict[str, str]]:
        """Rows shaped like Locust's stats CSV, so that objectives and the summary can use them."""
        import numpy as np

        out = {}
        for name, values in self.samples.items():
            if not values:
                continue
            pct = {f"{q}%": f"{np.percentile(values, q):.0f}" for q in (50, 95, 99)}
            out[name] = {"Request Count": str(len(values)), "Failure Count": str(self.failures[name]),
                         "Max Response Time": f"{max(values):.1f}", **pct}  # fmt: skip
        return out


def read_stats(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "locust_stats.csv", newline="") as f:
        stats = {f"{row['Type']} {row['Name']}".strip(): row for row in csv.DictReader(f)}
    probe = out / "probe.json"
    if probe.exists():
        stats.update(json.loads(probe.read_text()))
    return stats


def check(
    stats: dict[str, dict[str, str]], objectives: list[Objective]
) -> list[tuple[Objective, float | None, bool]]:
    results = []
    for obj in objectives:
        if obj.name == "errors":
            value = float(
                sum(int(r["Failure Count"]) for k, r in stats.items() if not k.endswith("Aggregated"))
            )
        else:
            row = stats.get(obj.name)
            if row is None:
                results.append((obj, None, False))
                continue
            value = float(row["Request Count"] if obj.stat == "count" else row[obj.stat] or "nan")
        ok = value <= obj.limit if obj.at_most else value >= obj.limit
        results.append((obj, value, ok))
    return results


def summary(stats: dict[str, dict[str, str]], results) -> str:
    lines = [
        "| endpoint | requests | failures | p50 ms | p95 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in sorted(stats.items()):
        if name.endswith("Aggregated"):
            continue
        lines.append(f"| {name} | {row['Request Count']} | {row['Failure Count']} | {row['50%']} | {row['95%']} "
                     f"| {row['99%']} | {float(row['Max Response Time']):.0f} |")  # fmt: skip
    lines += ["", "| objective | measured | |", "| --- | --- | --- |"]
    for obj, value, ok in results:
        shown = "missing" if value is None else f"{value:g}"
        lines.append(f"| {obj.describe()} | {shown} | {'ok' if ok else '**MISSED**'} |")
    return "\n".join(lines)


def plot(out: Path) -> Path | None:
    """p50/p95 per endpoint over the run, from Locust's full stats history."""
    path = out / "locust_stats_history.csv"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float, float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated" or row["50%"] in ("N/A", ""):
                continue
            key = f"{row['Type']} {row['Name']}"
            series.setdefault(key, []).append(
                (float(row["Timestamp"]), float(row["50%"]), float(row["95%"]), float(row["User Count"]))
            )
    if not series:
        return None
    t0 = min(points[0][0] for points in series.values())
    fig, (ax, users_ax) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 1])
    for i, (name, points) in enumerate(sorted(series.items())):
        color = f"C{i % 10}"
        xs = [p[0] - t0 for p in points]
        ax.plot(xs, [p[2] for p in points], color=color, label=f"{name} p95")
        ax.plot(xs, [p[1] for p in points], color=color, linestyle=":", alpha=0.7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (p95 solid, p50 dotted)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    any_series = max(series.values(), key=len)
    users_ax.plot([p[0] - t0 for p in any_series], [p[3] for p in any_series], color="k")
    users_ax.set_ylabel("users")
    users_ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    return out / "latency.png"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--profile", default="smoke", choices=[*profiles(), "streams"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--processes", type=int, default=1, help="Locust worker processes (more users per core)")
    ap.add_argument("--ready-timeout", type=float, default=120)
    ap.add_argument(
        "--streams", default="500,1000,1500,2000,3000", help="watchers per step of --profile streams"
    )
    ap.add_argument(
        "--seconds", type=float, help="stretch or shrink the profile's stages to last this long in all"
    )
    ap.add_argument("--objective", action="append", default=[], metavar="NAME:STAT:LIMIT",
                    help="replace the profile's objectives, e.g. 'GET GET /healthz:95%%:50'")  # fmt: skip
    ap.add_argument(
        "--check-only", type=Path, metavar="DIR", help="check the results in DIR again; run nothing"
    )
    args = ap.parse_args(argv)
    profile = profiles().get(args.profile)
    if args.objective and profile is not None:
        profile.objectives = [parse_objective(o) for o in args.objective]
    if args.seconds is not None and profile is not None:
        if args.seconds <= 0:
            ap.error("--seconds must be positive")
        scale = args.seconds / sum(s[0] for s in profile.stages)
        profile.stages = [[seconds * scale, n, rate] for seconds, n, rate in profile.stages]
    if args.check_only:
        out = args.check_only
    else:
        loopback_only(args.host)
        wait_ready(args.host, args.ready_timeout)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = args.out or HERE / "results" / f"{args.profile}-{stamp}"
        out.mkdir(parents=True, exist_ok=True)
        if args.profile == "streams":
            return stream_steps(args, out)
        rc = run_locust(args.host, profile, out, args.processes)
        if not (out / "locust_stats.csv").exists():
            print(f"locust exited with {rc} and wrote no statistics", file=sys.stderr)
            return 2
    stats = read_stats(out)
    results = check(stats, profile.objectives)
    text = summary(stats, results)
    picture = plot(out)
    (out / "summary.md").write_text(f"# {args.profile}: {profile.description}\n\n{text}\n")
    print(text)
    print(f"\nreport: {out / 'report.html'}" + (f", plot: {picture}" if picture else ""))
    missed = [obj.describe() for obj, _, ok in results if not ok]
    if missed:
        print(f"MISSED: {'; '.join(missed)}", file=sys.stderr)
        return 1
    return 0


def parse_objective(text: str) -> Objective:
    name, stat, limit = text.rsplit(":", 2)
    at_most = not limit.startswith(">=")
    return Objective(name, stat, float(limit.lstrip(">=")), at_most=at_most)


def stream_steps(args, out: Path) -> int:
    """Steps of open event streams (100 pollers and 4 creators throughout), 60 s each after a 20 s
    ramp: the largest step that meets every latency objective is the answer."""
    rows, best = [], 0
    for watchers in [int(w) for w in args.streams.split(",")]:
        mix, n = users(4, watchers, 100)
        profile = Profile(f"{watchers} open streams", {**TINY_SONG, "duration_s": 95, "steps": 100}, mix,
                          [[20, n, max(20, n // 10)], [60, n, 50]])  # fmt: skip
        step_out = out / f"streams-{watchers}"
        step_out.mkdir()
        run_locust(args.host, profile, step_out, args.processes)
        stats = read_stats(step_out)
        results = check(stats, LATENCY + [CORRECT[0]])
        ok = all(r[2] for r in results)
        best = watchers if ok else best
        p95 = {o.name: v for o, v, _ in results}
        rows.append(f"| {watchers} | " + " | ".join(f"{p95.get(o.name, float('nan')):g}" for o in LATENCY)
                    + f" | {int(p95['errors'] or 0)} | {'ok' if ok else 'missed'} |")  # fmt: skip
        plot(step_out)
        if not ok:
            break
    header = "| open streams | " + " | ".join(o.describe() for o in LATENCY) + " | errors | |"
    text = "\n".join([header, "|" + " --- |" * (len(LATENCY) + 3), *rows])
    text += f"\n\nlargest step meeting every objective: {best} open streams"
    (out / "summary.md").write_text(f"# streams\n\n{text}\n")
    print(text)
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
