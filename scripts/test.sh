#!/usr/bin/env bash
# Set up (if needed) and run lint and the test suite: fast unit and offline end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# iproute2: the offline-demo test brings up loopback in a network namespace of its own
EXTRAS="${EXTRAS:-serve,test}" EXTRA_APT_PACKAGES="${EXTRA_APT_PACKAGES:-iproute2}" scripts/setup.sh
.venv/bin/ruff check musicgen deployments tests benchmarks loadtests
.venv/bin/ruff format --check musicgen deployments tests benchmarks loadtests
.venv/bin/python -m pytest "$@"
