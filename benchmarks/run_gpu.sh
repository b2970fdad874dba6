#!/usr/bin/env bash
# Every GPU measurement of the Triton kernels (issue 6) in one call, on a CUDA
# machine (H100/H200 class) with torch and Triton installed:
#   1. the kernel tests on the GPU (skipped when pytest is missing),
#   2. HetConv kernels: correctness + speed vs cuDNN dense / decomposition / split,
#      autotuned (the kernel variants compete), then the first and the second
#      variants forced (forward taps/flat loop, weight-gradient gather/aligned tiles),
#   3. depthwise kernels: correctness + speed vs cuDNN,
#   4. HetConv float32 with TF32 off (IEEE dots), a correctness check.
# Knobs: PYTHON (python3), OUT (results/gpu). Each step prints its wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-results/gpu}
export LEANCONV_COMMIT=${LEANCONV_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

step() {
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@"
  echo "== $name: $((SECONDS - start)) s"
}

if "$PYTHON" -c "import pytest" 2>/dev/null; then
  step tests env PYTHONPATH=src "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton_hetconv.py tests/test_triton_depthwise.py
else
  echo "== tests: pytest is not installed here, skipped"
fi
step hetconv "$PYTHON" benchmarks/gpu_hetconv.py --out "$OUT"
step hetconv-first-variants "$PYTHON" benchmarks/gpu_hetconv.py --skip-correctness --forward-variant taps --dw-variant gather --dtypes bfloat16 --out "$OUT"
step hetconv-second-variants "$PYTHON" benchmarks/gpu_hetconv.py --skip-correctness --forward-variant flat --dw-variant aligned --dtypes bfloat16 --out "$OUT"
step depthwise "$PYTHON" benchmarks/gpu_depthwise.py --out "$OUT"
step fp32-strict "$PYTHON" benchmarks/gpu_hetconv.py --fp32-strict
