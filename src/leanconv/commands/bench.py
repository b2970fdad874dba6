"""``leanconv bench``: time HetConv (and DSC/BSConv) against nn.Conv2d, layer by
layer or whole models, correctness-gated, and write JSON/CSV/Markdown results."""

from __future__ import annotations

import argparse
import os
import sys

NAME = "bench"
HELP = "benchmark HetConv/DSC/BSConv layers or whole models against standard convolutions (CPU or GPU)"


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("layers", "models", "separable"),
                        help="layers: HetConv layer grid; models: whole zoo models; separable: DSC/BSConv layers")
    parser.add_argument("--grid", default="vgg", help="layers: tiny, vgg, wide, small or beyond (default vgg)")
    parser.add_argument("--model", default="vgg16_cifar", help="models: zoo name (default vgg16_cifar)")
    parser.add_argument("--p", type=_ints, default=None,
                        help="HetConv parts, e.g. 4,8 (models default 4,8; layers default: the grid's own)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--modes", default="infer,train",
                        help="infer, train, and for models infer_folded (BN folded by leanconv.fuse); default infer,train")
    parser.add_argument("--formats", default="channels_last,contiguous", help="memory formats to run")
    parser.add_argument("--backends", default="auto,auto-measured,reference,split,direct",
                        help="layers: HetConv backends (auto-measured: auto with measuring on)")
    parser.add_argument("--baselines", default="seed,p_branch,public_loop",
                        help="layers: baselines beside the backends (seed, p_branch, public_loop; '' for none)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per candidate first (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None,
                        help="output stem (writes STEM.json/.csv/.md); default OUT_DIR/<machine>-<what>-<setting>")
    parser.add_argument("--out-dir", default=None,
                        help="folder for the default output stem (default results/cpu, or results/gpu where CUDA is present)")
    parser.add_argument("--no-memory", action="store_true", help="models: skip the peak-memory measurement")


LAYER_COLUMNS = ["config", "mode", "format", "candidate", "ran", "gate", "median_ms", "min_ms", "max_ms", "spread",
                 "macs", "mac_ratio", "gmacs", "speedup_vs_conv2d", "fraction_of_mac_ratio"]
MODEL_COLUMNS = ["model_variant", "mode", "format", "batch", "gate", "median_ms", "min_ms", "max_ms", "spread", "macs",
                 "mac_speedup", "speedup_vs_standard_same_format", "per_round_speedup", "per_round_speedup_q1",
                 "per_round_speedup_q3", "speedup_vs_best_standard", "gmacs", "peak_step_mib", "backends"]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import (
        GRIDS, bench_layer_grid, bench_models, bench_separable_config, build_variants, describe_environment,
        machine_slug, write_results,
    )
    from ..bench.layers import layer_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    args.p_given = args.p is not None
    if args.p is None:
        args.p = [4, 8]
    modes = [m for m in args.modes.split(",") if m]
    formats = [f for f in args.formats.split(",") if f]
    for mode in modes:
        if mode not in ("infer", "train", "infer_folded"):
            raise ValueError(f"--modes takes infer, train (and, for models, infer_folded), got {mode!r}")
        if mode == "infer_folded" and args.what != "models":
            raise ValueError("--modes infer_folded (BatchNorm folded by leanconv.fuse) applies to models only")
    for fmt in formats:
        if fmt not in ("channels_last", "contiguous"):
            raise ValueError(f"--formats takes channels_last and/or contiguous, got {fmt!r}")
    header = describe_environment()
    progress = lambda text: print(f"  {text}", file=sys.stderr, flush=True)  # noqa: E731
    notes = ["times in ms per call (median of interleaved rounds; min/max and interquartile spread beside it)",
             "MACs = multiply-accumulates (FLOPs = 2 x MACs)"]
    if args.what == "layers":
        if args.grid not in GRIDS:
            raise ValueError(f"--grid must be one of {GRIDS}, got {args.grid!r}")
        configs = layer_grid(args.grid, args.batch, args.p if args.p_given else None)
        rows = bench_layer_grid(
            configs, progress=progress, modes=modes, formats=formats,
            backends=[b for b in args.backends.split(",") if b], baselines=[b for b in args.baselines.split(",") if b],
            warmup=args.warmup, repeats=args.repeats,
        )
        columns, setting = LAYER_COLUMNS, f"layers-{args.grid}-b{args.batch}"
        title = f"HetConv layers vs nn.Conv2d, grid {args.grid}, batch {args.batch}"
        notes.append("fraction_of_mac_ratio = speed-up / (dense MACs / candidate MACs): 1.0 turns every saved MAC into time")
    elif args.what == "separable":
        shapes = [(64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4)] if args.grid != "tiny" else [(8, 8, 6)]
        rows = []
        for m, n, s in shapes:
            progress(f"M{m}-N{n}-{s}x{s}")
            rows += bench_separable_config(m, n, s, args.batch, modes=modes, formats=formats,
                                           warmup=args.warmup, repeats=args.repeats)
        columns, setting = [c for c in LAYER_COLUMNS if c != "ran"], f"separable-{args.grid}-b{args.batch}"
        title = f"DSC / BSConv layers vs nn.Conv2d, batch {args.batch}"
    else:
        from .. import models as zoo

        variants = build_variants(zoo.create, args.model, args.p, seed_ps=args.p)
        rows = bench_models(
            variants, input_shape=(args.batch, 3, 32, 32) if "cifar" in args.model else (args.batch, 3, 224, 224),
            modes=modes, formats=formats, warmup=args.warmup, repeats=args.repeats, memory=not args.no_memory,
        )
        columns, setting = MODEL_COLUMNS, f"models-{args.model}-b{args.batch}"
        title = f"{args.model}: standard vs HetConv vs seed form, batch {args.batch}"
        notes.append("training step = forward, cross-entropy, backward, SGD(momentum) step; gmacs counts it as 3 x forward MACs")
        notes.append("peak_step_mib: peak bytes allocated during one training step above the level at its start (profiler)")
        notes.append("per_round_speedup (q1-q3): standard / variant in the same format taken in each round, median and "
                     "quartiles over rounds; the JSON keeps every round's time (round_ms)")
    out_dir = args.out_dir or os.path.join("results", "cpu" if not torch.cuda.is_available() else "gpu")
    stem = args.out or os.path.join(out_dir, f"{machine_slug(header)}-{setting}")
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    for path in write_results(stem, header=header, config=config, rows=rows, columns=columns, title=title, notes=notes):
        print(path)
    return 0
