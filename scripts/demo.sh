#!/usr/bin/env bash
# Set up (if needed), download the weights and generate a song from the official English example.
#   scripts/demo.sh                      real DiffRhythm-1.2 (needs internet the first time)
#   MODEL=tiny scripts/demo.sh           the untrained tiny model: offline, noise-like output
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
MODEL="${MODEL:-diffrhythm-1.2-base}"
if [ "$MODEL" != "tiny" ]; then .venv/bin/musicgen models pull "$MODEL"; fi
.venv/bin/musicgen generate --model "$MODEL" \
  --lyrics "${LYRICS:-examples/hello.lrc}" \
  --style "${STYLE:-upbeat pop with bright synths and a female vocal}" \
  --seed 0 --takes 1 --format mp3 --out outputs "$@"
