"""Inference speed of ``leanconv.fuse``: a converted zoo model before and after
fusion (BatchNorm folded into the convolutions), eval mode, no grad.

Variants, timed interleaved in one run (each repeat runs every variant once,
A, B, C, A, B, C, ..., via ``leanconv.bench.time_interleaved``, so drifts in
machine load hit all of them alike):

* ``unfused``: the converted model as trained (conv -> BN -> ReLU);
* ``fused``: ``leanconv.fuse(model)``: BN folded (HetConv stays HetConv2d,
  with its backend chosen as usual);
* ``fused+static``: ``leanconv.export.prepare_for_export(model)``: fused, and
  each HetConv2d as a frozen grouped conv + 1x1 conv + add (no per-call
  weight materialisation) - the graph that ONNX export writes.

Correctness gate: every variant's output must match the unfused model's
(max |diff| <= 1e-4 * max |y| + 1e-5; 2e-3 on CUDA where cuDNN may use TF32)
before anything is timed.

Example (the numbers in the closing note of issue 3)::

    .venv/bin/python benchmarks/fuse_speed.py --model vgg16_cifar --conv hetconv --p 4 \\
        --width 0.5 --batch 32 --repeats 15

Writes JSON, CSV and Markdown results (machine header, resolved configuration,
per-variant times) to ``results/<cpu|gpu>/`` with the setting in
their names.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn

from leanconv.bench.models import trained_looking_batchnorm


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg16_cifar", help="zoo name or module:function")
    parser.add_argument("--conv", default="hetconv")
    parser.add_argument("--p", type=float, default=4)
    parser.add_argument("--with-bn", action="store_true", help="BN inside separable layers (dsc/bsconv/gwpw)")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=None, help="input side (default: 32 for CIFAR models, else 224)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="result path stem (default: results/<cpu|gpu>/<machine>-fuse-<setting>)")
    return parser.parse_args(argv)


def build(args) -> nn.Module:
    from leanconv.conversion import convert, load_callable

    if ":" in args.model:  # module:function
        model = load_callable(args.model)()
    else:
        from leanconv import models

        model = models.create(args.model, width=args.width)
    options = {}
    if args.conv in ("hetconv",):
        options["p"] = int(args.p)
    elif args.conv == "bsconv_s":
        options["p"] = float(args.p)
    elif args.conv == "gwpw":
        options["groups"] = int(args.p)
    if args.with_bn:
        options["with_bn"] = True
    model = convert(model, args.conv, **options) if args.conv != "standard" else model
    trained_looking_batchnorm(model)
    return model.eval().to(args.device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from leanconv.bench import describe_environment, machine_slug, time_interleaved, write_results
    from leanconv.export import prepare_for_export
    from leanconv.fuse import fuse

    torch.manual_seed(0)
    model = build(args)
    variants = {"unfused": model, "fused": fuse(model), "fused+static": prepare_for_export(model)}
    default_size = getattr(model, "default_input_size", None)
    size = args.size or (default_size[-1] if default_size else (32 if "cifar" in args.model else 224))
    x = torch.randn(args.batch, 3, size, size, device=args.device)

    def runner(module):
        def run():
            module(x)
            synchronize(args.device)
        return run

    # cuDNN convolutions may run in TF32 on Ampere and newer (torch's default):
    # compare at TF32's precision there, float32's elsewhere.
    tf32 = args.device.startswith("cuda") and torch.backends.cudnn.allow_tf32
    relative_tolerance = 2e-3 if tf32 else 1e-4
    with torch.no_grad():
        reference = model(x)
        errors = {}
        for name, variant in variants.items():
            errors[name] = (variant(x) - reference).abs().max().item()
            tolerance = relative_tolerance * reference.abs().max().item() + 1e-5
            if not errors[name] <= tolerance:
                print(f"correctness gate failed for {name}: max |diff| {errors[name]:.3g} > {tolerance:.3g}", file=sys.stderr)
                return 1
        timings = time_interleaved(
            {name: runner(variant) for name, variant in variants.items()}, warmup=args.warmup, repeats=args.repeats,
        )

    header = describe_environment()
    config = dict(vars(args), size=size, cudnn_tf32=tf32, gate_relative_tolerance=relative_tolerance)
    base = timings["unfused"].median
    rows = [
        {"variant": name, "median_ms": 1e3 * t.median, "q1_ms": 1e3 * t.q1, "q3_ms": 1e3 * t.q3,
         "min_ms": 1e3 * t.minimum, "spread": t.spread, "speedup_vs_unfused": base / t.median,
         "max_abs_diff_vs_unfused": errors[name]}
        for name, t in timings.items()
    ]
    title = (f"fuse speed: {args.model} {args.conv} p={args.p:g} width={args.width:g} batch={args.batch} "
             f"{size}x{size}, eval, no grad, device {args.device}")
    print(f"# {title}")
    print(f"# torch {header['torch']}, {header['torch_threads']} threads, {header['cpu']}, load {header['load_average_1_5_15min']}; "
          f"{args.repeats} interleaved repeats after {args.warmup} warm-up")
    print(f"{'variant':<14} {'median ms':>10} {'q1':>8} {'q3':>8} {'speed-up':>9}")
    for row in rows:
        print(f"{row['variant']:<14} {row['median_ms']:>10.2f} {row['q1_ms']:>8.2f} {row['q3_ms']:>8.2f} "
              f"{row['speedup_vs_unfused']:>8.2f}x")
    if args.out:
        stem = args.out[:-5] if args.out.endswith(".json") else args.out
    else:
        kind = "gpu" if args.device.startswith("cuda") else "cpu"
        slug = machine_slug(header) if kind == "cpu" else header.get("cuda_device", "cuda").lower().replace(" ", "-")
        model_tag = args.model.replace(":", "-")
        stem = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", kind,
            f"{slug}-fuse-{model_tag}-{args.conv}-p{args.p:g}-w{args.width:g}-b{args.batch}",
        )
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    columns = ["variant", "median_ms", "q1_ms", "q3_ms", "min_ms", "spread", "speedup_vs_unfused", "max_abs_diff_vs_unfused"]
    notes = [
        "unfused: conv -> BN -> ReLU as converted; fused: leanconv.fuse (BN folded); "
        "fused+static: leanconv.export.prepare_for_export (fused, HetConv as grouped conv + 1x1 conv + add)",
        "times are per forward pass of the whole batch; speed-up = unfused median / variant median",
    ]
    for path in write_results(stem, header=header, config=config, rows=rows, columns=columns, title=title, notes=notes):
        print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
