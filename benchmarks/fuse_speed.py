"""Inference speed of ``leanconv.fuse``: a converted zoo model before and after
fusion (BatchNorm folded into the convolutions), eval mode, no grad.

Variants, timed interleaved in one run (each repeat runs every variant once,
in rotating order, so drifts in machine load hit all of them alike):

* ``unfused``: the converted model as trained (conv -> BN -> ReLU);
* ``fused``: ``leanconv.fuse(model)``: BN folded (HetConv stays HetConv2d,
  with its backend chosen as usual);
* ``fused+static``: ``leanconv.export.prepare_for_export(model)``: fused, and
  each HetConv2d as a frozen grouped conv + 1x1 conv + add (no per-call
  weight materialisation) - the graph that ONNX export writes.

Correctness gate: every variant's output must match the unfused model's
(max |diff| <= 1e-4 * max |y| + 1e-5) before anything is timed.

Example (the numbers in the closing note of issue 3)::

    .venv/bin/python benchmarks/fuse_speed.py --model vgg16_cifar --conv hetconv --p 4 \\
        --width 0.5 --batch 32 --repeats 15

Writes a JSON result (configuration, machine, per-variant times) to
``benchmarks/results/`` with the setting in its name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn


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
    parser.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/<setting>.json)")
    return parser.parse_args(argv)


def build(args) -> nn.Module:
    from leanconv.convert import convert, load_callable

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
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model.eval().to(args.device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from leanconv import __version__
    from leanconv.export import prepare_for_export
    from leanconv.fuse import fuse

    torch.manual_seed(0)
    model = build(args)
    variants = {"unfused": model, "fused": fuse(model), "fused+static": prepare_for_export(model)}
    default_size = getattr(model, "default_input_size", None)
    size = args.size or (default_size[-1] if default_size else (32 if "cifar" in args.model else 224))
    x = torch.randn(args.batch, 3, size, size, device=args.device)

    with torch.no_grad():
        reference = model(x)
        for name, variant in variants.items():
            worst = (variant(x) - reference).abs().max().item()
            tolerance = 1e-4 * reference.abs().max().item() + 1e-5
            if not worst <= tolerance:
                print(f"correctness gate failed for {name}: max |diff| {worst:.3g} > {tolerance:.3g}", file=sys.stderr)
                return 1
        for _ in range(args.warmup):
            for variant in variants.values():
                variant(x)
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for repeat in range(args.repeats):
            order = names[repeat % len(names):] + names[: repeat % len(names)]
            for name in order:
                synchronize(args.device)
                start = time.perf_counter()
                variants[name](x)
                synchronize(args.device)
                times[name].append(time.perf_counter() - start)

    def summary(values):
        quartiles = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        return {"median_ms": 1e3 * statistics.median(values), "q1_ms": 1e3 * quartiles[0], "q3_ms": 1e3 * quartiles[2],
                "min_ms": 1e3 * min(values)}

    results = {name: summary(values) for name, values in times.items()}
    base = results["unfused"]["median_ms"]
    header = {
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "leanconv": __version__,
        "threads": torch.get_num_threads(), "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
    }
    config = dict(vars(args), size=size)
    print(f"# fuse speed: {args.model} {args.conv} p={args.p} width={args.width} batch={args.batch} {size}x{size}, eval, no grad")
    print(f"# torch {header['torch']}, {header['threads']} threads, {header['cpu_count']} CPUs, device {args.device}; "
          f"{args.repeats} interleaved repeats after {args.warmup} warm-up")
    print(f"{'variant':<14} {'median ms':>10} {'q1':>8} {'q3':>8} {'speed-up':>9}")
    for name, r in results.items():
        print(f"{name:<14} {r['median_ms']:>10.2f} {r['q1_ms']:>8.2f} {r['q3_ms']:>8.2f} {base / r['median_ms']:>8.2f}x")
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"fuse_speed_{args.model}_{args.conv}_p{args.p:g}_w{args.width:g}_b{args.batch}_{args.device}.json",
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as stream:
        json.dump({"config": config, "header": header, "results": results,
                   "speedup_vs_unfused": {k: base / v["median_ms"] for k, v in results.items()}}, stream, indent=2)
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
