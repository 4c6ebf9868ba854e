#!/usr/bin/env bash
# Builds the service's image and runs it as compose does, then walks its API through the published port.
# Slow (the CUDA image is 8.5 GB, a quarter of an hour to build): not in CI; run it by hand, read its summary.
#
#   cluster/docker/check-image.sh                 build, start Redis + the app (tiny model), walk the API
#   cluster/docker/check-image.sh --cluster-node  build, then run the image as a generator node of the
#                                                 local multi-node cluster (scripts/local-cluster.sh)
#   cluster/docker/check-image.sh --build-only    build (and report the image's size) only
#
# Environment:
#   ENGINE=podman|docker   default: podman where installed, else docker
#   IMAGE=musicgen:cuda    the tag built and run;  VARIANT=cuda|cpu (cpu needs download.pytorch.org)
#   SKIP_BUILD=1           use IMAGE as it is
#   LOCAL_BASE=auto|1|0    make the base image locally (mmdebstrap of Debian 12 + `import`): auto = when
#                          no container registry answers (docker.io). The stand-in for python:3.11-slim-
#                          bookworm is Debian's python3 3.11 + python3-venv, tagged BASE_IMAGE.
#   PORT=18000             the host port the API is published on
#   KEEP=1                 leave the containers running at the end (for a look; remove them by hand)
# Podman flags for hosts that need them: PODMAN_RUNTIME (default runc where installed) and ULIMITS
# (default "nofile=20000:20000 nproc=32768:32768", within an unprivileged sandbox's hard limits).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"

MODE=walk
for arg in "$@"; do
  case "$arg" in
    --cluster-node) MODE=cluster ;;
    --build-only) MODE=build ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

IMAGE="${IMAGE:-musicgen:cuda}"
VARIANT="${VARIANT:-cuda}"
PORT="${PORT:-18000}"
LOCAL_BASE="${LOCAL_BASE:-auto}"
DEBIAN_IMAGE="${DEBIAN_IMAGE:-localhost/debian:bookworm}"
BASE_IMAGE="${BASE_IMAGE:-localhost/python:3.11-slim-bookworm}"
REDIS_IMAGE="${REDIS_IMAGE:-localhost/musicgen-redis:bookworm}"
NAME="${NAME:-musicgen-check}"  # of the containers, network and volume
WORK="$(mktemp -d /tmp/musicgen-check.XXXXXX)"
STARTED=$SECONDS

step() { printf '\n== [%4ds] %s\n' "$((SECONDS - STARTED))" "$*"; }
die() { echo "check-image: error: $*" >&2; exit 1; }

# -- the container engine --------------------------------------------------------------------------
if [ -z "${ENGINE:-}" ]; then
  if command -v podman >/dev/null; then ENGINE=podman
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
  else die "neither podman nor a running docker: install podman (Debian: apt-get install podman buildah mmdebstrap)"
  fi
fi
ENG=("$ENGINE")
RUN_FLAGS=()
if [ "$ENGINE" = podman ]; then
  runtime="${PODMAN_RUNTIME-$(command -v runc >/dev/null && echo runc || true)}"
  [ -n "$runtime" ] && ENG+=(--runtime "$runtime")
  for u in ${ULIMITS-nofile=20000:20000 nproc=32768:32768}; do RUN_FLAGS+=(--ulimit "$u"); done
fi
eng() { "${ENG[@]}" "$@"; }
image_exists() { eng image inspect "$1" >/dev/null 2>&1; }

