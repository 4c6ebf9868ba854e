#!/usr/bin/env bash
# Set up (if needed) and start the service on http://localhost:8000 (Ctrl-C stops it and its Redis).
#   scripts/serve.sh                    DiffRhythm-1.2 base (downloads ~4 GB the first time)
#   MUSICGEN_MODEL=tiny scripts/serve.sh  the untrained tiny model: offline, noise-like output
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=serve,test scripts/setup.sh
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"  # a local, loopback-only Ray; set token auth on clusters
exec .venv/bin/serve run serve_config.yaml "$@"
