#!/usr/bin/env bash
# A multi-node Ray cluster on this machine running the service (the tiny model by default): a head and
# an API node, two generator nodes (GPU-node stand-ins), Redis by URL, results in a local S3 bucket.
# Prints each node's URL and an admin API key; Ctrl-C stops it. Options: --help
# (deployments/serve/local_cluster.py).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=serve,test scripts/setup.sh
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"  # loopback only; a real cluster sets token auth
exec .venv/bin/python -m deployments.serve.local_cluster "$@"
