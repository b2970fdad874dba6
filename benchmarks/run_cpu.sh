#!/usr/bin/env bash
# The committed CPU results (results/cpu/) and docs/performance.md come from exactly
# these commands. Run on an otherwise idle machine: every result file records the
# load average, the CPU, torch's CPU capability (AVX512, AVX2...) and the ISA of the
# direct HetConv kernel; file names start with the machine: CPU model, ISA, threads
# (e.g. amd-epyc-avx512-2t-...), so runs on hosts of different ISAs sit side by side
# and docs/performance.md shows the targets per ISA. Every part prints its wall time.
# Knobs (environment):
#   OUT       result folder, read back by the renderer (default results/cpu)
#   REPEATS   interleaved timed rounds per candidate (default 15)
#   LAYER_REPEATS  rounds for the layer grid (default 7; it has the most candidates)
#   LAYER_P   parts P of the layer grid (default 2,4,8,16)
#   BATCH     batch size (default 64)
#   RESNET_BATCH  batch size of the ResNet-18 layer grid at 224x224 maps (default 32)
#   DOC       the rendered Markdown (default docs/performance.md)
# Wall time on the 2-core EPYC, idle: models 122 s, layers 291 s, forms 23 s, separable 18 s at
# REPEATS=9, LAYER_REPEATS=5, LAYER_P=2,4,8; about 2-3 times that while other jobs share the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-results/cpu}
REPEATS=${REPEATS:-15}
LAYER_REPEATS=${LAYER_REPEATS:-7}
LAYER_P=${LAYER_P:-2,4,8,16}
BATCH=${BATCH:-64}
RESNET_BATCH=${RESNET_BATCH:-32}
DOC=${DOC:-docs/performance.md}
mkdir -p "$OUT"
uptime
part() {  # part NAME COMMAND...: run one part, print how long it took
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*" >&2
    "$@"
    echo "== $name took $((SECONDS - start)) s" >&2
}
# Whole models: standard vs exact HetConv (auto) vs the public seed form, both memory formats;
# infer_folded: the same after leanconv.fuse (BatchNorm folded into the convolutions).
part models "$BIN/leanconv" bench models --model vgg16_cifar --p 4,8 --batch "$BATCH" --modes infer,train,infer_folded --repeats "$REPEATS" --out-dir "$OUT"
# Batch-1 latency, VGG-16 (width 1), P=4: more rounds, each call is short.
part models-b1 "$BIN/leanconv" bench models --model vgg16_cifar --p 4 --batch 1 --modes infer,infer_folded --repeats "$((REPEATS * 4))" --out-dir "$OUT"
# ResNet-18 at 224x224, batch 16 and 1.
part models-resnet18 "$BIN/leanconv" bench models --model resnet18 --p 4 --batch 16 --modes infer,infer_folded --repeats "$REPEATS" --out-dir "$OUT"
part models-resnet18-b1 "$BIN/leanconv" bench models --model resnet18 --p 4 --batch 1 --modes infer,infer_folded --repeats "$((REPEATS * 2))" --out-dir "$OUT"
# Layer grid: every VGG-16-CIFAR HetConv shape at each P of LAYER_P.
part layers "$BIN/leanconv" bench layers --grid vgg --p "$LAYER_P" --batch "$BATCH" --backends auto,reference,split,direct --baselines seed --repeats "$LAYER_REPEATS" --out-dir "$OUT"
# Batch 1: the same VGG shapes at P=4 and 8.
part layers-b1 "$BIN/leanconv" bench layers --grid vgg --p 4,8 --batch 1 --backends auto,split,direct --baselines "" --repeats "$((LAYER_REPEATS * 3))" --out-dir "$OUT"
# ResNet-18/34's 3x3 convolutions at 224x224 (56x56 to 7x7 maps, stride 2 where a stage opens), batch RESNET_BATCH and 1.
part layers-resnet18 "$BIN/leanconv" bench layers --grid resnet18 --p 4,8 --batch "$RESNET_BATCH" --backends auto,split,direct --baselines "" --repeats "$LAYER_REPEATS" --out-dir "$OUT"
part layers-resnet18-b1 "$BIN/leanconv" bench layers --grid resnet18 --p 4,8 --batch 1 --backends auto,split,direct --baselines "" --repeats "$((LAYER_REPEATS * 3))" --out-dir "$OUT"
# Layer shapes beyond VGG-16's: 96/160/384/512 channels, 7x7 maps, stride 2.
part layers-beyond "$BIN/leanconv" bench layers --grid beyond --p "$LAYER_P" --batch "$BATCH" --backends auto,split,direct --baselines seed --repeats "$LAYER_REPEATS" --out-dir "$OUT"
# Every CPU form tried for one layer (the ones auto does not use included).
part forms "$BIN/python" benchmarks/cpu_forms.py --batch "$BATCH" --repeats "$REPEATS" --out-dir "$OUT"
# auto's deterministic rule against auto with measuring on, whole models, side by side.
part rule_vs_measured "$BIN/python" benchmarks/rule_vs_measured.py --batch "$BATCH" --repeats "$REPEATS" --out-dir "$OUT"
# Per-call overhead at batch 1 (one thread).
part overhead "$BIN/python" benchmarks/overhead.py --out-dir "$OUT"
# Small depthwise calls: F.conv2d against the oneDNN-prepacked weight (one thread).
part depthwise-small "$BIN/python" benchmarks/depthwise_small.py --out-dir "$OUT"
# Inside the direct kernel: permuted loads vs group passes, NCHW vs channels-last, its copies vs torch's.
part direct-internals "$BIN/python" benchmarks/direct_internals.py --rounds "$REPEATS" --out-dir "$OUT"
# The main job's networks (make demo): batch-1 latency and training step, both formats.
part main-job "$BIN/python" benchmarks/main_job_speed.py --repeats "$REPEATS" --out-dir "$OUT"
# DSC / BSConv layers against nn.Conv2d, at BATCH and at batch 1.
part separable "$BIN/leanconv" bench separable --batch "$BATCH" --repeats "$REPEATS" --out-dir "$OUT"
part separable-b1 "$BIN/leanconv" bench separable --batch 1 --repeats "$REPEATS" --out-dir "$OUT"
# The direct separable kernels (DSC, BSConv-U) against the library forms, batch 1-64: the rule's measurements.
part separable-direct "$BIN/python" benchmarks/separable_direct.py --out "$OUT/$("$BIN/python" -c 'from leanconv.bench import machine_slug; print(machine_slug())')-separable-direct"
# Whole networks through every inference path: fuse, optimize_for_inference, torch.compile, OpenVINO, onnxruntime.
part inference-paths "$BIN/python" benchmarks/inference_paths.py --compiled --out "$OUT/$("$BIN/python" -c 'from leanconv.bench import machine_slug; print(machine_slug())')-inference-paths"
part render "$BIN/python" scripts/render_perf_section.py --results "$OUT" --out "$DOC" --readme README.md
uptime