cleanup() {
  local rc=$?
  if [ "${KEEP:-0}" != 1 ]; then
    for c in "$NAME-node" "$NAME-app" "$NAME-redis"; do  # one by one: a missing one stops podman's rm
      eng rm -f -v "$c" >/dev/null 2>&1 || true
    done
    eng network rm -f "$NAME" >/dev/null 2>&1 || true
    eng volume rm -f "$NAME-redis" >/dev/null 2>&1 || true
  fi
  if [ -n "${CLUSTER_PID:-}" ]; then
    kill -TERM "$CLUSTER_PID" 2>/dev/null || true  # (a background job ignores SIGINT)
    wait "$CLUSTER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step "engine: ${ENG[*]}"

# -- the base images -------------------------------------------------------------------------------
registry_reachable() {  # Docker Hub answers /v2/ with 401 to anyone
  local code
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 https://registry-1.docker.io/v2/ || true)"
  [ "$code" != 000 ]
}
if [ "$LOCAL_BASE" = auto ]; then
  if registry_reachable; then LOCAL_BASE=0; else LOCAL_BASE=1; fi
fi
if [ "$LOCAL_BASE" = 1 ]; then
  if ! image_exists "$DEBIAN_IMAGE"; then
    command -v mmdebstrap >/dev/null || die "no registry answers and mmdebstrap is missing (apt-get install mmdebstrap)"
    step "making $DEBIAN_IMAGE with mmdebstrap (no registry reachable; cached for later runs)"
    # as debian:bookworm-slim: no docs, man pages or translations, no downloaded .debs or apt caches kept
    # (the options stay in the image, for every later apt-get of the builds)
    mmdebstrap --variant=minbase --include=ca-certificates --aptopt='APT::Install-Recommends "false"' \
      --customize-hook='printf "%s\n" "APT::Keep-Downloaded-Packages \"false\";" "Dir::Cache::pkgcache \"\";" "Dir::Cache::srcpkgcache \"\";" >"$1/etc/apt/apt.conf.d/docker-clean" && rm -f "$1"/var/cache/apt/*.bin' \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
      --dpkgopt='path-exclude=/usr/share/groff/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
      bookworm "$WORK/rootfs.tar" http://deb.debian.org/debian
    eng import --change 'CMD ["bash"]' "$WORK/rootfs.tar" "$DEBIAN_IMAGE" >/dev/null
    rm -f "$WORK/rootfs.tar"
  fi
  if ! image_exists "$BASE_IMAGE"; then
    step "making $BASE_IMAGE from $DEBIAN_IMAGE (Debian's Python 3.11, as python:3.11-slim-bookworm lays it out)"
    eng build -t "$BASE_IMAGE" "${RUN_FLAGS[@]}" -f - "$WORK" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv \\
    && rm -rf /var/lib/apt/lists/* \\
    && ln -s /usr/bin/python3.11 /usr/local/bin/python3.11 && ln -s /usr/bin/python3 /usr/local/bin/python \\
    && printf '#!/bin/sh\nexec python3 -m pip "\$@"\n' >/usr/local/bin/pip && chmod +x /usr/local/bin/pip
ENV LANG=C.UTF-8
CMD ["python3"]
EOF
  fi
  REDIS_BASE="$DEBIAN_IMAGE"
else
  BASE_IMAGE=python:3.11-slim-bookworm  # the Dockerfile's own default
  REDIS_BASE=docker.io/library/debian:bookworm-slim
fi
if ! image_exists "$REDIS_IMAGE"; then
  step "making $REDIS_IMAGE (Debian's redis-server) from $REDIS_BASE"
  eng build -t "$REDIS_IMAGE" "${RUN_FLAGS[@]}" -f - "$WORK" <<EOF
FROM $REDIS_BASE
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server \\
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
CMD ["redis-server", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", "/data", "--protected-mode", "no"]
EOF
fi

# -- the image -------------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step "building $IMAGE (VARIANT=$VARIANT, from $BASE_IMAGE)"
  build_flags=()
  # podman builds OCI images by default, which have no HEALTHCHECK: the Docker format keeps it
  [ "$ENGINE" = podman ] && build_flags+=(--format docker)
  # the host's CA bundle for pip (proxies that re-sign TLS); `docker build` mounts no volumes
  if [ "$ENGINE" = podman ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    printf '[global]\ncert = /run/musicgen-build-ca.crt\n' >"$WORK/pip.conf"
    build_flags+=(-v /etc/ssl/certs/ca-certificates.crt:/run/musicgen-build-ca.crt:ro -v "$WORK/pip.conf:/etc/pip.conf:ro")
  fi
  t0=$SECONDS
  eng build -f cluster/docker/Dockerfile --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --build-arg "VARIANT=$VARIANT" \
    "${build_flags[@]}" "${RUN_FLAGS[@]}" -t "$IMAGE" .
  BUILD_S=$((SECONDS - t0))
  echo "built in ${BUILD_S} s"
fi
image_exists "$IMAGE" || die "no image $IMAGE (build it, or unset SKIP_BUILD)"
SIZE="$(eng image inspect -f '{{.Size}}' "$IMAGE")"
echo "image $IMAGE: $(awk -v s="$SIZE" 'BEGIN { printf "%.2f GB", s / 1e9 }')"
[ "$MODE" = build ] && exit 0

KEY="mgk_$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"  # an admin key, this run's only
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
logs_on_failure() {
  echo "---- last lines of $1's log" >&2
  eng logs --tail 60 "$1" >&2 2>&1 || true
}

if [ "$MODE" = walk ]; then
  # -- compose's layout: Redis (append-only) and the service on a private network ----------------
  step "starting Redis ($REDIS_IMAGE, append-only) and the service ($IMAGE, the tiny model) on network $NAME"
  eng rm -f -v "$NAME-app" "$NAME-redis" >/dev/null 2>&1 || true
  eng network rm -f "$NAME" >/dev/null 2>&1 || true
  eng network create "$NAME" >/dev/null
  eng volume create "$NAME-redis" >/dev/null
  # no RDB snapshots: what survives the restart below comes from the append-only file
  eng run -d --name "$NAME-redis" --network "$NAME" -v "$NAME-redis:/data" "${RUN_FLAGS[@]}" "$REDIS_IMAGE" \
    redis-server --appendonly yes --appendfsync everysec --dir /data --save "" --protected-mode no >/dev/null
  # GPU_FLAGS: e.g. "--device nvidia.com/gpu=all" (podman, CDI) or "--gpus all" (docker) on a GPU host
  # shellcheck disable=SC2086
  eng run -d --name "$NAME-app" --network "$NAME" -p "127.0.0.1:$PORT:8000" --shm-size 1g ${GPU_FLAGS:-} \
    -e REDIS_URL="redis://$NAME-redis:6379/0" -e MUSICGEN_MODEL=tiny -e HF_HUB_OFFLINE=1 \
    -e MUSICGEN_API_KEYS="check:admin:$KEY" "${RUN_FLAGS[@]}" "$IMAGE" >/dev/null
  if [ "$ENGINE" = podman ]; then
    health="${ENG[*]} healthcheck run $NAME-app"
  else  # docker runs the HEALTHCHECK itself (every 30 s): wait for its verdict
    health="for i in \$(seq 60); do s=\$(docker inspect -f '{{.State.Health.Status}}' $NAME-app);"
    health+=" [ \"\$s\" = healthy ] && echo healthy && exit 0; sleep 2; done; echo \$s; exit 1"
  fi
  step "walking the API through http://127.0.0.1:$PORT"
  if ! python3 cluster/docker/walk.py --url "http://127.0.0.1:$PORT" --key "$KEY" \
      --restart-redis "bash -c '${ENG[*]} kill -s KILL $NAME-redis >/dev/null && ${ENG[*]} start $NAME-redis'" \
      --healthcheck "$health"; then
    logs_on_failure "$NAME-app"
    die "the walk failed (above)"
  fi
  echo "container user: $(eng exec "$NAME-app" id -un) ($(eng exec "$NAME-app" id -u))"
fi

if [ "$MODE" = cluster ]; then
  # -- the image as a generator node of the local multi-node cluster -----------------------------
  VENV="${VENV:-$ROOT/.venv}"
  [ -x "$VENV/bin/python" ] || die "no $VENV: the local cluster runs from the project's environment (scripts/setup.sh, or VENV=...)"
  step "starting the local cluster on the host: head + API node, Redis, S3 (moto), no generator node"
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" HF_HUB_OFFLINE=1
  "$VENV/bin/python" -m deployments.serve.local_cluster --generator-nodes 0 --root "$WORK/cluster" \
    >"$WORK/cluster.log" 2>&1 &
  CLUSTER_PID=$!
  for _ in $(seq 300); do
    [ -s "$WORK/cluster/cluster.json" ] && break
    kill -0 "$CLUSTER_PID" 2>/dev/null || { tail -40 "$WORK/cluster.log" >&2; die "the local cluster exited"; }
    sleep 1
  done
  [ -s "$WORK/cluster/cluster.json" ] || { tail -40 "$WORK/cluster.log" >&2; die "the local cluster did not start"; }
  info() { python3 -c "import json, sys; print(json.load(open('$WORK/cluster/cluster.json'))$1)"; }
  API="$(info '["api"]')"; CKEY="$(info '["api_key"]')"; GCS="$(info '["ray_address"]')"
  S3="$(info '["s3_endpoint"]')"; REDIS_URL="$(info '["redis_url"]')"
  echo "head's GCS at $GCS, API at $API"
  step "starting $IMAGE as a generator node (host network, \`ray start --address=$GCS\`)"
  eng rm -f -v "$NAME-node" >/dev/null 2>&1 || true
  NODE_HOST=musicgen-image-node
  # Ray refuses a node whose Python differs from the head's in its patch version unless told "minor":
  # the head runs from the host's environment here, the node from the image (one image everywhere
  # on a real cluster: there they match)
  HOSTPY="$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')"
  IMGPY="$(eng run --rm "${RUN_FLAGS[@]}" "$IMAGE" python -c 'import sys; print(sys.version.split()[0])')"
  echo "Python: host $HOSTPY, image $IMGPY"
  eng run -d --name "$NAME-node" --network host --hostname "$NODE_HOST" --shm-size 1g ${GPU_FLAGS:-} \
    -e RAY_AUTH_MODE -e RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor \
    -e HF_HUB_OFFLINE=1 -e MUSICGEN_LOCAL_NODE=image-node -e MUSICGEN_DATA_DIR=/data \
    -e MUSICGEN_S3_ENDPOINT_URL="$S3" -e AWS_ACCESS_KEY_ID=test -e AWS_SECRET_ACCESS_KEY=test \
    -e AWS_DEFAULT_REGION=us-east-1 -e RAY_SERVE_WORKER_PROXY_HTTP_PORT="$(free_port)" "${RUN_FLAGS[@]}" \
    "$IMAGE" ray start --address="$GCS" --num-cpus=1 --resources='{"musicgen_generator": 1}' \
    --object-store-memory=100000000 --disable-usage-stats --block \
    --metrics-export-port="$(free_port)" --dashboard-agent-listen-port="$(free_port)" \
    --dashboard-agent-grpc-port="$(free_port)" --runtime-env-agent-port="$(free_port)" >/dev/null
  step "walking the API through the head ($API): the song must be made on the container's node"
  if ! python3 cluster/docker/walk.py --url "$API" --key "$CKEY" --job-id-file "$WORK/job"; then
    logs_on_failure "$NAME-node"
    tail -40 "$WORK/cluster.log" >&2
    die "the walk failed (above)"
  fi
  worker="$("$VENV/bin/python" -c "from deployments.service.store import JobStore
print(JobStore.from_url('$REDIS_URL').get(open('$WORK/job').read()).worker)")"
  pid="${worker##*:}"
  [ "${worker%%:*}" = "$NODE_HOST" ] || die "the song was made by $worker, not on the container ($NODE_HOST)"
  eng exec "$NAME-node" test -d "/proc/$pid" || die "the worker $worker is no process of the container"
  echo "the song's generator: $worker = a process of container $NAME-node (hostname $NODE_HOST)"
fi
step "done in $((SECONDS - STARTED)) s (image $IMAGE, $(awk -v s="$SIZE" 'BEGIN { printf "%.2f GB", s / 1e9 }')${BUILD_S:+, built in $BUILD_S s})"
