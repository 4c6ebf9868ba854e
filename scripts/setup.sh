#!/usr/bin/env bash
# Create .venv and install everything the project needs (idempotent; fast when nothing changed).
#   scripts/setup.sh            library + CLI + test tools
#   EXTRAS=serve,test scripts/setup.sh
# As root (containers, CI runners, fresh cloud VMs) or as a user with sudo, on Debian 12 and Ubuntu
# 22.04/24.04. Environment: PYTHON (a Python 3.11 to use), VENV (default .venv), EXTRAS.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test}"
VENV="${VENV:-.venv}"
export PYTHON="${PYTHON:-python3.11}"

# espeak-ng 1.51 (the lyrics front end's phones depend on its exact version) and Python 3.11; once the
# venv exists its Python is the one that counts (on Ubuntu 24.04 no python3.11 is on PATH)
if [ -x "$VENV/bin/python" ]; then PYTHON="$VENV/bin/python" scripts/system-deps.sh; else scripts/system-deps.sh; fi

if command -v espeak-ng >/dev/null 2>&1 && ! espeak-ng --version | grep -q " 1\.51"; then
  echo "warning: $(espeak-ng --version | head -1): the lyrics front end needs espeak-ng 1.51 (Debian 12's);" \
       "other versions change some phones, and the English conformance test fails" >&2
fi

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # no Python 3.11 from the system (Ubuntu 24.04): a standalone build fetched by uv
    echo "no $PYTHON with venv on this machine: fetching Python 3.11 with uv..."
    tools=".tools"
    [ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/python" -m pip install -q uv; }
    UV_PYTHON_INSTALL_DIR="$PWD/$tools/python" "$tools/bin/uv" python install 3.11 || {
      echo "error: could not fetch Python 3.11 with uv (it downloads from github.com); install a Python 3.11" \
           "with venv and run again with PYTHON=/path/to/python3.11" >&2
      exit 1
    }
    PYTHON="$(UV_PYTHON_INSTALL_DIR="$PWD/$tools/python" "$tools/bin/uv" python find 3.11)"
  fi
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.musicgen-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing musicgen[$EXTRAS] into $VENV (the first time downloads torch, several GB)..."
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install --progress-bar on -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
