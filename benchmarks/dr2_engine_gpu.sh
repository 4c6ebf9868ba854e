#!/usr/bin/env bash
# DiffRhythm 2 on the engine, on one CUDA GPU: the measurements of the README's sizing rows. Writes
# tables and plots under ${OUT:-benchmarks/out}/. Parts (default: all; each a few minutes on an H200):
#   single  one 95 s song alone with the engine idle: the block sampler, the engine, its CUDA-graph ticks
#   many    16 and 64 concurrent 95 s requests, mixed lyrics: songs per hour, p95 time to finish, peak
#           memory, for the engine, its CUDA-graph ticks and its compiled MLPs
#   fp32    sample_blocks' per-block CUDA graph against eager and against eager with the same
#           (preallocated) cache, in fp32: is the bf16 difference of 2.1-3.7 rounding or a bug?
#     benchmarks/dr2_engine_gpu.sh single many
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(single many fp32)
release=(--device cuda --dtype bf16 --dim 2048 --depth 16 --heads 16)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for part in "${parts[@]}"; do
  case "$part" in
    single)
      echo "== one 95 s song, 300 lyrics tokens"
      "$PY" benchmarks/dr2_serving.py "${release[@]}" --requests 1 --seconds 95 95 --lyrics 300 300 \
        --modes alone engine graphs --json "$OUT/dr2-single.json" | tee "$OUT/dr2-single.txt" ;;
    many)
      echo "== 16 and 64 concurrent 95 s requests, lyrics 50-400 tokens"
      "$PY" benchmarks/dr2_serving.py "${release[@]}" --requests 16 64 --seconds 95 95 --no-alone \
        --modes engine compiled graphs --json "$OUT/dr2-many.json" --plot "$OUT/dr2-many.png" \
        | tee "$OUT/dr2-many.txt" ;;
    fp32)
      echo "== fp32: sample_blocks' per-block CUDA graph against eager"
      "$PY" benchmarks/dr2_throughput.py --device cuda --dtype fp32 --seconds 95 --takes 1 --graphs \
        | tee "$OUT/dr2-graphs-fp32.txt" ;;
    *) echo "unknown part $part (single, many, fp32)" >&2; exit 2 ;;
  esac
done
