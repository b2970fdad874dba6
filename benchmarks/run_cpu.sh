#!/usr/bin/env bash
# The committed CPU results (results/cpu/) come from exactly these commands.
# Run on an otherwise idle machine: every result file records the load average.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-results/cpu}
REPEATS=${REPEATS:-9}
mkdir -p "$OUT"
uptime
# Whole models: standard vs exact HetConv (auto) vs the public seed form, both memory formats.
"$BIN/leanconv" bench models --model vgg16_cifar --p 4,8 --batch 64 --repeats "$REPEATS"
# Layer grid: every VGG-16-CIFAR HetConv shape at P = 2, 4, 8, 16.
"$BIN/leanconv" bench layers --grid vgg --batch 64 --repeats "$REPEATS"
# Every CPU form tried for one layer (the ones auto does not use included).
"$BIN/python" benchmarks/cpu_forms.py --batch 64 --repeats "$REPEATS"
# DSC / BSConv layers against nn.Conv2d.
"$BIN/leanconv" bench separable --batch 64 --repeats "$REPEATS"
"$BIN/python" scripts/render_perf_section.py --results "$OUT" --out docs/performance.md
