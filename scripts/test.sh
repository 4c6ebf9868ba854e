#!/usr/bin/env bash
# Set up (if needed) and run lint and the test suite: fast unit and offline end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# iproute2: the offline-demo test brings up loopback in a network namespace of its own;
# chromium: Debian's browser, which the web UI's tests drive through Playwright by its path (Ubuntu's
# chromium package only installs a snap, which containers cannot run: there those tests are skipped)
extra=iproute2
if grep -qs '^ID=debian' /etc/os-release; then extra="$extra chromium"; fi
EXTRAS="${EXTRAS:-serve,test}" EXTRA_APT_PACKAGES="${EXTRA_APT_PACKAGES:-$extra}" scripts/setup.sh
.venv/bin/ruff check musicgen deployments tests benchmarks loadtests
.venv/bin/ruff format --check musicgen deployments tests benchmarks loadtests
.venv/bin/python -m mypy  # deployments/: see [tool.mypy] in pyproject.toml
.venv/bin/python -m pytest "$@"
