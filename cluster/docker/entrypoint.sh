#!/bin/sh
# The container's service: a one-node Ray cluster with its metrics on a fixed port, then serve_config.yaml
# with the HTTP proxy on every interface (so, with auth: auto, API keys are required: create one with
# `docker compose exec musicgen musicgen keys create NAME`, or give MUSICGEN_API_KEYS).
# `musicgen-entrypoint CMD...` runs CMD instead (e.g. `musicgen models pull diffrhythm-1.2-base`).
set -eu
if [ "$#" -gt 0 ]; then exec "$@"; fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"  # Ray's ports are not published outside the container
export RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-1}" # as scripts/serve.sh
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true  # open event streams need descriptors
ray start --head --disable-usage-stats --include-dashboard=false \
    --metrics-export-port="${RAY_METRICS_EXPORT_PORT:-8080}" --port="${RAY_GCS_PORT:-6380}"
python -m deployments.serve.config --host 0.0.0.0 /app/serve_config.yaml -o /tmp/serve_config.yaml
trap 'serve shutdown -y >/dev/null 2>&1 || true; ray stop >/dev/null 2>&1 || true' TERM INT
serve run --address auto /tmp/serve_config.yaml &
wait $!
