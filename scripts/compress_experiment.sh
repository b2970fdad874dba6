#!/bin/bash
# Issue 25's measurement on the CIFAR-10 subset: dense teachers (ResNet-20 and
# ResNet-56 at batch 64, VGG-16 width 0.5 with train's defaults; 30 epochs;
# WRN-16-8 at batch 64, 6 epochs; ResNet-18 on images upscaled to 224, 3 epochs)
# and their students, each
#   L: data-aware conversion with the per-layer fits only (--block-steps 0, --epochs 0),
#   B: the default data-aware conversion (layer fits, then block reconstruction; --epochs 0),
#   D: B then 5 epochs of distillation (B's run folder resumed with --epochs 5: the
#      schedule is planned for 5 epochs from epoch 0, as a fresh --epochs 5 run would).
# Four lanes (one thread each) run at once; each finished run is reused.
#   bash scripts/compress_experiment.sh [OUT_DIR] [DATA_DIR]      (LANES="1 3": only those lanes)
# then: python scripts/collect_compress_results.py OUT_DIR results/cpu/compress-subset
set -euo pipefail
OUT=${1:-runs/compress-experiment}
DATA=${2:-../shared/data/cifar10-subset}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LEANCONV="$PYTHON -m leanconv.cli"
mkdir -p "$OUT"
run() {  # run NAME ARGS...: one run folder, its wall time in NAME.time
  local name=$1; shift
  [ -f "$OUT/$name/summary.json" ] && return 0
  local start=$SECONDS
  $LEANCONV "$@" --data "$DATA" --out "$OUT/$name" --no-progress --threads 1 > "$OUT/$name.log" 2>&1
  echo "$((SECONDS - start)) s wall" > "$OUT/$name.time"
}
extend() {  # extend FROM NAME ARGS...: copy run FROM, resume it with ARGS
  local from=$1 name=$2; shift 2
  [ -f "$OUT/$name/summary.json" ] && [ -f "$OUT/$name.time" ] && return 0
  rm -rf "${OUT:?}/$name"; cp -r "$OUT/$from" "$OUT/$name"
  local start=$SECONDS
  $LEANCONV "$@" --data "$DATA" --out "$OUT/$name" --no-progress --threads 1 --resume > "$OUT/$name.log" 2>&1
  echo "$((SECONDS - start)) s wall" > "$OUT/$name.time"
}
declare -A CONV=([p2]=hetconv:p=2 [p4]=hetconv:p=4 [p8]=hetconv:p=8 [dsc]=dsc [bsu]=bsconv_u [bss]=bsconv_s
                 [gwpw]=gwpw:g=4)
student() {  # student TEACHER_RUN NET KIND [distil] [B's extra arguments...]
  local teacher="$OUT/$1/last.pt" net=$2 kind=$3 distil=${4:-}
  shift $(( $# < 4 ? $# : 4 ))
  local common=(distill --teacher "$teacher" --conv "${CONV[$kind]}" --batch-size 64 --seed 0)
  run "L_${net}_$kind" "${common[@]}" --epochs 0 --block-steps 0
  run "B_${net}_$kind" "${common[@]}" --epochs 0 "$@"
  if [ "$distil" = distil ]; then extend "B_${net}_$kind" "D_${net}_$kind" "${common[@]}" --epochs 5 "$@"; fi
}
lane1() {
  run teacher_r20 train --model resnet20_cifar --width 1 --epochs 30 --batch-size 64 --seed 0
  for kind in p4 dsc bsu; do student teacher_r20 r20 $kind distil; done
  for kind in p2 p8 bss gwpw; do student teacher_r20 r20 $kind; done
}
lane2() {
  run teacher_vgg train --model vgg16_cifar --width 0.5 --epochs 30 --seed 0
  student teacher_vgg vgg p4 distil
  run teacher_r56 train --model resnet56_cifar --width 1 --epochs 30 --batch-size 64 --seed 0
  student teacher_r56 r56 p4 distil
}
lane3() {  # WRN-16-8 (1.55 G MACs an image, 60x ResNet-20's): 6 epochs for the teacher (one core: ~45 min)
  # and 300 block steps (1,500: about an hour of one core); no distillation (5 epochs: about 40 min)
  run teacher_wrn train --model wrn16_8_cifar --width 1 --epochs 6 --batch-size 64 --seed 0
  student teacher_wrn wrn p4 "" --block-steps 300
}
lane4() {  # ResNet-18 on the subset upscaled to 224x224 (1.8 G MACs an image): a 3-epoch teacher (one core:
  # ~25 min), calibration on 512 images with 100 block steps; no distillation
  run teacher_r18 train --model resnet18 --width 1 --image-size 224 --epochs 3 --batch-size 64 --seed 0
  student teacher_r18 r18 p4 "" --calibration-images 512 --block-steps 100
}
for lane in ${LANES:-1 2 3 4}; do "lane$lane" & done
wait
