#!/usr/bin/env bash
# Create .venv and install everything the project needs (idempotent; fast when nothing changed).
#   scripts/setup.sh            library + CLI + test tools
#   EXTRAS=serve,test scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

# espeak-ng 1.51 (Debian's package): the lyrics front end's phones depend on its exact version.
if ! command -v espeak-ng >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing espeak-ng (Debian package)..."
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null && $SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
  else
    echo "warning: espeak-ng is not installed and apt-get is unavailable; install espeak-ng 1.51 by hand" >&2
  fi
fi

if command -v espeak-ng >/dev/null 2>&1 && ! espeak-ng --version | grep -q " 1\.51"; then
  echo "warning: $(espeak-ng --version | head -1): the lyrics front end needs espeak-ng 1.51 (Debian 12's);" \
       "other versions change some phones, and the conformance test will fail" >&2
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.musicgen-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing musicgen[$EXTRAS] into .venv (the first time downloads torch, several GB)..."
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install --progress-bar on -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
