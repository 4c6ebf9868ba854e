#!/usr/bin/env bash
# DiffRhythm 2 on the engine, on one CUDA GPU: the measurements of the README's sizing rows, in one run
# (about 5 minutes on an H200). Writes tables and plots under ${OUT:-benchmarks/out}/.
#   1. one 95 s song alone, engine idle: today's sampler, the engine, the engine's CUDA-graph ticks
#   2. 64 concurrent requests, 95 s, mixed lyrics: songs per hour, p95 time to finish, peak memory
#   3. the per-block CUDA graph of sample_blocks against eager in fp32, with the same cache (the bf16
#      difference of 2.1-3.7 left open: rounding or a bug)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
release=(--device cuda --dtype bf16 --dim 2048 --depth 16 --heads 16)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
echo "== 1. one 95 s song, 300 lyrics tokens"
"$PY" benchmarks/dr2_serving.py "${release[@]}" --requests 1 --seconds 95 95 --lyrics 300 300 \
  --modes alone engine graphs --json "$OUT/dr2-single.json" | tee "$OUT/dr2-single.txt"
echo "== 2. 64 concurrent 95 s requests, lyrics 50-400 tokens"
"$PY" benchmarks/dr2_serving.py "${release[@]}" --requests 16 64 --seconds 95 95 --no-alone \
  --modes engine graphs --json "$OUT/dr2-64.json" --plot "$OUT/dr2-64.png" | tee "$OUT/dr2-64.txt"
echo "== 3. fp32: sample_blocks' per-block CUDA graph against eager"
"$PY" benchmarks/dr2_throughput.py --device cuda --dtype fp32 --seconds 95 --takes 1 --graphs \
  | tee "$OUT/dr2-graphs-fp32.txt"
