#!/usr/bin/env python3
"""Forward time of one HetConv layer in every backend against the nn.Conv2d it
replaces (eval, no grad, float32), interleaved and correctness-gated.

Default: the VGG-16-sized layer of the core issue, 256 -> 256 channels, 3x3,
8x8 maps, batch 64, P = 4, both memory formats.

    .venv/bin/python benchmarks/core_layer.py            # writes results/cpu/<machine>-core-layer-M256-N256-8x8-P4-B64.*
"""

from __future__ import annotations

import argparse
import os
import sys

from leanconv.bench import LayerConfig, bench_hetconv_config, describe_environment, machine_slug, write_results
from leanconv.ops import backend_names

COLUMNS = ["config", "format", "candidate", "ran", "gate", "median_ms", "min_ms", "max_ms", "spread", "macs",
           "gmacs", "speedup_vs_conv2d"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-channels", type=int, default=256)
    parser.add_argument("--out-channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=8, help="input side")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--p", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out-dir", default="results/cpu")
    args = parser.parse_args(argv)

    config = LayerConfig(args.in_channels, args.out_channels, args.size, args.p, args.batch)
    backends = ["auto"] + [name for name in backend_names() if name not in ("auto", "triton")]
    rows = bench_hetconv_config(config, modes=("infer",), backends=backends, baselines=(),
                                warmup=args.warmup, repeats=args.repeats)
    header = describe_environment()
    stem = os.path.join(args.out_dir, f"{machine_slug(header)}-core-layer-{config}")
    notes = ["forward only: eval mode, torch.no_grad, float32; times in ms per call (median of interleaved rounds)",
             "MACs = multiply-accumulates (FLOPs = 2 x MACs); HetConv's own MACs for every backend",
             "speedup_vs_conv2d: nn.Conv2d's median / the candidate's, same memory format"]
    for path in write_results(stem, header=header, config={**vars(args), "backends": backends}, rows=rows,
                              columns=COLUMNS, title=f"HetConv backends vs nn.Conv2d, {config}", notes=notes):
        print(path)
    for row in rows:
        print(f"{row['format']:<14} {row['candidate']:<20} {row.get('ran') or '':<10} "
              f"{row['median_ms']:>9.2f} ms  {row['speedup_vs_conv2d']:.2f}x vs nn.Conv2d")
    return 0


if __name__ == "__main__":
    sys.exit(main())
