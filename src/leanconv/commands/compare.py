"""``leanconv compare``: the main job. Train and evaluate one model with every
convolution kind (same data, recipe and seed) and put accuracy, parameters,
MACs and measured time side by side."""

from __future__ import annotations

import argparse
import os

from .train import add_recipe_arguments, apply_threads, recipe_overrides

NAME = "compare"
HELP = "train + evaluate + time one model with each conv kind side by side (default: a 3-5 min CPU run on embedded data)"

# The no-argument run: the HetConv paper's VGG-16 at a quarter of its width
# (19.9 M MACs per image), 20 epochs of cosine SGD on the embedded 1,000 training
# images, tested on the embedded 500. On a quiet 2-core EPYC (torch's 2 threads) a
# training epoch took 0.8 to 1.2 s per variant, which puts the seven default
# variants at about 3 minutes; test top-1 ended at 34-46% (chance: 10%). Another
# busy process on those 2 cores slows it several-fold (OpenMP threads wait on each
# other): --threads 1 is then the faster choice.
DEFAULTS = {"model": "vgg16_cifar", "width": 0.25, "epochs": 20, "batch_size": 64, "lr": 0.05, "warmup": 0.0,
            "data": "embedded", "out": "runs/compare"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..compare import DEFAULT_CONVS

    S = argparse.SUPPRESS
    parser.add_argument("--model", default=S, help=f"zoo model (default {DEFAULTS['model']})")
    parser.add_argument("--convs", default=",".join(DEFAULT_CONVS),
                        help="conv specs, e.g. standard,hetconv:p=4,dsc (default %(default)s)")
    parser.add_argument("--width", type=float, default=S, help=f"width multiplier (default {DEFAULTS['width']})")
    parser.add_argument("--data", default=S, help="CIFAR python .tar.gz or folder, or 'embedded' (default)")
    parser.add_argument("--out", default=S, help=f"output folder (default {DEFAULTS['out']})")
    parser.add_argument("--latency-batch", type=int, default=1, help="images per timed inference call (default 1)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds (default 15)")
    parser.add_argument("--runtimes", default="",
                        help="deployment runtimes whose latency columns are added, comma-separated: openvino, "
                             "onnxruntime (each model exported to ONNX and timed in a process of its own)")
    add_recipe_arguments(parser, DEFAULTS)


def run_comparison(args: argparse.Namespace, defaults: dict, convs: list[str]) -> int:
    from ..bench.runtimes import check_runtime_names
    from ..compare import compare
    from ..train import TrainConfig

    apply_threads(args)
    if len(set(convs)) != len(convs):
        raise ValueError(f"--convs repeats a spec: {', '.join(convs)}")
    base = TrainConfig.resolve(args.config, recipe_overrides(args, exclude=("conv", "p")), defaults=defaults)
    chosen = {k: getattr(base, k) for k in ("model", "width", "epochs", "batch_size", "lr", "schedule", "data")}
    import torch

    print(f"leanconv {args.command}: {', '.join(f'{k}={v}' for k, v in chosen.items())}; convs: {', '.join(convs)}; "
          f"out: {base.out}; torch threads: {torch.get_num_threads()}", flush=True)
    runtimes = check_runtime_names(getattr(args, "runtimes", ""))
    rows = compare(convs, base, base.out, latency_batch=args.latency_batch, repeats=args.repeats, runtimes=runtimes)
    print()
    print(format_table(rows, args.latency_batch, base.batch_size), end="")
    print(f"written: {', '.join(sorted(os.listdir(base.out)))} in {base.out}")
    return 0


def format_table(rows: list[dict], latency_batch: int, train_batch: int) -> str:
    """The printed summary: MACs in millions, accuracy in percent, times in ms."""
    from ..bench.report import markdown_table

    def million(value):
        return None if value is None else f"{value / 1e6:.2f}"

    table = [{
        "conv": row["conv"],
        "params": f"{row['params']:,}",
        "MMACs": million(row["macs"]),
        "MMACs (paper)": million(row["macs_paper"]),
        "MACs vs standard": None if row.get("mac_ratio") is None else f"{row['mac_ratio']:.3f}",
        "top1 %": f"{100 * row['top1']:.1f}",
        "top5 %": f"{100 * row['top5']:.1f}",
        f"infer ms (b{latency_batch})": f"{row['latency_ms']:.2f}",
        "optimized": None if row.get("latency_optimized_ms") is None else f"{row['latency_optimized_ms']:.2f}",
        **{runtime: f"{row[key]:.2f}" for key in row if key.startswith("latency_") and key.endswith("_ms")
           and key not in ("latency_ms", "latency_optimized_ms") for runtime in [key[len("latency_"):-len("_ms")]]},
        f"train step ms (b{train_batch})": f"{row['train_step_ms']:.1f}",
        "peak train MiB": f"{row['peak_train_mib']:.1f}",
        "train s": None if row.get("train_seconds") is None else f"{row['train_seconds']:.1f}",
    } for row in rows]
    return (markdown_table(table, list(table[0])) +
            "MACs per image (FLOPs = 2 x MACs); times are medians of interleaved rounds on this machine "
            "(optimized: leanconv.optimize_for_inference, channels-last; a runtime's: the exported graph); "
            "top1/top5 on the test split after the last epoch.\n")


def run(args: argparse.Namespace) -> int:
    from ..conv_spec import parse_conv_specs

    # Every spec is parsed and checked complete (hetconv has p, gwpw has g) before any training.
    return run_comparison(args, DEFAULTS, [str(spec) for spec in parse_conv_specs(args.convs)])
