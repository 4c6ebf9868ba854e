#!/usr/bin/env bash
# Set up (if needed) and start the service on http://localhost:8000 (Ctrl-C stops it and its Redis).
#   scripts/serve.sh                    DiffRhythm-1.2 base (downloads ~4 GB the first time)
#   MUSICGEN_MODEL=tiny scripts/serve.sh  the untrained tiny model: offline, noise-like output
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=serve,test scripts/setup.sh
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"  # a local, loopback-only Ray; set token auth on clusters
# Ray Serve's high-throughput ingress: HAProxy on port 8000 forwards HTTP straight to the ingress
# replicas' own servers, instead of through the Python proxy actor and a Ray call per request and per
# streamed event (~6x lower latency here; see loadtests/). Thousands of open event streams need file
# descriptors: the soft limit goes up to the hard one, and HAProxy (~2.5 descriptors a connection)
# gets as many connections as that allows, at most 20000.
export RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-1}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fds="$(ulimit -n)"
[ "$fds" = unlimited ] && fds=1048576
maxconn=$(( (fds - 100) * 2 / 5 ))
export RAY_SERVE_HAPROXY_MAXCONN="${RAY_SERVE_HAPROXY_MAXCONN:-$(( maxconn < 20000 ? maxconn : 20000 ))}"
exec .venv/bin/serve run serve_config.yaml "$@"
