#!/usr/bin/env python3
"""The choices inside the ``direct`` HetConv kernel, measured: evidence for the rules in
``leanconv/kernels/hetconv_direct*.{h,cpp}``.

* ``lane_loads``: tiles whose vectors hold several groups (groups of fewer filters than a
  vector has lanes) run one pass of permuted loads, against one pass per group with the
  other groups' lanes zero (``hetconv_direct.pack(..., lane_loads=False)``): channels-last
  and NCHW inference.
* ``nchw``: an NCHW input read in place against a channels-last input of the same values
  (the kernel reads NCHW through channels-last copies where it would read it badly).
* ``relayout``: the kernel's NCHW <-> channels-last copy (8x8 register transposes)
  against ``Tensor.contiguous(memory_format=...)``.

Each pair (or triple) interleaved in rounds; outputs gated equal before timing; inference
mode, torch's default threads, the ISA of :func:`leanconv.ops.hetconv_direct.active_isa`.

    python benchmarks/direct_internals.py --out-dir results/cpu
"""

from __future__ import annotations

import argparse
import sys

import torch

from leanconv.bench import describe_environment, machine_slug, time_interleaved, write_results
from leanconv.layers.hetconv import HetConv2d
from leanconv.ops import hetconv_direct

CL = torch.channels_last
# (channels, map side, batch, P): VGG-16-CIFAR at widths 0.25-1 and ResNet-18's shapes.
SHAPES = [(16, 32, 64, 4), (16, 32, 64, 2), (32, 16, 64, 4), (32, 16, 64, 8), (32, 32, 64, 4), (64, 32, 32, 8),
          (64, 8, 64, 8), (128, 16, 64, 16), (64, 32, 32, 4), (128, 16, 64, 4), (256, 8, 64, 4), (512, 4, 64, 4),
          (512, 2, 64, 4), (64, 56, 16, 4), (128, 28, 16, 4), (64, 32, 1, 4), (512, 4, 1, 4)]


def interleaved(candidates: dict, rounds: int) -> dict:
    """Median ms per call of each candidate (:func:`leanconv.bench.time_interleaved`)."""
    return {name: 1e3 * timing.median for name, timing in time_interleaved(candidates, warmup=1, repeats=rounds).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="two shapes, three rounds (a smoke run)")
    parser.add_argument("--out", default=None, help="result stem (default OUT_DIR/<machine>-direct-internals)")
    parser.add_argument("--out-dir", default="results/cpu")
    args = parser.parse_args(argv)
    if not hetconv_direct.available():
        print(f"the direct kernel is unavailable: {hetconv_direct.unavailable_reason()}", file=sys.stderr)
        return 1
    header = describe_environment()
    out = args.out or f"{args.out_dir}/{machine_slug(header)}-direct-internals"
    shapes = SHAPES[:2] if args.quick else SHAPES
    rounds = 3 if args.quick else args.rounds
    isa = hetconv_direct.active_isa()
    module = hetconv_direct.load()
    rows = []
    with torch.inference_mode():
        for channels, side, batch, p in shapes:
            torch.manual_seed(0)
            layer = HetConv2d(channels, channels, 3, padding=1, p=p, backend="direct").eval()
            geometry = layer._geometry
            x = torch.randn(batch, channels, side, side)
            xc = x.contiguous(memory_format=CL)
            lanes = hetconv_direct.pack(layer.weight, layer.pointwise_weight, channels, p, "blocked", isa, True)
            passes = hetconv_direct.pack(layer.weight, layer.pointwise_weight, channels, p, "blocked", isa, False)
            expected = hetconv_direct._call(xc, passes, layer.bias, geometry)
            for got in (hetconv_direct._call(xc, lanes, layer.bias, geometry),
                        hetconv_direct._call(x, lanes, layer.bias, geometry),
                        hetconv_direct._call(x, passes, layer.bias, geometry)):
                if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
                    print(f"GATE FAILED at {channels}x{side}x{side} b{batch} P{p}", file=sys.stderr)
                    return 1
            config = f"M{channels}-{side}x{side}-B{batch}-P{p}"
            times = interleaved({
                "lanes_cl": lambda: hetconv_direct._call(xc, lanes, layer.bias, geometry),
                "passes_cl": lambda: hetconv_direct._call(xc, passes, layer.bias, geometry),
                "lanes_nchw": lambda: hetconv_direct._call(x, lanes, layer.bias, geometry),
                "passes_nchw": lambda: hetconv_direct._call(x, passes, layer.bias, geometry),
            }, rounds)
            permuted = lanes.lane_index.numel() > 0
            rows.append({"what": "lane_loads", "config": config, "isa": isa, "permuted_loads_apply": permuted,
                         **{f"{k}_ms": v for k, v in times.items()},
                         "passes_over_lanes_cl": times["passes_cl"] / times["lanes_cl"],
                         "passes_over_lanes_nchw": times["passes_nchw"] / times["lanes_nchw"],
                         "nchw_over_cl": times["lanes_nchw"] / times["lanes_cl"]})
            print(rows[-1], file=sys.stderr, flush=True)
            if batch > 1 and channels <= 128:
                assert torch.equal(module.relayout(x, isa), xc) and torch.equal(module.relayout(xc, isa), x)
                copies = interleaved({
                    "torch_to_cl": lambda: x.contiguous(memory_format=CL),
                    "kernel_to_cl": lambda: module.relayout(x, isa),
                    "torch_to_nchw": lambda: xc.contiguous(),
                    "kernel_to_nchw": lambda: module.relayout(xc, isa),
                }, rounds)
                rows.append({"what": "relayout", "config": f"{batch}x{channels}x{side}x{side}", "isa": isa,
                             **{f"{k}_ms": v for k, v in copies.items()},
                             "torch_over_kernel_to_cl": copies["torch_to_cl"] / copies["kernel_to_cl"],
                             "torch_over_kernel_to_nchw": copies["torch_to_nchw"] / copies["kernel_to_nchw"]})
                print(rows[-1], file=sys.stderr, flush=True)
    columns = sorted({key for row in rows for key in row}, key=lambda k: (k not in ("what", "config", "isa"), k))
    notes = ["ms per call: median of interleaved rounds; ratios > 1 favour the kernel's choice (lanes, its copy)",
             "lanes: permuted loads where they apply (else the same packing as passes); nchw: an NCHW input of the "
             "same values (read in place, or through the kernel's channels-last copies where its rule says)"]
    for path in write_results(out, header=header, config={"command": "python benchmarks/direct_internals.py",
                                                           "what": "direct-internals", "rounds": rounds},
                              rows=rows, columns=columns, title="Inside the direct HetConv kernel", notes=notes):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
