#!/usr/bin/env bash
# Set up (if needed) and run lint and the test suite: fast unit and offline end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-serve,test}" scripts/setup.sh
.venv/bin/ruff check musicgen deployments tests benchmarks loadtests
.venv/bin/ruff format --check musicgen deployments tests benchmarks loadtests
.venv/bin/python -m pytest "$@"
