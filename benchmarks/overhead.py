#!/usr/bin/env python3
"""Per-call overhead of leanconv's layers at batch 1, where the Python around a
library call is most of the time (issue 10's target: within 1.1x).

On a (1, 16, 8, 8) input, one thread, eval mode, under ``torch.inference_mode()``:

* ``HetConv2d(16, 16, 3, padding=1, p=4)`` against ``nn.Conv2d(16, 16, 3, padding=1)``
  (the same shape; HetConv's rule runs the ``direct`` kernel here where it is built, else one
  dense convolution);
* ``DSConv2d``, ``BSConvU2d``, ``BSConvS2d``, ``GWPWConv2d`` (leanconv's defaults:
  BSConv-S with its two BNs, the others without BN) against the same
  convolutions (and BNs) as plain torch modules in an ``nn.Sequential``
  (weights copied; outputs gated equal).

Each pair is timed in interleaved rounds of ``--inner`` calls; the ratio is the
median over rounds of (leanconv time / plain time) within the same round, with
its quartiles, and the ratio of the two fastest rounds (other processes only
ever add time, so that is the least noisy estimate of the overhead).

    python benchmarks/overhead.py --out results/cpu/<machine>-overhead-b1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn

import leanconv
from leanconv.bench import describe_environment, machine_slug, write_results
from leanconv.layers import DepthwiseConv2d


def plain_copy(layer: nn.Module) -> nn.Sequential:
    """The same convolutions and BNs as plain torch modules, in the layer's order."""
    parts = []
    for child in layer.children():
        if isinstance(child, DepthwiseConv2d):
            plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                              child.dilation, child.groups, child.bias is not None, child.padding_mode)
            plain.load_state_dict(child.state_dict())
            child = plain
        parts.append(child)
    return nn.Sequential(*parts)


def pairs(channels: int):
    torch.manual_seed(0)
    het = leanconv.HetConv2d(channels, channels, 3, padding=1, p=4)
    dense = het.to_conv2d()
    out = {"HetConv2d p=4 vs nn.Conv2d": (het, dense)}
    for name, layer in [
        ("DSConv2d", leanconv.DSConv2d(channels, channels, 3, padding=1)),
        ("BSConvU2d", leanconv.BSConvU2d(channels, channels, 3, padding=1)),
        ("BSConvS2d", leanconv.BSConvS2d(channels, channels, 3, padding=1)),
        ("GWPWConv2d", leanconv.GWPWConv2d(channels, channels, 3, padding=1, groups=4)),
    ]:
        out[f"{name} vs nn.Sequential"] = (layer, plain_copy(layer))
    return {name: (a.eval(), b.eval()) for name, (a, b) in out.items()}


def time_pair(first, second, x, rounds: int, inner: int) -> tuple[list[float], list[float]]:
    times = ([], [])
    for _ in range(rounds):
        for index, module in ((0, first), (1, second)):
            start = time.perf_counter()
            for _ in range(inner):
                module(x)
            times[index].append((time.perf_counter() - start) / inner)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--inner", type=int, default=50)
    parser.add_argument("--out", default=None, help="result stem (default OUT_DIR/<machine>-overhead-b1)")
    parser.add_argument("--out-dir", default="results/cpu", help="folder of the default stem (default results/cpu)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    header = describe_environment()
    out = args.out or f"{args.out_dir}/{machine_slug(header)}-overhead-b1"
    x = torch.randn(1, args.channels, args.size, args.size)
    rows, failed = [], []
    modules = pairs(args.channels)
    with torch.inference_mode():
        for name, (layer, plain) in modules.items():
            gate = (layer(x) - plain(x)).abs().max().item()
            if gate > 1e-5:
                failed.append(f"{name}: outputs differ by {gate:.3g}")
                continue
            for module in (layer, plain):  # warm-up: plans, prepared weights, oneDNN primitives
                for _ in range(50):
                    module(x)
            mine, theirs = time_pair(layer, plain, x, args.rounds, args.inner)
            ratios = sorted(a / b for a, b in zip(mine, theirs))
            rows.append({
                "pair": name, "leanconv_us": statistics.median(mine) * 1e6, "plain_us": statistics.median(theirs) * 1e6,
                "ratio_median": statistics.median(ratios), "ratio_q1": ratios[len(ratios) // 4],
                "ratio_q3": ratios[3 * len(ratios) // 4], "ratio_of_fastest": min(mine) / min(theirs),
                "target": 1.1, "met": statistics.median(ratios) <= 1.1,
            })
            print(f"{name:32s} {rows[-1]['leanconv_us']:7.1f} us vs {rows[-1]['plain_us']:7.1f} us: "
                  f"{rows[-1]['ratio_median']:.3f}x (quartiles {rows[-1]['ratio_q1']:.3f}-{rows[-1]['ratio_q3']:.3f}; "
                  f"fastest rounds {rows[-1]['ratio_of_fastest']:.3f}x)", flush=True)
    config = {"command": "python benchmarks/overhead.py " + " ".join(argv or sys.argv[1:]), **vars(args),
              "input": [1, args.channels, args.size, args.size], "threads": 1, "mode": "eval, inference_mode"}
    write_results(
        out, header=header, config=config, rows=rows,
        columns=["pair", "leanconv_us", "plain_us", "ratio_median", "ratio_q1", "ratio_q3", "ratio_of_fastest",
                 "target", "met"],
        title=f"Per-call overhead at batch 1, input (1, {args.channels}, {args.size}, {args.size}), 1 thread",
        notes=["times are medians over interleaved rounds (us per call); ratio = leanconv / plain within a round "
               "(median and quartiles over rounds); ratio_of_fastest: fastest leanconv round / fastest plain round",
               "every pair passed the gate: outputs equal within 1e-5"],
    )
    for message in failed:
        print("GATE FAILED:", message, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
