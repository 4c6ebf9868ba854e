#!/usr/bin/env bash
# Set up (if needed) and run lint and the test suite: fast unit and offline end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check musicgen tests benchmarks
.venv/bin/ruff format --check musicgen tests benchmarks
.venv/bin/python -m pytest "$@"
