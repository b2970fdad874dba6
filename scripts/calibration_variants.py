"""Data-aware conversion variants on a trained teacher, top-1 on the test split:
transfer only; transfer + BatchNorm re-estimation only (no fit); the layer fits
with the BatchNorm decision "auto" (the default), "always" and "never", other
samples, the ReLU-aware refinement (all without block reconstruction); the
layer fits followed by block reconstruction with blocks of two and of six
(the default) replaced layers, with fewer and with more steps.

    python scripts/calibration_variants.py TEACHER_CKPT DATA_DIR results/cpu/calibration-variants-subset
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from leanconv.conversion import convert
from leanconv.data import BatchLoader, load_dataset
from leanconv.files import write_atomic
from leanconv.train import evaluate, load_trained_model
from leanconv.train.distill import calibration_images

STUDENTS = {"p4": ("HetConv P=4", "hetconv:p=4"), "p8": ("HetConv P=8", "hetconv:p=8"), "dsc": ("DSC", "dsc"),
            "bsu": ("BSConv-U", "bsconv_u")}
LAYERS = {"block_steps": 0}  # the per-layer steps alone
# key: (label, calibration images (None: --images), settings (None: no calibration))
VARIANTS = {
    "transfer": ("transfer only", None, None),
    "bn-only": ("transfer + BN re-estimated (no fit)", None, {"fit": False}),
    "fit": ("layer fits, BN re-estimated where it helps", None, {"batchnorm": "auto", **LAYERS}),
    "fit-bn-always": ("layer fits, BN always re-estimated", None, {"batchnorm": "always", **LAYERS}),
    "fit-bn-never": ("layer fits, BN never re-estimated", None, {"batchnorm": "never", **LAYERS}),
    "fit-2048x16": ("layer fits, 2048 images x 16 pixels", 2048, {"pixels_per_image": 16, **LAYERS}),
    "fit-all-images": ("layer fits, every training image", 10**9, {**LAYERS}),
    "fit-relu1": ("layer fits, ReLU-aware refinement, 1 pass", None, {"relu_iterations": 1, **LAYERS}),
    "fit-relu3": ("layer fits, ReLU-aware refinement, 3 passes", None, {"relu_iterations": 3, **LAYERS}),
    "blocks2-400": ("+ blocks of 2 layers, 400 steps", None, {"block_layers": 2, "block_steps": 400}),
    "blocks2": ("+ blocks of 2 layers", None, {"block_layers": 2}),
    "blocks6": ("+ blocks of 6 layers (default)", None, {}),
    "blocks6-3000": ("+ blocks of 6 layers, 3,000 steps", None, {"block_steps": 3000}),
}


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=1024, help="calibration images (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--students", default=",".join(STUDENTS), help=f"subset of {','.join(STUDENTS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, _ = load_trained_model(args.teacher)
    train, test = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    loader = BatchLoader(test, 256)
    rows = [{"student": "teacher", "variant": "dense", **evaluate(teacher, loader), "seconds": 0.0}]
    students = [name.strip() for name in args.students.split(",")]
    variants = [name.strip() for name in args.variants.split(",")]
    for name in students + variants:
        if name not in STUDENTS and name not in VARIANTS:
            parser.error(f"unknown student or variant {name!r}")
    for key in students:
        student, spec = STUDENTS[key]
        for variant_key in variants:
            variant, count, settings = VARIANTS[variant_key]
            images = calibration_images(train, count or args.images, args.seed)
            start = time.perf_counter()
            extra = {} if settings is None else {"calibration": images, "calibration_settings": settings}
            model, report = convert(teacher, spec, transfer_weights=True, return_report=True, **extra)
            seconds = time.perf_counter() - start
            fits = [r.calibration for r in report.replaced if r.calibration is not None]
            errors = [f.error_fit if f.error_fit is not None else f.error_transfer for f in fits]
            rows.append({"student": student, "variant": variant, "images": 0 if settings is None else len(images),
                         **evaluate(model, loader), "seconds": seconds,
                         "mean_layer_output_error": sum(errors) / len(errors) if errors and None not in errors else None,
                         "batchnorms_reestimated": sum(f.bn_reestimated for f in fits),
                         "mean_block_error": _mean([b.error_block for b in report.blocks if b.error_block is not None])})
            print(f"{student:12s} {variant:38s} top1 {100 * rows[-1]['top1']:.1f}%  {seconds:.0f} s", flush=True)
    lines = ["| student | variant | images | top-1 | mean layer output error | mean block output error (held out) "
             "| BNs re-estimated | seconds |",
             "|---|---|---|---|---|---|---|---|"]

    def number(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    for row in rows:
        lines.append(f"| {row['student']} | {row['variant']} | {row.get('images', '-')} | {100 * row['top1']:.1f}% | "
                     f"{number(row.get('mean_layer_output_error'))} | {number(row.get('mean_block_error'))} | "
                     f"{row.get('batchnorms_reestimated', '-')} | {row['seconds']:.0f} |")
    lines += ["", f"Calibration images drawn from the training split (seed {args.seed}); top-1 on the {rows[0]['n']} "
              "test images; layer output errors are relative, on the calibration sample (after the layer fits); "
              "block errors on the held-out eighth of the calibration images, after the blocks' optimisation."]
    command = (f"python scripts/calibration_variants.py {args.teacher} {args.data} {args.out} --students "
               f"'{args.students}' --variants '{args.variants}'")
    write_atomic(args.out + ".json", json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    write_atomic(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
