#!/bin/bash
# Issue 12's measurement on the CIFAR-10 subset: a VGG-16 width 0.5 teacher
# (train's defaults, 30 epochs) and its HetConv P=4 / P=8, DSC and BSConv-U
# students: (a) transfer only, (b) data-aware conversion (--epochs 0),
# (c) 5 epochs of distillation, (d) 5 epochs of plain fine-tuning from (b),
# (e) trained from scratch for 30 epochs; and (b) with the ReLU-aware
# refinement (--relu-iterations 3). Each finished run is reused.
#   [THREADS=N] bash scripts/distill_experiment.sh [OUT_DIR] [DATA_DIR]
# then: python scripts/collect_distill_results.py OUT_DIR results/cpu/distill-vgg16-w0.5-subset
set -euo pipefail
OUT=${1:-runs/distill-experiment}
DATA=${2:-../shared/data/cifar10-subset}
THREAD_ARGS=${THREADS:+--threads $THREADS}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LEANCONV="$PYTHON -m leanconv.cli"
mkdir -p "$OUT"
run() {  # run NAME ARGS...: one run folder, its wall time in NAME.time
  local name=$1; shift
  [ -f "$OUT/$name/summary.json" ] && return 0
  local start=$SECONDS
  $LEANCONV "$@" --data "$DATA" --out "$OUT/$name" --no-progress $THREAD_ARGS > "$OUT/$name.log" 2>&1
  echo "$((SECONDS - start)) s wall" > "$OUT/$name.time"
}
run teacher train --model vgg16_cifar --width 0.5 --epochs 30
T="$OUT/teacher/last.pt"
declare -A CONV=([p4]=hetconv:p=4 [p8]=hetconv:p=8 [dsc]=dsc [bsu]=bsconv_u)
for s in p4 p8 dsc bsu; do run a_$s distill --teacher "$T" --conv ${CONV[$s]} --epochs 0 --calibration-images 0; done
for s in p4 p8 dsc bsu; do run b_$s distill --teacher "$T" --conv ${CONV[$s]} --epochs 0; done
for s in p4 p8 dsc bsu; do run r_$s distill --teacher "$T" --conv ${CONV[$s]} --epochs 0 --relu-iterations 3; done
for s in p4 p8 dsc bsu; do run c_$s distill --teacher "$T" --conv ${CONV[$s]} --epochs 5; done
for s in p4 p8 dsc bsu; do run d_$s distill --teacher "$T" --conv ${CONV[$s]} --epochs 5 --alpha 1; done
for s in p4 p8 dsc bsu; do run e_$s train --model vgg16_cifar --width 0.5 --epochs 30 --conv ${CONV[$s]}; done
