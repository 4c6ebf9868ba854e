"""The README's offline demo, as a new user runs it: `MUSICGEN_MODEL=tiny scripts/serve.sh` in a network
namespace with nothing but loopback, a fresh model cache and no MUSICGEN_ASSETS_DIR (the tiny model
brings everything it needs); a song is submitted, generated and downloaded over HTTP, then Ctrl-C stops the service and its Redis."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def inside(workdir: str) -> None:
    """Runs inside the network namespace: start the service, use it, stop it."""
    import httpx

    with httpx.Client(timeout=5) as probe:  # no network but loopback: the outside is unreachable
        try:
            probe.get("https://pypi.org/simple/")
            raise SystemExit("the namespace has network access")
        except httpx.ConnectError:
            pass
    with open(Path(workdir) / "serve.log", "w") as log:
        proc = subprocess.Popen(["scripts/serve.sh"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        with httpx.Client(base_url="http://127.0.0.1:8000", timeout=30) as http:
            deadline = time.time() + 240
            while True:
                assert proc.poll() is None, "scripts/serve.sh exited"
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline, "the service did not become ready"
                time.sleep(1)
            song = {"lyrics": "Hello world\nGood night moon", "style_prompt": "happy pop", "duration_s": 10,
                    "steps": 2, "output_format": "mp3"}  # fmt: skip
            r = http.post("/v1/songs", json=song)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            while True:
                body = http.get(f"/v1/songs/{job_id}").json()
                if body.get("status") in ("succeeded", "failed", "canceled"):
                    break
                assert time.time() < deadline + 120, body
                time.sleep(0.5)
            assert body["status"] == "succeeded", body
            audio = http.get(f"/v1/songs/{job_id}/takes/1/audio")
            assert audio.status_code == 200 and audio.headers["content-type"] == "audio/mpeg"
            assert len(audio.content) > 10_000
            print("OFFLINE DEMO OK", body["parameters"]["lrc"].splitlines()[0], flush=True)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(480)
def test_tiny_demo_runs_with_no_network_and_no_assets_folder(tmp_path):
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2) for a network namespace")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("this user cannot create a network namespace")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSICGEN_", "HF_", "RAY_"))}
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env.update(
        MUSICGEN_MODEL="tiny",
        MUSICGEN_CACHE_DIR=str(tmp_path / "cache"),  # empty: the tiny model is built from nothing
        MUSICGEN_DATA_DIR=str(tmp_path / "data"),
        RAY_TMPDIR=ray_tmp,
        RAY_USAGE_STATS_ENABLED="0",
    )
    code = f"from tests.test_offline_demo import inside; inside({str(tmp_path)!r})"
    try:
        out = subprocess.run(
            ["unshare", "-n", "bash", "-c", f'ip link set lo up && exec "{sys.executable}" -c "$0"', code],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=450,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = (tmp_path / "serve.log").read_text() if (tmp_path / "serve.log").exists() else ""
    assert out.returncode == 0 and "OFFLINE DEMO OK" in out.stdout, (
        f"{out.stdout}\n{out.stderr}\n--- serve.log (last 60 lines) ---\n" + "\n".join(log.splitlines()[-60:])
    )
