"""The GPU measurements' script (benchmarks/dr2_engine_gpu.sh), run here on the CPU with a tiny DiT and
short songs. A lent GPU machine is rare and short, so the script has to work the first time it runs
there, on that machine's own Python, which has PyTorch, NumPy and matplotlib and none of the project's
other requirements. So each benchmark it starts runs on this interpreter without its site-packages,
with a folder in their place that holds only torch, numpy, matplotlib and what they require."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# and setuptools, which torch requires on Python 3.12 (a GPU machine's), not on 3.11: inductor imports it
ALLOWED_ROOTS = ("torch", "numpy", "matplotlib", "setuptools")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _required_closure(roots: tuple[str, ...]) -> set[str]:
    """The distributions `roots` need to run (their requirements without extras, transitively)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _site_with_only(dists: set[str], into: Path) -> Path:
    """A folder of links to this venv's modules (and their metadata and vendored libraries) that belong
    to `dists` and to nothing else."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    modules = {
        m for m, owners in metadata.packages_distributions().items() if any(_norm(d) in dists for d in owners)
    }
    into.mkdir()
    for entry in site.iterdir():
        name = entry.name
        if name.endswith((".dist-info", ".egg-info")):
            keep = _norm(name.split("-")[0]) in dists  # name-version.dist-info
        else:
            keep = name.split(".")[0] in modules
        if keep:
            (into / name).symlink_to(entry)
    return into


def test_the_gpu_script_runs_on_a_python_with_only_pytorch_numpy_and_matplotlib(tmp_path):
    allowed = _required_closure(ALLOWED_ROOTS)
    site = _site_with_only(allowed, tmp_path / "site")
    log, out = tmp_path / "runs.txt", tmp_path / "out"
    python = tmp_path / "python"  # what the script runs as $PYTHON: this interpreter without its site
    python.write_text(
        f'#!/bin/sh\necho "$1" >> "{log}"\nPYTHONPATH="{site}" exec "{sys.executable}" -S "$@"\n'
    )
    python.chmod(0o755)
    env = {
        **os.environ, "PYTHON": str(python), "OUT": str(out),
        "MODEL": "--device cpu --dtype fp32 --dim 64 --depth 2 --heads 2", "DECODER": "--decoder-channels 64",
        "SONG_S": "4", "MANY": "2", "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "dr2_engine_gpu.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [Path(line).name for line in log.read_text().split()] == [
        "dr2_serving.py",
        "dr2_serving.py",
        "dr2_throughput.py",
    ]
    assert not (site / "tqdm").exists() and (site / "torch").exists()  # the site holds only those

    # every part ran and wrote what the README's sizing rows are read from
    for name in ("dr2-single.json", "dr2-single.txt", "dr2-many.json", "dr2-many.txt", "dr2-many.png",
                 "dr2-graphs-fp32.txt"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    single = json.loads((out / "dr2-single.json").read_text())
    many = json.loads((out / "dr2-many.json").read_text())
    assert single["failures"] == [] and many["failures"] == [], (single["failures"], many["failures"])
    assert [r["mode"] for r in single["rows"]] == ["alone", "engine", "graphs"]
    assert all(r["max_abs_diff"] < 1e-5 for r in single["rows"]), single["rows"]
    assert [(r["requests"], r["mode"]) for r in many["rows"]] == [
        (2, m) for m in ("engine", "compiled", "graphs")
    ]
    assert all(r["songs_per_hour"] > 0 and r["p95_s"] > 0 and r["peak_mib"] > 0 for r in many["rows"])
    (tick,) = many["full_tick"].values()  # the tick of every request, its attention and what it read
    assert tick["requests"] == 2 and tick["rows"] == 4 and 0 < tick["attention_s"] < tick["tick_s"]
    assert tick["kv_bytes"] > 0 and "alone_call_s" not in tick  # --no-alone: nothing to compare with
    fp32 = (out / "dr2-graphs-fp32.txt").read_text()
    assert all(re.search(rf"\|\s+{m}\s+\|", fp32) for m in ("eager", "buffered", "graphs")), fp32
