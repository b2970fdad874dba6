#!/usr/bin/env bash
# Every GPU measurement of the Triton kernels (issue 6) in one call, on a CUDA
# machine (H100/H200 class) with torch and Triton installed:
#   1. the kernel tests on the GPU (skipped when pytest is missing),
#   2. HetConv kernels: correctness + speed vs cuDNN dense / decomposition / split,
#      autotuned (the kernel variants compete), then the first and the second
#      variants forced (forward taps/flat loop, weight-gradient gather/aligned tiles),
#   3. depthwise kernels: correctness + speed vs cuDNN,
#   4. HetConv float32 with TF32 off (IEEE dots), a correctness check.
# A failing step does not stop the later ones; the exit status says whether all
# passed. Knobs: PYTHON (python3), OUT (default results/gpu/run-<commit>, so the
# committed result files are never overwritten). Each step prints its wall time.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export LEANCONV_COMMIT=${LEANCONV_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
OUT=${OUT:-results/gpu/run-$LEANCONV_COMMIT}
mkdir -p "$OUT"
failed=()

step() {
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  if "$@"; then
    echo "== $name: passed, $((SECONDS - start)) s"
  else
    echo "== $name: FAILED (exit $?), $((SECONDS - start)) s"
    failed+=("$name")
  fi
}

if "$PYTHON" -c "import pytest" 2>/dev/null; then
  step tests env PYTHONPATH=src "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton_hetconv.py tests/test_triton_depthwise.py
else
  echo "== tests: pytest is not installed here, skipped"
fi
step hetconv "$PYTHON" benchmarks/gpu_hetconv.py --out "$OUT"
step hetconv-first-variants "$PYTHON" benchmarks/gpu_hetconv.py --forward-variant taps --dw-variant gather --dtypes bfloat16 --out "$OUT"
step hetconv-second-variants "$PYTHON" benchmarks/gpu_hetconv.py --forward-variant flat --dw-variant aligned --dtypes bfloat16 --out "$OUT"
step depthwise "$PYTHON" benchmarks/gpu_depthwise.py --out "$OUT"
step fp32-strict "$PYTHON" benchmarks/gpu_hetconv.py --fp32-strict --out "$OUT"

if ((${#failed[@]})); then
  echo "== FAILED steps: ${failed[*]} (results in $OUT)"
  exit 1
fi
echo "== all steps passed (results in $OUT)"
