#!/usr/bin/env bash
# The system packages the project needs, installed with apt-get where they are missing:
#   espeak-ng 1.51     the version the lyrics front end needs: Debian 12's and Ubuntu 24.04's package;
#                      where apt offers another version (Ubuntu 22.04 has 1.50) it is built from
#                      Debian's 1.51 source (pinned SHA-256) into /usr/local
#   python3.11 + venv  (when no Python 3.11 with a working venv module is on PATH and apt has it;
#                       where apt has none, e.g. Ubuntu 24.04, scripts/setup.sh fetches one with uv
#                       and this script installs python3-venv for that bootstrap)
#   EXTRA_APT_PACKAGES (space-separated, e.g. "chromium" for the browser tests)
#
# Runs as root without sudo (containers, CI runners, fresh cloud VMs) or as a user with sudo.
# Without apt-get it installs nothing and says what is missing. Exits non-zero only when something
# required is missing and cannot be installed.
set -euo pipefail

PYTHON="${PYTHON:-python3.11}"
ESPEAK_VERSION=1.51
# the same file (same SHA-256) in Debian's and Ubuntu's pools: the first that answers is used
ESPEAK_SRC_URLS=(
  "http://deb.debian.org/debian/pool/main/e/espeak-ng/espeak-ng_1.51+dfsg.orig.tar.gz"
  "http://archive.ubuntu.com/ubuntu/pool/main/e/espeak-ng/espeak-ng_1.51+dfsg.orig.tar.gz"
)
ESPEAK_SRC_SHA256=72242d7c06a4d80f5056335977c5be1ff79ff27bb502d4d054be1803ff787fa9
need=()

have() { command -v "$1" >/dev/null 2>&1; }

python_ok() { have "$1" && "$1" -c 'import ensurepip, venv' >/dev/null 2>&1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif have sudo; then
    sudo "$@"
  else
    echo "error: installing ${need[*]} needs root: run this as root, or install sudo" >&2
    return 1
  fi
}

# `env` passes the variable to apt-get whether or not sudo runs it (sudo drops most of the environment)
apt_get() { as_root env DEBIAN_FRONTEND=noninteractive apt-get "$@"; }

have espeak-ng || need+=(espeak-ng)
for pkg in ${EXTRA_APT_PACKAGES:-}; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
python_ok "$PYTHON" || need+=(python3.11 python3.11-venv)

if [ "${#need[@]}" -eq 0 ]; then
  exit 0
fi
if ! have apt-get; then
  echo "warning: apt-get is unavailable; install by hand: ${need[*]} (espeak-ng must be 1.51)" >&2
  python_ok "$PYTHON" || python_ok python3 || exit 1
  exit 0
fi

echo "installing system packages: ${need[*]}..."
apt_get update -qq >/dev/null
if [[ " ${need[*]} " == *" python3.11 "* ]] && ! apt-cache show python3.11 >/dev/null 2>&1; then
  # e.g. Ubuntu 24.04: no Python 3.11 in the archive; scripts/setup.sh bootstraps one with uv
  kept=()
  for pkg in "${need[@]}"; do
    case "$pkg" in python3.11 | python3.11-venv) ;; *) kept+=("$pkg") ;; esac
  done
  need=("${kept[@]}")
  python_ok python3 || need+=(python3-venv)
  echo "apt has no python3.11 here: scripts/setup.sh will fetch Python 3.11 with uv"
fi
build_espeak=0
if [[ " ${need[*]} " == *" espeak-ng "* ]]; then
  candidate="$(apt-cache policy espeak-ng 2>/dev/null | sed -n 's/^ *Candidate: *//p')"
  if [[ "$candidate" != "$ESPEAK_VERSION"* ]]; then
    kept=()
    for pkg in "${need[@]}"; do [ "$pkg" = espeak-ng ] || kept+=("$pkg"); done
    need=("${kept[@]}" ca-certificates curl gcc g++ make autoconf automake libtool pkg-config)
    build_espeak=1
  fi
fi
if [ "${#need[@]}" -gt 0 ]; then
  apt_get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ "$build_espeak" -eq 1 ]; then
  echo "apt offers espeak-ng ${candidate:-(none)}, not $ESPEAK_VERSION: building $ESPEAK_VERSION from Debian's source..."
  src="$(mktemp -d)"
  trap 'rm -rf "$src"' EXIT
  for url in "${ESPEAK_SRC_URLS[@]}"; do
    curl -fsSL "$url" -o "$src/espeak-ng.tar.gz" && break
    echo "warning: could not download $url" >&2
  done
  echo "$ESPEAK_SRC_SHA256  $src/espeak-ng.tar.gz" | sha256sum -c --quiet -
  tar -xzf "$src/espeak-ng.tar.gz" -C "$src"
  (
    cd "$src"/espeak-ng-*/
    if ! { ./autogen.sh && ./configure --prefix=/usr/local --with-pcaudiolib=no --with-sonic=no \
             --with-speechplayer=no && make -j"$(nproc)"; } >"$src/build.log" 2>&1; then
      tail -n 30 "$src/build.log" >&2
      echo "error: building espeak-ng $ESPEAK_VERSION failed (output above)" >&2
      exit 1
    fi
    as_root make install >/dev/null
  )
  as_root ldconfig
  espeak-ng --version
fi
