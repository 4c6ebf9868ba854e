#!/usr/bin/env bash
# DiffRhythm 2 on the engine, on one CUDA GPU: the measurements of the README's sizing rows. Writes
# tables and plots under ${OUT:-benchmarks/out}/. Parts (default: all; each a few minutes on an H200):
#   single  one 95 s song alone with the engine idle: the block sampler, the engine, its CUDA-graph ticks
#   many    16 and 64 concurrent 95 s requests, mixed lyrics: songs per hour, p95 time to finish, peak
#           memory, for the engine, its CUDA-graph ticks and its compiled MLPs
#   fp32    sample_blocks' per-block CUDA graph against eager and against eager with the same
#           (preallocated) cache, in fp32: is the bf16 difference of 2.1-3.7 rounding or a bug?
#     benchmarks/dr2_engine_gpu.sh single many
# Needs only PyTorch with CUDA, NumPy and matplotlib: runs with PYTHON where set, else the project's
# .venv, else python3 (e.g. a GPU machine's own PyTorch, with nothing installed). MODEL: the DiT's
# device, precision and size (default: the release size in bf16 on CUDA); DECODER: dr2_throughput.py's
# decoder options (default: its own, the release size); SONG_S: the songs' length (95); MANY: the
# request counts of `many` ("16 64"). The tests run it on the CPU with tiny ones.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(single many fp32)
read -r -a model <<< "${MODEL:---device cuda --dtype bf16 --dim 2048 --depth 16 --heads 16}"
read -r -a decoder <<< "${DECODER:-}"
read -r -a many <<< "${MANY:-16 64}"
song_s="${SONG_S:-95}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
for part in "${parts[@]}"; do
  case "$part" in
    single)
      echo "== one $song_s s song, 300 lyrics tokens"
      "$PY" benchmarks/dr2_serving.py "${model[@]}" --requests 1 --seconds "$song_s" "$song_s" --lyrics 300 300 \
        --modes alone engine graphs --json "$OUT/dr2-single.json" | tee "$OUT/dr2-single.txt" ;;
    many)
      echo "== ${many[*]} concurrent $song_s s requests, lyrics 50-400 tokens"
      "$PY" benchmarks/dr2_serving.py "${model[@]}" --requests "${many[@]}" --seconds "$song_s" "$song_s" --no-alone \
        --modes engine compiled graphs --json "$OUT/dr2-many.json" --plot "$OUT/dr2-many.png" \
        | tee "$OUT/dr2-many.txt" ;;
    fp32)
      echo "== fp32: sample_blocks' per-block CUDA graph against eager"
      "$PY" benchmarks/dr2_throughput.py "${model[@]}" "${decoder[@]}" --dtype fp32 --seconds "$song_s" --takes 1 \
        --graphs | tee "$OUT/dr2-graphs-fp32.txt" ;;
    *) echo "unknown part $part (single, many, fp32)" >&2; exit 2 ;;
  esac
done
