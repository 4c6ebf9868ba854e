"""Walks the service's API from outside, as a client would: what cluster/docker/check-image.sh runs
against the container's published port (and against the local cluster with the image as a node).

Standard library only, on purpose: it runs with any Python 3.8+ of the host, where the image is
checked and the project's virtual environment need not exist.

    python3 cluster/docker/walk.py --url http://127.0.0.1:18000 --key mgk_... \
        [--restart-redis "podman restart musicgen-check-redis"] [--healthcheck "podman healthcheck run X"]

Exits non-zero at the first failed step, saying which and why; prints a table of the steps at the end.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

FINISHED = {"succeeded", "failed", "canceled"}
METRIC = "musicgen_queue_depth"  # deployments/service/metrics.py
LYRICS = "[00:00.00]Walking through the image\n[00:04.00]every step in place"


class Failed(Exception):
    pass


class Walk:
    def __init__(self, url: str, key: str, timeout: float):
        self.url, self.key, self.timeout = url.rstrip("/"), key, timeout
        self.rows: list[tuple[str, str, float]] = []

    # -- HTTP ------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None, *, auth: bool = True, timeout=30):
        """(status, headers, body bytes); HTTP errors are answers too, not exceptions."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.headers, r.read()  # headers: case-insensitive
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def json(self, method: str, path: str, body: dict | None = None, *, expect: int = 200) -> dict:
        status, _, raw = self.request(method, path, body)
        if status != expect:
            raise Failed(f"{method} {path}: {status} (expected {expect}): {raw[:300]!r}")
        return json.loads(raw)

    # -- steps -----------------------------------------------------------------------------------
    def step(self, name: str, fn, *args):
        t0 = time.monotonic()
        print(f"-- {name} ...", flush=True)
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - every failure ends the walk with its reason
            self.rows.append((name, f"FAIL: {e}", time.monotonic() - t0))
            raise Failed(f"{name}: {e}") from e
        detail = result if isinstance(result, str) else "ok"
        self.rows.append((name, detail, time.monotonic() - t0))
        print(f"   {detail} ({time.monotonic() - t0:.1f} s)", flush=True)
        return result

    def wait_ready(self) -> str:
        deadline, last = time.monotonic() + self.timeout, "no answer"
        while time.monotonic() < deadline:
            try:
                status, _, raw = self.request("GET", "/readyz", auth=False, timeout=5)
                last = f"{status} {raw[:200].decode(errors='replace')}"
                if status == 200 and json.loads(raw).get("ready"):
                    return "ready: " + json.loads(raw).get("reason", "")
            except OSError as e:  # not listening yet, or reset while the proxy starts
                last = str(e)
            time.sleep(2)
        raise Failed(f"/readyz not ready after {self.timeout:.0f} s: {last}")

    def unauthorized(self) -> str:
        status, _, raw = self.request("GET", "/v1/songs", auth=False)
        if status != 401:
            raise Failed(f"GET /v1/songs without a key: {status}, not 401: {raw[:200]!r}")
        status, _, _ = self.request("POST", "/v1/songs", {"lyrics": LYRICS}, auth=False)
        if status != 401:
            raise Failed(f"POST /v1/songs without a key: {status}, not 401")
        return "401 without a key"

    def submit(self, seed: int) -> str:
        models = self.json("GET", "/v1/models")
        body = {"lyrics": LYRICS, "style_prompt": "calm piano", "seed": seed, "output_format": "mp3"}
        job = self.json("POST", "/v1/songs", body, expect=202)
        self.job_id = job["id"]
        return f"job {job['id']} {job['status']} (model {job['parameters'].get('model')}; served: {_names(models)})"

    def follow(self) -> str:
        """The job's event stream (SSE) until its final event."""
        req = urllib.request.Request(f"{self.url}/v1/songs/{self.job_id}/events")
        req.add_header("Authorization", f"Bearer {self.key}")
        req.add_header("Accept", "text/event-stream")
        seen: list[str] = []
        last: dict = {}
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            if "text/event-stream" not in r.headers.get("Content-Type", ""):
                raise Failed(f"events: Content-Type {r.headers.get('Content-Type')}")
            event, data = None, []
            deadline = time.monotonic() + self.timeout  # keep-alive comments every 15 s: reads never time out
            for raw in r:
                if time.monotonic() > deadline:
                    raise Failed(f"no final event within {self.timeout:.0f} s (events: {' > '.join(seen)})")
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and event:
                    body = json.loads("\n".join(data)) if data else {}
                    last = {**last, **body}
                    if not seen or seen[-1] != event:
                        seen.append(event)
                    if event in FINISHED:
                        break
                    event, data = None, []
        status = last.get("status")
        if status != "succeeded":
            raise Failed(f"the job ended {status}: {last.get('error')} (events: {' > '.join(seen)})")
        self.view = last
        return "events: " + " > ".join(seen)

    def download(self) -> str:
        takes = self.view.get("takes") or []
        if not takes:
            raise Failed(f"a succeeded job without takes: {self.view}")
        path = urllib.parse.urlsplit(takes[0]["audio_url"]).path  # the view names the proxy's address
        status, headers, audio = self.request("GET", path, timeout=60)
        if status != 200:
            raise Failed(f"GET {path}: {status} {audio[:200]!r}")
        kind = headers.get("Content-Type", "")
        # MP3: an ID3 tag or an MPEG audio frame sync (11 set bits)
        mp3 = audio[:3] == b"ID3" or (len(audio) > 1 and audio[0] == 0xFF and audio[1] & 0xE0 == 0xE0)
        if kind != "audio/mpeg" or not mp3 or len(audio) < 1000:
            raise Failed(f"not an MP3: {kind}, {len(audio)} bytes, starts {audio[:8]!r}")
        return f"{len(audio)} bytes of {kind} ({takes[0]['duration_s']:.1f} s)"

    def metrics(self) -> str:
        status, headers, raw = self.request("GET", "/metrics")
        text = raw.decode(errors="replace")
        if status != 200 or METRIC not in text:
            raise Failed(f"/metrics: {status}, {METRIC} {'present' if METRIC in text else 'missing'}")
        lines = [ln for ln in text.splitlines() if ln.startswith("musicgen_")]
        return f"{len(lines)} musicgen_* samples, e.g. {lines[0] if lines else ''}"

    def restart_redis(self, command: str) -> str:
        job_id = self.job_id
        subprocess.run(shlex.split(command), check=True, stdout=subprocess.DEVNULL)
        self.wait_ready()
        deadline = time.monotonic() + 60
        while True:  # the ingress reconnects to the store: 503 until it has
            status, _, raw = self.request("GET", f"/v1/songs/{job_id}")
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        if status != 200 or json.loads(raw)["status"] != "succeeded":
            raise Failed(f"after the restart GET /v1/songs/{job_id}: {status} {raw[:200]!r}")
        return f"job {job_id} still succeeded after `{command}` (append-only file)"

    def healthcheck(self, command: str) -> str:
        done = subprocess.run(command, shell=True, capture_output=True, text=True)
        if done.returncode != 0:
            raise Failed(f"`{command}` exited {done.returncode}: {done.stdout}{done.stderr}")
        return f"`{command}`: {(done.stdout.strip() or 'healthy')}"

    def table(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        print(f"\n{'step':<{width}}  {'seconds':>7}  result")
        for name, result, seconds in self.rows:
            print(f"{name:<{width}}  {seconds:7.1f}  {result}")


def _names(models) -> str:
    items = models.get("data", models.get("models", [])) if isinstance(models, dict) else models
    return ", ".join(m.get("id") or m.get("name") or "?" for m in items) if items else "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True, help="an admin API key (MUSICGEN_API_KEYS)")
    ap.add_argument("--timeout", type=float, default=900, help="for /readyz and each song")
    ap.add_argument("--restart-redis", help="a command that restarts the job store's Redis")
    ap.add_argument("--healthcheck", help="a command that runs the container's health check")
    ap.add_argument("--job-id-file", help="write the first job's id here (for checks made elsewhere)")
    args = ap.parse_args(argv)
    walk = Walk(args.url, args.key, args.timeout)
    try:
        walk.step("readyz", walk.wait_ready)
        walk.step("no key: 401", walk.unauthorized)
        walk.step("submit", walk.submit, 1)
        walk.step("events (SSE)", walk.follow)
        walk.step("download MP3", walk.download)
        if args.job_id_file:
            with open(args.job_id_file, "w") as f:
                f.write(walk.job_id)
        walk.step("metrics", walk.metrics)
        if args.restart_redis:
            walk.step("redis restart: job kept", walk.restart_redis, args.restart_redis)
            walk.step("submit after restart", walk.submit, 2)
            walk.step("events after restart", walk.follow)
            walk.step("download after restart", walk.download)
        if args.healthcheck:
            walk.step("healthcheck", walk.healthcheck, args.healthcheck)
    except Failed as e:
        walk.table()
        print(f"\nwalk FAILED: {e}", file=sys.stderr)
        return 1
    walk.table()
    print("\nwalk passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
