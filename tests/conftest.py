"""Shared fixtures: paths to ../shared, an offline hub, and the tiny model built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import inflect  # noqa: F401  (see below)
import pytest

# inflect parses its own source with `ast` when first imported (typeguard's @typechecked). CPython 3.11
# before 3.11.9 can then raise "SystemError: AST constructor recursion depth mismatch" if the recursion
# limit changed earlier in the process (Hypothesis changes it while Schemathesis runs): importing it
# here, before any test, keeps a late first import out of the suite.

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MUSICGEN_SHARED_DIR", ROOT.parent / "shared"))
CONFORMANCE = SHARED / "conformance"
ASSETS = SHARED / "diffrhythm-assets"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow (real weights, long runs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.fail(f"{SHARED} is missing: the conformance tests read ../shared/conformance by path")
    return SHARED


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models-cache")


@pytest.fixture(scope="session", autouse=True)
def offline_hub(session_cache):
    """The whole session runs with the hub offline and an isolated cache (session-wide, so that
    module-scoped fixtures see it too). The data files that do not ship with the package (the negative
    style embedding) come from ../shared by path, as MUSICGEN_ASSETS_DIR, the local-source route."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MUSICGEN_CACHE_DIR", str(session_cache))
        mp.setenv("MUSICGEN_ASSETS_DIR", str(ASSETS))
        yield


@pytest.fixture(scope="session")
def tiny_model_paths(session_cache) -> dict[str, Path]:
    from musicgen.tiny import ensure_tiny_model

    return ensure_tiny_model(session_cache / "tiny")
