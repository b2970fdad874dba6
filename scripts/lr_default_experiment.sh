#!/bin/bash
# Issue 12 point 5: train's old defaults (lr 0.1 at every batch size, no
# warm-up) against the new ones (lr 0.1 x batch/128, warm-up min(1, epochs/10))
# on the CIFAR-10 subset, 30 epochs, for vgg16_cifar (width 0.5) and
# resnet20_cifar at the batch sizes the README offers (64: compare; 128:
# train's default). Finished runs are reused.
#   [THREADS=N] bash scripts/lr_default_experiment.sh [OUT_DIR] [DATA_DIR]
# then: python scripts/collect_lr_results.py OUT_DIR results/cpu/lr-defaults-subset
set -euo pipefail
OUT=${1:-runs/lr-defaults}
DATA=${2:-../shared/data/cifar10-subset}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LEANCONV="$PYTHON -m leanconv.cli"
THREAD_ARGS=${THREADS:+--threads $THREADS}
mkdir -p "$OUT"
run() {
  local name=$1; shift
  [ -f "$OUT/$name/summary.json" ] && return 0
  local start=$SECONDS
  $LEANCONV train "$@" --epochs 30 --data "$DATA" --out "$OUT/$name" --no-progress $THREAD_ARGS > "$OUT/$name.log" 2>&1
  echo "$((SECONDS - start)) s wall" > "$OUT/$name.time"
}
for model in vgg16_cifar resnet20_cifar; do
  width=1; [ $model = vgg16_cifar ] && width=0.5
  for batch in 64 128; do
    run ${model}_b${batch}_new --model $model --width $width --batch-size $batch
    run ${model}_b${batch}_old --model $model --width $width --batch-size $batch --lr 0.1 --warmup 0
  done
done
